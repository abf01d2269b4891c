//! Shared helpers for the integration tests: a recording HTTP receiver, unique broker names,
//! RabbitMQ publishing and inspection, and courier started in-process.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use courier::{Config, Stats};

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

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

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    /// The status the receiver answered with.
    pub status: u16,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("receiver got a JSON body")
    }
    pub fn id(&self) -> String {
        self.header("x-request-id").unwrap_or_default().to_string()
    }
}

#[derive(Default)]
struct RecvState {
    requests: Mutex<Vec<Recorded>>,
    /// 2xx answers per `X-Request-Id`, kept as requests are recorded (cheap to read in a loop).
    ok_counts: Mutex<HashMap<String, usize>>,
    /// `X-Request-Id`s in the order requests arrived (before any delay or hold), with the time.
    arrivals: Mutex<Vec<(String, Instant)>>,
    /// Requests still to fail with `fail_status` before the normal status applies again.
    fail_left: AtomicUsize,
    fail_status: AtomicU16,
    /// Seconds for a `Retry-After` header on failures; 0 = none.
    retry_after: AtomicU64,
    status: AtomicU16,
    delay_ms: AtomicU64,
    held: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    hold: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
    arrived: tokio::sync::Notify,
}

impl RecvState {
    fn record(&self, recorded: Recorded) {
        if (200..300).contains(&recorded.status) {
            *self
                .ok_counts
                .lock()
                .unwrap()
                .entry(recorded.id())
                .or_insert(0) += 1;
        }
        self.requests.lock().unwrap().push(recorded);
        self.arrived.notify_waiters();
    }
}

/// A real HTTP server on 127.0.0.1 that records every request. It can answer slowly (all requests,
/// or one whose JSON body has `"delay_ms": n`), with a chosen status, hold requests until released,
/// and redirect (`/redirect/307/<path>` → `/<path>`, `/redirect/307/http://...` → that URL). A request is recorded when its answer is
/// ready (on arrival when held); a request whose client went away first is not recorded.
pub struct Receiver {
    pub addr: SocketAddr,
    scheme: &'static str,
    state: Arc<RecvState>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        Self::serve(listener, false)
    }

    /// The same receiver over HTTPS, with a freshly generated self-signed certificate for
    /// 127.0.0.1 that no client trusts.
    pub async fn start_tls() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let key = rcgen::generate_simple_self_signed(vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
        ])
        .expect("self-signed certificate");
        let cert = key.cert.der().clone();
        let private =
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.signing_key.serialize_der().into());
        courier::install_crypto_provider();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert], private)
            .expect("server TLS config");
        let tls = TlsListener {
            tcp: listener,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        };
        Self::serve(tls, true)
    }

    fn serve<L>(listener: L, tls: bool) -> Receiver
    where
        L: axum::serve::Listener<Addr = SocketAddr>,
    {
        let state = Arc::new(RecvState::default());
        state.status.store(200, Ordering::SeqCst);
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(state.clone());
        let addr = listener.local_addr().expect("receiver addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Receiver {
            addr,
            scheme: if tls { "https" } else { "http" },
            state,
            _shutdown: tx,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{}", self.scheme, self.addr, path)
    }

    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// From now on, requests are recorded on arrival and then wait until [`Receiver::release`].
    pub fn hold(&self) {
        *self.state.hold.lock().unwrap() = Some(Arc::new(tokio::sync::Semaphore::new(0)));
    }

    /// Lets every held (and future) request finish.
    pub fn release(&self) {
        if let Some(sem) = self.state.hold.lock().unwrap().take() {
            sem.add_permits(1 << 20);
        }
    }

    /// Requests currently waiting in [`Receiver::hold`].
    pub fn held(&self) -> usize {
        self.state.held.load(Ordering::SeqCst)
    }

    /// The most requests that were being answered at the same moment.
    pub fn max_concurrent(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn requests_to(&self, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// Waits until at least `n` requests arrived, or panics after `timeout` saying how many did.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Recorded> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.state.arrived.notified();
            let got = self.requests();
            if got.len() >= n {
                return got;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "receiver got {} of {n} requests within {timeout:?}: {:?}",
                    got.len(),
                    got.iter().map(|r| (&r.path, r.id())).collect::<Vec<_>>()
                );
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), notified).await;
        }
    }

    /// Waits until a request with this `X-Request-Id` arrived.
    pub async fn wait_for_id(&self, id: &str, timeout: Duration) -> Recorded {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.requests().into_iter().find(|r| r.id() == id) {
                return r;
            }
            if Instant::now() > deadline {
                panic!(
                    "no request with id {id} within {timeout:?}; got {:?}",
                    self.requests().iter().map(|r| r.id()).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Ids in arrival order, including requests still being answered.
    pub fn arrivals(&self) -> Vec<String> {
        self.state
            .arrivals
            .lock()
            .unwrap()
            .iter()
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// When each request for `id` arrived.
    pub fn arrival_times(&self, id: &str) -> Vec<Instant> {
        self.state
            .arrivals
            .lock()
            .unwrap()
            .iter()
            .filter(|(i, _)| i == id)
            .map(|(_, t)| *t)
            .collect()
    }

    /// The next `n` requests are answered with `status` (and `Retry-After` if set).
    pub fn fail_next(&self, n: usize, status: u16) {
        self.state.fail_status.store(status, Ordering::SeqCst);
        self.state.fail_left.store(n, Ordering::SeqCst);
    }

    /// Failures carry `Retry-After: <secs>`.
    pub fn set_retry_after(&self, secs: u64) {
        self.state.retry_after.store(secs, Ordering::SeqCst);
    }

    /// Waits until a request with this id has arrived (it may still be in progress).
    pub async fn wait_arrival(&self, id: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.arrivals().iter().any(|a| a == id) {
            assert!(
                Instant::now() < deadline,
                "{id} did not arrive within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How many times each id was answered with 2xx.
    pub fn delivered_counts(&self) -> HashMap<String, usize> {
        self.state.ok_counts.lock().unwrap().clone()
    }

    /// How many distinct ids were answered with 2xx.
    pub fn delivered_distinct(&self) -> usize {
        self.state.ok_counts.lock().unwrap().len()
    }

    /// How many of `ids` were answered with 2xx at least once.
    pub fn delivered_of(&self, ids: &[String]) -> usize {
        let counts = self.state.ok_counts.lock().unwrap();
        ids.iter().filter(|id| counts.contains_key(*id)).count()
    }
}

/// TLS over a TCP listener for axum; failed handshakes (a client refusing our certificate) are
/// skipped, not fatal.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(stream).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// An endpoint that accepts connections and never answers: the worst kind of partner.
pub struct BlackHole {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl BlackHole {
    pub async fn start() -> BlackHole {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(stream);
            }
        });
        BlackHole {
            addr,
            connections,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    State(state): State<Arc<RecvState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    if let Some(rest) = path.strip_prefix("/redirect/") {
        if let Some((code, target)) = rest.split_once('/') {
            let code: u16 = code.parse().unwrap_or(307);
            let location = if target.starts_with("http") {
                target.to_string()
            } else {
                format!("/{target}")
            };
            return Response::builder()
                .status(code)
                .header("location", location)
                .body(axum::body::Body::empty())
                .unwrap_or_default();
        }
    }
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let failing = state
        .fail_left
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let status = if failing {
        state.fail_status.load(Ordering::SeqCst)
    } else {
        state.status.load(Ordering::SeqCst)
    };
    let mut recorded = Recorded {
        method: method.to_string(),
        path,
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
        status,
    };
    state.arrivals.lock().unwrap().push((
        recorded
            .headers
            .get("x-request-id")
            .cloned()
            .unwrap_or_default(),
        Instant::now(),
    ));
    let body_delay = serde_json::from_slice::<serde_json::Value>(&recorded.body)
        .ok()
        .and_then(|v| v.get("delay_ms").and_then(|d| d.as_u64()))
        .unwrap_or(0);
    if body_delay > 0 {
        tokio::time::sleep(Duration::from_millis(body_delay)).await;
    }
    let hold = state.hold.lock().unwrap().clone();
    if let Some(sem) = hold {
        // Recorded on arrival so a test can see the request while it is held.
        state.held.fetch_add(1, Ordering::SeqCst);
        recorded.status = status;
        state.record(recorded.clone());
        let _ = sem.acquire().await;
        state.held.fetch_sub(1, Ordering::SeqCst);
    } else {
        let delay = state.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        state.record(recorded);
    }
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let retry_after = state.retry_after.load(Ordering::SeqCst);
    if !code.is_success() && retry_after > 0 {
        return (code, [("retry-after", retry_after.to_string())], "later").into_response();
    }
    (code, "ok").into_response()
}

/// A RabbitMQ connection and a channel with publisher confirms on.
pub struct Publisher {
    pub conn: Connection,
    pub channel: Channel,
}

impl Publisher {
    pub async fn connect() -> Publisher {
        Self::connect_to(AMQP_URL).await
    }

    pub async fn connect_to(url: &str) -> Publisher {
        courier::install_crypto_provider();
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("test publisher connects to RabbitMQ");
        let channel = conn.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm_select");
        Publisher { conn, channel }
    }

    /// Declares the durable queue courier will consume, so messages published before courier
    /// connects are kept.
    pub async fn declare_queue(&self, queue: &str) {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue_declare");
    }

    /// Publishes to the default exchange straight into `queue` and waits for the broker's confirm.
    pub async fn to_queue(&self, queue: &str, body: &[u8]) {
        self.publish("", queue, body, BasicProperties::default())
            .await;
    }

    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) {
        self.channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                props.with_delivery_mode(2),
            )
            .await
            .expect("basic_publish")
            .await
            .expect("publisher confirm");
    }

    /// Ready and unacked counts for `queue`, from `rabbitmqctl`.
    pub fn counts(queue: &str) -> (u64, u64) {
        Self::counts_in("/", queue)
    }

    pub fn counts_in(vhost: &str, queue: &str) -> (u64, u64) {
        let out = rabbitmqctl(&[
            "list_queues",
            "-p",
            vhost,
            "-q",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ]);
        for line in out.lines() {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() == 3 && cols[0] == queue {
                return (
                    cols[1].parse().unwrap_or(u64::MAX),
                    cols[2].parse().unwrap_or(u64::MAX),
                );
            }
        }
        panic!("queue {queue} not found in rabbitmqctl output:\n{out}");
    }

    /// Waits until `queue` exists and has `n` consumers (i.e. courier declared and subscribed).
    pub async fn wait_consumers(&self, queue: &str, n: u32) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // A passive declare on a missing queue closes the channel, so use a throwaway one.
            if let Ok(ch) = self.conn.create_channel().await {
                if let Ok(q) = ch
                    .queue_declare(
                        queue.into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                {
                    if q.consumer_count() >= n {
                        let _ = ch.close(200, "ok".into()).await;
                        return;
                    }
                }
                let _ = ch.close(200, "ok".into()).await;
            }
            if Instant::now() > deadline {
                panic!("queue {queue} did not get {n} consumer(s) within 20s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Runs `rabbitmqctl` and returns its stdout, panicking with its stderr on failure.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs (is RabbitMQ installed? scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A config for one queue and the given `[[destinations]]` TOML, with the store in `store`.
pub fn config(queue: &str, store: &Path, destinations: &str) -> Config {
    config_with(queue, store, "", destinations)
}

/// Like [`config`], with extra keys for the `[rabbitmq]` section (`extra_rabbit`).
pub fn config_with(queue: &str, store: &Path, extra_rabbit: &str, destinations: &str) -> Config {
    let text = format!(
        r#"
[service]
shutdown_timeout = "10s"

[organization]
id = "org-1"
name = "Example Org"
url = "https://example.org"
environment = "test"

[store]
path = "{store}"
cache_capacity = 1048576

[rabbitmq]
url = "{AMQP_URL}"
queue = "{queue}"
connection_name = "{queue}"
{extra_rabbit}

{destinations}
"#,
        store = store.display(),
    );
    Config::from_toml(&text).unwrap_or_else(|e| panic!("test config invalid: {e}\n{text}"))
}

/// courier running in this process.
pub struct Courier {
    shutdown: courier::Shutdown,
    handle: tokio::task::JoinHandle<Result<(), courier::Error>>,
    pub stats: Arc<Stats>,
}

impl Courier {
    pub fn start(config: Config) -> Courier {
        init_tracing();
        let shutdown = courier::Shutdown::new();
        let stats = Arc::new(Stats::default());
        let handle = tokio::spawn(courier::run_with_stats(
            config,
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

/// Opens the store read-only-ish after courier stopped, to inspect dead letters and dedup.
pub fn open_store(path: &Path) -> courier::store::Store {
    courier::store::Store::open(&courier::config::StoreConfig {
        path: path.to_path_buf(),
        dedup_ttl: Duration::from_secs(3600),
        cache_capacity: 1 << 20,
        ..Default::default()
    })
    .expect("open store after courier stopped")
}

/// Polls `cond` until it holds, or panics with `what`.
pub async fn eventually(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A test MQTT client publishing at QoS 1 to the real Mosquitto on 127.0.0.1:1883.
pub struct MqttPublisher {
    pub client: rumqttc::AsyncClient,
    acked: Arc<AtomicUsize>,
    sent: AtomicUsize,
    task: tokio::task::JoinHandle<()>,
}

impl MqttPublisher {
    pub async fn connect() -> MqttPublisher {
        let mut options = rumqttc::MqttOptions::new(unique("test-pub"), "127.0.0.1", 1883);
        options.set_keep_alive(Duration::from_secs(10));
        options.set_inflight(1000);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1000);
        let acked = Arc::new(AtomicUsize::new(0));
        let counter = acked.clone();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .expect("test publisher connects to Mosquitto on 127.0.0.1:1883")
            .ok();
        MqttPublisher {
            client,
            acked,
            sent: AtomicUsize::new(0),
            task,
        }
    }

    /// Publishes at QoS 1 (not retained).
    pub async fn publish(&self, topic: &str, body: impl Into<Vec<u8>>) {
        self.sent.fetch_add(1, Ordering::SeqCst);
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, body.into())
            .await
            .expect("queue MQTT publish");
    }

    /// Waits until the broker acknowledged everything published so far.
    pub async fn wait_acked(&self) {
        let want = self.sent.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.acked.load(Ordering::SeqCst) < want {
            assert!(
                Instant::now() < deadline,
                "broker acked {} of {want} publishes",
                self.acked.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for MqttPublisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A config with only an MQTT source subscribed to `filter`.
pub fn mqtt_config_text(
    filter: &str,
    client_id: &str,
    store: &Path,
    extra_mqtt: &str,
    destinations: &str,
) -> String {
    format!(
        r#"
[service]
shutdown_timeout = "10s"

[store]
path = "{store}"
cache_capacity = 1048576

[mqtt]
url = "mqtt://127.0.0.1:1883"
client_id = "{client_id}"
topics = ["{filter}"]
keep_alive = "5s"
{extra_mqtt}

{destinations}
"#,
        store = store.display(),
    )
}

pub fn mqtt_config(
    filter: &str,
    client_id: &str,
    store: &Path,
    extra_mqtt: &str,
    destinations: &str,
) -> Config {
    let text = mqtt_config_text(filter, client_id, store, extra_mqtt, destinations);
    Config::from_toml(&text).unwrap_or_else(|e| panic!("test config invalid: {e}\n{text}"))
}

/// Publishes probe events to `topic` until one reaches the receiver, proving courier's
/// subscription is in place (a persistent session only keeps messages once it exists).
pub async fn wait_subscribed(publisher: &MqttPublisher, topic: &str, rx: &Receiver) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0.. {
        let id = format!("probe-{i}");
        publisher
            .publish(topic, format!(r#"{{"id":"{id}","data":{{}}}}"#))
            .await;
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until {
            if rx.arrivals().iter().any(|a| a.starts_with("probe-")) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            Instant::now() < deadline,
            "courier never subscribed to {topic}"
        );
    }
}

/// The courier binary, for tests that must kill -9 it.
pub struct CourierProcess {
    pub child: std::process::Child,
    pub log: std::path::PathBuf,
}

impl CourierProcess {
    pub fn spawn(config_text: &str, dir: &Path) -> CourierProcess {
        let config = dir.join(format!("{}.toml", unique("courier")));
        std::fs::write(&config, config_text).expect("write config");
        let log = dir.join(format!("{}.log", unique("courier")));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn courier");
        CourierProcess { child, log }
    }

    /// SIGKILL: no drain, no flush, no PUBACK.
    pub fn kill9(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for CourierProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// When the first request after `since` arrived (2xx or not), if one did.
impl Receiver {
    pub fn first_arrival_after(&self, since: Instant) -> Option<Instant> {
        self.state
            .arrivals
            .lock()
            .unwrap()
            .iter()
            .map(|(_, t)| *t)
            .filter(|t| *t >= since)
            .min()
    }
}

fn mosquitto_port_open() -> bool {
    std::net::TcpStream::connect_timeout(
        &"127.0.0.1:1883".parse().expect("addr"),
        Duration::from_millis(200),
    )
    .is_ok()
}

fn wait_mosquitto_port(open: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while mosquitto_port_open() != open {
        assert!(
            Instant::now() < deadline,
            "Mosquitto port never became open={open}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stops the machine's Mosquitto with `signal` (TERM: it saves its persistent sessions first),
/// waits `down_for`, and starts it again with the same command as scripts/test.sh. Blocking.
pub fn restart_mosquitto(signal: &str, down_for: Duration) {
    let path = format!(
        "{}:/usr/sbin:/sbin",
        std::env::var("PATH").unwrap_or_default()
    );
    let status = std::process::Command::new("pkill")
        .args([&format!("-{signal}"), "-x", "mosquitto"])
        .status()
        .expect("pkill");
    assert!(status.success(), "no mosquitto process to stop");
    wait_mosquitto_port(false);
    std::thread::sleep(down_for);
    let status = std::process::Command::new("sh")
        .args([
            "-c",
            "mkdir -p /run/mosquitto && chown mosquitto /run/mosquitto; mosquitto -d -c /etc/mosquitto/mosquitto.conf",
        ])
        .env("PATH", path)
        .status()
        .expect("start mosquitto");
    assert!(status.success(), "mosquitto did not start again");
    wait_mosquitto_port(true);
}

/// One `[[destinations]]` table, with `extra` keys appended.
pub fn dest(name: &str, url: &str, extra: &str) -> String {
    format!("[[destinations]]\nname = \"{name}\"\nurl = \"{url}\"\n{extra}\n")
}

/// A port on 127.0.0.1 that was free a moment ago (for admin ports).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
