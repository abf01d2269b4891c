//! How much of its throughput a destination keeps while another one waits for the tokens of its
//! rate limit, over RabbitMQ and over MQTT.
//!
//!     cargo run --release --example rate_bench -- [seconds=20] [rate=100] [max_wait_ms=1000]
//!
//! Needs RabbitMQ on 127.0.0.1:5672 (guest/guest) and Mosquitto on 127.0.0.1:1883. Events
//! alternate between two topics: `fast` goes to `free` and `slow` to `limited`, both HTTP
//! servers that answer 200 at once. Phase A: neither has a rate limit. Phase B: `limited` has
//! `rate_limit = { requests = <rate>, per = "1s", burst = 1 }` and `circuit.max_wait =
//! <max_wait_ms>`, so its events wait for a token up to `max_wait` and most are parked. Each phase counts, after a 3 s warm-up,
//! free's and limited's deliveries a second at the receivers. The figure is free's rate in B
//! over its rate in A; the target is at least 0.80 (as for clog_bench).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier_testkit::{
    Circuit, ConfigBuilder, Dest, Mqtt, MqttPublisher, MqttPublisherOptions, Publisher, Rabbit,
    Receiver, Recording, Source,
};

/// The `i`-th event: even ones go to `fast`, odd ones to `slow`, each about 450 bytes.
fn body(i: u64, pad: &str) -> Vec<u8> {
    let topic = if i % 2 == 0 { "fast" } else { "slow" };
    format!(r#"{{"id":"e{i}","topic":"{topic}","data":{{"pad":"{pad}"}}}}"#).into_bytes()
}

/// Keeps `queue` filled with at least 20,000 ready messages until `stop`.
async fn keep_queue_filled(queue: String, stop: Arc<AtomicBool>) {
    let publisher = Publisher::connect().await;
    let pad = "x".repeat(400);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if publisher.declare_queue(&queue).await >= 20_000 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        publisher
            .fill(&queue, (n..n + 1000).map(|i| body(i, &pad)), 1000)
            .await;
        n += 1000;
    }
}

/// Publishes to `topic` until `stop`, never more than the publisher's pace-ahead in front of
/// what courier has received (Mosquitto drops messages past its per-client queue of 1,000).
async fn keep_topic_fed(topic: String, stop: Arc<AtomicBool>, stats: Arc<courier::Stats>) {
    let publisher = MqttPublisher::connect_with(MqttPublisherOptions::default()).await;
    let pad = "x".repeat(400);
    let bodies = (0u64..)
        .take_while(|_| !stop.load(Ordering::Relaxed))
        .map(|i| body(i, &pad));
    let received = || stats.received.load(Ordering::Relaxed) as usize;
    if let Err(e) = publisher.publish_paced(&topic, bodies, 0, received).await {
        eprintln!("MQTT publisher stopped: {e}");
    }
}

/// One phase: courier with `free` and `limited` (at `rate` a second when given); returns free's
/// and limited's rates over `seconds` after a 3 s warm-up, and the events parked for the rate.
async fn phase(
    source: Source,
    name: &str,
    rate: Option<(u32, Duration)>,
    seconds: u64,
) -> (f64, f64, u64) {
    let free = Receiver::start_with(Recording::Counts).await;
    let limited = Receiver::start_with(Recording::Counts).await;
    let store = tempfile::tempdir().expect("tempdir");
    let tag = format!("rate-bench-{name}-{}", std::process::id());
    let mut slow = Dest::new("limited", &limited.url("/slow")).topics(["slow"]);
    if let Some((rate, max_wait)) = rate {
        slow = slow
            .rate_limit(rate, Duration::from_secs(1), 1)
            .circuit(Circuit::default().max_wait(max_wait));
    }
    let mut config = ConfigBuilder::new(store.path())
        .shutdown_timeout(Duration::from_secs(2))
        .destination(Dest::new("free", &free.url("/fast")).topics(["fast"]))
        .destination(slow);
    config = match source {
        Source::Rabbitmq => config.rabbitmq(Rabbit::queue(&tag)),
        Source::Mqtt => config.mqtt(Mqtt::new(&tag, &tag).keep_alive(Duration::from_secs(10))),
    };
    let config = courier::Config::from_toml(&config.toml()).expect("config");
    let stop = Arc::new(AtomicBool::new(false));
    let shutdown = courier::Shutdown::new();
    let stats = Arc::new(courier::Stats::default());
    let (publisher, worker) = match source {
        Source::Rabbitmq => {
            Publisher::connect().await.fresh_queue(&tag).await;
            let publisher = tokio::spawn(keep_queue_filled(tag.clone(), stop.clone()));
            tokio::time::sleep(Duration::from_secs(2)).await;
            let worker = tokio::spawn(courier::run_with_stats(
                config,
                shutdown.clone(),
                stats.clone(),
            ));
            (publisher, worker)
        }
        Source::Mqtt => {
            let worker = tokio::spawn(courier::run_with_stats(
                config,
                shutdown.clone(),
                stats.clone(),
            ));
            // Let courier subscribe before anything is published.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let publisher = tokio::spawn(keep_topic_fed(tag.clone(), stop.clone(), stats.clone()));
            (publisher, worker)
        }
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (free0, limited0) = (free.unique("/fast"), limited.unique("/slow"));
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let elapsed = start.elapsed().as_secs_f64();
    let free_rate = (free.unique("/fast") - free0) as f64 / elapsed;
    let limited_rate = (limited.unique("/slow") - limited0) as f64 / elapsed;
    let parked = stats.parked_for_rate.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let _ = publisher.await;
    shutdown.request();
    let _ = worker.await;
    if source == Source::Rabbitmq {
        Publisher::connect().await.delete_queue(&tag).await;
    }
    (free_rate, limited_rate, parked)
}

#[tokio::main]
async fn main() {
    courier::install_crypto_provider();
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let rate: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let max_wait = Duration::from_millis(args.next().and_then(|a| a.parse().ok()).unwrap_or(1000));
    for source in [Source::Rabbitmq, Source::Mqtt] {
        let s = source.name();
        let (free_a, limited_a, _) = phase(source, "open", None, seconds).await;
        println!(
            "{s} phase A, no rate limit:      free {free_a:.0} events/s, limited {limited_a:.0} events/s over {seconds} s"
        );
        let (free_b, limited_b, parked) =
            phase(source, "limited", Some((rate, max_wait)), seconds).await;
        println!(
            "{s} phase B, limited at {rate}/s, max_wait {max_wait:?}: free {free_b:.0} events/s, limited {limited_b:.1} events/s over {seconds} s ({parked} events parked for the rate limit)"
        );
        let ratio = free_b / free_a;
        println!(
            "{s} free's ratio (B / A): {ratio:.2}  target >= 0.80  {}",
            if ratio >= 0.8 { "MET" } else { "MISSED" }
        );
    }
}
