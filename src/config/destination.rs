//! `[[destinations]]`: the partner endpoints. Everything the sender puts on the wire (the URL,
//! static headers, the auth header, the signing key, the topic patterns) is parsed into its typed
//! form here, when the file is loaded, and is never checked again.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::Url;
use serde::{Deserialize, Serialize};

use super::expand::keyed;
use super::{default_true, redact_url, ConfigError, Secret, MAX_PERMITS};
use crate::signature::SigningKey;
use crate::status::{StatusMatch, StatusRules};
use crate::topic::TopicPattern;

/// Headers that belong to the contract and can be set by neither static headers nor metadata.
pub const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "transfer-encoding",
    "connection",
    "host",
    "x-request-id",
    "x-correlation-id",
    "authorization",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

/// One partner endpoint.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// Unique name; the dedup key, `Metadata.Subscriber`, and what `destination_id` refers to.
    pub name: String,
    /// Absolute `http://` or `https://` URL every matching event is POSTed to.
    pub url: HttpUrl,
    /// Topic patterns (`*`/`+` one segment, `#` any number, lone `*` everything).
    #[serde(default = "default_topics")]
    pub topics: Vec<TopicPattern>,
    /// When set, only events whose `tenant_id` equals it are sent here.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Add the `Metadata` block of the outbound REST contract to the body.
    #[serde(default)]
    pub metadata_in_payload: bool,
    /// Whole-request timeout, redirects included.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Verify the server's TLS certificate. `false` is for test partners only and is logged loudly.
    #[serde(default = "default_true")]
    pub tls_verify: bool,
    /// Static headers; event metadata overrides them, the contract headers override both.
    #[serde(default)]
    pub headers: StaticHeaders,
    /// How courier authenticates to the endpoint.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// POSTs to this destination under way at once; what is over waits (see `circuit.max_wait`).
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// `whsec_<base64>`: sign every request the Standard Webhooks way.
    #[serde(default)]
    pub signing_secret: Option<SigningKey>,
    /// How failed attempts are retried.
    #[serde(default)]
    pub retry: RetryConfig,
    /// When to stop attempting a failing or saturated destination for a while.
    #[serde(default)]
    pub circuit: CircuitConfig,
    /// Requests per period the destination accepts; over it, events wait for their turn.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Status codes and classes that are retried, whatever the default table says.
    #[serde(default)]
    pub retry_on: Vec<StatusMatch>,
    /// Status codes and classes that are final failures, whatever the default table says.
    #[serde(default)]
    pub final_on: Vec<StatusMatch>,
    /// Status codes and classes that mean delivered, whatever the default table says.
    #[serde(default)]
    pub success_on: Vec<StatusMatch>,
    /// Several `whsec_` secrets, one signature each (for rotating the secret); instead of
    /// `signing_secret`.
    #[serde(default)]
    pub signing_secrets: Option<Vec<SigningKey>>,
}

fn default_max_concurrency() -> usize {
    64
}
fn default_topics() -> Vec<TopicPattern> {
    vec![TopicPattern::every_topic()]
}
fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

impl DestinationConfig {
    /// Checks what the field types cannot check alone; `key` is `destinations[i]`.
    pub(super) fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(ConfigError::invalid(
                format!("{key}.name"),
                "must not be empty",
            ));
        }
        if self.name.contains('\0') {
            return Err(ConfigError::invalid(
                format!("{key}.name"),
                "must not contain a NUL character",
            ));
        }
        if self.topics.is_empty() {
            return Err(ConfigError::invalid(
                format!("{key}.topics"),
                "is empty, so nothing would ever be sent; use [\"*\"] for every topic",
            ));
        }
        if let Some(tenant) = &self.tenant {
            if tenant.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{key}.tenant"),
                    "must not be empty; remove the key to accept every tenant",
                ));
            }
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::invalid(
                format!("{key}.timeout"),
                "must be longer than 0s",
            ));
        }
        if self.max_concurrency == 0 {
            return Err(ConfigError::invalid(
                format!("{key}.max_concurrency"),
                "must be at least 1",
            ));
        }
        if self.max_concurrency > MAX_PERMITS {
            return Err(ConfigError::invalid(
                format!("{key}.max_concurrency"),
                format!("must be at most {MAX_PERMITS}"),
            ));
        }
        self.retry.validate(key)?;
        if self.circuit.failures == 0 || self.circuit.open_for.is_zero() {
            return Err(ConfigError::invalid(
                format!("{key}.circuit"),
                "failures must be at least 1 and open_for longer than 0s",
            ));
        }
        if let Some(auth) = &self.auth {
            if let Some(written) = self.headers.written_name(auth.header().0) {
                return Err(ConfigError::invalid(
                    format!("{key}.headers.{written}"),
                    OVERRIDES_COURIER,
                ));
            }
        }
        self.validate_policy(key)
    }

    /// The checks of the delivery policy: the rate limit, the status-code rules, the signing
    /// secrets.
    fn validate_policy(&self, key: &str) -> Result<(), ConfigError> {
        if let Some(rate) = &self.rate_limit {
            rate.validate(key)?;
        }
        if let Some((list, entry, other)) = self.status_rules().overlap() {
            return Err(ConfigError::invalid(
                format!("{key}.{list}"),
                format!(
                    "{entry} is also in {other}; a code or class may be in only one of \
                     retry_on, final_on and success_on (a code in one and its class in another \
                     is fine: the code wins)"
                ),
            ));
        }
        match &self.signing_secrets {
            Some(_) if self.signing_secret.is_some() => Err(ConfigError::invalid(
                format!("{key}.signing_secrets"),
                "set either signing_secret or signing_secrets, not both",
            )),
            Some(secrets) if secrets.is_empty() => Err(ConfigError::invalid(
                format!("{key}.signing_secrets"),
                "is empty; list at least one secret, or remove the key to send unsigned requests",
            )),
            _ => Ok(()),
        }
    }

    /// The destination's status-code rules over the default table.
    pub fn status_rules(&self) -> StatusRules<'_> {
        StatusRules {
            success_on: &self.success_on,
            retry_on: &self.retry_on,
            final_on: &self.final_on,
        }
    }

    /// The keys every request is signed with, one signature each: `signing_secret` or
    /// `signing_secrets`; empty when requests are not signed.
    pub fn signing_keys(&self) -> &[SigningKey] {
        match &self.signing_secrets {
            Some(keys) => keys,
            None => self.signing_secret.as_slice(),
        }
    }
}

const OVERRIDES_COURIER: &str =
    "is set by courier itself (contract or auth header) and cannot be overridden";

/// A destination's URL: absolute, `http` or `https`, with a host and without credentials
/// (reqwest would turn `user:password@` into a Basic header behind `auth`'s back, and the URL
/// is logged; credentials belong in `auth`, which is redacted everywhere).
#[derive(Clone, PartialEq, Eq)]
pub struct HttpUrl {
    url: Url,
    host: Option<HeaderValue>,
}

impl HttpUrl {
    /// Parses `text`; the error text completes `destinations[i].url: ...`.
    pub fn parse(text: &str) -> Result<HttpUrl, String> {
        let url = Url::parse(text).map_err(|e| format!("{e}: {:?}", redact_url(text)))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(
                "must not carry credentials (user:password@); use auth = { type = \"basic\", ... }"
                    .into(),
            );
        }
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(format!("scheme {:?} is not http or https", url.scheme()));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err("has no host".into());
        }
        // Only for plain http, which goes out over HTTP/1.1: reqwest negotiates HTTP/2 only
        // through TLS, and over HTTP/2 hyper-util sets no Host. The exception, an `https` proxy
        // from the environment that picks HTTP/2, carries this Host beside an equal
        // `:authority`, which RFC 9113 section 8.3.1 allows.
        let host = match url.scheme() {
            "http" => Some(host_header(&url)?),
            _ => None,
        };
        Ok(HttpUrl { url, host })
    }

    /// The URL.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The `Host` header courier sets itself on `http` requests; `None` for `https`, whose
    /// requests may go out over HTTP/2 and keep hyper-util's own handling.
    pub fn host_header(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }
}

/// `host[:port]` as hyper-util sets it: the port only when it is not the scheme's default, which
/// `Url` already leaves out; IPv6 hosts keep their brackets. Redirects are followed only to the
/// same origin, so the value holds for a followed 307/308 too.
fn host_header(url: &Url) -> Result<HeaderValue, String> {
    let host = url.host_str().ok_or("has no host")?;
    let value = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    HeaderValue::from_str(&value).map_err(|e| format!("host {value:?}: {e}"))
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.url, f)
    }
}

impl fmt::Debug for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.url.as_str(), f)
    }
}

impl<'de> Deserialize<'de> for HttpUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        HttpUrl::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Serialize for HttpUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.url.as_str())
    }
}

/// A destination's static headers, checked and converted one by one as they are read, so an
/// error names the header's own key (`destinations[0].headers.X-Partner`).
#[derive(Clone, Default)]
pub struct StaticHeaders {
    /// As written, for serialising and for naming a header in an error.
    written: BTreeMap<String, String>,
    map: HeaderMap,
}

impl StaticHeaders {
    /// The headers, ready to send.
    pub fn map(&self) -> &HeaderMap {
        &self.map
    }

    /// The name as written of the header `name`, if there is one.
    fn written_name(&self, name: &HeaderName) -> Option<&str> {
        self.written
            .keys()
            .find(|w| w.eq_ignore_ascii_case(name.as_str()))
            .map(String::as_str)
    }
}

impl fmt::Debug for StaticHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.written, f)
    }
}

impl Serialize for StaticHeaders {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.written.serialize(s)
    }
}

impl<'de> Deserialize<'de> for StaticHeaders {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = StaticHeaders;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut entries: A,
            ) -> Result<StaticHeaders, A::Error> {
                let mut parsed = BTreeMap::new();
                let mut written = BTreeMap::new();
                while let Some(name) = entries.next_key::<String>()? {
                    // Checked while the value is read, so the error carries the header's key.
                    let (header, text, value) =
                        entries.next_value_seed(HeaderSeed { name: &name })?;
                    written.insert(name.clone(), text);
                    parsed.insert(name, (header, value));
                }
                // Inserted in the order of the written names.
                let mut map = HeaderMap::with_capacity(parsed.len());
                for (header, value) in parsed.into_values() {
                    map.insert(header, value);
                }
                Ok(StaticHeaders { written, map })
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// Reads one static header's value and checks the header as a whole.
struct HeaderSeed<'a> {
    name: &'a str,
}

impl<'de> serde::de::DeserializeSeed<'de> for HeaderSeed<'_> {
    type Value = (HeaderName, String, HeaderValue);

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        use serde::de::Error as _;
        let text = String::deserialize(d)?;
        let name = header_name(self.name).map_err(D::Error::custom)?;
        if RESERVED_HEADERS.contains(&name.as_str()) {
            return Err(D::Error::custom(OVERRIDES_COURIER));
        }
        let value = HeaderValue::from_str(&text).map_err(|_| {
            D::Error::custom("value contains characters that are not allowed in an HTTP header")
        })?;
        Ok((name, text, value))
    }
}

fn header_name(name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not a valid HTTP header name"))
}

/// The two auth schemes of the outbound REST contract, as written in the file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(
    tag = "type",
    rename_all = "snake_case",
    deny_unknown_fields,
    expecting = "a table with type = \"basic\" or type = \"api_key\""
)]
enum AuthFile {
    /// `Authorization: Basic base64(username:password)`.
    Basic { username: String, password: Secret },
    /// One custom header (`header`) carrying the key.
    ApiKey { header: String, key: Secret },
}

/// How courier authenticates to a destination: the header it adds to every request, built when
/// the file is loaded. The value is marked sensitive, and neither `Debug` nor `Serialize` shows
/// the secret.
#[derive(Clone, Deserialize)]
#[serde(try_from = "AuthFile")]
pub struct AuthConfig {
    written: AuthFile,
    name: HeaderName,
    value: HeaderValue,
}

impl AuthConfig {
    /// The header that carries the credentials; it cannot be overridden.
    pub fn header(&self) -> (&HeaderName, &HeaderValue) {
        (&self.name, &self.value)
    }
}

impl TryFrom<AuthFile> for AuthConfig {
    type Error = String;

    fn try_from(written: AuthFile) -> Result<AuthConfig, String> {
        let (name, value) = match &written {
            AuthFile::Basic { username, password } => {
                if username.contains(':') {
                    return Err(keyed(
                        "username",
                        "must not contain ':' (Basic auth joins username:password)",
                    ));
                }
                let token = base64::engine::general_purpose::STANDARD
                    .encode(format!("{username}:{}", password.expose()));
                // Base64 is always a valid header value.
                let value = HeaderValue::from_str(&format!("Basic {token}"))
                    .map_err(|e| keyed("password", e))?;
                (reqwest::header::AUTHORIZATION, value)
            }
            AuthFile::ApiKey { header, key } => {
                let name = header_name(header).map_err(|e| keyed("header", e))?;
                if RESERVED_HEADERS.contains(&name.as_str()) {
                    return Err(keyed(
                        "header",
                        format!("{header:?} is a contract header and cannot carry the API key"),
                    ));
                }
                if key.expose().is_empty() {
                    return Err(keyed("key", "must not be empty"));
                }
                let value = HeaderValue::from_str(key.expose()).map_err(|_| {
                    keyed(
                        "key",
                        "contains characters that are not allowed in an HTTP header",
                    )
                })?;
                (name, value)
            }
        };
        let mut value = value;
        value.set_sensitive(true);
        Ok(AuthConfig {
            written,
            name,
            value,
        })
    }
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.written, f)
    }
}

impl Serialize for AuthConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.written.serialize(s)
    }
}

/// The retry schedule of one destination: exponential with jitter, capped.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts in all, the first included; 1 means no retries.
    pub max_attempts: u32,
    /// Wait before the second attempt.
    #[serde(with = "humantime_serde")]
    pub initial_interval: Duration,
    /// Each further wait is the previous one times this (before jitter).
    pub multiplier: f64,
    /// No wait is longer than this, `Retry-After` included.
    #[serde(with = "humantime_serde")]
    pub max_interval: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 8,
            initial_interval: Duration::from_secs(1),
            multiplier: 2.0,
            max_interval: Duration::from_secs(600),
        }
    }
}

impl RetryConfig {
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.max_attempts == 0 {
            return Err(ConfigError::invalid(
                format!("{key}.retry.max_attempts"),
                "must be at least 1 (1 = no retries)",
            ));
        }
        if self.initial_interval.is_zero() || self.max_interval < self.initial_interval {
            return Err(ConfigError::invalid(
                format!("{key}.retry"),
                "needs 0 < initial_interval <= max_interval",
            ));
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err(ConfigError::invalid(
                format!("{key}.retry.multiplier"),
                "must be a number >= 1.0",
            ));
        }
        Ok(())
    }
}

/// The circuit of one destination.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitConfig {
    /// Consecutive retryable failures (timeouts, refused connections, and the answers that are
    /// retryable: 5xx, 408, 429 by default, or as the destination's status rules say) that open it.
    pub failures: u32,
    /// How long it stays open before one probe attempt is let through.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
    /// An event that waited this long for one of `max_concurrency` slots opens it too: the
    /// destination is not keeping up, and waiting longer would hold queue messages hostage.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        CircuitConfig {
            failures: 5,
            open_for: Duration::from_secs(30),
            max_wait: Duration::from_secs(1),
        }
    }
}

/// A destination's rate limit: `requests` per `per`, up to `burst` at once after a quiet spell.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table such as { requests = 100, per = \"1s\", burst = 20 }"
)]
pub struct RateLimitConfig {
    /// Requests per `per`.
    pub requests: u32,
    /// The period `requests` are counted over.
    #[serde(default = "default_rate_period", with = "humantime_serde")]
    pub per: Duration,
    /// Requests that may go at once after the destination was quiet (the bucket's size).
    #[serde(default = "default_burst")]
    pub burst: u32,
}

fn default_rate_period() -> Duration {
    Duration::from_secs(1)
}
fn default_burst() -> u32 {
    1
}

impl RateLimitConfig {
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.requests == 0 {
            return Err(ConfigError::invalid(
                format!("{key}.rate_limit.requests"),
                "must be at least 1; remove rate_limit for no limit",
            ));
        }
        if self.per.is_zero() {
            return Err(ConfigError::invalid(
                format!("{key}.rate_limit.per"),
                "must be longer than 0s",
            ));
        }
        if self.burst == 0 {
            return Err(ConfigError::invalid(
                format!("{key}.rate_limit.burst"),
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hyper-util's own rule (`get_non_default_port` in its legacy client), on the `Uri` reqwest
    /// hands it, so the precomputed value is the one hyper-util would have sent.
    fn host_as_hyper_util_sets_it(url: &Url) -> String {
        let uri: axum::http::Uri = url.as_str().parse().expect("a Url is a valid Uri");
        let host = uri.host().expect("authority implies host");
        let secure = matches!(uri.scheme_str(), Some("https" | "wss"));
        match (uri.port_u16(), secure) {
            (Some(443), true) | (Some(80), false) | (None, _) => host.to_string(),
            (Some(port), _) => format!("{host}:{port}"),
        }
    }

    #[test]
    fn host_header_is_what_hyper_util_would_set() {
        for url in [
            "http://127.0.0.1:8080/events",
            "http://127.0.0.1:80/events",
            "https://partner.example:443/hook",
            "https://partner.example:8443/hook",
            "http://[::1]:9000/x",
            "https://[2001:db8::1]/x",
            "http://user:pw@h.example/x?y=1",
            "https://B\u{fc}cher.example/x",
            "http://LOCALHOST:81",
        ] {
            let url = Url::parse(url).expect("test URL");
            let ours = host_header(&url).expect("has a host");
            assert_eq!(
                ours.to_str().expect("ASCII"),
                host_as_hyper_util_sets_it(&url),
                "{url}"
            );
        }
    }

    #[test]
    fn only_http_urls_carry_a_host_of_their_own() {
        let http = HttpUrl::parse("http://127.0.0.1:8080/in").expect("valid");
        assert_eq!(
            http.host_header().map(|h| h.to_str().expect("ASCII")),
            Some("127.0.0.1:8080")
        );
        let https = HttpUrl::parse("https://partner.example/in").expect("valid");
        assert!(https.host_header().is_none());
    }
}
