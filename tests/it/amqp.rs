//! End to end over the real RabbitMQ on 127.0.0.1:5672 and real HTTP receivers: consume → route →
//! POST → ack. Every test uses its own queue (and exchange, vhost, store) names.

use std::time::Duration;

use base64::Engine as _;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::json;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_is_posted_with_the_full_contract_and_basic_auth() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let queue = unique("envelope");
    let store = tempfile::tempdir().unwrap();
    let config = rabbit_config(&queue, store.path()).destination(
        Dest::new("partner", &rx.url("/events"))
            .header("X-Source", "tempo")
            .header("X-Static", "static")
            .basic_auth("tempo", "s3cret"),
    );
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    let courier = Courier::start(&config);

    let data = r#"{"user_id":"usr_789","email":"user@example.com","n":[1,2,3]}"#;
    let body = format!(
        r#"{{"id":"evt_123","tenant_id":"t1","topic":"user.created","eligible_for_retry":true,
            "time":"2024-06-01T08:23:36.082374Z",
            "metadata":{{"source":"signup-service","X-Static":"from-event","Authorization":"Bearer evil",
                         "X-Request-Id":"forged","X-Correlation-Id":"forged","Content-Type":"text/plain",
                         "Host":"evil.example"}},
            "data":{data}}}"#
    );
    pub_.to_queue(&queue, body.as_bytes()).await;
    let got = rx.wait_for(1, WAIT).await;
    let r = &got[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/events");
    assert_eq!(
        r.body,
        data.as_bytes(),
        "the body is exactly the envelope's data"
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-request-id"), Some("evt_123"));
    assert_eq!(r.header("x-correlation-id"), Some("evt_123"));
    let basic = base64::engine::general_purpose::STANDARD.encode("tempo:s3cret");
    assert_eq!(
        r.header("authorization"),
        Some(format!("Basic {basic}").as_str())
    );
    assert_eq!(r.header("x-source"), Some("tempo"), "static header");
    assert_eq!(
        r.header("x-static"),
        Some("from-event"),
        "metadata overrides static"
    );
    assert_eq!(
        r.header("source"),
        Some("signup-service"),
        "metadata as header"
    );
    assert_eq!(
        r.header("host"),
        Some(rx.addr.to_string().as_str()),
        "metadata cannot set Host"
    );
    assert!(
        r.json().get("Metadata").is_none(),
        "no Metadata block unless asked"
    );

    // Acked: nothing left in the queue.
    wait_drained(&queue, "queue drained", WAIT).await;
    courier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_object_with_api_key_and_metadata_block() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let queue = unique("raw");
    let exchange = unique("raw-exchange");
    let store = tempfile::tempdir().unwrap();
    let config = test_defaults(store.path())
        .rabbitmq(
            Rabbit::queue(&queue)
                .connection_name(&queue)
                .format("raw")
                .binding(&exchange, "tempo.#"),
        )
        .destination(
            Dest::new("partner-raw", &rx.url("/raw"))
                .metadata_in_payload()
                .api_key("X-API-Key", "k-123"),
        );
    let pub_ = Publisher::connect().await;
    let courier = Courier::start(&config);
    pub_.wait_consumers(&queue, 1).await;

    // Raw: EventID is the id; the topic is the routing key; AMQP string headers are metadata.
    let mut headers = FieldTable::default();
    headers.insert(
        "CreatedBy".into(),
        AMQPValue::LongString("ops@example.org".into()),
    );
    headers.insert("x-count".into(), AMQPValue::LongInt(3));
    pub_.publish(
        &exchange,
        "tempo.batch.batch_run_status",
        br#"{"EventID":"E-1","status":"done","Metadata":{"Kept":"yes"}}"#,
        BasicProperties::default().with_headers(headers),
    )
    .await;
    // No id in the body: the AMQP message_id is used.
    pub_.publish(
        &exchange,
        "tempo.equipment.status",
        br#"[1]"#,
        BasicProperties::default(),
    )
    .await;
    pub_.publish(
        &exchange,
        "tempo.equipment.status",
        br#"{"state":"up"}"#,
        BasicProperties::default().with_message_id("mid-7".into()),
    )
    .await;
    // Routing key outside the binding: never reaches the queue.
    pub_.publish(
        &exchange,
        "other.x",
        br#"{"id":"nope"}"#,
        BasicProperties::default(),
    )
    .await;

    let first = rx.wait_for_id("E-1", WAIT).await;
    assert_eq!(first.header("x-api-key"), Some("k-123"));
    assert!(first.header("authorization").is_none());
    assert_eq!(first.header("createdby"), Some("ops@example.org"));
    assert!(
        first.header("x-count").is_none(),
        "non-string AMQP headers are not metadata"
    );
    let body = first.json();
    assert_eq!(body["EventID"], "E-1");
    assert_eq!(body["status"], "done");
    let meta = &body["Metadata"];
    assert_eq!(
        meta["Kept"], "yes",
        "an existing Metadata object is merged into"
    );
    assert_eq!(meta["OrganizationID"], "org-1");
    assert_eq!(meta["OrganizationName"], "Example Org");
    assert_eq!(meta["OrganizationURL"], "https://example.org");
    assert_eq!(meta["SourceEnvironment"], "test");
    assert_eq!(meta["Subscriber"], "partner-raw");
    assert_eq!(meta["EventType"], "Batch");
    assert_eq!(meta["EventTrigger"], "batch_run_status");
    assert_eq!(meta["CreatedBy"], "ops@example.org");
    let created = meta["CreationDateTime"].as_str().unwrap();
    assert_eq!(created.len(), 24, "{created}");
    assert!(
        created.ends_with('Z') && created.as_bytes()[19] == b'.',
        "{created}"
    );

    let second = rx.wait_for_id("mid-7", WAIT).await;
    let meta = &second.json()["Metadata"];
    assert_eq!(meta["CreatedBy"], "System Auto Execution");
    assert_eq!(meta["EventType"], "Equipment");
    assert_eq!(meta["EventTrigger"], "status");

    wait_drained(&queue, "queue drained", WAIT).await;
    let stats = courier.stop().await;
    assert_eq!(
        rx.requests().len(),
        2,
        "the array was dead-lettered, other.x never routed"
    );
    assert_eq!(
        stats
            .dead_lettered
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_time_and_metadata_fill_the_metadata_block() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let queue = unique("metablock");
    let store = tempfile::tempdir().unwrap();
    let config = rabbit_config(&queue, store.path())
        .destination(Dest::new("m", &rx.url("/m")).metadata_in_payload());
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    let courier = Courier::start(&config);
    let body = json!({
        "id": "evt_m", "topic": "a.b", "time": "2026-06-18T02:00:00.5+02:00",
        "metadata": {"EventType": "Batch", "EventTrigger": "batch_run_status", "CreatedBy": "u@x.org"},
        "data": {"k": "v"}
    });
    pub_.to_queue(&queue, body.to_string().as_bytes()).await;
    let r = rx.wait_for_id("evt_m", WAIT).await;
    let b = r.json();
    assert_eq!(b["k"], "v");
    assert_eq!(b["Metadata"]["EventType"], "Batch");
    assert_eq!(b["Metadata"]["EventTrigger"], "batch_run_status");
    assert_eq!(b["Metadata"]["CreatedBy"], "u@x.org");
    assert_eq!(
        b["Metadata"]["CreationDateTime"],
        "2026-06-18T00:00:00.500Z"
    );
    courier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_fanout_destination_id_and_tenants() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let queue = unique("routing");
    let store = tempfile::tempdir().unwrap();
    let config = rabbit_config(&queue, store.path()).destinations([
        Dest::new("orders-one", &rx.url("/one")).topics(["orders.*"]),
        Dest::new("orders-all", &rx.url("/all")).topics(["orders/#"]),
        Dest::new("users", &rx.url("/users")).topics(["users.created"]),
        Dest::new("acme", &rx.url("/acme"))
            .topics(["*"])
            .tenant("acme"),
    ]);
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    let courier = Courier::start(&config);
    let send = |id: &str, topic: &str, extra: serde_json::Value| {
        let mut v = json!({"id": id, "topic": topic, "data": {"id": id}});
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        v.to_string()
    };
    let events = [
        send("e1", "orders.created", json!({})),
        send("e2", "orders.eu.shipped", json!({})),
        send("e3", "users.created", json!({"tenant_id": "acme"})),
        send("e4", "nothing.matches", json!({})),
        send("e5", "nothing.matches", json!({"destination_id": "users"})),
        send(
            "e6",
            "orders.created",
            json!({"destination_id": "no-such-destination"}),
        ),
        send(
            "e7",
            "users.created",
            json!({"tenant_id": "other", "destination_id": "acme"}),
        ),
        send("e8", "orders", json!({})),
        // No topic in the envelope, routed by the AMQP routing key (the queue name here).
        json!({"id": "e9", "data": {}}).to_string(),
    ];
    for e in &events {
        pub_.to_queue(&queue, e.as_bytes()).await;
    }
    courier
        .wait_count(events.len() as u64, WAIT, |s| &s.acked)
        .await;
    let ids = |path: &str| {
        let mut v: Vec<String> = rx.requests_to(path).iter().map(|r| r.id()).collect();
        v.sort();
        v
    };
    assert_eq!(ids("/one"), ["e1"]);
    assert_eq!(
        ids("/all"),
        ["e1", "e2", "e8"],
        "# matches zero or more segments"
    );
    assert_eq!(
        ids("/users"),
        ["e3", "e5"],
        "destination_id bypasses topics"
    );
    assert_eq!(
        ids("/acme"),
        ["e3"],
        "tenant-scoped destination gets only its tenant"
    );
    let stats = courier.stop().await;
    assert_eq!(
        stats.unrouted.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "e4 and e9"
    );

    let store = open_store(store.path());
    let letters = store.dead_letters().unwrap();
    assert_eq!(letters.len(), 2, "{letters:?}");
    let reasons: Vec<&str> = letters.iter().map(|l| l.reason.as_str()).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("\"no-such-destination\" is not a configured destination")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("only accepts tenant \"acme\"")),
        "{reasons:?}"
    );
    assert!(
        letters.iter().all(|l| l.event.is_some()),
        "the event is kept for replay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_survives_a_restart_and_covers_id_less_events() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let queue = unique("dedup");
    let store = tempfile::tempdir().unwrap();
    let config = rabbit_config(&queue, store.path()).destinations([
        Dest::new("d1", &rx.url("/d1")),
        Dest::new("d2", &rx.url("/d2")),
    ]);
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    let id_less = r#"{"topic":"t.x","time":"2026-01-01T00:00:00Z","data":{"n":1}}"#;

    let courier = Courier::start(&config);
    pub_.to_queue(&queue, event("A", "t").as_bytes()).await;
    pub_.to_queue(&queue, id_less.as_bytes()).await;
    rx.wait_for(4, WAIT).await;
    courier.wait_count(2, WAIT, |s| &s.acked).await;
    courier.stop().await;

    // Same events again after a restart, then a sentinel that proves the queue was worked through.
    let courier = Courier::start(&config);
    pub_.to_queue(&queue, br#"{"id":"A","topic":"t","data":{"changed":true}}"#)
        .await;
    pub_.to_queue(&queue, id_less.as_bytes()).await;
    pub_.to_queue(&queue, event("B", "t").as_bytes()).await;
    rx.wait_for(6, WAIT).await;
    courier.wait_count(3, WAIT, |s| &s.acked).await;
    let stats = courier.stop().await;
    assert_eq!(
        stats.duplicates.load(std::sync::atomic::Ordering::SeqCst),
        4
    );
    let counts = rx.delivered_counts();
    assert_eq!(counts["A"], 2, "once per destination: {counts:?}");
    assert_eq!(counts["B"], 2);
    assert_eq!(counts.len(), 3, "A, B and the derived id: {counts:?}");
    let derived = counts
        .keys()
        .find(|k| k.starts_with("evt_"))
        .expect("derived id");
    assert_eq!(
        counts[derived], 2,
        "id-less event deduplicated by its derived id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_stays_unacked_while_the_receiver_is_answering() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    rx.hold();
    let queue = unique("held");
    let store = tempfile::tempdir().unwrap();
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    let courier = Courier::start(
        &rabbit_config(&queue, store.path()).destination(Dest::new("slow", &rx.url("/slow"))),
    );
    pub_.to_queue(&queue, event("H1", "t").as_bytes()).await;
    rx.wait_for(1, WAIT).await;
    assert_eq!(rx.held(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        Publisher::counts(&queue),
        (0, 1),
        "delivered to courier, not acked"
    );
    assert_eq!(courier.count(|s| &s.acked), 0);
    rx.release();
    courier.wait_count(1, WAIT, |s| &s.acked).await;
    wait_drained(&queue, "acked after the POST", WAIT).await;
    courier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_2xx_does_not_block_the_ack_and_is_dead_lettered() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    rx.set_status(400);
    let queue = unique("status");
    let store = tempfile::tempdir().unwrap();
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    let courier = Courier::start(
        &rabbit_config(&queue, store.path()).destination(Dest::new("err", &rx.url("/err"))),
    );
    pub_.to_queue(&queue, event("S1", "t").as_bytes()).await;
    courier.wait_count(1, WAIT, |s| &s.acked).await;
    wait_drained(&queue, "acked", WAIT).await;
    courier.stop().await;
    let letters = open_store(store.path()).dead_letters().unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].last_status, Some(400));
    assert_eq!(letters[0].destination.as_deref(), Some("err"));
    assert!(
        letters[0].reason.starts_with("HTTP 400"),
        "{}",
        letters[0].reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_and_the_rest_flows() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let queue = unique("poison");
    let store = tempfile::tempdir().unwrap();
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    let courier = Courier::start(
        &rabbit_config(&queue, store.path())
            .max_payload_bytes(4096)
            .destination(Dest::new("p", &rx.url("/p"))),
    );

    let big = format!(r#"{{"id":"big","data":"{}"}}"#, "x".repeat(5000));
    let poison: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"\xff\xfe\xfd".to_vec(),
        b"{\"id\": ".to_vec(),
        b"[1,2,3]".to_vec(),
        b"42".to_vec(),
        big.into_bytes(),
        br#"{"id":{"nested":true},"data":{}}"#.to_vec(),
        br#"{"id":"x","topic":"a.#","data":{}}"#.to_vec(),
        b"{\"id\":\"inj\\r\\nX-Evil: 1\",\"data\":{}}".to_vec(),
    ];
    pub_.to_queue(&queue, event("before", "t").as_bytes()).await;
    for p in &poison {
        pub_.to_queue(&queue, p).await;
    }
    pub_.to_queue(&queue, event("after", "t").as_bytes()).await;
    rx.wait_for_id("after", WAIT).await;
    rx.wait_for_id("before", WAIT).await;
    courier
        .wait_count(poison.len() as u64 + 2, WAIT, |s| &s.acked)
        .await;
    wait_drained(&queue, "queue drained, no requeue loop", WAIT).await;
    let stats = courier.stop().await;
    assert_eq!(rx.requests().len(), 2);
    assert_eq!(
        stats.received.load(std::sync::atomic::Ordering::SeqCst),
        poison.len() as u64 + 2,
        "each message seen once"
    );

    let letters = open_store(store.path()).dead_letters().unwrap();
    assert_eq!(letters.len(), poison.len());
    let reasons: Vec<String> = letters.iter().map(|l| l.reason.clone()).collect();
    for want in [
        "payload is empty",
        "not valid UTF-8",
        "not valid JSON",
        "JSON array, not an object",
        "JSON number, not an object",
        "over service.max_payload_bytes = 4096",
        "id: expected a string or an integer",
        "wildcard segment",
        "id: contains characters",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(want)),
            "missing {want:?} in {reasons:#?}"
        );
    }
    let utf8 = letters.iter().find(|l| l.reason.contains("UTF-8")).unwrap();
    assert_eq!(utf8.raw().unwrap(), b"\xff\xfe\xfd", "raw bytes kept");
    assert!(letters
        .iter()
        .all(|l| l.source == courier::event::SourceKind::Rabbitmq));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_is_bounded_by_max_in_flight() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    rx.set_delay(Duration::from_millis(300));
    let queue = unique("bounded");
    let store = tempfile::tempdir().unwrap();
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    publish_events(&pub_, &queue, "b", 0..12).await;
    let courier = Courier::start(
        &rabbit_config(&queue, store.path())
            .max_in_flight(3)
            .destination(Dest::new("b", &rx.url("/b"))),
    );
    rx.wait_for(12, WAIT).await;
    assert_eq!(
        rx.max_concurrent(),
        3,
        "never more than max_in_flight, and it is used"
    );
    courier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_307_keeps_the_post_and_body() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let queue = unique("redirect");
    let store = tempfile::tempdir().unwrap();
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    let courier = Courier::start(
        &rabbit_config(&queue, store.path())
            .destination(Dest::new("r", &rx.url("/redirect/307/final"))),
    );
    pub_.to_queue(&queue, br#"{"id":"R1","topic":"t","data":{"k":1}}"#)
        .await;
    let r = rx.wait_for_id("R1", WAIT).await;
    assert_eq!(r.path, "/final");
    assert_eq!(r.method, "POST");
    assert_eq!(r.body, br#"{"k":1}"#);
    courier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_that_would_drop_the_body_or_leave_the_origin_are_not_followed() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let elsewhere = Receiver::start().await;
    let queue = unique("redirect-refused");
    let store = tempfile::tempdir().unwrap();
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    let courier = Courier::start(
        &rabbit_config(&queue, store.path()).destinations([
            Dest::new("to-get", &rx.url("/redirect/302/final")).topics(["a"]),
            Dest::new(
                "cross-origin",
                &rx.url(&format!("/redirect/307/{}", elsewhere.url("/stolen"))),
            )
            .topics(["b"])
            .api_key("X-API-Key", "secret"),
        ]),
    );
    pub_.to_queue(&queue, event("R302", "a").as_bytes()).await;
    pub_.to_queue(&queue, event("RX", "b").as_bytes()).await;
    courier.wait_count(2, WAIT, |s| &s.acked).await;
    courier.stop().await;
    assert!(
        rx.requests().is_empty(),
        "no GET to /final: {:?}",
        rx.requests()
    );
    assert!(
        elsewhere.requests().is_empty(),
        "the API key never left the origin"
    );
    let letters = open_store(store.path()).dead_letters().unwrap();
    assert_eq!(letters.len(), 2);
    for l in &letters {
        assert!(l.reason.contains("not followed"), "{}", l.reason);
        assert!(matches!(l.last_status, Some(302) | Some(307)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_rabbitmqctl_close_all_connections() {
    let _brokers = brokers().await;
    // A vhost of its own, so closing all its connections touches no other test.
    let vhost = unique("courier-vhost");
    rabbitmqctl(&["add_vhost", &vhost]);
    rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    let url = format!("amqp://guest:guest@127.0.0.1:5672/{}", vhost);
    let rx = Receiver::start().await;
    let queue = unique("reconnect");
    let store = tempfile::tempdir().unwrap();
    let courier = Courier::start(
        &test_defaults(store.path())
            .rabbitmq(Rabbit::queue(&queue).connection_name(&queue).url(&url))
            .destination(Dest::new("r", &rx.url("/r"))),
    );
    let pub_ = Publisher::connect_to(&url).await;
    pub_.wait_consumers(&queue, 1).await;
    pub_.to_queue(&queue, event("before-close", "t").as_bytes())
        .await;
    rx.wait_for_id("before-close", WAIT).await;

    rabbitmqctl(&[
        "close_all_connections",
        "-p",
        &vhost,
        "test: broker closed connections",
    ]);
    // Our own publisher went too; courier must come back on its own.
    let pub_ = Publisher::connect_to(&url).await;
    pub_.to_queue(&queue, event("after-close", "t").as_bytes())
        .await;
    rx.wait_for_id("after-close", Duration::from_secs(30)).await;
    eventually("drained after reconnect", WAIT, || {
        Publisher::counts_in(&vhost, &queue) == (0, 0)
    })
    .await;
    courier.stop().await;
    drop(pub_);
    rabbitmqctl(&["delete_vhost", &vhost]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_loses_nothing_and_posts_nothing_twice() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    rx.set_delay(Duration::from_millis(20));
    let queue = unique("shutdown");
    let store = tempfile::tempdir().unwrap();
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    const N: usize = 300;
    for i in 0..N {
        pub_.to_queue(
            &queue,
            format!(r#"{{"id":"g{i}","topic":"t","data":{{"i":{i}}}}}"#).as_bytes(),
        )
        .await;
    }
    let config = rabbit_config(&queue, store.path())
        .max_in_flight(16)
        .destination(Dest::new("g", &rx.url("/g")));
    let courier = Courier::start(&config);
    rx.wait_for(60, WAIT).await;
    // Stop mid-stream: in-flight deliveries finish and are acked, the rest stay queued.
    let stats = courier.stop_within(Duration::from_secs(15)).await;
    let acked = stats.acked.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        acked >= 60 && (acked as usize) < N,
        "stopped mid-stream: {acked} acked"
    );
    let (ready, unacked) = Publisher::counts(&queue);
    assert_eq!(unacked, 0, "nothing left unacked after a graceful stop");
    assert_eq!(
        ready as usize,
        N - acked as usize,
        "everything not acked is back in the queue"
    );

    let courier = Courier::start(&config);
    eventually("every event delivered", Duration::from_secs(60), || {
        rx.delivered_counts().len() == N
    })
    .await;
    courier.stop().await;
    let counts = rx.delivered_counts();
    let twice: Vec<_> = counts.iter().filter(|(_, &c)| c > 1).collect();
    assert!(twice.is_empty(), "POSTed twice: {twice:?}");
}

/// courier proposes 32 KiB AMQP frames (lapin's buffers are 32 frames each): a message many
/// frames long must still arrive whole, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_of_many_frames_arrives_whole() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let queue = unique("frames");
    let store = tempfile::tempdir().unwrap();
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    let courier = Courier::start(
        &rabbit_config(&queue, store.path()).destination(Dest::new("f", &rx.url("/f"))),
    );
    let pattern: String = (0..900_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let body = format!(r#"{{"id":"F1","topic":"t","data":{{"s":"{pattern}"}}}}"#);
    pub_.to_queue(&queue, body.as_bytes()).await;
    let r = rx.wait_for_id("F1", WAIT).await;
    assert_eq!(r.body, format!(r#"{{"s":"{pattern}"}}"#).into_bytes());
    courier.stop().await;
}

/// Acks that are ready together are coalesced into `multiple` acks only up to the lowest
/// message not yet done: with some messages slow, the rest are acked around them, every message
/// is acked exactly once, and none is redelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_acks_leave_the_queue_empty_and_redeliver_nothing() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let queue = unique("coalesce-order");
    let store = tempfile::tempdir().unwrap();
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    const N: usize = 400;
    for i in 0..N {
        // Every 7th message answers late: the ones after it finish first.
        let data = if i % 7 == 0 {
            format!(r#"{{"delay_ms":{}}}"#, 50 + (i % 5) * 40)
        } else {
            "{}".to_string()
        };
        pub_.to_queue(
            &queue,
            format!(r#"{{"id":"o{i}","data":{data}}}"#).as_bytes(),
        )
        .await;
    }
    let courier = Courier::start(
        &rabbit_config(&queue, store.path())
            .max_in_flight(32)
            .destination(Dest::new("o", &rx.url("/o"))),
    );
    courier.wait_count(N as u64, WAIT, |s| &s.acked).await;
    wait_drained(&queue, "every message acked", WAIT).await;
    // Give a wrongly unacked message every chance to come back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = courier.stop().await;
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(count(&stats.received), N as u64, "nothing redelivered");
    assert_eq!(count(&stats.acked), N as u64);
    assert_eq!(count(&stats.ack_failures), 0);
    assert!(count(&stats.amqp_ack_frames) <= N as u64);
    let counts = rx.delivered_counts();
    assert_eq!(counts.len(), N);
    assert!(counts.values().all(|&c| c == 1), "a message POSTed twice");
}

/// A burst is acked in fewer `basic.ack` frames than messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_acked_in_fewer_frames_than_messages() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let queue = unique("coalesce-burst");
    let store = tempfile::tempdir().unwrap();
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    const N: usize = 2000;
    publish_events(&pub_, &queue, "c", 0..N).await;
    let courier = Courier::start(
        &rabbit_config(&queue, store.path())
            .max_in_flight(64)
            .destination(Dest::new("c", &rx.url("/c"))),
    );
    courier.wait_count(N as u64, WAIT, |s| &s.acked).await;
    wait_drained(&queue, "every message acked", WAIT).await;
    let stats = courier.stop().await;
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::SeqCst);
    let frames = count(&stats.amqp_ack_frames);
    assert_eq!(count(&stats.received), N as u64, "nothing redelivered");
    assert_eq!(count(&stats.ack_failures), 0);
    assert!(
        frames < N as u64,
        "{frames} ack frames for {N} messages: nothing coalesced"
    );
    eprintln!("{N} messages acked in {frames} frames");
}

/// A message done while an earlier one is still with a slow partner waits `rabbitmq.ack_hold`
/// for it, then is acked by itself: the slow message holds back no other ack for longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_held_behind_a_slow_message_go_out_when_the_hold_is_over() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let queue = unique("ack-hold");
    let store = tempfile::tempdir().unwrap();
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    pub_.to_queue(&queue, br#"{"id":"slow","data":{"delay_ms":12000}}"#)
        .await;
    const FAST: u64 = 20;
    publish_events(&pub_, &queue, "fast", 0..FAST as usize).await;
    let courier = Courier::start(
        &test_defaults(store.path())
            .rabbitmq(
                Rabbit::queue(&queue)
                    .connection_name(&queue)
                    .ack_hold(Duration::from_millis(200)),
            )
            .destination(Dest::new("h", &rx.url("/h"))),
    );
    // Every fast message is above the slow one's tag, so none can join a run before it is done.
    courier
        .wait_count(FAST, Duration::from_secs(10), |s| &s.acked)
        .await;
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        count(&courier.stats.acked),
        FAST,
        "the slow message is not acked before its partner answers"
    );
    courier.wait_count(FAST + 1, WAIT, |s| &s.acked).await;
    wait_drained(&queue, "every message acked", WAIT).await;
    let stats = courier.stop().await;
    assert_eq!(count(&stats.received), FAST + 1, "nothing redelivered");
    assert_eq!(count(&stats.ack_failures), 0);
    assert_eq!(
        count(&stats.amqp_ack_frames),
        FAST + 1,
        "each held ack by itself, then the slow one"
    );
}

/// Messages done while an earlier one is still in delivery wait for it within
/// `rabbitmq.ack_hold`, and one `multiple` ack covers them all once it is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_done_behind_a_slower_message_share_its_multiple_ack() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let queue = unique("ack-share");
    let store = tempfile::tempdir().unwrap();
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    pub_.to_queue(&queue, br#"{"id":"slower","data":{"delay_ms":400}}"#)
        .await;
    const FAST: u64 = 20;
    publish_events(&pub_, &queue, "quick", 0..FAST as usize).await;
    let courier = Courier::start(
        &test_defaults(store.path())
            .rabbitmq(
                Rabbit::queue(&queue)
                    .connection_name(&queue)
                    .ack_hold(Duration::from_secs(1)),
            )
            .destination(Dest::new("s", &rx.url("/s"))),
    );
    courier.wait_count(FAST + 1, WAIT, |s| &s.acked).await;
    wait_drained(&queue, "every message acked", WAIT).await;
    let stats = courier.stop().await;
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(count(&stats.received), FAST + 1, "nothing redelivered");
    assert_eq!(count(&stats.ack_failures), 0);
    // Acked the moment each is done, the quick ones would take a frame each. A quick one that
    // waited past its hold goes by itself, so allow a few on a slow machine.
    let frames = count(&stats.amqp_ack_frames);
    assert!(
        frames <= 3,
        "{frames} ack frames for {} messages: the quick acks did not wait for the slower one",
        FAST + 1
    );
}

/// Acks held behind a slow message when the shutdown timeout cuts that message short go out
/// before the connection closes: the messages whose POST was answered are not redelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_acks_go_out_before_the_connection_closes_at_a_stop() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let queue = unique("ack-hold-stop");
    let store = tempfile::tempdir().unwrap();
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    pub_.to_queue(&queue, br#"{"id":"slow","data":{"delay_ms":5000}}"#)
        .await;
    const FAST: usize = 10;
    publish_events(&pub_, &queue, "held", 0..FAST).await;
    let courier = Courier::start(
        &test_defaults(store.path())
            .shutdown_timeout(Duration::from_millis(300))
            .rabbitmq(
                Rabbit::queue(&queue)
                    .connection_name(&queue)
                    .ack_hold(Duration::from_secs(1)),
            )
            .destination(Dest::new("h", &rx.url("/h"))),
    );
    eventually("the fast ones answered", WAIT, || {
        rx.delivered_with_prefix("held") == FAST
    })
    .await;
    courier.stop().await;
    eventually("only the slow message is back in the queue", WAIT, || {
        Publisher::counts(&queue) == (1, 0)
    })
    .await;
}
