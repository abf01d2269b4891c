//! Capped exponential backoff with jitter: for reconnecting to brokers and for retry schedules.
//!
//! The `backoff` crate computes the intervals. It is no longer maintained upstream, so it is used
//! from this file only: swapping it means changing this file.

use std::time::Duration;

use backoff::backoff::Backoff as _;

use crate::config::RetryConfig;

/// Backoff for reconnecting, forever.
pub struct ReconnectBackoff {
    inner: backoff::ExponentialBackoff,
}

impl ReconnectBackoff {
    /// Starts at `initial`, doubles up to `max` (±20 % jitter), and never gives up.
    pub fn new(initial: Duration, max: Duration) -> ReconnectBackoff {
        ReconnectBackoff {
            inner: exponential(initial, 2.0, max, 0.2),
        }
    }

    /// The wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.inner.next_backoff().unwrap_or(self.inner.max_interval)
    }

    /// Back to the initial interval, after a connection that worked.
    pub fn reset(&mut self) {
        self.inner.reset();
    }
}

/// The wait after the `attempts`-th failed attempt (1 = after the first): `initial_interval` ×
/// `multiplier`^(attempts-1), capped at `max_interval`, with ±25 % jitter (never over the cap).
/// A `Retry-After` from the server replaces it, kept within `initial_interval..=max_interval`.
pub fn retry_delay(policy: &RetryConfig, attempts: u32, retry_after: Option<Duration>) -> Duration {
    if let Some(wanted) = retry_after {
        return wanted.clamp(policy.initial_interval, policy.max_interval);
    }
    let mut b = exponential(
        policy.initial_interval,
        policy.multiplier,
        policy.max_interval,
        0.25,
    );
    let mut delay = policy.initial_interval;
    for _ in 0..attempts.max(1) {
        delay = b.next_backoff().unwrap_or(policy.max_interval);
    }
    delay.min(policy.max_interval)
}

fn exponential(
    initial: Duration,
    multiplier: f64,
    max: Duration,
    jitter: f64,
) -> backoff::ExponentialBackoff {
    backoff::ExponentialBackoff {
        current_interval: initial,
        initial_interval: initial,
        randomization_factor: jitter,
        multiplier,
        max_interval: max,
        max_elapsed_time: None,
        ..backoff::ExponentialBackoff::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_backoff_grows_to_cap_and_resets() {
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

    #[test]
    fn retry_schedule() {
        let p = RetryConfig {
            max_attempts: 8,
            initial_interval: Duration::from_secs(1),
            multiplier: 2.0,
            max_interval: Duration::from_secs(10),
        };
        let d1 = retry_delay(&p, 1, None);
        assert!(
            d1 >= Duration::from_millis(750) && d1 <= Duration::from_millis(1250),
            "{d1:?}"
        );
        let d3 = retry_delay(&p, 3, None);
        assert!(
            d3 >= Duration::from_secs(3) && d3 <= Duration::from_secs(5),
            "{d3:?}"
        );
        assert!(retry_delay(&p, 20, None) <= Duration::from_secs(10));
        assert_eq!(
            retry_delay(&p, 1, Some(Duration::from_secs(5))),
            Duration::from_secs(5)
        );
        assert_eq!(
            retry_delay(&p, 1, Some(Duration::from_secs(3600))),
            Duration::from_secs(10)
        );
        assert_eq!(
            retry_delay(&p, 1, Some(Duration::ZERO)),
            Duration::from_secs(1)
        );
    }
}
