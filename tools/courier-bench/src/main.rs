//! courier-bench: end-to-end throughput, latency, fanout, routing and memory of courier, next to
//! the raw limits of the same machine, all measured in one run.
//!
//!     scripts/bench.sh [--events N] [--latency-seconds S] [--rate R] [--prefetch P]
//!                      [--max-concurrency C] [--only mqtt,fanout,...] [--courier PATH]
//!     (= cargo build --release && target/release/courier-bench ...; --help lists the cases)
//!
//! Needs RabbitMQ (127.0.0.1:5672), Mosquitto (127.0.0.1:1883), the release `courier` binary next
//! to this one, and python3 with aio-pika and aiohttp for the baseline. It starts its own HTTP
//! receiver. It prints one line per case and a table, and exits non-zero if an event was lost or
//! POSTed twice.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The cases `--only` can pick; each one also runs the raw limits its figure is divided by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Case {
    /// RabbitMQ -> HTTP drain rate (also the single-destination rate fanout is compared with).
    Amqp,
    /// The Python aio-pika + aiohttp baseline (compared with the RabbitMQ case).
    Python,
    /// MQTT -> HTTP drain rate.
    Mqtt,
    /// Publish-to-receive latency at a steady rate.
    Latency,
    /// One event to 10 destinations.
    Fanout,
    /// Routing with 10,000 destination patterns (in-process).
    Routing,
    /// courier's RSS at idle.
    Idle,
}

/// End-to-end throughput, latency, fanout, routing and memory of courier, next to the raw
/// limits of this machine, in one run.
#[derive(clap::Parser, Debug)]
#[command(name = "courier-bench")]
struct Args {
    /// Events pre-filled for the RabbitMQ and MQTT drain runs (fanout uses a fifth of them).
    #[arg(long, default_value_t = 50_000)]
    events: usize,
    /// Length of the steady-rate latency run.
    #[arg(long, default_value_t = 30)]
    latency_seconds: u64,
    /// Offered rate of the latency run, events/s.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// RabbitMQ prefetch, for courier and the raw consumer alike.
    #[arg(long, default_value_t = 256)]
    prefetch: u16,
    /// Every destination's `max_concurrency` (courier's default is 64).
    #[arg(long, default_value_t = 64)]
    max_concurrency: usize,
    /// Run only these cases (comma-separated); all by default.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Case>,
    /// The courier binary to measure; by default the one next to this program. Lets two builds
    /// be compared on the same machine, one run after the other.
    #[arg(long)]
    courier: Option<PathBuf>,
}

impl Args {
    fn runs(&self, case: Case) -> bool {
        self.only.is_empty() || self.only.contains(&case)
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// An event of about `size` bytes with id `id` and the publish time inside `data`.
fn event(id: &str, size: usize) -> Vec<u8> {
    let head = format!(
        r#"{{"id":"{id}","topic":"bench.t","data":{{"sent_ns":{},"pad":""#,
        now_ns()
    );
    let pad = size.saturating_sub(head.len() + 4);
    let mut body = head.into_bytes();
    body.extend(std::iter::repeat_n(b'x', pad));
    body.extend_from_slice(b"\"}}");
    body
}

// ---------------------------------------------------------------- receiver

#[derive(Default)]
struct Seen {
    /// path -> id -> count
    ids: HashMap<String, HashMap<String, u32>>,
    latencies_ns: Vec<u64>,
}

#[derive(Clone, Default)]
struct Receiver {
    seen: Arc<Mutex<Seen>>,
    total: Arc<AtomicU64>,
    record_latency: Arc<std::sync::atomic::AtomicBool>,
}

impl Receiver {
    async fn start() -> (Receiver, String) {
        let r = Receiver::default();
        let state = r.clone();
        let app = axum::Router::new().fallback(
            move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let state = state.clone();
                async move {
                    let arrived = now_ns();
                    let id = headers
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    let sent = if state.record_latency.load(Ordering::Relaxed) {
                        sent_ns(&body)
                    } else {
                        None
                    };
                    {
                        let mut seen = state.seen.lock().unwrap_or_else(|p| p.into_inner());
                        *seen
                            .ids
                            .entry(uri.path().to_string())
                            .or_default()
                            .entry(id)
                            .or_insert(0) += 1;
                        if let Some(s) = sent {
                            seen.latencies_ns.push(arrived.saturating_sub(s));
                        }
                    }
                    state.total.fetch_add(1, Ordering::Relaxed);
                    "ok"
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (r, base)
    }

    fn unique(&self, path: &str) -> usize {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.ids.get(path).map(|m| m.len()).unwrap_or(0)
    }

    fn duplicates(&self, path: &str) -> usize {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.ids
            .get(path)
            .map(|m| m.values().filter(|&&c| c > 1).count())
            .unwrap_or(0)
    }

    /// Waits until `path` has `n` distinct ids; `None` after `timeout`, or as soon as the
    /// courier process behind them has exited (`exited`), instead of waiting out the timeout.
    async fn wait_unique(
        &self,
        path: &str,
        n: usize,
        timeout: Duration,
        exited: Option<&AtomicBool>,
    ) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        let mut report = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let got = self.unique(path);
            if got >= n {
                return Some(Instant::now());
            }
            if exited.is_some_and(|e| e.load(Ordering::Relaxed)) {
                eprintln!(
                    "  ... {path}: {got} of {n}, and courier has exited (its stderr is above)"
                );
                return None;
            }
            if Instant::now() > report {
                eprintln!("  ... {path}: {got} of {n}");
                report = Instant::now() + Duration::from_secs(10);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        None
    }
}

fn sent_ns(body: &[u8]) -> Option<u64> {
    let key = b"\"sent_ns\":";
    let at = body.windows(key.len()).position(|w| w == key)? + key.len();
    let digits: Vec<u8> = body[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .copied()
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

// ---------------------------------------------------------------- RabbitMQ helpers

async fn channel(confirms: bool) -> (Connection, Channel) {
    let conn = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672");
    let ch = conn.create_channel().await.expect("channel");
    if confirms {
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
    }
    (conn, ch)
}

async fn fresh_queue(name: &str) {
    let (_c, ch) = channel(false).await;
    let _ = ch
        .queue_delete(name.into(), QueueDeleteOptions::default())
        .await;
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
}

async fn delete_queue(name: &str) {
    let (_c, ch) = channel(false).await;
    let _ = ch
        .queue_delete(name.into(), QueueDeleteOptions::default())
        .await;
}

/// Publishes `n` events (ids `{prefix}{i}`) with confirms, pipelined in batches.
async fn fill(queue: &str, prefix: &str, n: usize, size: usize) {
    let (_c, ch) = channel(true).await;
    let mut i = 0;
    while i < n {
        let mut confirms = Vec::with_capacity(2000);
        for _ in 0..2000.min(n - i) {
            let body = event(&format!("{prefix}{i}"), size);
            confirms.push(
                ch.basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish"),
            );
            i += 1;
        }
        for c in confirms {
            c.await.expect("confirm");
        }
    }
}

// ---------------------------------------------------------------- raw limits

/// A minimal lapin consumer that only parses and acks.
async fn raw_amqp_drain(queue: &str, n: usize, prefetch: u16) -> f64 {
    let (_c, ch) = channel(false).await;
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let start = Instant::now();
    let mut got = 0;
    while got < n {
        let Some(Ok(d)) = consumer.next().await else {
            break;
        };
        let _: serde_json::Value = serde_json::from_slice(&d.data).unwrap_or_default();
        let _ = d.acker.ack(BasicAckOptions::default()).await;
        got += 1;
    }
    got as f64 / start.elapsed().as_secs_f64()
}

/// A bare reqwest client POSTing `n` bodies with `concurrency` workers.
async fn raw_post(url: &str, n: usize, size: usize, concurrency: usize) -> f64 {
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .expect("client");
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let next = next.clone();
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    break;
                }
                let body = event(&format!("p{i}"), size);
                if let Ok(r) = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("x-request-id", format!("p{i}"))
                    .body(body)
                    .send()
                    .await
                {
                    let _ = r.bytes().await;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// A QoS 1 subscriber with manual acks that only parses and acks, fed by a paced publisher.
async fn raw_mqtt_drain(n: usize, size: usize) -> f64 {
    let topic = format!("bench/raw/{}", std::process::id());
    let mut o = rumqttc::MqttOptions::new(
        format!("bench-sub-{}", std::process::id()),
        "127.0.0.1",
        1883,
    );
    o.set_manual_acks(true)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (sub, mut sub_loop) = rumqttc::AsyncClient::new(o, 10_000);
    sub.subscribe(&topic, rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let received = Arc::new(AtomicU64::new(0));
    let r = received.clone();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    let subscriber = tokio::spawn(async move {
        loop {
            match sub_loop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    if let Some(t) = ready_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let _: serde_json::Value =
                        serde_json::from_slice(&p.payload).unwrap_or_default();
                    let _ = sub.try_ack(&p);
                    r.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let _ = ready.await;
    let start = Instant::now();
    publish_mqtt_paced(&topic, "r", n, size, || {
        received.load(Ordering::Relaxed) as usize
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while (received.load(Ordering::Relaxed) as usize) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = received.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    subscriber.abort();
    rate
}

/// Publishes `n` QoS 1 events, keeping at most 300 ahead of `consumed()`: Mosquitto drops QoS 1
/// messages for a subscriber more than max_queued_messages (1,000) behind, and the window it
/// counts includes messages delivered but not yet PUBACKed.
async fn publish_mqtt_paced(
    topic: &str,
    prefix: &str,
    n: usize,
    size: usize,
    consumed: impl Fn() -> usize,
) {
    let mut o = rumqttc::MqttOptions::new(
        format!("bench-pub-{}-{prefix}", std::process::id()),
        "127.0.0.1",
        1883,
    );
    o.set_inflight(500).set_max_packet_size(1 << 20, 1 << 20);
    let (publisher, mut pub_loop) = rumqttc::AsyncClient::new(o, 10_000);
    let acked = Arc::new(AtomicU64::new(0));
    let acks = acked.clone();
    let driver = tokio::spawn(async move {
        loop {
            match pub_loop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                    acks.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let mut last_progress = (consumed(), Instant::now());
    for i in 0..n {
        while i.saturating_sub(consumed()) >= 300 {
            let now = consumed();
            if now != last_progress.0 {
                last_progress = (now, Instant::now());
            } else if last_progress.1.elapsed() > Duration::from_secs(30) {
                println!("MQTT publisher: no progress for 30 s after {i} of {n}; giving up");
                driver.abort();
                return;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let body = event(&format!("{prefix}{i}"), size);
        publisher
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, body)
            .await
            .expect("publish");
    }
    // publish() only queues: wait until the broker has PUBACKed every message before leaving.
    let deadline = Instant::now() + Duration::from_secs(60);
    while (acked.load(Ordering::Relaxed) as usize) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    driver.abort();
}

// ---------------------------------------------------------------- courier as a process

struct CourierProcess {
    child: Child,
    peak_rss_kib: Arc<AtomicU64>,
    /// Set by the sampler once the process is gone (a config error, a crash).
    exited: Arc<AtomicBool>,
    sampler: tokio::task::JoinHandle<()>,
    dir: PathBuf,
}

fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// User plus system CPU seconds a process has used so far, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its closing paren are fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks_per_second())
}

/// The unit of `/proc/<pid>/stat`'s CPU times (100 on Linux unless the kernel says otherwise).
fn clock_ticks_per_second() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|t| t.trim().parse::<f64>().ok())
            .filter(|&hz| hz > 0.0)
            .unwrap_or(100.0)
    })
}

impl CourierProcess {
    /// CPU seconds courier has used since it started.
    fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.child.id()).unwrap_or(0.0)
    }

    fn spawn(exe: &std::path::Path, name: &str, config: &str) -> CourierProcess {
        let dir = std::env::temp_dir().join(format!("courier-bench-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("bench dir");
        let text = config.replace("@STORE@", &dir.join("store").display().to_string());
        let path = dir.join("courier.toml");
        std::fs::write(&path, text).expect("config");
        let child = Command::new(exe)
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        let peak = Arc::new(AtomicU64::new(0));
        let p = peak.clone();
        let exited = Arc::new(AtomicBool::new(false));
        let e = exited.clone();
        let pid = child.id();
        let sampler = tokio::spawn(async move {
            loop {
                match rss_kib(pid, "VmRSS:") {
                    Some(k) => {
                        p.fetch_max(k, Ordering::Relaxed);
                    }
                    // An exited process (a zombie until reaped) has no VmRSS line.
                    None => e.store(true, Ordering::Relaxed),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        CourierProcess {
            child,
            peak_rss_kib: peak,
            exited,
            sampler,
            dir,
        }
    }

    /// courier on `queue` with one destination, `<base>/<name>` on the benchmark's receiver.
    fn spawn_amqp(exe: &std::path::Path, name: &str, queue: &str, base: &str, a: &Args) -> Self {
        let target = destination("d", &format!("{base}/{name}"), a.max_concurrency);
        CourierProcess::spawn(exe, name, &amqp_config(queue, &target, a.prefetch))
    }

    fn rss_now_kib(&self) -> u64 {
        rss_kib(self.child.id(), "VmRSS:").unwrap_or(0)
    }

    fn peak_kib(&self) -> u64 {
        self.peak_rss_kib
            .load(Ordering::Relaxed)
            .max(rss_kib(self.child.id(), "VmHWM:").unwrap_or(0))
    }

    fn stop(mut self) {
        self.sampler.abort();
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn amqp_config(queue: &str, destinations: &str, prefetch: u16) -> String {
    format!(
        "[service]\nmax_in_flight = 256\nshutdown_timeout = \"5s\"\n[store]\npath = \"@STORE@\"\n\
         [rabbitmq]\nurl = \"{AMQP}\"\nqueue = \"{queue}\"\nprefetch = {prefetch}\n{destinations}"
    )
}

fn destination(name: &str, url: &str, max_concurrency: usize) -> String {
    format!(
        "[[destinations]]\nname = \"{name}\"\nurl = \"{url}\"\nmax_concurrency = {max_concurrency}\n"
    )
}

// ---------------------------------------------------------------- main

struct Row {
    case: &'static str,
    figure: String,
    target: String,
    met: Option<bool>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    courier::install_crypto_provider();
    let a = <Args as clap::Parser>::parse();
    let exe = match a.courier.clone().or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("courier")))
    }) {
        Some(exe) if exe.is_file() => exe,
        other => {
            eprintln!(
                "courier-bench: no courier binary at {} (cargo build --release, or --courier PATH)",
                other.map(|p| p.display().to_string()).unwrap_or_default()
            );
            return std::process::ExitCode::FAILURE;
        }
    };
    let exe = exe.as_path();
    let n = a.events;
    let size = 512;
    let pid = std::process::id();
    let (rx, base) = Receiver::start().await;
    let mut rows: Vec<Row> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    println!(
        "courier-bench: {n} events of {size} bytes, prefetch {}, max_concurrency {}, machine: {} cores, courier {}",
        a.prefetch,
        a.max_concurrency,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        exe.display()
    );
    let needs_amqp = a.runs(Case::Amqp) || a.runs(Case::Python) || a.runs(Case::Fanout);
    let needs_mqtt = a.runs(Case::Mqtt);
    let mut raw_limits = Vec::new();

    // 1a. raw RabbitMQ drain
    let drain = if needs_amqp {
        let q_raw = format!("bench-raw-{pid}");
        fresh_queue(&q_raw).await;
        fill(&q_raw, "raw", n, size).await;
        let drain = raw_amqp_drain(&q_raw, n, a.prefetch).await;
        delete_queue(&q_raw).await;
        println!("raw RabbitMQ drain (lapin, parse + ack): {drain:.0} events/s");
        raw_limits.push(format!("RabbitMQ drain {drain:.0}/s"));
        drain
    } else {
        f64::NAN
    };
    // 1b. raw POST rate
    // This process is both the bare client and the receiver here; the fanout case below measures
    // the receiver alone, so the difference is what a bare client spends per request.
    let post = if needs_amqp || needs_mqtt {
        // Untimed first: the first POSTs of the process (new connections, a cold receiver) were
        // sometimes far slower than later ones, which made L too low.
        raw_post(&format!("{base}/warm-up"), n.min(5_000), size, 64).await;
        let cpu_before = cpu_seconds(pid).unwrap_or(0.0);
        let post = raw_post(&format!("{base}/raw-post"), n, size, 64).await;
        let post_cpu_us = (cpu_seconds(pid).unwrap_or(0.0) - cpu_before) * 1e6 / n as f64;
        println!("raw HTTP POST (reqwest, 64 concurrent): {post:.0} requests/s, client + receiver CPU {post_cpu_us:.1} us/request");
        raw_limits.push(format!("POST {post:.0}/s"));
        post
    } else {
        f64::NAN
    };
    // 1c. The raw MQTT drain is measured by the MQTT case itself, right before and right after
    // courier's run (below).
    let limit = 1.0 / (1.0 / drain + 1.0 / post);
    // Set by the MQTT case, from the raw figures measured around it.
    let mut mqtt_limit = f64::NAN;
    // The same model for fanout, in deliveries/s: one message drained per ten POSTs. Printed
    // next to the target's own ratio, because 0.5 x 10 x the single-destination rate can lie
    // above this limit (it does whenever the POST rate is under about 8 x the drain rate).
    let fanout_limit = 1.0 / (1.0 / (10.0 * drain) + 1.0 / post);

    // idle memory
    let idle_kib = if a.runs(Case::Idle) {
        let q_idle = format!("bench-idle-{pid}");
        fresh_queue(&q_idle).await;
        let idle = CourierProcess::spawn_amqp(exe, "idle", &q_idle, &base, &a);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle_kib = idle.rss_now_kib();
        idle.stop();
        delete_queue(&q_idle).await;
        Some(idle_kib)
    } else {
        None
    };

    // 2. courier over RabbitMQ: the single-destination rate, which fanout and Python are
    // compared with, so it runs whenever one of them does.
    let mut peak_kib = None;
    let mut amqp = None;
    if needs_amqp {
        let q = format!("bench-courier-{pid}");
        fresh_queue(&q).await;
        fill(&q, "c", n, size).await;
        let courier = CourierProcess::spawn_amqp(exe, "amqp", &q, &base, &a);
        let start = Instant::now();
        let done = rx
            .wait_unique("/amqp", n, Duration::from_secs(600), Some(&courier.exited))
            .await;
        // What arrived, over the time it took: a run that did not finish counts only its events.
        let courier_rate = match done {
            Some(d) => n as f64 / (d - start).as_secs_f64(),
            None => rx.unique("/amqp") as f64 / start.elapsed().as_secs_f64(),
        };
        let amqp_cpu_us = courier.cpu_seconds() * 1e6 / n as f64;
        tokio::time::sleep(Duration::from_millis(500)).await;
        peak_kib = Some(courier.peak_kib());
        courier.stop();
        delete_queue(&q).await;
        if done.is_none() {
            failures.push(format!(
                "RabbitMQ: only {} of {n} events arrived",
                rx.unique("/amqp")
            ));
        }
        let dups = rx.duplicates("/amqp");
        if dups > 0 {
            failures.push(format!("RabbitMQ: {dups} events POSTed twice"));
        }
        println!(
            "courier RabbitMQ -> HTTP: {courier_rate:.0} events/s = {:.2} x L (L = {limit:.0}/s), courier CPU {amqp_cpu_us:.1} us/event",
            courier_rate / limit
        );
        amqp = Some((courier_rate, amqp_cpu_us));
    }
    let courier_rate = amqp.map(|(r, _)| r).unwrap_or(f64::NAN);

    // Python baseline on the same kind of queue
    let mut py_rate = None;
    if a.runs(Case::Python) {
        let q_py = format!("bench-python-{pid}");
        fresh_queue(&q_py).await;
        fill(&q_py, "py", n, size).await;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/python_baseline.py");
        let started = Instant::now();
        let python = Command::new("python3")
            .args([
                script,
                AMQP,
                &q_py,
                &format!("{base}/python"),
                &a.prefetch.to_string(),
                &n.to_string(),
            ])
            .stdout(Stdio::null())
            .spawn();
        py_rate = match python {
            Ok(mut child) => {
                // Polled in short steps so a baseline that dies (a missing package) ends the wait.
                let deadline = Instant::now() + Duration::from_secs(900);
                let done = loop {
                    if let Some(at) = rx
                        .wait_unique("/python", n, Duration::from_millis(500), None)
                        .await
                    {
                        break Some(at);
                    }
                    if let Ok(Some(status)) = child.try_wait() {
                        println!(
                            "python baseline exited early ({status}), after {} of {n} events",
                            rx.unique("/python")
                        );
                        break None;
                    }
                    if Instant::now() > deadline {
                        break None;
                    }
                };
                let _ = child.kill();
                let _ = child.wait();
                done.map(|d| n as f64 / (d - started).as_secs_f64())
            }
            Err(e) => {
                println!("python baseline not run: {e}");
                None
            }
        };
        delete_queue(&q_py).await;
        match py_rate {
            Some(r) => println!("python aio-pika + aiohttp worker: {r:.0} events/s (courier is {:.1}x)", courier_rate / r),
            None => println!("python aio-pika + aiohttp worker: did not finish (pip install -r bench/requirements.txt)"),
        }
    }

    // 2b. courier over MQTT
    let mut mqtt = None;
    if needs_mqtt {
        // The raw limits right before courier's run. When the RabbitMQ case ran first (amqp,
        // python or fanout selected), the POST rate is measured again too: the figure from the
        // start of the run is a minute or more old by now, and L is meant to describe the
        // machine during this case.
        let post_before = if needs_amqp {
            let p = raw_post(&format!("{base}/raw-post-before"), n, size, 64).await;
            println!("raw HTTP POST again before the MQTT run: {p:.0} requests/s");
            raw_limits.push(format!("before the MQTT run: POST {p:.0}/s"));
            p
        } else {
            post
        };
        let drain_before = raw_mqtt_drain(n, size).await;
        println!("raw MQTT QoS 1 drain (rumqttc, manual acks) before the MQTT run: {drain_before:.0} events/s");
        raw_limits.push(format!("MQTT drain {drain_before:.0}/s"));
        let topic = format!("bench/courier/{pid}/e");
        let probe_topic = format!("bench/courier/{pid}/probe");
        let mqtt_cfg = format!(
            "[service]\nmax_in_flight = 256\nshutdown_timeout = \"5s\"\n[store]\npath = \"@STORE@\"\n\
             [mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\nclient_id = \"bench-courier-{pid}\"\ntopics = [\"bench/courier/{pid}/#\"]\n{}",
            destination("d", &format!("{base}/mqtt"), a.max_concurrency)
        );
        let courier = CourierProcess::spawn(exe, "mqtt", &mqtt_cfg);
        // Only a subscription that exists keeps messages: probe until one comes through.
        let probe_deadline = Instant::now() + Duration::from_secs(30);
        let mut probe = 0;
        while rx.unique("/mqtt") == 0
            && Instant::now() < probe_deadline
            && !courier.exited.load(Ordering::Relaxed)
        {
            let rx_p = rx.clone();
            publish_mqtt_paced(&probe_topic, &format!("probe{probe}-"), 1, 64, move || {
                rx_p.unique("/mqtt")
            })
            .await;
            probe += 1;
        }
        if rx.unique("/mqtt") == 0 {
            failures.push(
                "MQTT: courier never subscribed (no probe came through in 30 s, or courier exited)"
                    .into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let probes = rx.unique("/mqtt");
        let cpu_before = courier.cpu_seconds();
        let start = Instant::now();
        let rx_m = rx.clone();
        publish_mqtt_paced(&topic, "m", n, size, move || {
            rx_m.unique("/mqtt").saturating_sub(probes)
        })
        .await;
        let done = rx
            .wait_unique(
                "/mqtt",
                n + probes,
                Duration::from_secs(600),
                Some(&courier.exited),
            )
            .await;
        let mqtt_rate = match done {
            Some(d) => n as f64 / (d - start).as_secs_f64(),
            None => {
                rx.unique("/mqtt").saturating_sub(probes) as f64 / start.elapsed().as_secs_f64()
            }
        };
        let mqtt_peak = courier.peak_kib();
        let mqtt_cpu_us = (courier.cpu_seconds() - cpu_before) * 1e6 / n as f64;
        courier.stop();
        // The raw limits again, right after: L is the model of their means, so a slow or fast
        // spell during one raw measurement moves the ratio half as much.
        let post_after = raw_post(&format!("{base}/raw-post-after"), n, size, 64).await;
        let drain_after = raw_mqtt_drain(n, size).await;
        println!(
            "raw limits again after the MQTT run: POST {post_after:.0} requests/s, MQTT drain {drain_after:.0} events/s"
        );
        raw_limits.push(format!(
            "after the MQTT run: POST {post_after:.0}/s, MQTT drain {drain_after:.0}/s"
        ));
        mqtt_limit = 1.0 / (2.0 / (drain_before + drain_after) + 2.0 / (post_before + post_after));
        if done.is_none() {
            failures.push(format!(
                "MQTT: only {} of {n} events arrived",
                rx.unique("/mqtt").saturating_sub(probes)
            ));
        }
        if rx.duplicates("/mqtt") > 0 {
            failures.push(format!(
                "MQTT: {} events POSTed twice",
                rx.duplicates("/mqtt")
            ));
        }
        println!(
            "courier MQTT -> HTTP: {mqtt_rate:.0} events/s = {:.2} x L (L = {mqtt_limit:.0}/s, from the mean raw figures before and after), courier CPU {mqtt_cpu_us:.1} us/event",
            mqtt_rate / mqtt_limit
        );
        mqtt = Some((mqtt_rate, mqtt_cpu_us, mqtt_peak));
    }

    // 3. latency at a steady rate
    let mut latency = None;
    if a.runs(Case::Latency) {
        latency = Some(latency_run(&a, exe, &rx, &base, size).await);
    }

    // 4a. fanout to 10 destinations
    let mut fanout = None;
    if a.runs(Case::Fanout) {
        let fan_n = (n / 5).max(1000);
        let q_fan = format!("bench-fanout-{pid}");
        fresh_queue(&q_fan).await;
        fill(&q_fan, "f", fan_n, size).await;
        let dests: String = (0..10)
            .map(|i| {
                destination(
                    &format!("f{i}"),
                    &format!("{base}/fan{i}"),
                    a.max_concurrency,
                )
            })
            .collect();
        let courier =
            CourierProcess::spawn(exe, "fanout", &amqp_config(&q_fan, &dests, a.prefetch));
        let cpu_before = cpu_seconds(pid).unwrap_or(0.0);
        let start = Instant::now();
        let mut fan_done = true;
        for i in 0..10 {
            if rx
                .wait_unique(
                    &format!("/fan{i}"),
                    fan_n,
                    Duration::from_secs(600),
                    Some(&courier.exited),
                )
                .await
                .is_none()
            {
                fan_done = false;
            }
        }
        let delivered: usize = if fan_done {
            fan_n * 10
        } else {
            (0..10).map(|i| rx.unique(&format!("/fan{i}"))).sum()
        };
        let fan_rate = delivered as f64 / start.elapsed().as_secs_f64();
        let fan_cpu_us = courier.cpu_seconds() * 1e6 / (fan_n * 10) as f64;
        let receiver_cpu_us =
            (cpu_seconds(pid).unwrap_or(0.0) - cpu_before) * 1e6 / (fan_n * 10) as f64;
        courier.stop();
        delete_queue(&q_fan).await;
        if !fan_done {
            failures.push("fanout: not every delivery arrived".into());
        }
        println!("fanout to 10 destinations: {fan_rate:.0} deliveries/s = {:.2} x (10 x single-destination rate) = {:.2} x L_fanout (L_fanout = {fanout_limit:.0}/s), courier CPU {fan_cpu_us:.1} us/delivery, receiver CPU {receiver_cpu_us:.1} us/delivery", fan_rate / (10.0 * courier_rate), fan_rate / fanout_limit);
        fanout = Some((fan_rate, fan_cpu_us));
    }

    // 4b. routing with 10,000 patterns
    let routing_ns = a.runs(Case::Routing).then(routing_run);

    // table
    let met = |ok: bool| Some(ok);
    if let Some((courier_rate, amqp_cpu_us)) = amqp {
        rows.push(Row {
            case: "RabbitMQ -> HTTP",
            figure: format!(
                "{courier_rate:.0}/s = {:.2} x L ({amqp_cpu_us:.0} us CPU/event)",
                courier_rate / limit
            ),
            target: ">= 0.85 x L".into(),
            met: met(courier_rate >= 0.85 * limit),
        });
    }
    if let Some(r) = py_rate {
        rows.push(Row {
            case: "vs Python aio-pika",
            figure: format!("{:.1}x ({r:.0}/s)", courier_rate / r),
            target: ">= 3x".into(),
            met: met(courier_rate >= 3.0 * r),
        });
    }
    if let Some((mqtt_rate, mqtt_cpu_us, _)) = mqtt {
        rows.push(Row {
            case: "MQTT -> HTTP",
            figure: format!(
                "{mqtt_rate:.0}/s = {:.2} x L ({mqtt_cpu_us:.0} us CPU/event)",
                mqtt_rate / mqtt_limit
            ),
            target: ">= 0.85 x L".into(),
            met: met(mqtt_rate >= 0.85 * mqtt_limit),
        });
    }
    if let Some((p50, p99, max)) = latency {
        rows.push(Row {
            case: "p99 latency",
            figure: format!("{p99:.2} ms (p50 {p50:.2}, max {max:.2})"),
            target: "< 10 ms".into(),
            met: met(p99 < 10.0),
        });
    }
    if let Some(per_event_ns) = routing_ns {
        rows.push(Row {
            case: "routing, 10k patterns",
            figure: format!("{per_event_ns:.0} ns/event"),
            target: "< 2000 ns".into(),
            met: met(per_event_ns < 2000.0),
        });
    }
    if let Some((fan_rate, fan_cpu_us)) = fanout {
        rows.push(Row {
            case: "fanout x10",
            figure: format!(
                "{fan_rate:.0} deliveries/s = {:.2} x, {:.2} x L_fanout ({fan_cpu_us:.0} us CPU/delivery)",
                fan_rate / (10.0 * courier_rate),
                fan_rate / fanout_limit
            ),
            target: ">= 0.5 x".into(),
            met: met(fan_rate > 0.0 && fan_rate >= 0.5 * 10.0 * courier_rate),
        });
    }
    let mqtt_peak = mqtt.map(|(_, _, p)| p);
    if let Some(peak) = peak_kib.into_iter().chain(mqtt_peak).max() {
        let mib = |k: Option<u64>| {
            k.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                .unwrap_or_else(|| "not run".into())
        };
        rows.push(Row {
            case: "peak RSS under load",
            figure: format!("{} (MQTT run {})", mib(peak_kib), mib(mqtt_peak)),
            target: "< 64 MiB".into(),
            met: met(peak < 64 * 1024),
        });
    }
    if let Some(idle_kib) = idle_kib {
        rows.push(Row {
            case: "idle RSS",
            figure: format!("{:.1} MiB", idle_kib as f64 / 1024.0),
            target: "< 20 MiB".into(),
            met: met(idle_kib < 20 * 1024),
        });
    }
    println!();
    println!("| case | figure | target | met |");
    println!("|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} |",
            r.case,
            r.figure,
            r.target,
            match r.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            }
        );
    }
    if !raw_limits.is_empty() {
        println!("| raw limits | {} | | |", raw_limits.join(", "));
    }
    if failures.is_empty() {
        println!("\nno event lost, none POSTed twice");
        std::process::ExitCode::SUCCESS
    } else {
        for f in &failures {
            println!("FAILED: {f}");
        }
        std::process::ExitCode::FAILURE
    }
}

/// Publish-to-receive latency at `a.rate` events/s for `a.latency_seconds`: (p50, p99, max) in ms.
async fn latency_run(
    a: &Args,
    exe: &std::path::Path,
    rx: &Receiver,
    base: &str,
    size: usize,
) -> (f64, f64, f64) {
    let q_lat = format!("bench-latency-{}", std::process::id());
    fresh_queue(&q_lat).await;
    let courier = CourierProcess::spawn_amqp(exe, "latency", &q_lat, base, a);
    tokio::time::sleep(Duration::from_secs(2)).await;
    rx.record_latency.store(true, Ordering::Relaxed);
    let total = (a.rate * a.latency_seconds) as usize;
    {
        let (_c, ch) = channel(true).await;
        let interval = Duration::from_nanos(1_000_000_000 / a.rate.max(1));
        let start = Instant::now();
        let mut confirms = Vec::new();
        for i in 0..total {
            let due = start + interval * i as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
            let body = event(&format!("l{i}"), size);
            confirms.push(
                ch.basic_publish(
                    "".into(),
                    q_lat.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish"),
            );
            if confirms.len() >= 100 {
                for c in confirms.drain(..) {
                    let _ = c.await;
                }
            }
        }
        for c in confirms {
            let _ = c.await;
        }
    }
    let _ = rx
        .wait_unique(
            "/latency",
            total,
            Duration::from_secs(60),
            Some(&courier.exited),
        )
        .await;
    rx.record_latency.store(false, Ordering::Relaxed);
    courier.stop();
    delete_queue(&q_lat).await;
    let mut lat = std::mem::take(
        &mut rx
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .latencies_ns,
    );
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1e6
    };
    let (p50, p99, max) = (
        pct(0.50),
        pct(0.99),
        lat.last().copied().unwrap_or(0) as f64 / 1e6,
    );
    println!("latency at {} events/s for {} s: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms ({} samples)", a.rate, a.latency_seconds, lat.len());
    (p50, p99, max)
}

/// Matching 1,000 topics against 10,000 destination patterns, 1,000 rounds: ns per event.
fn routing_run() -> f64 {
    let mut text = String::from("[rabbitmq]\nurl = \"amqp://127.0.0.1\"\nqueue = \"q\"\n");
    for i in 0..10_000 {
        let pattern = match i % 4 {
            0 => format!("tempo.site{i}.batch.*"),
            1 => format!("tempo/site{i}/#"),
            2 => format!("tempo.site{i}.+.status"),
            _ => format!("tempo.site{i}.equipment.run"),
        };
        text.push_str(&format!("[[destinations]]\nname = \"r{i}\"\nurl = \"http://127.0.0.1/\"\ntopics = [\"{pattern}\"]\n"));
    }
    let config = courier::Config::from_toml(&text).expect("routing config");
    let router = courier::router::Router::new(&config.destinations);
    let topics: Vec<String> = (0..1000)
        .map(|i| format!("tempo.site{}.batch.batch_run_status", i * 7))
        .collect();
    let rounds = 1000;
    let start = Instant::now();
    let mut matched = 0usize;
    for _ in 0..rounds {
        for t in &topics {
            matched += router.match_topic(t).len();
        }
    }
    let per_event_ns = start.elapsed().as_nanos() as f64 / (rounds * topics.len()) as f64;
    println!(
        "routing with 10,000 patterns: {:.0} ns per event ({matched} matches)",
        per_event_ns
    );
    per_event_ns
}
