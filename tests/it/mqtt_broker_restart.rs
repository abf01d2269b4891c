//! Mosquitto itself is stopped and started again mid-stream. This restarts the machine's broker,
//! so the test holds the brokers exclusively.

use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_broker_restarts_and_loses_nothing() {
    let _brokers = brokers_exclusive().await;
    let rx = Receiver::start().await;
    rx.set_delay(Duration::from_millis(5));
    let store = tempfile::tempdir().unwrap();
    let (topic, config) = mqtt_to_receiver(&rx, "restart", store.path());
    let courier = Courier::start(&config);
    let publisher = subscribed_publisher(&topic, &rx).await;
    const N: usize = 300;
    for i in 0..N / 2 {
        publisher
            .publish(&topic, format!(r#"{{"id":"r{i}","data":{{}}}}"#))
            .await;
    }
    publisher.wait_acked().await;
    drop(publisher);

    tokio::task::spawn_blocking(|| restart_mosquitto("TERM", Duration::from_secs(1)))
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
        || rx.delivered_with_prefix("r") == N,
    )
    .await;
    let stats = courier.stop().await;
    let twice = rx.delivered_twice_with_prefix("r");
    println!(
        "broker restart: {N} sent, {N} received, 0 lost, {twice} POSTed twice, {} redelivered and skipped by dedup",
        stats.duplicates.load(std::sync::atomic::Ordering::SeqCst)
    );
    assert_eq!(
        twice, 0,
        "an orderly broker restart must not cause a second 2xx"
    );
}
