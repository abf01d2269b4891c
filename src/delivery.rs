//! One event at one destination: the dedup check, the destination's circuit and concurrency
//! limit, the POST, and the outcome recorded in the store (delivered, retry scheduled, or dead
//! letter). Shared by the pipeline (first attempts) and the retry scheduler (later ones), so both
//! follow exactly the same rules.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Semaphore;

use crate::backoff::{retry_delay, ReconnectBackoff};
use crate::circuit::{Circuit, Gate};
use crate::config::{Config, RetryConfig};
use crate::dedup::Dedup;
use crate::event::Event;
use crate::sender::{Outcome, Sender};
use crate::stats::Stats;
use crate::store::{
    millis, DeadLetter, DeadLetterKind, RetryRecord, Store, StoreError, StoredEvent,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

/// The longest wait between two tries of a failing store: also the longest delay between a
/// disk becoming writable again and acks resuming.
const STORE_RETRY_MAX: Duration = Duration::from_secs(5);

/// One destination's Prometheus series, created once so delivering builds no labels.
struct TargetMetrics {
    delivered: Counter,
    retry_scheduled: Counter,
    dead_lettered: Counter,
    parked: Counter,
    duplicate: Counter,
    latency: Histogram,
}

struct Target {
    name: String,
    metrics: TargetMetrics,
    limit: Semaphore,
    max_wait: Duration,
    circuit: Circuit,
    retry: RetryConfig,
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
    sender: Sender,
    store: Arc<Store>,
    dedup: Dedup,
    stats: Arc<Stats>,
    targets: Vec<Target>,
    /// (destination, event id) pairs with an attempt under way in this process, by a hash of
    /// the pair. A broker that redelivers a message while its first copy is still being POSTed
    /// (after a reconnect) must not get a second POST: the second copy waits, then finds the
    /// dedup record. Two different pairs with the same 64-bit hash only wait for each other.
    in_progress: std::sync::Mutex<std::collections::HashSet<u64>>,
    claim_hasher: std::hash::RandomState,
    released: tokio::sync::Notify,
}

/// Holds one (destination, event id) pair; released on drop.
struct Claim<'a> {
    deliverer: &'a Deliverer,
    key: u64,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.deliverer
            .in_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
        self.deliverer.released.notify_waiters();
    }
}

impl Deliverer {
    /// One circuit and one concurrency limit per configured destination.
    pub fn new(
        config: &Config,
        sender: Sender,
        store: Arc<Store>,
        dedup: Dedup,
        stats: Arc<Stats>,
    ) -> Deliverer {
        let targets = config
            .destinations
            .iter()
            .map(|d| Target {
                name: d.name.clone(),
                metrics: TargetMetrics {
                    delivered: stats.delivery_counter(&d.name, "delivered"),
                    retry_scheduled: stats.delivery_counter(&d.name, "retry_scheduled"),
                    dead_lettered: stats.delivery_counter(&d.name, "dead_lettered"),
                    parked: stats.delivery_counter(&d.name, "parked"),
                    duplicate: stats.delivery_counter(&d.name, "duplicate"),
                    latency: stats.latency_histogram(&d.name),
                },
                limit: Semaphore::new(d.max_concurrency),
                max_wait: d.circuit.max_wait,
                circuit: Circuit::new(&d.name, d.circuit.clone()),
                retry: d.retry.clone(),
            })
            .collect();
        Deliverer {
            sender,
            store,
            dedup,
            stats,
            targets,
            in_progress: std::sync::Mutex::default(),
            claim_hasher: std::hash::RandomState::new(),
            released: tokio::sync::Notify::new(),
        }
    }

    /// Waits until no other attempt of `event_id` at destination `index` is under way here.
    async fn claim(&self, index: usize, event_id: &str) -> Claim<'_> {
        use std::hash::BuildHasher as _;
        let key = self.claim_hasher.hash_one((index, event_id));
        loop {
            // Created before the check, so a release between the check and the wait is not missed.
            let released = self.released.notified();
            if self
                .in_progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key)
            {
                return Claim {
                    deliverer: self,
                    key,
                };
            }
            released.await;
        }
    }

    /// The index of the destination called `name`, if it is (still) configured.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.targets.iter().position(|t| t.name == name)
    }

    /// Whether destination `index`'s circuit is open.
    pub fn circuit_open(&self, index: usize) -> bool {
        self.targets[index].circuit.is_open()
    }

    /// Whether destination `index` takes no attempt now (circuit open, or its probe still out).
    pub fn blocked(&self, index: usize) -> bool {
        self.targets[index].circuit.blocked()
    }

    /// Whether destination `index`'s circuit waits for exactly one probe.
    pub fn probe_ready(&self, index: usize) -> bool {
        self.targets[index].circuit.probe_ready()
    }

    /// The configured destination names, by index.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.targets.iter().map(|t| t.name.as_str())
    }

    /// The first attempt of `event` at destination `index`, for a queue message. Never waits
    /// longer than `circuit.max_wait` for a slot: past that, or while the circuit is open, the
    /// event is parked in the retry store instead. Returns what was written, which tells the caller
    /// whether to commit before or after the ack.
    pub async fn first_attempt(&self, index: usize, event: &Event) -> Recorded {
        let t = &self.targets[index];
        let _claim = self.claim(index, &event.id).await;
        if self
            .until_done(|| self.dedup.is_delivered(&t.name, &event.id))
            .await
        {
            Stats::inc(&self.stats.duplicates);
            t.metrics.duplicate.inc();
            tracing::debug!(destination = %t.name, "already delivered to this destination; skipped");
            return Recorded::Nothing;
        }
        let gate = t.circuit.gate();
        if let Gate::Open { retry_at } = gate {
            self.park(t, event, retry_at).await;
            return Recorded::Owned;
        }
        // A free slot is taken without arming the `max_wait` timer.
        let permit = match t.limit.try_acquire() {
            Ok(p) => Some(p),
            Err(_) => tokio::time::timeout(t.max_wait, t.limit.acquire())
                .await
                .ok()
                .and_then(Result::ok),
        };
        let permit = match permit {
            Some(p) => p,
            None => {
                if gate == Gate::Probe {
                    t.circuit.release_probe();
                }
                t.circuit.record_saturated();
                // Not gate(): on a half-open circuit that would take the probe and never give it back.
                self.park(t, event, t.circuit.reopens_at()).await;
                return Recorded::Owned;
            }
        };
        let started = std::time::Instant::now();
        let outcome = self.sender.deliver(index, event).await;
        t.metrics.latency.observe(started.elapsed().as_secs_f64());
        drop(permit);
        self.settle(t, event, 0, outcome, gate == Gate::Probe, None)
            .await
    }

    /// A later attempt of a pending retry, for the scheduler. Waits for a slot (the queue message
    /// was acked long ago, nothing is held hostage).
    pub async fn retry(&self, index: usize, record: RetryRecord) {
        let t = &self.targets[index];
        let event = record.event.to_event();
        let _claim = self.claim(index, &event.id).await;
        if self
            .until_done(|| self.dedup.is_delivered(&t.name, &event.id))
            .await
        {
            self.until_stored(|| self.store.remove_retry_record(&record))
                .await;
            return;
        }
        let gate = t.circuit.gate();
        if let Gate::Open { retry_at } = gate {
            let mut again = record.clone();
            again.next_at_ms = millis(retry_at);
            self.reschedule(&record, &again).await;
            return;
        }
        // Bounded wait: a destination that holds every slot must not hold the scheduler's whole
        // pool; the entry stays due and is taken again on a later pass.
        let permit = match tokio::time::timeout(t.max_wait, t.limit.acquire()).await {
            Ok(Ok(p)) => p,
            _ => {
                if gate == Gate::Probe {
                    t.circuit.release_probe();
                }
                return;
            }
        };
        Stats::inc(&self.stats.retried);
        let started = std::time::Instant::now();
        let outcome = self.sender.deliver(index, &event).await;
        t.metrics.latency.observe(started.elapsed().as_secs_f64());
        drop(permit);
        self.settle(
            t,
            &event,
            record.attempts,
            outcome,
            gate == Gate::Probe,
            Some(&record),
        )
        .await;
    }

    /// Records the outcome of attempt number `attempts_before + 1`; `pending` is the retry entry
    /// it came from, which a final outcome removes (a parked event's entry has 0 attempts).
    async fn settle(
        &self,
        t: &Target,
        event: &Event,
        attempts_before: u32,
        outcome: Outcome,
        was_probe: bool,
        pending: Option<&RetryRecord>,
    ) -> Recorded {
        let attempts = attempts_before + 1;
        match outcome {
            Outcome::Delivered { status } => {
                t.circuit.record_success();
                Stats::inc(&self.stats.delivered);
                t.metrics.delivered.inc();
                tracing::debug!(destination = %t.name, status, attempts, "delivered");
                self.until_done(|| self.dedup.record(&t.name, &event.id))
                    .await;
                if let Some(record) = pending {
                    self.until_stored(|| self.store.remove_retry_record(record))
                        .await;
                }
                Recorded::Delivered
            }
            Outcome::Failed {
                status,
                reason,
                retryable,
                retry_after,
            } => {
                Stats::inc(&self.stats.failed);
                if retryable {
                    t.circuit.record_failure(was_probe);
                } else {
                    // The endpoint answered: it is up, just not accepting this event.
                    t.circuit.record_success();
                }
                if retryable && event.eligible_for_retry && attempts < t.retry.max_attempts {
                    let delay = retry_delay(&t.retry, attempts, retry_after);
                    Stats::inc(&self.stats.retries_scheduled);
                    t.metrics.retry_scheduled.inc();
                    tracing::info!(destination = %t.name, status, %reason, attempts, retry_in = ?delay, "delivery failed: retry scheduled");
                    let record = RetryRecord {
                        destination: t.name.clone(),
                        event: StoredEvent::from_event(event),
                        attempts,
                        next_at_ms: millis(SystemTime::now() + delay),
                        last_status: status,
                        last_error: reason,
                    };
                    match pending {
                        Some(old) => self.reschedule(old, &record).await,
                        None => {
                            self.until_stored(|| self.store.schedule_retry(&record))
                                .await
                        }
                    }
                    return Recorded::Owned;
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
                t.metrics.dead_lettered.inc();
                tracing::warn!(destination = %t.name, status, %reason, attempts, "delivery failed: dead-lettered");
                let letter =
                    DeadLetter::for_event(event, kind, Some(&t.name), reason, attempts, status);
                self.until_stored(|| self.store.dead_letter(&letter)).await;
                if let Some(record) = pending {
                    self.until_stored(|| self.store.remove_retry_record(record))
                        .await;
                }
                Recorded::Owned
            }
        }
    }

    /// Replaces retry entry `old` by `new`: `new` is scheduled first, so a crash or a store reopen
    /// in between leaves two entries (one extra attempt, which dedup makes harmless) and never
    /// none; then `old` is removed by its own key (it may be an entry the index lost track of).
    async fn reschedule(&self, old: &RetryRecord, new: &RetryRecord) {
        self.until_stored(|| self.store.schedule_retry(new)).await;
        if old.next_at_ms != new.next_at_ms {
            self.until_stored(|| self.store.remove_retry_record(old))
                .await;
        }
    }

    /// Writes `event` to the retry store without an attempt: the destination's circuit is open.
    /// This is the one case where the queue message is acked before its POST was attempted.
    async fn park(&self, t: &Target, event: &Event, retry_at: SystemTime) {
        Stats::inc(&self.stats.parked);
        t.metrics.parked.inc();
        tracing::debug!(destination = %t.name, "circuit open: event parked for the retry scheduler");
        let record = RetryRecord {
            destination: t.name.clone(),
            event: StoredEvent::from_event(event),
            attempts: 0,
            next_at_ms: millis(retry_at),
            last_status: None,
            last_error: "parked: circuit open".to_string(),
        };
        self.until_stored(|| self.store.schedule_retry(&record))
            .await;
    }

    /// Runs a store operation until it works. While the store fails, nothing is acked, so nothing
    /// is lost; the shutdown timeout aborts the task if the store never recovers.
    pub async fn until_stored<T>(&self, mut op: impl FnMut() -> Result<T, StoreError>) -> T {
        self.until_done(|| std::future::ready(op())).await
    }

    /// [`Deliverer::until_stored`] for an asynchronous operation (Redis dedup), and the one loop
    /// behind both.
    pub async fn until_done<T, F, Fut>(&self, mut op: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut backoff = ReconnectBackoff::new(Duration::from_millis(100), STORE_RETRY_MAX);
        loop {
            let generation = self.store.generation();
            match op().await {
                Ok(v) => {
                    self.stats.set_store_ok(true);
                    return v;
                }
                Err(error) => self.store_failed(error, generation, &mut backoff).await,
            }
        }
    }

    /// After a failed store operation: says so loudly, marks the store down, reopens it when a
    /// reopen can help, and waits before the next try.
    async fn store_failed(
        &self,
        error: StoreError,
        generation: u64,
        backoff: &mut ReconnectBackoff,
    ) {
        self.stats.set_store_ok(false);
        let delay = backoff.next_delay();
        tracing::error!(%error, retry_in = ?delay, "STORE OPERATION FAILED: not acking until the store works again");
        // A reopen can succeed on a disk that is still full; waiting even then keeps a failing
        // disk from turning into a busy loop. The caller's generation check redoes lost writes.
        self.store.recover(&error, generation).await;
        tokio::time::sleep(delay).await;
    }

    /// The dedup record (local or Redis).
    pub fn dedup(&self) -> &Dedup {
        &self.dedup
    }

    /// Group commit until it works (see [`Deliverer::until_stored`]).
    pub async fn commit(&self) {
        self.until_done(|| self.store.commit()).await
    }

    /// [`Store::commit_deferred`] until it works: for dedup records only.
    pub async fn commit_deferred(&self) {
        self.until_done(|| self.store.commit_deferred()).await
    }

    /// The shared totals.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The store, for dead letters written outside a delivery (bad input, unroutable).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The sender, for replays.
    pub fn sender(&self) -> &Sender {
        &self.sender
    }
}
