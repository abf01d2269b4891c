//! One destination's circuit: closed (attempt), open (do not attempt; park for later), half-open
//! (let exactly one probe through, and close or re-open on its result).
//!
//! It opens on `circuit.failures` consecutive retryable failures, when an event waited
//! `circuit.max_wait` for one of the destination's `max_concurrency` slots and the destination
//! answered nothing in that time, or at once when the destination's OAuth2 token endpoint
//! refuses the client. The second rule is the one that matters for an endpoint that accepts
//! connections and never answers: its failures only show after the request timeout (60 s by
//! default), while the slots fill in milliseconds. An endpoint that is merely slow keeps
//! answering, so its full slots do not open the circuit: it gets all of its `max_concurrency`.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crate::config::CircuitConfig;

/// What to do with the next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Attempt normally.
    Closed,
    /// Attempt: this is the one probe of a half-open circuit; report its result.
    Probe,
    /// Do not attempt; try again at this time.
    Open { retry_at: SystemTime },
}

#[derive(Debug, Default)]
struct State {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    probing: bool,
    /// The last answer that closed the circuit: a destination that answered within `max_wait`
    /// is slow, not hanging, and full slots do not open its circuit.
    last_answer: Option<Instant>,
}

/// The circuit of one destination.
#[derive(Debug)]
pub struct Circuit {
    name: String,
    config: CircuitConfig,
    state: Mutex<State>,
}

/// An answer this recent shows a destination whose slots are all busy to be up.
pub const ANSWERED_LATELY: Duration = Duration::from_secs(1);

impl Circuit {
    /// A closed circuit for destination `name`.
    pub fn new(name: &str, config: CircuitConfig) -> Circuit {
        Circuit {
            name: name.to_string(),
            config,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state inconsistent (plain fields).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether (and how) to attempt now.
    pub fn gate(&self) -> Gate {
        let mut s = self.lock();
        let Some(until) = s.open_until else {
            return Gate::Closed;
        };
        let now = Instant::now();
        if now < until {
            return Gate::Open {
                retry_at: SystemTime::now() + (until - now),
            };
        }
        if s.probing {
            // A probe is out: look again soon rather than a whole open_for later.
            return Gate::Open {
                retry_at: SystemTime::now() + self.config.open_for.min(Duration::from_secs(1)),
            };
        }
        s.probing = true;
        Gate::Probe
    }

    /// Whether no attempt may start now: open, or half-open with its probe still out. The retry
    /// scheduler does not even read such a destination's entries.
    pub fn blocked(&self) -> bool {
        let s = self.lock();
        match s.open_until {
            None => false,
            Some(until) => Instant::now() < until || s.probing,
        }
    }

    /// Whether the open period is over and the probe has not been taken yet.
    pub fn probe_ready(&self) -> bool {
        let s = self.lock();
        s.open_until.is_some_and(|until| Instant::now() >= until) && !s.probing
    }

    /// Whether the circuit is open (or half-open) now.
    pub fn is_open(&self) -> bool {
        self.lock().open_until.is_some()
    }

    /// A 2xx, or an answer that proves the endpoint is up (a 4xx): close.
    pub fn record_success(&self) {
        let mut s = self.lock();
        if s.open_until.is_some() {
            tracing::info!(destination = %self.name, "circuit closed: the destination answers again");
        }
        *s = State {
            last_answer: Some(Instant::now()),
            ..State::default()
        };
    }

    /// A retryable failure (no answer, timeout, 5xx, 408, 429).
    pub fn record_failure(&self, was_probe: bool) {
        let mut s = self.lock();
        s.consecutive_failures = s.consecutive_failures.saturating_add(1);
        if was_probe {
            s.probing = false;
            s.open_until = Some(Instant::now() + self.config.open_for);
            tracing::warn!(destination = %self.name, open_for = ?self.config.open_for, "circuit probe failed: staying open");
        } else if s.open_until.is_none() && s.consecutive_failures >= self.config.failures {
            s.open_until = Some(Instant::now() + self.config.open_for);
            tracing::warn!(
                destination = %self.name,
                failures = s.consecutive_failures,
                open_for = ?self.config.open_for,
                "circuit opened: events for this destination are parked in the retry store until a probe succeeds"
            );
        }
    }

    /// A failure that says the destination cannot take events until something outside courier
    /// changes (its OAuth2 token endpoint refuses the client): open at once, whatever the count,
    /// for `open_for`. A probe after that finds out whether it has changed.
    pub fn open_now(&self, why: &str) {
        let mut s = self.lock();
        s.consecutive_failures = s.consecutive_failures.saturating_add(1);
        let (was_open, was_probing) = (s.open_until.is_some(), s.probing);
        s.probing = false;
        s.open_until = Some(Instant::now() + self.config.open_for);
        if !was_open {
            tracing::warn!(
                destination = %self.name,
                open_for = ?self.config.open_for,
                reason = %why,
                "circuit opened: events for this destination are parked in the retry store until a probe succeeds"
            );
        } else if was_probing {
            tracing::warn!(destination = %self.name, open_for = ?self.config.open_for, reason = %why, "circuit probe failed: staying open");
        }
    }

    /// An event waited `max_wait` for a concurrency slot: the destination is not keeping up.
    /// Opens unless it answered during that wait, or within the last [`ANSWERED_LATELY`] (it
    /// is slow or busy, not hanging): with a short `max_wait` (`"0s"` for rate-limited
    /// destinations fed by MQTT), every moment all slots are busy would open it otherwise.
    pub fn record_saturated(&self) {
        let mut s = self.lock();
        let within = self.config.max_wait.max(ANSWERED_LATELY);
        let answering = s.last_answer.is_some_and(|at| at.elapsed() < within);
        if s.open_until.is_none() && !answering {
            s.open_until = Some(Instant::now() + self.config.open_for);
            tracing::warn!(
                destination = %self.name,
                max_wait = ?self.config.max_wait,
                open_for = ?self.config.open_for,
                "circuit opened: every concurrency slot is busy; events are parked until a probe succeeds"
            );
        }
    }

    /// When the circuit lets an attempt through again (for parking); never takes the probe.
    pub fn reopens_at(&self) -> SystemTime {
        let s = self.lock();
        let now = Instant::now();
        match s.open_until {
            Some(until) if until > now => SystemTime::now() + (until - now),
            _ => SystemTime::now() + self.config.max_wait,
        }
    }

    /// The probe could not be made after all (e.g. the event was already delivered).
    pub fn release_probe(&self) {
        self.lock().probing = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn circuit(failures: u32, open_for_ms: u64) -> Circuit {
        Circuit::new(
            "d",
            CircuitConfig {
                failures,
                open_for: Duration::from_millis(open_for_ms),
                max_wait: Duration::from_millis(10),
            },
        )
    }

    #[test]
    fn opens_after_consecutive_failures_and_probes_once() {
        let c = circuit(3, 400);
        c.record_failure(false);
        c.record_failure(false);
        c.record_success();
        c.record_failure(false);
        c.record_failure(false);
        assert_eq!(c.gate(), Gate::Closed, "a success reset the count");
        c.record_failure(false);
        assert!(matches!(c.gate(), Gate::Open { .. }));
        std::thread::sleep(Duration::from_millis(450));
        assert_eq!(c.gate(), Gate::Probe);
        assert!(matches!(c.gate(), Gate::Open { .. }), "one probe at a time");
        c.record_failure(true);
        assert!(
            matches!(c.gate(), Gate::Open { .. }),
            "failed probe re-opens"
        );
        std::thread::sleep(Duration::from_millis(450));
        assert_eq!(c.gate(), Gate::Probe);
        c.record_success();
        assert_eq!(c.gate(), Gate::Closed);
        assert!(!c.is_open());
    }

    #[test]
    fn a_refused_client_opens_at_once_and_a_probe_finds_out() {
        let c = circuit(5, 300);
        c.open_now("oauth2 token endpoint refused the client: invalid_client (HTTP 401)");
        assert!(
            matches!(c.gate(), Gate::Open { .. }),
            "one failure is enough"
        );
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(c.gate(), Gate::Probe);
        c.open_now("still refused");
        assert!(
            matches!(c.gate(), Gate::Open { .. }),
            "a refused probe re-opens it"
        );
        assert!(!c.probe_ready());
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(c.gate(), Gate::Probe);
        c.record_success();
        assert_eq!(c.gate(), Gate::Closed);
    }

    #[test]
    fn saturation_opens() {
        let c = circuit(100, 1000);
        c.record_saturated();
        assert!(c.is_open());
        assert!(matches!(c.gate(), Gate::Open { .. }));
    }

    #[test]
    fn saturation_of_a_destination_that_answers_does_not_open() {
        let c = circuit(100, 1000);
        c.record_success();
        c.record_saturated();
        assert!(
            !c.is_open(),
            "it answered within max_wait: slow, not hanging"
        );
        // No answer for longer than max_wait (10 ms) and ANSWERED_LATELY: hanging.
        std::thread::sleep(ANSWERED_LATELY + Duration::from_millis(20));
        c.record_saturated();
        assert!(c.is_open());
    }

    /// With `max_wait = "0s"` every moment all slots are busy is a saturation; a destination
    /// that answered a moment ago is busy, not hanging.
    #[test]
    fn saturation_with_no_max_wait_needs_a_silent_destination() {
        let c = Circuit::new(
            "d",
            CircuitConfig {
                failures: 5,
                open_for: Duration::from_secs(30),
                max_wait: Duration::ZERO,
            },
        );
        c.record_saturated();
        assert!(c.is_open(), "never answered");
        c.record_success();
        c.record_saturated();
        assert!(!c.is_open(), "answered just now");
    }
}
