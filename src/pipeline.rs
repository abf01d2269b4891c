//! The flow of one message: parse → route → (dedup check → POST → record) per destination →
//! group commit → ack. Also the in-flight limit and the drain at shutdown.
//!
//! The rule this file exists to keep: a message is acked only after every POST it needed was
//! attempted and the outcome is durable in the store. Until then the broker still owns it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::event::{self, Event};
use crate::router::Router;
use crate::sender::{Outcome, Sender};
use crate::sources::{Acker, Delivery, ReconnectBackoff};
use crate::store::{DeadLetter, DeadLetterKind, Store, StoreError};

/// Running totals, for the log line at shutdown and for tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages taken from a source.
    pub received: AtomicU64,
    /// POSTs answered with 2xx.
    pub delivered: AtomicU64,
    /// POSTs that failed (non-2xx or no answer).
    pub failed: AtomicU64,
    /// POSTs skipped because the store says that event already reached that destination.
    pub duplicates: AtomicU64,
    /// Events that matched no destination (acked, not stored).
    pub unrouted: AtomicU64,
    /// Dead letters written (bad input, unroutable, failed).
    pub dead_lettered: AtomicU64,
    /// Messages acked.
    pub acked: AtomicU64,
    /// Acks the broker did not take (the message will be redelivered).
    pub ack_failures: AtomicU64,
}

fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Everything a message needs on its way from source to ack.
pub struct Pipeline {
    router: Router,
    sender: Sender,
    store: Arc<Store>,
    max_payload_bytes: usize,
    stats: Arc<Stats>,
}

impl Pipeline {
    /// Wires the parts; `stats` is shared with whoever wants to read the totals.
    pub fn new(
        router: Router,
        sender: Sender,
        store: Arc<Store>,
        max_payload_bytes: usize,
        stats: Arc<Stats>,
    ) -> Pipeline {
        Pipeline {
            router,
            sender,
            store,
            max_payload_bytes,
            stats,
        }
    }

    /// Takes deliveries from `rx` until `stop`, at most `max_in_flight` at once. After `stop`, waits
    /// up to `shutdown_timeout` for the deliveries under way; what is still unfinished then is
    /// abandoned unacked, so the broker redelivers it.
    pub async fn run(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Delivery>,
        stop: CancellationToken,
        max_in_flight: usize,
        shutdown_timeout: Duration,
    ) {
        let limit = Arc::new(Semaphore::new(max_in_flight));
        let mut tasks = JoinSet::new();
        loop {
            while let Some(result) = tasks.try_join_next() {
                report_panic(result);
            }
            let permit = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                permit = limit.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let delivery = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                delivery = rx.recv() => match delivery {
                    Some(d) => d,
                    None => break,
                },
            };
            let this = self.clone();
            let span = tracing::info_span!(
                "event",
                source = %delivery.inbound.source,
                event_id = tracing::field::Empty,
                topic = tracing::field::Empty,
            );
            tasks.spawn(
                async move {
                    this.handle(delivery).await;
                    drop(permit);
                }
                .instrument(span),
            );
        }
        // Messages still queued between the source and here were never started: dropping them
        // leaves them unacked with the broker.
        drop(rx);
        while let Some(result) = tasks.try_join_next() {
            report_panic(result);
        }
        if !tasks.is_empty() {
            tracing::info!(in_flight = tasks.len(), timeout = ?shutdown_timeout, "waiting for in-flight deliveries");
        }
        let drained = tokio::time::timeout(shutdown_timeout, async {
            while let Some(result) = tasks.join_next().await {
                report_panic(result);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                unfinished = tasks.len(),
                "shutdown timeout reached: unfinished deliveries stay unacked and the broker redelivers them"
            );
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
    }

    /// One message, start to ack.
    async fn handle(&self, delivery: Delivery) {
        let Delivery { inbound, acker } = delivery;
        inc(&self.stats.received);
        let event = match event::parse(&inbound, self.max_payload_bytes) {
            Ok(event) => event,
            Err(bad) => {
                tracing::warn!(reason = %bad, transport_topic = %inbound.topic, "bad input: dead-lettered and acked");
                let letter = DeadLetter::bad_input(
                    inbound.source,
                    &inbound.topic,
                    &inbound.body,
                    bad.to_string(),
                );
                self.dead_letter_and_ack(letter, acker).await;
                return;
            }
        };
        drop(inbound);
        let span = tracing::Span::current();
        span.record("event_id", event.id.as_str());
        span.record("topic", event.topic.as_str());
        let targets = match self.router.route(&event) {
            Ok(targets) => targets,
            Err(why) => {
                tracing::warn!(reason = %why, "unroutable event: dead-lettered and acked");
                let letter = DeadLetter::for_event(
                    &event,
                    DeadLetterKind::Unroutable,
                    event.destination_id.as_deref(),
                    why.to_string(),
                    0,
                    None,
                );
                self.dead_letter_and_ack(letter, acker).await;
                return;
            }
        };
        if targets.is_empty() {
            inc(&self.stats.unrouted);
            tracing::debug!("no destination matches; acked");
            self.ack(acker).await;
            return;
        }
        let wrote = if let [only] = targets[..] {
            self.deliver_one(only, &event).await
        } else {
            futures_util::future::join_all(targets.iter().map(|&i| self.deliver_one(i, &event)))
                .await
                .into_iter()
                .any(|w| w)
        };
        if wrote {
            self.commit().await;
        }
        self.ack(acker).await;
    }

    /// Dedup check, POST, record. Returns whether it wrote to the store.
    async fn deliver_one(&self, index: usize, event: &Event) -> bool {
        let name = self.router.name(index);
        if self
            .until_stored(|| self.store.is_delivered(name, &event.id))
            .await
        {
            inc(&self.stats.duplicates);
            tracing::debug!(
                destination = name,
                "already delivered to this destination; skipped"
            );
            return false;
        }
        match self.sender.deliver(index, event).await {
            Outcome::Delivered { status } => {
                inc(&self.stats.delivered);
                tracing::debug!(destination = name, status, "delivered");
                self.until_stored(|| self.store.record_delivered(name, &event.id))
                    .await;
            }
            Outcome::Failed {
                status,
                reason,
                retryable,
            } => {
                inc(&self.stats.failed);
                inc(&self.stats.dead_lettered);
                tracing::warn!(destination = name, status, %reason, retryable, "delivery failed: dead-lettered");
                let letter = DeadLetter::for_event(
                    event,
                    DeadLetterKind::Failed,
                    Some(name),
                    reason,
                    1,
                    status,
                );
                self.until_stored(|| self.store.dead_letter(&letter)).await;
            }
        }
        true
    }

    async fn dead_letter_and_ack(&self, letter: DeadLetter, acker: Acker) {
        inc(&self.stats.dead_lettered);
        self.until_stored(|| self.store.dead_letter(&letter)).await;
        self.commit().await;
        self.ack(acker).await;
    }

    async fn ack(&self, acker: Acker) {
        match acker.ack().await {
            Ok(()) => inc(&self.stats.acked),
            Err(error) => {
                inc(&self.stats.ack_failures);
                tracing::warn!(%error, "ack not taken; the broker will redeliver and dedup will skip what was delivered");
            }
        }
    }

    /// Runs a store operation until it works. While the store fails, the message is not acked, so
    /// nothing is lost; the task is aborted by the shutdown timeout if the store never recovers.
    async fn until_stored<T>(&self, mut op: impl FnMut() -> Result<T, StoreError>) -> T {
        let mut backoff =
            ReconnectBackoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            match op() {
                Ok(v) => return v,
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::error!(%error, retry_in = ?delay, "STORE OPERATION FAILED: not acking until the store works again");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn commit(&self) {
        let mut backoff =
            ReconnectBackoff::new(Duration::from_millis(100), Duration::from_secs(10));
        while let Err(error) = self.store.commit().await {
            let delay = backoff.next_delay();
            tracing::error!(%error, retry_in = ?delay, "STORE FLUSH FAILED: not acking until the store works again");
            tokio::time::sleep(delay).await;
        }
    }
}

fn report_panic(result: Result<(), tokio::task::JoinError>) {
    if let Err(e) = result {
        if e.is_panic() {
            tracing::error!(error = %e, "a delivery task panicked; its message stays unacked and will be redelivered");
        }
    }
}
