//! How much of its throughput a healthy destination keeps while another one never answers.
//!
//!     cargo run --release --example clog_bench -- [hang_seconds=60] [baseline_seconds=20]
//!
//! Needs RabbitMQ on 127.0.0.1:5672 (guest/guest). Every event fans out to two destinations:
//! `good` (answers 200 at once) and `other`. Phase A: `other` is healthy too. Phase B: `other`
//! accepts connections and never answers (60 s request timeout). The figure is good's delivery
//! rate in B over its rate in A; the target is at least 0.80.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use courier_testkit::{BlackHole, ConfigBuilder, Dest, Publisher, Rabbit, Receiver, Recording};

/// Keeps `queue` filled with at least `low` ready messages until `stop`.
async fn keep_filled(queue: String, stop: Arc<AtomicBool>, low: u32) {
    let publisher = Publisher::connect().await;
    let pad = "x".repeat(400);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if publisher.declare_queue(&queue).await >= low {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let bodies = (n..n + 1000).map(|i| {
            format!(r#"{{"id":"e{i}","topic":"t","data":{{"pad":"{pad}"}}}}"#).into_bytes()
        });
        publisher.fill(&queue, bodies, 1000).await;
        n += 1000;
    }
}

/// Runs courier on a fresh queue with destinations good + `other_url`; returns good's rate over
/// `seconds` after a 3 s warm-up, and courier's parked count.
async fn phase(name: &str, other_url: &str, seconds: u64) -> (f64, u64) {
    let good = Receiver::start_with(Recording::Counts).await;
    let store = tempfile::tempdir().expect("tempdir");
    let queue = format!("clog-bench-{name}-{}", std::process::id());
    let text = ConfigBuilder::new(store.path())
        .shutdown_timeout(Duration::from_secs(2))
        .rabbitmq(Rabbit::queue(&queue))
        .destination(Dest::new("good", &good.url("/events")))
        .destination(Dest::new("other", other_url).timeout(Duration::from_secs(60)))
        .toml();
    let config = courier::Config::from_toml(&text).expect("config");
    Publisher::connect().await.fresh_queue(&queue).await;
    let stop_publishing = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn(keep_filled(queue.clone(), stop_publishing.clone(), 20_000));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let shutdown = courier::Shutdown::new();
    let stats = Arc::new(courier::Stats::default());
    let worker = tokio::spawn(courier::run_with_stats(
        config,
        shutdown.clone(),
        stats.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let start_count = good.unique("/events");
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let delivered = good.unique("/events") - start_count;
    let rate = delivered as f64 / start.elapsed().as_secs_f64();
    let parked = stats.parked.load(Ordering::Relaxed);
    shutdown.request();
    let _ = worker.await;
    stop_publishing.store(true, Ordering::Relaxed);
    let _ = publisher.await;
    // Leave no benchmark queue behind.
    Publisher::connect().await.delete_queue(&queue).await;
    (rate, parked)
}

#[tokio::main]
async fn main() {
    courier::install_crypto_provider();
    let mut args = std::env::args().skip(1);
    let hang: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(60);
    let baseline: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let healthy = Receiver::start_with(Recording::Counts).await;
    let (base_rate, _) = phase("healthy", &healthy.url("/events"), baseline).await;
    println!("phase A, both destinations healthy: good receives {base_rate:.0} events/s over {baseline} s");
    let hole = BlackHole::start().await;
    let (hang_rate, parked) = phase("hanging", &hole.url("/events"), hang).await;
    println!("phase B, other never answers:        good receives {hang_rate:.0} events/s over {hang} s ({parked} events parked for other)");
    let ratio = hang_rate / base_rate;
    println!(
        "clogging ratio (B / A): {ratio:.2}  target >= 0.80  {}",
        if ratio >= 0.8 { "MET" } else { "MISSED" }
    );
}
