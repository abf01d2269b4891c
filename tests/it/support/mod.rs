//! What the integration tests share beyond `courier_testkit`: the broker lock, courier started
//! in-process (`courier::run_with_stats`) or as the `courier` binary, test configurations, the
//! store opened for assertions, and an OAuth2 token endpoint.

mod brokers;
pub mod mosquitto;
pub mod otlp;
pub mod proxy;
mod token_endpoint;
pub mod webhooks;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use brokers::{brokers, brokers_exclusive, Brokers};
pub use courier_testkit::*;
pub use token_endpoint::{ClientAuth, TokenEndpoint};

use courier::{Config, Stats};

/// Logs to the test output when RUST_LOG is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_test_writer()
        .try_init();
}

/// What most RabbitMQ tests start from: `queue` (also the connection's name), the store in
/// `store`, a 10 s shutdown, a small page cache and the organization the Metadata block shows.
pub fn rabbit_config(queue: &str, store: &Path) -> ConfigBuilder {
    test_defaults(store).rabbitmq(Rabbit::queue(queue).connection_name(queue))
}

/// What most MQTT tests start from: [`mqtt_source`], the store in `store`, a 10 s shutdown and a
/// small page cache.
pub fn mqtt_config(filter: &str, client_id: &str, store: &Path) -> ConfigBuilder {
    test_defaults(store).mqtt(mqtt_source(client_id, filter))
}

/// Subscribed to `filter` as `client_id`, with a 5 s keep-alive.
pub fn mqtt_source(client_id: &str, filter: &str) -> Mqtt {
    Mqtt::new(client_id, filter).keep_alive(Duration::from_secs(5))
}

/// [`mqtt_source`] speaking `protocol`; under MQTT 5 with a one-hour `session_expiry`.
pub fn mqtt_source_as(client_id: &str, filter: &str, protocol: MqttProtocol) -> Mqtt {
    let source = mqtt_source(client_id, filter).protocol(protocol);
    match protocol {
        MqttProtocol::V3 => source,
        MqttProtocol::V5 => source.session_expiry(Duration::from_secs(3600)),
    }
}

/// The defaults of [`rabbit_config`] and [`mqtt_config`], with no source yet.
pub fn test_defaults(store: &Path) -> ConfigBuilder {
    ConfigBuilder::new(store)
        .shutdown_timeout(Duration::from_secs(10))
        .organization("org-1", "Example Org", "https://example.org", "test")
        .cache_capacity(1 << 20)
}

/// The configuration courier loads from the builder's TOML.
pub fn load(config: &ConfigBuilder) -> Config {
    let text = config.toml();
    Config::from_toml(&text).unwrap_or_else(|e| panic!("test config invalid: {e}\n{text}"))
}

/// courier running in this process.
pub struct Courier {
    shutdown: courier::Shutdown,
    handle: tokio::task::JoinHandle<Result<(), courier::Error>>,
    pub stats: Arc<Stats>,
}

impl Courier {
    /// Starts courier with this configuration; the test must hold the brokers ([`brokers`]).
    pub fn start(config: &ConfigBuilder) -> Courier {
        brokers::assert_held();
        init_tracing();
        let shutdown = courier::Shutdown::new();
        let stats = Arc::new(Stats::default());
        let handle = tokio::spawn(courier::run_with_stats(
            load(config),
            shutdown.clone(),
            stats.clone(),
        ));
        Courier {
            shutdown,
            handle,
            stats,
        }
    }

    /// Graceful stop, as on SIGTERM; panics if courier does not stop within `within` or failed.
    pub async fn stop_within(self, within: Duration) -> Arc<Stats> {
        self.shutdown.request();
        match tokio::time::timeout(within, self.handle).await {
            Ok(Ok(Ok(()))) => self.stats,
            Ok(Ok(Err(e))) => panic!("courier stopped with an error: {e}"),
            Ok(Err(e)) => panic!("courier task failed: {e}"),
            Err(_) => panic!("courier did not stop within {within:?}"),
        }
    }

    pub async fn stop(self) -> Arc<Stats> {
        self.stop_within(Duration::from_secs(20)).await
    }

    pub fn count(&self, f: impl Fn(&Stats) -> &AtomicU64) -> u64 {
        f(&self.stats).load(Ordering::SeqCst)
    }

    /// Waits until the counter picked by `f` reaches `n`.
    pub async fn wait_count(&self, n: u64, timeout: Duration, f: impl Fn(&Stats) -> &AtomicU64) {
        let deadline = Instant::now() + timeout;
        while f(&self.stats).load(Ordering::SeqCst) < n {
            if Instant::now() > deadline {
                panic!(
                    "counter reached {} of {n} within {timeout:?}",
                    f(&self.stats).load(Ordering::SeqCst)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The `courier` binary of this build.
pub const COURIER_EXE: &str = env!("CARGO_BIN_EXE_courier");

/// The `courier` binary, for CLI tests.
pub fn courier_command() -> std::process::Command {
    std::process::Command::new(COURIER_EXE)
}

/// How to start the courier binary with `config`, written into `dir`.
pub fn launch(config: &ConfigBuilder, dir: &Path) -> Launch {
    Launch::new(COURIER_EXE, dir, config.toml())
}

/// The courier binary with `config`, its config file and log in `dir`; the test must hold the
/// brokers ([`brokers`]).
pub fn spawn(config: &ConfigBuilder, dir: &Path) -> CourierProcess {
    spawn_launch(launch(config, dir))
}

/// [`spawn`], for a launch with options of its own.
pub fn spawn_launch(launch: Launch) -> CourierProcess {
    brokers::assert_held();
    launch.spawn()
}

/// Runs `courier <args> --config <config>`: exit code, stdout, stderr.
pub fn run_cli(args: &[&str], config: &Path) -> (i32, String, String) {
    let out = courier_command()
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run courier");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Opens the store after courier stopped, to inspect dead letters and dedup.
pub fn open_store(path: &Path) -> courier::store::Store {
    courier::store::Store::open(&courier::config::StoreConfig {
        path: path.to_path_buf(),
        dedup_ttl: Duration::from_secs(3600),
        cache_capacity: 1 << 20,
        ..Default::default()
    })
    .expect("open store after courier stopped")
}

/// `millis` milliseconds, for the short intervals tests configure.
pub fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// A queue of its own (declared), a store directory and the publisher that declared it.
pub async fn setup(prefix: &str) -> (String, tempfile::TempDir, Publisher) {
    let queue = unique(prefix);
    let publisher = Publisher::connect().await;
    publisher.declare_queue(&queue).await;
    (queue, tempfile::tempdir().unwrap(), publisher)
}

/// An envelope event with this id on `topic`, with empty data.
pub fn event(id: &str, topic: &str) -> String {
    format!(r#"{{"id":"{id}","topic":"{topic}","data":{{}}}}"#)
}

/// Publishes the events `<prefix><i>` for every `i` in `range`, on topic `t`, into `queue`.
pub async fn publish_events(
    publisher: &Publisher,
    queue: &str,
    prefix: &str,
    range: std::ops::Range<usize>,
) {
    for id in ids(prefix, range) {
        publisher.to_queue(queue, event(&id, "t").as_bytes()).await;
    }
}

/// `<prefix><i>` for every `i` in `range`.
pub fn ids(prefix: &str, range: std::ops::Range<usize>) -> impl Iterator<Item = String> + '_ {
    range.map(move |i| format!("{prefix}{i}"))
}

/// Waits until `queue` holds no message, ready or unacked; panics with `what` after `timeout`.
pub async fn wait_drained(queue: &str, what: &str, timeout: Duration) {
    eventually(what, timeout, || Publisher::counts(queue) == (0, 0)).await;
}

/// A courier subscribed to a topic of its own (named after `prefix`) as a client of its own,
/// POSTing every event to `/d` on `rx`, its store in `store`: the topic and the configuration.
pub fn mqtt_to_receiver(rx: &Receiver, prefix: &str, store: &Path) -> (String, ConfigBuilder) {
    mqtt_to_receiver_as(rx, prefix, store, MqttProtocol::V3)
}

/// [`mqtt_to_receiver`] speaking `protocol`; under MQTT 5 with a one-hour `session_expiry`.
pub fn mqtt_to_receiver_as(
    rx: &Receiver,
    prefix: &str,
    store: &Path,
    protocol: MqttProtocol,
) -> (String, ConfigBuilder) {
    let topic = unique(prefix);
    let config = test_defaults(store)
        .mqtt(mqtt_source_as(
            &unique(&format!("courier-{prefix}")),
            &topic,
            protocol,
        ))
        .destination(Dest::new("d", &rx.url("/d")));
    (topic, config)
}

/// A publisher, once courier's subscription to `topic` is in place ([`wait_subscribed`]).
pub async fn subscribed_publisher(topic: &str, rx: &Receiver) -> MqttPublisher {
    let publisher = MqttPublisher::connect().await;
    wait_subscribed(&publisher, topic, rx).await;
    publisher
}

/// Publishes probe events to `topic` until one reaches the receiver, proving courier's
/// subscription is in place (a persistent session only keeps messages once it exists).
pub async fn wait_subscribed(publisher: &MqttPublisher, topic: &str, rx: &Receiver) {
    let subscribed = publisher
        .probe_until(
            topic,
            Duration::from_millis(300),
            Duration::from_secs(20),
            || rx.arrivals().iter().any(|a| a.starts_with("probe-")),
        )
        .await;
    assert!(subscribed, "courier never subscribed to {topic}");
}

/// `GET url`: the status and the body; status 0 when nothing answered.
pub async fn http_get(url: &str) -> (u16, String) {
    install_crypto_provider();
    match reqwest::get(url).await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
        Err(_) => (0, String::new()),
    }
}

/// Polls `url` until it answers `want`; returns the body. Panics after `timeout`.
pub async fn wait_http_status(url: &str, want: u16, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, body) = http_get(url).await;
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

/// Waits until `log` has a line with every one of `parts`; returns that line.
pub async fn wait_log_line(log: &Path, parts: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {parts:?} in:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a reason says the server refused the TLS handshake. A server that refuses the client's
/// certificate sends an alert (`received fatal alert: CertificateRequired`, `... UnknownCA`), or,
/// when the client has already moved on, closes the connection (`peer closed connection without
/// sending TLS close_notify`).
pub fn refused_by_tls(reason: &str) -> bool {
    reason.contains("received fatal alert") || reason.contains("without sending TLS close_notify")
}

/// `/readyz` of the admin port `port`, once it answers 503 with a reason that contains `part`.
pub async fn wait_not_ready(port: u16, part: &str) -> String {
    let url = format!("http://127.0.0.1:{port}/readyz");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = http_get(&url).await;
        if status == 503 && body.contains(part) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never said {part:?}; last: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
