//! What the fuzz targets check, shared by `fuzz/fuzz_targets/*.rs` (nightly, cargo-fuzz) and
//! `tests/fuzz_seeds.rs` (stable), which replays the committed seeds and regressions.
//!
//! Every check panics on a violation; a panic is what libFuzzer reports as a crash.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use courier::config::{DestinationConfig, Format};
use courier::event::{
    self, BadInput, Event, Inbound, SourceKind, MAX_ID_BYTES, MAX_METADATA_KEYS, MAX_NESTING,
};
use courier::router::Router;
use courier::topic::TopicPattern;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// `service.max_payload_bytes` for the main parse: larger than any fuzz input.
const MAX_PAYLOAD: usize = 1 << 20;
/// A second, tiny limit, to check that the size is refused before anything else.
const SMALL_PAYLOAD: usize = 16;

/// A transport a body can arrive over: source, topic name / routing key, AMQP `message_id`,
/// string headers.
struct Transport {
    source: SourceKind,
    topic: &'static str,
    message_id: Option<&'static str>,
    headers: &'static [(&'static str, &'static str)],
}

const TRANSPORTS: &[Transport] = &[
    // MQTT 3.1.1: a `/` topic name, no message id, no headers.
    Transport {
        source: SourceKind::Mqtt,
        topic: "tempo/events/batch/batch_run_status",
        message_id: None,
        headers: &[],
    },
    // RabbitMQ: a `.` routing key, a message_id property and string headers.
    Transport {
        source: SourceKind::Rabbitmq,
        topic: "tempo.batch.batch_run_status",
        message_id: Some("amqp-mid-1"),
        headers: &[("x-trace", "t1"), ("EventType", "Batch")],
    },
    // RabbitMQ with an empty routing key (fanout exchange): "no topic".
    Transport {
        source: SourceKind::Rabbitmq,
        topic: "",
        message_id: None,
        headers: &[],
    },
];

/// Parses `body` in every format from every transport; panics when an invariant breaks.
pub fn check_parse(body: &[u8]) {
    let body = Bytes::copy_from_slice(body);
    // The reference view of the body: `None` when serde_json's own tree parser cannot tell
    // (nesting over its recursion limit; `parse` only skims, so it has no such limit).
    let reference = reference_value(&body);
    for transport in TRANSPORTS {
        let inbound = |format| Inbound {
            source: transport.source,
            format,
            body: body.clone(),
            topic: transport.topic.to_string(),
            message_id: transport.message_id.map(str::to_string),
            headers: transport
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            received_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            properties: None,
            expiry: None,
        };
        let mut results = Vec::with_capacity(3);
        for format in [Format::Envelope, Format::Raw, Format::Auto] {
            let inbound = inbound(format);
            let result = event::parse(&inbound, MAX_PAYLOAD);
            assert_eq!(
                result,
                event::parse_carefully(&inbound, MAX_PAYLOAD),
                "the one-pass parse and the careful one disagree"
            );
            // The size limit comes first: over it, the verdict is TooLarge whatever the bytes.
            let small = event::parse(&inbound, SMALL_PAYLOAD);
            if body.len() > SMALL_PAYLOAD {
                assert_eq!(
                    small,
                    Err(BadInput::TooLarge {
                        size: body.len(),
                        max: SMALL_PAYLOAD
                    })
                );
            } else {
                assert_eq!(small, result, "the limit changed a verdict under it");
            }
            if let Ok(event) = &result {
                let envelope = match format {
                    Format::Envelope => Some(true),
                    Format::Raw => Some(false),
                    Format::Auto => reference
                        .as_ref()
                        .ok()
                        .and_then(|r| r.as_ref())
                        .map(auto_is_envelope),
                };
                check_event(&inbound, event, envelope, &reference);
            }
            results.push(result);
        }
        // `auto` is exactly `envelope` or `raw`, as the documented rule decides.
        if let Ok(Some(object)) = &reference {
            let expected = if auto_is_envelope(object) {
                &results[0]
            } else {
                &results[1]
            };
            assert_eq!(&results[2], expected, "auto chose the other format");
        }
    }
}

/// `Ok(Some(object))`, `Ok(None)` when serde_json's tree cannot represent the body (see
/// [`unrepresentable`]), or `Err` when the body is certainly not a JSON object, so every parse
/// must fail.
fn reference_value(body: &[u8]) -> Result<Option<Map<String, Value>>, ()> {
    let Ok(text) = std::str::from_utf8(body) else {
        return Err(());
    };
    if has_serde_marker(body) {
        return Ok(None);
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(()),
        Err(e) if unrepresentable(&e) => Ok(None),
        Err(_) => Err(()),
    }
}

/// Whether a string in `json` spells one of serde_json's private marker keys
/// (`$serde_json::private::Number`, `$serde_json::private::RawValue`). With the
/// `arbitrary_precision` and `raw_value` features courier enables, serde_json's `Value` reads
/// an object whose first key is one of them as a number or as embedded JSON (found by this
/// fuzzer), so `Value` is no reference for such a body. `parse` only skims, so it is unaffected.
fn has_serde_marker(json: &[u8]) -> bool {
    const MARKER: &str = "$serde_json::private::";
    if !json.contains(&b'\\') {
        return json.windows(MARKER.len()).any(|w| w == MARKER.as_bytes());
    }
    // Escapes can spell the marker: decode every string literal.
    let mut i = 0;
    while i < json.len() {
        if json[i] == b'"' {
            let start = i;
            i += 1;
            while i < json.len() && json[i] != b'"' {
                i += if json[i] == b'\\' { 2 } else { 1 };
            }
            let literal = &json[start..(i + 1).min(json.len())];
            if serde_json::from_slice::<String>(literal).is_ok_and(|s| s.starts_with(MARKER)) {
                return true;
            }
        }
        i += 1;
    }
    false
}

/// Errors of serde_json's tree parser for text that is JSON all the same: nesting over its
/// recursion limit, and `\u` escapes of lone UTF-16 surrogates (RFC 8259 section 8.2 allows
/// them; they cannot become a Rust `String`). `parse` only skims the body, so it takes both.
fn unrepresentable(e: &serde_json::Error) -> bool {
    let text = e.to_string();
    text.contains("recursion limit")
        || text.contains("lone leading surrogate")
        || text.contains("unexpected end of hex escape")
}

/// The documented `auto` rule: a `data` key (any value) and a non-null `id`, `topic` or
/// `tenant_id`.
fn auto_is_envelope(object: &Map<String, Value>) -> bool {
    let non_null = |k: &str| object.get(k).is_some_and(|v| !v.is_null());
    object.contains_key("data") && (non_null("id") || non_null("topic") || non_null("tenant_id"))
}

/// What every parsed event must satisfy, then the fields the reference view predicts.
fn check_event(
    inbound: &Inbound,
    event: &Event,
    envelope: Option<bool>,
    reference: &Result<Option<Map<String, Value>>, ()>,
) {
    let Ok(reference) = reference else {
        panic!("parsed a body that is not a JSON object: {event:?}");
    };
    // The id: non-empty, bounded, and a valid HTTP header value (it becomes X-Request-Id).
    assert!(!event.id.is_empty(), "empty id");
    assert!(
        event.id.len() <= MAX_ID_BYTES,
        "id of {} bytes",
        event.id.len()
    );
    assert!(
        event.id.bytes().all(|b| (0x20..0x7f).contains(&b)),
        "id with control or non-ASCII bytes: {:?}",
        event.id
    );
    assert!(
        reqwest::header::HeaderValue::from_str(&event.id).is_ok(),
        "id is not a header value: {:?}",
        event.id
    );
    // The topic is concrete.
    assert!(
        !event
            .topic
            .split(['.', '/'])
            .any(|s| s == "#" || s == "+" || s == "*"),
        "wildcard topic {:?}",
        event.topic
    );
    assert!(
        !event.topic.contains('\0'),
        "NUL in topic {:?}",
        event.topic
    );
    // Metadata becomes HTTP headers; `parse` refuses envelope entries that cannot be sent (the
    // transport headers of `TRANSPORTS` are valid ones).
    assert!(event.metadata.len() <= MAX_METADATA_KEYS);
    for (name, value) in &event.metadata {
        assert!(
            reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_ok(),
            "metadata name is not a header name: {name:?}"
        );
        assert!(
            reqwest::header::HeaderValue::from_str(value).is_ok(),
            "metadata value is not a header value: {value:?}"
        );
    }
    // Nesting is bounded, so the partner's parser does not give up on it.
    assert!(
        depth(&inbound.body) <= MAX_NESTING,
        "parsed a body nested {} deep",
        depth(&inbound.body)
    );
    assert_eq!(event.source, inbound.source);
    assert_eq!(event.received_at, inbound.received_at);
    // The body is JSON, and is what the message holds, byte for byte.
    assert_json(&event.body);
    let text = std::str::from_utf8(&inbound.body).expect("parsed a non-UTF-8 body");
    let body = std::str::from_utf8(&event.body).expect("body is JSON, so UTF-8");
    match envelope {
        Some(false) => {
            assert_eq!(
                event.body, inbound.body,
                "a raw body must be sent as received"
            );
            assert_eq!(event.topic, inbound.topic);
            assert_eq!(event.tenant_id, None);
            assert_eq!(event.destination_id, None);
            assert_eq!(event.time, None);
            assert!(event.eligible_for_retry);
            assert_eq!(event.metadata, transport_metadata(inbound));
        }
        Some(true) => assert!(
            body == "{}" || text.contains(body),
            "envelope data is not a slice of the message: {body:?}"
        ),
        None => {}
    }
    let (Some(object), Some(envelope)) = (reference, envelope) else {
        return;
    };
    // The reference view, from serde_json's tree (last key wins; `parse` refuses duplicates of
    // the keys it reads, so on success the two agree).
    let string = |k: &str| match object.get(k) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => panic!("parsed although {k} is {other}"),
    };
    let explicit_id = if envelope {
        assert_eq!(
            event.topic,
            string("topic").unwrap_or_else(|| inbound.topic.clone())
        );
        assert_eq!(event.tenant_id, string("tenant_id"));
        assert_eq!(event.destination_id, string("destination_id"));
        assert_eq!(event.time, string("time"));
        assert_eq!(
            event.eligible_for_retry,
            object.get("eligible_for_retry") != Some(&Value::Bool(false))
        );
        match object.get("data") {
            None | Some(Value::Null) => assert_eq!(body, "{}"),
            Some(data) => {
                if let Ok(sent) = serde_json::from_str::<Value>(body) {
                    assert_eq!(&sent, data, "the body is not the envelope's data");
                }
            }
        }
        let mut metadata = transport_metadata(inbound);
        if let Some(Value::Object(m)) = object.get("metadata") {
            for (k, v) in m {
                match v {
                    Value::Null => {}
                    Value::String(s) => {
                        metadata.insert(k.clone(), s.clone());
                    }
                    Value::Number(_) | Value::Bool(_) => {
                        metadata.insert(k.clone(), v.to_string());
                    }
                    other => panic!("parsed although metadata.{k} is {other}"),
                }
            }
        }
        assert_eq!(event.metadata, metadata);
        reference_id(object.get("id"))
    } else {
        ["event_id", "EventID", "id"]
            .iter()
            .find_map(|k| reference_id(object.get(*k)))
    };
    let expected_id = match explicit_id {
        Some(id) => id,
        None => match inbound.message_id.as_deref() {
            Some(mid) if !mid.is_empty() => mid.to_string(),
            _ => {
                let data = if envelope { body } else { text };
                event::derive_id(&event.topic, data, event.time.as_deref())
            }
        },
    };
    assert_eq!(event.id, expected_id);
}

/// The id a field gives, per the documented rules: a non-empty string, or an integer as its
/// text; `null`, absent and `""` give none.
fn reference_id(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::Null => None,
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => {
            let text = n.to_string();
            assert!(
                text.bytes().all(|b| b.is_ascii_digit() || b == b'-'),
                "parsed although an id is the number {text}"
            );
            Some(text)
        }
        other => panic!("parsed although an id is {other}"),
    }
}

fn transport_metadata(inbound: &Inbound) -> BTreeMap<String, String> {
    inbound.headers.iter().cloned().collect()
}

/// The body is JSON: serde_json's tree parser says so, or, for what its tree cannot represent,
/// its skimmer does.
fn assert_json(body: &[u8]) {
    match serde_json::from_slice::<Value>(body) {
        Ok(_) => {}
        Err(e) if unrepresentable(&e) || has_serde_marker(body) => {
            let text = std::str::from_utf8(body).expect("UTF-8");
            assert!(
                serde_json::from_str::<&RawValue>(text).is_ok(),
                "body is not JSON: {text:?}"
            );
        }
        Err(e) => panic!(
            "body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(body)
        ),
    }
}

/// How deeply arrays and objects nest in `json` (JSON text): brackets outside strings.
fn depth(json: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut bytes = json.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'"' => {
                // Skip the string, escapes included.
                while let Some(&c) = bytes.next() {
                    match c {
                        b'\\' => {
                            bytes.next();
                        }
                        b'"' => break,
                        _ => {}
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// At most this many destinations and patterns per destination are built from one input.
const MAX_DESTINATIONS: usize = 8;
const MAX_PATTERNS: usize = 8;

/// Input, as text (lossy UTF-8): the first line is the topic; each further line is a pattern
/// of the current destination, and an empty line starts the next destination. Patterns that
/// `TopicPattern::parse` refuses are skipped, as the configuration would refuse them.
pub fn check_route(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    let mut lines = text.split('\n');
    let topic = lines.next().unwrap_or("");
    let mut destinations: Vec<Vec<TopicPattern>> = vec![Vec::new()];
    for line in lines {
        if line.is_empty() {
            if destinations.len() < MAX_DESTINATIONS {
                destinations.push(Vec::new());
            }
            continue;
        }
        let current = destinations.last_mut().expect("one at least");
        if let Ok(pattern) = TopicPattern::parse(line) {
            if current.len() < MAX_PATTERNS {
                current.push(pattern);
            }
        }
    }
    let configs: Vec<DestinationConfig> = destinations
        .iter()
        .enumerate()
        .map(|(i, topics)| {
            let mut d = template_destination().clone();
            d.name = format!("d{i}");
            d.topics = topics.clone();
            d
        })
        .collect();
    let router = Router::new(configs);
    let got: Vec<&str> = router
        .match_topic(topic)
        .into_iter()
        .map(|d| d.name.as_str())
        .collect();
    let names: Vec<String> = (0..destinations.len()).map(|i| format!("d{i}")).collect();
    let want: Vec<&str> = destinations
        .iter()
        .zip(&names)
        .filter(|(patterns, _)| {
            topic.is_empty() || patterns.iter().any(|p| reference_match(p.as_str(), topic))
        })
        .map(|(_, name)| name.as_str())
        .collect();
    assert_eq!(
        got, want,
        "topic {topic:?}, destinations' patterns {destinations:?}"
    );
}

/// A destination as the configuration builds it; only `name` and `topics` are changed.
fn template_destination() -> &'static DestinationConfig {
    static TEMPLATE: OnceLock<DestinationConfig> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let config = courier::Config::from_toml(
            "[rabbitmq]\nurl = \"amqp://127.0.0.1\"\nqueue = \"q\"\n\
             [[destinations]]\nname = \"t\"\nurl = \"http://127.0.0.1/\"\n",
        )
        .expect("template config");
        config.destinations[0].clone()
    })
}

/// The documented matching rules (docs/configuration.md, "Topic patterns"), naively: the lone
/// pattern `*` matches every topic; otherwise pattern and topic are split into segments on `.`
/// and `/`, `*` or `+` matches exactly one segment, `#` zero or more, anything else itself.
pub fn reference_match(pattern: &str, topic: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let p: Vec<&str> = pattern.split(['.', '/']).collect();
    let t: Vec<&str> = topic.split(['.', '/']).collect();
    // m[i][j]: the pattern segments p[i..] match the topic segments t[j..].
    let mut m = vec![vec![false; t.len() + 1]; p.len() + 1];
    m[p.len()][t.len()] = true;
    for i in (0..p.len()).rev() {
        for j in (0..=t.len()).rev() {
            m[i][j] = match p[i] {
                "#" => (j..=t.len()).any(|k| m[i + 1][k]),
                "*" | "+" => j < t.len() && m[i + 1][j + 1],
                literal => j < t.len() && t[j] == literal && m[i + 1][j + 1],
            };
        }
    }
    m[0][0]
}
