//! `[store]`: where the record of deliveries, retries and dead letters lives.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{redact_url, ConfigError, Secret, TlsConfig};

/// The local store.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Directory of the store (the sled database and the dedup table). One courier process per
    /// directory.
    pub path: PathBuf,
    /// How long a successful delivery is remembered to suppress a second POST of the same event.
    #[serde(with = "humantime_serde")]
    pub dedup_ttl: Duration,
    /// sled's page cache in bytes (retries and dead letters); sled's own default (1 GiB) is far
    /// too much for a sidecar.
    pub cache_capacity: u64,
    /// How long the dedup record of a delivered, acked event may stay in memory before a
    /// background flush makes it durable. Losing one in a crash can cost a second POST of a
    /// redelivered copy, never an event, so these records share one flush per interval instead
    /// of holding their messages until a flush of their own; retries and dead letters are
    /// flushed before their ack whatever this says.
    #[serde(with = "humantime_serde")]
    pub dedup_flush_interval: Duration,
    /// Where the dedup record lives: `local` (this process's store) or `redis` (shared by
    /// replicas).
    pub dedup: DedupBackend,
    /// `redis://[[user]:password@]host:6379[/db]`, or `rediss://` for TLS, for `dedup = "redis"`.
    pub redis_url: Secret,
    /// TLS settings of a `rediss://` Redis: managed Redis services (Azure Cache for Redis,
    /// ElastiCache with in-transit encryption, Redis Enterprise) require TLS, often with a
    /// private CA or a client certificate.
    pub redis_tls: Option<TlsConfig>,
    /// Prefix of the dedup keys in Redis, so several deployments can share one Redis.
    pub redis_prefix: String,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("data/courier"),
            dedup_ttl: Duration::from_secs(7 * 24 * 3600),
            cache_capacity: 16 * 1024 * 1024,
            dedup_flush_interval: Duration::from_millis(10),
            dedup: DedupBackend::Local,
            redis_url: Secret::new("redis://127.0.0.1:6379"),
            redis_tls: None,
            redis_prefix: "courier:dedup:".to_string(),
        }
    }
}

impl StoreConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.dedup_ttl.is_zero() {
            return Err(ConfigError::invalid(
                "store.dedup_ttl",
                "must be longer than 0s",
            ));
        }
        if self.dedup_flush_interval > Duration::from_secs(60) {
            return Err(ConfigError::invalid(
                "store.dedup_flush_interval",
                "must be at most 60s (a crash loses the dedup records of up to this long)",
            ));
        }
        if self.path.as_os_str().is_empty() {
            return Err(ConfigError::invalid("store.path", "must not be empty"));
        }
        if self.dedup == DedupBackend::Redis {
            let endpoint = self
                .redis_endpoint()
                .map_err(|e| ConfigError::invalid("store.redis_url", e))?;
            if self.redis_tls.is_some() && !endpoint.tls {
                return Err(ConfigError::invalid(
                    "store.redis_tls",
                    "is set, but store.redis_url is redis:// (plain TCP); use rediss:// for TLS",
                ));
            }
        }
        Ok(())
    }

    /// Where `redis_url` points; the error text hides the password. Connects to nothing.
    pub fn redis_endpoint(&self) -> Result<RedisEndpoint, String> {
        let url = self.redis_url.expose();
        let shown = redact_url(url);
        // The redis crate parses the rest of the URL; TLS is courier's own (crate::tls), so
        // that a rediss:// Redis is verified with `redis_tls` the way the brokers are.
        let (tls, rest) = if let Some(rest) = url.strip_prefix("rediss://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("redis://") {
            (false, rest)
        } else {
            return Err(format!("{shown:?} is not a redis:// or rediss:// URL"));
        };
        if tls && rest.contains('#') {
            return Err(format!(
                "{shown:?}: a #fragment such as #insecure (no certificate verification) is not \
                 supported; give the server's CA in store.redis_tls.ca_file"
            ));
        }
        let client = redis::Client::open(format!("redis://{rest}"))
            .map_err(|e| format!("{shown:?}: {e}"))?;
        let info = client.get_connection_info();
        match info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => Ok(RedisEndpoint {
                tls,
                host: host.clone(),
                port: *port,
                settings: info.redis_settings().clone(),
                shown,
            }),
            other => Err(format!("{shown:?}: not a TCP address ({other})")),
        }
    }
}

/// A Redis as `store.redis_url` names it.
#[derive(Clone)]
pub struct RedisEndpoint {
    /// `rediss://`: the connection is TLS.
    pub tls: bool,
    /// The host name or IP address, also the name the server's certificate is verified against
    /// unless `redis_tls.server_name` says otherwise.
    pub host: String,
    /// The TCP port.
    pub port: u16,
    /// The database, user and password that each new connection logs in with.
    pub settings: redis::RedisConnectionInfo,
    /// The URL with its password replaced by `***`, for logs and errors.
    pub shown: String,
}

/// Where the dedup record lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupBackend {
    /// The dedup table in `store.path` (one replica, or replicas that never share messages).
    #[default]
    Local,
    /// Redis, shared by every replica consuming the same queue or shared subscription.
    Redis,
}

impl<'de> Deserialize<'de> for DedupBackend {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            // "sled": the name from when the local record was a sled tree.
            "local" | "sled" => Ok(DedupBackend::Local),
            "redis" => Ok(DedupBackend::Redis),
            other => Err(serde::de::Error::custom(format!(
                "unknown dedup backend {other:?}, expected \"local\" or \"redis\""
            ))),
        }
    }
}
