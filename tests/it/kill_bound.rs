//! The duplicate bound after `kill -9` (docs/reliability.md#what-a-duplicate-is): courier killed
//! in the middle of a stream, a few times in a row, and started again at once on the same store
//! and session. Over RabbitMQ a kill repeats at most `max_in_flight` POSTs; over MQTT at most
//! twice that. `courier-bench --only kill-bound` runs 20 kills per source.

use std::path::Path;
use std::time::Duration;

use crate::support::*;

const MAX_IN_FLIGHT: usize = 16;
const KILLS: usize = 3;
const ROUND: usize = 400;
const WAIT: Duration = Duration::from_secs(30);

/// Kills the courier of `config` once half of each round has arrived, `KILLS` times; `publish`
/// sends round `k`'s events (ids `k<k>-<i>`). Returns the most events POSTed twice after one
/// kill.
async fn worst_of_kills<F, Fut>(
    config: &ConfigBuilder,
    dir: &Path,
    rx: &Receiver,
    publish: F,
) -> usize
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut courier = Some(spawn(config, dir));
    let mut worst = 0;
    for k in 0..KILLS {
        let prefix = format!("k{k}-");
        let kill_and_restart = async {
            eventually("half of the round delivered", WAIT, || {
                rx.delivered_with_prefix(&prefix) >= ROUND / 2
            })
            .await;
            if let Some(running) = courier.take() {
                let _ = running.kill9();
            }
            courier = Some(spawn(config, dir));
            eventually("the whole round delivered", Duration::from_secs(60), || {
                rx.delivered_with_prefix(&prefix) == ROUND
            })
            .await;
        };
        tokio::join!(publish(k), kill_and_restart);
        // The second POSTs of redelivered messages come with the first ones after the restart.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let twice = rx.delivered_twice_with_prefix(&prefix);
        println!("kill {k}: {ROUND} sent, {ROUND} received, {twice} POSTed twice");
        worst = worst.max(twice);
    }
    if let Some(running) = courier.take() {
        running.stop(Duration::from_secs(10)).await;
    }
    worst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_kill_9_repeats_at_most_max_in_flight() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("kill-bound");
    let publisher = Publisher::connect().await;
    publisher.fresh_queue(&queue).await;
    let config = rabbit_config(&queue, &dir.path().join("store"))
        .max_in_flight(MAX_IN_FLIGHT)
        .destination(Dest::new("d", &rx.url("/d")));
    let worst = worst_of_kills(&config, dir.path(), &rx, |k| {
        let (publisher, queue) = (&publisher, &queue);
        async move {
            let prefix = format!("k{k}-");
            let bodies = ids(&prefix, 0..ROUND).map(|id| event(&id, "t").into_bytes());
            publisher.fill(queue, bodies, 200).await;
        }
    })
    .await;
    publisher.delete_queue(&queue).await;
    assert!(
        worst <= MAX_IN_FLIGHT,
        "{worst} events POSTed twice after one kill, above max_in_flight ({MAX_IN_FLIGHT})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_kill_9_repeats_at_most_twice_max_in_flight() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (topic, config) = mqtt_to_receiver(&rx, "kill-bound", &dir.path().join("store"));
    let config = config.max_in_flight(MAX_IN_FLIGHT);
    // The first courier subscribes; the session keeps the subscription across the kills.
    let first = spawn(&config, dir.path());
    let publisher = subscribed_publisher(&topic, &rx).await;
    first.stop(Duration::from_secs(10)).await;
    let worst = worst_of_kills(&config, dir.path(), &rx, |k| {
        let (publisher, topic, rx) = (&publisher, &topic, &rx);
        async move {
            let prefix = format!("k{k}-");
            let bodies = ids(&prefix, 0..ROUND).map(|id| event(&id, "t").into_bytes());
            // Paced, so Mosquitto (1,000 queued messages at most) drops nothing while courier
            // is down.
            let consumed = || rx.delivered_with_prefix(&prefix);
            publisher
                .publish_paced(topic, bodies, 0, consumed)
                .await
                .expect("the stream went on");
            publisher.wait_acked().await;
        }
    })
    .await;
    assert!(
        worst <= 2 * MAX_IN_FLIGHT,
        "{worst} events POSTed twice after one kill, above 2 x max_in_flight ({})",
        2 * MAX_IN_FLIGHT
    );
}
