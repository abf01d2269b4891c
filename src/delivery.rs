//! One attempt of one event at one destination, whoever asks for it: a queue message's first
//! attempt (the pipeline), a pending retry (the scheduler) or an operator's replay of a dead
//! letter. All three go through [`Deliverer::attempt`], so they follow the same rules: one
//! attempt per (destination, event) at a time in this process, the dedup check, the circuit, the
//! destination's rate limit, its concurrency limit, the POST, and the outcome written to the
//! store and counted once.

use std::hash::BuildHasher as _;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use tokio::sync::{Notify, SemaphorePermit};

use crate::backoff::retry_delay;
use crate::circuit::Gate;
use crate::destination::{Destination, DestinationId};
use crate::event::Event;
use crate::prehashed::PrehashedSet;
use crate::ratelimit::{RateLimiter, Throttle};
use crate::sender::{self, format_time, Outcome};
use crate::stats::Stats;
use crate::store::{millis, DeadLetter, DeadLetterKind, RetryRecord, Store, StoredEvent};
use crate::telemetry::{AttemptKind, Telemetry};

/// Who asked for an attempt. It decides how long the attempt may wait for a token and a slot,
/// whether the circuit and the rate limit apply, and which stored record its outcome replaces.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// The first attempt for a queue message. It waits at most `circuit.max_wait` for a token
    /// of the rate limit and at most `circuit.max_wait` for a slot: the broker holds the message
    /// meanwhile. When the destination cannot take it now (circuit open, no token or no slot in
    /// time), the event is parked in the retry store instead.
    Message,
    /// A later attempt of this pending retry entry, for the scheduler. Without a token within
    /// [`retry_token_wait`] or a slot within `circuit.max_wait`, the entry stays due and is
    /// taken again on a later pass; a destination that holds every slot must not hold the
    /// scheduler's whole pool.
    Retry(&'a RetryRecord),
    /// An operator's replay of this dead letter, now. It waits for its token and its slot as
    /// long as it takes; an open circuit leaves the letter as it is ([`Settled::Blocked`]).
    /// `force` skips the circuit and the rate limit. A failure keeps the letter, with the new
    /// reason.
    Replay { letter: &'a DeadLetter, force: bool },
}

impl Origin<'_> {
    /// Attempts made before this one.
    fn attempts_before(&self) -> u32 {
        match self {
            Origin::Message => 0,
            Origin::Retry(record) => record.attempts,
            Origin::Replay { letter, .. } => letter.attempts,
        }
    }

    /// What the attempt's span calls its origin.
    fn kind(&self) -> AttemptKind {
        match self {
            Origin::Message => AttemptKind::Message,
            Origin::Retry(_) => AttemptKind::Retry,
            Origin::Replay { .. } => AttemptKind::Replay,
        }
    }

    /// A forced replay: neither the circuit nor the rate limit applies.
    fn forced(&self) -> bool {
        matches!(self, Origin::Replay { force: true, .. })
    }
}

/// Why an event was parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parking {
    /// The circuit is open, or every slot stayed busy for `circuit.max_wait`.
    Circuit,
    /// The rate limit had no token within `circuit.max_wait`.
    RateLimit,
}

/// What an attempt came to, and what it left in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Dedup says the destination already has the event: nothing was sent. The retry entry or
    /// dead letter the attempt came from is removed.
    Duplicate,
    /// The destination could not take the event now (circuit open, no token of the rate limit
    /// or no slot in time): it is in the retry store without a new attempt.
    Parked,
    /// A retry found no token or no free slot in time: its entry stays due, unchanged.
    Busy,
    /// A replay found the circuit open: nothing was sent and the letter stays as it was.
    Blocked { reason: String },
    /// A 2xx; the dedup record is written.
    Delivered { status: u16 },
    /// A retryable failure with attempts left: another attempt is scheduled.
    RetryScheduled { status: Option<u16>, reason: String },
    /// A final failure, or the last attempt: a dead letter.
    DeadLettered { status: Option<u16>, reason: String },
    /// A replay failed: the dead letter stays, with this reason.
    StillDead { status: Option<u16>, reason: String },
}

impl Settled {
    /// What the attempt wrote, which tells a queue message whether its ack must wait for the
    /// group commit.
    pub fn recorded(&self) -> Recorded {
        match self {
            Settled::Duplicate | Settled::Busy | Settled::Blocked { .. } => Recorded::Nothing,
            Settled::Delivered { .. } => Recorded::Delivered,
            Settled::Parked
            | Settled::RetryScheduled { .. }
            | Settled::DeadLettered { .. }
            | Settled::StillDead { .. } => Recorded::Owned,
        }
    }
}

/// What a first attempt left in the store. It decides whether the ack must wait for the group
/// commit: only what the store now owns has to be on disk before the broker forgets the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Recorded {
    /// Nothing was written: dedup says the destination already had the event.
    Nothing,
    /// A 2xx and its dedup record. The event reached the endpoint, so the message may be acked
    /// before the record is flushed: a crash in between can cost a second POST of a redelivered
    /// copy (which a crash during the POST could cost anyway), never the event.
    Delivered,
    /// The store now owns the event: a retry entry, a parked event or a dead letter. It must be
    /// durable before the ack, or a crash would lose the event.
    Owned,
}

/// Attempts deliveries under each destination's limits and records what happened.
pub struct Deliverer {
    store: Store,
    stats: Arc<Stats>,
    claims: Claims,
    telemetry: Telemetry,
}

impl Deliverer {
    /// Attempts deliveries and records their outcomes in `store`, exporting no span.
    pub fn new(store: Store, stats: Arc<Stats>) -> Deliverer {
        Deliverer::with_telemetry(store, stats, Telemetry::off())
    }

    /// [`Deliverer::new`], with the trace context and spans of `telemetry`.
    pub fn with_telemetry(store: Store, stats: Arc<Stats>, telemetry: Telemetry) -> Deliverer {
        Deliverer {
            store,
            stats,
            claims: Claims::default(),
            telemetry,
        }
    }

    /// Where the attempts' traces go.
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// One attempt of `event` at `dest`, for `origin`, with its outcome recorded in the store
    /// (not yet committed) and counted.
    pub async fn attempt(&self, dest: &Destination, event: &Event, origin: Origin<'_>) -> Settled {
        let _claim = self.claims.claim(dest.id(), &event.id).await;
        #[cfg(test)]
        if dest.id().as_str() == tests::PANIC_DESTINATION {
            panic!("asked to by a test");
        }
        let store = &self.store;
        if store
            .until_ok(|| store.is_delivered(dest.id().as_str(), &event.id))
            .await
        {
            Stats::inc(&self.stats.duplicates);
            dest.metrics().duplicate.inc();
            tracing::debug!(destination = %dest.id(), "already delivered to this destination; skipped");
            self.remove_origin(origin).await;
            return Settled::Duplicate;
        }
        // A forced replay goes through an open circuit and past the rate limit.
        let forced = origin.forced();
        let gate = if forced {
            Gate::Closed
        } else {
            dest.circuit().gate()
        };
        // A half-open circuit's probe goes back if this attempt ends without an outcome for the
        // circuit: an early return, or the attempt dropped (a replay given up, a stop) or
        // unwound by a panic. Kept out, it would block the destination until a restart.
        let mut probe = ProbeGuard {
            circuit: (gate == Gate::Probe).then(|| dest.circuit()),
        };
        if let Gate::Open { retry_at } = gate {
            match origin {
                Origin::Retry(record) => {
                    let mut again = record.clone();
                    again.next_at_ms = millis(retry_at);
                    self.reschedule(record, &again).await;
                }
                Origin::Message => self.park(dest, event, retry_at, Parking::Circuit).await,
                Origin::Replay { .. } => {
                    return Settled::Blocked {
                        reason: format!(
                            "the destination's circuit is open until {}",
                            format_time(retry_at)
                        ),
                    };
                }
            }
            return Settled::Parked;
        }
        if let Some(limiter) = dest.rate_limit().filter(|_| !forced) {
            if let Err(due) = self.token(dest, limiter, origin).await {
                probe.give_back();
                match origin {
                    Origin::Retry(_) => return Settled::Busy,
                    Origin::Message => {
                        self.park(dest, event, due, Parking::RateLimit).await;
                        return Settled::Parked;
                    }
                    // A replay waits as long as it takes, so this arm is not taken.
                    Origin::Replay { .. } => {
                        return Settled::Blocked {
                            reason: format!(
                                "no token of the rate limit before {}",
                                format_time(due)
                            ),
                        };
                    }
                }
            }
        }
        let Some(_permit) = self.slot(dest, origin).await else {
            probe.give_back();
            if let Origin::Retry(_) = origin {
                return Settled::Busy;
            }
            dest.circuit().record_saturated();
            // Not gate(): on a half-open circuit that would take the probe and never give it back.
            self.park(dest, event, dest.circuit().reopens_at(), Parking::Circuit)
                .await;
            return Settled::Parked;
        };
        if let Origin::Retry(_) = origin {
            Stats::inc(&self.stats.retried);
        }
        let traced = self.telemetry.attempt(
            event,
            dest.id().as_str(),
            origin.attempts_before() + 1,
            origin.kind(),
        );
        let started = Instant::now();
        let outcome = sender::deliver(dest, event, traced.headers()).await;
        dest.metrics()
            .latency
            .observe(started.elapsed().as_secs_f64());
        drop(_permit);
        if let Outcome::Failed {
            status: Some(429),
            retry_after,
            ..
        } = &outcome
        {
            if let Some(limiter) = dest.rate_limit() {
                throttle(dest, limiter, started, *retry_after);
            }
        }
        // `settle` gives the circuit its outcome before its first await.
        probe.circuit = None;
        let settled = self
            .settle(dest, event, origin, outcome, gate == Gate::Probe)
            .await;
        traced.finish(&settled);
        settled
    }

    /// Waits for a token of `dest`'s rate limit, as long as `origin` may: at most
    /// `circuit.max_wait` for a first attempt, [`retry_token_wait`] for a retry, however long it
    /// takes for a replay.
    /// `Err(due)`: no token within that time; none was taken, and one would have been due then.
    async fn token(
        &self,
        dest: &Destination,
        limiter: &RateLimiter,
        origin: Origin<'_>,
    ) -> Result<(), SystemTime> {
        let start = Instant::now();
        let deadline = match origin {
            Origin::Replay { .. } => None,
            Origin::Message => start.checked_add(dest.max_wait()),
            Origin::Retry(_) => start.checked_add(retry_token_wait(dest)),
        };
        let got = loop {
            let now = Instant::now();
            let within = deadline.map(|d| d.saturating_duration_since(now));
            match limiter.reserve(now, within) {
                Ok(grant) => {
                    if grant.at > now {
                        tokio::time::sleep_until(grant.at.into()).await;
                    }
                    // A 429 while this one slept voids its token: it asks again, at the new pace.
                    if limiter.holds(&grant) {
                        break Ok(());
                    }
                }
                Err(due) => break Err(SystemTime::now() + due.saturating_duration_since(now)),
            }
        };
        let waited = start.elapsed();
        if !waited.is_zero() {
            dest.metrics().rate_limit_wait.inc_by(waited.as_secs_f64());
        }
        got
    }

    /// One of `dest`'s `max_concurrency` slots, as long as `origin` may wait for it. A free slot
    /// is taken without arming the `max_wait` timer.
    async fn slot<'d>(
        &self,
        dest: &'d Destination,
        origin: Origin<'_>,
    ) -> Option<SemaphorePermit<'d>> {
        if let Ok(permit) = dest.limit().try_acquire() {
            return Some(permit);
        }
        match origin {
            Origin::Replay { .. } => dest.limit().acquire().await.ok(),
            Origin::Message | Origin::Retry(_) => {
                tokio::time::timeout(dest.max_wait(), dest.limit().acquire())
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
        }
    }

    /// Records the outcome of the attempt, which replaces the record `origin` came from.
    async fn settle(
        &self,
        dest: &Destination,
        event: &Event,
        origin: Origin<'_>,
        outcome: Outcome,
        was_probe: bool,
    ) -> Settled {
        let store = &self.store;
        let name = dest.id().as_str();
        let attempts = origin.attempts_before() + 1;
        let (status, reason, retryable, retry_after, opens_circuit) = match outcome {
            Outcome::Delivered { status } => {
                dest.circuit().record_success();
                Stats::inc(&self.stats.delivered);
                dest.metrics().delivered.inc();
                tracing::debug!(destination = %name, status, attempts, "delivered");
                store
                    .until_ok(|| store.record_delivered(name, &event.id))
                    .await;
                self.remove_origin(origin).await;
                return Settled::Delivered { status };
            }
            Outcome::Failed {
                status,
                reason,
                retryable,
                retry_after,
                opens_circuit,
            } => (status, reason, retryable, retry_after, opens_circuit),
        };
        Stats::inc(&self.stats.failed);
        if opens_circuit {
            dest.circuit().open_now(&reason);
        } else if retryable {
            dest.circuit().record_failure(was_probe);
        } else {
            // The endpoint answered: it is up, just not accepting this event.
            dest.circuit().record_success();
        }
        if let Origin::Replay { letter, .. } = origin {
            tracing::warn!(destination = %name, status, %reason, attempts, "replay failed: the dead letter stays");
            let mut letter = letter.clone();
            letter.attempts = attempts;
            letter.last_status = status;
            letter.reason = format!("replay failed: {reason}");
            letter.at_ms = millis(SystemTime::now());
            let kept = store
                .until_stored(|| store.update_dead_letter(&letter))
                .await;
            if !kept {
                tracing::info!(destination = %name, "the dead letter was purged during its replay; it stays purged");
            }
            return Settled::StillDead { status, reason };
        }
        let retry = &dest.config().retry;
        if retryable && event.eligible_for_retry && attempts < retry.max_attempts {
            let delay = retry_delay(retry, attempts, retry_after);
            Stats::inc(&self.stats.retries_scheduled);
            dest.metrics().retry_scheduled.inc();
            tracing::info!(destination = %name, status, %reason, attempts, retry_in = ?delay, "delivery failed: retry scheduled");
            let record = RetryRecord {
                destination: name.to_string(),
                event: StoredEvent::from_event(event),
                attempts,
                next_at_ms: millis(SystemTime::now() + delay),
                last_status: status,
                last_error: reason.clone(),
            };
            match origin {
                Origin::Retry(old) => self.reschedule(old, &record).await,
                _ => store.until_stored(|| store.schedule_retry(&record)).await,
            }
            return Settled::RetryScheduled { status, reason };
        }
        let (kind, reason) = if !retryable {
            (DeadLetterKind::Failed, reason)
        } else if !event.eligible_for_retry {
            (
                DeadLetterKind::Failed,
                format!("{reason} (eligible_for_retry is false: one attempt only)"),
            )
        } else {
            (
                DeadLetterKind::Exhausted,
                format!("gave up after {attempts} attempts; last: {reason}"),
            )
        };
        Stats::inc(&self.stats.dead_lettered);
        dest.metrics().dead_lettered.inc();
        tracing::warn!(destination = %name, status, %reason, attempts, "delivery failed: dead-lettered");
        let letter =
            DeadLetter::for_event(event, kind, Some(name), reason.clone(), attempts, status);
        match origin {
            // In one store operation, as for a reschedule.
            Origin::Retry(old) => {
                store
                    .until_stored(|| store.dead_letter_in_place_of(&letter, old))
                    .await;
            }
            _ => {
                store.until_stored(|| store.dead_letter(&letter)).await;
                self.remove_origin(origin).await;
            }
        }
        Settled::DeadLettered { status, reason }
    }

    /// Removes the retry entry or dead letter an attempt came from, now that the event has
    /// another place (delivered, or a new dead letter).
    async fn remove_origin(&self, origin: Origin<'_>) {
        let store = &self.store;
        match origin {
            Origin::Message => {}
            Origin::Retry(record) => {
                store
                    .until_stored(|| store.remove_retry_record(record))
                    .await;
            }
            Origin::Replay { letter, .. } => {
                store
                    .until_stored(|| store.remove_dead_letter(&letter.key))
                    .await;
            }
        }
    }

    /// Replaces retry entry `old` by `new`, in one store operation: a store reopened between two
    /// would keep only the second write, the removal, and lose the event.
    async fn reschedule(&self, old: &RetryRecord, new: &RetryRecord) {
        let store = &self.store;
        store.until_stored(|| store.replace_retry(old, new)).await;
    }

    /// Writes `event` to the retry store without an attempt: the destination cannot take it
    /// now. This is the one case where the queue message is acked before its POST was attempted.
    async fn park(&self, dest: &Destination, event: &Event, retry_at: SystemTime, why: Parking) {
        Stats::inc(&self.stats.parked);
        dest.metrics().parked.inc();
        let reason = match why {
            Parking::Circuit => {
                tracing::debug!(destination = %dest.id(), "circuit open: event parked for the retry scheduler");
                "parked: circuit open"
            }
            Parking::RateLimit => {
                Stats::inc(&self.stats.parked_for_rate);
                dest.metrics().rate_limit_parked.inc();
                tracing::debug!(destination = %dest.id(), "rate limit: no token within circuit.max_wait; event parked for the retry scheduler");
                "parked: rate limit"
            }
        };
        let record = RetryRecord {
            destination: dest.id().to_string(),
            event: StoredEvent::from_event(event),
            attempts: 0,
            next_at_ms: millis(retry_at),
            last_status: None,
            last_error: reason.to_string(),
        };
        let store = &self.store;
        store.until_stored(|| store.schedule_retry(&record)).await;
    }

    /// The shared totals.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The store the outcomes go to.
    pub fn store(&self) -> &Store {
        &self.store
    }
}

/// The shortest time a retry may wait for a token, whatever `circuit.max_wait` says.
pub const RETRY_TOKEN_WAIT_MIN: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a retry may wait for a token of `dest`'s rate limit: `circuit.max_wait`, but at
/// least [`RETRY_TOKEN_WAIT_MIN`]. A waiting retry holds no queue message, only a place in the
/// scheduler's pool, and the scheduler gives a destination no more retries than its bucket
/// serves within this time; so the bucket has a second of retries reserved ahead even when
/// `max_wait` is 0 s, and no token is lost between two looks of the scheduler.
pub fn retry_token_wait(dest: &Destination) -> std::time::Duration {
    dest.max_wait().max(RETRY_TOKEN_WAIT_MIN)
}

/// Feeds a 429 of `dest`, to a request sent at `sent_at`, to its rate limit: a `Retry-After`
/// pauses it (at most `retry.max_interval`), a bare 429 halves its rate.
fn throttle(
    dest: &Destination,
    limiter: &RateLimiter,
    sent_at: Instant,
    retry_after: Option<std::time::Duration>,
) {
    let longest = dest.config().retry.max_interval;
    match limiter.throttled(Instant::now(), sent_at, retry_after, longest) {
        Throttle::Paused(pause) => tracing::warn!(
            destination = %dest.id(),
            ?pause,
            "429 with Retry-After: no request to this destination until it has passed"
        ),
        Throttle::Halved(rate) => tracing::warn!(
            destination = %dest.id(),
            requests_per_second = rate,
            "429: rate limit halved; a tenth of the configured rate comes back per period without another"
        ),
        Throttle::AlreadySlowed => {}
    }
}

/// The (destination, event id) pairs with an attempt under way in this process, by a hash of
/// the pair. A broker that redelivers a message while its first copy is still being POSTed
/// (after a reconnect) must not get a second POST: the second copy waits, then finds the dedup
/// record. Two different pairs with the same 64-bit hash only wait for each other.
#[derive(Default)]
struct Claims {
    in_progress: Mutex<PrehashedSet<u64>>,
    hasher: std::hash::RandomState,
    released: Notify,
}

impl Claims {
    /// Waits until no other attempt of `event_id` at `destination` is under way here.
    async fn claim(&self, destination: &DestinationId, event_id: &str) -> Claim<'_> {
        let key = self.hasher.hash_one((destination.as_str(), event_id));
        loop {
            // Created before the check, so a release between the check and the wait is not missed.
            let released = self.released.notified();
            if self
                .in_progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key)
            {
                return Claim { claims: self, key };
            }
            released.await;
        }
    }
}

/// Holds one (destination, event id) pair; released on drop.
struct Claim<'a> {
    claims: &'a Claims,
    key: u64,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.claims
            .in_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
        self.claims.released.notify_waiters();
    }
}
/// Gives a half-open circuit's probe back when dropped still holding it.
struct ProbeGuard<'c> {
    circuit: Option<&'c crate::circuit::Circuit>,
}

impl ProbeGuard<'_> {
    /// Gives the probe back now (before parking an event, which reads the circuit).
    fn give_back(&mut self) {
        if let Some(circuit) = self.circuit.take() {
            circuit.release_probe();
        }
    }
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.give_back();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;

    /// The destination whose attempts panic in this crate's tests.
    pub(crate) const PANIC_DESTINATION: &str = "courier-test-panic";

    /// A probe attempt that never gets its answer and is given up (a replay dropped, a stop)
    /// gives the probe back: kept out, the circuit would block its destination until a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_probe_given_up_goes_back_to_the_circuit() {
        // Takes connections and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = silent.local_addr().expect("addr").port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                held.push(socket);
            }
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let parts = crate::testing::parts(
            dir.path(),
            &format!(
                "[[destinations]]\nname = \"d\"\nurl = \"http://127.0.0.1:{port}/\"\n\
                 [destinations.circuit]\nopen_for = \"50ms\"\n"
            ),
        );
        let (store, deliverer) = (parts.store, parts.deliverer);
        let set = parts.destinations.current();
        let dest = set.get("d").expect("d");
        let event = crate::testing::event("p1");

        dest.circuit().open_now("a test");
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(dest.circuit().probe_ready());
        let attempt = deliverer.attempt(dest, &event, Origin::Message);
        let given_up = tokio::time::timeout(Duration::from_millis(300), attempt).await;
        assert!(given_up.is_err(), "the silent partner answered");
        assert!(
            dest.circuit().probe_ready(),
            "the probe of the dropped attempt is free again"
        );
        store.close().await.expect("close");
    }
}
