//! The outbound REST contract (docs/delivery.md): one POST per event and destination, with the
//! exact headers, auth and optional `Metadata` block, and a classification of what came back.
//!
//! The sender knows nothing of queues or the store: it turns `(destination, event)` into an
//! [`Outcome`]. Everything it reads of a destination was parsed when the configuration was
//! loaded, so building a request has no error path of its own; only an OAuth2 destination's
//! token ([`crate::oauth2`]) may be missing, which is a failed outcome like a POST without an
//! answer.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST,
    LOCATION, RETRY_AFTER, USER_AGENT,
};
use hyper::{Method, Request, Response, StatusCode, Uri};
use reqwest::Url;
use serde_json::{Map, Value};

use crate::config::{to_uri, DestinationConfig, OrganizationConfig, RESERVED_HEADERS};
use crate::destination::Destination;
use crate::error_chain;
use crate::event::Event;
use crate::http_client::{Answer, Body};
use crate::oauth2::TokenError;
use crate::signature;
use crate::status::Verdict;
use crate::telemetry::TraceHeaders;
use crate::topic;
use crate::trace::{TRACEPARENT, TRACESTATE};

/// courier's `User-Agent`, unless the destination's `headers` name another.
pub const USER_AGENT_VALUE: &str = concat!("courier/", env!("CARGO_PKG_VERSION"));

/// Headers a request gets besides the static and metadata ones: Content-Type, X-Request-Id,
/// X-Correlation-Id, auth, Content-Length, Host (for `http` URLs), Accept, User-Agent, the three
/// Standard Webhooks headers, and the trace context's two.
const ADDED_HEADERS: usize = 13;
/// How many bytes of an error response are kept for the dead-letter reason.
const ERROR_BODY_SNIPPET: usize = 512;
/// Response bodies are drained up to this much so the connection can be reused; larger ones are dropped.
const DRAIN_LIMIT: usize = 64 * 1024;
/// The most 307/308 redirects one POST follows.
const MAX_REDIRECTS: usize = 10;

/// What one POST attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx answer, or one the destination's `success_on` names.
    Delivered { status: u16 },
    /// Anything else. `retryable` marks connection errors, timeouts, the statuses that are
    /// retryable by default (408, 429, 5xx) or by the destination's `retry_on`, and an OAuth2
    /// token that could not be had.
    Failed {
        status: Option<u16>,
        reason: String,
        retryable: bool,
        /// The server's `Retry-After` on a 429 or 503.
        retry_after: Option<Duration>,
        /// Nothing sent to this destination can succeed until something outside courier
        /// changes (its OAuth2 token endpoint refuses the client): open the circuit now.
        opens_circuit: bool,
    },
}

impl Outcome {
    fn failed(status: Option<u16>, reason: String, retryable: bool) -> Outcome {
        Outcome::Failed {
            status,
            reason,
            retryable,
            retry_after: None,
            opens_circuit: false,
        }
    }

    /// No token to send: a retryable failure without an answer from the destination; a
    /// refused client opens the circuit.
    fn no_token(error: TokenError) -> Outcome {
        Outcome::Failed {
            status: None,
            opens_circuit: error.is_refused(),
            reason: error.reason().to_string(),
            retryable: true,
            retry_after: None,
        }
    }
}

/// POSTs `event` to `dest` once, the way the outbound REST contract says, and classifies the
/// answer. Never panics and never returns an error: every failure is an [`Outcome::Failed`] with a
/// reason an operator can act on.
pub async fn deliver(dest: &Destination, event: &Event, trace: Option<&TraceHeaders>) -> Outcome {
    let config = dest.config();
    let Ok(id) = HeaderValue::from_str(&event.id) else {
        let reason = format!("event id {:?} is not a valid header value", event.id);
        return Outcome::failed(None, reason, false);
    };
    let token = match dest.token() {
        Some(source) => match source.authorization().await {
            Ok(token) => Some((source, token)),
            Err(error) => return Outcome::no_token(error),
        },
        None => None,
    };
    let body = if config.metadata_in_payload {
        with_metadata(event, dest.id().as_str(), dest.organization())
    } else {
        event.body.clone()
    };
    let post = Post {
        dest,
        event,
        trace,
        id,
        body,
    };
    let Some((source, token)) = token else {
        return post
            .exchange(None, false)
            .await
            .unwrap_or_else(Rejected::outcome);
    };
    if let Ok(outcome) = post.exchange(Some(token.value()), true).await {
        return outcome;
    }
    // The token was rejected (revoked, or expired early): one new token, one more try in
    // this attempt. A second 401 is the attempt's outcome.
    let fresh = match source.refresh_after_401(&token).await {
        Ok(Some(fresh)) => fresh,
        Ok(None) => {
            return Outcome::failed(
                Some(401),
                format!(
                    "HTTP 401 to an oauth2 token that replaced a refused one less than {}s \
                     before; no other one asked for (does the partner take the configured \
                     audience and scope?)",
                    crate::oauth2::REJECTED_WHEN_NEW.as_secs()
                ),
                false,
            )
        }
        Err(error) => return Outcome::no_token(error),
    };
    tracing::debug!(destination = %dest.id(), "401 to the oauth2 token: sending again with a new one");
    post.exchange(Some(fresh.value()), false)
        .await
        .unwrap_or_else(Rejected::outcome)
}

/// A 401 answer, read to its end, that the caller asked to see rather than have classified.
struct Rejected;

impl Rejected {
    /// For a caller that did not ask: what `classify` makes of a 401 without a body.
    fn outcome(self) -> Outcome {
        Outcome::failed(Some(401), "HTTP 401".into(), false)
    }
}

/// One POST of one event to one destination, built again for a followed redirect or a second
/// try with a new token rather than copied, so the usual single request is never copied.
struct Post<'a> {
    dest: &'a Destination,
    event: &'a Event,
    trace: Option<&'a TraceHeaders>,
    /// The event id as a header value.
    id: HeaderValue,
    body: Bytes,
}

impl Post<'_> {
    /// Sends the POST, follows redirects and reads the answer, all within the destination's
    /// `timeout`. With `stop_at_401`, a 401 answer is read and [`Rejected`] returned, for a
    /// second try with a new token.
    async fn exchange(
        &self,
        authorization: Option<&HeaderValue>,
        stop_at_401: bool,
    ) -> Result<Outcome, Rejected> {
        let config = self.dest.config();
        // One deadline for the whole exchange. The answer's head decides the outcome: a body
        // that does not arrive in time ends the connection, not the outcome (a 2xx whose body
        // stalls was delivered, and POSTing it again would deliver it twice).
        let deadline = tokio::time::Instant::now() + config.timeout;
        let response = match tokio::time::timeout_at(deadline, self.send(authorization)).await {
            Ok(Ok(response)) => response,
            Ok(Err(outcome)) => return Ok(outcome),
            Err(_) => {
                return Ok(Outcome::failed(
                    None,
                    format!(
                        "no answer within the timeout of {}",
                        humantime::format_duration(config.timeout)
                    ),
                    true,
                ))
            }
        };
        if stop_at_401 && response.status() == StatusCode::UNAUTHORIZED {
            let _ = tokio::time::timeout_at(deadline, drain(response)).await;
            return Err(Rejected);
        }
        Ok(classify(response, config, deadline).await)
    }

    /// Sends the POST and follows 307 and 308 redirects to the same origin: they keep the
    /// request a POST with its body, and another host must not receive the destination's
    /// credentials. A 301/302/303 would turn it into a body-less GET that a 2xx would wrongly
    /// mark delivered. Any other redirect is the answer, a failed attempt.
    async fn send(&self, authorization: Option<&HeaderValue>) -> Result<Response<Answer>, Outcome> {
        let config = self.dest.config();
        let mut url = Cow::Borrowed(config.url.url());
        let mut uri = Cow::Borrowed(config.url.uri());
        let mut followed = 0;
        loop {
            let request = self.request(&uri, authorization);
            let response = self.dest.client().send(request).await.map_err(|e| {
                let reason = format!("error sending request for url ({url}): {}", error_chain(&e));
                Outcome::failed(None, reason, true)
            })?;
            if followed == MAX_REDIRECTS || !matches!(response.status().as_u16(), 307 | 308) {
                return Ok(response);
            }
            let Some(next) = same_origin_location(&url, &response) else {
                return Ok(response);
            };
            let Ok(next_uri) = to_uri(&next) else {
                return Ok(response);
            };
            drain(response).await;
            url = Cow::Owned(next);
            uri = Cow::Owned(next_uri);
            followed += 1;
        }
    }

    /// The request to `uri`: static headers < event metadata < contract and auth headers.
    fn request(&self, uri: &Uri, authorization: Option<&HeaderValue>) -> Request<Body> {
        let config = self.dest.config();
        let mut headers = headers(config, self.event, self.trace, &self.id);
        if let Some(authorization) = authorization {
            headers.insert(AUTHORIZATION, authorization.clone());
        }
        // Set here, where the map still has room, rather than by the pool, which would grow the
        // map and format the host and port again on every request. Redirects are followed
        // only to the same origin, so the value holds for them too.
        if let Some(host) = config.url.host_header() {
            headers.insert(HOST, host.clone());
        }
        headers.insert(CONTENT_LENGTH, HeaderValue::from(self.body.len()));
        let keys = config.signing_keys();
        if !keys.is_empty() {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            // `v1,` and base64, space-separated: always a valid header value.
            let signatures = signature::signature_header(keys, &self.event.id, now, &self.body);
            match HeaderValue::try_from(signatures) {
                Ok(signature) => {
                    headers.insert(HeaderName::from_static("webhook-id"), self.id.clone());
                    headers.insert(
                        HeaderName::from_static("webhook-timestamp"),
                        HeaderValue::from(now),
                    );
                    headers.insert(HeaderName::from_static("webhook-signature"), signature);
                }
                // Not expected (see above); said loudly, since the partner will refuse the request.
                Err(_) => {
                    tracing::error!(event_id = %self.event.id, "webhook-signature is not a valid header value; sent unsigned")
                }
            }
        }
        let mut request = Request::new(Full::new(self.body.clone()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri.clone();
        *request.headers_mut() = headers;
        request
    }
}

/// Where a 307/308 answer points, when that is on the same origin as `url`.
fn same_origin_location(url: &Url, response: &Response<Answer>) -> Option<Url> {
    let location = response.headers().get(LOCATION)?.to_str().ok()?;
    let next = url.join(location).ok()?;
    (next.origin() == url.origin()).then_some(next)
}

/// Static headers < event metadata < contract and auth headers.
fn headers(
    config: &DestinationConfig,
    event: &Event,
    trace: Option<&TraceHeaders>,
    id: &HeaderValue,
) -> HeaderMap {
    let auth = config.auth.as_ref().and_then(|a| a.static_header());
    let mut headers = config.headers.map().clone();
    // Room for the rest up front: the clone has none to spare, and growing it on the way
    // moved every header once more per request.
    headers.reserve(event.metadata.len() + ADDED_HEADERS);
    for (key, value) in &event.metadata {
        let Ok(name) = HeaderName::from_bytes(key.as_bytes()) else {
            tracing::warn!(event_id = %event.id, key = %key.escape_debug(), "metadata key is not a valid HTTP header name; dropped");
            continue;
        };
        if RESERVED_HEADERS.contains(&name.as_str()) || auth.is_some_and(|(n, _)| *n == name) {
            tracing::warn!(event_id = %event.id, header = %name, "metadata may not set a contract or auth header; dropped");
            continue;
        }
        let Ok(value) = HeaderValue::from_str(value) else {
            tracing::warn!(event_id = %event.id, header = %name, "metadata value is not a valid HTTP header value; dropped");
            continue;
        };
        headers.insert(name, value);
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(HeaderName::from_static("x-request-id"), id.clone());
    headers.insert(HeaderName::from_static("x-correlation-id"), id.clone());
    if let Some((name, value)) = auth {
        headers.insert(name.clone(), value.clone());
    }
    if let Some(trace) = trace {
        headers.insert(
            HeaderName::from_static(TRACEPARENT),
            trace.traceparent.clone(),
        );
        if let Some(state) = &trace.tracestate {
            headers.insert(HeaderName::from_static(TRACESTATE), state.clone());
        }
    }
    // A destination's or the event's own `User-Agent` and `Accept` are kept.
    headers
        .entry(USER_AGENT)
        .or_insert(HeaderValue::from_static(USER_AGENT_VALUE));
    headers
        .entry(ACCEPT)
        .or_insert(HeaderValue::from_static("*/*"));
    headers
}

/// The outcome of an answer, by the destination's status-code rules over the default table
/// (crate::status): 2xx delivered; 408, 429 and 5xx retryable; everything else final.
async fn classify(
    response: Response<Answer>,
    config: &DestinationConfig,
    deadline: tokio::time::Instant,
) -> Outcome {
    let status = response.status();
    let code = status.as_u16();
    let verdict = config.status_rules().verdict(code);
    if verdict == Verdict::Success {
        // Read to its end so the connection can serve again; if it does not end by the
        // deadline, the connection is dropped, and the event was delivered all the same.
        let _ = tokio::time::timeout_at(deadline, drain(response)).await;
        return Outcome::Delivered { status: code };
    }
    let retryable = verdict == Verdict::Retryable;
    let retry_after = if code == 429 || code == 503 {
        response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after)
    } else {
        None
    };
    let mut reason = format!("HTTP {code}");
    if status.is_redirection() {
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("(none)");
        let _ = write!(
            reason,
            ": redirect to {location} not followed (only 307/308 to the same origin keep the POST and its credentials safe, and at most {MAX_REDIRECTS} of them)"
        );
    } else {
        match tokio::time::timeout_at(deadline, snippet(response)).await {
            Ok(snippet) if !snippet.is_empty() => {
                let _ = write!(reason, ": {snippet}");
            }
            Ok(_) => {}
            Err(_) => {
                let _ = write!(
                    reason,
                    " (its body did not arrive within the timeout of {})",
                    humantime::format_duration(config.timeout)
                );
            }
        }
    }
    Outcome::Failed {
        status: Some(code),
        reason,
        retryable,
        retry_after,
        opens_circuit: false,
    }
}

/// `Retry-After`: delay-seconds or an HTTP-date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Reads the response to its end (up to a limit) so the connection goes back to the pool.
async fn drain(response: Response<Answer>) {
    let mut body = response.into_body();
    let mut read = 0usize;
    while let Some(Ok(frame)) = body.frame().await {
        read += frame.data_ref().map_or(0, Bytes::len);
        if read > DRAIN_LIMIT {
            break;
        }
    }
}

async fn snippet(response: Response<Answer>) -> String {
    let mut body = response.into_body();
    let mut buf = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            buf.extend_from_slice(data);
        }
        if buf.len() > DRAIN_LIMIT {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let text = text.trim();
    let mut end = text.len().min(ERROR_BODY_SNIPPET);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].escape_debug().to_string()
}

/// The body with the `Metadata` block of the outbound REST contract. The block is spliced into the JSON text, so the
/// partner's fields keep their exact bytes (number precision, order, escapes). A body that is not
/// a JSON object has nowhere to put it and is sent unchanged (documented in docs/delivery.md).
fn with_metadata(event: &Event, subscriber: &str, org: &OrganizationConfig) -> bytes::Bytes {
    let Ok(keys) = serde_json::from_slice::<
        std::collections::HashMap<std::borrow::Cow<str>, serde::de::IgnoredAny>,
    >(&event.body) else {
        tracing::warn!(event_id = %event.id, "body is not a JSON object: sent without the Metadata block");
        return event.body.clone();
    };
    let block = metadata_block(event, subscriber, org);
    if keys.contains_key("Metadata") {
        // Merge into the producer's own Metadata object: re-encode (arbitrary_precision keeps numbers exact).
        let Ok(mut object) = serde_json::from_slice::<Map<String, Value>>(&event.body) else {
            return event.body.clone();
        };
        match object.get_mut("Metadata") {
            Some(Value::Object(existing)) => existing.extend(block),
            _ => {
                object.insert("Metadata".into(), Value::Object(block));
            }
        }
        return serde_json::to_vec(&object)
            .map(Into::into)
            .unwrap_or_else(|_| event.body.clone());
    }
    let text = &event.body[..];
    let end = text
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .unwrap_or(0);
    let Ok(block_json) = serde_json::to_vec(&block) else {
        return event.body.clone();
    };
    let mut out = Vec::with_capacity(text.len() + block_json.len() + 16);
    out.extend_from_slice(&text[..end]);
    if !keys.is_empty() {
        out.push(b',');
    }
    out.extend_from_slice(b"\"Metadata\":");
    out.extend_from_slice(&block_json);
    out.push(b'}');
    out.into()
}

fn metadata_block(event: &Event, subscriber: &str, org: &OrganizationConfig) -> Map<String, Value> {
    let (derived_type, derived_trigger) = topic::type_and_trigger(&event.topic);
    let meta = |key: &str| event.metadata.get(key).cloned();
    let created = event
        .time
        .as_deref()
        .and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        })
        .unwrap_or_else(|| time::OffsetDateTime::from(event.received_at));
    let mut block = Map::new();
    block.insert("OrganizationID".into(), org.id.clone().into());
    block.insert("OrganizationName".into(), org.name.clone().into());
    block.insert("OrganizationURL".into(), org.url.clone().into());
    block.insert(
        "EventType".into(),
        meta("EventType").unwrap_or(derived_type).into(),
    );
    block.insert(
        "EventTrigger".into(),
        meta("EventTrigger").unwrap_or(derived_trigger).into(),
    );
    block.insert("Subscriber".into(), subscriber.into());
    block.insert(
        "CreatedBy".into(),
        meta("CreatedBy")
            .unwrap_or_else(|| "System Auto Execution".to_string())
            .into(),
    );
    block.insert("SourceEnvironment".into(), org.environment.clone().into());
    block.insert(
        "CreationDateTime".into(),
        creation_date_time(created).into(),
    );
    block
}

/// `2026-06-18T00:00:00.000Z`: UTC, milliseconds, as the outbound REST contract writes it.
fn creation_date_time(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// For tests and log lines: now in the `CreationDateTime` format.
pub fn format_time(t: SystemTime) -> String {
    creation_date_time(time::OffsetDateTime::from(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// The request head as it arrives on the socket: one Host and one Content-Length, with the
    /// right values, now that courier sets both itself.
    #[tokio::test]
    async fn one_host_and_one_content_length_on_the_wire() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            // The head, then the 12-byte body it announces.
            while !request.ends_with(b"{\"a\":\"body\"}") {
                let n = socket.read(&mut buf).await.expect("read");
                assert!(
                    n > 0,
                    "connection closed early: {:?}",
                    String::from_utf8_lossy(&request)
                );
                request.extend_from_slice(&buf[..n]);
            }
            socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .expect("write");
            String::from_utf8(request).expect("ASCII request")
        });
        let destinations = destination(&format!("http://{addr}/in"), "");
        let dest = destinations.get("a").expect("destination a");
        let outcome = deliver(dest, &event(r#"{"a":"body"}"#), None).await;
        assert_eq!(outcome, Outcome::Delivered { status: 200 });
        let request = server.await.expect("server task");
        let values = |name: &str| -> Vec<String> {
            request
                .split("\r\n")
                .filter_map(|line| line.split_once(':'))
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_string())
                .collect()
        };
        assert_eq!(values("host"), [addr.to_string()], "{request}");
        assert_eq!(values("content-length"), ["12"], "{request}");
        assert!(values("transfer-encoding").is_empty(), "{request}");
    }

    /// A server of raw HTTP/1.1 on loopback: every request (keep-alive included) is recorded with
    /// its head and body, and answered with `answer(n)` for the n-th request, or never when that
    /// is `None`.
    struct RawServer {
        addr: std::net::SocketAddr,
        requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    }

    impl RawServer {
        async fn start(answer: fn(usize) -> Option<String>) -> RawServer {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let seen = requests.clone();
            tokio::spawn(async move {
                while let Ok((mut socket, _)) = listener.accept().await {
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        let mut buf = Vec::new();
                        let mut chunk = [0u8; 4096];
                        loop {
                            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                                match socket.read(&mut chunk).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                                }
                                continue;
                            };
                            let head = String::from_utf8_lossy(&buf[..end]).to_string();
                            let length: usize = head
                                .lines()
                                .filter_map(|l| l.split_once(':'))
                                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                                .and_then(|(_, v)| v.trim().parse().ok())
                                .unwrap_or(0);
                            while buf.len() < end + 4 + length {
                                match socket.read(&mut chunk).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                                }
                            }
                            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]);
                            let n = {
                                let mut seen = seen.lock().expect("lock");
                                seen.push(format!("{head}\r\n\r\n{body}"));
                                seen.len() - 1
                            };
                            buf.drain(..end + 4 + length);
                            let Some(answer) = answer(n) else {
                                std::future::pending::<()>().await;
                                return;
                            };
                            if socket.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            });
            RawServer { addr, requests }
        }

        fn requests(&self) -> Vec<String> {
            self.requests.lock().expect("lock").clone()
        }
    }

    /// The destination `a` of a configuration with `extra` in its table.
    fn destination(url: &str, extra: &str) -> crate::destination::DestinationSet {
        let config = Config::from_toml(&format!(
            r#"
            [rabbitmq]
            url = "amqp://guest:guest@127.0.0.1:5672/%2f"
            queue = "q"
            [[destinations]]
            name = "a"
            url = "{url}"
            {extra}
            "#
        ))
        .expect("valid config");
        crate::install_crypto_provider();
        crate::destination::build(&config, &crate::Stats::default()).expect("destinations")
    }

    /// A 307 to the same origin is followed with the same POST, body and headers; a chain of
    /// them ends after ten, as a failed attempt that says why.
    #[tokio::test]
    async fn redirects_are_followed_with_the_post_at_most_ten_times() {
        let server = RawServer::start(|n| {
            Some(match n {
                0 => "HTTP/1.1 307 Temporary Redirect\r\nlocation: /next\r\ncontent-length: 0\r\n\r\n".into(),
                1 => "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".into(),
                _ => format!("HTTP/1.1 308 Permanent Redirect\r\nlocation: /loop/{n}\r\ncontent-length: 0\r\n\r\n"),
            })
        })
        .await;
        let set = destination(&format!("http://{}/in", server.addr), "");
        let dest = set.get("a").expect("destination a");
        let outcome = deliver(dest, &event(r#"{"a":"body"}"#), None).await;
        assert_eq!(outcome, Outcome::Delivered { status: 200 });
        let requests = server.requests();
        assert_eq!(requests.len(), 2, "{requests:?}");
        assert!(requests[0].starts_with("POST /in HTTP/1.1"), "{requests:?}");
        assert!(
            requests[1].starts_with("POST /next HTTP/1.1"),
            "{requests:?}"
        );
        for request in &requests {
            assert!(request.ends_with(r#"{"a":"body"}"#), "{request}");
            assert!(request.contains("x-request-id: e\r\n"), "{request}");
        }
        // Every further request is answered with a 308 to yet another path.
        let outcome = deliver(dest, &event(r#"{"a":"body"}"#), None).await;
        let Outcome::Failed { status, reason, .. } = outcome else {
            panic!("a redirect loop was delivered");
        };
        assert_eq!(status, Some(308));
        assert!(reason.contains("at most 10"), "{reason}");
        assert_eq!(server.requests().len(), 2 + 1 + MAX_REDIRECTS);
    }

    /// The timeout covers the answer's body too: a partner that sends its head and then stalls
    /// is a retryable failure once the timeout has passed.
    #[tokio::test]
    async fn the_timeout_covers_a_body_that_never_ends() {
        let server = RawServer::start(|n| {
            (n == 0).then(|| {
                "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 100\r\n\r\npartial".into()
            })
        })
        .await;
        let set = destination(
            &format!("http://{}/in", server.addr),
            r#"timeout = "300ms""#,
        );
        let dest = set.get("a").expect("destination a");
        let started = std::time::Instant::now();
        let outcome = deliver(dest, &event("{}"), None).await;
        let Outcome::Failed {
            status,
            reason,
            retryable,
            ..
        } = outcome
        else {
            panic!("a stalled answer was delivered");
        };
        // The head decides the outcome; the body that stalled is named in the reason.
        assert_eq!((status, retryable), (Some(500), true), "{reason}");
        assert!(reason.contains("timeout of 300ms"), "{reason}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// A 2xx whose body stalls was delivered: POSTing it again would deliver it twice.
    #[tokio::test]
    async fn a_2xx_whose_body_stalls_is_delivered() {
        let server = RawServer::start(|n| {
            (n == 0).then(|| "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial".into())
        })
        .await;
        let set = destination(
            &format!("http://{}/in", server.addr),
            r#"timeout = "300ms""#,
        );
        let dest = set.get("a").expect("destination a");
        let outcome = deliver(dest, &event("{}"), None).await;
        assert!(
            matches!(outcome, Outcome::Delivered { status: 200 }),
            "{outcome:?}"
        );
    }

    /// A proxy that refuses the tunnel of an `https` destination: the attempt fails with the
    /// proxy's answer in the reason, and the proxy got the credentials of the proxy URL.
    #[tokio::test]
    async fn a_refused_connect_says_what_the_proxy_answered() {
        let proxy = RawServer::start(|_| {
            Some("HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n".into())
        })
        .await;
        let set = destination(
            "https://partner.invalid/in",
            &format!(r#"proxy = "http://user:pw@{}""#, proxy.addr),
        );
        let dest = set.get("a").expect("destination a");
        let outcome = deliver(dest, &event("{}"), None).await;
        let Outcome::Failed {
            reason, retryable, ..
        } = outcome
        else {
            panic!("delivered through a refusing proxy");
        };
        assert!(retryable);
        assert!(reason.contains("407"), "{reason}");
        let requests = proxy.requests();
        assert_eq!(requests.len(), 1, "{requests:?}");
        assert!(
            requests[0].starts_with("CONNECT partner.invalid:443 HTTP/1.1"),
            "{requests:?}"
        );
        // user:pw
        assert!(
            requests[0].contains("Proxy-Authorization: Basic dXNlcjpwdw=="),
            "{requests:?}"
        );
    }

    /// No answer at all (nothing listens): a retryable failure whose reason names the URL and
    /// the system's error.
    #[tokio::test]
    async fn a_refused_connection_is_retryable_and_says_where_and_why() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let set = destination(&format!("http://{addr}/in"), "");
        let dest = set.get("a").expect("destination a");
        let Outcome::Failed {
            status,
            reason,
            retryable,
            ..
        } = deliver(dest, &event("{}"), None).await
        else {
            panic!("delivered to a closed port");
        };
        assert_eq!((status, retryable), (None, true), "{reason}");
        assert!(
            reason.starts_with(&format!(
                "error sending request for url (http://{addr}/in): "
            )),
            "{reason}"
        );
        assert!(reason.contains("Connection refused"), "{reason}");
    }

    /// courier's User-Agent and Accept, unless the destination's headers name their own.
    #[tokio::test]
    async fn user_agent_and_accept_unless_the_destination_sets_them() {
        let server = RawServer::start(|_| Some("HTTP/1.1 204 No Content\r\n\r\n".into())).await;
        let url = format!("http://{}/in", server.addr);
        let plain = destination(&url, "");
        let own = destination(&url, r#"headers = { "User-Agent" = "partner-agent/2" }"#);
        for set in [&plain, &own] {
            let dest = set.get("a").expect("destination a");
            assert_eq!(
                deliver(dest, &event("{}"), None).await,
                Outcome::Delivered { status: 204 }
            );
        }
        let requests = server.requests();
        assert_eq!(requests.len(), 2, "{requests:?}");
        let agent = concat!("user-agent: courier/", env!("CARGO_PKG_VERSION"), "\r\n");
        assert!(requests[0].contains(agent), "{requests:?}");
        assert!(requests[0].contains("accept: */*\r\n"), "{requests:?}");
        assert!(
            requests[1].contains("user-agent: partner-agent/2\r\n"),
            "{requests:?}"
        );
        assert!(!requests[1].contains("courier/"), "{requests:?}");
    }

    fn event(body: &str) -> Event {
        Event {
            id: "e".into(),
            topic: "a.batch.run".into(),
            tenant_id: None,
            destination_id: None,
            eligible_for_retry: true,
            time: Some("2026-06-18T00:00:00Z".into()),
            metadata: Default::default(),
            body: bytes::Bytes::copy_from_slice(body.as_bytes()),
            received_at: SystemTime::UNIX_EPOCH,
            source: crate::event::SourceKind::Rabbitmq,
            properties: None,
            trace: None,
        }
    }

    #[test]
    fn metadata_block_keeps_the_body_bytes() {
        let org = OrganizationConfig::default();
        let out = with_metadata(
            &event(r#"{"z":1.50,"a":12345678901234567890123} "#),
            "s",
            &org,
        );
        let text = std::str::from_utf8(&out).unwrap();
        assert!(
            text.starts_with(r#"{"z":1.50,"a":12345678901234567890123,"Metadata":{"#),
            "{text}"
        );
        let v: Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["Metadata"]["EventType"], "Batch");
        assert_eq!(
            v["Metadata"]["CreationDateTime"],
            "2026-06-18T00:00:00.000Z"
        );
        let out = with_metadata(&event("{ }"), "s", &org);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["Metadata"]["Subscriber"], "s");
        let out = with_metadata(&event(r#"{"Metadata":{"Own":1.0},"n":2.50}"#), "s", &org);
        let text = std::str::from_utf8(&out).unwrap();
        assert!(
            text.contains(r#""Own":1.0"#) && text.contains("2.50"),
            "{text}"
        );
        let out = with_metadata(&event("[1]"), "s", &org);
        assert_eq!(&out[..], b"[1]");
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(90));
        let d = parse_retry_after(&later).unwrap();
        assert!(
            d > Duration::from_secs(80) && d <= Duration::from_secs(90),
            "{d:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn creation_time_format() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_781_740_800_123);
        assert_eq!(format_time(t), "2026-06-18T00:00:00.123Z");
    }
}
