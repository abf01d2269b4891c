//! Mosquitto itself is stopped and started again mid-stream. This restarts the machine's broker,
//! so it lives in a test binary of its own (cargo runs test binaries one after another).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn mosquitto_port_open() -> bool {
    std::net::TcpStream::connect_timeout(
        &"127.0.0.1:1883".parse().expect("addr"),
        Duration::from_millis(200),
    )
    .is_ok()
}

fn wait_port(open: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while mosquitto_port_open() != open {
        assert!(
            Instant::now() < deadline,
            "Mosquitto port never became open={open}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGTERM (Mosquitto saves its persistent sessions), then the same start command as
/// scripts/test.sh.
fn restart_mosquitto(down_for: Duration) {
    let path = format!(
        "{}:/usr/sbin:/sbin",
        std::env::var("PATH").unwrap_or_default()
    );
    let status = Command::new("pkill")
        .args(["-TERM", "-x", "mosquitto"])
        .status()
        .expect("pkill");
    assert!(status.success(), "no mosquitto process to stop");
    wait_port(false);
    std::thread::sleep(down_for);
    let status = Command::new("sh")
        .args([
            "-c",
            "mkdir -p /run/mosquitto && chown mosquitto /run/mosquitto; mosquitto -d -c /etc/mosquitto/mosquitto.conf",
        ])
        .env("PATH", path)
        .status()
        .expect("start mosquitto");
    assert!(status.success(), "mosquitto did not start again");
    wait_port(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_broker_restarts_and_loses_nothing() {
    let rx = Receiver::start().await;
    rx.set_delay(Duration::from_millis(5));
    let topic = unique("restart");
    let store = tempfile::tempdir().unwrap();
    let cfg = mqtt_config(
        &topic,
        &unique("courier-restart"),
        store.path(),
        "",
        &format!(
            "[[destinations]]\nname = \"d\"\nurl = \"{}\"\n",
            rx.url("/d")
        ),
    );
    let courier = Courier::start(cfg);
    let publisher = MqttPublisher::connect().await;
    wait_subscribed(&publisher, &topic, &rx).await;
    const N: usize = 300;
    for i in 0..N / 2 {
        publisher
            .publish(&topic, format!(r#"{{"id":"r{i}","data":{{}}}}"#))
            .await;
    }
    publisher.wait_acked().await;
    drop(publisher);

    tokio::task::spawn_blocking(|| restart_mosquitto(Duration::from_secs(1)))
        .await
        .expect("restart");
    // Published after the restart, possibly before courier is back: the persistent session
    // (saved by Mosquitto at shutdown) queues them.
    let publisher = MqttPublisher::connect().await;
    for i in N / 2..N {
        publisher
            .publish(&topic, format!(r#"{{"id":"r{i}","data":{{}}}}"#))
            .await;
    }
    publisher.wait_acked().await;
    eventually(
        "every event delivered across the broker restart",
        Duration::from_secs(60),
        || {
            rx.delivered_counts()
                .keys()
                .filter(|k| k.starts_with('r'))
                .count()
                == N
        },
    )
    .await;
    let stats = courier.stop().await;
    let twice = rx
        .delivered_counts()
        .iter()
        .filter(|(k, &c)| k.starts_with('r') && c > 1)
        .count();
    println!(
        "broker restart: {N} sent, {N} received, 0 lost, {twice} POSTed twice, {} redelivered and skipped by dedup",
        stats.duplicates.load(std::sync::atomic::Ordering::SeqCst)
    );
    assert_eq!(
        twice, 0,
        "an orderly broker restart must not cause a second 2xx"
    );
}
