//! The retry scheduler: takes due entries from the store's retry tree, destination by destination
//! and oldest first, and attempts them again through the same [`Deliverer`] as first attempts.
//! Entries are durable, so retries pending at a shutdown or crash are made after the next start.
//!
//! A destination whose circuit is open is not even read; when its open period ends, exactly one
//! entry is taken as the probe, and the rest follow once the probe succeeded. A destination with a
//! rate limit gets no more entries at a time than its bucket can serve within `circuit.max_wait`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt as _;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::delivery::{retry_token_wait, Deliverer, Origin};
use crate::destination::{DestinationId, Destinations};
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::store::{millis, panic_message, DeadLetter, DeadLetterKind, RetryRecord};

/// How often the store is looked at when nothing is due sooner.
const POLL: Duration = Duration::from_millis(250);
/// Due entries read per destination per look.
const BATCH: usize = 256;
/// How soon a destination whose slots were all busy is looked at again.
const SLOTS_BUSY: Duration = Duration::from_millis(20);

/// The (destination, event id) pairs with an attempt under way, so a pass does not take them again.
type Taken = Arc<Mutex<HashSet<(DestinationId, String)>>>;

/// Runs until the stop is requested, at most `max_in_flight` retries at once (each also within
/// its destination's `max_concurrency`). Then it starts nothing new and gives running attempts
/// `grace` to end.
pub async fn run(
    deliverer: Arc<Deliverer>,
    destinations: Arc<Destinations>,
    max_in_flight: usize,
    shutdown: Shutdown,
    grace: Duration,
) {
    dead_letter_orphans(&deliverer, &destinations).await;
    let taken: Taken = Arc::default();
    let limit = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let mut tasks = JoinSet::new();
    // When each rate-limited destination that was given entries may be looked at again.
    let mut next_look: HashMap<DestinationId, Instant> = HashMap::new();
    'outer: while !shutdown.is_requested() {
        while let Some(joined) = tasks.try_join_next() {
            if let Err(error) = joined {
                if error.is_panic() {
                    tracing::error!(%error, "a retry task panicked outside its attempt");
                }
            }
        }
        let now = millis(SystemTime::now());
        let mut started = 0usize;
        let mut wait = POLL;
        for dest in destinations.current().iter() {
            let name = dest.id().as_str();
            if dest.circuit().blocked() {
                continue;
            }
            // No more than the destination has free slots: a retry that finds none returns at
            // once (max_wait "0s") or waits for one holding a place of the pool that other
            // destinations' retries could use.
            let free = dest.limit().available_permits();
            if free == 0 {
                wait = wait.min(SLOTS_BUSY);
                continue;
            }
            let mut batch = if dest.circuit().probe_ready() {
                1
            } else {
                BATCH.min(free)
            };
            if let Some(limiter) = dest.rate_limit() {
                // As many as the bucket serves within the time a retry may wait for a token, so
                // that retries waiting for tokens never hold more of the pool than that.
                let at = Instant::now();
                if let Some(next) = next_look.get(dest.id()).filter(|next| at < **next) {
                    wait = wait.min(*next - at);
                    continue;
                }
                let within = retry_token_wait(dest);
                let room = limiter.room(at, within);
                if room == 0 {
                    let until = limiter.room_in(at, within);
                    wait = wait.min(until);
                    continue;
                }
                batch = batch.min(room);
            }
            let due = {
                let taken = taken.lock().unwrap_or_else(|p| p.into_inner());
                deliverer.store().due_retries(name, now, batch, |id| {
                    taken.contains(&(dest.id().clone(), id.to_string()))
                })
            };
            let due = match due {
                Ok(d) => d,
                Err(error) => {
                    tracing::error!(%error, destination = %name, "cannot read the retry store; trying again");
                    continue;
                }
            };
            if due.is_empty() {
                if let Ok(Some(at)) = deliverer.store().next_retry_at(name) {
                    if at > now {
                        wait = wait.min(Duration::from_millis(at - now));
                    }
                }
                continue;
            }
            if dest.rate_limit().is_some() {
                // The attempts started now take their tokens before the next look counts what
                // is left, and they still have three quarters of the token wait (at least 1 s)
                // reserved ahead then.
                next_look.insert(dest.id().clone(), Instant::now() + POLL);
            }
            for record in due {
                let permit = tokio::select! {
                    p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break 'outer },
                    _ = shutdown.requested() => break 'outer,
                };
                started += 1;
                let key = (dest.id().clone(), record.event.id.clone());
                taken
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key.clone());
                let deliverer = deliverer.clone();
                let dest = dest.clone();
                let taken = taken.clone();
                let span = tracing::info_span!("retry", event_id = %record.event.id, destination = %record.destination, attempts = record.attempts);
                tasks.spawn(tracing::Instrument::instrument(
                    async move {
                        // The pair is free again however the task ends.
                        let _untake = Untake { taken, key };
                        let event = record.event.to_event();
                        let attempt = deliverer.attempt(&dest, &event, Origin::Retry(&record));
                        if let Err(panic) =
                            std::panic::AssertUnwindSafe(attempt).catch_unwind().await
                        {
                            // Attempted again, it would panic again, at once and for good: its
                            // entry becomes a `crashed` dead letter for this destination.
                            let what = panic_message(&*panic);
                            drop(panic);
                            tracing::error!(panic = %what, "a retry attempt panicked: dead-lettered (crashed); please report it");
                            Stats::inc(&deliverer.stats().dead_lettered);
                            let letter =
                                DeadLetter::crashed_attempt(&event, dest.id().as_str(), &what);
                            let store = deliverer.store();
                            store
                                .until_stored(|| store.dead_letter_in_place_of(&letter, &record))
                                .await;
                        }
                        deliverer.store().commit().await;
                        drop(permit);
                    },
                    span,
                ));
            }
        }
        if started == 0 {
            tokio::select! {
                _ = tokio::time::sleep(wait.max(Duration::from_millis(10))) => {}
                _ = shutdown.requested() => break,
            }
        }
    }
    let drained =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        // Their entries are still in the retry tree: they run again after the next start.
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// Takes a (destination, event id) pair out of [`Taken`] when dropped.
struct Untake {
    taken: Taken,
    key: (DestinationId, String),
}

impl Drop for Untake {
    fn drop(&mut self) {
        self.taken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// Retries of destinations that left the configuration become dead letters (replayable once the
/// destination is back). Runs once at start.
async fn dead_letter_orphans(deliverer: &Deliverer, destinations: &Destinations) {
    let store = deliverer.store();
    let configured = destinations.current();
    let orphans: Vec<String> = match store.retry_destinations() {
        Ok(names) => names
            .into_iter()
            .filter(|n| configured.get(n).is_none())
            .collect(),
        Err(error) => {
            tracing::error!(%error, "cannot read the retry store");
            return;
        }
    };
    for name in orphans {
        // A page at a time, each committed: the entries a long outage left need not fit in
        // memory at once.
        let mut moved = 0usize;
        loop {
            let records: Vec<RetryRecord> = store
                .until_stored(|| store.due_retries(&name, u64::MAX - 1, BATCH, |_| false))
                .await;
            if records.is_empty() {
                break;
            }
            moved += records.len();
            dead_letter_orphan_page(deliverer, &name, records).await;
            store.commit().await;
        }
        tracing::warn!(destination = %name, pending = moved, "retries of a destination that is no longer configured: dead-lettered");
    }
}

/// Dead-letters retry entries of `name`, a destination that left the configuration.
async fn dead_letter_orphan_page(deliverer: &Deliverer, name: &str, records: Vec<RetryRecord>) {
    let store = deliverer.store();
    for record in records {
        let event = record.event.to_event();
        let letter = DeadLetter::for_event(
            &event,
            DeadLetterKind::Unroutable,
            Some(name),
            format!(
                "destination {name:?} is no longer configured; {} attempt(s) made, last: {}",
                record.attempts, record.last_error
            ),
            record.attempts,
            record.last_status,
        );
        Stats::inc(&deliverer.stats().dead_lettered);
        store
            .until_stored(|| store.dead_letter_in_place_of(&letter, &record))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::tests::PANIC_DESTINATION;
    use crate::store::StoredEvent;

    /// A retry whose attempt panics becomes a `crashed` dead letter for its destination, in
    /// place of its entry: left in the tree, it would be due again at once, and panic again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_that_panics_is_dead_lettered_in_place_of_its_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let parts = crate::testing::parts(
            dir.path(),
            &format!(
                "[[destinations]]\nname = \"{PANIC_DESTINATION}\"\nurl = \"http://127.0.0.1:9/\"\n"
            ),
        );
        let (store, deliverer, destinations) = (parts.store, parts.deliverer, parts.destinations);
        let event = crate::testing::event("R1");
        store
            .schedule_retry(&RetryRecord {
                destination: PANIC_DESTINATION.into(),
                event: StoredEvent::from_event(&event),
                attempts: 1,
                next_at_ms: 0,
                last_status: Some(503),
                last_error: "HTTP 503".into(),
            })
            .expect("schedule");
        let shutdown = Shutdown::new();
        let scheduler = tokio::spawn(run(
            deliverer,
            destinations,
            4,
            shutdown.clone(),
            Duration::from_secs(5),
        ));
        let deadline = Instant::now() + Duration::from_secs(20);
        while store.dead_letter_count() == 0 {
            assert!(Instant::now() < deadline, "no dead letter");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Long enough for a looping entry to be taken again.
        tokio::time::sleep(Duration::from_millis(600)).await;
        shutdown.request();
        scheduler.await.expect("scheduler");
        assert_eq!(store.pending_retries(), 0);
        let letters = store.dead_letters().expect("letters");
        assert_eq!(letters.len(), 1, "{letters:?}");
        assert_eq!(letters[0].kind, DeadLetterKind::Crashed);
        assert_eq!(letters[0].destination.as_deref(), Some(PANIC_DESTINATION));
        assert_eq!(letters[0].event_id.as_deref(), Some("R1"));
        store.close().await.expect("close");
    }
}
