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
use super::{default_true, redact_url, ConfigError, Secret, TlsConfig, MAX_PERMITS};
use crate::oauth2::TokenRequest;
use crate::signature::SigningKey;
use crate::status::{StatusMatch, StatusRules};
use crate::topic::TopicPattern;

/// Headers that belong to the contract or to the connection and can be set by neither static
/// headers nor metadata. `traceparent` and `tracestate` are among them: each attempt sends its
/// own span id ([`crate::trace`]), and a fixed value would tie every request to one span. The
/// framing and hop-by-hop ones would make the partner misread the body (`content-encoding`),
/// refuse it (`expect`), or reach a proxy (`proxy-authorization`).
pub const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "host",
    "x-request-id",
    "x-correlation-id",
    "authorization",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "traceparent",
    "tracestate",
];

/// One partner endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
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
    /// CA file, client certificate and verification name for an `https://` URL.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// The HTTP proxy every request goes through; unset: the proxy from the environment
    /// (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`), if any.
    #[serde(default)]
    pub proxy: Option<ProxyUrl>,
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
        if let Some(tls) = &self.tls {
            if self.url.url().scheme() != "https" {
                return Err(ConfigError::invalid(
                    format!("{key}.tls"),
                    "is set, but the url is http:// (plain TCP); use https:// for TLS",
                ));
            }
            let unused = tls.verification_keys();
            if !self.tls_verify && !unused.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{key}.tls_verify"),
                    format!(
                        "is false, so nothing is verified and {} would be ignored; remove one or the other",
                        unused.join(" and ")
                    ),
                ));
            }
        }
        if let Some(auth) = &self.auth {
            if let Some(written) = self.headers.written_name(auth.header_name()) {
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
    "is set by courier itself (contract, auth or trace context header) and cannot be overridden";

/// A destination's URL: absolute, `http` or `https`, with a host and without credentials
/// (an HTTP client would turn `user:password@` into a Basic header behind `auth`'s back, and the
/// URL is logged; credentials belong in `auth`, which is redacted everywhere).
#[derive(Clone, PartialEq, Eq)]
pub struct HttpUrl {
    url: Url,
    /// The same URL as the HTTP client takes it, parsed once here rather than per request.
    uri: hyper::Uri,
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
        // Only for plain http, which goes out over HTTP/1.1: HTTP/2 is negotiated only through
        // TLS, and over HTTP/2 the pool (src/http_pool.rs) sets no Host.
        let host = match url.scheme() {
            "http" => Some(host_header(&url)?),
            _ => None,
        };
        let uri = to_uri(&url)?;
        Ok(HttpUrl { url, uri, host })
    }

    /// The URL.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The URL as a request URI.
    pub fn uri(&self) -> &hyper::Uri {
        &self.uri
    }

    /// The `Host` header courier sets itself on `http` requests; `None` for `https`, whose
    /// requests may go out over HTTP/2 and get theirs from the pool over HTTP/1.1.
    pub fn host_header(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }
}

/// `url` as a request URI; `Url` serialises what it parsed percent-encoded, so only a URL no HTTP
/// request line can carry fails here.
pub fn to_uri(url: &Url) -> Result<hyper::Uri, String> {
    url.as_str()
        .parse()
        .map_err(|e| format!("{e}: {:?}", redact_url(url.as_str())))
}

/// `host[:port]` as HTTP clients set it (hyper-util's rule, and `host_header` in
/// src/http_pool.rs): the port only when it is not the scheme's default, which
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

/// A destination's `proxy`: an `http://` URL with a host, maybe with `user:password@`. It is
/// printed and serialised with the password replaced by `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    text: Secret,
    url: Url,
}

impl ProxyUrl {
    /// Parses `text`; the error text hides the password and completes `destinations[i].proxy: ...`.
    pub fn parse(text: &str) -> Result<ProxyUrl, String> {
        let shown = redact_url(text);
        if !text.contains("://") {
            return Err(format!("{shown:?} is not a URL; write http://host:port"));
        }
        let url = Url::parse(text).map_err(|e| format!("{e}: {shown:?}"))?;
        if url.scheme() != "http" {
            return Err(format!(
                "scheme {:?} is not supported; use an http:// proxy (https:// destinations go through it in a CONNECT tunnel)",
                url.scheme()
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err("has no host".into());
        }
        Ok(ProxyUrl {
            text: Secret::new(text),
            url,
        })
    }

    /// The URL, credentials included; for the HTTP client only.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The URL with its password replaced by `***`, for logs.
    pub fn redacted(&self) -> String {
        redact_url(self.text.expose())
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for ProxyUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        ProxyUrl::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Serialize for ProxyUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
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

/// Equal when written the same: the parsed map follows from it.
impl PartialEq for StaticHeaders {
    fn eq(&self, other: &StaticHeaders) -> bool {
        self.written == other.written
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

/// How courier authenticates to a destination, as written in the file: the two schemes of the
/// outbound REST contract, a static bearer token, and OAuth2 client credentials.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(
    tag = "type",
    rename_all = "snake_case",
    deny_unknown_fields,
    expecting = "a table with type = \"basic\", \"api_key\", \"bearer\" or \"oauth2\""
)]
enum AuthFile {
    /// `Authorization: Basic base64(username:password)`.
    Basic { username: String, password: Secret },
    /// One custom header (`header`) carrying the key.
    ApiKey { header: String, key: Secret },
    /// `Authorization: Bearer <token>`, the same token on every request.
    Bearer { token: Secret },
    /// `Authorization: Bearer <token>` with a token from an OAuth2 token endpoint (the client
    /// credentials grant, RFC 6749 section 4.4).
    #[serde(rename = "oauth2")]
    OAuth2 {
        token_url: String,
        client_id: String,
        client_secret: Secret,
        #[serde(default)]
        scope: Option<String>,
        #[serde(default)]
        audience: Option<String>,
        #[serde(default)]
        extra_params: BTreeMap<String, String>,
        #[serde(default)]
        client_auth: ClientAuth,
    },
}

/// How an OAuth2 client authenticates to the token endpoint (RFC 6749 section 2.3.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "&'static str")]
enum ClientAuth {
    /// `Authorization: Basic`, with the id and the secret form-urlencoded first.
    #[default]
    Basic,
    /// `client_id` and `client_secret` in the form body.
    Body,
}

impl TryFrom<String> for ClientAuth {
    type Error = String;

    fn try_from(text: String) -> Result<ClientAuth, String> {
        match text.as_str() {
            "basic" => Ok(ClientAuth::Basic),
            "body" => Ok(ClientAuth::Body),
            _ => Err(keyed(
                "client_auth",
                format!("{text:?} is not \"basic\" or \"body\""),
            )),
        }
    }
}

impl From<ClientAuth> for &'static str {
    fn from(auth: ClientAuth) -> &'static str {
        match auth {
            ClientAuth::Basic => "basic",
            ClientAuth::Body => "body",
        }
    }
}

/// Form parameters of the token request that courier sets itself.
const OWN_TOKEN_PARAMS: &[&str] = &[
    "grant_type",
    "client_id",
    "client_secret",
    "scope",
    "audience",
];

/// How courier authenticates to a destination, built when the file is loaded: the header it adds
/// to every request, or the OAuth2 token request. Header values are marked sensitive, and neither
/// `Debug` nor `Serialize` shows a secret.
#[derive(Clone, Deserialize)]
#[serde(try_from = "AuthFile")]
pub struct AuthConfig {
    written: AuthFile,
    scheme: Scheme,
}

#[derive(Clone)]
enum Scheme {
    /// The same header on every request: Basic, API key, bearer.
    Header {
        name: HeaderName,
        value: HeaderValue,
    },
    /// `Authorization: Bearer` with a token from this request.
    OAuth2(TokenRequest),
}

impl AuthConfig {
    /// The name of the header that carries the credentials; it cannot be overridden.
    pub fn header_name(&self) -> &HeaderName {
        match &self.scheme {
            Scheme::Header { name, .. } => name,
            Scheme::OAuth2(_) => &reqwest::header::AUTHORIZATION,
        }
    }

    /// The header sent on every request, for the schemes whose header never changes.
    pub fn static_header(&self) -> Option<(&HeaderName, &HeaderValue)> {
        match &self.scheme {
            Scheme::Header { name, value } => Some((name, value)),
            Scheme::OAuth2(_) => None,
        }
    }

    /// The token request, for `type = "oauth2"`.
    pub fn oauth2(&self) -> Option<&TokenRequest> {
        match &self.scheme {
            Scheme::Header { .. } => None,
            Scheme::OAuth2(request) => Some(request),
        }
    }
}

/// Equal when written the same: the header or token request follows from it.
impl PartialEq for AuthConfig {
    fn eq(&self, other: &AuthConfig) -> bool {
        self.written == other.written
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
            AuthFile::Bearer { token } => {
                let token = token.expose();
                if token.is_empty() {
                    return Err(keyed("token", "must not be empty"));
                }
                if token
                    .get(..7)
                    .is_some_and(|start| start.eq_ignore_ascii_case("bearer "))
                {
                    return Err(keyed(
                        "token",
                        "must be the token alone: courier adds the \"Bearer \" in front",
                    ));
                }
                let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                    keyed(
                        "token",
                        "contains characters that are not allowed in an HTTP header",
                    )
                })?;
                (reqwest::header::AUTHORIZATION, value)
            }
            AuthFile::OAuth2 {
                token_url,
                client_id,
                client_secret,
                scope,
                audience,
                extra_params,
                client_auth,
            } => {
                let request = token_request(
                    token_url,
                    client_id,
                    client_secret,
                    scope.as_deref(),
                    audience.as_deref(),
                    extra_params,
                    *client_auth,
                )?;
                return Ok(AuthConfig {
                    scheme: Scheme::OAuth2(request),
                    written,
                });
            }
        };
        let mut value = value;
        value.set_sensitive(true);
        Ok(AuthConfig {
            written,
            scheme: Scheme::Header { name, value },
        })
    }
}

/// Checks the keys of `type = "oauth2"` and builds the token request.
fn token_request(
    token_url: &str,
    client_id: &str,
    client_secret: &Secret,
    scope: Option<&str>,
    audience: Option<&str>,
    extra_params: &BTreeMap<String, String>,
    client_auth: ClientAuth,
) -> Result<TokenRequest, String> {
    let url = parse_token_url(token_url).map_err(|e| keyed("token_url", e))?;
    if client_id.is_empty() {
        return Err(keyed("client_id", "must not be empty"));
    }
    if client_secret.expose().is_empty() {
        return Err(keyed("client_secret", "must not be empty"));
    }
    let mut params: Vec<(&str, &str)> = Vec::with_capacity(extra_params.len() + 2);
    for (key, value) in [("scope", scope), ("audience", audience)] {
        if let Some(value) = value {
            if value.trim().is_empty() {
                return Err(keyed(
                    key,
                    "must not be empty; remove the key to leave it out of the token request",
                ));
            }
            params.push((key, value));
        }
    }
    for (name, value) in extra_params {
        if name.is_empty() {
            return Err(keyed("extra_params", "a parameter name must not be empty"));
        }
        if OWN_TOKEN_PARAMS.contains(&name.as_str()) {
            return Err(keyed(
                &format!("extra_params.{name}"),
                "is set by courier itself; use the auth keys of the same name",
            ));
        }
        params.push((name, value));
    }
    TokenRequest::new(
        url,
        client_id,
        client_secret,
        &params,
        client_auth == ClientAuth::Basic,
    )
    .map_err(|e| keyed("client_secret", e))
}

/// The token endpoint: absolute, `http` or `https`, with a host, without credentials (they go in
/// `client_id` and `client_secret`) and without a fragment (RFC 6749 section 3.2).
fn parse_token_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("{e}: {:?}", redact_url(text)))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "must not carry credentials (user:password@); use client_id and client_secret".into(),
        );
    }
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(format!("scheme {:?} is not http or https", url.scheme()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if url.fragment().is_some() {
        return Err("must not have a #fragment (RFC 6749 section 3.2)".into());
    }
    Ok(url)
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
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
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

    /// The `auth` table written as JSON.
    fn auth(json: &str) -> AuthConfig {
        let written: AuthFile = serde_json::from_str(json).expect("an auth table");
        AuthConfig::try_from(written).unwrap_or_else(|e| panic!("{json}: {e}"))
    }

    #[test]
    fn token_auth_is_sensitive_and_never_printed() {
        let bearer = auth(r#"{"type":"bearer","token":"tok-123"}"#);
        let (name, value) = bearer.static_header().expect("a static header");
        assert_eq!(name, reqwest::header::AUTHORIZATION);
        assert_eq!(value.to_str().expect("ASCII"), "Bearer tok-123");
        assert!(value.is_sensitive());
        assert!(bearer.oauth2().is_none());
        let oauth2 = auth(
            r#"{"type":"oauth2","token_url":"https://login.example/token?tenant=a",
                "client_id":"c","client_secret":"s3cret","extra_params":{"resource":"r"}}"#,
        );
        assert!(oauth2.static_header().is_none());
        assert_eq!(oauth2.header_name(), reqwest::header::AUTHORIZATION);
        assert_eq!(
            oauth2.oauth2().map(|r| r.url().as_str()),
            Some("https://login.example/token?tenant=a")
        );
        for shown in [
            format!("{bearer:?}{oauth2:?}"),
            serde_json::to_string(&(&bearer, &oauth2)).expect("serialise"),
        ] {
            assert!(
                !shown.contains("tok-123") && !shown.contains("s3cret"),
                "{shown}"
            );
        }
        let written = serde_json::to_value(&oauth2).expect("serialise");
        assert_eq!(
            written["client_auth"], "basic",
            "the default is written out"
        );
        assert_eq!(written["extra_params"]["resource"], "r");
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

    #[test]
    fn a_proxy_password_is_never_shown() {
        let proxy = ProxyUrl::parse("http://courier:s3cret@proxy.internal:3128").expect("valid");
        assert_eq!(proxy.redacted(), "http://courier:***@proxy.internal:3128");
        assert_eq!(proxy.url().password(), Some("s3cret"));
        assert!(!format!("{proxy:?} {proxy}").contains("s3cret"));
        let json = serde_json::to_string(&proxy).expect("serialise");
        assert!(!json.contains("s3cret"), "{json}");
        let err = ProxyUrl::parse("http://courier:s3cret@").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
        assert!(ProxyUrl::parse("https://proxy.internal:3128").is_err());
    }
}
