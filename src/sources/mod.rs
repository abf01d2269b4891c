//! The source contract: a source turns a broker into a stream of [`Delivery`]s (an [`Inbound`]
//! message plus the [`Acker`] that settles it) and reconnects on its own. The pipeline never sees
//! a broker type; a source never sees HTTP.

pub mod amqp;
pub mod mqtt;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

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

/// Capped exponential backoff for reconnecting, forever.
///
/// The `backoff` crate computes the intervals (with jitter); it is unmaintained upstream, so it is
/// used from this one place only.
pub struct ReconnectBackoff {
    inner: backoff::ExponentialBackoff,
}

impl ReconnectBackoff {
    /// Starts at `initial`, doubles up to `max`, and never gives up.
    pub fn new(initial: Duration, max: Duration) -> ReconnectBackoff {
        let inner = backoff::ExponentialBackoff {
            current_interval: initial,
            initial_interval: initial,
            randomization_factor: 0.2,
            multiplier: 2.0,
            max_interval: max,
            max_elapsed_time: None,
            ..backoff::ExponentialBackoff::default()
        };
        ReconnectBackoff { inner }
    }

    /// The wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        use backoff::backoff::Backoff as _;
        self.inner.next_backoff().unwrap_or(self.inner.max_interval)
    }

    /// Back to the initial interval, after a connection that worked.
    pub fn reset(&mut self) {
        use backoff::backoff::Backoff as _;
        self.inner.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_cap_and_resets() {
        let mut b = ReconnectBackoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first <= Duration::from_millis(120), "{first:?}");
        let mut last = first;
        for _ in 0..20 {
            last = b.next_delay();
        }
        assert!(last <= Duration::from_millis(2400), "capped: {last:?}");
        assert!(last >= Duration::from_millis(1600), "grew: {last:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(120));
    }
}
