//! OAuth2 client credentials (RFC 6749 section 4.4) for destinations with
//! `auth = { type = "oauth2", ... }`: the token request, built once when the configuration is
//! loaded ([`TokenRequest`]), and the token of one destination, obtained, cached and refreshed
//! ([`TokenSource`]).
//!
//! One refresh at a time per destination: callers that need a new token while one is being
//! fetched wait for that fetch and share its result, a token or an error. A token is replaced
//! [`refresh margin`](refresh_margin) before its `expires_in` ends; while the replacement is
//! fetched, the other requests keep using the old token, which is still valid. A 401 from the
//! destination replaces the token it rejected, once ([`TokenSource::refresh_after_401`]).
//!
//! Nothing here prints a secret or a token: the client secret is a [`Secret`], the header values
//! are marked sensitive, and a text the token endpoint sends back is kept only from its error
//! answers, with the client secret masked.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, Url};
use serde_json::Value;

use crate::config::Secret;
use crate::error_chain;

/// The most a token is replaced ahead of its expiry; short-lived tokens use half their lifetime
/// instead ([`refresh_margin`]).
pub const REFRESH_MARGIN: Duration = Duration::from_secs(30);
/// After a failed refresh ahead of expiry, the still-valid token is used this long before the
/// next try, so an endpoint that is down is not asked once per request.
const REFRESH_AHEAD_PAUSE: Duration = Duration::from_secs(1);
/// A token endpoint's answer is read up to this size; a longer one is an error.
const MAX_ANSWER: usize = 64 * 1024;
/// How much of an error answer's text (`error_description`, or the body) goes into a reason.
const DETAIL_LIMIT: usize = 200;
/// A token that replaced a refused one, refused too when younger than this, is not replaced
/// ([`TokenSource::refresh_after_401`]).
pub const REJECTED_WHEN_NEW: Duration = Duration::from_secs(10);

/// How long before the end of its `expires_in` a token is replaced: [`REFRESH_MARGIN`], or half
/// the lifetime when that is shorter.
pub fn refresh_margin(lifetime: Duration) -> Duration {
    REFRESH_MARGIN.min(lifetime / 2)
}

/// The token request of one destination, built once from its configuration: where it goes, its
/// form body (`grant_type=client_credentials` and the other parameters, with the client's id
/// and secret when the client authenticates in the body), and the `Authorization: Basic` header
/// when it authenticates by HTTP Basic.
#[derive(Clone)]
pub struct TokenRequest {
    url: Url,
    /// `application/x-www-form-urlencoded`; holds the client secret with `client_auth = "body"`.
    body: Secret,
    /// `Basic base64(urlencode(client_id):urlencode(client_secret))`, marked sensitive.
    basic: Option<HeaderValue>,
    /// To mask it in anything the token endpoint sends back.
    secret: Secret,
}

impl TokenRequest {
    /// The request to `url` with the form parameters `params` (in this order, after
    /// `grant_type=client_credentials`). `basic` chooses HTTP Basic (RFC 6749 section 2.3.1:
    /// the id and the secret form-urlencoded, then joined by `:`) over the body parameters
    /// `client_id` and `client_secret`.
    pub fn new(
        url: Url,
        client_id: &str,
        client_secret: &Secret,
        params: &[(&str, &str)],
        basic: bool,
    ) -> Result<TokenRequest, String> {
        let mut body = String::new();
        append_form(&mut body, "grant_type", "client_credentials");
        for (name, value) in params {
            append_form(&mut body, name, value);
        }
        let basic = if basic {
            let credentials = format!(
                "{}:{}",
                form_urlencode(client_id),
                form_urlencode(client_secret.expose())
            );
            let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
            // Base64 is always a valid header value.
            let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
                .map_err(|_| "cannot be sent in an HTTP header".to_string())?;
            value.set_sensitive(true);
            Some(value)
        } else {
            append_form(&mut body, "client_id", client_id);
            append_form(&mut body, "client_secret", client_secret.expose());
            None
        };
        Ok(TokenRequest {
            url,
            body: Secret::new(body),
            basic,
            secret: client_secret.clone(),
        })
    }

    /// The token endpoint.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// `text` with the client secret (as written and form-urlencoded) replaced by `***`.
    fn mask(&self, text: &str) -> String {
        let secret = self.secret.expose();
        if secret.is_empty() {
            return text.to_string();
        }
        let mut text = text.replace(secret, "***");
        let encoded = form_urlencode(secret);
        if encoded != secret {
            text = text.replace(&encoded, "***");
        }
        // As a JSON string and as Rust's escape_debug show it.
        let quoted = serde_json::to_string(secret).unwrap_or_default();
        let json = quoted.trim_matches('"');
        for shown in [json, &secret.escape_debug().to_string()] {
            if !shown.is_empty() && shown != secret {
                text = text.replace(shown, "***");
            }
        }
        text
    }
}

impl std::fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRequest")
            .field("url", &self.url.as_str())
            .field(
                "client_auth",
                &if self.basic.is_some() {
                    "basic"
                } else {
                    "body"
                },
            )
            .finish_non_exhaustive()
    }
}

/// `application/x-www-form-urlencoded` as the WHATWG URL standard serialises it (what RFC 6749
/// appendix B means): ASCII letters, digits and `*-._` as they are, space as `+`, every other
/// byte of the UTF-8 as `%XX`.
pub fn form_urlencode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(char::from(b));
            }
            b' ' => out.push('+'),
            _ => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xf)]));
            }
        }
    }
    out
}

fn append_form(body: &mut String, name: &str, value: &str) {
    if !body.is_empty() {
        body.push('&');
    }
    body.push_str(&form_urlencode(name));
    body.push('=');
    body.push_str(&form_urlencode(value));
}

/// Why no token could be had. The reason never holds the secret or a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenError {
    reason: String,
    refused: bool,
}

impl TokenError {
    fn unavailable(reason: String) -> TokenError {
        TokenError {
            reason,
            refused: false,
        }
    }

    fn refused(reason: String) -> TokenError {
        TokenError {
            reason,
            refused: true,
        }
    }

    /// For the log, the retry entry and the dead letter:
    /// `oauth2 token endpoint refused the client: invalid_client (HTTP 401: ...)`,
    /// `oauth2 token endpoint failed: ...`.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The token endpoint answered 400 or 401: it refuses this client (a wrong secret, an
    /// unknown client, a scope it may not have). Asking again will not help until the
    /// configuration or the authorization server changes. Any other failure (no answer, a
    /// timeout, a 5xx, an answer without a usable token) may pass.
    pub fn is_refused(&self) -> bool {
        self.refused
    }
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// A token to send, and which one it was, for [`TokenSource::refresh_after_401`].
#[derive(Clone)]
pub struct Authorization {
    value: HeaderValue,
    generation: u64,
    /// When the token endpoint gave it.
    fetched: Instant,
    /// Whether it was asked for because the partner refused the one before.
    after_401: bool,
}

impl Authorization {
    /// `Bearer <token>`, marked sensitive.
    pub fn value(&self) -> &HeaderValue {
        &self.value
    }
}

impl std::fmt::Debug for Authorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorization")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// The cached token.
struct Cached {
    value: HeaderValue,
    generation: u64,
    /// When the token endpoint gave it.
    fetched: Instant,
    /// Whether it was asked for because the partner refused the one before.
    after_401: bool,
    /// From here on it is replaced ahead of its expiry; `None` without `expires_in`.
    refresh_at: Option<Instant>,
    /// From here on it is not sent; `None` without `expires_in`.
    expires_at: Option<Instant>,
}

impl Cached {
    fn fresh(&self, now: Instant) -> bool {
        self.refresh_at.is_none_or(|at| now < at)
    }

    fn usable(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }

    fn authorization(&self) -> Authorization {
        Authorization {
            value: self.value.clone(),
            generation: self.generation,
            fetched: self.fetched,
            after_401: self.after_401,
        }
    }
}

/// A token as the endpoint gave it.
struct Fresh {
    value: HeaderValue,
    lifetime: Option<Duration>,
    /// When the request that got it was sent: the lifetime counts from no later than that.
    sent: Instant,
}

#[derive(Default)]
struct State {
    token: Option<Cached>,
    /// Successful fetches so far; the generation of the cached token.
    generation: u64,
    /// Fetches completed so far, successful or not.
    fetches: u64,
    /// The error of the last completed fetch, `None` when it succeeded.
    last_error: Option<TokenError>,
    /// Why the token endpoint refuses the client, from its last refusal until a fetch succeeds.
    refused: Option<String>,
    /// No refresh ahead of expiry before this (one just failed).
    pause_ahead_until: Option<Instant>,
}

/// The token of one destination: fetched when first needed, shared by every request to the
/// destination, replaced before it expires and after a 401.
pub struct TokenSource {
    destination: String,
    request: TokenRequest,
    client: reqwest::Client,
    state: Mutex<State>,
    /// Held by the one fetch under way.
    refresh: tokio::sync::Mutex<()>,
}

impl TokenSource {
    /// The token source of destination `destination`, asking `request` through `client` (the
    /// destination's own client: its timeout, and its TLS settings, apply to the token
    /// endpoint too).
    pub fn new(destination: &str, request: TokenRequest, client: reqwest::Client) -> TokenSource {
        if request.url.scheme() == "http" && !is_loopback(&request.url) {
            tracing::warn!(
                destination,
                token_url = %request.url,
                "the oauth2 token_url is plain http: the client secret and the tokens cross the \
                 network unencrypted"
            );
        }
        TokenSource {
            destination: destination.to_string(),
            request,
            client,
            state: Mutex::new(State::default()),
            refresh: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain fields, each written whole: a panic cannot leave them inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The token to send now. Fetches one when there is none or it expired (one fetch at a time;
    /// those who wait share its result), and replaces it ahead of its expiry.
    pub async fn authorization(&self) -> Result<Authorization, TokenError> {
        let now = Instant::now();
        let (seen, current) = {
            let s = self.lock();
            match &s.token {
                Some(t) if t.fresh(now) => return Ok(t.authorization()),
                Some(t)
                    if t.usable(now) && s.pause_ahead_until.is_none_or(|until| now >= until) =>
                {
                    (s.fetches, Some(t.authorization()))
                }
                Some(t) if t.usable(now) => return Ok(t.authorization()),
                _ => (s.fetches, None),
            }
        };
        if let Some(current) = current {
            // Ahead of expiry: one caller fetches, the others go on with the current token.
            let Ok(_fetching) = self.refresh.try_lock() else {
                return Ok(current);
            };
            if let Some(done) = self.completed_since(seen) {
                return Ok(done.unwrap_or(current));
            }
            return match self.fetch_and_store(false).await {
                Ok(fresh) => Ok(fresh),
                Err(error) => {
                    // The current token, if it is still good after the wait (a token endpoint
                    // that hangs takes the destination's timeout, longer than the margin).
                    let mut s = self.lock();
                    s.pause_ahead_until = Some(Instant::now() + REFRESH_AHEAD_PAUSE);
                    match &s.token {
                        Some(t) if t.usable(Instant::now()) => Ok(current),
                        _ => Err(error),
                    }
                }
            };
        }
        let _fetching = self.refresh.lock().await;
        if let Some(done) = self.completed_since(seen) {
            return done;
        }
        self.fetch_and_store(false).await
    }

    /// A new token after the destination answered 401 to `rejected`: the token is dropped, and
    /// one fetch replaces it, however many requests it was rejected for. A caller whose token
    /// was already replaced gets the new one without a fetch. `Ok(None)` when `rejected` itself
    /// replaced a refused token less than [`REJECTED_WHEN_NEW`] ago: a partner that refuses
    /// two tokens in a row that new refuses the client's tokens (a wrong `audience` or
    /// `scope`), and asking for another per event would only spend the token endpoint's quota.
    pub async fn refresh_after_401(
        &self,
        rejected: &Authorization,
    ) -> Result<Option<Authorization>, TokenError> {
        if rejected.after_401 && rejected.fetched.elapsed() < REJECTED_WHEN_NEW {
            return Ok(None);
        }
        self.replace_rejected(rejected).await.map(Some)
    }

    async fn replace_rejected(
        &self,
        rejected: &Authorization,
    ) -> Result<Authorization, TokenError> {
        let now = Instant::now();
        let seen = {
            let mut s = self.lock();
            match &s.token {
                Some(t) if t.generation != rejected.generation && t.usable(now) => {
                    return Ok(t.authorization());
                }
                Some(t) if t.generation == rejected.generation => s.token = None,
                _ => {}
            }
            s.fetches
        };
        let _fetching = self.refresh.lock().await;
        if let Some(done) = self.completed_since(seen) {
            return done;
        }
        self.fetch_and_store(true).await
    }

    /// Why the token endpoint refuses this client, from its last refusal until a token request
    /// succeeds; for `/readyz`.
    pub fn refused(&self) -> Option<String> {
        self.lock().refused.clone()
    }

    /// The result of the last fetch, when one completed after the caller saw `seen` fetches.
    /// Called with the refresh lock held, so no fetch is under way.
    fn completed_since(&self, seen: u64) -> Option<Result<Authorization, TokenError>> {
        let s = self.lock();
        if s.fetches == seen {
            return None;
        }
        match (&s.last_error, &s.token) {
            (Some(error), _) => Some(Err(error.clone())),
            (None, Some(token)) => Some(Ok(token.authorization())),
            // Dropped after a 401 since: fetch.
            (None, None) => None,
        }
    }

    /// One token request, its outcome stored; the caller holds the refresh lock.
    async fn fetch_and_store(&self, after_401: bool) -> Result<Authorization, TokenError> {
        let result = self.fetch().await;
        let mut s = self.lock();
        s.fetches += 1;
        match result {
            Ok(fresh) => {
                s.generation += 1;
                let (refresh_at, expires_at) = match fresh.lifetime {
                    Some(lifetime) => (
                        fresh.sent.checked_add(lifetime - refresh_margin(lifetime)),
                        fresh.sent.checked_add(lifetime),
                    ),
                    None => (None, None),
                };
                let cached = Cached {
                    value: fresh.value,
                    generation: s.generation,
                    fetched: fresh.sent,
                    after_401,
                    refresh_at,
                    expires_at,
                };
                let authorization = cached.authorization();
                s.token = Some(cached);
                s.last_error = None;
                s.pause_ahead_until = None;
                if s.refused.take().is_some() {
                    tracing::info!(destination = %self.destination, "oauth2 token endpoint accepts the client again");
                }
                tracing::debug!(destination = %self.destination, expires_in = ?fresh.lifetime, generation = s.generation, "oauth2 token obtained");
                Ok(authorization)
            }
            Err(error) => {
                if error.refused {
                    if s.refused.as_deref() != Some(error.reason.as_str()) {
                        tracing::error!(
                            destination = %self.destination,
                            reason = %error.reason,
                            "oauth2 token endpoint refused the client: the destination's circuit \
                             opens, and its events wait in the retry store until a token request \
                             succeeds; check auth.client_id, auth.client_secret and auth.scope"
                        );
                    }
                    s.refused = Some(error.reason.clone());
                } else {
                    tracing::warn!(destination = %self.destination, reason = %error.reason, "no oauth2 token");
                }
                s.last_error = Some(error.clone());
                Err(error)
            }
        }
    }

    /// POSTs the token request and reads the answer (RFC 6749 sections 5.1 and 5.2).
    async fn fetch(&self) -> Result<Fresh, TokenError> {
        let sent = Instant::now();
        let mut request = reqwest::Request::new(Method::POST, self.request.url.clone());
        let headers = request.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(basic) = &self.request.basic {
            headers.insert(AUTHORIZATION, basic.clone());
        }
        *request.body_mut() = Some(self.request.body.expose().to_owned().into());
        let failed = |what: String| {
            TokenError::unavailable(format!(
                "oauth2 token endpoint failed: {}",
                self.request.mask(&what)
            ))
        };
        let mut response = self
            .client
            .execute(request)
            .await
            .map_err(|e| failed(error_chain(&e)))?;
        let status = response.status();
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    body.extend_from_slice(&chunk);
                    if body.len() > MAX_ANSWER {
                        return Err(failed(format!(
                            "HTTP {}: the answer is longer than {MAX_ANSWER} bytes",
                            status.as_u16()
                        )));
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(failed(format!(
                        "HTTP {}: reading the answer: {}",
                        status.as_u16(),
                        error_chain(&e)
                    )))
                }
            }
        }
        if status.is_success() {
            // Never quote a successful answer: it holds the token.
            return token_from(&body, sent).map_err(|what| {
                TokenError::unavailable(format!(
                    "oauth2 token endpoint answered {} without a usable bearer token: {what}",
                    status.as_u16()
                ))
            });
        }
        // Masked before it is cut and escaped, which could split or change a secret the
        // endpoint echoed, and after, for what escaping made of it.
        let body = self.request.mask(&String::from_utf8_lossy(&body));
        let detail = self
            .request
            .mask(&error_detail(status.as_u16(), body.as_bytes()));
        if status.as_u16() == 400 || status.as_u16() == 401 {
            Err(TokenError::refused(format!(
                "oauth2 token endpoint refused the client: {detail}"
            )))
        } else {
            Err(TokenError::unavailable(format!(
                "oauth2 token endpoint failed: {detail}"
            )))
        }
    }
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("TokenSource")
            .field("destination", &self.destination)
            .field("request", &self.request)
            .field("has_token", &s.token.is_some())
            .field("generation", &s.generation)
            .field("refused", &s.refused)
            .finish()
    }
}

/// The token of a successful answer (RFC 6749 section 5.1), or what is wrong with it.
fn token_from(body: &[u8], sent: Instant) -> Result<Fresh, String> {
    let Ok(Value::Object(answer)) = serde_json::from_slice::<Value>(body) else {
        return Err("the answer is not a JSON object".into());
    };
    let token = match answer.get("access_token") {
        Some(Value::String(token)) if !token.is_empty() => token,
        Some(Value::String(_)) => return Err("access_token is empty".into()),
        Some(_) => return Err("access_token is not a string".into()),
        None => return Err("no access_token".into()),
    };
    match answer.get("token_type") {
        Some(Value::String(kind)) if kind.eq_ignore_ascii_case("bearer") => {}
        Some(Value::String(kind)) => {
            return Err(format!(
                "token_type {:?} is not bearer",
                truncate(kind, DETAIL_LIMIT)
            ))
        }
        Some(_) => return Err("token_type is not a string".into()),
        None => return Err("no token_type".into()),
    }
    let lifetime = match answer.get("expires_in") {
        None | Some(Value::Null) => None,
        Some(value) => Some(seconds(value).ok_or("expires_in is not a number of seconds")?),
    };
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| "access_token has characters that cannot be sent in an HTTP header")?;
    value.set_sensitive(true);
    Ok(Fresh {
        value,
        lifetime,
        sent,
    })
}

/// `expires_in`: a JSON number (a fraction is cut off) or, as some servers send it, a string of
/// digits. A negative one counts as 0.
fn seconds(value: &Value) -> Option<Duration> {
    match value {
        Value::Number(n) => n.as_u64().map(Duration::from_secs).or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite())
                .map(|f| Duration::from_secs(f.max(0.0).min(u32::MAX as f64) as u64))
        }),
        Value::String(s) => s.trim().parse::<u64>().ok().map(Duration::from_secs),
        _ => None,
    }
}

/// `invalid_client (HTTP 401: Client authentication failed)` from an error answer in the form
/// of RFC 6749 section 5.2, else `HTTP 401: <start of the body>`.
fn error_detail(status: u16, body: &[u8]) -> String {
    if let Ok(Value::Object(answer)) = serde_json::from_slice::<Value>(body) {
        if let Some(Value::String(code)) = answer.get("error") {
            let code = truncate(code, DETAIL_LIMIT).escape_debug().to_string();
            return match answer.get("error_description") {
                Some(Value::String(text)) if !text.trim().is_empty() => format!(
                    "{code} (HTTP {status}: {})",
                    truncate(text.trim(), DETAIL_LIMIT).escape_debug()
                ),
                _ => format!("{code} (HTTP {status})"),
            };
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        format!("HTTP {status}")
    } else {
        format!(
            "HTTP {status}: {}",
            truncate(text, DETAIL_LIMIT).escape_debug()
        )
    }
}

/// At most `limit` bytes of `text`, cut at a character boundary.
fn truncate(text: &str, limit: usize) -> &str {
    let mut end = text.len().min(limit);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn is_loopback(url: &Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};

    use super::*;

    /// A token endpoint on 127.0.0.1 that answers every request with `answer` (`{n}` replaced by
    /// the request's number, from 1) after `delay`, and keeps the requests.
    struct Endpoint {
        url: Url,
        state: Arc<EndpointState>,
    }

    struct EndpointState {
        answer: Mutex<(u16, String)>,
        delay: Duration,
        requests: AtomicUsize,
        seen: Mutex<Vec<(HeaderMap, String)>>,
    }

    impl Endpoint {
        async fn start(status: u16, body: &str, delay: Duration) -> Endpoint {
            let state = Arc::new(EndpointState {
                answer: Mutex::new((status, body.to_string())),
                delay,
                requests: AtomicUsize::new(0),
                seen: Mutex::new(Vec::new()),
            });
            let app = axum::Router::new()
                .fallback(answer)
                .with_state(state.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(async move { axum::serve(listener, app).await });
            Endpoint {
                url: Url::parse(&format!("http://{addr}/token")).expect("url"),
                state,
            }
        }

        fn answer_with(&self, status: u16, body: &str) {
            *self.state.answer.lock().expect("lock") = (status, body.to_string());
        }

        fn requests(&self) -> usize {
            self.state.requests.load(Ordering::SeqCst)
        }

        fn source(&self, basic: bool) -> TokenSource {
            let request = TokenRequest::new(
                self.url.clone(),
                "courier",
                &Secret::new("s3cret/+ x"),
                &[("scope", "events:write")],
                basic,
            )
            .expect("request");
            crate::install_crypto_provider();
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("client");
            TokenSource::new("partner", request, client)
        }
    }

    async fn answer(
        State(state): State<Arc<EndpointState>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> (StatusCode, String) {
        let n = state.requests.fetch_add(1, Ordering::SeqCst) + 1;
        state
            .seen
            .lock()
            .expect("lock")
            .push((headers, String::from_utf8_lossy(&body).into_owned()));
        tokio::time::sleep(state.delay).await;
        let (status, text) = state.answer.lock().expect("lock").clone();
        (
            StatusCode::from_u16(status).expect("status"),
            text.replace("{n}", &n.to_string()),
        )
    }

    const TOKEN: &str = r#"{"access_token":"tok-{n}","token_type":"Bearer","expires_in":3600}"#;

    fn bearer(a: &Authorization) -> &str {
        a.value().to_str().expect("ASCII")
    }

    #[test]
    fn form_encoding_and_basic_credentials_follow_rfc_6749() {
        assert_eq!(form_urlencode("aZ09*-._"), "aZ09*-._");
        assert_eq!(form_urlencode("a b:c/d~\u{e9}+"), "a+b%3Ac%2Fd%7E%C3%A9%2B");
        // The example of RFC 6749 section 4.4.2.
        let url = Url::parse("https://server.example.com/token").expect("url");
        let request = TokenRequest::new(
            url.clone(),
            "s6BhdRkqt3",
            &Secret::new("gX1fBat3bV"),
            &[],
            true,
        )
        .expect("request");
        assert_eq!(
            request.basic.as_ref().map(|v| v.to_str().expect("ASCII")),
            Some("Basic czZCaGRSa3F0MzpnWDFmQmF0M2JW")
        );
        assert!(request
            .basic
            .as_ref()
            .is_some_and(HeaderValue::is_sensitive));
        assert_eq!(request.body.expose(), "grant_type=client_credentials");
        // Id and secret are form-encoded before they are joined (section 2.3.1).
        let request =
            TokenRequest::new(url.clone(), "id:1", &Secret::new("p w%"), &[], true).expect("r");
        let encoded = base64::engine::general_purpose::STANDARD.encode("id%3A1:p+w%25");
        assert_eq!(
            request.basic.as_ref().map(|v| v.to_str().expect("ASCII")),
            Some(format!("Basic {encoded}").as_str())
        );
        let request = TokenRequest::new(
            url,
            "id",
            &Secret::new("p&w"),
            &[("scope", "a b"), ("resource", "https://api/")],
            false,
        )
        .expect("r");
        assert!(request.basic.is_none());
        assert_eq!(
            request.body.expose(),
            "grant_type=client_credentials&scope=a+b&resource=https%3A%2F%2Fapi%2F\
             &client_id=id&client_secret=p%26w"
        );
        let debug = format!("{request:?}");
        assert!(
            !debug.contains("p&w") && !debug.contains("p%26w"),
            "{debug}"
        );
    }

    #[test]
    fn the_margin_is_30s_or_half_a_short_lifetime() {
        assert_eq!(refresh_margin(Duration::from_secs(3600)), REFRESH_MARGIN);
        assert_eq!(refresh_margin(Duration::from_secs(60)), REFRESH_MARGIN);
        assert_eq!(
            refresh_margin(Duration::from_secs(20)),
            Duration::from_secs(10)
        );
        assert_eq!(refresh_margin(Duration::ZERO), Duration::ZERO);
    }

    #[tokio::test]
    async fn the_grant_is_a_form_post_with_basic_or_body_credentials() {
        let endpoint = Endpoint::start(200, TOKEN, Duration::ZERO).await;
        let token = endpoint.source(true).authorization().await.expect("token");
        assert_eq!(bearer(&token), "Bearer tok-1");
        assert!(token.value().is_sensitive());
        endpoint.source(false).authorization().await.expect("token");
        let seen = endpoint.state.seen.lock().expect("lock").clone();
        let (headers, body) = &seen[0];
        assert_eq!(headers["content-type"], "application/x-www-form-urlencoded");
        assert_eq!(headers["accept"], "application/json");
        let basic = base64::engine::general_purpose::STANDARD.encode("courier:s3cret%2F%2B+x");
        assert_eq!(headers["authorization"], format!("Basic {basic}").as_str());
        assert_eq!(body, "grant_type=client_credentials&scope=events%3Awrite");
        let (headers, body) = &seen[1];
        assert!(headers.get("authorization").is_none());
        assert_eq!(
            body,
            "grant_type=client_credentials&scope=events%3Awrite&client_id=courier\
             &client_secret=s3cret%2F%2B+x"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_one_fetch() {
        let endpoint = Endpoint::start(200, TOKEN, Duration::from_millis(200)).await;
        let source = Arc::new(endpoint.source(true));
        let callers: Vec<_> = (0..50)
            .map(|_| {
                let source = source.clone();
                tokio::spawn(async move { source.authorization().await })
            })
            .collect();
        for caller in callers {
            let token = caller.await.expect("task").expect("token");
            assert_eq!(bearer(&token), "Bearer tok-1");
        }
        assert_eq!(endpoint.requests(), 1);
        // Cached from now on.
        for _ in 0..100 {
            source.authorization().await.expect("token");
        }
        assert_eq!(endpoint.requests(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_fetch_is_shared_by_those_who_waited_for_it() {
        let endpoint = Endpoint::start(503, "busy", Duration::from_millis(200)).await;
        let source = Arc::new(endpoint.source(true));
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let source = source.clone();
                tokio::spawn(async move { source.authorization().await })
            })
            .collect();
        for caller in callers {
            let error = caller.await.expect("task").expect_err("no token");
            assert_eq!(
                error.reason(),
                "oauth2 token endpoint failed: HTTP 503: busy"
            );
            assert!(!error.is_refused());
        }
        assert_eq!(endpoint.requests(), 1);
        assert_eq!(source.refused(), None);
        // The next caller asks again.
        endpoint.answer_with(200, TOKEN);
        let token = source.authorization().await.expect("token");
        assert_eq!(bearer(&token), "Bearer tok-2");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_401_replaces_the_token_once_however_many_requests_it_rejected() {
        let endpoint = Endpoint::start(200, TOKEN, Duration::from_millis(100)).await;
        let source = Arc::new(endpoint.source(true));
        let old = source.authorization().await.expect("token");
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let (source, old) = (source.clone(), old.clone());
                tokio::spawn(async move { source.refresh_after_401(&old).await })
            })
            .collect();
        for caller in callers {
            let token = caller
                .await
                .expect("task")
                .expect("token")
                .expect("replaced");
            assert_eq!(bearer(&token), "Bearer tok-2");
        }
        assert_eq!(endpoint.requests(), 2);
        // A rejection of the old token that comes in late gets the new one without a fetch.
        let late = source
            .refresh_after_401(&old)
            .await
            .expect("token")
            .expect("replaced");
        assert_eq!(bearer(&late), "Bearer tok-2");
        assert_eq!(
            bearer(&source.authorization().await.expect("t")),
            "Bearer tok-2"
        );
        assert_eq!(endpoint.requests(), 2);
        // A 401 to the new one too, which replaced a refused one moments ago: the partner
        // refuses this client's tokens, and no other is asked for.
        let newest = source.refresh_after_401(&late).await.expect("no error");
        assert!(newest.is_none());
        assert_eq!(endpoint.requests(), 2);
    }

    #[tokio::test]
    async fn a_token_is_replaced_before_it_expires() {
        let endpoint = Endpoint::start(
            200,
            r#"{"access_token":"tok-{n}","token_type":"bearer","expires_in":"2"}"#,
            Duration::ZERO,
        )
        .await;
        let source = endpoint.source(true);
        let started = Instant::now();
        assert_eq!(
            bearer(&source.authorization().await.expect("t")),
            "Bearer tok-1"
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            bearer(&source.authorization().await.expect("t")),
            "Bearer tok-1"
        );
        // A lifetime of 2 s is replaced after 1 s, half of it.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            bearer(&source.authorization().await.expect("t")),
            "Bearer tok-2"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "before tok-1 expired"
        );
        assert_eq!(endpoint.requests(), 2);
    }

    #[tokio::test]
    async fn a_failed_refresh_ahead_of_expiry_keeps_the_valid_token() {
        let endpoint = Endpoint::start(
            200,
            r#"{"access_token":"tok-{n}","token_type":"bearer","expires_in":2}"#,
            Duration::ZERO,
        )
        .await;
        let source = endpoint.source(true);
        source.authorization().await.expect("t");
        endpoint.answer_with(500, "down");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(
            bearer(&source.authorization().await.expect("t")),
            "Bearer tok-1"
        );
        assert_eq!(endpoint.requests(), 2);
        // Not asked again at once.
        assert_eq!(
            bearer(&source.authorization().await.expect("t")),
            "Bearer tok-1"
        );
        assert_eq!(endpoint.requests(), 2);
        // Expired: no token.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let error = source.authorization().await.expect_err("expired");
        assert_eq!(
            error.reason(),
            "oauth2 token endpoint failed: HTTP 500: down"
        );
    }

    #[tokio::test]
    async fn without_expires_in_a_token_is_kept_until_a_401() {
        let endpoint = Endpoint::start(
            200,
            r#"{"access_token":"tok-{n}","token_type":"BEARER"}"#,
            Duration::ZERO,
        )
        .await;
        let source = endpoint.source(true);
        for _ in 0..10 {
            source.authorization().await.expect("t");
        }
        assert_eq!(endpoint.requests(), 1);
    }

    #[tokio::test]
    async fn answers_are_classified_and_never_quote_a_secret_or_a_token() {
        let endpoint = Endpoint::start(200, TOKEN, Duration::ZERO).await;
        let source = endpoint.source(true);
        let cases: &[(u16, &str, bool, &str)] = &[
            (
                401,
                r#"{"error":"invalid_client","error_description":"bad secret s3cret/+ x"}"#,
                true,
                "oauth2 token endpoint refused the client: invalid_client (HTTP 401: bad secret ***)",
            ),
            (
                400,
                r#"{"error":"invalid_scope"}"#,
                true,
                "oauth2 token endpoint refused the client: invalid_scope (HTTP 400)",
            ),
            (
                400,
                "no such client",
                true,
                "oauth2 token endpoint refused the client: HTTP 400: no such client",
            ),
            (
                500,
                r#"{"error":"temporarily_unavailable"}"#,
                false,
                "oauth2 token endpoint failed: temporarily_unavailable (HTTP 500)",
            ),
            (404, "", false, "oauth2 token endpoint failed: HTTP 404"),
            (
                200,
                r#"{"access_token":"tok-{n}","token_type":"mac"}"#,
                false,
                "oauth2 token endpoint answered 200 without a usable bearer token: token_type \"mac\" is not bearer",
            ),
            (
                200,
                r#"{"token_type":"bearer"}"#,
                false,
                "oauth2 token endpoint answered 200 without a usable bearer token: no access_token",
            ),
            (
                200,
                r#"{"access_token":"tok-{n}","token_type":"bearer","expires_in":"soon"}"#,
                false,
                "oauth2 token endpoint answered 200 without a usable bearer token: expires_in is not a number of seconds",
            ),
            (
                200,
                "tok-{n}",
                false,
                "oauth2 token endpoint answered 200 without a usable bearer token: the answer is not a JSON object",
            ),
            (
                200,
                r#"{"access_token":"tok\n{n}","token_type":"bearer"}"#,
                false,
                "oauth2 token endpoint answered 200 without a usable bearer token: access_token has characters that cannot be sent in an HTTP header",
            ),
        ];
        for (status, body, refused, reason) in cases {
            endpoint.answer_with(*status, body);
            let error = source.authorization().await.expect_err("no token");
            assert_eq!(
                (error.reason(), error.is_refused()),
                (*reason, *refused),
                "{status} {body}"
            );
        }
        // An echoed secret where the detail is cut (200 bytes) is hidden whole, not cut first.
        let long = format!(
            r#"{{"error":"invalid_client","error_description":"{} s3cret/+ x"}}"#,
            "y".repeat(DETAIL_LIMIT - 5)
        );
        endpoint.answer_with(401, &long);
        let error = source.authorization().await.expect_err("no token");
        assert!(
            !error.reason().contains("s3c") && error.reason().contains("y ***"),
            "{}",
            error.reason()
        );
        assert!(
            source.refused().is_some(),
            "a refusal stays until a success"
        );
        endpoint.answer_with(
            200,
            r#"{"access_token":"tok-{n}","token_type":"bearer","expires_in":12.5}"#,
        );
        source.authorization().await.expect("token");
        assert_eq!(source.refused(), None, "cleared by a success");
        let debug = format!("{source:?}");
        assert!(
            !debug.contains("s3cret") && !debug.contains("tok-"),
            "{debug}"
        );
    }

    #[tokio::test]
    async fn no_answer_is_a_failure_that_names_the_endpoint() {
        // A port that was free a moment ago: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port");
        let endpoint = Endpoint {
            url: Url::parse(&format!("http://127.0.0.1:{port}/token")).expect("url"),
            state: Arc::new(EndpointState {
                answer: Mutex::new((200, String::new())),
                delay: Duration::ZERO,
                requests: AtomicUsize::new(0),
                seen: Mutex::new(Vec::new()),
            }),
        };
        let error = endpoint
            .source(true)
            .authorization()
            .await
            .expect_err("no token");
        assert!(
            error.reason().starts_with(
                "oauth2 token endpoint failed: error sending request for url (http://127.0.0.1:"
            ),
            "{error}"
        );
        assert!(!error.is_refused());
    }
}
