//! Typed configuration: built-in defaults, then the TOML file, then `COURIER_*` environment
//! variables, then `${VAR}` expansion, then validation that names the offending key.
//!
//! Everything a user can get wrong is caught here, before courier connects to anything, so a bad
//! deployment fails fast with exit code 2 instead of half-starting.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::router;

/// A configuration problem, always phrased as `key.path: what is wrong`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {message}")]
    File { path: String, message: String },
    /// A key has the wrong type, is unknown, or is missing.
    #[error("{0}")]
    Shape(String),
    /// A value is well-formed but not acceptable.
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// A string that must never be printed: passwords, API keys, signing secrets.
///
/// `Debug` and `Display` print `***`, so a config struct can be logged whole without leaking.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Serialize for Secret {
    /// Secrets serialise as `***`: a configuration can be dumped without leaking them.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

impl Secret {
    /// Wraps a value read from somewhere other than the config file.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself; call only where it goes onto the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The whole configuration. Sections that are absent take their defaults; a source section that
/// is absent turns that source off.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Limits that apply to the whole worker.
    #[serde(default)]
    pub service: ServiceConfig,
    /// Who is sending, for the `Metadata` block of seed 000.
    #[serde(default)]
    pub organization: OrganizationConfig,
    /// The local sled store (dedup and dead letters).
    #[serde(default)]
    pub store: StoreConfig,
    /// The RabbitMQ source; absent means RabbitMQ is not consumed.
    #[serde(default)]
    pub rabbitmq: Option<RabbitMqConfig>,
    /// The MQTT source; absent means MQTT is not consumed.
    #[serde(default)]
    pub mqtt: Option<MqttConfig>,
    /// The partner endpoints events are POSTed to.
    #[serde(default)]
    pub destinations: Vec<DestinationConfig>,
    /// The admin HTTP port.
    #[serde(default)]
    pub admin: AdminConfig,
}

/// The admin HTTP port: health, and the dead-letter commands of a running worker.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `host:port` to listen on, e.g. `127.0.0.1:9464`; absent means no admin port. The
    /// `courier dead-letters` commands use it to reach a worker that holds the store.
    pub listen: Option<String>,
}

/// Limits for the whole worker.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// Events in delivery at once, over all sources. Bounds memory and open requests.
    pub max_in_flight: usize,
    /// How long a graceful shutdown waits for in-flight deliveries before leaving them unacked.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Bodies larger than this are dead-lettered unparsed, so one huge message cannot exhaust memory.
    pub max_payload_bytes: usize,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            max_in_flight: 256,
            shutdown_timeout: Duration::from_secs(30),
            max_payload_bytes: 1024 * 1024,
        }
    }
}

/// The sender's identity, copied into the `Metadata` block when a destination asks for it.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrganizationConfig {
    /// `Metadata.OrganizationID`.
    pub id: String,
    /// `Metadata.OrganizationName`.
    pub name: String,
    /// `Metadata.OrganizationURL`.
    pub url: String,
    /// `Metadata.SourceEnvironment`.
    pub environment: String,
}

/// The local store.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Directory of the sled database. One courier process per directory.
    pub path: PathBuf,
    /// How long a successful delivery is remembered to suppress a second POST of the same event.
    #[serde(with = "humantime_serde")]
    pub dedup_ttl: Duration,
    /// sled's page cache in bytes; sled's own default (1 GiB) is far too much for a sidecar.
    pub cache_capacity: u64,
    /// How long the dedup record of a delivered, acked event may stay in memory before a
    /// background flush makes it durable. Losing one in a crash can cost a second POST of a
    /// redelivered copy, never an event, so these records share one flush per interval instead
    /// of holding their messages until a flush of their own; retries and dead letters are
    /// flushed before their ack whatever this says.
    #[serde(with = "humantime_serde")]
    pub dedup_flush_interval: Duration,
    /// Where the dedup record lives: `sled` (this process's store) or `redis` (shared by replicas).
    pub dedup: DedupBackend,
    /// `redis://[:password@]host:6379[/db]`, for `dedup = "redis"`.
    pub redis_url: Secret,
    /// Prefix of the dedup keys in Redis, so several deployments can share one Redis.
    pub redis_prefix: String,
}

/// Where the dedup record lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupBackend {
    /// The local sled tree (one replica, or replicas that never share messages).
    #[default]
    Sled,
    /// Redis, shared by every replica consuming the same queue or shared subscription.
    Redis,
}

impl<'de> Deserialize<'de> for DedupBackend {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "sled" => Ok(DedupBackend::Sled),
            "redis" => Ok(DedupBackend::Redis),
            other => Err(serde::de::Error::custom(format!(
                "unknown dedup backend {other:?}, expected \"sled\" or \"redis\""
            ))),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("data/courier"),
            dedup_ttl: Duration::from_secs(7 * 24 * 3600),
            cache_capacity: 16 * 1024 * 1024,
            dedup_flush_interval: Duration::from_millis(10),
            dedup: DedupBackend::Sled,
            redis_url: Secret::new("redis://127.0.0.1:6379"),
            redis_prefix: "courier:dedup:".to_string(),
        }
    }
}

/// How a message body is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Envelope when the object has `data` and one of `id`, `topic`, `tenant_id`; raw otherwise.
    #[default]
    Auto,
    /// The seed 002 envelope; `data` is what gets POSTed.
    Envelope,
    /// Any JSON object, POSTed as it is (seed 000).
    Raw,
}

impl<'de> Deserialize<'de> for Format {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "auto" => Ok(Format::Auto),
            "envelope" => Ok(Format::Envelope),
            "raw" => Ok(Format::Raw),
            other => Err(serde::de::Error::custom(format!(
                "unknown format {other:?}, expected \"auto\", \"envelope\" or \"raw\""
            ))),
        }
    }
}

/// The RabbitMQ source.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitMqConfig {
    /// `amqp://user:pass@host:port/vhost` (or `amqps://`). Treated as a secret: logs show it without the password.
    pub url: Secret,
    /// The queue to consume.
    pub queue: String,
    /// Unacked messages the broker may push at once; capped at `service.max_in_flight`.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Declare the durable queue, the exchanges and the bindings at every (re)connect.
    #[serde(default = "default_true")]
    pub declare: bool,
    /// How bodies are read.
    #[serde(default)]
    pub format: Format,
    /// Durable topic exchanges to bind the queue to; producers may also publish straight to the queue.
    #[serde(default)]
    pub bindings: Vec<BindingConfig>,
    /// The connection name shown by `rabbitmqctl list_connections` and the management UI.
    #[serde(default = "default_connection_name")]
    pub connection_name: String,
    /// Arguments of the queue declaration, e.g. `{ "x-queue-type" = "quorum" }` for a replicated
    /// quorum queue. They must match the queue's existing arguments, or RabbitMQ refuses the
    /// declaration (and courier keeps retrying, loudly).
    #[serde(default)]
    pub queue_arguments: BTreeMap<String, QueueArgument>,
}

/// One queue argument value.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged, expecting = "must be a string, an integer or a boolean")]
pub enum QueueArgument {
    /// `true` / `false`.
    Bool(bool),
    /// A whole number (`x-max-length`, `x-delivery-limit`, ...).
    Int(i64),
    /// A string (`x-queue-type`, `x-dead-letter-exchange`, ...).
    Text(String),
}

fn default_prefetch() -> u16 {
    256
}
fn default_true() -> bool {
    true
}
fn default_connection_name() -> String {
    "courier".to_string()
}

/// One exchange → queue binding.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BindingConfig {
    /// A durable topic exchange, declared when `declare = true`.
    pub exchange: String,
    /// The binding key; `#` takes everything published to the exchange.
    #[serde(default = "default_routing_key")]
    pub routing_key: String,
}

fn default_routing_key() -> String {
    "#".to_string()
}

/// The MQTT source (MQTT 3.1.1).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host[:1883]` or `mqtts://host[:8883]` (TLS, verified against the system roots).
    pub url: String,
    /// The session's key at the broker. Required when `clean_session = false`, because a
    /// persistent session is found again by its client id.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Topic filters to subscribe to (`+` one level, `#` the rest).
    pub topics: Vec<String>,
    /// Subscription QoS: 1 (at least once, acked after delivery) or 0 (no acks, no redelivery).
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// `false` keeps the session at the broker while courier is away, so nothing published in
    /// the meantime, and nothing received but not yet acked, is lost.
    #[serde(default)]
    pub clean_session: bool,
    /// Non-empty: subscribe as `$share/<group>/<filter>` so replicas split the traffic.
    #[serde(default)]
    pub shared_group: String,
    /// How bodies are read.
    #[serde(default)]
    pub format: Format,
    /// Broker user name.
    #[serde(default)]
    pub username: Option<String>,
    /// Broker password; needs `username`.
    #[serde(default)]
    pub password: Option<Secret>,
    /// Ping interval when idle; the broker drops the connection after 1.5 × this without traffic.
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
}

fn default_qos() -> u8 {
    1
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}

impl MqttConfig {
    /// Host, port and whether TLS is on, from `url`.
    pub fn endpoint(&self) -> Result<(String, u16, bool), String> {
        let url = reqwest::Url::parse(&self.url).map_err(|e| format!("{e}: {:?}", self.url))?;
        let tls = match url.scheme() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            other => {
                return Err(format!(
                    "scheme {other:?} is not mqtt (or tcp) or mqtts (or ssl)"
                ))
            }
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(
                "put credentials in mqtt.username and mqtt.password, not in the URL".into(),
            );
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| "has no host".to_string())?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
        Ok((host, port, tls))
    }

    /// The filters as subscribed: with the `$share/<group>/` prefix when a group is set.
    pub fn subscriptions(&self) -> Vec<String> {
        self.topics
            .iter()
            .map(|t| {
                if self.shared_group.is_empty() {
                    t.clone()
                } else {
                    format!("$share/{}/{t}", self.shared_group)
                }
            })
            .collect()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.endpoint()
            .map_err(|e| ConfigError::invalid("mqtt.url", e))?;
        match &self.client_id {
            Some(id) if id.is_empty() => {
                return Err(ConfigError::invalid("mqtt.client_id", "must not be empty"))
            }
            None if !self.clean_session => {
                return Err(ConfigError::invalid(
                    "mqtt.client_id",
                    "is required when clean_session = false: the broker finds a persistent session by its client id",
                ))
            }
            _ => {}
        }
        if self.topics.is_empty() {
            return Err(ConfigError::invalid(
                "mqtt.topics",
                "needs at least one topic filter",
            ));
        }
        for (i, filter) in self.topics.iter().enumerate() {
            check_mqtt_filter(filter)
                .map_err(|e| ConfigError::invalid(format!("mqtt.topics[{i}]"), e))?;
            if !self.shared_group.is_empty() && filter.starts_with("$share/") {
                return Err(ConfigError::invalid(
                    format!("mqtt.topics[{i}]"),
                    "is already a $share/ filter; set either shared_group or the prefix, not both",
                ));
            }
        }
        if self.qos > 1 {
            return Err(ConfigError::invalid(
                "mqtt.qos",
                format!(
                    "{} is not supported; use 1 (acked after delivery) or 0",
                    self.qos
                ),
            ));
        }
        if self.shared_group.contains(['/', '+', '#']) {
            return Err(ConfigError::invalid(
                "mqtt.shared_group",
                "must not contain '/', '+' or '#'",
            ));
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(ConfigError::invalid(
                "mqtt.password",
                "is set but mqtt.username is not",
            ));
        }
        if self.keep_alive < Duration::from_secs(1) && !self.keep_alive.is_zero() {
            return Err(ConfigError::invalid(
                "mqtt.keep_alive",
                "must be at least 1s (or 0s to turn pings off)",
            ));
        }
        // The CONNECT packet carries whole seconds in 16 bits; anything else would tell the broker
        // a different interval from the one courier pings at, and the broker would drop it.
        if self.keep_alive > Duration::from_secs(u16::MAX.into()) {
            return Err(ConfigError::invalid(
                "mqtt.keep_alive",
                "must be at most 65535s (18h 12m 15s), the MQTT limit",
            ));
        }
        if self.keep_alive.subsec_nanos() != 0 {
            return Err(ConfigError::invalid(
                "mqtt.keep_alive",
                "must be a whole number of seconds",
            ));
        }
        Ok(())
    }
}

/// An MQTT topic filter: `#` only as the whole last level, `+` only as a whole level.
fn check_mqtt_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("empty topic filter".into());
    }
    if filter.contains('\0') {
        return Err("contains a NUL character".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err(format!("{filter:?}: '#' must be the whole last level"));
        }
        if level.contains('+') && *level != "+" {
            return Err(format!("{filter:?}: '+' must be a whole level"));
        }
    }
    Ok(())
}

/// One partner endpoint.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// Unique name; the dedup key, `Metadata.Subscriber`, and what `destination_id` refers to.
    pub name: String,
    /// Absolute `http://` or `https://` URL every matching event is POSTed to.
    pub url: String,
    /// Topic patterns (`*`/`+` one segment, `#` any number, lone `*` everything).
    #[serde(default = "default_topics")]
    pub topics: Vec<String>,
    /// When set, only events whose `tenant_id` equals it are sent here.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Add the seed 000 `Metadata` block to the body.
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
    pub headers: BTreeMap<String, String>,
    /// How courier authenticates to the endpoint.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// POSTs to this destination under way at once; what is over waits (see `circuit.max_wait`).
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// `whsec_<base64>`: sign every request the Standard Webhooks way.
    #[serde(default)]
    pub signing_secret: Option<Secret>,
    /// How failed attempts are retried.
    #[serde(default)]
    pub retry: RetryConfig,
    /// When to stop attempting a failing or saturated destination for a while.
    #[serde(default)]
    pub circuit: CircuitConfig,
}

fn default_max_concurrency() -> usize {
    64
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

/// The circuit of one destination.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitConfig {
    /// Consecutive retryable failures (timeouts, refused connections, 5xx, 408, 429) that open it.
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

fn default_topics() -> Vec<String> {
    vec!["*".to_string()]
}
fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

/// The two auth schemes of seed 000.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(
    tag = "type",
    rename_all = "snake_case",
    deny_unknown_fields,
    expecting = "a table with type = \"basic\" or type = \"api_key\""
)]
pub enum AuthConfig {
    /// `Authorization: Basic base64(username:password)`.
    Basic { username: String, password: Secret },
    /// One custom header (`header`) carrying the key.
    ApiKey { header: String, key: Secret },
}

/// The most permits a tokio semaphore takes; more makes `Semaphore::new` panic at start-up.
const MAX_PERMITS: usize = tokio::sync::Semaphore::MAX_PERMITS;

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

impl Config {
    /// Loads `path`, applies `COURIER_*` variables of the process environment, expands `${VAR}`
    /// and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::from_parts(&text, &path.display().to_string(), &env)
    }

    /// Parses a TOML document with no environment overrides; `${VAR}` still reads the process
    /// environment. Meant for tests and embedding.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::from_parts(text, "config", &[])
    }

    /// The common path of [`Config::load`] and [`Config::from_toml`]; `env` is the environment to
    /// take `COURIER_*` overrides from.
    pub fn from_parts(
        text: &str,
        origin: &str,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        // Only COURIER_<SECTION>__<KEY> names are overrides; COURIER_LOG_FORMAT and the like are not.
        let overrides: config::Map<String, String> = env
            .iter()
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix("COURIER_")?;
                rest.contains("__").then(|| (k.clone(), v.clone()))
            })
            .collect();
        let built = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("COURIER")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(false)
                    .source(Some(overrides)),
            )
            .build()
            .map_err(|e| ConfigError::Shape(e.to_string().replace(&format!("{origin}: "), "")))?;
        let mut root: config::Value = built
            .try_deserialize()
            .map_err(|e| ConfigError::Shape(e.to_string()))?;
        expand_env(&mut root, &mut String::new())?;
        let config: Config = root
            .try_deserialize()
            .map_err(|e| ConfigError::Shape(shape_message(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: URLs, patterns, header names, uniqueness, ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.service.max_in_flight == 0 {
            return Err(ConfigError::invalid(
                "service.max_in_flight",
                "must be at least 1",
            ));
        }
        if self.service.max_in_flight > MAX_PERMITS {
            return Err(ConfigError::invalid(
                "service.max_in_flight",
                format!("must be at most {MAX_PERMITS}"),
            ));
        }
        if self.service.max_payload_bytes == 0 {
            return Err(ConfigError::invalid(
                "service.max_payload_bytes",
                "must be at least 1",
            ));
        }
        if self.store.dedup_ttl.is_zero() {
            return Err(ConfigError::invalid(
                "store.dedup_ttl",
                "must be longer than 0s",
            ));
        }
        if self.store.dedup_flush_interval > Duration::from_secs(60) {
            return Err(ConfigError::invalid(
                "store.dedup_flush_interval",
                "must be at most 60s (a crash loses the dedup records of up to this long)",
            ));
        }
        if self.store.path.as_os_str().is_empty() {
            return Err(ConfigError::invalid("store.path", "must not be empty"));
        }
        if self.store.dedup == DedupBackend::Redis {
            let url = self.store.redis_url.expose();
            let shown = redact_url(url);
            if url.starts_with("rediss://") {
                return Err(ConfigError::invalid(
                    "store.redis_url",
                    format!(
                        "{shown:?}: rediss:// (TLS) is not supported by this build; use redis://"
                    ),
                ));
            }
            if !url.starts_with("redis://") {
                return Err(ConfigError::invalid(
                    "store.redis_url",
                    format!("{shown:?} is not a redis:// URL"),
                ));
            }
            // Parses only; `courier run` would otherwise fail on it at start-up.
            redis::Client::open(url)
                .map_err(|e| ConfigError::invalid("store.redis_url", format!("{shown:?}: {e}")))?;
        }
        if let Some(rabbit) = &self.rabbitmq {
            rabbit.validate()?;
        }
        if let Some(mqtt) = &self.mqtt {
            mqtt.validate()?;
        }
        if self.rabbitmq.is_none() && self.mqtt.is_none() {
            return Err(ConfigError::invalid(
                "rabbitmq",
                "no source is configured: add a [rabbitmq] or an [mqtt] section",
            ));
        }
        if self.destinations.is_empty() {
            return Err(ConfigError::invalid(
                "destinations",
                "at least one [[destinations]] entry is required",
            ));
        }
        if let Some(listen) = &self.admin.listen {
            listen.parse::<std::net::SocketAddr>().map_err(|_| {
                ConfigError::invalid(
                    "admin.listen",
                    format!("{listen:?} is not an IP:port address such as 127.0.0.1:9464 (host names are not accepted)"),
                )
            })?;
        }
        let mut names = HashSet::new();
        for (i, dest) in self.destinations.iter().enumerate() {
            let key = format!("destinations[{i}]");
            dest.validate(&key)?;
            if !names.insert(dest.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("{key}.name"),
                    format!("duplicate destination name {:?}", dest.name),
                ));
            }
        }
        Ok(())
    }
}

impl RabbitMqConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let url = self.url.expose();
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return Err(ConfigError::invalid(
                "rabbitmq.url",
                format!("{:?} is not an amqp:// or amqps:// URL", redact_url(url)),
            ));
        }
        url.parse::<lapin::uri::AMQPUri>().map_err(|e| {
            ConfigError::invalid("rabbitmq.url", format!("{e}: {:?}", redact_url(url)))
        })?;
        if self.queue.trim().is_empty() {
            return Err(ConfigError::invalid("rabbitmq.queue", "must not be empty"));
        }
        if self.prefetch == 0 {
            return Err(ConfigError::invalid(
                "rabbitmq.prefetch",
                "must be at least 1",
            ));
        }
        for (i, b) in self.bindings.iter().enumerate() {
            if b.exchange.trim().is_empty() {
                return Err(ConfigError::invalid(
                    format!("rabbitmq.bindings[{i}].exchange"),
                    "must not be empty (the default exchange cannot be bound)",
                ));
            }
        }
        Ok(())
    }
}

impl DestinationConfig {
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
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
        let url = reqwest::Url::parse(&self.url).map_err(|e| {
            ConfigError::invalid(
                format!("{key}.url"),
                format!("{e}: {:?}", redact_url(&self.url)),
            )
        })?;
        // reqwest would turn user:password@ into a Basic header behind `auth`'s back, and the URL
        // is logged; credentials belong in `auth`, which is redacted everywhere.
        if !url.username().is_empty() || url.password().is_some() {
            return Err(ConfigError::invalid(
                format!("{key}.url"),
                "must not carry credentials (user:password@); use auth = { type = \"basic\", ... }",
            ));
        }
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(ConfigError::invalid(
                format!("{key}.url"),
                format!("scheme {:?} is not http or https", url.scheme()),
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(ConfigError::invalid(format!("{key}.url"), "has no host"));
        }
        if self.topics.is_empty() {
            return Err(ConfigError::invalid(
                format!("{key}.topics"),
                "is empty, so nothing would ever be sent; use [\"*\"] for every topic",
            ));
        }
        for (j, pattern) in self.topics.iter().enumerate() {
            router::check_pattern(pattern)
                .map_err(|e| ConfigError::invalid(format!("{key}.topics[{j}]"), e))?;
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
        let auth_header = match &self.auth {
            Some(AuthConfig::ApiKey {
                header,
                key: secret,
            }) => {
                let name = check_header_name(header)
                    .map_err(|e| ConfigError::invalid(format!("{key}.auth.header"), e))?;
                if RESERVED_HEADERS.contains(&name.as_str()) {
                    return Err(ConfigError::invalid(
                        format!("{key}.auth.header"),
                        format!("{header:?} is a contract header and cannot carry the API key"),
                    ));
                }
                if secret.expose().is_empty() {
                    return Err(ConfigError::invalid(
                        format!("{key}.auth.key"),
                        "must not be empty",
                    ));
                }
                HeaderValue::from_str(secret.expose()).map_err(|_| {
                    ConfigError::invalid(
                        format!("{key}.auth.key"),
                        "contains characters that are not allowed in an HTTP header",
                    )
                })?;
                Some(name)
            }
            Some(AuthConfig::Basic { username, .. }) => {
                if username.contains(':') {
                    return Err(ConfigError::invalid(
                        format!("{key}.auth.username"),
                        "must not contain ':' (Basic auth joins username:password)",
                    ));
                }
                None
            }
            None => None,
        };
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
        if let Some(secret) = &self.signing_secret {
            crate::sender::signing_key(secret.expose())
                .map_err(|e| ConfigError::invalid(format!("{key}.signing_secret"), e))?;
        }
        let r = &self.retry;
        if r.max_attempts == 0 {
            return Err(ConfigError::invalid(
                format!("{key}.retry.max_attempts"),
                "must be at least 1 (1 = no retries)",
            ));
        }
        if r.initial_interval.is_zero() || r.max_interval < r.initial_interval {
            return Err(ConfigError::invalid(
                format!("{key}.retry"),
                "needs 0 < initial_interval <= max_interval",
            ));
        }
        if !(r.multiplier.is_finite() && r.multiplier >= 1.0) {
            return Err(ConfigError::invalid(
                format!("{key}.retry.multiplier"),
                "must be a number >= 1.0",
            ));
        }
        if self.circuit.failures == 0 || self.circuit.open_for.is_zero() {
            return Err(ConfigError::invalid(
                format!("{key}.circuit"),
                "failures must be at least 1 and open_for longer than 0s",
            ));
        }
        for (name, value) in &self.headers {
            let hkey = format!("{key}.headers.{name}");
            let parsed = check_header_name(name).map_err(|e| ConfigError::invalid(&hkey, e))?;
            if RESERVED_HEADERS.contains(&parsed.as_str()) || Some(&parsed) == auth_header.as_ref()
            {
                return Err(ConfigError::invalid(
                    hkey,
                    "is set by courier itself (contract or auth header) and cannot be overridden",
                ));
            }
            HeaderValue::from_str(value).map_err(|_| {
                ConfigError::invalid(
                    hkey,
                    "value contains characters that are not allowed in an HTTP header",
                )
            })?;
        }
        Ok(())
    }
}

fn check_header_name(name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not a valid HTTP header name"))
}

/// `amqp://user:secret@host/` → `amqp://user:***@host/`, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_string(),
    }
}

/// The `config` crate puts the key last ("... for key `destinations[0]timeout`") and drops the dot
/// after an index; turn that into the `destinations[0].timeout: ...` form every other error has.
fn shape_message(e: config::ConfigError) -> String {
    let text = e.to_string();
    if let Some(at) = text.rfind(" for key `") {
        let key = text[at + " for key `".len()..].trim_end_matches('`');
        return format!("{}: {}", dotted(key), &text[..at]);
    }
    if let Some(rest) = text.strip_prefix("missing configuration field ") {
        return format!(
            "{}: is required but missing",
            dotted(rest.trim_matches('"'))
        );
    }
    text
}

/// `a[0]b` → `a[0].b`.
fn dotted(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    let mut after_index = false;
    for c in key.chars() {
        if after_index && c != '.' && c != '[' {
            out.push('.');
        }
        after_index = c == ']';
        out.push(c);
    }
    out
}

/// Replaces `${VAR}` and `${VAR:-default}` in every string value, naming the key when a variable
/// is missing so the operator knows which secret to provide.
fn expand_env(value: &mut config::Value, path: &mut String) -> Result<(), ConfigError> {
    match &mut value.kind {
        config::ValueKind::String(s) if s.contains("${") => {
            *s = expand_str(s).map_err(|m| ConfigError::invalid(path.clone(), m))?;
        }
        config::ValueKind::Table(table) => {
            for (k, v) in table.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                expand_env(v, path)?;
                path.truncate(len);
            }
        }
        config::ValueKind::Array(items) => {
            for (i, v) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                expand_env(v, path)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

fn expand_str(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated ${...} reference".to_string())?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("${{{inner}}} is not a valid variable reference"));
        }
        // As in the shell, `:-` also replaces a variable that is set but empty.
        match (std::env::var(name), default) {
            (Ok(v), Some(d)) if v.is_empty() => out.push_str(d),
            (Ok(v), _) => out.push_str(&v),
            (Err(_), Some(d)) => out.push_str(d),
            (Err(_), None) => {
                return Err(format!("environment variable {name} is not set"));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [rabbitmq]
        url = "amqp://guest:guest@127.0.0.1:5672/%2f"
        queue = "q"
        [[destinations]]
        name = "a"
        url = "http://127.0.0.1:1/x"
    "#;

    #[test]
    fn defaults_are_documented_values() {
        let c = Config::from_toml(MINIMAL).expect("valid");
        assert_eq!(c.service.max_in_flight, 256);
        assert_eq!(c.service.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.store.dedup_ttl, Duration::from_secs(7 * 86400));
        assert_eq!(c.store.dedup_flush_interval, Duration::from_millis(10));
        let r = c.rabbitmq.as_ref().expect("rabbitmq");
        assert_eq!(r.prefetch, 256);
        assert!(r.declare);
        assert_eq!(r.format, Format::Auto);
        let d = &c.destinations[0];
        assert_eq!(d.topics, vec!["*"]);
        assert_eq!(d.timeout, Duration::from_secs(60));
        assert!(d.tls_verify);
        assert!(!d.metadata_in_payload);
    }

    #[test]
    fn env_overrides_use_double_underscore() {
        let env = vec![
            (
                "COURIER_SERVICE__MAX_IN_FLIGHT".to_string(),
                "7".to_string(),
            ),
            ("COURIER_LOG_FORMAT".to_string(), "json".to_string()),
            ("COURIER_RABBITMQ__QUEUE".to_string(), "0123".to_string()),
            ("COURIER_RABBITMQ__DECLARE".to_string(), "false".to_string()),
        ];
        let c = Config::from_parts(MINIMAL, "t", &env).expect("valid");
        assert_eq!(c.service.max_in_flight, 7);
        let r = c.rabbitmq.expect("rabbitmq");
        assert_eq!(r.queue, "0123", "strings stay strings");
        assert!(!r.declare);
        let bad_format =
            MINIMAL.replace("queue = \"q\"", "queue = \"q\"\n        format = \"xml\"");
        let e = Config::from_toml(&bad_format).unwrap_err().to_string();
        assert!(
            e.starts_with("rabbitmq.format: unknown format \"xml\", expected"),
            "{e}"
        );
    }

    #[test]
    fn dedup_flush_interval_is_bounded() {
        let with = |v: &str| {
            MINIMAL.replace(
                "[rabbitmq]",
                &format!("[store]\ndedup_flush_interval = \"{v}\"\n[rabbitmq]"),
            )
        };
        let c = Config::from_toml(&with("0s")).expect("0s: flush as soon as a record waits");
        assert_eq!(c.store.dedup_flush_interval, Duration::ZERO);
        let e = Config::from_toml(&with("61s")).unwrap_err().to_string();
        assert!(
            e.starts_with("store.dedup_flush_interval: must be at most 60s"),
            "{e}"
        );
    }

    #[test]
    fn secrets_do_not_debug_print() {
        let text = format!(
            "{MINIMAL}\nauth = {{ type = \"basic\", username = \"u\", password = \"hunter2\" }}"
        );
        let c = Config::from_toml(&text).expect("valid");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(!dbg.contains("guest:guest"), "{dbg}");
    }

    #[test]
    fn expansion_and_defaults() {
        std::env::set_var("COURIER_TEST_EXPAND_X", "v1");
        assert_eq!(expand_str("a${COURIER_TEST_EXPAND_X}b").unwrap(), "av1b");
        assert_eq!(expand_str("${COURIER_TEST_NOPE:-d}").unwrap(), "d");
        std::env::set_var("COURIER_TEST_EXPAND_EMPTY", "");
        assert_eq!(expand_str("${COURIER_TEST_EXPAND_EMPTY:-d}").unwrap(), "d");
        assert!(expand_str("${COURIER_TEST_NOPE}")
            .unwrap_err()
            .contains("COURIER_TEST_NOPE is not set"));
        assert!(expand_str("${oops").is_err());
    }

    #[test]
    fn error_keys_are_dotted_and_first() {
        assert_eq!(dotted("destinations[0]timeout"), "destinations[0].timeout");
        assert_eq!(dotted("a[1][2]b.c"), "a[1][2].b.c");
        let e = Config::from_toml(&format!("{MINIMAL}\ntimeout = \"soon\"")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("destinations[0].timeout: invalid value"),
            "{e}"
        );
    }

    #[test]
    fn mqtt_section() {
        let base = "[[destinations]]\nname = \"a\"\nurl = \"http://127.0.0.1:1/x\"\n[mqtt]\n";
        let ok = format!("{base}url = \"mqtt://127.0.0.1\"\nclient_id = \"c\"\ntopics = [\"a/+/b\", \"x/#\"]\nshared_group = \"g\"");
        let c = Config::from_toml(&ok).expect("valid");
        let m = c.mqtt.expect("mqtt");
        assert_eq!(
            m.endpoint().unwrap(),
            ("127.0.0.1".to_string(), 1883, false)
        );
        assert_eq!(m.subscriptions(), vec!["$share/g/a/+/b", "$share/g/x/#"]);
        assert_eq!(m.qos, 1);
        assert!(!m.clean_session);
        let cases = [
            (
                "url = \"mqtt://h\"\ntopics = [\"t\"]",
                "mqtt.client_id: is required",
            ),
            (
                "url = \"http://h\"\nclient_id = \"c\"\ntopics = [\"t\"]",
                "mqtt.url: scheme",
            ),
            (
                "url = \"mqtt://u:p@h\"\nclient_id = \"c\"\ntopics = [\"t\"]",
                "mqtt.url: put credentials",
            ),
            (
                "url = \"mqtt://h\"\nclient_id = \"c\"\ntopics = [\"a/#/b\"]",
                "mqtt.topics[0]",
            ),
            (
                "url = \"mqtt://h\"\nclient_id = \"c\"\ntopics = [\"a+\"]",
                "mqtt.topics[0]",
            ),
            (
                "url = \"mqtt://h\"\nclient_id = \"c\"\ntopics = []",
                "mqtt.topics",
            ),
            (
                "url = \"mqtt://h\"\nclient_id = \"c\"\ntopics = [\"t\"]\nqos = 2",
                "mqtt.qos",
            ),
            (
                "url = \"mqtt://h\"\nclient_id = \"c\"\ntopics = [\"t\"]\npassword = \"p\"",
                "mqtt.password",
            ),
        ];
        for (body, want) in cases {
            let e = Config::from_toml(&format!("{base}{body}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "want {want:?} in {e}");
        }
    }

    #[test]
    fn redacts_password() {
        assert_eq!(
            redact_url("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact_url("amqp://host/"), "amqp://host/");
    }
}
