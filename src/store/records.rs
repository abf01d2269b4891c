//! The records the store keeps, as they are serialised: a pending retry, a dead letter, and the
//! event inside both.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::event::{Event, SourceKind};
use crate::properties::MessageProperties;
use crate::trace::{self, TraceContext};

/// Why a message ended in the dead-letter tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterKind {
    /// The body could not be parsed; there is no event to deliver.
    BadInput,
    /// The envelope's `destination_id` names no (acceptable) destination.
    Unroutable,
    /// The destination answered with a failure that is not worth retrying.
    Failed,
    /// Every attempt the retry policy allows failed.
    Exhausted,
    /// Its MQTT 5 `message-expiry-interval` passed before the POST (`mqtt.expired`).
    Expired,
    /// Handling it panicked: a bug in courier. Kept rather than redelivered, which would panic
    /// again.
    Crashed,
}

/// An attempt still to make: kept in the retry tree, ordered by `next_at_ms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetryRecord {
    pub destination: String,
    pub event: StoredEvent,
    /// Attempts made so far (0 for an event parked by an open circuit before any attempt).
    pub attempts: u32,
    /// When to attempt next (Unix milliseconds).
    pub next_at_ms: u64,
    #[serde(default)]
    pub last_status: Option<u16>,
    #[serde(default)]
    pub last_error: String,
}

/// The parts of an [`Event`] needed to deliver it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredEvent {
    pub id: String,
    pub topic: String,
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub destination_id: Option<String>,
    pub eligible_for_retry: bool,
    #[serde(default)]
    pub time: Option<String>,
    #[serde(default)]
    pub metadata: std::collections::BTreeMap<String, String>,
    /// The JSON body to POST, kept as JSON rather than an escaped string.
    pub body: Box<RawValue>,
    pub received_at_ms: u64,
    pub source: SourceKind,
    /// MQTT 5 properties of the message; absent from records of other messages (and older ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<Box<MessageProperties>>,
    /// The trace the event arrived in (or courier started), so a later attempt continues it.
    /// Records written before courier kept it read as `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceContext>,
}

impl StoredEvent {
    /// Copies what a later delivery needs from `event`.
    pub fn from_event(event: &Event) -> StoredEvent {
        let body = std::str::from_utf8(&event.body)
            .ok()
            .and_then(|s| RawValue::from_string(s.to_string()).ok())
            .unwrap_or_else(|| {
                // Event bodies are validated JSON; this arm only guards against a programming error.
                Box::<RawValue>::default()
            });
        StoredEvent {
            id: event.id.clone(),
            topic: event.topic.clone(),
            tenant_id: event.tenant_id.clone(),
            destination_id: event.destination_id.clone(),
            eligible_for_retry: event.eligible_for_retry,
            time: event.time.clone(),
            metadata: event.metadata.clone(),
            body,
            received_at_ms: millis(event.received_at),
            source: event.source,
            properties: event.properties.clone(),
            trace: event.trace.clone(),
        }
    }

    /// The event again, as the sender needs it. A record from before courier kept the trace
    /// context may still hold it in its metadata: it is taken from there, so it is continued
    /// rather than forwarded as it came.
    pub fn to_event(&self) -> Event {
        let mut metadata = self.metadata.clone();
        let from_metadata = trace::extract(&[], &mut metadata);
        Event {
            id: self.id.clone(),
            topic: self.topic.clone(),
            tenant_id: self.tenant_id.clone(),
            destination_id: self.destination_id.clone(),
            eligible_for_retry: self.eligible_for_retry,
            time: self.time.clone(),
            metadata,
            trace: self.trace.clone().or(from_metadata),
            body: bytes::Bytes::copy_from_slice(self.body.get().as_bytes()),
            received_at: UNIX_EPOCH + Duration::from_millis(self.received_at_ms),
            source: self.source,
            properties: self.properties.clone(),
        }
    }
}

/// The reason of a `crashed` dead letter.
pub fn crash_reason(panic: &str) -> String {
    format!(
        "courier failed while handling this message (it panicked: {panic}); kept here instead of \
         being attempted again: please report it"
    )
}

/// What a panic said, from its payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// A dead letter's key, as listed (32 hex digits: the time it was dead-lettered and a sequence
/// number), parsed: where a paged listing goes on (`after`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LetterKey(pub(crate) [u8; 16]);

impl std::str::FromStr for LetterKey {
    type Err = String;

    fn from_str(text: &str) -> Result<LetterKey, String> {
        let bad = || format!("{text:?} is not a dead-letter key (32 hex digits, as listed)");
        if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut key = [0u8; 16];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(LetterKey(key))
    }
}

impl TryFrom<String> for LetterKey {
    type Error = String;

    fn try_from(text: String) -> Result<LetterKey, String> {
        text.parse()
    }
}

impl From<LetterKey> for String {
    fn from(key: LetterKey) -> String {
        key.to_string()
    }
}

impl std::fmt::Display for LetterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// One dead letter: what failed, why, and what is needed to deliver it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Unique, time-ordered key, in hex; what `dead-letters replay --id` takes.
    #[serde(default)]
    pub key: String,
    /// When it was dead-lettered (Unix milliseconds).
    pub at_ms: u64,
    pub kind: DeadLetterKind,
    /// The reason, for people.
    pub reason: String,
    pub source: SourceKind,
    /// The destination that failed, when there was one.
    #[serde(default)]
    pub destination: Option<String>,
    #[serde(default)]
    pub event_id: Option<String>,
    /// The transport topic or the event topic.
    #[serde(default)]
    pub topic: Option<String>,
    pub attempts: u32,
    #[serde(default)]
    pub last_status: Option<u16>,
    /// The parsed event, when parsing succeeded.
    #[serde(default)]
    pub event: Option<StoredEvent>,
    /// The raw body in base64, when parsing failed.
    #[serde(default)]
    pub raw_base64: Option<String>,
    /// Whether `raw_base64` holds only the first `service.max_payload_bytes` of a larger body.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub raw_truncated: bool,
    /// The MQTT 5 `content-type`, `response-topic` and `correlation-data` of the message, so
    /// its producer can be answered; absent when it had none (and in older records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<Box<MessageProperties>>,
}

impl DeadLetter {
    /// A message that could not be parsed: keep its bytes exactly, or their first `keep` bytes
    /// (`service.max_payload_bytes`: a 100 MB message must not become a 133 MB record; it cannot
    /// be replayed either way).
    pub fn bad_input(inbound: &crate::event::Inbound, reason: String, keep: usize) -> DeadLetter {
        let body = &inbound.body[..];
        let kept = &body[..body.len().min(keep)];
        DeadLetter {
            key: String::new(),
            at_ms: millis(SystemTime::now()),
            kind: DeadLetterKind::BadInput,
            reason,
            source: inbound.source,
            destination: None,
            event_id: None,
            topic: Some(inbound.topic.clone()),
            attempts: 0,
            last_status: None,
            event: None,
            raw_base64: Some(base64::engine::general_purpose::STANDARD.encode(kept)),
            raw_truncated: kept.len() < body.len(),
            properties: inbound.properties.clone(),
        }
    }

    /// A message whose handling panicked: its raw bytes (the first `keep` of them, as for bad
    /// input), and its event when it parsed, so that a replay can route it again.
    pub fn crashed(
        inbound: &crate::event::Inbound,
        event: Option<&Event>,
        reason: String,
        keep: usize,
    ) -> DeadLetter {
        let mut letter = DeadLetter::bad_input(inbound, reason, keep);
        letter.kind = DeadLetterKind::Crashed;
        if let Some(event) = event {
            letter.event_id = Some(event.id.clone());
            letter.topic = Some(event.topic.clone());
            letter.event = Some(StoredEvent::from_event(event));
        }
        letter
    }

    /// An attempt of `event` at `destination` that panicked: kept for that destination, where
    /// a replay sends it, rather than attempted again to panic again.
    pub fn crashed_attempt(event: &Event, destination: &str, panic: &str) -> DeadLetter {
        DeadLetter::for_event(
            event,
            DeadLetterKind::Crashed,
            Some(destination),
            crash_reason(panic),
            0,
            None,
        )
    }

    /// A parsed event that cannot go (further) to `destination`.
    pub fn for_event(
        event: &Event,
        kind: DeadLetterKind,
        destination: Option<&str>,
        reason: String,
        attempts: u32,
        last_status: Option<u16>,
    ) -> DeadLetter {
        DeadLetter {
            key: String::new(),
            at_ms: millis(SystemTime::now()),
            kind,
            reason,
            source: event.source,
            destination: destination.map(str::to_string),
            event_id: Some(event.id.clone()),
            topic: Some(event.topic.clone()),
            attempts,
            last_status,
            event: Some(StoredEvent::from_event(event)),
            raw_base64: None,
            raw_truncated: false,
            properties: event.properties.clone(),
        }
    }

    /// The raw body of a bad-input letter.
    pub fn raw(&self) -> Option<Vec<u8>> {
        self.raw_base64
            .as_ref()
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
    }
}

/// Unix milliseconds.
pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record written before courier kept trace context still reads; a `traceparent` it
    /// kept in its metadata becomes its trace context instead of a header to forward.
    #[test]
    fn records_without_trace_context_still_read() {
        let old = r#"{"id":"e","topic":"t","eligible_for_retry":true,
            "metadata":{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01","x":"y"},
            "body":{},"received_at_ms":0,"source":"rabbitmq"}"#;
        let stored: StoredEvent = serde_json::from_str(old).expect("old record");
        assert_eq!(stored.trace, None);
        let event = stored.to_event();
        let trace = event
            .trace
            .as_ref()
            .expect("trace context from the metadata");
        assert_eq!(trace.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(event.metadata.keys().collect::<Vec<_>>(), ["x"]);
        let again = StoredEvent::from_event(&event);
        let json = serde_json::to_string(&again).expect("serialise");
        assert!(
            json.contains(r#""trace":{"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736""#),
            "{json}"
        );
        let back: StoredEvent = serde_json::from_str(&json).expect("read back");
        assert_eq!(back.to_event().trace, event.trace);
    }
}
