//! Operations: the admin port over real HTTP, Prometheus metrics parsed by a Prometheus text
//! parser, JSON logs parsed line by line, quorum queues, and two replicas sharing dedup in the
//! real Redis on 127.0.0.1:6379.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;

const WAIT: Duration = Duration::from_secs(30);

async fn get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
        Err(_) => (0, String::new()),
    }
}

async fn wait_status(url: &str, want: u16) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = get(url).await;
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{url} answered {status} {body}, wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    let rx = Receiver::start().await;
    let queue = unique("admin");
    let store = tempfile::tempdir().unwrap();
    let port = free_port();
    let destinations = [
        dest("ok", &rx.url("/ok"), "topics = [\"a\"]"),
        dest("refuses", &rx.url("/redirect/302/x"), "topics = [\"b\"]"),
    ]
    .concat();
    let mut cfg = config(&queue, store.path(), &destinations);
    cfg.admin.listen = Some(format!("127.0.0.1:{port}"));
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    let courier = Courier::start(cfg);
    let base = format!("http://127.0.0.1:{port}");
    wait_status(&format!("{base}/healthz"), 200).await;
    let ready = wait_status(&format!("{base}/readyz"), 200).await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&ready).unwrap()["status"],
        "ready"
    );

    for i in 0..5 {
        pub_.to_queue(
            &queue,
            format!(r#"{{"id":"m{i}","topic":"a","data":{{}}}}"#).as_bytes(),
        )
        .await;
    }
    for i in 0..2 {
        pub_.to_queue(
            &queue,
            format!(r#"{{"id":"r{i}","topic":"b","data":{{}}}}"#).as_bytes(),
        )
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
    let rx = Receiver::start().await;
    let store = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut cfg = config(
        &unique("unready"),
        store.path(),
        &dest("d", &rx.url("/d"), ""),
    );
    if let Some(r) = cfg.rabbitmq.as_mut() {
        // Nothing listens on port 1.
        r.url = courier::config::AmqpUrl::parse("amqp://guest:guest@127.0.0.1:1/%2f")
            .expect("valid URL");
    }
    cfg.admin.listen = Some(format!("127.0.0.1:{port}"));
    let courier = Courier::start(cfg);
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
    let rx = Receiver::start().await;
    let queue = unique("jsonlog");
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[store]\npath = \"{}\"\n[rabbitmq]\nurl = \"{AMQP_URL}\"\nqueue = \"{queue}\"\n{}\n{}",
        dir.path().join("store").display(),
        dest(
            "j",
            &rx.url("/j"),
            "auth = { type = \"api_key\", header = \"X-Key\", key = \"sekrit-value-123\" }"
        ),
        // Never matched; there to show that its relaxed TLS is announced and its secrets are not.
        dest(
            "insecure",
            "https://127.0.0.1:1/x",
            "topics = [\"never\"]\ntls_verify = false\n\
             auth = { type = \"basic\", username = \"u\", password = \"basic-pass-456\" }\n\
             signing_secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\""
        )
    );
    let config = dir.path().join("c.toml");
    std::fs::write(&config, &text).unwrap();
    let log = dir.path().join("log.jsonl");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["--log-format", "json", "run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "courier=debug,info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pub_ = Publisher::connect().await;
    pub_.wait_consumers(&queue, 1).await;
    pub_.to_queue(&queue, br#"{"id":"J1","topic":"t.x","data":{}}"#)
        .await;
    let r = rx.wait_for_id("J1", WAIT).await;
    assert_eq!(r.header("x-key"), Some("sekrit-value-123"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let _ = child.wait();
    let logs = std::fs::read_to_string(&log).unwrap();
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
    let rx = Receiver::start().await;
    let queue = unique("quorum");
    let store = tempfile::tempdir().unwrap();
    let cfg = config_with(
        &queue,
        store.path(),
        "queue_arguments = { \"x-queue-type\" = \"quorum\" }",
        &dest("q", &rx.url("/q"), ""),
    );
    let courier = Courier::start(cfg);
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

fn redis_store(extra: &str) -> String {
    format!("dedup = \"redis\"\nredis_url = \"redis://127.0.0.1:6379\"\nredis_prefix = \"{}:\"\n{extra}", unique("courier-test"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_queue_share_dedup_in_redis_and_survive_kill_9() {
    let rx = Receiver::start().await;
    rx.set_delay(Duration::from_millis(3));
    let queue = unique("replicas");
    let dir = tempfile::tempdir().unwrap();
    let redis = redis_store("");
    let text = |name: &str| {
        format!(
            "[service]\nmax_in_flight = 16\n[store]\npath = \"{}\"\n{redis}\n[rabbitmq]\nurl = \"{AMQP_URL}\"\nqueue = \"{queue}\"\nprefetch = 16\n{}",
            dir.path().join(name).display(),
            dest("d", &rx.url("/d"), &format!("headers = {{ \"X-Replica\" = \"{name}\" }}"))
        )
    };
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    let a = CourierProcess::spawn(&text("a"), dir.path());
    let b = CourierProcess::spawn(&text("b"), dir.path());
    pub_.wait_consumers(&queue, 2).await;
    const N: usize = 800;
    for i in 0..N {
        pub_.to_queue(
            &queue,
            format!(r#"{{"id":"n{i}","topic":"t","data":{{}}}}"#).as_bytes(),
        )
        .await;
    }
    eventually("some delivered", WAIT, || rx.delivered_counts().len() > 200).await;
    let by = |r: &str| {
        rx.requests()
            .iter()
            .filter(|q| q.header("x-replica") == Some(r))
            .count()
    };
    assert!(
        by("a") > 0 && by("b") > 0,
        "work split: a {} / b {}",
        by("a"),
        by("b")
    );
    let _ = a.kill9();
    eventually(
        "every event delivered by the survivor",
        Duration::from_secs(60),
        || {
            rx.delivered_counts()
                .keys()
                .filter(|k| k.starts_with('n'))
                .count()
                == N
        },
    )
    .await;
    eventually("queue drained", WAIT, || {
        Publisher::counts(&queue) == (0, 0)
    })
    .await;
    drop(b);
    let counts = rx.delivered_counts();
    let twice = counts.values().filter(|&&c| c > 1).count();
    println!("two replicas, kill -9 of one: {N} sent, {N} received, 0 lost, {twice} POSTed twice");
    // Only POSTs that were in flight at the kill (answer never recorded) can come twice.
    assert!(twice <= 16, "{twice} POSTed twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_shared_mqtt_subscription_share_dedup_in_redis() {
    let rx = Receiver::start().await;
    rx.set_delay(Duration::from_millis(3));
    let topic = unique("mqtt-replicas");
    let group = unique("g");
    let dir = tempfile::tempdir().unwrap();
    let redis = redis_store("");
    let ids: HashMap<&str, String> =
        [("a", unique("replica-a")), ("b", unique("replica-b"))].into();
    let text = |name: &str| {
        mqtt_config_text(
            &topic,
            &ids[name],
            &dir.path().join(name),
            &format!("shared_group = \"{group}\""),
            &dest(
                "d",
                &rx.url("/d"),
                &format!("headers = {{ \"X-Replica\" = \"{name}\" }}"),
            ),
        )
        .replace("[store]", &format!("[store]\n{redis}"))
        .replace("[service]", "[service]\nmax_in_flight = 16")
    };
    let a = CourierProcess::spawn(&text("a"), dir.path());
    let b = CourierProcess::spawn(&text("b"), dir.path());
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
        rx.delivered_counts()
            .keys()
            .filter(|k| k.starts_with('s'))
            .count()
            > 150
    })
    .await;
    let by = |r: &str| {
        rx.requests()
            .iter()
            .filter(|q| q.id().starts_with('s') && q.header("x-replica") == Some(r))
            .count()
    };
    assert!(
        by("a") > 0 && by("b") > 0,
        "work split: a {} / b {}",
        by("a"),
        by("b")
    );
    let _ = a.kill9();
    // The killed replica's session keeps its share; it comes back (same client id) to finish.
    let a_again = CourierProcess::spawn(&text("a"), dir.path());
    eventually("every event delivered", Duration::from_secs(60), || {
        rx.delivered_counts()
            .keys()
            .filter(|k| k.starts_with('s'))
            .count()
            == N
    })
    .await;
    drop(a_again);
    drop(b);
    let counts = rx.delivered_counts();
    let twice = counts
        .iter()
        .filter(|(k, &c)| k.starts_with('s') && c > 1)
        .count();
    println!(
        "two MQTT replicas, kill -9 of one: {N} sent, {N} received, 0 lost, {twice} POSTed twice"
    );
    assert!(twice <= 16, "{twice} POSTed twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_worker_on_the_same_store_waits_and_takes_over() {
    let rx = Receiver::start().await;
    let queue = unique("takeover");
    let dir = tempfile::tempdir().unwrap();
    let text = |admin: u16| {
        format!(
            "[store]\npath = \"{}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [rabbitmq]\nurl = \"{AMQP_URL}\"\nqueue = \"{queue}\"\n{}",
            dir.path().join("store").display(),
            dest("t", &rx.url("/t"), "")
        )
    };
    let (first_port, second_port) = (free_port(), free_port());
    let first = CourierProcess::spawn(&text(first_port), dir.path());
    let pub_ = Publisher::connect().await;
    pub_.wait_consumers(&queue, 1).await;
    let second = CourierProcess::spawn(&text(second_port), dir.path());

    // The second one is up, not ready, and says why; it consumes nothing it could not store.
    let readyz = format!("http://127.0.0.1:{second_port}/readyz");
    let body = wait_status(&readyz, 503).await;
    assert!(body.contains("in use by another courier process"), "{body}");
    // Without a store it takes no messages: were it a consumer too, RabbitMQ would hand it
    // some of these, and they would wait for the takeover.
    for i in 0..6 {
        pub_.to_queue(
            &queue,
            format!(r#"{{"id":"T1-{i}","topic":"t","data":{{}}}}"#).as_bytes(),
        )
        .await;
    }
    for i in 0..6 {
        rx.wait_for_id(&format!("T1-{i}"), Duration::from_secs(10))
            .await;
    }

    // The first one stops; the second takes the store over and delivers.
    std::process::Command::new("kill")
        .args(["-TERM", &first.child.id().to_string()])
        .status()
        .unwrap();
    wait_status(&readyz, 200).await;
    pub_.to_queue(&queue, br#"{"id":"T2","topic":"t","data":{}}"#)
        .await;
    rx.wait_for_id("T2", WAIT).await;
    let log = second.kill9();
    assert!(log.contains("STORE CANNOT BE OPENED"), "{log}");
    drop(first);
    assert!(rx.delivered_counts().values().all(|&n| n == 1), "each once");
}
