//! Configuration reload, with the courier binary and its file (`courier run` reloads on SIGHUP and
//! when the file changes): under a steady stream on both sources, destinations are added, removed
//! and changed and an invalid file is ignored, and every event arrives exactly where the
//! configuration in force when it was routed sends it, once; a changed source reconnects alone;
//! changes that need a restart are refused; a removed destination's retries wait for it.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);

/// `courier_config_reload_total{result="<result>"}`, read from the admin port (0 when absent).
async fn reloads(port: u16, result: &str) -> u64 {
    let (_, body) = http_get(&format!("http://127.0.0.1:{port}/metrics")).await;
    let prefix = format!("courier_config_reload_total{{result=\"{result}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Waits until `courier_config_reload_total{result}` reaches `n`; returns when it was seen.
async fn wait_reloads(port: u16, result: &str, n: u64) -> Instant {
    let deadline = Instant::now() + WAIT;
    loop {
        if reloads(port, result).await >= n {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{n} reload(s) with result {result} never counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Replaces the file the way a deployment does: a new file renamed over the old one.
fn rewrite(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write the new configuration");
    std::fs::rename(&tmp, path).expect("rename it into place");
}

/// Waits until `/readyz` answers 200 (both sources connected, the store open).
async fn wait_ready(port: u16) {
    let deadline = Instant::now() + WAIT;
    while http_get(&format!("http://127.0.0.1:{port}/readyz")).await.0 != 200 {
        assert!(Instant::now() < deadline, "courier never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A courier process with `config` in `dir/courier.toml`; returns it and the file's path.
fn start(config: &ConfigBuilder, dir: &Path) -> (CourierProcess, PathBuf) {
    let process = spawn_launch(launch(config, dir).config_file("courier.toml"));
    (process, dir.join("courier.toml"))
}

/// The ids and paths of the 2xx requests the receiver got, probes left out.
fn arrivals(rx: &Receiver) -> HashMap<String, Vec<String>> {
    let mut by_id: HashMap<String, Vec<String>> = HashMap::new();
    for r in rx.requests() {
        if (200..300).contains(&r.status) && !r.id().starts_with("probe-") {
            by_id.entry(r.id()).or_default().push(r.path.clone());
        }
    }
    by_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_a_steady_stream_route_every_event_by_the_config_in_force() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("reload");
    let topic = unique("reload");
    let port = free_port();
    let base = rabbit_config(&queue, &dir.path().join("store"))
        .mqtt(mqtt_source(&unique("courier-reload"), &topic))
        .admin(port);
    let dest = |name: &str, path: &str| Dest::new(name, &rx.url(path));
    // The versions of the file, and the paths each sends an event to.
    let versions: [(ConfigBuilder, &[&str]); 4] = [
        (
            base.clone()
                .destinations([dest("a", "/a"), dest("b", "/b")]),
            &["/a", "/b"],
        ),
        (
            base.clone()
                .destinations([dest("a", "/a"), dest("b", "/b"), dest("c", "/c")]),
            &["/a", "/b", "/c"],
        ),
        (
            base.clone()
                .destinations([dest("a", "/a"), dest("c", "/c")]),
            &["/a", "/c"],
        ),
        (
            base.clone()
                .destinations([dest("a", "/a2"), dest("c", "/c")]),
            &["/a2", "/c"],
        ),
    ];
    let publisher = Publisher::connect().await;
    publisher.declare_queue(&queue).await;
    let (courier, path) = start(&versions[0].0, dir.path());
    wait_ready(port).await;
    let mqtt = subscribed_publisher(&topic, &rx).await;

    // 2,500 events per source at about 200 per second each, their publish times kept.
    let published: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let stream = {
        let published = published.clone();
        let queue = queue.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            for i in 0..2_500u32 {
                let (r, m) = (format!("R{i}"), format!("M{i}"));
                published.lock().unwrap().push((r.clone(), Instant::now()));
                publisher.to_queue(&queue, event(&r, "t").as_bytes()).await;
                published.lock().unwrap().push((m.clone(), Instant::now()));
                mqtt.publish(&topic, event(&m, "t").into_bytes()).await;
                let due = start + Duration::from_millis(5) * (i + 1);
                tokio::time::sleep_until(due.into()).await;
            }
            mqtt
        })
    };
    // The reloads: when the file was written, and when the new version was seen in force.
    let mut applied: Vec<(Instant, Instant)> = Vec::new();
    let step = |secs: f64| tokio::time::sleep(Duration::from_secs_f64(secs));
    step(2.5).await;
    let written = Instant::now();
    rewrite(&path, &versions[1].0.toml());
    applied.push((written, wait_reloads(port, "applied", 1).await));
    step(2.0).await;
    rewrite(
        &path,
        "[rabbitmq]\nurl = \"amqp://127.0.0.1/%2f\"\nqueue = \"\"\n",
    );
    wait_reloads(port, "invalid", 1).await;
    step(1.5).await;
    let written = Instant::now();
    rewrite(&path, &versions[2].0.toml());
    applied.push((written, wait_reloads(port, "applied", 2).await));
    step(2.5).await;
    let written = Instant::now();
    rewrite(&path, &versions[3].0.toml());
    applied.push((written, wait_reloads(port, "applied", 3).await));
    let _mqtt = stream.await.unwrap();

    let published = published.lock().unwrap().clone();
    eventually("every event arrived", WAIT, || {
        let got = arrivals(&rx);
        published.iter().all(|(id, _)| got.contains_key(id))
    })
    .await;
    let mut courier = courier;
    assert!(courier.sigterm());
    courier.wait_exit(WAIT).await.expect("courier stops");

    // An event is routed once, against one set of destinations: it arrives at exactly the paths
    // of one version, each once. Which versions it may have met: those in force at some moment
    // between its publication and a second later (it waits in a queue that long at most).
    const LAG: Duration = Duration::from_secs(1);
    let got = arrivals(&rx);
    let mut checked_strictly = 0;
    for (id, at) in &published {
        let paths = &got[id];
        let unique: BTreeSet<&str> = paths.iter().map(String::as_str).collect();
        assert_eq!(
            unique.len(),
            paths.len(),
            "{id} POSTed twice to one path: {paths:?}"
        );
        let lowest = applied.iter().filter(|(_, seen)| *seen <= *at).count();
        let highest = applied
            .iter()
            .filter(|(written, _)| *written <= *at + LAG)
            .count();
        let matches: Vec<usize> = (lowest..=highest)
            .filter(|&v| {
                let want: BTreeSet<&str> = versions[v].1.iter().copied().collect();
                want == unique
            })
            .collect();
        assert!(
            !matches.is_empty(),
            "{id} arrived at {paths:?}; the versions it could meet ({lowest}..={highest}) send it elsewhere"
        );
        if lowest == highest {
            checked_strictly += 1;
        }
    }
    assert!(
        checked_strictly > published.len() / 2,
        "most events fall between reloads, where only one version applies ({checked_strictly} of {})",
        published.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_source_reconnects_alone() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("reload-source");
    let topic = unique("reload-source");
    let port = free_port();
    let client = unique("courier-reload-source");
    let config = |connection_name: &str| {
        test_defaults(&dir.path().join("store"))
            .rabbitmq(Rabbit::queue(&queue).connection_name(connection_name))
            .mqtt(mqtt_source(&client, &topic))
            .admin(port)
            .destination(Dest::new("d", &rx.url("/d")))
    };
    let publisher = Publisher::connect().await;
    publisher.declare_queue(&queue).await;
    let first = unique("first");
    let (mut courier, path) = start(&config(&first), dir.path());
    wait_ready(port).await;
    let mqtt = subscribed_publisher(&topic, &rx).await;
    let second = unique("second");
    rewrite(&path, &config(&second).toml());
    wait_reloads(port, "applied", 1).await;
    eventually("RabbitMQ reconnected under its new name", WAIT, || {
        let names = rabbitmqctl(&[
            "list_connections",
            "-q",
            "--no-table-headers",
            "client_properties",
        ]);
        names.contains(&second) && !names.contains(&first)
    })
    .await;
    publish_events(&publisher, &queue, "S", 0..5).await;
    for i in 0..5 {
        mqtt.publish(&topic, event(&format!("T{i}"), "t").into_bytes())
            .await;
    }
    eventually("both sources deliver after the reload", WAIT, || {
        let counts = rx.delivered_counts();
        (0..5)
            .all(|i| counts.contains_key(&format!("S{i}")) && counts.contains_key(&format!("T{i}")))
    })
    .await;
    assert!(courier.sigterm());
    courier.wait_exit(WAIT).await.expect("courier stops");
    let log = std::fs::read_to_string(courier.log()).unwrap();
    assert_eq!(
        log.matches("consuming from RabbitMQ").count(),
        2,
        "RabbitMQ reconnected once: {log}"
    );
    assert_eq!(
        log.matches("connected to the MQTT broker").count(),
        1,
        "MQTT was not reconnected: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_that_need_a_restart_and_invalid_files_change_nothing() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("reload-refused");
    let port = free_port();
    let config = |store: &str, path: &str| {
        rabbit_config(&queue, &dir.path().join(store))
            .admin(port)
            .destination(Dest::new("d", &rx.url(path)))
    };
    let publisher = Publisher::connect().await;
    publisher.declare_queue(&queue).await;
    let (mut courier, path) = start(&config("store", "/old"), dir.path());
    wait_ready(port).await;

    // A new store path, and a new destination URL in the same file: refused as a whole.
    rewrite(&path, &config("elsewhere", "/new").toml());
    wait_reloads(port, "refused", 1).await;
    // A file that does not load.
    rewrite(&path, "[rabbitmq\n");
    wait_reloads(port, "invalid", 1).await;
    // SIGHUP with the file unchanged (still invalid) is counted too.
    assert!(courier.sighup());
    wait_reloads(port, "invalid", 2).await;
    publish_events(&publisher, &queue, "X", 0..3).await;
    rx.wait_for(3, WAIT).await;
    assert!(
        rx.requests().iter().all(|r| r.path == "/old"),
        "the running configuration stayed in force"
    );
    // The file is valid again, unchanged from the start: SIGHUP reloads it anyway.
    rewrite(&path, &config("store", "/old").toml());
    wait_reloads(port, "applied", 1).await;
    assert!(courier.sighup());
    wait_reloads(port, "applied", 2).await;
    assert!(courier.sigterm());
    courier.wait_exit(WAIT).await.expect("courier stops");
    let log = std::fs::read_to_string(courier.log()).unwrap();
    assert!(
        log.contains("store.path cannot change without a restart"),
        "{log}"
    );
    assert!(
        log.contains("rabbitmq.url") || log.contains("TOML parse error"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_destination_keeps_its_retries_until_it_comes_back_and_in_flight_requests_finish()
{
    let _brokers = brokers().await;
    let steady = Receiver::start().await;
    let flaky = Receiver::start().await;
    flaky.set_status(503);
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("reload-removed");
    let port = free_port();
    let quick = Retry::every(20, Duration::from_millis(200));
    let base = || {
        rabbit_config(&queue, &dir.path().join("store"))
            .admin(port)
            .destination(Dest::new("steady", &steady.url("/s")))
    };
    let with_flaky = base().destination(Dest::new("flaky", &flaky.url("/f")).retry(quick.clone()));
    let publisher = Publisher::connect().await;
    publisher.declare_queue(&queue).await;
    let (mut courier, path) = start(&with_flaky, dir.path());
    wait_ready(port).await;
    publish_events(&publisher, &queue, "K", 0..3).await;
    eventually("flaky failed every event once", WAIT, || {
        ["K0", "K1", "K2"]
            .iter()
            .all(|id| flaky.arrivals().iter().any(|a| a == id))
    })
    .await;

    // Removed: no request reaches it any more, and its retries are still listed.
    rewrite(&path, &base().toml());
    wait_reloads(port, "applied", 1).await;
    let seen = flaky.arrivals().len();
    let (_, metrics) = http_get(&format!("http://127.0.0.1:{port}/metrics")).await;
    assert!(
        metrics.contains("courier_retries_pending_by_destination{destination=\"flaky\"} 3"),
        "{metrics}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        flaky.arrivals().len(),
        seen,
        "a removed destination gets no request"
    );

    // Back, and answering: its retries are delivered.
    flaky.set_status(200);
    rewrite(&path, &with_flaky.toml());
    wait_reloads(port, "applied", 2).await;
    eventually(
        "the retries of the returned destination are delivered",
        WAIT,
        || {
            let counts = flaky.delivered_counts();
            ["K0", "K1", "K2"]
                .iter()
                .all(|id| counts.get(*id) == Some(&1))
        },
    )
    .await;

    // A request under way when its destination changes finishes on the old settings.
    steady.hold();
    publish_events(&publisher, &queue, "H", 0..1).await;
    steady.wait_arrival("H0", WAIT).await;
    let moved = rabbit_config(&queue, &dir.path().join("store"))
        .admin(port)
        .destination(Dest::new("steady", &steady.url("/s2")))
        .destination(Dest::new("flaky", &flaky.url("/f")).retry(quick));
    rewrite(&path, &moved.toml());
    wait_reloads(port, "applied", 3).await;
    steady.release();
    publish_events(&publisher, &queue, "N", 0..1).await;
    steady.wait_for_id("N0", WAIT).await;
    let paths: HashMap<String, String> = steady
        .requests()
        .into_iter()
        .map(|r| (r.id(), r.path))
        .collect();
    assert_eq!(
        paths["H0"], "/s",
        "the held request went out on the old URL"
    );
    assert_eq!(paths["N0"], "/s2", "the next event takes the new URL");
    assert!(courier.sigterm());
    courier.wait_exit(WAIT).await.expect("courier stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_moves_to_mqtt5_on_a_reload_and_keeps_its_session() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("reload-v5");
    let port = free_port();
    let client = unique("courier-reload-v5");
    let config = |protocol| {
        test_defaults(&dir.path().join("store"))
            .mqtt(mqtt_source_as(&client, &topic, protocol))
            .admin(port)
            .destination(Dest::new("d", &rx.url("/d")))
    };
    let (mut courier, path) = start(&config(MqttProtocol::V3), dir.path());
    wait_ready(port).await;
    let mqtt = subscribed_publisher(&topic, &rx).await;
    rewrite(&path, &config(MqttProtocol::V5).toml());
    // Published while the source reconnects: the session (same client id) keeps them.
    for i in 0..5 {
        mqtt.publish(&topic, event(&format!("K{i}"), "t").into_bytes())
            .await;
    }
    wait_reloads(port, "applied", 1).await;
    let mqtt5 = Mqtt5Publisher::connect().await;
    mqtt5
        .publish(
            &topic,
            event("P5", "t"),
            rumqttc::v5::mqttbytes::v5::PublishProperties {
                user_properties: vec![("x-from".into(), "mqtt5".into())],
                ..Default::default()
            },
        )
        .await;
    let r = rx.wait_for_id("P5", WAIT).await;
    assert_eq!(
        r.header("x-from"),
        Some("mqtt5"),
        "the reloaded source speaks MQTT 5"
    );
    eventually(
        "the events published during the reload arrive",
        WAIT,
        || {
            let counts = rx.delivered_counts();
            (0..5).all(|i| counts.contains_key(&format!("K{i}")))
        },
    )
    .await;
    assert!(courier.sigterm());
    courier.wait_exit(WAIT).await.expect("courier stops");
    let log = std::fs::read_to_string(courier.log()).unwrap();
    assert_eq!(
        log.matches("connected to the MQTT broker").count(),
        2,
        "connected once per protocol: {log}"
    );
}

/// While courier waits at start for the Redis of its dedup record, a SIGHUP does not stop it, and
/// a file changed meanwhile is in force once the start is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_and_a_sighup_while_courier_waits_to_start_are_taken_once_it_has() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (queue, _store, publisher) = setup("reload-start").await;
    let redis_port = free_port();
    let port = free_port();
    let prefix = format!("{}:", unique("reload-start"));
    let config = |path: &str| {
        rabbit_config(&queue, &dir.path().join("store"))
            .admin(port)
            .redis_dedup(&format!("redis://127.0.0.1:{redis_port}"), &prefix)
            .destination(Dest::new("d", &rx.url(path)))
    };
    let (mut courier, file) = start(&config("/before"), dir.path());
    wait_not_ready(port, "store: cannot reach Redis: ").await;
    rewrite(&file, &config("/after").toml());
    assert!(courier.sighup());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        courier.wait_exit(Duration::from_millis(10)).await.is_none(),
        "a SIGHUP during the start stopped courier"
    );
    let redis_dir = tempfile::tempdir().unwrap();
    let redis_port_text = redis_port.to_string();
    let mut redis = courier_testkit::servers::start(
        "redis-server",
        &[
            "--bind",
            "127.0.0.1",
            "--port",
            &redis_port_text,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &redis_dir.path().to_string_lossy(),
        ],
        &redis_dir.path().join("redis.log"),
        "redis-server",
    );
    wait_ready(port).await;
    wait_reloads(port, "applied", 1).await;
    publisher
        .to_queue(&queue, event("S1", "t").as_bytes())
        .await;
    rx.wait_for_id("S1", WAIT).await;
    let paths: Vec<String> = rx.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        ["/after"],
        "the file changed during the start is in force"
    );
    courier.stop(Duration::from_secs(10)).await;
    courier_testkit::servers::stop(&mut redis);
}

/// A replay of many letters can outlast a reload; each letter goes where the configuration in
/// force at its turn says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_outlasts_a_reload_sends_each_letter_by_the_config_of_its_turn() {
    let _brokers = brokers().await;
    let old = Receiver::start().await;
    let new = Receiver::start().await;
    old.set_status(400);
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("reload-replay");
    let port = free_port();
    let with = |rx: &Receiver| {
        rabbit_config(&queue, &dir.path().join("store"))
            .admin(port)
            .destination(Dest::new("r", &rx.url("/r")))
    };
    let publisher = Publisher::connect().await;
    publisher.declare_queue(&queue).await;
    let (_courier, path) = start(&with(&old), dir.path());
    wait_ready(port).await;
    publish_events(&publisher, &queue, "RR", 0..4).await;
    eventually("four dead letters", WAIT, || old.arrivals().len() == 4).await;

    // The replay's first POST waits at the old URL while the file changes the destination's URL.
    old.set_status(200);
    old.hold();
    let replay = tokio::spawn(async move {
        let response = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/dead-letters/replay"))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    });
    eventually(
        "the first replayed letter reached the old URL",
        WAIT,
        || old.arrivals().len() == 5,
    )
    .await;
    rewrite(&path, &with(&new).toml());
    wait_reloads(port, "applied", 1).await;
    old.release();
    let (status, body) = replay.await.unwrap();
    assert_eq!(status, 200, "{body}");
    let results: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert!(
        results.iter().all(|r| r["outcome"] == "delivered"),
        "{body}"
    );
    let delivered_old: Vec<String> = old
        .requests()
        .into_iter()
        .filter(|r| r.status == 200)
        .map(|r| r.id())
        .collect();
    assert_eq!(delivered_old.len(), 1, "only the first, before the reload");
    let mut all = new.arrivals();
    assert_eq!(all.len(), 3, "the rest, after it: {all:?}");
    all.extend(delivered_old);
    all.sort();
    assert_eq!(all, ["RR0", "RR1", "RR2", "RR3"]);
}

/// A reload that cannot load yet (it names a CA file another volume brings later) is tried
/// again without the file changing, and applies once the CA file is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_failed_is_tried_again_until_it_applies() {
    let _brokers = brokers().await;
    let first = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("reload-retry");
    let port = free_port();
    let base = || {
        rabbit_config(&queue, &dir.path().join("store"))
            .admin(port)
            .destination(Dest::new("first", &first.url("/f")))
    };
    let publisher = Publisher::connect().await;
    publisher.declare_queue(&queue).await;
    let (_courier, path) = start(&base(), dir.path());
    wait_ready(port).await;

    let ca = courier_testkit::pki::TestCa::new("later-ca");
    let ca_path = dir.path().join("later-ca.pem");
    let with_tls = base().destination(
        Dest::new("second", "https://127.0.0.1:9/s").tls(Tls::default().ca_file(&ca_path)),
    );
    rewrite(&path, &with_tls.toml());
    wait_reloads(port, "invalid", 1).await;
    // The CA file arrives; the configuration file does not change again.
    ca.write(dir.path(), "later-ca.pem");
    wait_reloads(port, "applied", 1).await;
    let (_, metrics) = http_get(&format!("http://127.0.0.1:{port}/metrics")).await;
    assert!(
        metrics.contains("destination=\"second\""),
        "the new destination is in force: {metrics}"
    );
}
