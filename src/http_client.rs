//! The HTTP clients courier POSTs through: one per distinct connection settings (TLS, timeout,
//! proxy), shared by the destinations that have the same ones.
//!
//! A delivery goes out through courier's own connection pool ([`crate::http_pool`]) with the
//! connector here (TCP, TLS with the destination's settings, and the destination's or the
//! environment's proxy), not through reqwest: reqwest's per-request layers (its redirect hook,
//! its `Url` round trip, its request building) cost more than the rest of a POST
//! (docs/performance.md#a-fanout-delivery).
//! What reqwest gave, courier does itself: the redirect rule and the timeout in
//! [`crate::sender`], the proxy here. The OAuth2 token endpoints are still asked through
//! reqwest ([`Clients::token_client`]), whose cost is paid once per token.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, PROXY_AUTHORIZATION};
use hyper::{Request, Response, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tower_service::Service;

use crate::config::{DestinationConfig, ProxyUrl, TlsConfig};
use crate::error_chain;
use crate::http_pool::Pool;
pub use crate::http_pool::{Answer, SendError};

/// A request body: the event's bytes, shared, never copied.
pub type Body = Full<Bytes>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Idle time before TCP keepalive probes, and the time between them.
const TCP_KEEPALIVE: Duration = Duration::from_secs(15);
/// The largest answer head a proxy may give to `CONNECT`.
const CONNECT_HEAD_LIMIT: usize = 8 * 1024;

/// Could not build an HTTP client (bad TLS setup); a start-up error.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client: {0}")]
pub struct SenderError(pub(crate) String);

/// What a destination's HTTP client is built from. Destinations whose settings are equal share
/// one client, and so one connection pool.
#[derive(Clone, PartialEq, Eq)]
struct ClientSettings {
    verify: bool,
    timeout: Duration,
    tls: Option<TlsConfig>,
    proxy: Option<ProxyUrl>,
}

/// The HTTP clients of a set of destinations, one per `ClientSettings`.
#[derive(Default)]
pub struct Clients {
    delivery: Vec<(ClientSettings, HttpClient)>,
    token: Vec<(ClientSettings, reqwest::Client)>,
}

impl Clients {
    /// The client for `dest`, built on first use; `key` (`destinations[i]`) names the
    /// destination in a TLS set-up error and in the logs of its TLS material.
    pub fn for_destination(
        &mut self,
        key: &str,
        dest: &DestinationConfig,
    ) -> Result<HttpClient, SenderError> {
        shared(&mut self.delivery, dest, |settings| {
            HttpClient::new(key, settings)
        })
    }

    /// The reqwest client that asks `dest`'s OAuth2 token endpoint, with the same TLS settings,
    /// timeout and proxy as its POSTs; built on first use, and only for OAuth2 destinations.
    pub fn token_client(
        &mut self,
        key: &str,
        dest: &DestinationConfig,
    ) -> Result<reqwest::Client, SenderError> {
        shared(&mut self.token, dest, |settings| {
            token_client(key, settings)
        })
    }
}

/// The client in `built` for `dest`'s settings, built by `build` and kept there the first time.
fn shared<C: Clone>(
    built: &mut Vec<(ClientSettings, C)>,
    dest: &DestinationConfig,
    build: impl FnOnce(&ClientSettings) -> Result<C, SenderError>,
) -> Result<C, SenderError> {
    let settings = settings(dest);
    if let Some((_, client)) = built.iter().find(|(s, _)| *s == settings) {
        return Ok(client.clone());
    }
    let client = build(&settings)?;
    built.push((settings, client.clone()));
    Ok(client)
}

fn settings(dest: &DestinationConfig) -> ClientSettings {
    ClientSettings {
        verify: dest.tls_verify,
        timeout: dest.timeout,
        tls: dest.tls.clone(),
        proxy: dest.proxy.clone(),
    }
}

/// The pooled client of one `ClientSettings`: cheap to clone, one pool for all clones.
#[derive(Clone)]
pub struct HttpClient {
    pool: Pool,
    /// Which requests go through a proxy; `None` when none does.
    proxies: Option<Arc<Matcher>>,
}

impl HttpClient {
    fn new(key: &str, settings: &ClientSettings) -> Result<HttpClient, SenderError> {
        let tls = tls_config(key, settings)?;
        // An `https://` proxy from the environment is spoken to over HTTP/1.1 (a CONNECT or an
        // absolute-form request), so it is offered nothing else.
        let mut to_proxy = tls.clone();
        to_proxy.alpn_protocols = vec![b"http/1.1".to_vec()];
        let proxies = proxies(key, settings.proxy.as_ref())?;
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        // A pooled connection whose peer vanished (a NAT or firewall that dropped it) is found
        // by the kernel within about a minute instead of at the next POST's timeout.
        tcp.set_keepalive(Some(TCP_KEEPALIVE));
        tcp.set_keepalive_interval(Some(TCP_KEEPALIVE));
        tcp.set_keepalive_retries(Some(3));
        let connector = Connector {
            tcp,
            tls: TlsConnector::from(Arc::new(tls)),
            tls_to_proxy: TlsConnector::from(Arc::new(to_proxy)),
            proxies: proxies.clone(),
        };
        Ok(HttpClient {
            pool: Pool::new(connector, settings.timeout),
            proxies,
        })
    }

    /// A client with no TLS material, proxy or special timeout, for tests.
    #[cfg(test)]
    pub(crate) fn for_tests() -> HttpClient {
        let settings = ClientSettings {
            verify: true,
            timeout: Duration::from_secs(60),
            tls: None,
            proxy: None,
        };
        HttpClient::new("test", &settings).expect("client")
    }

    #[cfg(test)]
    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Sends `request` and returns the answer's head; the body is read by the caller. A plain
    /// `http` request through a proxy gets the proxy's credentials here.
    pub async fn send(&self, mut request: Request<Body>) -> Result<Response<Answer>, SendError> {
        if let Some(proxies) = &self.proxies {
            if request.uri().scheme() == Some(&hyper::http::uri::Scheme::HTTP) {
                if let Some(auth) = proxies
                    .intercept(request.uri())
                    .and_then(|p| p.basic_auth().cloned())
                {
                    request.headers_mut().insert(PROXY_AUTHORIZATION, auth);
                }
            }
        }
        self.pool.send(request).await
    }
}

/// A destination with `proxy` sends every request through it; any other follows the environment
/// (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY and their lower-case forms, as curl reads them),
/// read when the client is built, that is at start-up. docs/connecting.md#proxies says why.
fn proxies(key: &str, proxy: Option<&ProxyUrl>) -> Result<Option<Arc<Matcher>>, SenderError> {
    if let Some(proxy) = proxy {
        let url = proxy.url().as_str();
        let matcher = Matcher::builder().all(url.to_string()).build();
        // The matcher drops a URL it cannot use; `ProxyUrl` has checked it, so this is a bug.
        if matcher
            .intercept(&Uri::from_static("http://courier.invalid/"))
            .is_none()
        {
            return Err(SenderError(format!(
                "{key}.proxy: {} cannot be used as a proxy",
                proxy.redacted()
            )));
        }
        return Ok(Some(Arc::new(matcher)));
    }
    if environment_proxies().is_empty() {
        return Ok(None);
    }
    Ok(Some(Arc::new(Matcher::from_env())))
}

/// Makes TCP connections, the TLS handshake with the partner, and the way through a proxy, for
/// the pool ([`crate::http_pool`]).
#[derive(Clone)]
pub(crate) struct Connector {
    tcp: HttpConnector,
    tls: TlsConnector,
    tls_to_proxy: TlsConnector,
    proxies: Option<Arc<Matcher>>,
}

impl Connector {
    pub(crate) async fn connect(self, dst: Uri) -> Result<Conn, BoxError> {
        let https = dst.scheme() == Some(&hyper::http::uri::Scheme::HTTPS);
        let Some(proxy) = self.proxies.as_deref().and_then(|m| m.intercept(&dst)) else {
            let tcp = Stream::Tcp(self.tcp(dst.clone()).await?);
            return match https {
                true => handshake(&self.tls, tcp, &dst).await,
                false => Ok(Conn::new(tcp, false)),
            };
        };
        let proxy_uri = proxy.uri();
        let tcp = Stream::Tcp(self.tcp(proxy_uri.clone()).await?);
        let to_proxy = match proxy_uri.scheme_str() {
            Some("http") => tcp,
            Some("https") => handshake(&self.tls_to_proxy, tcp, proxy_uri)
                .await?
                .stream(),
            other => {
                return Err(format!(
                    "proxy {}: scheme {:?} is not supported; use an http:// proxy",
                    proxy_uri.authority().map_or("", |a| a.as_str()),
                    other.unwrap_or("")
                )
                .into())
            }
        };
        if https {
            // A tunnel to the partner, inside which the TLS handshake is end to end.
            let tunnel = tunnel(to_proxy, &dst, proxy.basic_auth()).await?;
            handshake(&self.tls, tunnel, &dst).await
        } else {
            Ok(Conn::new(to_proxy, true))
        }
    }

    async fn tcp(&self, uri: Uri) -> Result<TcpStream, BoxError> {
        let mut tcp = self.tcp.clone();
        Ok(tcp.call(uri).await?.into_inner())
    }
}

/// The TLS handshake with the server of `dst` over `stream`; HTTP/2 when the server picks it.
async fn handshake(tls: &TlsConnector, stream: Stream, dst: &Uri) -> Result<Conn, BoxError> {
    let host = dst.host().ok_or("the URL has no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host:?} is not a TLS server name: {e}"))?;
    let tls = tls.connect(name, stream).await?;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let mut conn = Conn::new(Stream::Tls(Box::new(tls)), false);
    conn.h2 = h2;
    Ok(conn)
}

/// Asks the proxy at the other end of `stream` for a tunnel to `dst` with `CONNECT`.
async fn tunnel(
    mut stream: Stream,
    dst: &Uri,
    auth: Option<&HeaderValue>,
) -> Result<Stream, BoxError> {
    let host = dst.host().ok_or("the URL has no host")?;
    let port = dst.port_u16().unwrap_or(443);
    let mut head =
        format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n").into_bytes();
    if let Some(auth) = auth {
        head.extend_from_slice(b"Proxy-Authorization: ");
        head.extend_from_slice(auth.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    stream.write_all(&head).await?;
    let mut answer = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err("the proxy closed the connection before answering CONNECT".into());
        }
        answer.extend_from_slice(&buf[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&answer) {
            Ok(httparse::Status::Complete(_)) => {
                return match response.code {
                    Some(200..=299) => Ok(stream),
                    Some(code) => Err(format!(
                        "the proxy answered CONNECT {host}:{port} with {code} {}",
                        response.reason.unwrap_or("")
                    )
                    .into()),
                    None => Err("the proxy's answer to CONNECT has no status".into()),
                };
            }
            Ok(httparse::Status::Partial) if answer.len() < CONNECT_HEAD_LIMIT => {}
            Ok(httparse::Status::Partial) => {
                return Err("the proxy's answer to CONNECT is too long".into())
            }
            Err(e) => return Err(format!("the proxy's answer to CONNECT: {e}").into()),
        }
    }
}

/// A connection: plain TCP, TLS over it, or TLS through a tunnel (which may itself run over TLS
/// to an `https://` proxy).
enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<Stream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A connection as the pool takes it, with what the pool must know of it: whether requests on
/// it go to a proxy in absolute form, and whether it speaks HTTP/2.
pub(crate) struct Conn {
    io: TokioIo<Stream>,
    pub(crate) proxied: bool,
    pub(crate) h2: bool,
}

impl Conn {
    fn new(stream: Stream, proxied: bool) -> Conn {
        Conn {
            io: TokioIo::new(stream),
            proxied,
            h2: false,
        }
    }

    fn stream(self) -> Stream {
        self.io.into_inner()
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        hyper::rt::Read::poll_read(Pin::new(&mut self.get_mut().io), cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        hyper::rt::Write::poll_write(Pin::new(&mut self.get_mut().io), cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        hyper::rt::Write::poll_write_vectored(Pin::new(&mut self.get_mut().io), cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        hyper::rt::Write::is_write_vectored(&self.io)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        hyper::rt::Write::poll_flush(Pin::new(&mut self.get_mut().io), cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        hyper::rt::Write::poll_shutdown(Pin::new(&mut self.get_mut().io), cx)
    }
}

/// Redirects of a token request are followed only when they keep it a POST with its body (307,
/// 308) and stay on the same origin, so another host never receives the client's secret.
fn token_redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let keeps_post = matches!(attempt.status().as_u16(), 307 | 308);
        let same_origin = attempt
            .previous()
            .last()
            .is_some_and(|prev| prev.origin() == attempt.url().origin());
        // `previous()` includes the original URL: this follows at most 10 redirects.
        if keeps_post && same_origin && attempt.previous().len() <= 10 {
            attempt.follow()
        } else {
            attempt.stop()
        }
    })
}

/// The one TLS set-up of courier (`crate::tls`), shared with the brokers: CA file, client
/// certificate, `server_name`, reloading on change, and `tls_verify = false`.
fn tls_config(key: &str, settings: &ClientSettings) -> Result<rustls::ClientConfig, SenderError> {
    crate::tls::client_config(
        &format!("{key}.tls"),
        settings.tls.as_ref(),
        settings.verify,
        crate::tls::HTTP_ALPN,
    )
    .map_err(|e| SenderError(e.to_string()))
}

fn token_client(key: &str, settings: &ClientSettings) -> Result<reqwest::Client, SenderError> {
    let tls = tls_config(key, settings)?;
    let mut builder = reqwest::Client::builder();
    // The same rule as the POSTs: the destination's `proxy`, else the environment (which reqwest
    // reads itself).
    if let Some(proxy) = &settings.proxy {
        let proxy = reqwest::Proxy::all(proxy.url().as_str())
            .map_err(|e| SenderError(format!("{key}.proxy: {}", error_chain(&e))))?;
        builder = builder.proxy(proxy);
    }
    builder
        .timeout(settings.timeout)
        // courier's retry policy is the only one: a retry inside the HTTP client would be a
        // second request that no metric or log knows about.
        .retry(reqwest::retry::never().max_retries_per_request(0))
        .redirect(token_redirect_policy())
        .referer(false)
        .tls_backend_preconfigured(tls)
        .tcp_nodelay(true)
        .pool_idle_timeout(crate::http_pool::IDLE_TIMEOUT)
        .user_agent(crate::sender::USER_AGENT_VALUE)
        .build()
        .map_err(|e| SenderError(error_chain(&e)))
}

/// The proxy variables of the environment that the HTTP client reads, as `NAME=value` with any
/// password replaced by `***`, for the start-up log.
pub fn environment_proxies() -> Vec<String> {
    [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ]
    .iter()
    .filter_map(|name| {
        let value = std::env::var(name).ok().filter(|v| !v.is_empty())?;
        Some(format!("{name}={}", crate::config::redact_url(&value)))
    })
    .collect()
}
