//! What a message is once courier understands it: the [`Event`], parsed from an [`Inbound`]
//! message of any source, or the [`BadInput`] reason it cannot be.
//!
//! Parsing never panics and never recurses on attacker-chosen nesting: the size is checked before
//! anything else, and the body is only skimmed (serde_json skips `RawValue`s iteratively); even
//! `metadata` is only read one level down, its values judged by their JSON type.

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::config::Format;
use crate::properties::{Expiry, MessageProperties};
use crate::topic;
use crate::trace::{self, TraceContext};

/// Event ids longer than this are refused: they become header values and store keys.
pub const MAX_ID_BYTES: usize = 512;
/// More metadata keys than this are refused: each one becomes an HTTP header.
pub const MAX_METADATA_KEYS: usize = 128;

/// Which transport a message came from; recorded with dead letters and in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// The RabbitMQ source.
    Rabbitmq,
    /// The MQTT source.
    Mqtt,
    /// Re-submitted by an operator (dead-letter replay).
    Replay,
}

impl SourceKind {
    /// The name used in logs, metrics labels and dead letters.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Rabbitmq => "rabbitmq",
            SourceKind::Mqtt => "mqtt",
            SourceKind::Replay => "replay",
        }
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message as a source received it, before courier looks inside the body.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The transport it came from.
    pub source: SourceKind,
    /// How the source is configured to read bodies.
    pub format: Format,
    /// The body bytes exactly as received.
    pub body: Bytes,
    /// The AMQP routing key or MQTT topic name; the event topic when the body names none.
    pub topic: String,
    /// The AMQP `message_id` property, when the producer set one.
    pub message_id: Option<String>,
    /// String-valued transport headers (AMQP headers, MQTT v5 user properties).
    pub headers: Vec<(String, String)>,
    /// When courier received it; the fallback for `Metadata.CreationDateTime`.
    pub received_at: SystemTime,
    /// MQTT 5 `content-type`, `response-topic` and `correlation-data`, kept with the event.
    pub properties: Option<Box<MessageProperties>>,
    /// MQTT 5 `message-expiry-interval`, applied before the POST.
    pub expiry: Option<Expiry>,
}

/// A parsed event, ready for routing and delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The id sent as `X-Request-Id`/`X-Correlation-Id` and used for dedup.
    pub id: String,
    /// The topic matched against destination patterns; empty means "no topic" (matches all).
    pub topic: String,
    /// The envelope's `tenant_id`.
    pub tenant_id: Option<String>,
    /// The envelope's `destination_id`: deliver to that destination only.
    pub destination_id: Option<String>,
    /// `false` means one attempt only.
    pub eligible_for_retry: bool,
    /// The envelope's `time`, as given.
    pub time: Option<String>,
    /// Envelope metadata over transport headers; sent as HTTP headers.
    pub metadata: BTreeMap<String, String>,
    /// The JSON text to POST (the envelope's `data`, or the whole raw object).
    pub body: Bytes,
    /// When courier received the message.
    pub received_at: SystemTime,
    /// The transport it came from.
    pub source: SourceKind,
    /// MQTT 5 properties kept for dead letters; never sent.
    pub properties: Option<Box<MessageProperties>>,
    /// The W3C trace context it arrived with ([`crate::trace`]), if a valid one came.
    pub trace: Option<TraceContext>,
}

/// JSON nested deeper than this is refused. serde_json reads at most 127 levels (its recursion
/// limit of 128 counts the value it starts in), and other parsers a partner would use stop near
/// there too, so a deeper event would only fail later: at the `Metadata` rewrite, or at the
/// partner as a 4xx dead letter after a POST. Refusing it here says why.
pub const MAX_NESTING: usize = 127;

/// Whether `json` (valid JSON) opens more than `max` arrays or objects inside each other. A flat
/// byte scan, no recursion. Strings are skipped with `memchr` to the next quote or backslash,
/// since most of a typical event's bytes are string contents, where a byte-at-a-time loop costs
/// the most (docs/performance.md).
fn nests_deeper_than(json: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&b) = json.get(i) {
        i += 1;
        match b {
            b'"' => loop {
                let rest = json.get(i..).unwrap_or_default();
                match memchr::memchr2(b'"', b'\\', rest) {
                    // A backslash escapes the byte after it (`\"` or `\\`), which is skipped.
                    Some(at) if rest[at] == b'\\' => i += at + 2,
                    Some(at) => {
                        i += at + 1;
                        break;
                    }
                    // Valid JSON does not end inside a string; nothing deeper can follow.
                    None => return false,
                }
            },
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Why a message cannot become an event. The text is what an operator reads in the dead-letter list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadInput {
    /// Over `service.max_payload_bytes`.
    #[error("payload is {size} bytes, over service.max_payload_bytes = {max}")]
    TooLarge { size: usize, max: usize },
    /// Zero bytes.
    #[error("payload is empty")]
    Empty,
    /// Not UTF-8, so not JSON.
    #[error("payload is not valid UTF-8 (first invalid byte at offset {offset})")]
    NotUtf8 { offset: usize },
    /// Not parseable JSON.
    #[error("payload is not valid JSON: {0}")]
    NotJson(String),
    /// JSON, but not an object.
    #[error("payload is a JSON {0}, not an object")]
    NotObject(&'static str),
    /// Nested deeper than [`MAX_NESTING`].
    #[error("payload nests arrays or objects deeper than {max} levels")]
    TooDeep { max: usize },
    /// A known field has an unusable value.
    #[error("{field}: {problem}")]
    Field { field: String, problem: String },
}

impl BadInput {
    fn field(field: &str, problem: impl Into<String>) -> Self {
        BadInput::Field {
            field: field.to_string(),
            problem: problem.into(),
        }
    }
}

/// Every key courier reads from a body, envelope or raw, borrowed from the body so `data` keeps
/// its exact bytes. One parse of this is all a well-formed event costs ([`parse`]).
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tenant_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    destination_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    topic: Option<&'a RawValue>,
    #[serde(borrow, default)]
    eligible_for_retry: Option<&'a RawValue>,
    #[serde(borrow, default)]
    time: Option<&'a RawValue>,
    #[serde(borrow, default)]
    metadata: Option<&'a RawValue>,
    /// Present at all, `null` included (`Some("null")`): `{"id":..,"data":null}` is still an
    /// envelope.
    #[serde(borrow, default, deserialize_with = "present_raw")]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    event_id: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "EventID")]
    event_id_pascal: Option<&'a RawValue>,
}

fn present_raw<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// The id keys of a raw body, in the order they are tried.
type RawIds<'a> = [(Option<&'a RawValue>, &'static str); 3];

/// The id keys of a raw body in the order they are tried, whichever struct read them.
fn raw_ids<'a>(
    event_id: Option<&'a RawValue>,
    event_id_pascal: Option<&'a RawValue>,
    id: Option<&'a RawValue>,
) -> RawIds<'a> {
    [
        (event_id, "event_id"),
        (event_id_pascal, "EventID"),
        (id, "id"),
    ]
}

/// Just the keys of a raw object that courier reads, plus what `auto` needs to decide: what the
/// careful path of [`parse`] reads first, so that a raw body is judged only by these keys (a
/// duplicate `metadata` key in a raw body is no error).
#[derive(Deserialize)]
struct RawKeys<'a> {
    #[serde(borrow, default)]
    event_id: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "EventID")]
    event_id_pascal: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    topic: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tenant_id: Option<&'a RawValue>,
    /// Present at all, `null` included: `{"id":..,"data":null}` is still an envelope.
    #[serde(default, deserialize_with = "present")]
    data: bool,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d)?;
    Ok(true)
}

/// `part` as a slice of `whole` when it lies inside it (the envelope's `data`, borrowed from the
/// body): the event then shares the received buffer instead of copying it; otherwise a copy.
fn share_or_copy(whole: &Bytes, part: &str) -> Bytes {
    let range = whole.as_ptr_range();
    let p = part.as_bytes().as_ptr_range();
    if !part.is_empty() && range.start <= p.start && p.end <= range.end {
        whole.slice_ref(part.as_bytes())
    } else {
        Bytes::copy_from_slice(part.as_bytes())
    }
}

/// Parses a message body according to its source's format.
pub fn parse(inbound: &Inbound, max_payload_bytes: usize) -> Result<Event, BadInput> {
    parse_with(inbound, max_payload_bytes, true)
}

/// What [`parse`] returns, always by its careful path (the whole body checked as JSON, then its
/// keys, then the envelope: three parses where [`parse`] usually needs one). There so that tests
/// and the fuzzer can hold the two paths to the same verdict on every input.
pub fn parse_carefully(inbound: &Inbound, max_payload_bytes: usize) -> Result<Event, BadInput> {
    parse_with(inbound, max_payload_bytes, false)
}

fn parse_with(
    inbound: &Inbound,
    max_payload_bytes: usize,
    one_pass: bool,
) -> Result<Event, BadInput> {
    let bytes = &inbound.body[..];
    if bytes.len() > max_payload_bytes {
        return Err(BadInput::TooLarge {
            size: bytes.len(),
            max: max_payload_bytes,
        });
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(BadInput::Empty);
    }
    let text = std::str::from_utf8(bytes).map_err(|e| BadInput::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    // The usual case, one pass: an object, nested no deeper than allowed, whose keys parse.
    // Anything else, or any error, takes the careful path below, which finds the exact reason
    // (and accepts what only `Fields` refuses, such as a raw body with two `metadata` keys).
    if one_pass && json_kind(text) == "object" && !nests_deeper_than(bytes, MAX_NESTING) {
        if let Ok(fields) = serde_json::from_str::<Fields>(text) {
            let envelope = is_envelope(
                inbound.format,
                fields.data.is_some(),
                fields.id.is_some() || fields.topic.is_some() || fields.tenant_id.is_some(),
            );
            return if envelope {
                parse_envelope(inbound, &fields)
            } else {
                parse_raw(
                    inbound,
                    text,
                    raw_ids(fields.event_id, fields.event_id_pascal, fields.id),
                )
            };
        }
    }
    let raw: &RawValue =
        serde_json::from_str(text).map_err(|e| BadInput::NotJson(e.to_string()))?;
    let kind = json_kind(raw.get());
    if kind != "object" {
        return Err(BadInput::NotObject(kind));
    }
    if nests_deeper_than(bytes, MAX_NESTING) {
        return Err(BadInput::TooDeep { max: MAX_NESTING });
    }
    let keys: RawKeys = serde_json::from_str(text).map_err(|e| BadInput::NotJson(e.to_string()))?;
    let envelope = is_envelope(
        inbound.format,
        keys.data,
        keys.id.is_some() || keys.topic.is_some() || keys.tenant_id.is_some(),
    );
    if envelope {
        let fields: Fields =
            serde_json::from_str(text).map_err(|e| BadInput::NotJson(e.to_string()))?;
        parse_envelope(inbound, &fields)
    } else {
        parse_raw(
            inbound,
            text,
            raw_ids(keys.event_id, keys.event_id_pascal, keys.id),
        )
    }
}

/// `auto` reads a body as an envelope when it has `data` and one of `id`, `topic`, `tenant_id`.
fn is_envelope(format: Format, has_data: bool, has_envelope_key: bool) -> bool {
    match format {
        Format::Envelope => true,
        Format::Raw => false,
        Format::Auto => has_data && has_envelope_key,
    }
}

fn parse_envelope(inbound: &Inbound, env: &Fields) -> Result<Event, BadInput> {
    let topic = match opt_string(env.topic, "topic")? {
        Some(t) => t,
        None => inbound.topic.clone(),
    };
    check_topic(&topic)?;
    let time = opt_string(env.time, "time")?;
    let body: &str = match env.data {
        Some(d) if d.get() != "null" => d.get(),
        _ => "{}",
    };
    let id = match opt_id(env.id, "id")? {
        Some(id) => id,
        None => fallback_id(inbound, &topic, body, time.as_deref())?,
    };
    let eligible_for_retry = match env.eligible_for_retry {
        None => true,
        Some(v) => match v.get() {
            "true" => true,
            "false" => false,
            "null" => true,
            _ => {
                return Err(BadInput::field(
                    "eligible_for_retry",
                    format!("expected true or false, got {}", json_kind(v.get())),
                ))
            }
        },
    };
    let mut metadata = transport_metadata(inbound);
    if let Some(m) = env.metadata {
        merge_metadata(&mut metadata, m)?;
    }
    if metadata.len() > MAX_METADATA_KEYS {
        return Err(too_many_metadata(metadata.len()));
    }
    let trace = trace::extract(&inbound.headers, &mut metadata);
    // An empty name is no name: producers that fill every field send "" for "none".
    let non_empty = |v: Option<String>| v.filter(|v| !v.is_empty());
    Ok(Event {
        id,
        topic,
        tenant_id: non_empty(opt_string(env.tenant_id, "tenant_id")?),
        destination_id: non_empty(opt_string(env.destination_id, "destination_id")?),
        eligible_for_retry,
        time,
        metadata,
        body: share_or_copy(&inbound.body, body),
        received_at: inbound.received_at,
        source: inbound.source,
        properties: inbound.properties.clone(),
        trace,
    })
}

fn parse_raw(inbound: &Inbound, text: &str, ids: RawIds) -> Result<Event, BadInput> {
    let topic = inbound.topic.clone();
    check_topic(&topic)?;
    let mut id = None;
    for (raw, name) in ids {
        if let Some(found) = opt_id(raw, name)? {
            id = Some(found);
            break;
        }
    }
    let id = match id {
        Some(id) => id,
        None => fallback_id(inbound, &topic, text, None)?,
    };
    let mut metadata = transport_metadata(inbound);
    if metadata.len() > MAX_METADATA_KEYS {
        return Err(too_many_metadata(metadata.len()));
    }
    let trace = trace::extract(&inbound.headers, &mut metadata);
    Ok(Event {
        id,
        topic,
        tenant_id: None,
        destination_id: None,
        eligible_for_retry: true,
        time: None,
        metadata,
        body: inbound.body.clone(),
        received_at: inbound.received_at,
        source: inbound.source,
        properties: inbound.properties.clone(),
        trace,
    })
}

/// The transport's message id when it has a usable one, else the deterministic hash.
fn fallback_id(
    inbound: &Inbound,
    topic: &str,
    data: &str,
    time: Option<&str>,
) -> Result<String, BadInput> {
    match inbound
        .message_id
        .as_deref()
        .map(|mid| mid.trim_matches(' '))
    {
        Some(mid) if !mid.is_empty() => {
            check_id(mid, "message_id")?;
            Ok(mid.to_string())
        }
        _ => Ok(derive_id(topic, data, time)),
    }
}

/// The id of an event that carries none: the same topic, data and time always give the same id,
/// so a producer that republishes an id-less event is still deduplicated.
pub fn derive_id(topic: &str, data: &str, time: Option<&str>) -> String {
    let mut h = Sha256::new();
    h.update(topic.as_bytes());
    h.update([0u8]);
    h.update(data.as_bytes());
    h.update([0u8]);
    h.update(time.unwrap_or("").as_bytes());
    let digest = h.finalize();
    let mut id = String::with_capacity(4 + 32);
    id.push_str("evt_");
    for b in &digest[..16] {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

/// The transport's headers, with the spaces around each value dropped as for metadata.
fn transport_metadata(inbound: &Inbound) -> BTreeMap<String, String> {
    inbound
        .headers
        .iter()
        .map(|(k, v)| {
            let trimmed = v.trim_matches(HEADER_SPACE);
            let v = if trimmed.len() == v.len() {
                v.clone()
            } else {
                trimmed.to_string()
            };
            (k.clone(), v)
        })
        .collect()
}

/// What HTTP drops around a header value (RFC 9110 section 5.5), and HTTP/2 refuses there.
const HEADER_SPACE: &[char] = &[' ', '\t'];

fn merge_metadata(into: &mut BTreeMap<String, String>, raw: &RawValue) -> Result<(), BadInput> {
    if raw.get() == "null" {
        return Ok(());
    }
    // The values are skimmed and judged by their JSON type, not read as `serde_json::Value`:
    // with the `arbitrary_precision`/`raw_value` features, `Value` reads an object whose first
    // key is one of serde_json's private markers (`{"$serde_json::private::Number":"12"}`) as a
    // number or string, so such an object passed as a header (found by fuzzing).
    let map: BTreeMap<String, &RawValue> = serde_json::from_str(raw.get()).map_err(|e| {
        let problem = match json_kind(raw.get()) {
            // Valid JSON that is still no map of strings: a key with a lone surrogate escape.
            // Say so, not "got object".
            "object" => format!("cannot be read: {e}"),
            kind => format!("expected an object of strings, got {kind}"),
        };
        BadInput::field("metadata", problem)
    })?;
    if map.len() > MAX_METADATA_KEYS {
        return Err(too_many_metadata(map.len()));
    }
    for (k, v) in map {
        let text = v.get();
        let unreadable = |e: serde_json::Error| {
            BadInput::field(&format!("metadata.{}", k.escape_debug()), e.to_string())
        };
        let value = match json_kind(text) {
            // The spaces around a value go: a receiver drops them from the header anyway, and
            // HTTP/2 refuses a value that has them.
            "string" => {
                let value = serde_json::from_str::<String>(text).map_err(unreadable)?;
                match value.trim_matches(HEADER_SPACE) {
                    trimmed if trimmed.len() == value.len() => value,
                    trimmed => trimmed.to_string(),
                }
            }
            "number" => serde_json::from_str::<serde_json::Number>(text)
                .map_err(unreadable)?
                .to_string(),
            "boolean" => text.to_string(),
            "null" => continue,
            kind => {
                return Err(BadInput::field(
                    &format!("metadata.{k}"),
                    format!("expected a string, got {kind}"),
                ))
            }
        };
        // Each entry becomes an HTTP header: one that cannot be sent is the producer's mistake
        // (or a CR/LF injection attempt), and is refused rather than silently dropped.
        if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err() {
            return Err(BadInput::field(
                &format!("metadata.{}", k.escape_debug()),
                "is not a valid HTTP header name (letters, digits and !#$%&'*+-.^_`|~ only)",
            ));
        }
        if reqwest::header::HeaderValue::from_str(&value).is_err() {
            return Err(BadInput::field(
                &format!("metadata.{}", k.escape_debug()),
                "is not a valid HTTP header value (control characters such as CR or LF are not allowed)",
            ));
        }
        // The envelope wins over a transport header of the same name in any case: header
        // names are case-insensitive, and both would be sent.
        if !into.is_empty() {
            into.retain(|key, _| !key.eq_ignore_ascii_case(&k));
        }
        into.insert(k, value);
    }
    if into.len() > MAX_METADATA_KEYS {
        return Err(too_many_metadata(into.len()));
    }
    Ok(())
}

fn too_many_metadata(n: usize) -> BadInput {
    BadInput::field(
        "metadata",
        format!(
            "has {n} keys; at most {MAX_METADATA_KEYS} are accepted (each becomes an HTTP header)"
        ),
    )
}

/// A string field, or nothing when absent or null.
fn opt_string(raw: Option<&RawValue>, field: &str) -> Result<Option<String>, BadInput> {
    let Some(raw) = raw else { return Ok(None) };
    match serde_json::from_str::<Option<String>>(raw.get()) {
        Ok(v) => Ok(v),
        // Valid JSON that is no Rust string: a lone surrogate escape such as "\ud800".
        Err(e) if json_kind(raw.get()) == "string" => Err(BadInput::field(field, e.to_string())),
        Err(_) => Err(BadInput::field(
            field,
            format!("expected a string, got {}", json_kind(raw.get())),
        )),
    }
}

/// An id field: a string, or an integer taken as its decimal text. Empty counts as absent.
fn opt_id(raw: Option<&RawValue>, field: &str) -> Result<Option<String>, BadInput> {
    let Some(raw) = raw else { return Ok(None) };
    let text = raw.get();
    let id = match json_kind(text) {
        "null" => return Ok(None),
        "string" => serde_json::from_str::<String>(text)
            .map_err(|e| BadInput::field(field, e.to_string()))?,
        "number" if text.bytes().all(|b| b.is_ascii_digit() || b == b'-') => text.to_string(),
        kind => {
            return Err(BadInput::field(
                field,
                format!("expected a string or an integer, got {kind}"),
            ))
        }
    };
    // Spaces around an id go: a receiver drops them from `X-Request-Id`, so the partner would
    // see another id than the one deduplicated and signed. Only spaces counts as no id.
    let id = match id.trim_matches(' ') {
        "" => return Ok(None),
        trimmed if trimmed.len() == id.len() => id,
        trimmed => trimmed.to_string(),
    };
    check_id(&id, field)?;
    Ok(Some(id))
}

fn check_id(id: &str, field: &str) -> Result<(), BadInput> {
    if id.len() > MAX_ID_BYTES {
        return Err(BadInput::field(
            field,
            format!("is {} bytes; at most {MAX_ID_BYTES}", id.len()),
        ));
    }
    // It becomes X-Request-Id: visible ASCII and spaces only, which also rules out CR/LF and NUL.
    if !id.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(BadInput::field(
            field,
            "contains characters that cannot be sent in an HTTP header (control or non-ASCII)",
        ));
    }
    Ok(())
}

/// A topic must be concrete: see [`topic::check_concrete`].
fn check_topic(topic: &str) -> Result<(), BadInput> {
    topic::check_concrete(topic).map_err(|problem| BadInput::field("topic", problem))
}

/// The JSON type of a (valid) JSON text, for error messages.
fn json_kind(text: &str) -> &'static str {
    match text.trim_start().as_bytes().first() {
        Some(b'{') => "object",
        Some(b'[') => "array",
        Some(b'"') => "string",
        Some(b't') | Some(b'f') => "boolean",
        Some(b'n') => "null",
        _ => "number",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbound(body: &str) -> Inbound {
        Inbound {
            source: SourceKind::Rabbitmq,
            format: Format::Auto,
            body: Bytes::copy_from_slice(body.as_bytes()),
            topic: "rk.topic".into(),
            message_id: None,
            headers: vec![("x-from-header".into(), "h".into())],
            received_at: SystemTime::UNIX_EPOCH,
            properties: None,
            expiry: None,
        }
    }

    #[test]
    fn one_pass_and_careful_parse_agree() {
        let deep = format!("{{\"data\":{}1{}}}", "[".repeat(130), "]".repeat(130));
        let bodies = [
            r#"{"id":"e1","topic":"a.b","data":{"x":1}}"#,
            r#"{"id":"e1","data":null}"#,
            r#"{"data":{"x":1}}"#,
            r#"{"event_id":"r1","x":1}"#,
            r#"{"EventID":7,"id":"ignored-after-event-id"}"#,
            // Two keys only the envelope reads: no error for a raw body, one for an envelope.
            r#"{"x":1,"metadata":{"a":"1"},"metadata":{"b":"2"}}"#,
            r#"{"id":"e1","data":{},"metadata":{"a":"1"},"metadata":{"b":"2"}}"#,
            r#"{"id":"e1","id":"e2","data":{}}"#,
            r#"{"event_id":"a","event_id":"b"}"#,
            // An array is no struct here, although serde could read one as a struct.
            r#"["e1","t",null]"#,
            r#"  {"id":"e1","data":{}}  "#,
            r#"{"id":"e1","data":{}} trailing"#,
            r#"{"id":"e1","data":{"#,
            r#"{"id":"e\ud800","data":{}}"#,
            r#"{"id":12,"eligible_for_retry":"yes","data":{}}"#,
            r#"{"id":"e1","metadata":{"k":"v\r\nX: y"},"data":{}}"#,
            deep.as_str(),
        ];
        for body in bodies {
            for format in [Format::Envelope, Format::Raw, Format::Auto] {
                let mut inbound = inbound(body);
                inbound.format = format;
                assert_eq!(
                    parse(&inbound, 1 << 20),
                    parse_carefully(&inbound, 1 << 20),
                    "{format:?} {body}"
                );
            }
        }
        let mut raw = inbound(r#"{"x":1,"metadata":{"a":"1"},"metadata":{"b":"2"}}"#);
        raw.format = Format::Raw;
        assert!(
            parse(&raw, 1 << 20).is_ok(),
            "a raw body's keys are its own"
        );
    }

    #[test]
    fn envelope_takes_data_and_fields() {
        let e = parse(
            &inbound(
                r#"{"id":"evt_1","tenant_id":"acme","topic":"user.created","time":"2024-06-01T08:23:36Z",
                   "eligible_for_retry":false,"metadata":{"source":"signup","n":3},"data":{"b":1, "a":2}}"#,
            ),
            1 << 20,
        )
        .expect("valid");
        assert_eq!(e.id, "evt_1");
        assert_eq!(e.topic, "user.created");
        assert_eq!(e.tenant_id.as_deref(), Some("acme"));
        assert!(!e.eligible_for_retry);
        assert_eq!(&e.body[..], br#"{"b":1, "a":2}"#);
        assert_eq!(e.metadata["source"], "signup");
        assert_eq!(e.metadata["n"], "3");
        assert_eq!(e.metadata["x-from-header"], "h");
    }

    #[test]
    fn envelope_data_shares_the_received_buffer() {
        let i = inbound(r#"{"id":"evt_1","data":{"b":1}}"#);
        let e = parse(&i, 1 << 20).expect("valid");
        assert_eq!(&e.body[..], br#"{"b":1}"#);
        let whole = i.body.as_ptr_range();
        assert!(whole.contains(&e.body.as_ptr()), "data was copied");
        // An absent `data` is the literal {}, which is not in the buffer.
        let e = parse(&inbound(r#"{"id":"evt_2","data":null}"#), 1 << 20).expect("valid");
        assert_eq!(&e.body[..], b"{}");
    }

    #[test]
    fn raw_keeps_body_and_finds_id() {
        let body = r#"{"EventID":"E-9","status":"done"}"#;
        let e = parse(&inbound(body), 1 << 20).expect("valid");
        assert_eq!(e.id, "E-9");
        assert_eq!(e.topic, "rk.topic");
        assert_eq!(&e.body[..], body.as_bytes());
        let e = parse(&inbound(r#"{"event_id":42,"EventID":"x"}"#), 1 << 20).expect("valid");
        assert_eq!(e.id, "42");
    }

    #[test]
    fn auto_needs_data_and_an_envelope_key() {
        // `data` alone is a raw object that happens to have a data field.
        let e = parse(&inbound(r#"{"data":{"x":1},"id":"a"}"#), 1 << 20).expect("valid");
        assert_eq!(&e.body[..], br#"{"x":1}"#);
        let e = parse(&inbound(r#"{"data":{"x":1}}"#), 1 << 20).expect("valid");
        assert_eq!(&e.body[..], br#"{"data":{"x":1}}"#);
        let e = parse(&inbound(r#"{"id":"n","data":null}"#), 1 << 20).expect("valid");
        assert_eq!(
            &e.body[..],
            b"{}",
            "null data is still an envelope; nothing to send but {{}}"
        );
    }

    #[test]
    fn id_is_deterministic_without_one() {
        let a = parse(
            &inbound(r#"{"topic":"t","data":{"x":1},"time":"T"}"#),
            1 << 20,
        )
        .unwrap();
        let b = parse(
            &inbound(r#"{"topic":"t","data":{"x":1},"time":"T"}"#),
            1 << 20,
        )
        .unwrap();
        let c = parse(
            &inbound(r#"{"topic":"t","data":{"x":2},"time":"T"}"#),
            1 << 20,
        )
        .unwrap();
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert!(a.id.starts_with("evt_") && a.id.len() == 36);
        let mut with_mid = inbound(r#"{"x":1}"#);
        with_mid.message_id = Some("amqp-mid".into());
        assert_eq!(parse(&with_mid, 1 << 20).unwrap().id, "amqp-mid");
    }

    #[test]
    fn bad_inputs_have_reasons() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"\xff\xfe", "UTF-8"),
            (b"{not json", "not valid JSON"),
            (b"[1,2]", "array, not an object"),
            (b"42", "number, not an object"),
            (b"\"s\"", "string, not an object"),
            (
                br#"{"id":{"a":1},"data":{}}"#,
                "id: expected a string or an integer",
            ),
            (
                br#"{"id":"a\r\nX-Evil: 1","data":{}}"#,
                "id: contains characters",
            ),
            (br#"{"topic":"a.#","data":{}}"#, "wildcard"),
            (br#"{"topic":"a/+/b","data":{}}"#, "wildcard"),
            (
                br#"{"id":"a","data":{},"metadata":[1]}"#,
                "metadata: expected an object",
            ),
            (
                br#"{"id":"a","data":{},"tenant_id":5}"#,
                "tenant_id: expected a string",
            ),
            (
                br#"{"id":"a","data":{},"metadata":{"bad name":"v"}}"#,
                "metadata.bad name: is not a valid HTTP header name",
            ),
            (
                br#"{"id":"a","data":{},"metadata":{"x-a":"v\r\nX-Evil: 1"}}"#,
                "metadata.x-a: is not a valid HTTP header value",
            ),
            (
                br#"{"id":"a","data":{},"metadata":{"x\r\nEvil":"v"}}"#,
                r"metadata.x\r\nEvil: is not a valid HTTP header name",
            ),
        ];
        for (body, want) in cases {
            let mut i = inbound("");
            i.body = Bytes::copy_from_slice(body);
            let err = parse(&i, 1 << 20).expect_err("must be bad").to_string();
            assert!(err.contains(want), "{body:?}: {err}");
        }
        // Deep nesting is skipped iteratively by serde_json: no stack overflow, a plain verdict.
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        let err = parse(&inbound(&deep), 1 << 20).unwrap_err().to_string();
        assert!(err.contains("array, not an object"), "{err}");
        let deep_obj = format!(
            r#"{{"id":"d","data":{}{}}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let err = parse(&inbound(&deep_obj), 1 << 20).unwrap_err();
        assert_eq!(err, BadInput::TooDeep { max: MAX_NESTING });
        // 127 levels in all still pass; brackets inside strings do not count.
        let ok = format!(
            r#"{{"id":"d","data":{}"[[[{{{{"{}}}"#,
            "[".repeat(126),
            "]".repeat(126)
        );
        parse(&inbound(&ok), 1 << 20).expect("127 levels are fine");
        assert!(
            serde_json::from_str::<serde_json::Value>(&ok).is_ok(),
            "serde_json agrees"
        );
        let too_deep = ok.replacen("[", "[[", 1).replacen("]", "]]", 1);
        assert!(parse(&inbound(&too_deep), 1 << 20).is_err());
        let err = parse(&inbound("{}"), 1).unwrap_err();
        assert_eq!(err, BadInput::TooLarge { size: 2, max: 1 });
    }

    /// Found by fuzzing: `"\ud800"` is valid JSON (a lone surrogate escape) but no Rust
    /// string, and was reported as "topic: expected a string, got string".
    #[test]
    fn lone_surrogates_are_named() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"id":"a","topic":"\ud800","data":{}}"#,
                "topic: unexpected end of hex escape",
            ),
            (
                r#"{"id":"a","tenant_id":"x\udc00","data":{}}"#,
                "tenant_id: lone leading surrogate",
            ),
            (
                r#"{"id":"a","time":"\ud800x","data":{}}"#,
                "time: unexpected end of hex escape",
            ),
            (
                r#"{"id":"a","metadata":{"k":"\ud800"},"data":{}}"#,
                "metadata.k: unexpected end of hex escape",
            ),
            (
                r#"{"id":"a","metadata":{"\udc00":"v"},"data":{}}"#,
                "metadata: cannot be read: lone leading surrogate",
            ),
            (
                r#"{"id":"\ud800","data":{}}"#,
                "id: unexpected end of hex escape",
            ),
        ];
        for (body, want) in cases {
            let err = parse(&inbound(body), 1 << 20).unwrap_err().to_string();
            assert!(err.starts_with(want), "{body}: {err}");
        }
        // Elsewhere such strings are only skimmed: the body is sent as it came.
        let body = r#"{"id":"a","data":{"s":"\ud800"}}"#;
        let e = parse(&inbound(body), 1 << 20).expect("valid JSON");
        assert_eq!(&e.body[..], br#"{"s":"\ud800"}"#);
    }

    /// Found by fuzzing: an object in `metadata` is bad input even when its first key is one of
    /// serde_json's private markers, which `serde_json::Value` reads as a number or a string.
    #[test]
    fn metadata_objects_with_serde_markers_are_refused() {
        for value in [
            r#"{"$serde_json::private::Number":"12"}"#,
            r#"{"\u0024serde_json::private::RawValue":"\"v\""}"#,
        ] {
            let body = format!(r#"{{"id":"m","data":{{}},"metadata":{{"k":{value}}}}}"#);
            let err = parse(&inbound(&body), 1 << 20).unwrap_err().to_string();
            assert_eq!(err, "metadata.k: expected a string, got object", "{body}");
        }
        // Scalars keep their documented forms.
        let e = parse(
            &inbound(r#"{"id":"m","data":{},"metadata":{"n":1E5,"f":1.50,"b":false,"z":null}}"#),
            1 << 20,
        )
        .expect("valid");
        assert_eq!(e.metadata["n"], "1e+5");
        assert_eq!(e.metadata["f"], "1.50");
        assert_eq!(e.metadata["b"], "false");
        assert!(!e.metadata.contains_key("z"));
    }

    /// What a partner's HTTP stack would make of the id and the headers is what courier
    /// deduplicates, signs and sends: spaces around values go, empty names are none, and the
    /// envelope wins over a header whatever the case of its name.
    #[test]
    fn ids_names_and_metadata_are_taken_as_http_will_see_them() {
        let e = parse(
            &inbound(r#"{"id":"  e1 ","tenant_id":"","destination_id":"","data":{}}"#),
            1 << 20,
        )
        .expect("valid");
        assert_eq!(e.id, "e1");
        assert_eq!((e.tenant_id, e.destination_id), (None, None));
        let e = parse(&inbound(r#"{"id":"   ","topic":"t","data":{}}"#), 1 << 20).expect("valid");
        assert!(e.id.starts_with("evt_"), "only spaces is no id: {}", e.id);
        let e = parse(
            &inbound(r#"{"x":1,"event_id":" ","EventID":" E-1"}"#),
            1 << 20,
        )
        .expect("valid");
        assert_eq!(e.id, "E-1");
        let mut with_message_id = inbound(r#"{"topic":"t","data":{}}"#);
        with_message_id.message_id = Some(" m-1 ".into());
        assert_eq!(parse(&with_message_id, 1 << 20).expect("valid").id, "m-1");

        let mut i = inbound(
            r#"{"id":"a","data":{},"metadata":{"X-From-Header":"env","b":" \tspaced\t "}}"#,
        );
        i.headers.push(("x-tabbed".into(), "\tv ".into()));
        let e = parse(&i, 1 << 20).expect("valid");
        let keys: Vec<&str> = e.metadata.keys().map(String::as_str).collect();
        assert_eq!(keys, ["X-From-Header", "b", "x-tabbed"]);
        assert_eq!(e.metadata["X-From-Header"], "env");
        assert_eq!(e.metadata["b"], "spaced");
        assert_eq!(e.metadata["x-tabbed"], "v");
    }

    /// Headers count toward the limit with or without envelope metadata.
    #[test]
    fn too_many_transport_headers() {
        let mut i = inbound(r#"{"id":"a","data":{}}"#);
        i.headers = (0..200).map(|n| (format!("h{n}"), "v".into())).collect();
        let err = parse(&i, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("200 keys"), "{err}");
    }

    #[test]
    fn too_many_metadata_keys() {
        let meta: Vec<String> = (0..200).map(|i| format!("\"k{i}\":\"v\"")).collect();
        let body = format!(
            r#"{{"id":"a","data":{{}},"metadata":{{{}}}}}"#,
            meta.join(",")
        );
        let err = parse(&inbound(&body), 1 << 20).unwrap_err().to_string();
        assert!(err.contains("200 keys"), "{err}");
    }

    #[test]
    fn nesting_scan_skips_strings_and_their_escapes() {
        let cases: &[(&str, usize, bool)] = &[
            (r#"{"a":[1]}"#, 2, false),
            (r#"{"a":[1]}"#, 1, true),
            // Brackets inside strings do not count, however they are escaped around.
            (r#"{"s":"[[[{{{"}"#, 1, false),
            (r#"{"s":"\"[[[","t":"\\"}"#, 1, false),
            (r#"{"s":"\\","t":[[1]]}"#, 2, true),
            (r#"{"s":"\\\"[","t":[1]}"#, 2, false),
            (r#"{"s":"\u005b","t":{"u":{}}}"#, 3, false),
            (r#"{"s":"\u005b","t":{"u":{}}}"#, 2, true),
            (r#"{"":"","":[[["x"]]]}"#, 4, false),
            (r#"{"":"","":[[["x"]]]}"#, 3, true),
            ("{}", 0, true),
            ("", 0, false),
            // Not valid JSON, but must not panic: a string that never ends, a trailing escape.
            (r#"{"s":"abc"#, 1, false),
            ("{\"s\":\"ab\\", 1, false),
        ];
        for &(json, max, deeper) in cases {
            assert_eq!(
                nests_deeper_than(json.as_bytes(), max),
                deeper,
                "{json} (max {max})"
            );
        }
    }
}
