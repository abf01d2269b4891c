//! The pipeline's ack rule, checked at the moment of each ack: a message whose event the store now
//! owns (a retry entry, a dead letter) is acked only after the group commit made that durable; a
//! message every destination answered 2xx is acked before its dedup record is flushed, and the
//! store's background flush still makes it durable. Real store, real HTTP receiver; the
//! broker's side of an ack is replaced by a probe that looks at the store when it is called.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::mpsc;

use courier::config::Format;
use courier::delivery::Deliverer;
use courier::destination::Destinations;
use courier::event::{Inbound, SourceKind};
use courier::pipeline::Pipeline;
use courier::sources::{AckFuture, AckHandle, Acker, Delivery};
use courier::store::Store;
use courier::{Shutdown, Stats};

use crate::support::*;

/// Records, when the pipeline acks, whether every store write so far had been flushed.
struct Probe {
    store: Store,
    seen: mpsc::UnboundedSender<bool>,
}

impl AckHandle for Probe {
    fn ack(self: Box<Self>) -> AckFuture {
        let _ = self.seen.send(self.store.all_durable());
        Box::pin(async { Ok(()) })
    }
}

/// Runs one message through a pipeline whose destination answers `status`; returns whether the
/// store was durable at the ack, and whether it was once the pipeline had finished and the store
/// was closed (as a worker does at shutdown).
async fn durable_at_ack(status: u16, body: &str) -> (bool, bool) {
    let rx = Receiver::start().await;
    rx.set_status(status);
    let dir = tempfile::tempdir().expect("tempdir");
    // The pipeline is driven directly: no broker is connected to.
    let config = load(
        &ConfigBuilder::new(dir.path().join("store"))
            .rabbitmq(Rabbit::queue("unused"))
            .destination(Dest::new("d", &rx.url("/d"))),
    );
    install_crypto_provider();
    let shutdown = Shutdown::new();
    let store = Store::start(&config.store).expect("store");
    let stats = Arc::new(Stats::default());
    let deliverer = Arc::new(Deliverer::new(store.clone(), stats.clone()));
    let pipeline = Arc::new(Pipeline::new(
        Arc::new(Destinations::from_config(&config, &stats).expect("destinations")),
        deliverer,
        config.service.max_payload_bytes,
        stats,
    ));
    let (tx, deliveries) = mpsc::channel(1);
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    tx.send(Delivery {
        inbound: Inbound {
            source: SourceKind::Rabbitmq,
            format: Format::Auto,
            topic: "t".into(),
            message_id: None,
            headers: Vec::new(),
            body: Bytes::copy_from_slice(body.as_bytes()),
            received_at: SystemTime::now(),
            properties: None,
            expiry: None,
        },
        acker: Acker::new(Probe {
            store: store.clone(),
            seen: seen_tx,
        }),
    })
    .await
    .expect("pipeline takes the message");
    drop(tx);
    // Returns once the channel is closed and the message's task has ended.
    pipeline
        .run(deliveries, shutdown, 8, Duration::from_secs(10))
        .await;
    let at_ack = seen.recv().await.expect("the message was acked");
    store.close().await.expect("close");
    (at_ack, store.all_durable())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_entry_is_durable_before_the_ack() {
    let (at_ack, after) = durable_at_ack(503, r#"{"id":"A1","data":{}}"#).await;
    assert!(at_ack, "acked before the retry entry was flushed");
    assert!(after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_durable_before_the_ack() {
    let (at_ack, after) = durable_at_ack(400, r#"{"id":"A2","data":{}}"#).await;
    assert!(at_ack, "acked before the dead letter was flushed");
    assert!(after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_durable_before_the_ack() {
    let (at_ack, after) = durable_at_ack(200, "not json").await;
    assert!(at_ack, "acked before the bad-input dead letter was flushed");
    assert!(after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_event_is_acked_before_its_dedup_record_is_flushed() {
    let (at_ack, after) = durable_at_ack(200, r#"{"id":"A3","data":{}}"#).await;
    assert!(
        !at_ack,
        "the ack waited for the flush of a dedup record (only retries and dead letters need that)"
    );
    assert!(after, "the dedup record was never flushed");
}
