//! A typed builder for courier's configuration, rendered as TOML text, so that one description
//! serves courier started in-process (`courier::Config::from_toml`), as a process (a config
//! file) and in the benchmark. Keys left unset are left out, so courier's defaults apply.
//!
//! ```
//! use std::time::Duration;
//! use courier_testkit::{ConfigBuilder, Dest, Rabbit, Retry};
//! let text = ConfigBuilder::new("/tmp/store")
//!     .max_in_flight(16)
//!     .rabbitmq(Rabbit::queue("events").prefetch(16))
//!     .destination(
//!         Dest::new("partner", "http://127.0.0.1:8080/events")
//!             .topics(["orders.*"])
//!             .retry(Retry::default().max_attempts(4).initial_interval(Duration::from_millis(100))),
//!     )
//!     .toml();
//! assert!(text.contains("initial_interval = \"100ms\""));
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Serialize, Serializer};

use crate::amqp::AMQP_URL;

/// The Redis that scripts/test.sh starts, for dedup shared in Redis.
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// The local Mosquitto.
pub const MQTT_URL: &str = "mqtt://127.0.0.1:1883";

/// A whole configuration file.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConfigBuilder {
    #[serde(skip_serializing_if = "Service::is_empty")]
    service: Service,
    #[serde(skip_serializing_if = "Option::is_none")]
    organization: Option<Organization>,
    store: Store,
    #[serde(skip_serializing_if = "Option::is_none")]
    admin: Option<Admin>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rabbitmq: Option<Rabbit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt: Option<Mqtt>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tracing: Option<Tracing>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    destinations: Vec<Dest>,
}

/// The `[tracing]` section.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Tracing {
    #[serde(skip_serializing_if = "Option::is_none")]
    otlp_endpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    start_traces: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_name: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    headers: BTreeMap<String, String>,
}

impl Tracing {
    /// Spans exported to the OTLP/HTTP collector at `endpoint`.
    pub fn export_to(endpoint: &str) -> Tracing {
        Tracing {
            otlp_endpoint: Some(endpoint.to_string()),
            ..Tracing::default()
        }
    }

    /// `start_traces`.
    pub fn start_traces(mut self, on: bool) -> Self {
        self.start_traces = Some(on);
        self
    }

    pub fn service_name(mut self, name: &str) -> Self {
        self.service_name = Some(name.to_string());
        self
    }

    /// A header sent with every export request.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.insert(name.to_string(), value.to_string());
        self
    }
}

#[derive(Clone, Debug, Default, Serialize)]
struct Service {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_in_flight: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "duration")]
    shutdown_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_payload_bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    worker_threads: Option<usize>,
}

impl Service {
    fn is_empty(&self) -> bool {
        self.max_in_flight.is_none()
            && self.shutdown_timeout.is_none()
            && self.max_payload_bytes.is_none()
            && self.worker_threads.is_none()
    }
}

#[derive(Clone, Debug, Serialize)]
struct Organization {
    id: String,
    name: String,
    url: String,
    environment: String,
}

#[derive(Clone, Debug, Default, Serialize)]
struct Store {
    path: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_capacity: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dedup: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "duration")]
    dedup_ttl: Option<Duration>,
    // Last: a table, which TOML writes after the plain keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_tls: Option<Tls>,
}

#[derive(Clone, Debug, Serialize)]
struct Admin {
    listen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
}

impl ConfigBuilder {
    /// A configuration with its store in `store` and nothing else yet.
    pub fn new(store: impl AsRef<Path>) -> ConfigBuilder {
        ConfigBuilder {
            store: Store {
                path: store.as_ref().to_path_buf(),
                ..Store::default()
            },
            ..ConfigBuilder::default()
        }
    }

    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.service.max_in_flight = Some(n);
        self
    }

    /// `service.worker_threads`: threads of the async runtime.
    pub fn worker_threads(mut self, n: usize) -> Self {
        self.service.worker_threads = Some(n);
        self
    }

    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.service.shutdown_timeout = Some(timeout);
        self
    }

    pub fn max_payload_bytes(mut self, n: usize) -> Self {
        self.service.max_payload_bytes = Some(n);
        self
    }

    /// The `[organization]` copied into the Metadata block.
    pub fn organization(mut self, id: &str, name: &str, url: &str, environment: &str) -> Self {
        self.organization = Some(Organization {
            id: id.into(),
            name: name.into(),
            url: url.into(),
            environment: environment.into(),
        });
        self
    }

    /// sled's page cache, in bytes.
    pub fn cache_capacity(mut self, bytes: u64) -> Self {
        self.store.cache_capacity = Some(bytes);
        self
    }

    /// Dedup in Redis at `url` (the local one is [`REDIS_URL`]), under `prefix`, shared by every courier with the same two.
    pub fn redis_dedup(mut self, url: &str, prefix: &str) -> Self {
        self.store.dedup = Some("redis".into());
        self.store.redis_url = Some(url.into());
        self.store.redis_prefix = Some(prefix.into());
        self
    }

    /// `store.redis_tls`: the TLS settings of a `rediss://` dedup Redis.
    pub fn redis_tls(mut self, tls: Tls) -> Self {
        self.store.redis_tls = Some(tls);
        self
    }

    /// `store.dedup_ttl`: how long a delivery is remembered (Redis expires its keys after it).
    pub fn dedup_ttl(mut self, ttl: Duration) -> Self {
        self.store.dedup_ttl = Some(ttl);
        self
    }

    /// The admin port on 127.0.0.1.
    pub fn admin(self, port: u16) -> Self {
        self.admin_on(&format!("127.0.0.1:{port}"), None)
    }

    /// The admin port on `listen`, with `[admin] token` when given.
    pub fn admin_on(mut self, listen: &str, token: Option<&str>) -> Self {
        self.admin = Some(Admin {
            listen: listen.to_string(),
            token: token.map(str::to_string),
        });
        self
    }

    pub fn rabbitmq(mut self, rabbit: Rabbit) -> Self {
        self.rabbitmq = Some(rabbit);
        self
    }

    pub fn mqtt(mut self, mqtt: Mqtt) -> Self {
        self.mqtt = Some(mqtt);
        self
    }

    /// The `[tracing]` section.
    pub fn tracing(mut self, tracing: Tracing) -> Self {
        self.tracing = Some(tracing);
        self
    }

    /// Adds a `[[destinations]]` entry after those added before.
    pub fn destination(mut self, dest: Dest) -> Self {
        self.destinations.push(dest);
        self
    }

    pub fn destinations(mut self, dests: impl IntoIterator<Item = Dest>) -> Self {
        self.destinations.extend(dests);
        self
    }

    /// The configuration as courier reads it from a file.
    pub fn toml(&self) -> String {
        toml::to_string(self).expect("a test configuration renders as TOML")
    }
}

/// The `[rabbitmq]` source.
#[derive(Clone, Debug, Serialize)]
pub struct Rabbit {
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    urls: Vec<String>,
    queue: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    connection_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefetch: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "duration")]
    ack_hold: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    queue_arguments: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    bindings: Vec<Binding>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<Tls>,
}

#[derive(Clone, Debug, Serialize)]
struct Binding {
    exchange: String,
    routing_key: String,
}

impl Rabbit {
    /// `queue` on the local RabbitMQ ([`AMQP_URL`]).
    pub fn queue(queue: &str) -> Rabbit {
        Rabbit {
            url: Some(AMQP_URL.into()),
            urls: Vec::new(),
            queue: queue.into(),
            connection_name: None,
            prefetch: None,
            ack_hold: None,
            format: None,
            queue_arguments: BTreeMap::new(),
            bindings: Vec::new(),
            tls: None,
        }
    }

    /// The `tls` table (for an `amqps://` URL).
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    pub fn url(mut self, url: &str) -> Self {
        self.url = Some(url.into());
        self.urls.clear();
        self
    }

    /// Several broker URLs (`urls`), tried in turn, instead of one.
    pub fn urls(mut self, urls: &[&str]) -> Self {
        self.url = None;
        self.urls = urls.iter().map(|u| u.to_string()).collect();
        self
    }

    /// The name `rabbitmqctl list_connections` shows.
    pub fn connection_name(mut self, name: &str) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = Some(prefetch);
        self
    }

    /// How long a done message waits for an earlier one before it is acked by itself.
    pub fn ack_hold(mut self, hold: Duration) -> Self {
        self.ack_hold = Some(hold);
        self
    }

    /// `"auto"`, `"envelope"` or `"raw"`.
    pub fn format(mut self, format: &str) -> Self {
        self.format = Some(format.into());
        self
    }

    pub fn queue_argument(mut self, name: &str, value: &str) -> Self {
        self.queue_arguments.insert(name.into(), value.into());
        self
    }

    /// Binds the queue to the topic exchange `exchange` with `routing_key`.
    pub fn binding(mut self, exchange: &str, routing_key: &str) -> Self {
        self.bindings.push(Binding {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
        });
        self
    }
}

/// The `[mqtt]` source.
#[derive(Clone, Debug, Serialize)]
pub struct Mqtt {
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    urls: Vec<String>,
    client_id: String,
    topics: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "duration")]
    keep_alive: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shared_group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "duration")]
    session_expiry: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    receive_maximum: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expired: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<Tls>,
}

/// The MQTT version of the `[mqtt]` source (`protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MqttProtocol {
    V3,
    V5,
}

impl Mqtt {
    /// Subscribed to `filter` on the local Mosquitto ([`MQTT_URL`]) as `client_id`.
    pub fn new(client_id: &str, filter: &str) -> Mqtt {
        Mqtt {
            protocol: None,
            url: Some(MQTT_URL.into()),
            urls: Vec::new(),
            client_id: client_id.into(),
            topics: vec![filter.into()],
            keep_alive: None,
            shared_group: None,
            session_expiry: None,
            receive_maximum: None,
            expired: None,
            tls: None,
        }
    }

    /// `protocol = "v5"` for [`MqttProtocol::V5`]; the default (no key) for V3.
    pub fn protocol(mut self, protocol: MqttProtocol) -> Self {
        self.protocol = match protocol {
            MqttProtocol::V3 => None,
            MqttProtocol::V5 => Some("v5"),
        };
        self
    }

    /// MQTT 5 `session_expiry`.
    pub fn session_expiry(mut self, expiry: Duration) -> Self {
        self.session_expiry = Some(expiry);
        self
    }

    /// MQTT 5 `receive_maximum`.
    pub fn receive_maximum(mut self, n: u32) -> Self {
        self.receive_maximum = Some(n);
        self
    }

    /// MQTT 5 `expired`: `"deliver"` or `"dead_letter"`.
    pub fn expired(mut self, action: &'static str) -> Self {
        self.expired = Some(action);
        self
    }

    /// Another broker than the local Mosquitto on 1883, such as `mqtts://127.0.0.1:8883`.
    pub fn url(mut self, url: &str) -> Self {
        self.url = Some(url.into());
        self.urls.clear();
        self
    }

    /// Several broker URLs (`urls`), tried in turn, instead of one.
    pub fn urls(mut self, urls: &[&str]) -> Self {
        self.url = None;
        self.urls = urls.iter().map(|u| u.to_string()).collect();
        self
    }

    /// The `tls` table (for an `mqtts://` URL).
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    pub fn keep_alive(mut self, keep_alive: Duration) -> Self {
        self.keep_alive = Some(keep_alive);
        self
    }

    /// Subscribes as `$share/<group>/<filter>`.
    pub fn shared_group(mut self, group: &str) -> Self {
        self.shared_group = Some(group.into());
        self
    }
}

/// One `[[destinations]]` entry.
#[derive(Clone, Debug, Serialize)]
pub struct Dest {
    name: String,
    url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    topics: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata_in_payload: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "duration")]
    timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_verify: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<Tls>,
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    headers: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth: Option<Auth>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_concurrency: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signing_secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry: Option<Retry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    circuit: Option<Circuit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_limit: Option<RateLimit>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    retry_on: Vec<toml::Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    final_on: Vec<toml::Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    success_on: Vec<toml::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signing_secrets: Option<Vec<String>>,
}

/// A destination's `rate_limit`.
#[derive(Clone, Debug, Serialize)]
struct RateLimit {
    requests: u32,
    #[serde(serialize_with = "duration")]
    per: Option<Duration>,
    burst: u32,
}

/// `"404"` as the integer 404, `"4xx"` as the string: the way a status list is written.
fn statuses(codes: &[&str]) -> Vec<toml::Value> {
    codes
        .iter()
        .map(|c| match c.parse::<i64>() {
            Ok(n) => toml::Value::Integer(n),
            Err(_) => toml::Value::String((*c).to_string()),
        })
        .collect()
}

/// A destination's `auth`.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Auth {
    Basic {
        username: String,
        password: String,
    },
    ApiKey {
        header: String,
        key: String,
    },
    Bearer {
        token: String,
    },
    #[serde(rename = "oauth2")]
    OAuth2(OAuth2),
}

/// `auth = { type = "oauth2", ... }`: OAuth2 client credentials; unset keys keep courier's
/// defaults.
#[derive(Clone, Debug, Serialize)]
pub struct OAuth2 {
    token_url: String,
    client_id: String,
    client_secret: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    audience: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    extra_params: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_auth: Option<String>,
}

impl OAuth2 {
    /// The client `client_id` with `client_secret`, asking `token_url` for tokens.
    pub fn new(token_url: &str, client_id: &str, client_secret: &str) -> OAuth2 {
        OAuth2 {
            token_url: token_url.into(),
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            scope: None,
            audience: None,
            extra_params: BTreeMap::new(),
            client_auth: None,
        }
    }

    pub fn scope(mut self, scope: &str) -> Self {
        self.scope = Some(scope.into());
        self
    }

    pub fn audience(mut self, audience: &str) -> Self {
        self.audience = Some(audience.into());
        self
    }

    /// One more form parameter of the token request.
    pub fn extra_param(mut self, name: &str, value: &str) -> Self {
        self.extra_params.insert(name.into(), value.into());
        self
    }

    /// `client_id` and `client_secret` in the form body instead of HTTP Basic.
    pub fn client_auth_in_body(mut self) -> Self {
        self.client_auth = Some("body".into());
        self
    }
}

impl Dest {
    pub fn new(name: &str, url: &str) -> Dest {
        Dest {
            name: name.into(),
            url: url.into(),
            topics: None,
            tenant: None,
            metadata_in_payload: None,
            timeout: None,
            tls_verify: None,
            tls: None,
            proxy: None,
            headers: BTreeMap::new(),
            auth: None,
            max_concurrency: None,
            signing_secret: None,
            retry: None,
            circuit: None,
            rate_limit: None,
            retry_on: Vec::new(),
            final_on: Vec::new(),
            success_on: Vec::new(),
            signing_secrets: None,
        }
    }

    pub fn topics<S: Into<String>>(mut self, patterns: impl IntoIterator<Item = S>) -> Self {
        self.topics = Some(patterns.into_iter().map(Into::into).collect());
        self
    }

    pub fn tenant(mut self, tenant: &str) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// Adds the `Metadata` block to the payload.
    pub fn metadata_in_payload(mut self) -> Self {
        self.metadata_in_payload = Some(true);
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Accepts any certificate.
    pub fn no_tls_verify(mut self) -> Self {
        self.tls_verify = Some(false);
        self
    }

    /// The `tls` table (for an `https://` URL).
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Every request goes through this HTTP proxy.
    pub fn proxy(mut self, url: &str) -> Self {
        self.proxy = Some(url.into());
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    pub fn basic_auth(mut self, username: &str, password: &str) -> Self {
        self.auth = Some(Auth::Basic {
            username: username.into(),
            password: password.into(),
        });
        self
    }

    pub fn api_key(mut self, header: &str, key: &str) -> Self {
        self.auth = Some(Auth::ApiKey {
            header: header.into(),
            key: key.into(),
        });
        self
    }

    /// `Authorization: Bearer <token>`.
    pub fn bearer(mut self, token: &str) -> Self {
        self.auth = Some(Auth::Bearer {
            token: token.into(),
        });
        self
    }

    /// A token from an OAuth2 token endpoint.
    pub fn oauth2(mut self, oauth2: OAuth2) -> Self {
        self.auth = Some(Auth::OAuth2(oauth2));
        self
    }

    pub fn max_concurrency(mut self, n: usize) -> Self {
        self.max_concurrency = Some(n);
        self
    }

    pub fn signing_secret(mut self, secret: &str) -> Self {
        self.signing_secret = Some(secret.into());
        self
    }

    pub fn retry(mut self, retry: Retry) -> Self {
        self.retry = Some(retry);
        self
    }

    pub fn circuit(mut self, circuit: Circuit) -> Self {
        self.circuit = Some(circuit);
        self
    }

    /// `rate_limit = { requests, per, burst }`.
    pub fn rate_limit(mut self, requests: u32, per: Duration, burst: u32) -> Self {
        self.rate_limit = Some(RateLimit {
            requests,
            per: Some(per),
            burst,
        });
        self
    }

    /// `retry_on`: codes (`"404"`) and classes (`"5xx"`).
    pub fn retry_on(mut self, codes: &[&str]) -> Self {
        self.retry_on = statuses(codes);
        self
    }

    /// `final_on`: codes and classes.
    pub fn final_on(mut self, codes: &[&str]) -> Self {
        self.final_on = statuses(codes);
        self
    }

    /// `success_on`: codes and classes.
    pub fn success_on(mut self, codes: &[&str]) -> Self {
        self.success_on = statuses(codes);
        self
    }

    /// `signing_secrets`: one signature per secret.
    pub fn signing_secrets(mut self, secrets: &[&str]) -> Self {
        self.signing_secrets = Some(secrets.iter().map(|s| s.to_string()).collect());
        self
    }
}

/// The `tls` table of a source or a destination; unset keys keep courier's defaults.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Tls {
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_only: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_key: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_name: Option<String>,
}

impl Tls {
    /// Trust the certificates of this PEM file, besides the system roots.
    pub fn ca_file(mut self, path: impl AsRef<Path>) -> Self {
        self.ca_file = Some(path.as_ref().to_path_buf());
        self
    }

    /// Trust the certificates of this PEM file only.
    pub fn ca_only(mut self, path: impl AsRef<Path>) -> Self {
        self.ca_only = Some(true);
        self.ca_file(path)
    }

    /// Present this client certificate, with this key.
    pub fn client(mut self, cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Self {
        self.client_cert = Some(cert.as_ref().to_path_buf());
        self.client_key = Some(key.as_ref().to_path_buf());
        self
    }

    /// Verify the server's certificate for this name.
    pub fn server_name(mut self, name: &str) -> Self {
        self.server_name = Some(name.into());
        self
    }
}

/// A destination's `retry` table; unset keys keep courier's defaults.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Retry {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "duration")]
    initial_interval: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    multiplier: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "duration")]
    max_interval: Option<Duration>,
}

impl Retry {
    /// Every key: `max_attempts` in all, the first `initial` after the first attempt, each wait
    /// `multiplier` times the one before, up to `max`.
    pub fn backoff(max_attempts: u32, initial: Duration, multiplier: f64, max: Duration) -> Retry {
        Retry::default()
            .max_attempts(max_attempts)
            .initial_interval(initial)
            .multiplier(multiplier)
            .max_interval(max)
    }

    /// `max_attempts` in all, `interval` apart.
    pub fn every(max_attempts: u32, interval: Duration) -> Retry {
        Retry::backoff(max_attempts, interval, 1.0, interval)
    }

    /// Attempts in all, the first included.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    pub fn initial_interval(mut self, interval: Duration) -> Self {
        self.initial_interval = Some(interval);
        self
    }

    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = Some(multiplier);
        self
    }

    pub fn max_interval(mut self, interval: Duration) -> Self {
        self.max_interval = Some(interval);
        self
    }
}

/// A destination's `circuit` table; unset keys keep courier's defaults.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Circuit {
    #[serde(skip_serializing_if = "Option::is_none")]
    failures: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "duration")]
    open_for: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "duration")]
    max_wait: Option<Duration>,
}

impl Circuit {
    /// Consecutive retryable failures that open it.
    pub fn failures(mut self, n: u32) -> Self {
        self.failures = Some(n);
        self
    }

    pub fn open_for(mut self, open_for: Duration) -> Self {
        self.open_for = Some(open_for);
        self
    }

    /// Waiting this long for a slot opens it too.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = Some(max_wait);
        self
    }
}

/// A duration as courier's humantime strings: whole seconds as `"10s"`, anything else in ms.
fn duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) if d.subsec_nanos() == 0 => s.serialize_str(&format!("{}s", d.as_secs())),
        Some(d) => s.serialize_str(&format!("{}ms", d.as_millis())),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_section_as_toml_that_reads_back() {
        let text = ConfigBuilder::new("/tmp/a \"quoted\" store")
            .max_in_flight(16)
            .shutdown_timeout(Duration::from_secs(10))
            .organization("org-1", "Example Org", "https://example.org", "test")
            .cache_capacity(1 << 20)
            .redis_dedup("redis://127.0.0.1:6379", "p:")
            .dedup_ttl(Duration::from_secs(600))
            .admin(9464)
            .rabbitmq(
                Rabbit::queue("q")
                    .prefetch(8)
                    .format("raw")
                    .queue_argument("x-queue-type", "quorum")
                    .binding("ex", "tempo.#"),
            )
            .mqtt(Mqtt::new("c", "t/#").keep_alive(Duration::from_millis(1500)))
            .destination(
                Dest::new("a", "http://127.0.0.1/a")
                    .topics(["x.*"])
                    .header("X-Source", "tempo")
                    .basic_auth("u", "${PW}")
                    .retry(Retry::default().max_attempts(3).multiplier(2.0))
                    .circuit(Circuit::default().failures(5))
                    .rate_limit(20, Duration::from_secs(1), 2)
                    .retry_on(&["404", "5xx"])
                    .success_on(&["409"]),
            )
            .destination(Dest::new("b", "http://127.0.0.1/b").api_key("X-Key", "k"))
            .destination(Dest::new("c", "http://127.0.0.1/c").bearer("${TOKEN}"))
            .destination(
                Dest::new("d", "http://127.0.0.1/d").oauth2(
                    OAuth2::new("http://127.0.0.1/token", "id", "${SECRET}")
                        .scope("a b")
                        .extra_param("resource", "r")
                        .client_auth_in_body(),
                ),
            )
            .toml();
        let v: toml::Table = toml::from_str(&text).expect("valid TOML");
        assert_eq!(v["store"]["path"].as_str(), Some("/tmp/a \"quoted\" store"));
        assert_eq!(v["service"]["shutdown_timeout"].as_str(), Some("10s"));
        assert_eq!(v["store"]["dedup_ttl"].as_str(), Some("600s"));
        assert_eq!(v["mqtt"]["keep_alive"].as_str(), Some("1500ms"));
        assert_eq!(
            v["rabbitmq"]["bindings"][0]["routing_key"].as_str(),
            Some("tempo.#")
        );
        let dests = v["destinations"].as_array().expect("destinations");
        assert_eq!(dests.len(), 4);
        assert_eq!(dests[2]["auth"]["type"].as_str(), Some("bearer"));
        assert_eq!(dests[2]["auth"]["token"].as_str(), Some("${TOKEN}"));
        let oauth2 = &dests[3]["auth"];
        assert_eq!(oauth2["type"].as_str(), Some("oauth2"));
        assert_eq!(oauth2["client_secret"].as_str(), Some("${SECRET}"));
        assert_eq!(oauth2["extra_params"]["resource"].as_str(), Some("r"));
        assert_eq!(oauth2["client_auth"].as_str(), Some("body"));
        assert!(oauth2.get("audience").is_none());
        assert_eq!(dests[0]["auth"]["type"].as_str(), Some("basic"));
        assert_eq!(dests[0]["auth"]["password"].as_str(), Some("${PW}"));
        assert_eq!(dests[0]["retry"]["max_attempts"].as_integer(), Some(3));
        assert_eq!(dests[0]["rate_limit"]["per"].as_str(), Some("1s"));
        assert_eq!(dests[0]["retry_on"][0].as_integer(), Some(404));
        assert_eq!(dests[0]["retry_on"][1].as_str(), Some("5xx"));
        assert_eq!(dests[1]["auth"]["type"].as_str(), Some("api_key"));
        assert!(v.get("admin").is_some() && dests[1].get("retry").is_none());
    }

    #[test]
    fn an_empty_service_section_is_left_out() {
        let text = ConfigBuilder::new("s").toml();
        assert!(!text.contains("[service]"), "{text}");
    }
}
