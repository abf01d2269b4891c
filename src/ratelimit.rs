//! One destination's rate limit (`rate_limit = { requests, per, burst }`): a token bucket that
//! hands out *reservations*, and that slows down when the destination answers 429.
//!
//! - The bucket holds at most `burst` tokens and earns `requests / per` tokens a second. A
//!   request takes one. When none is left, the request reserves the next token to come: the
//!   count goes below zero and the reservation is due when the bucket has earned it back. So
//!   waiters are served in the order they asked, each sleeps once, and the wait is known before
//!   anyone waits: a caller that may not wait that long leaves without taking anything
//!   (docs/delivery.md, "Rate limits").
//! - A 429 with `Retry-After` pauses the bucket: no token is due before the time it names
//!   (at most `retry.max_interval` away); then one token is there and the rate goes on.
//! - A 429 without one halves the rate (down to 1/64 of the configured rate). Every `per`
//!   without another such 429, a tenth of the configured rate comes back, up to the configured
//!   rate (AIMD). A 429 to a request that was sent before the last halving does not halve again.
//! - A pause or a halving voids the reservations handed out before it: their holders ask again
//!   when they wake ([`RateLimiter::holds`]), so they keep to the new pace.
//!
//! Every method takes `now`, so the arithmetic is tested without sleeping.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::RateLimitConfig;

/// The lowest share of the configured rate that 429s without `Retry-After` bring it to.
pub const MIN_SHARE: f64 = 1.0 / 64.0;
/// The share of the configured rate won back per `per` without such a 429.
pub const STEP: f64 = 0.1;
/// No wait is computed longer than this (a year), so `Instant` arithmetic cannot overflow.
const LONGEST_WAIT: f64 = 365.0 * 86_400.0;

/// One destination's token bucket.
#[derive(Debug)]
pub struct RateLimiter {
    /// Tokens a second at the configured rate.
    rate: f64,
    burst: f64,
    per: Duration,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Tokens in the bucket; below zero, tokens already promised to reservations not yet due.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    updated: Instant,
    /// No token is earned or due before this (a 429's `Retry-After`).
    paused_until: Instant,
    /// The share of the configured rate in force, `MIN_SHARE..=1`.
    share: f64,
    /// When the rate was last halved.
    halved_at: Option<Instant>,
    /// Where the next additive step is counted from.
    step_from: Instant,
    /// Moves on at every pause and halving; reservations of an older epoch are void.
    epoch: u64,
}

/// A reserved token, due at `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub at: Instant,
    epoch: u64,
}

/// What a 429 did to the bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Throttle {
    /// No token is due for this long.
    Paused(Duration),
    /// The rate is now this many requests a second.
    Halved(f64),
    /// The request was sent before the last halving: its 429 was already answered.
    AlreadySlowed,
}

impl RateLimiter {
    /// A full bucket for `config`, at its configured rate.
    pub fn new(config: &RateLimitConfig, now: Instant) -> RateLimiter {
        let burst = f64::from(config.burst.max(1));
        RateLimiter {
            rate: f64::from(config.requests.max(1)) / config.per.as_secs_f64().max(1e-9),
            burst,
            per: config.per.max(Duration::from_nanos(1)),
            bucket: Mutex::new(Bucket {
                tokens: burst,
                updated: now,
                paused_until: now,
                share: 1.0,
                halved_at: None,
                step_from: now,
                epoch: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        // Plain numbers: a panic while holding the lock cannot leave them inconsistent.
        self.bucket.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next token, if it is due within `within` from `now` (`None`: however long it takes).
    /// Otherwise nothing is taken, and the error is when the token would have been due.
    pub fn reserve(&self, now: Instant, within: Option<Duration>) -> Result<Grant, Instant> {
        let mut b = self.lock();
        self.advance(&mut b, now);
        let wait = self.wait(&b, now);
        if within.is_some_and(|limit| wait > limit) {
            return Err(later(now, wait));
        }
        b.tokens -= 1.0;
        Ok(Grant {
            at: later(now, wait),
            epoch: b.epoch,
        })
    }

    /// Whether `grant` still stands: no pause or halving came after it was handed out.
    pub fn holds(&self, grant: &Grant) -> bool {
        self.lock().epoch == grant.epoch
    }

    /// How many reservations made at `now` would be due within `within`.
    pub fn room(&self, now: Instant, within: Duration) -> usize {
        let mut b = self.lock();
        self.advance(&mut b, now);
        let paused = b.paused_until.saturating_duration_since(now);
        let Some(earning) = within.checked_sub(paused) else {
            return 0;
        };
        let room = b.tokens + earning.as_secs_f64() * self.rate * b.share;
        if room < 1.0 {
            0
        } else {
            room.min(1e9) as usize
        }
    }

    /// How long from `now` until [`RateLimiter::room`] within `within` is at least one.
    pub fn room_in(&self, now: Instant, within: Duration) -> Duration {
        let mut b = self.lock();
        self.advance(&mut b, now);
        self.wait(&b, now).saturating_sub(within)
    }

    /// The destination answered 429 to a request sent at `sent_at`, with `retry_after` if it
    /// said one; a pause is at most `longest_pause`.
    pub fn throttled(
        &self,
        now: Instant,
        sent_at: Instant,
        retry_after: Option<Duration>,
        longest_pause: Duration,
    ) -> Throttle {
        let mut b = self.lock();
        self.advance(&mut b, now);
        match retry_after {
            Some(wanted) => {
                let pause = wanted.min(longest_pause);
                b.paused_until = b.paused_until.max(later(now, pause));
                b.tokens = 1.0;
                b.epoch += 1;
                Throttle::Paused(b.paused_until.saturating_duration_since(now))
            }
            None => {
                if b.halved_at.is_some_and(|at| sent_at < at) {
                    return Throttle::AlreadySlowed;
                }
                b.share = (b.share / 2.0).max(MIN_SHARE);
                b.halved_at = Some(now);
                b.step_from = now;
                // The voided reservations ask again; what they had promised is forgiven.
                b.tokens = b.tokens.max(0.0);
                b.epoch += 1;
                Throttle::Halved(self.rate * b.share)
            }
        }
    }

    /// The rate in force at `now`, in requests a second.
    pub fn current_rate(&self, now: Instant) -> f64 {
        let mut b = self.lock();
        self.advance(&mut b, now);
        self.rate * b.share
    }

    /// The configured rate, in requests a second.
    pub fn configured_rate(&self) -> f64 {
        self.rate
    }

    /// Brings the bucket to `now`: the tokens earned since the last look (none while paused),
    /// then the additive steps due (so the tokens are earned at the lower rate: a step counts
    /// from the next look on).
    fn advance(&self, b: &mut Bucket, now: Instant) {
        if now <= b.updated {
            return;
        }
        let from = b.updated.max(b.paused_until);
        if now > from {
            let earned = (now - from).as_secs_f64() * self.rate * b.share;
            b.tokens = (b.tokens + earned).min(self.burst);
        }
        b.updated = now;
        if b.share < 1.0 {
            let per = self.per.as_secs_f64();
            let since = now.saturating_duration_since(b.step_from).as_secs_f64();
            let steps = (since / per).floor();
            if steps >= 1.0 {
                b.share = (b.share + steps * STEP).min(1.0);
                let rest = Duration::from_secs_f64((since - steps * per).clamp(0.0, per));
                b.step_from = now.checked_sub(rest).unwrap_or(now);
            }
        }
    }

    /// How long from `now` until the next token is due.
    fn wait(&self, b: &Bucket, now: Instant) -> Duration {
        let paused = b.paused_until.saturating_duration_since(now).as_secs_f64();
        let short = (1.0 - b.tokens).max(0.0);
        Duration::from_secs_f64((paused + short / (self.rate * b.share)).clamp(0.0, LONGEST_WAIT))
    }
}

/// `now + wait`, or `now` plus a year if that overflows.
fn later(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait)
        .or_else(|| now.checked_add(Duration::from_secs_f64(LONGEST_WAIT)))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(requests: u32, per_ms: u64, burst: u32, now: Instant) -> RateLimiter {
        RateLimiter::new(
            &RateLimitConfig {
                requests,
                per: Duration::from_millis(per_ms),
                burst,
            },
            now,
        )
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Milliseconds from `t0` to `t`, to the nearest.
    fn after(t0: Instant, t: Instant) -> u64 {
        ((t - t0).as_secs_f64() * 1000.0).round() as u64
    }

    /// Milliseconds from `t0` to each of `n` grants reserved at `now`.
    fn due(l: &RateLimiter, now: Instant, t0: Instant, n: usize) -> Vec<u64> {
        (0..n)
            .map(|_| after(t0, l.reserve(now, None).expect("no limit").at))
            .collect()
    }

    fn near(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn a_burst_then_the_rate_in_order() {
        let t0 = Instant::now();
        let l = limiter(20, 1000, 3, t0);
        // Three at once, then one every 50 ms, each reservation after the one before.
        assert_eq!(due(&l, t0, t0, 6), [0, 0, 0, 50, 100, 150]);
        // 200 ms later the next is due at 200 ms: what was promised is not given twice.
        assert_eq!(due(&l, t0 + ms(200), t0, 2), [200, 250]);
        // A long idle spell fills the bucket to the burst, no more.
        assert_eq!(
            due(&l, t0 + ms(10_000), t0, 4),
            [10_000, 10_000, 10_000, 10_050]
        );
    }

    #[test]
    fn a_caller_that_may_not_wait_takes_nothing() {
        let t0 = Instant::now();
        let l = limiter(10, 1000, 1, t0);
        assert!(l.reserve(t0, Some(ms(0))).is_ok());
        // The next token is 100 ms away.
        let refused = l.reserve(t0, Some(ms(50))).expect_err("100 ms away");
        assert_eq!(after(t0, refused), 100);
        assert_eq!(l.room(t0, ms(1000)), 10);
        assert_eq!(after(t0, t0 + l.room_in(t0, ms(50))), 50);
        let g = l.reserve(t0, Some(ms(101))).expect("within 100 ms");
        assert_eq!(after(t0, g.at), 100);
        assert!(l.holds(&g));
        assert_eq!(l.room(t0, ms(1000)), 9);
        assert_eq!(l.room(t0, ms(50)), 0);
    }

    #[test]
    fn retry_after_pauses_then_one_token_and_the_rate() {
        let t0 = Instant::now();
        let l = limiter(20, 1000, 5, t0);
        let waiting = l.reserve(t0, None).expect("token");
        let t = t0 + ms(10);
        assert_eq!(
            l.throttled(
                t,
                t0,
                Some(Duration::from_secs(2)),
                Duration::from_secs(600)
            ),
            Throttle::Paused(Duration::from_secs(2))
        );
        assert!(
            !l.holds(&waiting),
            "a pause voids reservations made before it"
        );
        assert_eq!(l.room(t, ms(1990)), 0);
        assert_eq!(due(&l, t, t0, 3), [2010, 2060, 2110]);
        // The pause is capped.
        let l = limiter(20, 1000, 1, t0);
        assert_eq!(
            l.throttled(
                t0,
                t0,
                Some(Duration::from_secs(3600)),
                Duration::from_secs(5)
            ),
            Throttle::Paused(Duration::from_secs(5))
        );
    }

    #[test]
    fn a_bare_429_halves_once_per_round_and_the_rate_comes_back_in_steps() {
        let t0 = Instant::now();
        let l = limiter(100, 1000, 1, t0);
        let t1 = t0 + ms(100);
        assert_eq!(
            l.throttled(t1, t0, None, Duration::MAX),
            Throttle::Halved(50.0)
        );
        // Another answer to a request sent before the halving changes nothing.
        assert_eq!(
            l.throttled(t1 + ms(5), t0 + ms(50), None, Duration::MAX),
            Throttle::AlreadySlowed
        );
        // A request sent after it halves again.
        assert_eq!(
            l.throttled(t1 + ms(20), t1 + ms(10), None, Duration::MAX),
            Throttle::Halved(25.0)
        );
        let t2 = t1 + ms(20);
        for _ in 0..20 {
            l.throttled(t2, t2, None, Duration::MAX);
            l.throttled(t2, t2 + ms(1), None, Duration::MAX);
        }
        assert!(near(l.current_rate(t2), 1.5625), "never below 1/64");
        // One step (a tenth of the configured rate) per `per` without a halving.
        assert!(near(l.current_rate(t2 + ms(999)), 1.5625));
        assert!(near(l.current_rate(t2 + ms(1000)), 11.5625));
        assert!(near(l.current_rate(t2 + ms(3500)), 31.5625));
        assert!(
            near(l.current_rate(t2 + ms(60_000)), 100.0),
            "back to the configured rate, no more"
        );
    }
}
