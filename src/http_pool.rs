//! The connections deliveries go out on, kept per origin: HTTP/1.1 connections that the
//! delivering task drives itself, and one shared HTTP/2 connection where the partner picks `h2`.
//!
//! An HTTP/1.1 connection carries one request at a time, so it needs no task of its own: the
//! attempt that holds it writes the request and reads the answer on it while it waits, and hands
//! it back to the pool when the answer's body ends. A connection task (hyper-util's pooled
//! client) costs two wakes of another task per request, and a thread hop when that task runs on
//! the other worker: 3 to 4.5 µs of a fanout delivery's 23 to 25
//! (docs/performance.md#connections-driven-by-the-attempt). An idle connection is looked at
//! when it is taken (a closed one, or one still writing its last request, is dropped and the
//! next one or a new one used) and by a sweep every [`SWEEP_EVERY`], which closes the ones idle
//! for [`IDLE_TIMEOUT`] and the ones the partner closed. What the pool promises:
//! docs/delivery.md#why-an-attempt-drives-its-own-connection.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::hash::{Hash, Hasher};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper::header::{HeaderValue, HOST};
use hyper::http::uri::{Authority, Scheme};
use hyper::{Request, Response, Uri};
use hyper_util::rt::TokioExecutor;

use crate::http_client::{Body, Conn, Connector};

/// How long an idle connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How often idle connections are looked at for the timeout and for a close by the partner.
pub const SWEEP_EVERY: Duration = Duration::from_secs(15);

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type H1Conn = http1::Connection<Conn, Body>;

/// A request that got no answer. The messages match hyper-util's client, which delivered before,
/// so logs and dead letters read the same: `client error (Connect): <cause>`.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection: DNS, TCP, the TLS handshake or the proxy's tunnel failed.
    #[error("client error (Connect)")]
    Connect(#[source] BoxError),
    /// The connection failed or closed before the answer.
    #[error("client error (SendRequest)")]
    Request(#[source] hyper::Error),
    /// The request's URL has no scheme or host (not expected: destination URLs are checked).
    #[error("the request URL {0} has no scheme or host")]
    Url(Uri),
}

/// A copy of an HTTP/2 request, to send again if the partner refuses it unprocessed.
fn copy(request: &Request<Body>) -> Request<Body> {
    let mut copy = Request::new(request.body().clone());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// The HTTP/2 error of a failed request, if it is one.
fn h2_error(error: &hyper::Error) -> Option<&h2::Error> {
    std::error::Error::source(error)?.downcast_ref::<h2::Error>()
}

/// Whether the partner reset the request's stream with `REFUSED_STREAM`, which says it did not
/// process it and makes sending it again safe (RFC 9113, section 8.7). A stream above the last
/// stream id of a GOAWAY was not processed either, but hyper reports the same error for a
/// request whose stream it had just sent when the GOAWAY came, which a partner's first GOAWAY
/// of a graceful shutdown (last stream id 2^31 - 1) still lets it process: those fail, and the
/// retry policy decides.
fn refused_unprocessed(error: &hyper::Error) -> bool {
    h2_error(error).is_some_and(|e| {
        e.is_remote() && e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM)
    })
}

/// The scheme and authority requests share connections by.
#[derive(Clone, PartialEq, Eq)]
struct Origin {
    scheme: Scheme,
    authority: Authority,
}

/// Feeds the hasher what `http`'s own `Hash` does (the scheme, then the authority's length and
/// its bytes in lower case, as its case-blind `Eq` needs), but the bytes in one write instead
/// of a `write_u8` each: every request looks its origin up twice, and SipHash byte by byte
/// cost about 1,000 instructions a look.
impl Hash for Origin {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.scheme.hash(state);
        let authority = self.authority.as_str().as_bytes();
        state.write_usize(authority.len());
        let mut lower = [0u8; 64];
        for chunk in authority.chunks(lower.len()) {
            let lower = &mut lower[..chunk.len()];
            lower.copy_from_slice(chunk);
            lower.make_ascii_lowercase();
            state.write(lower);
        }
    }
}

impl Origin {
    fn of(uri: &Uri) -> Option<Origin> {
        Some(Origin {
            scheme: uri.scheme()?.clone(),
            authority: uri.authority()?.clone(),
        })
    }
}

/// An HTTP/1.1 connection and its request side.
struct H1 {
    sender: http1::SendRequest<Body>,
    /// `None` once the connection has closed.
    conn: Option<H1Conn>,
    /// The error the connection closed with, if it closed with one while a request waited on
    /// it. The request then fails with hyper's "channel closed", which does not say why: a
    /// TLS 1.3 partner refuses a client certificate with an alert after the handshake, and
    /// that alert is here.
    closed_with: Option<hyper::Error>,
    /// Whether requests go to a proxy in absolute form.
    proxied: bool,
}

impl H1 {
    /// The error a request on this connection failed with: the connection's own, when it
    /// closed with one, else the request's.
    fn failed(&mut self, error: hyper::Error) -> SendError {
        SendError::Request(self.closed_with.take().unwrap_or(error))
    }

    /// Whether the connection has closed, read without waiting.
    fn poll_closed(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let closed = self
            .conn
            .as_mut()
            .is_none_or(|conn| Pin::new(conn).poll(&mut cx).is_ready());
        if closed {
            self.conn = None;
        }
        closed
    }
}

/// What one origin has open.
#[derive(Default)]
struct Open {
    /// Boxed, so that taking one out and lending it moves a pointer, not the connection.
    idle: Vec<(Box<H1>, Instant)>,
    h2: Option<H2>,
    /// Set while the origin speaks `h2`, and for an `https` origin before its first connection
    /// shows whether it does: a request that finds no connection takes its turn here, so that
    /// one new connection is made and shared. After a GOAWAY every request under way finds none
    /// at once, as does a burst of first requests, and each would otherwise make its own.
    h2_turn: Option<Arc<Turn>>,
}

/// Turns at making the one HTTP/2 connection of an origin: the connect under way, which every
/// request that finds no connection awaits instead of making its own.
#[derive(Default)]
struct Turn {
    connecting: Mutex<Option<Connecting>>,
}

/// A connect made for a turn, on a task of its own: a request that stops waiting for it (its
/// attempt's timeout) leaves it running for the others. It ends with its connection in the
/// pool.
type Connecting = futures_util::future::Shared<
    std::pin::Pin<Box<dyn Future<Output = Result<(), Shared>> + Send>>,
>;

/// Clears its turn's connect when dropped.
struct EndOfConnect(Arc<Turn>);

impl Drop for EndOfConnect {
    fn drop(&mut self) {
        *self
            .0
            .connecting
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// A connect failure handed to every request that waited for the turn that met it.
#[derive(Debug, Clone)]
struct Shared(Arc<BoxError>);

impl std::fmt::Display for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Shared {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// A shared HTTP/2 connection's request side, and its name in the pool.
#[derive(Clone)]
struct H2 {
    id: u64,
    sender: http2::SendRequest<Body>,
}

/// The connections of one HTTP client (one set of connection settings); cheap to clone.
#[derive(Clone)]
pub(crate) struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    connector: Connector,
    /// How long a turn's connect may take. It runs on a task of its own, which no attempt's
    /// timeout ends: a partner that takes the TCP connection and never answers the TLS
    /// handshake would otherwise hold the turn, and every request to it, forever.
    connect_timeout: Duration,
    /// Every destination with the same connection settings shares the pool, so there may be
    /// many origins.
    origins: Mutex<HashMap<Origin, Open>>,
    /// Names each shared HTTP/2 connection, so that one found closed is not mistaken for the
    /// one that replaced it.
    next_h2: AtomicU64,
    /// Whether the sweep task runs: started with the first idle connection, on the runtime
    /// that made it.
    sweeping: AtomicBool,
}

impl Pool {
    /// A pool whose shared connects give up after `connect_timeout`: the `timeout` of the
    /// destinations it serves, which would end each of their attempts by then.
    pub(crate) fn new(connector: Connector, connect_timeout: Duration) -> Pool {
        Pool {
            inner: Arc::new(Inner {
                connector,
                connect_timeout,
                origins: Mutex::new(HashMap::new()),
                next_h2: AtomicU64::new(0),
                sweeping: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `request` on an idle connection to its origin, or a new one, and returns the
    /// answer's head. The body is read by the caller; reading it to its end gives the
    /// connection back. A request that an idle connection could not take (the partner closed
    /// it) goes on the next connection; one that was written is sent twice only when an HTTP/2
    /// partner said it did not process it ([`refused_unprocessed`]), and then only once more.
    pub(crate) async fn send(
        &self,
        mut request: Request<Body>,
    ) -> Result<Response<Answer>, SendError> {
        let Some(origin) = Origin::of(request.uri()) else {
            return Err(SendError::Url(request.uri().clone()));
        };
        // Whether the request was refused unprocessed once already: it is sent again only once,
        // so a partner that refuses everything meets the retry policy's backoff, not a loop.
        let mut refused = false;
        loop {
            let (connection, reused) = match self.inner.take(&origin) {
                Some(open) => (open, true),
                // Boxed: making a connection (TCP, TLS, a proxy's tunnel) takes a large future,
                // which would otherwise make every request's future, and each move of it,
                // larger.
                None => Box::pin(self.connect_in_turn(&origin, request.uri())).await?,
            };
            let mut h1 = match connection {
                Connected::H1(h1) => h1,
                Connected::H2(mut h2) => {
                    if let Err(error) = h2.sender.ready().await {
                        self.inner.forget_h2(&origin, h2.id);
                        match reused {
                            true => continue,
                            false => return Err(SendError::Request(error)),
                        }
                    }
                    // Kept until the answer: hyper does not give back a request that the
                    // partner refused unprocessed.
                    let again = (!refused).then(|| copy(&request));
                    match h2.sender.try_send_request(request).await {
                        Ok(response) => return Ok(response.map(Answer::plain)),
                        Err(mut error) => match (error.take_message(), again) {
                            // Not sent: the connection closed (a GOAWAY) before it took the
                            // request.
                            (Some(unsent), _) if reused => {
                                self.inner.forget_h2(&origin, h2.id);
                                request = unsent;
                                continue;
                            }
                            (None, Some(again)) if refused_unprocessed(error.error()) => {
                                tracing::debug!(
                                    host = origin.authority.host(),
                                    error = %crate::error_chain(error.error()),
                                    "the partner refused a request unprocessed; sending it once more"
                                );
                                refused = true;
                                request = again;
                                continue;
                            }
                            _ => return Err(SendError::Request(error.into_error())),
                        },
                    }
                }
            };
            // What arrived while it was idle is read first, so that a close by the partner (its
            // keep-alive ran out) shows before a request is written to it.
            if reused && h1.poll_closed() {
                continue;
            }
            // Still busy with the last request (its body not all written, the partner having
            // answered early): waiting could take until the timeout, so a new one is used.
            if reused && !h1.sender.is_ready() {
                continue;
            }
            if let Err(error) = driving(&mut h1.conn, &mut h1.closed_with, h1.sender.ready()).await
            {
                match reused {
                    // Closed while idle: the partner's keep-alive ran out.
                    true => continue,
                    false => return Err(h1.failed(error)),
                }
            }
            // Over HTTP/1.1 only: HTTP/2 carries the host in the request's `:authority`.
            if !request.headers().contains_key(HOST) {
                if let Some(host) = host_header(request.uri()) {
                    request.headers_mut().insert(HOST, host);
                }
            }
            let uri = request.uri().clone();
            if !h1.proxied {
                *request.uri_mut() = origin_form(&uri);
            }
            let sent = h1.sender.try_send_request(request);
            match driving(&mut h1.conn, &mut h1.closed_with, sent).await {
                Ok(response) => {
                    let lease = Lease {
                        pool: self.clone(),
                        origin,
                        h1,
                    };
                    return Ok(response.map(|body| Answer {
                        body,
                        lease: Some(lease),
                    }));
                }
                Err(mut error) => match error.take_message() {
                    // Not written: the connection closed before it could take the request.
                    Some(unsent) if reused => {
                        request = unsent;
                        *request.uri_mut() = uri;
                    }
                    _ => return Err(h1.failed(error.into_error())),
                },
            }
        }
    }

    /// A connection for a request that found none, and whether the request may go on to
    /// another one should it turn out closed (`reused`: one from the pool that the request did
    /// not wait to be made). To an origin that speaks HTTP/2, or an `https` one not connected
    /// to yet (it may pick `h2`), requests take turns: one connect is made, on a task of its
    /// own, and the requests that find no connection while it runs wait for it and then take
    /// the connection it made; when it cannot connect, they fail with its cause, as each would
    /// have failed on its own, rather than trying again one after another. A request that
    /// comes after it ended makes the next one. When the connection is HTTP/1.1 (it carries one
    /// request), the requests that waited and did not get it make theirs side by side.
    async fn connect_in_turn(
        &self,
        origin: &Origin,
        uri: &Uri,
    ) -> Result<(Connected, bool), SendError> {
        let Some(turn) = self.inner.turn(origin) else {
            return Ok((self.connect(origin, uri).await?, false));
        };
        let connecting = {
            let mut current = turn
                .connecting
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // A connect that ended between this request's look at the pool and here.
            if let Some(made) = self.inner.take(origin) {
                return Ok((made, true));
            }
            current
                .get_or_insert_with(|| self.connect_for(&turn, origin, uri))
                .clone()
        };
        connecting
            .await
            .map_err(|failure| SendError::Connect(Box::new(failure)))?;
        match self.inner.take(origin) {
            // Made for this request, which fails rather than waits for another turn if the
            // connection fails at once.
            Some(Connected::H2(h2)) => Ok((Connected::H2(h2), false)),
            // The turn's own, or one that an answer gave back meanwhile: looked at as any idle
            // connection is.
            Some(h1) => Ok((h1, true)),
            None => Ok((self.connect(origin, uri).await?, false)),
        }
    }

    /// Starts the connect of `turn`: its connection goes into the pool, as an HTTP/2 one
    /// always does and an HTTP/1.1 one does idle, for a request that waited to take.
    fn connect_for(&self, turn: &Arc<Turn>, origin: &Origin, uri: &Uri) -> Connecting {
        let (pool, turn, origin, uri) = (self.clone(), turn.clone(), origin.clone(), uri.clone());
        let task = tokio::spawn(async move {
            // Ends the turn's connect when the task ends, also by a panic or the runtime's
            // shutdown, so that the next request to find no connection makes a new one rather
            // than gets this one's end for ever. It ends before the requests that wait go on.
            let _ended = EndOfConnect(turn);
            let limit = pool.inner.connect_timeout;
            let made = match tokio::time::timeout(limit, pool.connect(&origin, &uri)).await {
                Ok(Ok(Connected::H1(h1))) => {
                    pool.put(origin, h1);
                    Ok(())
                }
                Ok(Ok(Connected::H2(_))) => Ok(()),
                Ok(Err(SendError::Connect(cause))) => Err(Shared(Arc::new(cause))),
                Ok(Err(other)) => Err(Shared(Arc::new(Box::new(other)))),
                Err(_) => {
                    let timed_out = std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "no connection within the timeout of {}",
                            humantime::format_duration(limit)
                        ),
                    );
                    Err(Shared(Arc::new(Box::new(timed_out))))
                }
            };
            made
        });
        let joined = async move {
            task.await
                .unwrap_or_else(|panicked| Err(Shared(Arc::new(Box::new(panicked)))))
        };
        futures_util::FutureExt::shared(Box::pin(joined) as std::pin::Pin<Box<_>>)
    }

    /// A new connection to `origin`: an HTTP/1.1 one for the caller, or an HTTP/2 one, which
    /// goes into the pool for every request to share.
    async fn connect(&self, origin: &Origin, uri: &Uri) -> Result<Connected, SendError> {
        let conn = self
            .inner
            .connector
            .clone()
            .connect(uri.clone())
            .await
            .map_err(SendError::Connect)?;
        let proxied = conn.proxied;
        if conn.h2 {
            let (sender, connection) = http2::handshake(TokioExecutor::new(), conn)
                .await
                .map_err(|e| SendError::Connect(e.into()))?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(error = %crate::error_chain(&error), "HTTP/2 connection closed");
                }
            });
            let h2 = H2 {
                id: self.inner.next_h2.fetch_add(1, Ordering::Relaxed),
                sender,
            };
            let mut origins = self.inner.lock();
            let open = origins.entry(origin.clone()).or_default();
            open.h2 = Some(h2.clone());
            open.h2_turn.get_or_insert_with(Default::default);
            return Ok(Connected::H2(h2));
        }
        // No longer HTTP/2 (the partner changed what it offers): HTTP/1.1 connections are made
        // side by side, not in turns.
        if let Some(open) = self.inner.lock().get_mut(origin) {
            open.h2_turn = None;
        }
        let (sender, conn) = http1::handshake(conn)
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        Ok(Connected::H1(Box::new(H1 {
            sender,
            conn: Some(conn),
            closed_with: None,
            proxied,
        })))
    }

    /// Takes `h1` back as idle once its answer has been read to the end.
    fn put(&self, origin: Origin, h1: Box<H1>) {
        if h1.conn.is_none() {
            return;
        }
        self.inner
            .lock()
            .entry(origin)
            .or_default()
            .idle
            .push((h1, Instant::now()));
        if !self.inner.sweeping.swap(true, Ordering::Relaxed) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(sweep(Arc::downgrade(&self.inner)));
                }
                Err(_) => self.inner.sweeping.store(false, Ordering::Relaxed),
            }
        }
    }

    /// How many idle HTTP/1.1 connections the pool holds, over all origins (for tests).
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.inner.lock().values().map(|o| o.idle.len()).sum()
    }
}

enum Connected {
    H1(Box<H1>),
    H2(H2),
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Origin, Open>> {
        // The map holds no invariant a panic could break half-way.
        self.origins.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops the shared HTTP/2 connection `id` of `origin`, which has closed, unless another
    /// has replaced it already.
    fn forget_h2(&self, origin: &Origin, id: u64) {
        if let Some(open) = self.lock().get_mut(origin) {
            if open.h2.as_ref().is_some_and(|h2| h2.id == id) {
                open.h2 = None;
            }
        }
    }

    /// Where a request to `origin` that found no connection waits for its turn to make one: the
    /// origin's turns if it speaks HTTP/2, and for an `https` origin not connected to yet (or
    /// not since the sweep let it go), new turns.
    fn turn(&self, origin: &Origin) -> Option<Arc<Turn>> {
        let mut origins = self.lock();
        if let Some(open) = origins.get(origin) {
            return open.h2_turn.clone();
        }
        if origin.scheme != Scheme::HTTPS {
            return None;
        }
        let turn = Arc::new(Turn::default());
        let open = Open {
            h2_turn: Some(turn.clone()),
            ..Open::default()
        };
        origins.insert(origin.clone(), open);
        Some(turn)
    }

    /// A connection to `origin` to send on, in one look: its shared HTTP/2 connection, or else
    /// the most recently used idle HTTP/1.1 one that has not timed out.
    fn take(&self, origin: &Origin) -> Option<Connected> {
        let mut origins = self.lock();
        let open = origins.get_mut(origin)?;
        if let Some(h2) = &open.h2 {
            return Some(Connected::H2(h2.clone()));
        }
        while let Some((h1, since)) = open.idle.pop() {
            if since.elapsed() < IDLE_TIMEOUT {
                return Some(Connected::H1(h1));
            }
        }
        None
    }

    /// Closes the connections idle for [`IDLE_TIMEOUT`] and the ones their partner closed.
    fn sweep(&self) {
        let mut origins = self.lock();
        for open in origins.values_mut() {
            open.idle
                .retain_mut(|(h1, since)| since.elapsed() < IDLE_TIMEOUT && !h1.poll_closed());
            if open.h2.as_ref().is_some_and(|h2| h2.sender.is_closed()) {
                open.h2 = None;
            }
        }
        // An origin with turns (HTTP/2, or not known yet) is kept for them.
        origins
            .retain(|_, open| !open.idle.is_empty() || open.h2.is_some() || open.h2_turn.is_some());
    }
}

/// Sweeps `pool` every [`SWEEP_EVERY`] until it is dropped.
async fn sweep(pool: Weak<Inner>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(pool) = pool.upgrade() else { return };
        pool.sweep();
    }
}

/// `work`'s output, with `conn` driven while it waits, as a connection task would drive it.
/// `conn` becomes `None` when the connection closes, and the error it closed with goes to
/// `closed_with`; `work` then ends with hyper's error.
async fn driving<F: Future>(
    conn: &mut Option<H1Conn>,
    closed_with: &mut Option<hyper::Error>,
    work: F,
) -> F::Output {
    let mut work = pin!(work);
    poll_fn(|cx| {
        let mut driven = false;
        loop {
            if let Poll::Ready(out) = work.as_mut().poll(cx) {
                return Poll::Ready(out);
            }
            // Once more after the connection is driven: what it read or wrote may end `work`.
            if driven {
                return Poll::Pending;
            }
            driven = true;
            match conn.as_mut() {
                Some(open) => {
                    if let Poll::Ready(closed) = Pin::new(open).poll(cx) {
                        *conn = None;
                        *closed_with = closed.err();
                    }
                }
                None => return Poll::Pending,
            }
        }
    })
    .await
}

/// An HTTP/1.1 connection lent to one answer until its body ends.
struct Lease {
    pool: Pool,
    origin: Origin,
    h1: Box<H1>,
}

/// An answer's body. On an HTTP/1.1 connection, reading it drives the connection, and its end
/// gives the connection back to the pool; dropping it before the end closes the connection.
pub struct Answer {
    body: Incoming,
    lease: Option<Lease>,
}

impl Answer {
    fn plain(body: Incoming) -> Answer {
        Answer { body, lease: None }
    }
}

impl hyper::body::Body for Answer {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let mut driven = false;
        loop {
            if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
                if frame.is_none() {
                    if let Some(lease) = this.lease.take() {
                        lease.pool.put(lease.origin, lease.h1);
                    }
                }
                return Poll::Ready(frame);
            }
            // As in `driving`: the connection once, then the body once more.
            if driven {
                return Poll::Pending;
            }
            driven = true;
            let Some(conn) = this.lease.as_mut().and_then(|l| l.h1.conn.as_mut()) else {
                return Poll::Pending;
            };
            if Pin::new(conn).poll(cx).is_ready() {
                // Closed: the body ends with hyper's error, and the connection is not given back.
                this.lease = None;
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// `uri` as an HTTP/1.1 request line names it to the server itself: the path and query.
fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(path) if path.as_str() != "/" => Uri::from(path.clone()),
        _ => Uri::from_static("/"),
    }
}

/// The `Host` header for `uri`: its host, and its port unless the scheme's default.
fn host_header(uri: &Uri) -> Option<HeaderValue> {
    let host = uri.host()?;
    let default = match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    let value = match uri.port_u16() {
        Some(port) if port != default => format!("{host}:{port}"),
        _ => host.to_string(),
    };
    HeaderValue::from_str(&value).ok()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use http_body_util::{BodyExt as _, Full};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// How the test server ends each answer.
    #[derive(Clone, Copy)]
    enum Then {
        /// Keeps the connection open for the next request.
        KeepAlive,
        /// Says `connection: close` and closes.
        SayClose,
    }

    /// A loopback HTTP/1.1 server that answers every request `200` with the body `ok` and
    /// counts the connections it accepted and the requests it answered.
    struct Server {
        url: String,
        accepted: Arc<AtomicUsize>,
        answered: Arc<AtomicUsize>,
        /// Closes every connection that waits for a request, as a keep-alive timeout does.
        close_idle: Arc<tokio::sync::Notify>,
    }

    impl Server {
        async fn start(then: Then) -> Server {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let url = format!("http://{}/in", listener.local_addr().expect("addr"));
            let accepted = Arc::new(AtomicUsize::new(0));
            let answered = Arc::new(AtomicUsize::new(0));
            let close_idle = Arc::new(tokio::sync::Notify::new());
            let (acc, ans, close) = (accepted.clone(), answered.clone(), close_idle.clone());
            tokio::spawn(async move {
                while let Ok((mut socket, _)) = listener.accept().await {
                    acc.fetch_add(1, Ordering::SeqCst);
                    let (ans, close) = (ans.clone(), close.clone());
                    tokio::spawn(async move {
                        let mut seen = Vec::new();
                        let mut buf = [0u8; 4096];
                        loop {
                            // A request is a head and a 2-byte body (`{}`) in these tests.
                            while !seen.windows(6).any(|w| w == b"\r\n\r\n{}") {
                                let read = tokio::select! {
                                    read = socket.read(&mut buf) => read,
                                    () = close.notified(), if seen.is_empty() => return,
                                };
                                match read {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                                }
                            }
                            seen.clear();
                            let close = match then {
                                Then::SayClose => "connection: close\r\n",
                                _ => "",
                            };
                            let answer =
                                format!("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n{close}\r\nok");
                            if socket.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                            ans.fetch_add(1, Ordering::SeqCst);
                            if !matches!(then, Then::KeepAlive) {
                                return;
                            }
                        }
                    });
                }
            });
            Server {
                url,
                accepted,
                answered,
                close_idle,
            }
        }

        /// Closes the idle connections and waits until the close has reached the client side.
        async fn close_idle(&self) {
            self.close_idle.notify_waiters();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }

        fn answered(&self) -> usize {
            self.answered.load(Ordering::SeqCst)
        }
    }

    fn pool() -> Pool {
        crate::http_client::HttpClient::for_tests().pool().clone()
    }

    fn post(url: &str) -> Request<Body> {
        let mut request = Request::new(Full::new(Bytes::from_static(b"{}")));
        *request.method_mut() = hyper::Method::POST;
        *request.uri_mut() = url.parse().expect("url");
        request
    }

    /// POSTs to `url` and reads the answer to its end.
    async fn round_trip(pool: &Pool, url: &str) -> Bytes {
        let response = pool.send(post(url)).await.expect("answer");
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.expect("body");
        body.to_bytes()
    }

    #[tokio::test]
    async fn one_connection_carries_requests_one_after_another() {
        let server = Server::start(Then::KeepAlive).await;
        let pool = pool();
        for _ in 0..3 {
            assert_eq!(round_trip(&pool, &server.url).await, "ok");
        }
        assert_eq!((server.accepted(), server.answered()), (1, 3));
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn requests_at_once_get_a_connection_each_and_give_them_back() {
        let server = Server::start(Then::KeepAlive).await;
        let pool = pool();
        for round in 1..=2 {
            let all = (0..8).map(|_| round_trip(&pool, &server.url));
            let bodies = futures_util::future::join_all(all).await;
            assert!(bodies.iter().all(|b| b == "ok"));
            assert_eq!(server.answered(), 8 * round);
        }
        // The second round found the first round's connections idle.
        assert_eq!(server.accepted(), 8);
        assert_eq!(pool.idle_count(), 8);
    }

    /// The partner closed the idle connection (its keep-alive ran out): the next request goes
    /// on a new connection and is not lost.
    #[tokio::test]
    async fn a_connection_closed_while_idle_is_not_used() {
        let server = Server::start(Then::KeepAlive).await;
        let pool = pool();
        assert_eq!(round_trip(&pool, &server.url).await, "ok");
        assert_eq!(pool.idle_count(), 1);
        server.close_idle().await;
        assert_eq!(round_trip(&pool, &server.url).await, "ok");
        assert_eq!((server.accepted(), server.answered()), (2, 2));
    }

    #[tokio::test]
    async fn an_answer_that_says_close_is_not_pooled() {
        let server = Server::start(Then::SayClose).await;
        let pool = pool();
        for _ in 0..2 {
            assert_eq!(round_trip(&pool, &server.url).await, "ok");
        }
        assert_eq!((server.accepted(), server.answered()), (2, 2));
    }

    /// A body not read to its end leaves the connection in the middle of an answer: it is
    /// closed, not given back.
    #[tokio::test]
    async fn an_unread_answer_closes_its_connection() {
        let server = Server::start(Then::KeepAlive).await;
        let pool = pool();
        let response = pool.send(post(&server.url)).await.expect("answer");
        drop(response);
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(round_trip(&pool, &server.url).await, "ok");
        assert_eq!(server.accepted(), 2);
    }

    /// The sweep closes what the partner closed and what has been idle too long, and keeps
    /// the rest.
    #[tokio::test]
    async fn the_sweep_drops_closed_and_expired_connections() {
        let open = Server::start(Then::KeepAlive).await;
        let closing = Server::start(Then::KeepAlive).await;
        let pool = pool();
        round_trip(&pool, &open.url).await;
        round_trip(&pool, &closing.url).await;
        assert_eq!(pool.idle_count(), 2);
        closing.close_idle().await;
        pool.inner.sweep();
        assert_eq!(pool.idle_count(), 1, "the closed one goes");
        for open in pool.inner.lock().values_mut() {
            for (_, since) in &mut open.idle {
                *since = since
                    .checked_sub(IDLE_TIMEOUT)
                    .expect("the machine has been up longer than the idle timeout");
            }
        }
        pool.inner.sweep();
        assert_eq!(pool.idle_count(), 0, "the expired one goes");
        assert!(pool.inner.lock().is_empty());
    }

    /// A partner that answers before it has read the whole request body, and then reads no
    /// more: the connection, still writing, is not waited on for the next request.
    #[tokio::test]
    async fn a_connection_still_writing_is_not_waited_on() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/in", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            // The first connection: the head, an early answer, then nothing read for a minute.
            let (mut first, _) = listener.accept().await.expect("accept");
            let _ = first.read(&mut buf).await;
            let early = "HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n";
            first.write_all(early.as_bytes()).await.expect("write");
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(60)).await;
                drop(first);
            });
            // The next: one small request, answered.
            let (mut next, _) = listener.accept().await.expect("accept");
            let mut seen = Vec::new();
            while !seen.windows(6).any(|w| w == b"\r\n\r\n{}") {
                match next.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let answer = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            next.write_all(answer.as_bytes()).await.expect("write");
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        let pool = pool();
        let mut large = post(&url);
        *large.body_mut() = Full::new(Bytes::from(vec![b' '; 16 * 1024 * 1024]));
        let response = pool.send(large).await.expect("early answer");
        assert_eq!(response.status(), 413);
        response.into_body().collect().await.expect("empty body");
        let next = tokio::time::timeout(Duration::from_secs(10), round_trip(&pool, &url)).await;
        assert_eq!(next.expect("not waited on"), "ok");
    }

    /// How an [`H2Server`] serves its connections, connection 1 above all.
    #[derive(Clone, Copy)]
    enum First {
        /// By hyper, with at most this many streams open at once.
        Hyper(u32),
        /// Frame by frame, by [`refusing`].
        Refusing(Refusal),
        /// By hyper, and every later connection is closed as soon as it is accepted, as by a
        /// partner that stopped listening.
        OnlyOne,
        /// Not at all: every connection is closed as soon as it is accepted.
        Closing,
        /// By hyper, each connection's TLS handshake 300 ms after it was accepted.
        SlowHandshake,
        /// Not at all: connection 1 is held open without a word of TLS; later ones by hyper.
        Hanging,
        /// By hyper over HTTP/1.1, which is all this server offers by ALPN, as every later
        /// connection.
        Http1Only,
    }

    /// A loopback HTTPS server that offers only `h2` (only HTTP/1.1 with
    /// [`First::Http1Only`]). It answers `200` with the number (from 1)
    /// of the connection in `x-conn`, and records the `x-request-id` of each request it takes
    /// with that number. A request with the id `hold<k>` is answered once `release` has reached
    /// `k + 1`.
    struct H2Server {
        url: String,
        ca_file: std::path::PathBuf,
        _dir: tempfile::TempDir,
        accepted: Arc<AtomicUsize>,
        seen: Arc<Mutex<Vec<(String, usize)>>>,
        /// How many requests have arrived.
        arrived: tokio::sync::watch::Receiver<usize>,
        release: tokio::sync::watch::Sender<usize>,
        /// Makes connection 1 shut down gracefully, as a server does at its limit of requests
        /// per connection or when it restarts: GOAWAY, then the requests it took are answered.
        goaway: Arc<tokio::sync::Notify>,
        /// Set once connection 1 has its GOAWAY queued: what it writes after comes after it.
        going_away: tokio::sync::watch::Receiver<bool>,
    }

    impl H2Server {
        async fn start(first: First) -> H2Server {
            let ca = courier_testkit::TestCa::new("h2 partner");
            let mut tls = courier_testkit::pki::server_config(&ca.server(&["127.0.0.1"]), &[]);
            tls.alpn_protocols = match first {
                First::Http1Only => vec![b"http/1.1".to_vec()],
                _ => vec![b"h2".to_vec()],
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
            let dir = tempfile::tempdir().expect("dir");
            let ca_file = ca.write(dir.path(), "ca.pem");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let url = format!("https://{}/in", listener.local_addr().expect("addr"));
            let accepted = Arc::new(AtomicUsize::new(0));
            let seen = Arc::new(Mutex::new(Vec::new()));
            let (arrive, arrived) = tokio::sync::watch::channel(0);
            let arrive = Arc::new(arrive);
            let (release, released) = tokio::sync::watch::channel(0);
            let (went, going_away) = tokio::sync::watch::channel(false);
            let went = Arc::new(went);
            let goaway = Arc::new(tokio::sync::Notify::new());
            let (acc, rec, shut) = (accepted.clone(), seen.clone(), goaway.clone());
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let n = acc.fetch_add(1, Ordering::SeqCst) + 1;
                    if matches!(first, First::Closing) || n > 1 && matches!(first, First::OnlyOne) {
                        drop(tcp);
                        continue;
                    }
                    let (acceptor, rec, arrive) = (acceptor.clone(), rec.clone(), arrive.clone());
                    let (released, shut, went) = (released.clone(), shut.clone(), went.clone());
                    tokio::spawn(async move {
                        if matches!(first, First::SlowHandshake) {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                        if n == 1 && matches!(first, First::Hanging) {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            return drop(tcp);
                        }
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let max_streams = match first {
                            First::Refusing(how) if n == 1 => {
                                return refusing(tls, how, rec, arrive).await
                            }
                            First::Hyper(max) if n == 1 => max,
                            _ => 100,
                        };
                        let service =
                            hyper::service::service_fn(move |request: Request<Incoming>| {
                                let id = request
                                    .headers()
                                    .get("x-request-id")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or_default()
                                    .to_string();
                                let hold = id
                                    .strip_prefix("hold")
                                    .and_then(|k| k.parse::<usize>().ok());
                                rec.lock().expect("seen").push((id, n));
                                arrive.send_modify(|a| *a += 1);
                                let mut released = released.clone();
                                async move {
                                    if let Some(k) = hold {
                                        let _ = released.wait_for(|r| *r > k).await;
                                    }
                                    let answer = hyper::Response::builder()
                                        .header("x-conn", n)
                                        .body(Full::new(Bytes::from_static(b"ok")))
                                        .expect("answer");
                                    Ok::<_, std::convert::Infallible>(answer)
                                }
                            });
                        let tls = hyper_util::rt::TokioIo::new(tls);
                        if matches!(first, First::Http1Only) {
                            let conn = hyper::server::conn::http1::Builder::new()
                                .serve_connection(tls, service);
                            let _ = conn.await;
                            return;
                        }
                        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .max_concurrent_streams(max_streams)
                            .serve_connection(tls, service);
                        let mut conn = pin!(conn);
                        if n == 1 {
                            tokio::select! {
                                _ = conn.as_mut() => return,
                                () = shut.notified() => {
                                    conn.as_mut().graceful_shutdown();
                                    went.send_replace(true);
                                }
                            }
                        }
                        let _ = conn.await;
                    });
                }
            });
            H2Server {
                url,
                ca_file,
                _dir: dir,
                accepted,
                seen,
                arrived,
                release,
                goaway,
                going_away,
            }
        }

        /// A server and a pool that trusts it, with connection 1 made by a request `first`,
        /// which it answers.
        async fn answering_first(first: First) -> (H2Server, Pool) {
            let server = H2Server::start(first).await;
            let pool = https_pool(&server.ca_file);
            assert_eq!(outcome(&pool, &server.url, "first").await, Ok(1));
            (server, pool)
        }

        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }

        /// The requests the server took, by id, each with the connections it came on.
        fn seen(&self) -> HashMap<String, Vec<usize>> {
            let mut seen = HashMap::<_, Vec<_>>::new();
            for (id, conn) in self.seen.lock().expect("seen").iter() {
                seen.entry(id.clone()).or_default().push(*conn);
            }
            seen
        }

        async fn wait_arrived(&self, n: usize) {
            let mut arrived = self.arrived.clone();
            arrived.wait_for(|a| *a >= n).await.expect("server runs");
        }

        /// Sends GOAWAY on connection 1 and waits until it is queued there.
        async fn go_away(&self) {
            self.goaway.notify_one();
            let mut going_away = self.going_away.clone();
            going_away.wait_for(|g| *g).await.expect("server runs");
        }
    }

    /// How a [`First::Refusing`] connection refuses streams.
    #[derive(Clone, Copy)]
    enum Refusal {
        /// A graceful GOAWAY with the last stream id 3; then stream 3 is answered.
        GoAway,
        /// Each reset with `REFUSED_STREAM`; streams 3 and later are answered.
        Reset,
        /// Every stream after stream 1 reset with `REFUSED_STREAM` once it has arrived.
        ResetAll,
    }

    /// Connection 1 of a [`First::Refusing`] server, frame by frame, to send what hyper's server
    /// does not: refusals of streams that have arrived. It answers stream 1, waits until streams
    /// 3, 5 and 7 have arrived whole, refuses 5 and 7 (so they were not processed) as `how`
    /// says, and reads until the client closes. `seen` gets `stream <id>` for each stream that
    /// arrived.
    async fn refusing(
        mut tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        how: Refusal,
        seen: Arc<Mutex<Vec<(String, usize)>>>,
        arrive: Arc<tokio::sync::watch::Sender<usize>>,
    ) {
        const DATA: u8 = 0;
        const HEADERS: u8 = 1;
        const SETTINGS: u8 = 4;
        const PING: u8 = 6;
        const RST_STREAM: u8 = 3;
        const GOAWAY: u8 = 7;
        const REFUSED_STREAM: [u8; 4] = [0, 0, 0, 7];
        const END_STREAM: u8 = 0x1;
        const ACK: u8 = 0x1;
        const END_HEADERS: u8 = 0x4;
        fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
            let len = u32::try_from(payload.len()).expect("a small frame");
            let mut out = len.to_be_bytes()[1..].to_vec();
            out.extend_from_slice(&[kind, flags]);
            out.extend_from_slice(&stream.to_be_bytes());
            out.extend_from_slice(payload);
            out
        }
        // `:status: 200` is entry 8 of HPACK's static table.
        let ok = |stream| frame(HEADERS, END_HEADERS | END_STREAM, stream, &[0x80 | 8]);
        let mut preface = [0u8; 24];
        if tls.read_exact(&mut preface).await.is_err() {
            return;
        }
        let _ = tls.write_all(&frame(SETTINGS, 0, 0, &[])).await;
        let mut whole = 0;
        loop {
            let mut head = [0u8; 9];
            if tls.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            if tls.read_exact(&mut payload).await.is_err() {
                return;
            }
            let mut out = match kind {
                SETTINGS if flags & ACK == 0 => frame(SETTINGS, ACK, 0, &[]),
                PING if flags & ACK == 0 => frame(PING, ACK, 0, &payload),
                _ => Vec::new(),
            };
            if kind == HEADERS {
                seen.lock()
                    .expect("seen")
                    .push((format!("stream {stream}"), 1));
                arrive.send_modify(|a| *a += 1);
            }
            if matches!(kind, DATA | HEADERS) && flags & END_STREAM != 0 {
                whole += 1;
                let last_stream_and_no_error = [0, 0, 0, 3, 0, 0, 0, 0];
                match (whole, how) {
                    (1, _) => out = ok(1),
                    (_, Refusal::ResetAll) => out = frame(RST_STREAM, 0, stream, &REFUSED_STREAM),
                    (4, Refusal::GoAway) => {
                        out = frame(GOAWAY, 0, 0, &last_stream_and_no_error);
                        out.extend_from_slice(&ok(3));
                    }
                    (4, Refusal::Reset) => {
                        out = frame(RST_STREAM, 0, 5, &REFUSED_STREAM);
                        out.extend_from_slice(&frame(RST_STREAM, 0, 7, &REFUSED_STREAM));
                        out.extend_from_slice(&ok(3));
                    }
                    (5.., Refusal::Reset) => out = ok(stream),
                    _ => {}
                }
            }
            if !out.is_empty() && tls.write_all(&out).await.is_err() {
                return;
            }
        }
    }

    /// A pool that trusts `ca_file`, as the one of a destination with `tls.ca_file`.
    fn https_pool(ca_file: &std::path::Path) -> Pool {
        https_pool_with_timeout(ca_file, "60s")
    }

    /// The same, with the destination's `timeout`.
    fn https_pool_with_timeout(ca_file: &std::path::Path, timeout: &str) -> Pool {
        let config = crate::config::Config::from_toml(&format!(
            "[rabbitmq]\nurl = \"amqp://127.0.0.1\"\nqueue = \"q\"\n\
             [[destinations]]\nname = \"a\"\nurl = \"https://127.0.0.1/\"\n\
             timeout = {timeout:?}\ntls = {{ ca_file = {:?} }}\n",
            ca_file.display().to_string()
        ))
        .expect("config");
        crate::install_crypto_provider();
        crate::http_client::Clients::default()
            .for_destination("destinations[0]", &config.destinations[0])
            .expect("client")
            .pool()
            .clone()
    }

    /// POSTs with `x-request-id: <id>`: the number of the connection that answered, or the
    /// error. It must end within 5 s.
    async fn outcome(pool: &Pool, url: &str, id: &str) -> Result<usize, String> {
        let mut request = post(url);
        let id = HeaderValue::from_str(id).expect("id");
        request.headers_mut().insert("x-request-id", id);
        let sent = async {
            let response = pool
                .send(request)
                .await
                .map_err(|e| crate::error_chain(&e))?;
            assert_eq!(response.status(), 200);
            let conn = response.headers().get("x-conn").cloned();
            response
                .into_body()
                .collect()
                .await
                .map_err(|e| crate::error_chain(&e))?;
            Ok(conn.map_or(1, |c| c.to_str().expect("x-conn").parse().expect("x-conn")))
        };
        tokio::time::timeout(Duration::from_secs(5), sent)
            .await
            .expect("the request ends")
    }

    /// `outcome` of each of `ids`, all sent at once: each reaches the pool's connection before
    /// any task of the connection runs.
    async fn outcomes(pool: &Pool, url: &str, ids: &[&str]) -> Vec<Result<usize, String>> {
        futures_util::future::join_all(ids.iter().map(|id| outcome(pool, url, id))).await
    }

    /// Waits until the pool's HTTP/2 connections have closed.
    async fn wait_h2_closed(pool: &Pool) {
        let closed = || {
            pool.inner
                .lock()
                .values()
                .all(|open| open.h2.as_ref().is_none_or(|h2| h2.sender.is_closed()))
        };
        let wait = async {
            while !closed() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("the connection closes");
    }

    /// Sends six requests at once, which must all fail to connect with the same error: the
    /// error.
    async fn six_fail_alike(pool: &Pool, url: &str) -> String {
        let results = outcomes(pool, url, &["c0", "c1", "c2", "c3", "c4", "c5"]).await;
        let errors: Vec<&String> = results
            .iter()
            .map(|r| r.as_ref().expect_err("no connection"))
            .collect();
        assert!(
            errors[0].starts_with("client error (Connect): "),
            "{errors:?}"
        );
        assert!(errors.iter().all(|e| e == &errors[0]), "{errors:?}");
        errors[0].clone()
    }

    /// Requests handed to the HTTP/2 connection after the GOAWAY reached it, before its task
    /// saw it: the connection gives them back unsent, and each goes, once, on one new
    /// connection, which the requests after share. The request the closed connection had
    /// taken is answered on it.
    // One thread: the test's requests reach the HTTP/2 connection's task only after the runtime
    // has read the GOAWAY that `go_away` queued, as it polls its I/O before the test again.
    #[tokio::test(flavor = "current_thread")]
    async fn requests_the_connection_had_not_taken_at_a_goaway_go_on_one_new_connection() {
        let (server, pool) = H2Server::answering_first(First::Hyper(100)).await;
        let held = tokio::spawn({
            let (pool, url) = (pool.clone(), server.url.clone());
            async move { outcomes(&pool, &url, &["hold0", "hold1"]).await }
        });
        server.wait_arrived(3).await;
        server.go_away().await;
        // The GOAWAY comes before this answer on the connection; `hold1` keeps it open.
        server.release.send_replace(1);
        let after = ["a0", "a1", "a2", "a3", "a4", "a5"];
        let results = outcomes(&pool, &server.url, &after).await;
        assert_eq!(results, vec![Ok(2); 6]);
        server.release.send_replace(2);
        assert_eq!(held.await.expect("held"), vec![Ok(1); 2]);
        assert_eq!(outcome(&pool, &server.url, "later").await, Ok(2));
        let seen = server.seen();
        assert_eq!(seen.len(), 10, "{seen:?}");
        for id in after.iter().chain(&["later"]) {
            assert_eq!(seen[*id], [2], "{id} once, on connection 2");
        }
        for id in ["first", "hold0", "hold1"] {
            assert_eq!(seen[id], [1], "{id} once, on connection 1");
        }
        assert_eq!(server.accepted(), 2, "one new connection");
    }

    /// Requests that wait for a stream (the partner allows 2 at once) when the GOAWAY comes:
    /// hyper has handed them to the HTTP/2 connection, which fails them without sending them
    /// (their streams would be above the GOAWAY's last stream id). They end with an error,
    /// reach the partner neither there nor on another connection, and the next request goes
    /// on a new connection.
    #[tokio::test]
    async fn requests_waiting_for_a_stream_at_a_goaway_fail_unsent() {
        let (server, pool) = H2Server::answering_first(First::Hyper(2)).await;
        let ids = ["hold0", "hold1", "w0", "w1", "w2", "w3"];
        let control = async {
            server.wait_arrived(3).await;
            server.go_away().await;
            server.release.send_replace(2);
        };
        let (results, ()) = tokio::join!(outcomes(&pool, &server.url, &ids), control);
        assert_eq!(results[..2], [Ok(1), Ok(1)]);
        for (id, result) in ids.iter().zip(&results).skip(2) {
            let error = result.as_ref().expect_err(id);
            assert!(error.contains("http2 error"), "{id}: {error}");
        }
        assert_eq!(outcome(&pool, &server.url, "later").await, Ok(2));
        let seen = server.seen();
        let taken: HashMap<&str, Vec<usize>> = [
            ("first", vec![1]),
            ("hold0", vec![1]),
            ("hold1", vec![1]),
            ("later", vec![2]),
        ]
        .into();
        assert_eq!(seen.len(), taken.len(), "{seen:?}");
        for (id, conns) in taken {
            assert_eq!(seen[id], conns, "{id}");
        }
        assert_eq!(server.accepted(), 2);
    }

    /// A GOAWAY whose last stream id is below streams the partner has received: those
    /// requests end with an error (hyper does not give them back), are not sent again, and
    /// the next request goes on a new connection.
    #[tokio::test]
    async fn requests_refused_by_a_goaway_end_with_an_error_and_are_not_resent() {
        let (server, pool) = H2Server::answering_first(First::Refusing(Refusal::GoAway)).await;
        let results = outcomes(&pool, &server.url, &["r0", "r1", "r2"]).await;
        // Streams 3, 5 and 7 in that order: the first is answered, the others refused.
        assert_eq!(results[0], Ok(1));
        for result in &results[1..] {
            let error = result.as_ref().expect_err("refused");
            assert!(error.contains("http2 error"), "{error}");
        }
        assert_eq!(outcome(&pool, &server.url, "later").await, Ok(2));
        let seen = server.seen();
        let streams = ["stream 1", "stream 3", "stream 5", "stream 7"];
        for id in streams {
            assert_eq!(seen[id], [1], "{id} arrived once");
        }
        assert_eq!(seen["later"], [2]);
        assert_eq!(seen.len(), streams.len() + 1, "{seen:?}");
        assert_eq!(server.accepted(), 2);
    }

    /// A request the partner refuses again is not sent a third time: its attempt fails, and
    /// the retry policy decides when to try again.
    #[tokio::test]
    async fn a_request_refused_twice_fails() {
        let (server, pool) = H2Server::answering_first(First::Refusing(Refusal::ResetAll)).await;
        let error = outcome(&pool, &server.url, "r").await.expect_err("refused");
        assert!(error.contains("refused stream"), "{error}");
        let seen = server.seen();
        assert_eq!(seen.len(), 3, "streams 1, 3 and 5: {seen:?}");
        assert_eq!(seen["stream 5"], [1]);
    }

    /// Streams reset with `REFUSED_STREAM` are sent once more, on the same connection, which
    /// stays open.
    #[tokio::test]
    async fn requests_reset_as_refused_are_sent_once_more() {
        let (server, pool) = H2Server::answering_first(First::Refusing(Refusal::Reset)).await;
        let results = outcomes(&pool, &server.url, &["r0", "r1", "r2"]).await;
        assert_eq!(results, [Ok(1), Ok(1), Ok(1)]);
        assert_eq!(outcome(&pool, &server.url, "later").await, Ok(1));
        let seen = server.seen();
        // 1 and 3 to 7 as above, 9 and 11 the two sent again, 13 the later request.
        for stream in [1, 3, 5, 7, 9, 11, 13] {
            assert_eq!(seen[&format!("stream {stream}")], [1], "stream {stream}");
        }
        assert_eq!(seen.len(), 7, "{seen:?}");
        assert_eq!(server.accepted(), 1);
    }

    /// The first requests to an `https` partner, all at once: the first connects, and the
    /// others, which wait for its turn, share the HTTP/2 connection it made.
    #[tokio::test]
    async fn a_first_burst_to_an_h2_partner_makes_one_connection() {
        let server = H2Server::start(First::Hyper(100)).await;
        let pool = https_pool(&server.ca_file);
        let results = outcomes(&pool, &server.url, &["c0", "c1", "c2", "c3", "c4", "c5"]).await;
        assert_eq!(results, vec![Ok(1); 6]);
        assert_eq!(server.accepted(), 1);
    }

    /// The same burst to a partner that picks HTTP/1.1: once the first connection shows it,
    /// the requests that waited make a connection each, and all six are at the partner at
    /// once.
    #[tokio::test]
    async fn a_first_burst_to_an_http1_partner_gets_a_connection_per_request() {
        let server = H2Server::start(First::Http1Only).await;
        let pool = https_pool(&server.ca_file);
        let ids = ["hold0", "hold1", "hold2", "hold3", "hold4", "hold5"];
        let control = async {
            server.wait_arrived(ids.len()).await;
            server.release.send_replace(ids.len());
        };
        let (results, ()) = tokio::join!(outcomes(&pool, &server.url, &ids), control);
        let mut conns: Vec<usize> = results.into_iter().map(|r| r.expect("answered")).collect();
        conns.sort_unstable();
        assert_eq!(conns, [1, 2, 3, 4, 5, 6]);
        assert_eq!(server.accepted(), 6);
    }

    /// A request that stops waiting while the turn's connect is under way (its attempt's
    /// timeout) leaves the connect running: the next request takes the connection it made.
    #[tokio::test]
    async fn a_connect_outlives_the_request_that_started_it() {
        let server = H2Server::start(First::SlowHandshake).await;
        let pool = https_pool(&server.ca_file);
        let gave_up = outcome(&pool, &server.url, "gave-up");
        let gave_up = tokio::time::timeout(Duration::from_millis(50), gave_up).await;
        assert!(gave_up.is_err(), "{gave_up:?}");
        assert_eq!(outcome(&pool, &server.url, "next").await, Ok(1));
        assert_eq!(server.accepted(), 1);
        assert_eq!(server.seen().len(), 1, "{:?}", server.seen());
    }

    /// A turn's connect that the partner never answers gives up after the destinations'
    /// `timeout`, and the next request connects anew.
    #[tokio::test]
    async fn a_connect_the_partner_never_answers_gives_up_at_the_timeout() {
        let server = H2Server::start(First::Hanging).await;
        let pool = https_pool_with_timeout(&server.ca_file, "300ms");
        let error = outcome(&pool, &server.url, "hung")
            .await
            .expect_err("no answer");
        assert!(
            error.ends_with("no connection within the timeout of 300ms"),
            "{error}"
        );
        assert_eq!(outcome(&pool, &server.url, "next").await, Ok(2));
        assert_eq!(server.accepted(), 2);
    }

    /// The same burst to a partner that closes every connection: one connect for all six,
    /// which fail with its cause.
    #[tokio::test]
    async fn a_first_burst_that_cannot_connect_tries_once() {
        let server = H2Server::start(First::Closing).await;
        let pool = https_pool(&server.ca_file);
        six_fail_alike(&pool, &server.url).await;
        assert_eq!(server.accepted(), 1);
    }

    /// When the connection after a GOAWAY cannot be made, the requests that waited for that
    /// turn fail with its cause: one connect for all of them, not one after another. A request
    /// that comes after the failure tries again.
    #[tokio::test]
    async fn requests_that_waited_for_a_failed_connect_fail_with_its_cause() {
        let (server, pool) = H2Server::answering_first(First::OnlyOne).await;
        server.go_away().await;
        // Until then the connection still takes requests, between the two GOAWAYs of hyper's
        // graceful shutdown.
        wait_h2_closed(&pool).await;
        let error = six_fail_alike(&pool, &server.url).await;
        assert_eq!(server.accepted(), 2, "one connect for the six");
        let again = outcome(&pool, &server.url, "again").await;
        assert_eq!(again, Err(error));
        assert_eq!(server.accepted(), 3, "a later request connects again");
        assert_eq!(server.seen().len(), 1, "only the first request arrived");
    }

    #[test]
    fn origins_equal_but_for_case_hash_alike() {
        use std::hash::BuildHasher as _;
        let state = std::hash::RandomState::new();
        let origin = |url: &str| Origin::of(&url.parse::<Uri>().unwrap()).unwrap();
        let long = format!("http://{}.example:8080/", "Ab".repeat(60));
        for (a, b) in [
            (
                "http://Partner.Example:8080/x",
                "http://partner.example:8080/y",
            ),
            (long.as_str(), long.to_lowercase().as_str()),
        ] {
            assert!(origin(a) == origin(b));
            assert_eq!(state.hash_one(origin(a)), state.hash_one(origin(b)), "{a}");
            // The same bytes as `http`'s own `Hash` gives SipHash, one at a time.
            let Origin { scheme, authority } = origin(a);
            assert_eq!(
                state.hash_one(origin(a)),
                state.hash_one((scheme, authority))
            );
        }
        for (a, b) in [
            (
                "http://partner.example:8080/",
                "https://partner.example:8080/",
            ),
            (
                "http://partner.example:8080/",
                "http://partner.example:8081/",
            ),
        ] {
            assert!(origin(a) != origin(b));
            assert_ne!(state.hash_one(origin(a)), state.hash_one(origin(b)), "{a}");
        }
    }

    #[test]
    fn request_targets_and_host_headers() {
        let uri = |s: &str| s.parse::<Uri>().expect("uri");
        assert_eq!(origin_form(&uri("http://a:8080/in?x=1")), "/in?x=1");
        assert_eq!(origin_form(&uri("http://a:8080")), "/");
        assert_eq!(host_header(&uri("http://a:8080/in")).unwrap(), "a:8080");
        assert_eq!(host_header(&uri("http://a:80/in")).unwrap(), "a");
        assert_eq!(host_header(&uri("https://a/in")).unwrap(), "a");
        assert_eq!(
            host_header(&uri("https://[::1]:8443/")).unwrap(),
            "[::1]:8443"
        );
    }
}
