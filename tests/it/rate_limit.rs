//! Per-destination rate limits (`rate_limit`) over the real RabbitMQ and Mosquitto: the limited
//! destination receives its rate, the other one is not held back, nothing is lost, and a 429
//! with `Retry-After` pauses the destination.
//!
//! The one timing these tests assert is the rate window the rate limit is about: 20 requests a
//! second, counted at the receiver over 10 s, must be 200 ± 10 %. The window opens 2 s after the
//! limited destination's first request (its burst and the pipeline's start are behind it by
//! then) and the backlog lasts beyond it, so the bucket is never idle inside it. The bucket
//! schedules tokens at absolute times: a request that a loaded machine sends late does not push
//! the later ones back, so the count inside the window moves by one or two at its edges, not by
//! the machine's load. The 10 % (20 requests, one second of the rate) is there for a pass of the
//! retry scheduler that a busy 2-core machine delays by up to a second.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(60);
/// The limited destination's rate, and the window it is counted over.
const RATE: u32 = 20;
const WINDOW: Duration = Duration::from_secs(10);
const WARM_UP: Duration = Duration::from_secs(2);
/// Events per destination: 15 s of the limited one's rate, so its backlog outlasts the window.
const EVENTS: usize = 300;

/// `limited` takes topic `slow` at [`RATE`] a second (burst 1); `free` takes `fast`, unlimited.
fn two_destinations(config: ConfigBuilder, rx: &Receiver) -> ConfigBuilder {
    config.destinations([
        Dest::new("limited", &rx.url("/limited"))
            .topics(["slow"])
            .rate_limit(RATE, Duration::from_secs(1), 1),
        Dest::new("free", &rx.url("/free")).topics(["fast"]),
    ])
}

/// `s<i>` on `slow` and `f<i>` on `fast`, alternating.
fn alternating() -> impl Iterator<Item = String> {
    (0..EVENTS).flat_map(|i| {
        [
            event(&format!("s{i}"), "slow"),
            event(&format!("f{i}"), "fast"),
        ]
    })
}

/// Checks what the receiver saw: the limited rate inside the window, the free destination not
/// held back, every event delivered exactly once.
async fn assert_rates(rx: &Receiver, courier: &Courier, source: &str) {
    eventually("every event delivered", WAIT, || {
        rx.delivered_with_prefix("s") == EVENTS && rx.delivered_with_prefix("f") == EVENTS
    })
    .await;
    let arrivals = rx.timed_arrivals();
    let slow: Vec<Instant> = arrivals
        .iter()
        .filter(|(id, _)| id.starts_with('s'))
        .map(|(_, t)| *t)
        .collect();
    let last_fast = arrivals
        .iter()
        .filter(|(id, _)| id.starts_with('f'))
        .map(|(_, t)| *t)
        .max()
        .expect("fast events arrived");
    let from = slow[0] + WARM_UP;
    let to = from + WINDOW;
    let in_window = slow.iter().filter(|t| **t >= from && **t < to).count();
    let fast_took = last_fast - slow[0];
    println!(
        "{source}: limited received {in_window} requests in {WINDOW:?} (want {} ± 10 %); free \
         received all {EVENTS} events {fast_took:.1?} after limited's first request; {} parked \
         for the rate limit",
        RATE as u64 * WINDOW.as_secs(),
        courier.count(|s| &s.parked_for_rate)
    );
    let want = (RATE as f64 * WINDOW.as_secs_f64()) as usize;
    assert!(
        in_window * 10 >= want * 9 && in_window * 10 <= want * 11,
        "{source}: {in_window} requests to the limited destination in {WINDOW:?}, want {want} ± 10 %"
    );
    // The free destination is not paced by the limited one: its events, published between the
    // limited ones, all arrived before the limited destination had half of its own.
    let half = slow[EVENTS / 2 - 1];
    assert!(
        last_fast < half,
        "{source}: the free destination's last event came {:?} after the limited one had half of \
         its events: it was held back",
        last_fast - half
    );
    let counts: HashMap<String, usize> = rx.delivered_counts();
    assert!(
        counts.values().all(|n| *n == 1),
        "{source}: some event was delivered twice"
    );
    assert!(
        courier.count(|s| &s.parked_for_rate) > 0,
        "{source}: the backlog went through the parking path"
    );
    assert_eq!(courier.count(|s| &s.failed), 0, "waiting is not a failure");
    let waited = courier
        .stats
        .rate_limit_wait
        .get_or_create(&courier::stats::DestinationLabel {
            destination: "limited".into(),
        })
        .get();
    assert!(waited > 0.0, "{source}: tokens waited for are counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_limited_destination_gets_its_rate_and_holds_back_no_other() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let queue = unique("rate");
    let store = tempfile::tempdir().unwrap();
    let publisher = Publisher::connect().await;
    publisher.declare_queue(&queue).await;
    let bodies: Vec<Vec<u8>> = alternating().map(String::into_bytes).collect();
    publisher.fill(&queue, bodies, 100).await;
    let courier = Courier::start(&two_destinations(rabbit_config(&queue, store.path()), &rx));
    assert_rates(&rx, &courier, "RabbitMQ").await;
    wait_drained(&queue, "every message acked", WAIT).await;
    courier.stop().await;
    assert_eq!(open_store(store.path()).pending_retries(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_limited_destination_gets_its_rate_and_holds_back_no_other() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let topic = unique("rate");
    let store = tempfile::tempdir().unwrap();
    let config = two_destinations(
        mqtt_config(&topic, &unique("courier-rate"), store.path()),
        &rx,
    );
    let courier = Courier::start(&config);
    let publisher = MqttPublisher::connect().await;
    // The probes go to the MQTT topic, which no destination takes: wait for courier to count one.
    let subscribed = publisher
        .probe_until(
            &topic,
            Duration::from_millis(200),
            Duration::from_secs(20),
            || courier.count(|s| &s.received) > 0,
        )
        .await;
    assert!(subscribed, "courier never subscribed to {topic}");
    // 600 messages: within Mosquitto's default queue of 1,000 per client.
    for body in alternating() {
        publisher.publish(&topic, body).await;
    }
    publisher.wait_acked().await;
    assert_rates(&rx, &courier, "MQTT").await;
    courier.stop().await;
    assert_eq!(open_store(store.path()).pending_retries(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_on_a_429_pauses_the_destination() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    rx.fail_next(1, 429);
    rx.set_retry_after(2);
    let queue = unique("rate-429");
    let store = tempfile::tempdir().unwrap();
    let publisher = Publisher::connect().await;
    publisher.declare_queue(&queue).await;
    let courier = Courier::start(
        &rabbit_config(&queue, store.path()).destination(
            Dest::new("paced", &rx.url("/paced"))
                .rate_limit(50, Duration::from_secs(1), 1)
                .retry(Retry::backoff(
                    4,
                    Duration::from_millis(100),
                    2.0,
                    Duration::from_secs(10),
                )),
        ),
    );
    publisher
        .to_queue(&queue, event("first", "t").as_bytes())
        .await;
    courier.wait_count(1, WAIT, |s| &s.retries_scheduled).await;
    let answered = rx.arrival_times("first")[0];
    // Ten more while the destination is paused: they wait (or are parked), never sent early.
    publish_events(&publisher, &queue, "p", 0..10).await;
    eventually("all eleven delivered", WAIT, || {
        rx.delivered_counts().len() == 11
    })
    .await;
    courier.stop().await;
    let next = rx
        .timed_arrivals()
        .iter()
        .map(|(_, t)| *t)
        .filter(|t| *t > answered)
        .min()
        .expect("requests after the 429");
    println!(
        "after the 429 with Retry-After: 2, the next request came {:?} later",
        next - answered
    );
    assert!(
        next - answered >= Duration::from_secs(2),
        "a request {:?} after the 429 that asked for 2 s",
        next - answered
    );
    assert_eq!(courier_delivered_once(&rx), 11);
}

/// How many ids were delivered exactly once (none twice).
fn courier_delivered_once(rx: &Receiver) -> usize {
    let counts = rx.delivered_counts();
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
    counts.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_429_halves_the_rate() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    rx.fail_next(1, 429);
    let queue = unique("rate-aimd");
    let store = tempfile::tempdir().unwrap();
    let publisher = Publisher::connect().await;
    publisher.declare_queue(&queue).await;
    let port = free_port();
    let courier = Courier::start(
        &rabbit_config(&queue, store.path()).admin(port).destination(
            Dest::new("aimd", &rx.url("/aimd")).rate_limit(40, Duration::from_secs(10), 1),
        ),
    );
    publisher.to_queue(&queue, event("x", "t").as_bytes()).await;
    courier.wait_count(1, WAIT, |s| &s.retries_scheduled).await;
    let metrics = reqwest_get(&format!("http://127.0.0.1:{port}/metrics")).await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("courier_rate_limit_requests_per_second{"))
        .unwrap_or_else(|| panic!("no rate gauge in {metrics}"));
    courier.stop().await;
    // 40 per 10 s is 4 a second; halved, 2.
    assert!(line.ends_with(" 2.0") || line.ends_with(" 2"), "{line}");
}

async fn reqwest_get(url: &str) -> String {
    reqwest::get(url)
        .await
        .and_then(|r| r.error_for_status())
        .expect("GET")
        .text()
        .await
        .expect("body")
}
