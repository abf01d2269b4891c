//! The retry scheduler: takes due entries from the store's retry tree, oldest first, and attempts
//! them again through the same [`Deliverer`] as first attempts. Entries are durable, so retries
//! pending at a shutdown or crash are made after the next start.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::delivery::Deliverer;
use crate::stats::Stats;
use crate::store::{millis, DeadLetter, DeadLetterKind};

/// How often the store is looked at when nothing is due sooner.
const POLL: Duration = Duration::from_millis(250);
/// Due entries read per look.
const BATCH: usize = 256;

/// Runs until `stop`, at most `max_in_flight` retries at once (each also within its destination's
/// `max_concurrency`). At `stop` it starts nothing new and gives running attempts `grace` to end.
pub async fn run(
    deliverer: Arc<Deliverer>,
    stats: Arc<Stats>,
    max_in_flight: usize,
    stop: CancellationToken,
    grace: Duration,
) {
    let taken: Arc<Mutex<HashSet<(String, String)>>> = Arc::default();
    let limit = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let mut tasks = JoinSet::new();
    'outer: while !stop.is_cancelled() {
        while tasks.try_join_next().is_some() {}
        let now = millis(SystemTime::now());
        let due = {
            let taken = taken.lock().unwrap_or_else(|p| p.into_inner());
            deliverer.store().due_retries(now, BATCH, |dest, id| {
                taken.contains(&(dest.to_string(), id.to_string()))
            })
        };
        let due = match due {
            Ok(d) => d,
            Err(error) => {
                tracing::error!(%error, "cannot read the retry store; trying again");
                Vec::new()
            }
        };
        if due.is_empty() {
            let wait = match deliverer.store().next_retry_at() {
                Ok(Some(at)) if at > now => Duration::from_millis(at - now).min(POLL),
                _ => POLL,
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => break,
            }
            continue;
        }
        for record in due {
            let permit = tokio::select! {
                p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break 'outer },
                _ = stop.cancelled() => break 'outer,
            };
            let pair = (record.destination.clone(), record.event.id.clone());
            taken
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(pair.clone());
            let deliverer = deliverer.clone();
            let taken = taken.clone();
            let stats = stats.clone();
            let span = tracing::info_span!("retry", event_id = %record.event.id, destination = %record.destination, attempts = record.attempts);
            tasks.spawn(tracing::Instrument::instrument(
                async move {
                    match deliverer.index_of(&record.destination) {
                        Some(index) => deliverer.retry(index, record).await,
                        None => {
                            // The destination left the configuration while a retry was pending.
                            let event = record.event.to_event();
                            let letter = DeadLetter::for_event(
                                &event,
                                DeadLetterKind::Unroutable,
                                Some(&record.destination),
                                format!(
                                    "destination {:?} is no longer configured; {} attempt(s) made, last: {}",
                                    record.destination, record.attempts, record.last_error
                                ),
                                record.attempts,
                                record.last_status,
                            );
                            Stats::inc(&stats.dead_lettered);
                            deliverer
                                .until_stored(|| deliverer.store().dead_letter(&letter))
                                .await;
                            deliverer
                                .until_stored(|| {
                                    deliverer.store().remove_retry(&record.destination, &event.id)
                                })
                                .await;
                        }
                    }
                    deliverer.commit().await;
                    taken
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&pair);
                    drop(permit);
                },
                span,
            ));
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
