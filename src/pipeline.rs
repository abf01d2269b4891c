//! The flow of one message: parse → route → (dedup check → POST → record) per destination →
//! group commit → ack. Also the in-flight limit and the drain at shutdown.
//!
//! The rule this file exists to keep: a message is acked only after every POST it needed was
//! attempted and its outcome written, and only after the store is durable when the store now
//! owns the event (a retry, a parked event, a dead letter). Until then the broker still owns it.
//! A message every destination answered 2xx is acked before its dedup records are flushed: the
//! event has arrived, and a background flush makes the records durable within
//! `store.dedup_flush_interval` (sooner when many wait; see [`crate::store::Store::commit_deferred`]).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument as _;

use crate::config::ExpiredAction;
use crate::delivery::{Deliverer, Origin, Recorded};
use crate::destination::{Destination, Destinations};
use crate::event::{self, Event, Inbound, SourceKind};
use crate::properties::Expiry;
use crate::shutdown::Shutdown;
use crate::sources::{Acker, Delivery};
use crate::stats::Stats;
use crate::store::{crash_reason, panic_message, DeadLetter, DeadLetterKind};

/// Everything a message needs on its way from source to ack.
pub struct Pipeline {
    destinations: Arc<Destinations>,
    deliverer: Arc<Deliverer>,
    max_payload_bytes: usize,
    stats: Arc<Stats>,
    /// `courier_events_received_total` per source, by [`SourceKind`] order.
    received_by_source: [Counter; 3],
}

impl Pipeline {
    /// Wires the parts; `stats` is shared with whoever wants to read the totals.
    pub fn new(
        destinations: Arc<Destinations>,
        deliverer: Arc<Deliverer>,
        max_payload_bytes: usize,
        stats: Arc<Stats>,
    ) -> Pipeline {
        let received_by_source = [SourceKind::Rabbitmq, SourceKind::Mqtt, SourceKind::Replay]
            .map(|k| stats.received_counter(k.as_str()));
        Pipeline {
            destinations,
            deliverer,
            max_payload_bytes,
            stats,
            received_by_source,
        }
    }

    /// Takes deliveries from `rx` until the stop is requested, at most `max_in_flight` at once.
    /// Then waits up to `shutdown_timeout` for the deliveries under way; what is still unfinished
    /// then is abandoned unacked, so the broker redelivers it.
    pub async fn run(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Delivery>,
        shutdown: Shutdown,
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
                _ = shutdown.requested() => break,
                permit = limit.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let delivery = tokio::select! {
                biased;
                _ = shutdown.requested() => break,
                delivery = rx.recv() => match delivery {
                    Some(d) => d,
                    None => break,
                },
            };
            let this = self.clone();
            self.stats.in_flight.inc();
            let span = tracing::info_span!(
                "event",
                source = %delivery.inbound.source,
                event_id = tracing::field::Empty,
                topic = tracing::field::Empty,
            );
            tasks.spawn(
                async move {
                    this.handle_guarded(delivery).await;
                    this.stats.in_flight.dec();
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

    /// One message, start to ack, with a panic of its handling caught. A message whose
    /// handling panicked would otherwise stay unacked for good: RabbitMQ keeps it (and its
    /// prefetch slot) until the channel closes, and MQTT's in-order PUBACKs hold back every
    /// later message of the connection. Redelivering it would panic again, so it becomes a
    /// dead letter instead (`crashed`), and is acked.
    async fn handle_guarded(&self, delivery: Delivery) {
        use futures_util::FutureExt as _;
        let Delivery { inbound, acker } = delivery;
        let mut acker = Some(acker);
        let handled = std::panic::AssertUnwindSafe(self.handle(&inbound, &mut acker))
            .catch_unwind()
            .await;
        if let Err(panic) = handled {
            let what = panic_message(&*panic);
            drop(panic);
            self.after_panic(&inbound, &mut acker, &what).await;
        }
    }

    /// Keeps a message whose handling panicked as a `crashed` dead letter and acks it. The
    /// letter holds the event when it parses again (so a replay can route it), and the raw
    /// bytes in any case. Writes made before the panic (a dedup record, a retry entry) stay:
    /// a replay skips what they say was delivered.
    async fn after_panic(&self, inbound: &Inbound, acker: &mut Option<Acker>, what: &str) {
        if acker.is_none() {
            tracing::error!(panic = what, "handling a message panicked after its ack");
            return;
        }
        tracing::error!(panic = what, "handling a message panicked: dead-lettered (crashed) and acked, so it is not redelivered to panic again; please report it");
        let reason = crash_reason(what);
        let max = self.max_payload_bytes;
        let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            event::parse(inbound, max).ok()
        }));
        let letter = DeadLetter::crashed(inbound, parsed.ok().flatten().as_ref(), reason, max);
        self.dead_letter_and_ack(vec![letter], acker).await;
    }

    /// One message, start to ack; `acker` is taken when the message is acked.
    async fn handle(&self, inbound: &Inbound, acker: &mut Option<Acker>) {
        Stats::inc(&self.stats.received);
        self.received_by_source[inbound.source as usize].inc();
        let mut event = match event::parse(inbound, self.max_payload_bytes) {
            Ok(event) => event,
            Err(bad) => {
                tracing::warn!(reason = %bad, transport_topic = %inbound.topic, "bad input: dead-lettered and acked");
                let letter =
                    DeadLetter::bad_input(inbound, bad.to_string(), self.max_payload_bytes);
                self.dead_letter_and_ack(vec![letter], acker).await;
                return;
            }
        };
        #[cfg(test)]
        if event.topic == tests::PANIC_TOPIC {
            panic!("asked to by a test");
        }
        let expiry = inbound.expiry;
        let span = tracing::Span::current();
        span.record("event_id", event.id.as_str());
        span.record("topic", event.topic.as_str());
        // The set in force now, kept to the end: a reload never changes an event's destinations.
        let destinations = self.destinations.current();
        let targets = match destinations.route(&event) {
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
                self.dead_letter_and_ack(vec![letter], acker).await;
                return;
            }
        };
        if targets.is_empty() {
            Stats::inc(&self.stats.unrouted);
            tracing::debug!("no destination matches; acked");
            self.ack(acker).await;
            return;
        }
        if let Some(expiry) = expiry.filter(Expiry::has_passed) {
            if expiry.action == ExpiredAction::DeadLetter {
                self.stats.expired("dead_lettered");
                let reason = format!(
                    "expired: its message-expiry-interval ({}s when courier received it) passed before the POST",
                    expiry.interval.as_secs()
                );
                tracing::info!(%reason, "expired message: dead-lettered and acked");
                // One letter per destination, as for failed deliveries, so a replay goes to each.
                let letters = targets
                    .iter()
                    .map(|dest| {
                        DeadLetter::for_event(
                            &event,
                            DeadLetterKind::Expired,
                            Some(dest.id().as_str()),
                            reason.clone(),
                            0,
                            None,
                        )
                    })
                    .collect();
                self.dead_letter_and_ack(letters, acker).await;
                return;
            }
            self.stats.expired("delivered");
            tracing::debug!("expired message delivered anyway (mqtt.expired = \"deliver\")");
        }
        // Only for an event that goes somewhere: a trace with nothing in it helps nobody.
        self.deliverer.telemetry().start_trace(&mut event);
        let d = &self.deliverer;
        let store = d.store();
        loop {
            let epoch = store.epoch();
            let recorded = if let [only] = targets[..] {
                self.attempt(only, &event).await
            } else {
                // Polled as each one wakes, not all together: `join_all` polls every attempt of
                // the event whenever one of them wakes, and most of a fanout's attempts wait
                // for a slot of their destination.
                let mut attempts: futures_util::stream::FuturesUnordered<_> = targets
                    .iter()
                    .map(|dest| self.attempt(dest, &event))
                    .collect();
                let mut recorded = Recorded::Nothing;
                while let Some(settled) = attempts.next().await {
                    recorded = recorded.max(settled);
                }
                recorded
            };
            match recorded {
                Recorded::Nothing => break,
                Recorded::Delivered => {
                    // Every destination has the event: ack now. Its dedup records become
                    // durable with the next background flush (`store.dedup_flush_interval`).
                    self.ack(acker).await;
                    store.commit_deferred().await;
                    return;
                }
                Recorded::Owned => {
                    store.commit().await;
                    if !self.store_reopened_since(epoch) {
                        break;
                    }
                }
            }
        }
        self.ack(acker).await;
    }

    /// The first attempt of `event` at `dest`. One that panics leaves a `crashed` dead letter
    /// for that destination and does not touch the event's attempts at the others.
    async fn attempt(&self, dest: &Destination, event: &Event) -> Recorded {
        use futures_util::FutureExt as _;
        let attempt = self.deliverer.attempt(dest, event, Origin::Message);
        match std::panic::AssertUnwindSafe(attempt).catch_unwind().await {
            Ok(settled) => settled.recorded(),
            Err(panic) => {
                let what = panic_message(&*panic);
                drop(panic);
                tracing::error!(destination = %dest.id(), panic = %what, "an attempt panicked: dead-lettered (crashed) for this destination; please report it");
                Stats::inc(&self.stats.dead_lettered);
                let letter = DeadLetter::crashed_attempt(event, dest.id().as_str(), &what);
                let store = self.deliverer.store();
                store.until_stored(|| store.dead_letter(&letter)).await;
                Recorded::Owned
            }
        }
    }

    async fn dead_letter_and_ack(&self, letters: Vec<DeadLetter>, acker: &mut Option<Acker>) {
        for _ in &letters {
            Stats::inc(&self.stats.dead_lettered);
        }
        let store = self.deliverer.store();
        loop {
            let epoch = store.epoch();
            for letter in &letters {
                store.until_stored(|| store.dead_letter(letter)).await;
            }
            store.commit().await;
            if !self.store_reopened_since(epoch) {
                break;
            }
        }
        self.ack(acker).await;
    }

    /// Whether the store was reopened after `epoch`: writes made for this message before the
    /// reopen may never have reached the disk, so the message is handled again before its ack
    /// (dedup skips the destinations whose delivery the new store does know about).
    fn store_reopened_since(&self, epoch: crate::store::Epoch) -> bool {
        let reopened = self.deliverer.store().reopened_since(epoch);
        if reopened {
            tracing::warn!("the store was reopened while this message was handled: handling it again so no write is lost");
        }
        reopened
    }

    /// Acks the message, once: `acker` is empty afterwards.
    async fn ack(&self, acker: &mut Option<Acker>) {
        let Some(acker) = acker.take() else {
            return;
        };
        match acker.ack().await {
            Ok(()) => Stats::inc(&self.stats.acked),
            Err(error) => {
                Stats::inc(&self.stats.ack_failures);
                tracing::warn!(%error, "ack not taken; the broker will redeliver and dedup will skip what was delivered");
            }
        }
    }
}

fn report_panic(result: Result<(), tokio::task::JoinError>) {
    if let Err(e) = result {
        if e.is_panic() {
            tracing::error!(error = %e, "a delivery task panicked while keeping a crashed message; that message stays unacked until its channel or connection closes");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use tokio::sync::mpsc;

    use super::*;
    use crate::sources::{AckFuture, AckHandle};
    use crate::store::Store;

    /// The topic whose events make [`Pipeline::handle`] panic in this crate's tests.
    pub(crate) const PANIC_TOPIC: &str = "courier.test.panic";

    use crate::delivery::tests::PANIC_DESTINATION;

    /// Says which message was acked.
    struct Named(mpsc::UnboundedSender<&'static str>, &'static str);

    impl AckHandle for Named {
        fn ack(self: Box<Self>) -> AckFuture {
            let _ = self.0.send(self.1);
            Box::pin(async { Ok(()) })
        }
    }

    fn delivery(
        acks: &mpsc::UnboundedSender<&'static str>,
        id: &'static str,
        topic: &str,
    ) -> Delivery {
        let body = format!(r#"{{"id":"{id}","topic":"{topic}","data":{{"n":1}}}}"#);
        Delivery {
            inbound: crate::testing::inbound(&body, topic),
            acker: Acker::new(Named(acks.clone(), id)),
        }
    }

    /// A pipeline with these destinations over a store in `dir`, its store and its stats.
    fn pipeline(dir: &std::path::Path, destinations: &str) -> (Arc<Pipeline>, Store, Arc<Stats>) {
        let parts = crate::testing::parts(dir, destinations);
        let pipeline = Arc::new(Pipeline::new(
            parts.destinations,
            parts.deliverer,
            parts.config.service.max_payload_bytes,
            parts.stats.clone(),
        ));
        (pipeline, parts.store, parts.stats)
    }

    /// A message whose handling panics is kept as a `crashed` dead letter and acked, and the
    /// messages after it go on: before, it stayed unacked for good, which under MQTT's in-order
    /// PUBACKs held back every later message of the connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_whose_handling_panics_is_dead_lettered_and_acked() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Nothing listens on port 9: the other messages fail, get a retry entry, and are acked.
        let (pipeline, store, stats) = pipeline(
            dir.path(),
            "[[destinations]]\nname = \"d\"\nurl = \"http://127.0.0.1:9/\"\n",
        );
        let (tx, rx) = mpsc::channel(8);
        let (acks_tx, mut acks) = mpsc::unbounded_channel();
        for (id, topic) in [
            ("P1", PANIC_TOPIC),
            ("N1", "t"),
            ("P2", PANIC_TOPIC),
            ("N2", "t"),
        ] {
            tx.send(delivery(&acks_tx, id, topic)).await.expect("send");
        }
        drop(tx);
        // One at a time: a message the panic left unsettled would hold the only slot.
        let run = pipeline.run(rx, Shutdown::new(), 1, Duration::from_secs(5));
        tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("the pipeline went on past the panics");
        let mut acked = Vec::new();
        while let Ok(id) = acks.try_recv() {
            acked.push(id);
        }
        assert_eq!(acked, ["P1", "N1", "P2", "N2"]);
        assert_eq!(stats.in_flight.get(), 0);
        let letters = store.dead_letters().expect("letters");
        assert_eq!(letters.len(), 2, "{letters:?}");
        for (letter, id) in letters.iter().zip(["P1", "P2"]) {
            assert_eq!(letter.kind, DeadLetterKind::Crashed);
            assert_eq!(letter.event_id.as_deref(), Some(id));
            assert!(letter.event.is_some(), "the event is kept for a replay");
            assert!(
                letter.reason.contains("panicked: asked to by a test"),
                "{}",
                letter.reason
            );
            let raw = letter.raw().expect("raw bytes");
            assert!(String::from_utf8_lossy(&raw).contains(id));
        }
        assert_eq!(store.pending_retries(), 2, "N1 and N2 wait for a retry");
        store.close().await.expect("close");
    }

    /// An attempt that panics leaves a `crashed` letter for its destination; the event's
    /// attempts at the other destinations go on as usual, and the message is acked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_attempt_that_panics_is_dead_lettered_for_its_destination_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (pipeline, store, _) = pipeline(
            dir.path(),
            &format!(
                "[[destinations]]\nname = \"d\"\nurl = \"http://127.0.0.1:9/\"\n\
                 [[destinations]]\nname = \"{PANIC_DESTINATION}\"\nurl = \"http://127.0.0.1:9/\"\n"
            ),
        );
        let (tx, rx) = mpsc::channel(8);
        let (acks_tx, mut acks) = mpsc::unbounded_channel();
        tx.send(delivery(&acks_tx, "F1", "t")).await.expect("send");
        drop(tx);
        let run = pipeline.run(rx, Shutdown::new(), 1, Duration::from_secs(5));
        tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("the pipeline ended");
        assert_eq!(acks.try_recv().ok(), Some("F1"));
        let letters = store.dead_letters().expect("letters");
        assert_eq!(letters.len(), 1, "{letters:?}");
        assert_eq!(letters[0].kind, DeadLetterKind::Crashed);
        assert_eq!(letters[0].destination.as_deref(), Some(PANIC_DESTINATION));
        assert_eq!(letters[0].event_id.as_deref(), Some("F1"));
        assert_eq!(
            store.pending_retries_by_destination().expect("retries"),
            [("d".to_string(), 1)],
            "the other destination's attempt went on"
        );
        store.close().await.expect("close");
    }
}
