//! A real HTTP server on 127.0.0.1 that plays the partner endpoint, and [`BlackHole`], a partner
//! that never answers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// What a [`Receiver`] keeps of each request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Recording {
    /// Every request whole, with its arrival time; answers can be slowed, failed, held or
    /// redirected. What the tests use.
    #[default]
    Full,
    /// Only how many times each id arrived per path (and publish-to-arrival latencies while
    /// [`Receiver::record_latency`] is on), answered 200 at once: the least work per request,
    /// so that a benchmark measures courier and not its receiver.
    Counts,
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
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

/// What both recordings keep, under one lock.
#[derive(Default)]
struct Counts {
    /// path -> `X-Request-Id` -> 2xx answers.
    by_path: HashMap<String, HashMap<String, u32>>,
    /// Publish-to-arrival times, while recording them is on.
    latencies_ns: Vec<u64>,
}

#[derive(Default)]
struct RecvState {
    recording: Recording,
    counts: Mutex<Counts>,
    record_latency: AtomicBool,
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
    /// Answers carry `Connection: close`, so every request comes on a new connection.
    close_connections: AtomicBool,
    /// Why TLS handshakes failed (HTTPS receivers only).
    tls_failures: Mutex<Vec<String>>,
}

/// Locks, ignoring poison: a panicking test thread must not hide what the receiver saw.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RecvState {
    fn count(&self, path: &str, id: String) {
        *lock(&self.counts)
            .by_path
            .entry(path.to_string())
            .or_default()
            .entry(id)
            .or_insert(0) += 1;
    }

    fn record(&self, recorded: Recorded) {
        if (200..300).contains(&recorded.status) {
            *lock(&self.ok_counts).entry(recorded.id()).or_insert(0) += 1;
            self.count(&recorded.path, recorded.id());
        }
        lock(&self.requests).push(recorded);
        self.arrived.notify_waiters();
    }
}

/// A real HTTP server on 127.0.0.1 that records every request (see [`Recording`]).
///
/// With [`Recording::Full`] it can answer slowly (all requests, or one whose JSON body has
/// `"delay_ms": n`), with a chosen status, hold requests until released, and redirect
/// (`/redirect/307/<path>` → `/<path>`, `/redirect/307/http://...` → that URL). A request is
/// recorded when its answer is ready (on arrival when held); a request whose client went away
/// first is not recorded.
pub struct Receiver {
    pub addr: SocketAddr,
    scheme: &'static str,
    state: Arc<RecvState>,
    /// The TLS settings new connections get (HTTPS receivers only).
    acceptor: Option<Arc<Mutex<tokio_rustls::TlsAcceptor>>>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl Receiver {
    /// A receiver that records every request whole.
    pub async fn start() -> Receiver {
        Self::start_with(Recording::Full).await
    }

    pub async fn start_with(recording: Recording) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        Self::serve(listener, false, recording)
    }

    /// The same receiver over HTTPS, with a freshly generated self-signed certificate for
    /// 127.0.0.1 that no client trusts.
    pub async fn start_tls() -> Receiver {
        let key = rcgen::generate_simple_self_signed(vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
        ])
        .expect("self-signed certificate");
        let cert = key.cert.der().clone();
        let private =
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.signing_key.serialize_der().into());
        crate::install_crypto_provider();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert], private)
            .expect("server TLS config");
        Self::start_with_tls(config).await
    }

    /// The receiver over HTTPS with `config` (see [`crate::pki::server_config`] for one that
    /// requires client certificates).
    pub async fn start_with_tls(config: rustls::ServerConfig) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let state = Arc::new(RecvState::default());
        let acceptor = Arc::new(Mutex::new(tokio_rustls::TlsAcceptor::from(Arc::new(
            config,
        ))));
        let tls = TlsListener {
            tcp: listener,
            acceptor: acceptor.clone(),
            state: state.clone(),
        };
        let mut receiver = Self::serve_with(tls, true, state);
        receiver.acceptor = Some(acceptor);
        receiver
    }

    /// New connections get `config` from now on (an HTTPS receiver that rotates its
    /// certificate or the CA it requires client certificates from).
    pub fn set_tls(&self, config: rustls::ServerConfig) {
        let acceptor = self.acceptor.as_ref().expect("an HTTPS receiver");
        *lock(acceptor) = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    }

    /// Answers with `Connection: close`, so that the client opens a new connection (and makes
    /// a new TLS handshake) for every request.
    pub fn close_connections(&self) {
        self.state.close_connections.store(true, Ordering::SeqCst);
    }

    /// Why TLS handshakes with this receiver failed, in order.
    pub fn tls_failures(&self) -> Vec<String> {
        lock(&self.state.tls_failures).clone()
    }

    fn serve<L>(listener: L, tls: bool, recording: Recording) -> Receiver
    where
        L: axum::serve::Listener<Addr = SocketAddr>,
    {
        let state = Arc::new(RecvState {
            recording,
            ..Default::default()
        });
        Self::serve_with(listener, tls, state)
    }

    fn serve_with<L>(listener: L, tls: bool, state: Arc<RecvState>) -> Receiver
    where
        L: axum::serve::Listener<Addr = SocketAddr>,
    {
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
            acceptor: None,
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
        *lock(&self.state.hold) = Some(Arc::new(tokio::sync::Semaphore::new(0)));
    }

    /// Lets every held (and future) request finish.
    pub fn release(&self) {
        if let Some(sem) = lock(&self.state.hold).take() {
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

    /// The next `n` requests are answered with `status` (and `Retry-After` if set).
    pub fn fail_next(&self, n: usize, status: u16) {
        self.state.fail_status.store(status, Ordering::SeqCst);
        self.state.fail_left.store(n, Ordering::SeqCst);
    }

    /// Failures carry `Retry-After: <secs>`.
    pub fn set_retry_after(&self, secs: u64) {
        self.state.retry_after.store(secs, Ordering::SeqCst);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state.requests).clone()
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

    /// Waits until a request with this `X-Request-Id` was recorded.
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
        lock(&self.state.arrivals)
            .iter()
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Every request's `X-Request-Id` and arrival time, in arrival order (2xx or not).
    pub fn timed_arrivals(&self) -> Vec<(String, Instant)> {
        lock(&self.state.arrivals).clone()
    }

    /// When each request for `id` arrived.
    pub fn arrival_times(&self, id: &str) -> Vec<Instant> {
        lock(&self.state.arrivals)
            .iter()
            .filter(|(i, _)| i == id)
            .map(|(_, t)| *t)
            .collect()
    }

    /// When the first request after `since` arrived (2xx or not), if one did.
    pub fn first_arrival_after(&self, since: Instant) -> Option<Instant> {
        lock(&self.state.arrivals)
            .iter()
            .map(|(_, t)| *t)
            .filter(|t| *t >= since)
            .min()
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
        lock(&self.state.ok_counts).clone()
    }

    /// How many distinct ids were answered with 2xx.
    pub fn delivered_distinct(&self) -> usize {
        lock(&self.state.ok_counts).len()
    }

    /// How many of `ids` were answered with 2xx at least once.
    pub fn delivered_of(&self, ids: &[String]) -> usize {
        let counts = lock(&self.state.ok_counts);
        ids.iter().filter(|id| counts.contains_key(*id)).count()
    }

    /// How many distinct ids starting with `prefix` were answered with 2xx.
    pub fn delivered_with_prefix(&self, prefix: &str) -> usize {
        lock(&self.state.ok_counts)
            .keys()
            .filter(|id| id.starts_with(prefix))
            .count()
    }

    /// How many ids starting with `prefix` were answered with 2xx more than once.
    pub fn delivered_twice_with_prefix(&self, prefix: &str) -> usize {
        lock(&self.state.ok_counts)
            .iter()
            .filter(|(id, &n)| id.starts_with(prefix) && n > 1)
            .count()
    }

    /// Distinct ids answered with 2xx on `path` (either recording).
    pub fn unique(&self, path: &str) -> usize {
        lock(&self.state.counts)
            .by_path
            .get(path)
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Requests answered with 2xx on `path`, ids or not (either recording).
    pub fn answered(&self, path: &str) -> u64 {
        lock(&self.state.counts)
            .by_path
            .get(path)
            .map(|m| m.values().map(|&c| u64::from(c)).sum())
            .unwrap_or(0)
    }

    /// Ids answered with 2xx on `path` more than once (either recording).
    pub fn duplicates(&self, path: &str) -> usize {
        lock(&self.state.counts)
            .by_path
            .get(path)
            .map(|m| m.values().filter(|&&c| c > 1).count())
            .unwrap_or(0)
    }

    /// Starts or stops recording each request's latency: its arrival time less the publish time
    /// in the body's `"sent_ns":<nanoseconds since the epoch>`. Either recording.
    pub fn record_latency(&self, on: bool) {
        self.state.record_latency.store(on, Ordering::Relaxed);
    }

    /// The latencies recorded so far, in nanoseconds; clears them.
    pub fn take_latencies_ns(&self) -> Vec<u64> {
        std::mem::take(&mut lock(&self.state.counts).latencies_ns)
    }
}

/// TLS over a TCP listener for axum; failed handshakes (a client refusing our certificate, or
/// not presenting one we accept) are recorded and skipped, not fatal.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: Arc<Mutex<tokio_rustls::TlsAcceptor>>,
    state: Arc<RecvState>,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.tcp.accept().await else {
                continue;
            };
            let acceptor = lock(&self.acceptor).clone();
            match acceptor.accept(stream).await {
                Ok(tls) => return (tls, addr),
                Err(e) => lock(&self.state.tls_failures).push(e.to_string()),
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
    version: axum::http::Version,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut response = match state.recording {
        Recording::Counts => count_only(&state, &uri, &headers, &body),
        Recording::Full => record_whole(&state, method, version, uri, headers, body).await,
    };
    if state.close_connections.load(Ordering::SeqCst) {
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}

/// [`Recording::Counts`]: one lock, one map entry, and a latency while those are recorded.
fn count_only(state: &RecvState, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Response {
    let arrived = crate::now_ns();
    let id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let sent = if state.record_latency.load(Ordering::Relaxed) {
        sent_ns(body)
    } else {
        None
    };
    {
        let mut counts = lock(&state.counts);
        *counts
            .by_path
            .entry(uri.path().to_string())
            .or_default()
            .entry(id)
            .or_insert(0) += 1;
        if let Some(s) = sent {
            counts.latencies_ns.push(arrived.saturating_sub(s));
        }
    }
    "ok".into_response()
}

/// The publish time a body carries as `"sent_ns":<digits>`.
pub fn sent_ns(body: &[u8]) -> Option<u64> {
    let key = b"\"sent_ns\":";
    let at = body.windows(key.len()).position(|w| w == key)? + key.len();
    let digits: Vec<u8> = body[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .copied()
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// [`Recording::Full`]: redirects, failures, delays and holds, and the whole request recorded.
async fn record_whole(
    state: &RecvState,
    method: Method,
    version: axum::http::Version,
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
        version: format!("{version:?}"),
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
    let arrived_at = crate::now_ns();
    lock(&state.arrivals).push((recorded.id(), Instant::now()));
    if state.record_latency.load(Ordering::Relaxed) {
        if let Some(sent) = sent_ns(&recorded.body) {
            lock(&state.counts)
                .latencies_ns
                .push(arrived_at.saturating_sub(sent));
        }
    }
    let body_delay = serde_json::from_slice::<serde_json::Value>(&recorded.body)
        .ok()
        .and_then(|v| v.get("delay_ms").and_then(|d| d.as_u64()))
        .unwrap_or(0);
    if body_delay > 0 {
        tokio::time::sleep(Duration::from_millis(body_delay)).await;
    }
    let hold = lock(&state.hold).clone();
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
