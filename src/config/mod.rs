//! Typed configuration: built-in defaults, then the TOML file, then `COURIER_*` environment
//! variables, then `${VAR}` expansion, then parsing into typed values and validation that names
//! the offending key.
//!
//! Everything a user can get wrong is caught here, before courier connects to anything, so a bad
//! deployment fails fast with exit code 2 instead of half-starting. Values that go on the wire
//! (URLs, header names and values, signing keys, topic patterns) are parsed once, here; the
//! parts that use them never check them again.

mod destination;
mod expand;
mod service;
mod sources;
mod store;
mod tls;
mod tracing;

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub(crate) use destination::to_uri;
pub use destination::{
    AuthConfig, CircuitConfig, DestinationConfig, HttpUrl, ProxyUrl, RateLimitConfig, RetryConfig,
    StaticHeaders, RESERVED_HEADERS,
};
pub use service::{AdminConfig, OrganizationConfig, ServiceConfig};
pub use sources::{
    AmqpUrl, BindingConfig, ExpiredAction, Format, MqttConfig, MqttProtocol, MqttUrl,
    QueueArgument, RabbitMqConfig,
};
pub use store::{DedupBackend, RedisEndpoint, StoreConfig};
pub use tls::TlsConfig;
pub use tracing::TracingConfig;

/// A configuration problem, always phrased as `key.path: what is wrong`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {message}")]
    File { path: String, message: String },
    /// A key has the wrong type, is unknown, is missing, or holds a value that does not parse.
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
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Limits that apply to the whole worker.
    #[serde(default)]
    pub service: ServiceConfig,
    /// Who is sending, for the `Metadata` block of the outbound REST contract.
    #[serde(default)]
    pub organization: OrganizationConfig,
    /// The local sled store (dedup, retries and dead letters).
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
    /// Trace context and the export of delivery spans.
    #[serde(default)]
    pub tracing: TracingConfig,
}

/// The most permits a tokio semaphore takes; more makes `Semaphore::new` panic at start-up.
const MAX_PERMITS: usize = tokio::sync::Semaphore::MAX_PERMITS;

fn default_true() -> bool {
    true
}

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
            .map_err(|e| {
                ConfigError::Shape(expand::shape_message(e).replace(&format!("{origin}: "), ""))
            })?;
        let mut root: config::Value = built
            .try_deserialize()
            .map_err(|e| ConfigError::Shape(e.to_string()))?;
        expand::expand_env(&mut root, &mut String::new())?;
        let config: Config = root
            .try_deserialize()
            .map_err(|e| ConfigError::Shape(expand::shape_message(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what the typed fields cannot check alone: ranges, required sections, uniqueness,
    /// and rules between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.service.validate()?;
        self.store.validate()?;
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
        self.admin.validate()?;
        self.tracing.validate()?;
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

/// `amqp://user:secret@host/` → `amqp://user:***@host/`, for logs and error messages.
///
/// A password written without percent-encoding may hold `/`, `?`, `#` or `@` (an Azure access
/// key holds `/`), which makes the URL unparseable, and the error that says so must not show
/// it. So the user information ends at the last `@` when the URL is a broker's or Redis's
/// (whose URLs carry no `@` after the host), or when the authority (up to the first `/`, `?` or
/// `#`) holds an `@`, or a `:` followed by something that is not a port (empty, or not digits)
/// with an `@` further on: that can hide more than the password, never less.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let cut_password = !authority.starts_with('[')
        && authority.split_once(':').is_some_and(|(_, after)| {
            after.is_empty() || !after.bytes().all(|b| b.is_ascii_digit())
        });
    let credentials_scheme = [
        "amqp", "amqps", "redis", "rediss", "mqtt", "mqtts", "tcp", "ssl", "ws", "wss",
    ]
    .iter()
    .any(|s| scheme.eq_ignore_ascii_case(s));
    let has_userinfo =
        authority.contains('@') || ((cut_password || credentials_scheme) && rest.contains('@'));
    if !has_userinfo {
        return url.to_string();
    }
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split([':', '/']).next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
        assert_eq!(d.topics.len(), 1);
        assert!(d.topics[0].matches_everything());
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
    fn dedup_local_is_also_read_under_its_old_name() {
        let with = |v: &str| {
            MINIMAL.replace(
                "[rabbitmq]",
                &format!("[store]\ndedup = \"{v}\"\n[rabbitmq]"),
            )
        };
        for name in ["local", "sled"] {
            let c = Config::from_toml(&with(name)).expect(name);
            assert_eq!(c.store.dedup, DedupBackend::Local, "{name}");
        }
        let e = Config::from_toml(&with("memcached"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected \"local\" or \"redis\""), "{e}");
    }

    #[test]
    fn rediss_urls_name_the_endpoint_and_take_redis_tls() {
        let with = |url: &str, extra: &str| {
            MINIMAL.replace(
                "[rabbitmq]",
                &format!("[store]\ndedup = \"redis\"\nredis_url = \"{url}\"\n{extra}\n[rabbitmq]"),
            )
        };
        let c = Config::from_toml(&with(
            "rediss://courier:pw@redis.internal:6380/2",
            "redis_tls = { server_name = \"cache.example.com\" }",
        ))
        .expect("rediss with redis_tls");
        let e = c.store.redis_endpoint().expect("endpoint");
        assert!(e.tls);
        assert_eq!((e.host.as_str(), e.port), ("redis.internal", 6380));
        assert_eq!(e.shown, "rediss://courier:***@redis.internal:6380/2");
        assert_eq!(e.settings.db(), 2);
        assert_eq!(e.settings.username(), Some("courier"));
        assert_eq!(e.settings.password(), Some("pw"));
        let plain = Config::from_toml(&with("redis://127.0.0.1", ""))
            .expect("redis without TLS")
            .store
            .redis_endpoint()
            .expect("endpoint");
        assert!(!plain.tls);
        assert_eq!(plain.port, 6379);
        // TLS is optional with rediss:// (a publicly trusted certificate needs no table).
        let c = Config::from_toml(&with("rediss://127.0.0.1:6380", "")).expect("rediss alone");
        assert!(c.store.redis_endpoint().expect("endpoint").tls);
        // With the local dedup table, the Redis keys are not read and so not checked.
        let local = MINIMAL.replace(
            "[rabbitmq]",
            "[store]\nredis_url = \"redis://x\"\nredis_tls = { server_name = \"x\" }\n[rabbitmq]",
        );
        Config::from_toml(&local).expect("redis keys unused with dedup = local");
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
    fn error_keys_are_dotted_and_first() {
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
        let url = m.url.as_ref().expect("url");
        assert_eq!(
            (url.host(), url.port(), url.tls()),
            ("127.0.0.1", 1883, false)
        );
        assert_eq!(m.subscriptions(), vec!["$share/g/a/+/b", "$share/g/x/#"]);
        assert_eq!(m.qos, 1);
        assert!(m.persistent_session());
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
    fn tls_needs_a_tls_url() {
        let e = Config::from_toml(&format!("{MINIMAL}\ntls = {{ server_name = \"h\" }}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("destinations[0].tls: is set, but the url is http://"),
            "{e}"
        );
        let with_rabbit_tls = MINIMAL.replace("queue = \"q\"", "queue = \"q\"\ntls = {}");
        let e = Config::from_toml(&with_rabbit_tls).unwrap_err().to_string();
        assert!(
            e.starts_with("rabbitmq.tls: is set, but rabbitmq.url is amqp://"),
            "{e}"
        );
        let amqps = with_rabbit_tls.replace("amqp://", "amqps://");
        let c = Config::from_toml(&amqps).expect("an empty tls table is valid for amqps://");
        assert!(c.rabbitmq.expect("rabbitmq").endpoints().all(|u| u.tls()));
    }

    #[test]
    fn redacts_password() {
        assert_eq!(
            redact_url("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact_url("amqp://host/"), "amqp://host/");
        // A password with characters that should have been percent-encoded is still hidden.
        assert_eq!(
            redact_url("rediss://:ab/c+d=@cache.example.com:6380/0"),
            "rediss://:***@cache.example.com:6380/0"
        );
        assert_eq!(
            redact_url("amqp://u:p@ss/w#rd@host/%2f"),
            "amqp://u:***@host/%2f"
        );
        // A password that starts with `/`, or with digits and then `/`, looks like an empty or
        // a numeric port.
        assert_eq!(
            redact_url("amqp://courier:/s3cret@rabbit/%2f"),
            "amqp://courier:***@rabbit/%2f"
        );
        assert_eq!(
            redact_url("rediss://:/Xy+z=@cache.example.com:6380"),
            "rediss://:***@cache.example.com:6380"
        );
        assert_eq!(
            redact_url("mqtts://u:123/abc@broker:8883"),
            "mqtts://u:***@broker:8883"
        );
        assert_eq!(
            redact_url("https://u:/x@proxy.example.com:3128"),
            "https://u:***@proxy.example.com:3128"
        );
        // An @ after the host, with no user information, is left as it is.
        for plain in [
            "https://hooks.example.com/x?to=ops@example.com",
            "https://hooks.example.com:8443/x?to=ops@example.com",
            "http://[::1]:8080/a@b",
        ] {
            assert_eq!(redact_url(plain), plain);
        }
    }
}
