//! The MQTT source against the real Mosquitto on 127.0.0.1:1883 (default limits: 20 messages in
//! flight per client). Every test uses its own topics, client ids and store, and runs once per
//! protocol: `<test>::v3` (MQTT 3.1.1) and `<test>::v5` (MQTT 5), through [`both_protocols`].

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);

/// Runs each `async fn name(protocol)` once per MQTT version, as `name::v3` and `name::v5`.
macro_rules! both_protocols {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn v3() {
                super::$name(MqttProtocol::V3).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn v5() {
                super::$name(MqttProtocol::V5).await
            }
        }
    )*};
}

both_protocols!(
    mqtt_publish_is_posted_with_the_full_contract,
    puback_waits_for_the_post_and_goes_in_arrival_order,
    acks_are_sent_so_nothing_comes_back_after_a_clean_stop,
    messages_published_while_courier_is_stopped_arrive_after_restart,
    kill_9_mid_stream_loses_nothing,
    shared_group_splits_the_traffic_between_replicas,
    poison_mqtt_messages_are_dead_lettered,
    graceful_stop_finishes_in_flight_sends_their_pubacks_and_loses_nothing,
    a_fast_stream_arrives_complete,
    a_stop_while_the_broker_is_unreachable_does_not_wait_for_it,
);

/// An envelope with no topic (the MQTT topic name routes it) and this data.
fn mqtt_event(id: &str, data: &str) -> String {
    format!(r#"{{"id":"{id}","data":{data}}}"#)
}

/// Publishes `<prefix><i>` with empty data for every `i` in `range`.
async fn publish_ids(
    publisher: &MqttPublisher,
    topic: &str,
    prefix: &str,
    range: std::ops::Range<usize>,
) {
    for id in ids(prefix, range) {
        publisher.publish(topic, mqtt_event(&id, "{}")).await;
    }
}

async fn mqtt_publish_is_posted_with_the_full_contract(protocol: MqttProtocol) {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let base = unique("contract");
    let store = tempfile::tempdir().unwrap();
    let courier = Courier::start(
        &test_defaults(store.path())
            .mqtt(mqtt_source_as(
                &unique("courier"),
                &format!("{base}/#"),
                protocol,
            ))
            .destinations([
                Dest::new("partner", &rx.url("/events"))
                    .topics(["tempo/events/batch/+"])
                    .metadata_in_payload()
                    .api_key("X-API-Key", "k"),
                Dest::new("other", &rx.url("/other")).topics(["tempo/events/equipment/#"]),
            ]),
    );
    let publisher = MqttPublisher::connect().await;
    // Probes go to a topic no destination matches, so they are not POSTed.
    wait_subscribed_via_stats(&publisher, &format!("{base}/probe"), &courier).await;

    // The envelope's topic wins over the MQTT topic name; a raw body has only the MQTT topic name.
    publisher
        .publish(
            &format!("{base}/x"),
            r#"{"id":"m-env","topic":"tempo/events/batch/batch_run_status","data":{"batch":7}}"#,
        )
        .await;
    publisher
        .publish(
            &format!("{base}/y"),
            r#"{"EventID":"m-raw","state":"up","topic_hint":1}"#,
        )
        .await;
    publisher
        .publish(
            &format!("{base}/z"),
            r#"{"id":"m-eq","topic":"tempo/events/equipment/a/b","data":{"e":1}}"#,
        )
        .await;
    let r = rx.wait_for_id("m-env", WAIT).await;
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/events");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-request-id"), Some("m-env"));
    assert_eq!(r.header("x-correlation-id"), Some("m-env"));
    assert_eq!(r.header("x-api-key"), Some("k"));
    let body = r.json();
    assert_eq!(body["batch"], 7);
    assert_eq!(body["Metadata"]["EventType"], "Batch");
    assert_eq!(body["Metadata"]["EventTrigger"], "batch_run_status");
    assert_eq!(body["Metadata"]["Subscriber"], "partner");
    let r = rx.wait_for_id("m-eq", WAIT).await;
    assert_eq!(r.path, "/other");
    assert_eq!(r.body, br#"{"e":1}"#);
    // The raw event's topic is the MQTT topic name, which no destination pattern matches.
    courier.wait_count(3, WAIT, |s| &s.acked).await;
    let stats = courier.stop().await;
    assert!(rx.requests().iter().all(|r| r.id() != "m-raw"));
    assert!(
        stats.unrouted.load(Ordering::SeqCst) >= 2,
        "m-raw and the probes"
    );
}

/// Like [`wait_subscribed`], for a courier whose destinations do not match the probe topic: waits
/// for courier to count a received message.
async fn wait_subscribed_via_stats(publisher: &MqttPublisher, topic: &str, courier: &Courier) {
    let subscribed = publisher
        .probe_until(
            topic,
            Duration::from_millis(200),
            Duration::from_secs(20),
            || courier.count(|s| &s.received) > 0,
        )
        .await;
    assert!(subscribed, "courier never subscribed");
}

async fn puback_waits_for_the_post_and_goes_in_arrival_order(protocol: MqttProtocol) {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (topic, config) = mqtt_to_receiver_as(&rx, "order", &dir.path().join("store"), protocol);
    let process = spawn(&config, dir.path());
    let publisher = subscribed_publisher(&topic, &rx).await;

    // m0 is slow; m1..m9 finish long before it. Their PUBACKs must wait for m0's.
    publisher
        .publish(&topic, mqtt_event("m0", r#"{"delay_ms":60000}"#))
        .await;
    publish_ids(&publisher, &topic, "m", 1..10).await;
    publisher.wait_acked().await;
    rx.wait_arrival("m0", WAIT).await;
    eventually("m1..m9 delivered", WAIT, || {
        let done = rx.delivered_counts();
        (1..10).all(|i| done.contains_key(&format!("m{i}")))
    })
    .await;
    // Give an ack that should not be sent every chance to leave, then kill -9.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logs = process.kill9();

    // Same session, same store: the broker redelivers everything that was not PUBACKed.
    let courier = Courier::start(&config.shutdown_timeout(Duration::from_secs(2)));
    // m0 is delayed 60 s by the receiver: only its arrival is awaited.
    eventually("all 10 redelivered", WAIT, || {
        courier.count(|s| &s.received) >= 10
    })
    .await;
    courier.wait_count(9, WAIT, |s| &s.duplicates).await;
    assert_eq!(
        courier.count(|s| &s.received),
        10,
        "m0 was in delivery, so none of m1..m9 was PUBACKed: all came back\nfirst run logs:\n{logs}"
    );
    let counts = rx.delivered_counts();
    for i in 1..10 {
        assert_eq!(
            counts[&format!("m{i}")],
            1,
            "dedup kept m{i} from a second POST"
        );
    }
    // Received again does not mean POSTed yet: wait for the POST itself.
    eventually("m0 POSTed again", WAIT, || {
        rx.arrivals().iter().filter(|a| *a == "m0").count() >= 2
    })
    .await;
    let m0_arrivals = rx.arrivals().iter().filter(|a| *a == "m0").count();
    assert_eq!(
        m0_arrivals, 2,
        "m0 is POSTed again: its PUBACK was never sent"
    );
    courier.stop().await;
}

async fn acks_are_sent_so_nothing_comes_back_after_a_clean_stop(protocol: MqttProtocol) {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let store = tempfile::tempdir().unwrap();
    let (topic, config) = mqtt_to_receiver_as(&rx, "acked", store.path(), protocol);
    let courier = Courier::start(&config);
    let publisher = subscribed_publisher(&topic, &rx).await;
    publish_ids(&publisher, &topic, "a", 0..30).await;
    eventually("30 delivered", WAIT, || rx.delivered_with_prefix("a") == 30).await;
    courier.wait_count(30, WAIT, |s| &s.delivered).await;
    courier.stop().await;

    let courier = Courier::start(&config);
    publisher
        .publish(&topic, mqtt_event("sentinel", "{}"))
        .await;
    rx.wait_for_id("sentinel", WAIT).await;
    courier.wait_count(1, WAIT, |s| &s.acked).await;
    let stats = courier.stop().await;
    assert_eq!(
        stats.received.load(Ordering::SeqCst),
        1,
        "nothing redelivered: every PUBACK went out"
    );
}

async fn messages_published_while_courier_is_stopped_arrive_after_restart(protocol: MqttProtocol) {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let store = tempfile::tempdir().unwrap();
    let (topic, config) = mqtt_to_receiver_as(&rx, "offline", store.path(), protocol);
    let courier = Courier::start(&config);
    let publisher = subscribed_publisher(&topic, &rx).await;
    courier.stop().await;

    publish_ids(&publisher, &topic, "o", 0..100).await;
    publisher.wait_acked().await;
    let courier = Courier::start(&config);
    eventually("100 queued messages delivered", WAIT, || {
        rx.delivered_with_prefix("o") == 100
    })
    .await;
    courier.stop().await;
    assert!(rx.delivered_counts().iter().all(|(_, &c)| c == 1));
}

async fn kill_9_mid_stream_loses_nothing(protocol: MqttProtocol) {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    rx.set_delay(Duration::from_millis(3));
    let dir = tempfile::tempdir().unwrap();
    let (topic, config) = mqtt_to_receiver_as(&rx, "kill", &dir.path().join("store"), protocol);
    let config = config.max_in_flight(32);
    let process = spawn(&config, dir.path());
    let publisher = subscribed_publisher(&topic, &rx).await;
    const N: usize = 600;
    // Under Mosquitto's default max_queued_messages (1,000), so the broker drops nothing.
    publish_ids(&publisher, &topic, "k", 0..N).await;
    publisher.wait_acked().await;
    eventually("some delivered", WAIT, || rx.delivered_counts().len() > 150).await;
    let _ = process.kill9();
    let delivered_before = rx.delivered_counts().len();

    let courier = Courier::start(&config);
    eventually(
        "every event delivered after the restart",
        Duration::from_secs(60),
        || rx.delivered_with_prefix("k") == N,
    )
    .await;
    let stats = courier.stop().await;
    let twice = rx.delivered_twice_with_prefix("k");
    println!(
        "kill -9 after {delivered_before} delivered: {N} sent, {N} received, 0 lost, {twice} POSTed twice, \
         {} redelivered and skipped by dedup",
        stats.duplicates.load(Ordering::SeqCst)
    );
    // Everything whose outcome was flushed before the kill and came back was skipped by dedup.
    // A second 2xx can only come from a POST answered before its dedup record was flushed whose
    // PUBACK the broker never got: one of the at most max_in_flight (32) POSTs under way, or a
    // finished one whose PUBACK waited behind one of those (every POST here takes 3 ms, so at
    // most about max_in_flight more finish while the oldest one is under way) and whose record
    // was younger than the background flush (`store.dedup_flush_interval`).
    assert!(twice <= 2 * 32, "{twice} events POSTed twice");
}

async fn shared_group_splits_the_traffic_between_replicas(protocol: MqttProtocol) {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let topic = unique("shared");
    let group = unique("group");
    let stores = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let replica = |name: &str, store: &std::path::Path| {
        test_defaults(store)
            .mqtt(mqtt_source_as(&unique(name), &topic, protocol).shared_group(&group))
            .destination(Dest::new("d", &rx.url("/d")))
    };
    let a = Courier::start(&replica("replica-a", stores[0].path()));
    let b = Courier::start(&replica("replica-b", stores[1].path()));
    let publisher = MqttPublisher::connect().await;
    // Both must be subscribed before the count starts: probe until each has received something.
    let both = publisher
        .probe_until(
            &topic,
            Duration::from_millis(50),
            Duration::from_secs(20),
            || a.count(|s| &s.received) > 0 && b.count(|s| &s.received) > 0,
        )
        .await;
    assert!(both, "both replicas never got a message");
    let (a0, b0) = (a.count(|s| &s.received), b.count(|s| &s.received));
    const N: usize = 200;
    publish_ids(&publisher, &topic, "s", 0..N).await;
    eventually("all delivered", WAIT, || rx.delivered_with_prefix("s") == N).await;
    let (a_got, b_got) = (a.count(|s| &s.received) - a0, b.count(|s| &s.received) - b0);
    a.stop().await;
    b.stop().await;
    assert_eq!(a_got + b_got, N as u64, "each message went to one replica");
    assert!(a_got > 0 && b_got > 0, "split: {a_got} / {b_got}");
    assert!(rx.delivered_counts().iter().all(|(_, &c)| c == 1));
}

async fn poison_mqtt_messages_are_dead_lettered(protocol: MqttProtocol) {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let store = tempfile::tempdir().unwrap();
    let (topic, config) = mqtt_to_receiver_as(&rx, "poison", store.path(), protocol);
    let courier = Courier::start(&config);
    let publisher = subscribed_publisher(&topic, &rx).await;
    publisher.publish(&topic, mqtt_event("before", "{}")).await;
    for bad in [
        &b""[..],
        b"\xff\xfe",
        b"{oops",
        b"[1]",
        br#"{"id":"x","topic":"a/+/b","data":{}}"#,
    ] {
        publisher.publish(&topic, bad.to_vec()).await;
    }
    publisher.publish(&topic, mqtt_event("after", "{}")).await;
    rx.wait_for_id("after", WAIT).await;
    rx.wait_for_id("before", WAIT).await;
    courier.wait_count(5, WAIT, |s| &s.dead_lettered).await;
    courier.stop().await;
    let letters = open_store(store.path()).dead_letters().unwrap();
    assert_eq!(letters.len(), 5, "{letters:#?}");
    assert!(letters
        .iter()
        .all(|l| l.source == courier::event::SourceKind::Mqtt));
    assert!(letters.iter().any(|l| l.reason.contains("wildcard")));
    assert!(letters
        .iter()
        .all(|l| l.topic.as_deref() == Some(topic.as_str())));
}

async fn graceful_stop_finishes_in_flight_sends_their_pubacks_and_loses_nothing(
    protocol: MqttProtocol,
) {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    rx.set_delay(Duration::from_millis(20));
    let store = tempfile::tempdir().unwrap();
    let (topic, config) = mqtt_to_receiver_as(&rx, "graceful", store.path(), protocol);
    let config = config.max_in_flight(16);
    let courier = Courier::start(&config);
    let publisher = subscribed_publisher(&topic, &rx).await;
    const N: usize = 200;
    publish_ids(&publisher, &topic, "g", 0..N).await;
    publisher.wait_acked().await;
    eventually("some delivered", WAIT, || rx.delivered_counts().len() > 40).await;
    let first = courier.stop_within(Duration::from_secs(15)).await;
    let acked = first.acked.load(Ordering::SeqCst) as usize;
    let probes = rx.delivered_with_prefix("probe");
    assert!(acked - probes < N, "stopped mid-stream");

    let courier = Courier::start(&config);
    eventually("every event delivered", WAIT, || {
        rx.delivered_with_prefix("g") == N
    })
    .await;
    let second = courier.stop().await;
    assert!(
        rx.delivered_counts().iter().all(|(_, &c)| c == 1),
        "nothing POSTed twice"
    );
    assert_eq!(
        second.duplicates.load(Ordering::SeqCst),
        0,
        "every delivery finished before the stop was PUBACKed: none came back"
    );
}

async fn a_fast_stream_arrives_complete(protocol: MqttProtocol) {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let store = tempfile::tempdir().unwrap();
    let (topic, config) = mqtt_to_receiver_as(&rx, "stream", store.path(), protocol);
    let courier = Courier::start(&config);
    let publisher = subscribed_publisher(&topic, &rx).await;
    const N: usize = 3000;
    let pad = "x".repeat(400);
    for chunk in 0..N / 200 {
        for i in chunk * 200..(chunk + 1) * 200 {
            publisher
                .publish(
                    &topic,
                    mqtt_event(&format!("f{i}"), &format!(r#"{{"pad":"{pad}"}}"#)),
                )
                .await;
        }
        publisher.wait_acked().await;
        // Stay far under Mosquitto's max_queued_messages (1,000): past it the broker drops
        // QoS 1 messages for the subscriber (its log says "Outgoing messages are being dropped").
        eventually("caught up", WAIT, || {
            rx.delivered_with_prefix("f") + 100 >= (chunk + 1) * 200
        })
        .await;
    }
    let done = tokio::time::timeout(WAIT, async {
        while rx.delivered_with_prefix("f") < N {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let stats = courier.stop().await;
    let got: std::collections::HashSet<String> = rx.delivered_counts().into_keys().collect();
    let missing: Vec<usize> = (0..N).filter(|i| !got.contains(&format!("f{i}"))).collect();
    assert!(
        done.is_ok() && missing.is_empty(),
        "missing {} events, e.g. {:?}; stats: received {}, delivered {}, unrouted {}, dead {}",
        missing.len(),
        &missing[..missing.len().min(10)],
        stats.received.load(Ordering::SeqCst),
        stats.delivered.load(Ordering::SeqCst),
        stats.unrouted.load(Ordering::SeqCst),
        stats.dead_lettered.load(Ordering::SeqCst)
    );
}

/// With no connection up there is no session to end: a stop does not wait for a DISCONNECT
/// that needs a connect first.
async fn a_stop_while_the_broker_is_unreachable_does_not_wait_for_it(protocol: MqttProtocol) {
    let _brokers = brokers().await;
    let store = tempfile::tempdir().unwrap();
    // Nothing listens there.
    let url = format!("mqtt://127.0.0.1:{}", free_port());
    let config = test_defaults(store.path())
        .mqtt(mqtt_source_as(&unique("down"), "down/#", protocol).url(&url))
        .destination(Dest::new("d", "http://127.0.0.1:9/"));
    let courier = Courier::start(&config);
    let stats = courier.stats.clone();
    eventually("a refused connect", WAIT, || {
        stats
            .not_ready_reasons()
            .iter()
            .any(|r| r.starts_with("mqtt: not connected: "))
    })
    .await;
    let stopping = std::time::Instant::now();
    courier.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(3),
        "the stop took {:?}",
        stopping.elapsed()
    );
}
