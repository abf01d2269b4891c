//! Operations: the admin port over real HTTP, Prometheus metrics parsed by a Prometheus text
//! parser, JSON logs parsed line by line, quorum queues, and two replicas sharing dedup in the
//! real Redis on 127.0.0.1:6379.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);

async fn get(url: &str) -> (u16, String) {
    http_get(url).await
}

async fn wait_status(url: &str, want: u16) -> String {
    wait_http_status(url, want, WAIT).await
}

/// Every sample of a scrape as `(name, labels) -> value`.
fn scrape(body: &str) -> Vec<(String, HashMap<String, String>, f64)> {
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("metrics parse as Prometheus text");
    let mut out = Vec::new();
    for s in parsed.samples {
        let labels: HashMap<String, String> = s
            .labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => out.push((s.metric, labels, v)),
            prometheus_parse::Value::Histogram(buckets) => {
                let count = buckets.iter().map(|b| b.count).fold(0.0, f64::max);
                out.push((format!("{}_count", s.metric), labels, count));
            }
            prometheus_parse::Value::Summary(_) => {}
        }
    }
    out
}

fn value(
    samples: &[(String, HashMap<String, String>, f64)],
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_port_serves_health_readiness_and_prometheus_metrics() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let queue = unique("admin");
    let store = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = rabbit_config(&queue, store.path())
        .admin(port)
        .destinations([
            Dest::new("ok", &rx.url("/ok")).topics(["a"]),
            Dest::new("refuses", &rx.url("/redirect/302/x")).topics(["b"]),
        ]);
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    let courier = Courier::start(&config);
    let base = format!("http://127.0.0.1:{port}");
    wait_status(&format!("{base}/healthz"), 200).await;
    let ready = wait_status(&format!("{base}/readyz"), 200).await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&ready).unwrap()["status"],
        "ready"
    );

    for i in 0..5 {
        pub_.to_queue(&queue, event(&format!("m{i}"), "a").as_bytes())
            .await;
    }
    for i in 0..2 {
        pub_.to_queue(&queue, event(&format!("r{i}"), "b").as_bytes())
            .await;
    }
    courier.wait_count(7, WAIT, |s| &s.acked).await;
    let (status, body) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    let samples = scrape(&body);
    let get_v = |name: &str, labels: &[(&str, &str)]| {
        value(&samples, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in\n{body}"))
    };
    assert_eq!(
        get_v("courier_events_received_total", &[("source", "rabbitmq")]),
        7.0
    );
    assert_eq!(
        get_v(
            "courier_deliveries_total",
            &[("destination", "ok"), ("outcome", "delivered")]
        ),
        5.0
    );
    assert_eq!(
        get_v(
            "courier_deliveries_total",
            &[("destination", "refuses"), ("outcome", "dead_lettered")]
        ),
        2.0
    );
    assert_eq!(
        get_v(
            "courier_delivery_duration_seconds_count",
            &[("destination", "ok")]
        ),
        5.0
    );
    assert_eq!(get_v("courier_dead_letters", &[]), 2.0);
    assert_eq!(get_v("courier_retries_pending", &[]), 0.0);
    assert_eq!(get_v("courier_in_flight", &[]), 0.0);
    assert_eq!(get_v("courier_circuits_open", &[]), 0.0);
    courier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_with_a_reason_while_the_broker_is_unreachable() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let store = tempfile::tempdir().unwrap();
    let port = free_port();
    let queue = unique("unready");
    let courier = Courier::start(
        &test_defaults(store.path())
            .admin(port)
            // Nothing listens on port 1.
            .rabbitmq(
                Rabbit::queue(&queue)
                    .connection_name(&queue)
                    .url("amqp://guest:guest@127.0.0.1:1/%2f"),
            )
            .destination(Dest::new("d", &rx.url("/d"))),
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_status(&format!("{base}/healthz"), 200).await;
    let body = wait_status(&format!("{base}/readyz"), 503).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "not ready");
    assert!(
        v["reasons"].to_string().contains("rabbitmq: not connected"),
        "{body}"
    );
    eventually("a reconnect is counted", WAIT, || {
        courier.count(|s| &s.received) == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (_, metrics) = get(&format!("{base}/metrics")).await;
    let reconnects = value(
        &scrape(&metrics),
        "courier_source_reconnects_total",
        &[("source", "rabbitmq")],
    );
    assert!(reconnects.unwrap_or(0.0) >= 1.0, "{metrics}");
    courier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_the_event_span_and_no_secrets() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let queue = unique("jsonlog");
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::new(dir.path().join("store"))
        .rabbitmq(Rabbit::queue(&queue))
        .destinations([
            Dest::new("j", &rx.url("/j")).api_key("X-Key", "sekrit-value-123"),
            // Never matched; there to show that its relaxed TLS is announced and its secrets
            // are not.
            Dest::new("insecure", "https://127.0.0.1:1/x")
                .topics(["never"])
                .no_tls_verify()
                .basic_auth("u", "basic-pass-456")
                .signing_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        ]);
    let mut child = spawn_launch(
        launch(&config, dir.path())
            .global_arg("--log-format")
            .global_arg("json")
            .rust_log("courier=debug,info"),
    );
    let pub_ = Publisher::connect().await;
    pub_.wait_consumers(&queue, 1).await;
    pub_.to_queue(&queue, event("J1", "t.x").as_bytes()).await;
    let r = rx.wait_for_id("J1", WAIT).await;
    assert_eq!(r.header("x-key"), Some("sekrit-value-123"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.sigterm();
    let _ = child.wait_exit(Duration::from_secs(30)).await;
    let logs = std::fs::read_to_string(child.log()).unwrap();
    for secret in [
        "sekrit-value-123",
        "basic-pass-456",
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "guest:guest",
    ] {
        assert!(!logs.contains(secret), "secret {secret} in logs:\n{logs}");
    }
    assert!(
        logs.lines().any(|l| l.contains("\"WARN\"")
            && l.contains("verification is OFF")
            && l.contains("insecure")),
        "tls_verify = false was not announced with a warning:\n{logs}"
    );
    let mut saw_event_span = false;
    for line in logs.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        if v["span"]["event_id"] == "J1" {
            assert_eq!(v["span"]["topic"], "t.x", "{line}");
            assert_eq!(v["span"]["source"], "rabbitmq", "{line}");
            if v["destination"] == "j" {
                saw_event_span = true;
            }
        }
    }
    assert!(
        saw_event_span,
        "no log line in the event's span naming the destination:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_through_queue_arguments() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let queue = unique("quorum");
    let store = tempfile::tempdir().unwrap();
    let courier = Courier::start(
        &test_defaults(store.path())
            .rabbitmq(
                Rabbit::queue(&queue)
                    .connection_name(&queue)
                    .queue_argument("x-queue-type", "quorum"),
            )
            .destination(Dest::new("q", &rx.url("/q"))),
    );
    let pub_ = Publisher::connect().await;
    pub_.wait_consumers(&queue, 1).await;
    let listed = rabbitmqctl(&["list_queues", "-q", "--no-table-headers", "name", "type"]);
    assert!(
        listed
            .lines()
            .any(|l| l.contains(&queue) && l.contains("quorum")),
        "{listed}"
    );
    pub_.publish(
        "",
        &queue,
        br#"{"id":"Q1","topic":"t","data":{}}"#,
        lapin::BasicProperties::default(),
    )
    .await;
    rx.wait_for_id("Q1", WAIT).await;
    courier.stop().await;
    rabbitmqctl(&["delete_queue", &queue]);
}

/// Asserts that replicas "a" and "b" (their `X-Replica` header) both POSTed some of the events
/// whose id starts with `prefix`.
fn assert_work_split(rx: &Receiver, prefix: &str) {
    let by = |r: &str| {
        rx.requests()
            .iter()
            .filter(|q| q.id().starts_with(prefix) && q.header("x-replica") == Some(r))
            .count()
    };
    assert!(
        by("a") > 0 && by("b") > 0,
        "work split: a {} / b {}",
        by("a"),
        by("b")
    );
}

/// A Redis key prefix no other test uses.
fn redis_prefix() -> String {
    format!("{}:", unique("courier-test"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_queue_share_dedup_in_redis_and_survive_kill_9() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    rx.set_delay(Duration::from_millis(3));
    let queue = unique("replicas");
    let dir = tempfile::tempdir().unwrap();
    let prefix = redis_prefix();
    let config = |name: &str| {
        ConfigBuilder::new(dir.path().join(name))
            .max_in_flight(16)
            .redis_dedup(REDIS_URL, &prefix)
            .rabbitmq(Rabbit::queue(&queue).prefetch(16))
            .destination(Dest::new("d", &rx.url("/d")).header("X-Replica", name))
    };
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    let a = spawn(&config("a"), dir.path());
    let b = spawn(&config("b"), dir.path());
    pub_.wait_consumers(&queue, 2).await;
    const N: usize = 800;
    publish_events(&pub_, &queue, "n", 0..N).await;
    eventually("some delivered", WAIT, || rx.delivered_counts().len() > 200).await;
    assert_work_split(&rx, "n");
    let _ = a.kill9();
    eventually(
        "every event delivered by the survivor",
        Duration::from_secs(60),
        || rx.delivered_with_prefix("n") == N,
    )
    .await;
    wait_drained(&queue, "queue drained", WAIT).await;
    drop(b);
    let counts = rx.delivered_counts();
    let twice = counts.values().filter(|&&c| c > 1).count();
    println!("two replicas, kill -9 of one: {N} sent, {N} received, 0 lost, {twice} POSTed twice");
    // Only POSTs that were in flight at the kill (answer never recorded) can come twice.
    assert!(twice <= 16, "{twice} POSTed twice");
    // Redis holds the dedup record: the replicas' stores have no dedup table or log of their own.
    for name in ["a", "b"] {
        let files: Vec<String> = std::fs::read_dir(dir.path().join(name))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            files.iter().any(|f| f == "db") && !files.iter().any(|f| f.starts_with("dedup.")),
            "store {name} with dedup = \"redis\": {files:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_shared_mqtt_subscription_share_dedup_in_redis() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    rx.set_delay(Duration::from_millis(3));
    let topic = unique("mqtt-replicas");
    let group = unique("g");
    let dir = tempfile::tempdir().unwrap();
    let prefix = redis_prefix();
    let ids: HashMap<&str, String> =
        [("a", unique("replica-a")), ("b", unique("replica-b"))].into();
    let config = |name: &str| {
        test_defaults(&dir.path().join(name))
            .max_in_flight(16)
            .redis_dedup(REDIS_URL, &prefix)
            .mqtt(mqtt_source(&ids[name], &topic).shared_group(&group))
            .destination(Dest::new("d", &rx.url("/d")).header("X-Replica", name))
    };
    let a = spawn(&config("a"), dir.path());
    let b = spawn(&config("b"), dir.path());
    let publisher = MqttPublisher::connect().await;
    // Both subscribed: probes until each replica has POSTed at least one (ids tell them apart
    // only by arrival, so wait for a few).
    wait_subscribed(&publisher, &topic, &rx).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    const N: usize = 600;
    for i in 0..N {
        publisher
            .publish(&topic, format!(r#"{{"id":"s{i}","data":{{}}}}"#))
            .await;
    }
    publisher.wait_acked().await;
    eventually("some delivered", WAIT, || {
        rx.delivered_with_prefix("s") > 150
    })
    .await;
    assert_work_split(&rx, "s");
    let _ = a.kill9();
    // The killed replica's session keeps its share; it comes back (same client id) to finish.
    let a_again = spawn(&config("a"), dir.path());
    eventually("every event delivered", Duration::from_secs(60), || {
        rx.delivered_with_prefix("s") == N
    })
    .await;
    drop(a_again);
    drop(b);
    let twice = rx.delivered_twice_with_prefix("s");
    println!(
        "two MQTT replicas, kill -9 of one: {N} sent, {N} received, 0 lost, {twice} POSTed twice"
    );
    assert!(twice <= 16, "{twice} POSTed twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_worker_on_the_same_store_waits_and_takes_over() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let queue = unique("takeover");
    let dir = tempfile::tempdir().unwrap();
    let config = |admin: u16| {
        ConfigBuilder::new(dir.path().join("store"))
            .admin(admin)
            .rabbitmq(Rabbit::queue(&queue))
            .destination(Dest::new("t", &rx.url("/t")))
    };
    let (first_port, second_port) = (free_port(), free_port());
    let first = spawn(&config(first_port), dir.path());
    let pub_ = Publisher::connect().await;
    pub_.wait_consumers(&queue, 1).await;
    let second = spawn(&config(second_port), dir.path());

    // The second one is up, not ready, and says why; it consumes nothing it could not store.
    let readyz = format!("http://127.0.0.1:{second_port}/readyz");
    let body = wait_status(&readyz, 503).await;
    assert!(body.contains("in use by another courier process"), "{body}");
    // Without a store it takes no messages: were it a consumer too, RabbitMQ would hand it
    // some of these, and they would wait for the takeover.
    publish_events(&pub_, &queue, "T1-", 0..6).await;
    for i in 0..6 {
        rx.wait_for_id(&format!("T1-{i}"), Duration::from_secs(10))
            .await;
    }

    // The first one stops; the second takes the store over and delivers.
    assert!(first.sigterm());
    wait_status(&readyz, 200).await;
    pub_.to_queue(&queue, event("T2", "t").as_bytes()).await;
    rx.wait_for_id("T2", WAIT).await;
    let log = second.kill9();
    assert!(log.contains("STORE CANNOT BE OPENED"), "{log}");
    drop(first);
    assert!(rx.delivered_counts().values().all(|&n| n == 1), "each once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_worker_threads_sets_the_runtime_threads() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Unset: tokio's default, TOKIO_WORKER_THREADS (which the child inherits) or one per core.
    let cores = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    for (name, threads, want) in [
        ("one", Some(1), 1),
        ("three", Some(3), 3),
        ("unset", None, cores),
    ] {
        let queue = unique(&format!("threads-{name}"));
        let mut config = rabbit_config(&queue, &dir.path().join(name))
            .destination(Dest::new("d", &rx.url("/d")));
        if let Some(n) = threads {
            config = config.worker_threads(n);
        }
        let child = spawn(&config, dir.path());
        let line = wait_log_line(child.log(), &["courier started"]).await;
        assert!(
            line.contains(&format!("worker_threads={want}")),
            "{name}: want {want} worker threads: {line}"
        );
        child.stop(Duration::from_secs(10)).await;
    }
}
