//! `[rabbitmq]` and `[mqtt]`: the brokers courier consumes from. Their URLs are parsed when the
//! file is loaded, so a source connects with values that cannot fail to parse.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{default_true, redact_url, ConfigError, Secret, TlsConfig};
use crate::topic::check_mqtt_filter;

/// How a message body is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Envelope when the object has `data` and one of `id`, `topic`, `tenant_id`; raw otherwise.
    #[default]
    Auto,
    /// The event envelope; its `data` is what gets POSTed.
    Envelope,
    /// Any JSON object, POSTed as it is.
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

/// An `amqp://` or `amqps://` URL, parsed. It may carry the broker password, so it prints and
/// serialises with the password hidden.
#[derive(Clone)]
pub struct AmqpUrl {
    text: Secret,
    uri: lapin::uri::AMQPUri,
}

impl AmqpUrl {
    /// Parses `text`; the error text hides the password and completes `rabbitmq.url: ...`.
    pub fn parse(text: &str) -> Result<AmqpUrl, String> {
        let shown = redact_url(text);
        if !(text.starts_with("amqp://") || text.starts_with("amqps://")) {
            return Err(format!("{shown:?} is not an amqp:// or amqps:// URL"));
        }
        let uri = text.parse().map_err(|e| format!("{e}: {shown:?}"))?;
        Ok(AmqpUrl {
            text: Secret::new(text),
            uri,
        })
    }

    /// What lapin connects with.
    pub fn uri(&self) -> &lapin::uri::AMQPUri {
        &self.uri
    }

    /// Whether the connection uses TLS (`amqps://`).
    pub fn tls(&self) -> bool {
        self.uri.scheme == lapin::uri::AMQPScheme::AMQPS
    }

    /// The URL with its password replaced by `***`, for logs.
    pub fn redacted(&self) -> String {
        redact_url(self.text.expose())
    }
}

/// Equal when written the same: the parsed URI follows from it.
impl PartialEq for AmqpUrl {
    fn eq(&self, other: &AmqpUrl) -> bool {
        self.text == other.text
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

impl<'de> Deserialize<'de> for AmqpUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        AmqpUrl::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Serialize for AmqpUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.text.serialize(s)
    }
}

/// The longest `rabbitmq.ack_hold`.
pub const MAX_ACK_HOLD: Duration = Duration::from_secs(1);

/// The RabbitMQ source.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitMqConfig {
    /// `amqp://user:pass@host:port/vhost` (or `amqps://`). Logs show it without the password.
    /// Give this or `urls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<AmqpUrl>,
    /// The nodes of a cluster, tried in turn at every connect and reconnect. Give this or `url`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<AmqpUrl>,
    /// The queue to consume.
    pub queue: String,
    /// Unacked messages the broker may push at once; capped at `service.max_in_flight`.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// How long a message done while an earlier one is still in delivery waits for it before
    /// it is acked by itself, so one `multiple` ack covers both. `0s` acks each message the
    /// moment it is done. At most 1 s.
    #[serde(default = "default_ack_hold", with = "humantime_serde")]
    pub ack_hold: Duration,
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
    /// CA file, client certificate and verification name for `amqps://`.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
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
/// Long enough for the messages in delivery beside a done one to finish at a few thousand events
/// per second, short next to any partner's answer time.
fn default_ack_hold() -> Duration {
    Duration::from_millis(5)
}
fn default_connection_name() -> String {
    "courier".to_string()
}

/// One exchange → queue binding.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
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

impl RabbitMqConfig {
    /// The broker URLs, in the order they are tried: `url`, or the list `urls`.
    pub fn endpoints(&self) -> impl Iterator<Item = &AmqpUrl> {
        self.url.iter().chain(&self.urls)
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        check_endpoints(
            "rabbitmq",
            self.url.as_ref(),
            &self.urls,
            AmqpUrl::tls,
            self.tls.is_some(),
            "amqp:// (plain TCP); use amqps://",
        )?;
        if self.queue.trim().is_empty() {
            return Err(ConfigError::invalid("rabbitmq.queue", "must not be empty"));
        }
        if self.prefetch == 0 {
            return Err(ConfigError::invalid(
                "rabbitmq.prefetch",
                "must be at least 1",
            ));
        }
        if self.ack_hold > MAX_ACK_HOLD {
            return Err(ConfigError::invalid(
                "rabbitmq.ack_hold",
                format!(
                    "must be at most {} (a held ack keeps its message in service.max_in_flight)",
                    humantime::format_duration(MAX_ACK_HOLD)
                ),
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

/// The rules of `url` and `urls`, the same for both sources: one of the two, at least one URL,
/// one scheme for every node, and TLS URLs when a `tls` table is set. `plain` completes
/// "is set, but rabbitmq.url is ...".
fn check_endpoints<U>(
    section: &str,
    url: Option<&U>,
    urls: &[U],
    is_tls: fn(&U) -> bool,
    tls_set: bool,
    plain: &str,
) -> Result<(), ConfigError> {
    let (key, list): (String, &[U]) = match url {
        Some(_) if !urls.is_empty() => {
            return Err(ConfigError::invalid(
                format!("{section}.urls"),
                format!("is set and so is {section}.url; give one of the two"),
            ))
        }
        Some(url) => (format!("{section}.url is"), std::slice::from_ref(url)),
        None if urls.is_empty() => {
            return Err(ConfigError::invalid(
                format!("{section}.url"),
                format!("is required but missing (or give {section}.urls, a list)"),
            ))
        }
        None => (format!("{section}.urls are"), urls),
    };
    if let Some(i) = list.iter().position(|u| is_tls(u) != is_tls(&list[0])) {
        return Err(ConfigError::invalid(
            format!("{section}.urls[{i}]"),
            "does not use the scheme of urls[0]; give every node the same one (TLS or not)",
        ));
    }
    if tls_set && !is_tls(&list[0]) {
        return Err(ConfigError::invalid(
            format!("{section}.tls"),
            format!("is set, but {key} {plain} for TLS"),
        ));
    }
    Ok(())
}

/// An `mqtt://` (or `tcp://`) or `mqtts://` (or `ssl://`) URL, reduced to what the client needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttUrl {
    text: String,
    host: String,
    port: u16,
    tls: bool,
}

impl MqttUrl {
    /// Parses `text`; the error text completes `mqtt.url: ...`.
    pub fn parse(text: &str) -> Result<MqttUrl, String> {
        let url = reqwest::Url::parse(text).map_err(|e| format!("{e}: {:?}", redact_url(text)))?;
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
        Ok(MqttUrl {
            text: text.to_string(),
            host,
            port,
            tls,
        })
    }

    /// The host name or address, IPv6 without brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port, 1883 or 8883 when the URL gives none.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the connection uses TLS.
    pub fn tls(&self) -> bool {
        self.tls
    }
}

impl fmt::Display for MqttUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for MqttUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        MqttUrl::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Serialize for MqttUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

/// The MQTT version the source speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum MqttProtocol {
    /// MQTT 3.1.1: no properties, sessions kept with `clean_session = false`.
    #[default]
    #[serde(rename = "v3")]
    V3,
    /// MQTT 5: user properties become metadata, sessions expire after `session_expiry`, and the
    /// broker's in-flight window is `receive_maximum`.
    #[serde(rename = "v5")]
    V5,
}

impl<'de> Deserialize<'de> for MqttProtocol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "v3" => Ok(MqttProtocol::V3),
            "v5" => Ok(MqttProtocol::V5),
            other => Err(serde::de::Error::custom(format!(
                "unknown protocol {other:?}, expected \"v3\" (MQTT 3.1.1) or \"v5\" (MQTT 5)"
            ))),
        }
    }
}

/// What becomes of an MQTT 5 message whose `message-expiry-interval` passed before its POST.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpiredAction {
    /// Delivered anyway: the interval is the producer's hint, the destinations decide.
    Deliver,
    /// Kept as a dead letter with reason "expired", for an operator to replay or purge.
    #[default]
    DeadLetter,
}

impl<'de> Deserialize<'de> for ExpiredAction {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "deliver" => Ok(ExpiredAction::Deliver),
            "dead_letter" => Ok(ExpiredAction::DeadLetter),
            other => Err(serde::de::Error::custom(format!(
                "unknown action {other:?}, expected \"deliver\" or \"dead_letter\""
            ))),
        }
    }
}

/// The session expiry an MQTT 5 session gets when `session_expiry` is not set: long enough to
/// outlast a weekend of downtime, short enough that an abandoned client id does not pile up
/// messages at the broker for ever.
pub const DEFAULT_SESSION_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);

/// The MQTT source (MQTT 3.1.1 or 5).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `"v3"` (MQTT 3.1.1, the default) or `"v5"` (MQTT 5).
    #[serde(default)]
    pub protocol: MqttProtocol,
    /// `mqtt://host[:1883]` or `mqtts://host[:8883]` (TLS, verified against the system roots
    /// and `tls.ca_file`). Give this or `urls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<MqttUrl>,
    /// The brokers of a cluster, tried in turn at every connect and reconnect. Give this or
    /// `url`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<MqttUrl>,
    /// The session's key at the broker. Required when the session persists
    /// (`clean_session = false`, or a `session_expiry` over zero), because a persistent session
    /// is found again by its client id.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Topic filters to subscribe to (`+` one level, `#` the rest).
    pub topics: Vec<String>,
    /// Subscription QoS: 1 (at least once, acked after delivery) or 0 (no acks, no redelivery).
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// MQTT 3.1.1 only (default `false`): `false` keeps the session at the broker while
    /// courier is away, so nothing published in the meantime, and nothing received but not yet
    /// acked, is lost. MQTT 5 says this with `session_expiry`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clean_session: Option<bool>,
    /// MQTT 5 only (default 7 days): how long the broker keeps the session, with its queued
    /// and unacked messages, after courier disconnects. `0s` ends the session with the
    /// connection, as `clean_session = true` does in 3.1.1.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub session_expiry: Option<Duration>,
    /// MQTT 5 only (default `service.max_in_flight`, at most 65535): the unacked QoS 1
    /// messages the broker may send courier at once, announced in CONNECT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receive_maximum: Option<u32>,
    /// MQTT 5 only (default `dead_letter`): what becomes of a message whose
    /// `message-expiry-interval` passed before its POST.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired: Option<ExpiredAction>,
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
    /// CA file, client certificate and verification name for `mqtts://`.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

fn default_qos() -> u8 {
    1
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}

impl MqttConfig {
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

    /// The broker URLs, in the order they are tried: `url`, or the list `urls`.
    pub fn endpoints(&self) -> impl Iterator<Item = &MqttUrl> {
        self.url.iter().chain(&self.urls)
    }

    /// Whether the broker keeps the session while courier is away.
    pub fn persistent_session(&self) -> bool {
        match self.protocol {
            MqttProtocol::V3 => !self.clean_session.unwrap_or(false),
            MqttProtocol::V5 => !self.session_expiry().is_zero(),
        }
    }

    /// The MQTT 5 session expiry, the default filled in.
    pub fn session_expiry(&self) -> Duration {
        self.session_expiry.unwrap_or(DEFAULT_SESSION_EXPIRY)
    }

    /// The MQTT 5 receive maximum: the configured one, else `max_in_flight` (within MQTT's
    /// 1..=65535), so the broker sends no more than the pipeline takes at once.
    pub fn receive_maximum(&self, max_in_flight: usize) -> u16 {
        let wanted = self.receive_maximum.map_or(max_in_flight, |n| n as usize);
        u16::try_from(wanted.max(1)).unwrap_or(u16::MAX)
    }

    /// What to do with an expired MQTT 5 message, the default filled in.
    pub fn expired(&self) -> ExpiredAction {
        self.expired.unwrap_or_default()
    }

    /// The MQTT 5 keys refused under 3.1.1, and `clean_session` refused under 5: each protocol
    /// has one way to say how long the session lives, so a file cannot say two things.
    fn check_protocol_keys(&self) -> Result<(), ConfigError> {
        match self.protocol {
            MqttProtocol::V3 => {
                let v5_only = [
                    ("session_expiry", self.session_expiry.is_some()),
                    ("receive_maximum", self.receive_maximum.is_some()),
                    ("expired", self.expired.is_some()),
                ];
                if let Some((key, _)) = v5_only.iter().find(|(_, set)| *set) {
                    return Err(ConfigError::invalid(
                        format!("mqtt.{key}"),
                        "is an MQTT 5 setting; add protocol = \"v5\" (3.1.1 has no such property)",
                    ));
                }
            }
            MqttProtocol::V5 => {
                if self.clean_session.is_some() {
                    return Err(ConfigError::invalid(
                        "mqtt.clean_session",
                        "is the MQTT 3.1.1 setting; with protocol = \"v5\" use session_expiry (\"0s\" ends the session with the connection, as clean_session = true did)",
                    ));
                }
                if self.keep_alive < Duration::from_secs(5) {
                    return Err(ConfigError::invalid(
                        "mqtt.keep_alive",
                        "must be at least 5s with protocol = \"v5\": the MQTT 5 client (rumqttc) refuses shorter intervals and cannot turn pings off",
                    ));
                }
                if let Some(expiry) = self.session_expiry {
                    // CONNECT carries whole seconds in 32 bits; 0xFFFFFFFF means "never".
                    if expiry.subsec_nanos() != 0 {
                        return Err(ConfigError::invalid(
                            "mqtt.session_expiry",
                            "must be a whole number of seconds",
                        ));
                    }
                    if expiry.as_secs() > u64::from(u32::MAX) {
                        return Err(ConfigError::invalid(
                            "mqtt.session_expiry",
                            "must be at most 4294967295s (about 136 years, which MQTT 5 reads as never)",
                        ));
                    }
                }
                if let Some(n) = self.receive_maximum {
                    if !(1..=u32::from(u16::MAX)).contains(&n) {
                        return Err(ConfigError::invalid(
                            "mqtt.receive_maximum",
                            format!("{n} is out of range; MQTT 5 allows 1 to 65535"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        check_endpoints(
            "mqtt",
            self.url.as_ref(),
            &self.urls,
            MqttUrl::tls,
            self.tls.is_some(),
            "a plain TCP URL; use mqtts://",
        )?;
        self.check_protocol_keys()?;
        match &self.client_id {
            Some(id) if id.is_empty() => {
                return Err(ConfigError::invalid("mqtt.client_id", "must not be empty"))
            }
            None if self.persistent_session() => {
                let mode = match self.protocol {
                    MqttProtocol::V3 => "clean_session = false",
                    MqttProtocol::V5 => "session_expiry is over 0s",
                };
                return Err(ConfigError::invalid(
                    "mqtt.client_id",
                    format!("is required when {mode}: the broker finds a persistent session by its client id"),
                ));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn mqtt(keys: &str) -> MqttConfig {
        let text = format!(
            "[[destinations]]\nname = \"a\"\nurl = \"http://127.0.0.1:1/x\"\n\
             [mqtt]\nurl = \"mqtt://h\"\nclient_id = \"c\"\ntopics = [\"t\"]\n{keys}"
        );
        let config = crate::config::Config::from_toml(&text).expect("valid");
        config.mqtt.expect("an [mqtt] section")
    }

    #[test]
    fn each_protocol_says_how_long_the_session_lives() {
        let v3 = mqtt("");
        assert_eq!(v3.protocol, MqttProtocol::V3);
        assert!(v3.persistent_session());
        assert!(!mqtt("clean_session = true").persistent_session());
        let v5 = mqtt("protocol = \"v5\"");
        assert!(v5.persistent_session());
        assert_eq!(v5.session_expiry(), DEFAULT_SESSION_EXPIRY);
        assert_eq!(v5.expired(), ExpiredAction::DeadLetter);
        assert!(!mqtt("protocol = \"v5\"\nsession_expiry = \"0s\"").persistent_session());
    }

    #[test]
    fn receive_maximum_defaults_to_max_in_flight_within_the_mqtt_range() {
        let v5 = mqtt("protocol = \"v5\"");
        assert_eq!(v5.receive_maximum(256), 256);
        assert_eq!(v5.receive_maximum(100_000), u16::MAX);
        assert_eq!(
            mqtt("protocol = \"v5\"\nreceive_maximum = 7").receive_maximum(256),
            7
        );
    }

    #[test]
    fn url_errors_hide_the_password() {
        let mqtt = MqttUrl::parse("mqtt://user:s3cret@127.0.0.1:99999").expect_err("bad port");
        assert!(!mqtt.contains("s3cret"), "{mqtt}");
        let amqp = AmqpUrl::parse("amqp://user:s3cret@127.0.0.1:99999/%2f").expect_err("bad port");
        assert!(!amqp.contains("s3cret"), "{amqp}");
    }
}
