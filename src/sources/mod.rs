//! The source contract: a source turns a broker into a stream of [`Delivery`]s (an [`Inbound`]
//! message plus the [`Acker`] that settles it) and reconnects on its own. The pipeline never sees
//! a broker type; a source never sees HTTP.

pub mod amqp;
mod amqp_acks;
pub mod failover;
pub mod mqtt;
pub mod supervisor;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

pub use crate::backoff::ReconnectBackoff;
use crate::event::Inbound;

/// A received message and the handle that acknowledges it.
pub struct Delivery {
    /// The message as received.
    pub inbound: Inbound,
    /// Settles the message with the broker.
    pub acker: Acker,
}

/// Future returned by [`AckHandle::ack`].
pub type AckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// The broker-specific half of an [`Acker`].
pub trait AckHandle: Send + 'static {
    /// Acknowledges the message; the error text says why the broker did not take the ack.
    fn ack(self: Box<Self>) -> AckFuture;
}

/// Acknowledges one message, once.
///
/// `ack` consumes the acker, so a message cannot be acked twice. Dropping an acker without acking
/// leaves the message with the broker, which redelivers it: the safe default when courier stops
/// before a delivery finished.
pub struct Acker {
    handle: Box<dyn AckHandle>,
    /// Counts the message among its source's unsettled ones until it is acked or dropped.
    _held: Option<Held>,
}

impl Acker {
    /// Wraps a source's ack handle.
    pub fn new(handle: impl AckHandle) -> Acker {
        Acker {
            handle: Box::new(handle),
            _held: None,
        }
    }

    /// Acknowledges the message. A failure means the broker will redeliver it (its channel or
    /// session is gone), which the dedup store absorbs.
    pub async fn ack(self) -> Result<(), String> {
        let Acker { handle, _held } = self;
        // Settled once the ack went out: a source being replaced keeps its connection until then.
        handle.ack().await
    }
}

/// The messages a source has handed to the pipeline and not yet settled (acked, or dropped
/// unacked). A source that a configuration reload replaces stops taking messages, waits for
/// these, and only then closes its connection, so the acks of its last messages still go out.
#[derive(Clone, Default)]
pub struct InFlight(Arc<Counter>);

#[derive(Default)]
struct Counter {
    count: AtomicUsize,
    settled: Notify,
}

impl InFlight {
    /// An acker for `handle` that counts its message until it is settled.
    pub fn acker(&self, handle: impl AckHandle) -> Acker {
        self.0.count.fetch_add(1, Ordering::SeqCst);
        Acker {
            handle: Box::new(handle),
            _held: Some(Held(Arc::clone(&self.0))),
        }
    }

    /// Returns once no message of the source is unsettled.
    pub async fn settled(&self) {
        loop {
            // Registered before the check, so a settlement in between is not missed.
            let settled = self.0.settled.notified();
            if self.0.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            settled.await;
        }
    }
}

/// One unsettled message of an [`InFlight`].
struct Held(Arc<Counter>);

impl Drop for Held {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.settled.notify_waiters();
        }
    }
}
