//! How much of its throughput a healthy destination keeps while another one never answers.
//!
//!     cargo run --release --example clog_bench -- [hang_seconds=60] [baseline_seconds=20]
//!
//! Needs RabbitMQ on 127.0.0.1:5672 (guest/guest). Every event fans out to two destinations:
//! `good` (answers 200 at once) and `other`. Phase A: `other` is healthy too. Phase B: `other`
//! accepts connections and never answers (60 s request timeout). The figure is good's delivery
//! rate in B over its rate in A; the target is at least 0.80.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// An HTTP server answering 200 to everything, counting requests.
async fn counting_receiver() -> (String, Arc<AtomicU64>) {
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let app = axum::Router::new().fallback(move || {
        let c = c.clone();
        async move {
            c.fetch_add(1, Ordering::Relaxed);
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/events", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, count)
}

/// Accepts connections and never answers.
async fn black_hole() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/events", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    url
}

/// Keeps `queue` filled with at least `low` ready messages until `stop`.
async fn keep_filled(queue: String, stop: Arc<AtomicBool>, low: u32) {
    let conn = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .expect("publisher connects");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut n = 0u64;
    let body_pad = "x".repeat(400);
    while !stop.load(Ordering::Relaxed) {
        let q = ch
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare");
        if q.message_count() >= low {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let mut confirms = Vec::with_capacity(1000);
        for _ in 0..1000 {
            let body = format!(r#"{{"id":"e{n}","topic":"t","data":{{"pad":"{body_pad}"}}}}"#);
            n += 1;
            confirms.push(
                ch.basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish"),
            );
        }
        for c in confirms {
            c.await.expect("confirm");
        }
    }
}

/// Runs courier on a fresh queue with destinations good + `other_url`; returns good's rate over
/// `seconds` after a 3 s warm-up, and courier's parked count.
async fn phase(name: &str, other_url: &str, seconds: u64) -> (f64, u64) {
    let (good_url, good_count) = counting_receiver().await;
    let store = tempfile::tempdir().expect("tempdir");
    let queue = format!("clog-bench-{name}-{}", std::process::id());
    let text = format!(
        r#"
[service]
shutdown_timeout = "2s"
[store]
path = "{}"
[rabbitmq]
url = "{AMQP}"
queue = "{queue}"
[[destinations]]
name = "good"
url = "{good_url}"
[[destinations]]
name = "other"
url = "{other_url}"
timeout = "60s"
"#,
        store.path().display()
    );
    let config = courier::Config::from_toml(&text).expect("config");
    let stop_pub = Arc::new(AtomicBool::new(false));
    // Declare the queue before publishing.
    {
        let conn = Connection::connect(AMQP, ConnectionProperties::default())
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
        let _ = ch
            .queue_purge(queue.as_str().into(), Default::default())
            .await;
    }
    let publisher = tokio::spawn(keep_filled(queue.clone(), stop_pub.clone(), 20_000));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let shutdown = courier::Shutdown::new();
    let stats = Arc::new(courier::Stats::default());
    let worker = tokio::spawn(courier::run_with_stats(
        config,
        shutdown.clone(),
        stats.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let start_count = good_count.load(Ordering::Relaxed);
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let delivered = good_count.load(Ordering::Relaxed) - start_count;
    let rate = delivered as f64 / start.elapsed().as_secs_f64();
    let parked = stats.parked.load(Ordering::Relaxed);
    shutdown.request();
    let _ = worker.await;
    stop_pub.store(true, Ordering::Relaxed);
    let _ = publisher.await;
    // Leave no benchmark queue behind.
    if let Ok(conn) = Connection::connect(AMQP, ConnectionProperties::default()).await {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(queue.as_str().into(), Default::default())
                .await;
        }
    }
    (rate, parked)
}

#[tokio::main]
async fn main() {
    courier::install_crypto_provider();
    let mut args = std::env::args().skip(1);
    let hang: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(60);
    let baseline: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let (healthy_url, _) = counting_receiver().await;
    let (base_rate, _) = phase("healthy", &healthy_url, baseline).await;
    println!("phase A, both destinations healthy: good receives {base_rate:.0} events/s over {baseline} s");
    let hole = black_hole().await;
    let (hang_rate, parked) = phase("hanging", &hole, hang).await;
    println!("phase B, other never answers:        good receives {hang_rate:.0} events/s over {hang} s ({parked} events parked for other)");
    let ratio = hang_rate / base_rate;
    println!(
        "clogging ratio (B / A): {ratio:.2}  target >= 0.80  {}",
        if ratio >= 0.8 { "MET" } else { "MISSED" }
    );
}
