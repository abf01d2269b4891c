//! The source contract: a source turns a broker into a stream of [`Delivery`]s (an [`Inbound`]
//! message plus the [`Acker`] that settles it) and reconnects on its own. The pipeline never sees
//! a broker type; a source never sees HTTP.

pub mod amqp;
pub mod failover;
pub mod mqtt;

use std::future::Future;
use std::pin::Pin;

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
pub struct Acker(Box<dyn AckHandle>);

impl Acker {
    /// Wraps a source's ack handle.
    pub fn new(handle: impl AckHandle) -> Acker {
        Acker(Box::new(handle))
    }

    /// Acknowledges the message. A failure means the broker will redeliver it (its channel or
    /// session is gone), which the dedup store absorbs.
    pub async fn ack(self) -> Result<(), String> {
        self.0.ack().await
    }
}
