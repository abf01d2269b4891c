//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): reading the `traceparent` and
//! `tracestate` an event arrived with, and writing the ones its POST carries.
//!
//! An event's trace context comes from its transport headers (AMQP headers, MQTT 5 user
//! properties) or, failing a valid one there, from its envelope's `metadata`. The transport
//! header wins: it is what a producer's OpenTelemetry instrumentation writes when it publishes,
//! while the body's metadata may be a copy made anywhere upstream. Either way the two keys leave
//! the metadata, so they never reach the partner unchanged: each attempt sends a `traceparent`
//! of its own ([`TraceContext::child`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The header that carries the trace id, the caller's span id and the flags.
pub const TRACEPARENT: &str = "traceparent";
/// The header that carries vendors' trace data, passed on unchanged.
pub const TRACESTATE: &str = "tracestate";
/// A `tracestate` longer than this is dropped. The spec asks vendors to pass on at least 512
/// characters, and every header courier sends costs every request.
pub const MAX_TRACESTATE_LEN: usize = 512;
/// A `tracestate` with more list members than this is dropped, as the spec requires.
const MAX_TRACESTATE_MEMBERS: usize = 32;
/// The flag bits version 00 defines: sampled (0x01) and, in Level 2, random (0x02). Others are
/// zeroed in what courier sends, since it sends version 00.
const KNOWN_FLAGS: u8 = 0x03;
/// The sampled flag.
pub const SAMPLED: u8 = 0x01;

/// Where an event is in a trace: the trace, the span that sent it (`parent_id`), the flags, and
/// the vendors' `tracestate`. Kept with retries and dead letters, so a later attempt continues
/// the same trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    /// 16 bytes, never all zero.
    #[serde(with = "hex16")]
    pub trace_id: [u8; 16],
    /// 8 bytes, never all zero.
    #[serde(with = "hex8")]
    pub parent_id: [u8; 8],
    /// The trace flags, reduced to the ones version 00 knows.
    pub flags: u8,
    /// A valid `tracestate`, exactly as received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

/// Why a `traceparent` or `tracestate` was not taken; logged at debug.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("traceparent {0:?} is not <version>-<trace-id>-<parent-id>-<flags> in lowercase hex")]
    Format(String),
    #[error("traceparent version ff is forbidden")]
    VersionFF,
    #[error("traceparent trace-id is all zeros")]
    ZeroTraceId,
    #[error("traceparent parent-id is all zeros")]
    ZeroParentId,
    #[error("tracestate is {0} bytes, over {MAX_TRACESTATE_LEN}")]
    TraceStateTooLong(usize),
    #[error("tracestate has {0} list members, over {MAX_TRACESTATE_MEMBERS}")]
    TraceStateTooManyMembers(usize),
    #[error("tracestate member {0:?} is not key=value as the spec defines them")]
    TraceStateMember(String),
}

impl TraceContext {
    /// Reads a `traceparent` header value. Version 00 must be exactly
    /// `00-<32 hex>-<16 hex>-<2 hex>`; a higher version (not ff) may be longer, and its first
    /// four fields are read the same way, as the spec asks of a version-00 parser.
    pub fn parse(traceparent: &str) -> Result<TraceContext, Invalid> {
        let value = traceparent.trim_matches(|c| c == ' ' || c == '\t');
        let bad = || Invalid::Format(value.chars().take(80).collect());
        let bytes = value.as_bytes();
        if bytes.len() < 55 {
            return Err(bad());
        }
        let version = hex_byte(&bytes[0..2]).ok_or_else(bad)?;
        if version == 0xff {
            return Err(Invalid::VersionFF);
        }
        if version == 0 && bytes.len() != 55 {
            return Err(bad());
        }
        // A future version may add fields, after another dash.
        if bytes.len() > 55 && bytes[55] != b'-' {
            return Err(bad());
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return Err(bad());
        }
        let mut trace_id = [0u8; 16];
        hex_into(&bytes[3..35], &mut trace_id).ok_or_else(bad)?;
        let mut parent_id = [0u8; 8];
        hex_into(&bytes[36..52], &mut parent_id).ok_or_else(bad)?;
        let flags = hex_byte(&bytes[53..55]).ok_or_else(bad)?;
        if trace_id == [0; 16] {
            return Err(Invalid::ZeroTraceId);
        }
        if parent_id == [0; 8] {
            return Err(Invalid::ZeroParentId);
        }
        Ok(TraceContext {
            trace_id,
            parent_id,
            flags: flags & KNOWN_FLAGS,
            tracestate: None,
        })
    }

    /// A new trace that courier starts: its ids are random, and it is sampled.
    pub fn fresh(trace_id: [u8; 16], parent_id: [u8; 8]) -> TraceContext {
        TraceContext {
            trace_id,
            parent_id,
            flags: SAMPLED,
            tracestate: None,
        }
    }

    /// Whether the caller asked for the trace to be recorded.
    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// The `traceparent` of a span `span_id` in this trace, a child of `parent_id`:
    /// `00-<trace id>-<span id>-<flags>`.
    pub fn child(&self, span_id: [u8; 8], flags: u8) -> String {
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        push_hex(&mut out, &self.trace_id);
        out.push('-');
        push_hex(&mut out, &span_id);
        let _ = write!(out, "-{:02x}", flags & KNOWN_FLAGS);
        out
    }

    /// The trace id in lowercase hex, as trace backends show it.
    pub fn trace_id_hex(&self) -> String {
        let mut out = String::with_capacity(32);
        push_hex(&mut out, &self.trace_id);
        out
    }
}

/// Checks a `tracestate` value: at most [`MAX_TRACESTATE_LEN`] bytes, at most 32 members, each
/// `key=value` by the spec's grammar (empty members between commas are allowed).
pub fn check_tracestate(value: &str) -> Result<(), Invalid> {
    if value.len() > MAX_TRACESTATE_LEN {
        return Err(Invalid::TraceStateTooLong(value.len()));
    }
    let mut members = 0;
    for member in value.split(',') {
        let member = member.trim_matches(|c| c == ' ' || c == '\t');
        if member.is_empty() {
            continue;
        }
        members += 1;
        let bad = || Invalid::TraceStateMember(member.chars().take(80).collect());
        let (key, val) = member.split_once('=').ok_or_else(bad)?;
        if !valid_key(key) || !valid_value(val) {
            return Err(bad());
        }
    }
    if members > MAX_TRACESTATE_MEMBERS {
        return Err(Invalid::TraceStateTooManyMembers(members));
    }
    Ok(())
}

/// `simple-key` or `tenant-id@system-id`.
fn valid_key(key: &str) -> bool {
    let part = |s: &str, max: usize, first_digit_ok: bool| {
        let b = s.as_bytes();
        !b.is_empty()
            && b.len() <= max
            && (b[0].is_ascii_lowercase() || (first_digit_ok && b[0].is_ascii_digit()))
            && b.iter().all(|&c| {
                c.is_ascii_lowercase()
                    || c.is_ascii_digit()
                    || matches!(c, b'_' | b'-' | b'*' | b'/')
            })
    };
    match key.split_once('@') {
        None => part(key, 256, false),
        Some((tenant, system)) => part(tenant, 241, true) && part(system, 14, false),
    }
}

/// 1 to 256 printable ASCII characters other than `,` and `=`, not ending in a space.
fn valid_value(value: &str) -> bool {
    let b = value.as_bytes();
    !b.is_empty()
        && b.len() <= 256
        && b.last() != Some(&b' ')
        && b.iter()
            .all(|&c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=')
}

/// Takes the trace context out of an event's `metadata`, which holds the transport headers
/// overlaid with the envelope's metadata: the transport's `traceparent` first (from `headers`),
/// then the metadata's. Both keys leave `metadata`, in any letter case, valid or not, so neither
/// is ever sent as it came. `tracestate` goes with the `traceparent` it came beside.
pub fn extract(
    headers: &[(String, String)],
    metadata: &mut BTreeMap<String, String>,
) -> Option<TraceContext> {
    let from_transport = lookup(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut from_body = None;
    if metadata.keys().any(|k| is_trace_key(k)) {
        from_body = lookup(metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        metadata.retain(|k, _| !is_trace_key(k));
    }
    from_transport.or(from_body)
}

fn is_trace_key(key: &str) -> bool {
    key.eq_ignore_ascii_case(TRACEPARENT) || key.eq_ignore_ascii_case(TRACESTATE)
}

/// The valid trace context among these pairs, if there is one.
fn lookup<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)> + Clone) -> Option<TraceContext> {
    let (_, traceparent) = pairs
        .clone()
        .find(|(k, _)| k.eq_ignore_ascii_case(TRACEPARENT))?;
    let mut context = match TraceContext::parse(traceparent) {
        Ok(c) => c,
        Err(why) => {
            tracing::debug!(reason = %why, "incoming traceparent ignored");
            return None;
        }
    };
    if let Some((_, state)) = pairs
        .clone()
        .find(|(k, _)| k.eq_ignore_ascii_case(TRACESTATE))
    {
        match check_tracestate(state) {
            Ok(()) if !state.trim().is_empty() => context.tracestate = Some(state.to_string()),
            Ok(()) => {}
            Err(why) => tracing::debug!(reason = %why, "incoming tracestate ignored"),
        }
    }
    Some(context)
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    Some(hex_val(two[0])? << 4 | hex_val(two[1])?)
}

fn hex_into(text: &[u8], out: &mut [u8]) -> Option<()> {
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = hex_byte(pair)?;
    }
    Some(())
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
}

macro_rules! hex_serde {
    ($name:ident, $n:literal) => {
        /// Stored as lowercase hex, as it travels.
        mod $name {
            pub fn serialize<S: serde::Serializer>(v: &[u8; $n], s: S) -> Result<S::Ok, S::Error> {
                let mut out = String::with_capacity($n * 2);
                super::push_hex(&mut out, v);
                s.serialize_str(&out)
            }

            pub fn deserialize<'de, D: serde::Deserializer<'de>>(
                d: D,
            ) -> Result<[u8; $n], D::Error> {
                let text = <String as serde::Deserialize>::deserialize(d)?;
                let mut out = [0u8; $n];
                if text.len() != $n * 2 || super::hex_into(text.as_bytes(), &mut out).is_none() {
                    return Err(serde::de::Error::custom(format!(
                        "expected {} lowercase hex digits",
                        $n * 2
                    )));
                }
                Ok(out)
            }
        }
    };
}
hex_serde!(hex16, 16);
hex_serde!(hex8, 8);

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn reads_the_spec_example() {
        let c = TraceContext::parse(VALID).expect("valid");
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            c.parent_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert!(c.sampled());
        let child = c.child([1, 2, 3, 4, 5, 6, 7, 8], c.flags);
        assert_eq!(
            child,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0102030405060708-01"
        );
        assert!(
            TraceContext::parse(&child).is_ok(),
            "what courier sends reads back"
        );
        let c = TraceContext::parse(" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00\t")
            .expect("optional whitespace around the value");
        assert!(!c.sampled());
    }

    #[test]
    fn refuses_what_the_spec_calls_invalid() {
        let cases = [
            ("", "empty"),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
                "no flags",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
                "00 with more",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
                "00 with a field more",
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                "uppercase trace id",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
                "uppercase parent id",
            ),
            (
                "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "version not hex",
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "version ff",
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "zero trace id",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "zero parent id",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
                "dash misplaced",
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
                "not dashes",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
                "flags not hex",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e47.6-00f067aa0ba902b7-01",
                "a dot in the trace id",
            ),
            (
                "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
                "future version without a dash after flags",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-é1",
                "not ASCII",
            ),
        ];
        for (value, why) in cases {
            assert!(
                TraceContext::parse(value).is_err(),
                "{why}: {value:?} was taken"
            );
        }
        assert_eq!(
            TraceContext::parse("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Err(Invalid::VersionFF)
        );
        assert_eq!(
            TraceContext::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            Err(Invalid::ZeroTraceId)
        );
    }

    #[test]
    fn future_versions_are_read_as_version_00() {
        let c = TraceContext::parse(
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-what-the-future-holds",
        )
        .expect("a later version with more fields");
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.flags, 0x01, "only the flags version 00 knows are kept");
        assert!(
            TraceContext::parse("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_ok()
        );
        assert!(
            c.child([9; 8], c.flags).starts_with("00-"),
            "courier sends the version it knows"
        );
    }

    #[test]
    fn tracestate_rules() {
        for ok in [
            "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
            "a=1, b=2 ,,c=3",
            "tenant1@vendor=x",
            "1tenant@vendor=x",
            "k_-*/9=a b!",
        ] {
            assert_eq!(check_tracestate(ok), Ok(()), "{ok:?}");
        }
        for bad in [
            "novalue",
            "=x",
            "Upper=x",
            "1abc=x",
            "a=b=c",
            "a=,b=1",
            "a=\u{7f}",
            "t@VENDOR=x",
            "t@vendorvendorvendor=x",
        ] {
            assert!(check_tracestate(bad).is_err(), "{bad:?} was taken");
        }
        let many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert_eq!(
            check_tracestate(&many.join(",")),
            Err(Invalid::TraceStateTooManyMembers(33))
        );
        assert_eq!(check_tracestate(&many[..32].join(",")), Ok(()));
        let long = format!("a={}", "x".repeat(MAX_TRACESTATE_LEN));
        assert!(matches!(
            check_tracestate(&long),
            Err(Invalid::TraceStateTooLong(_))
        ));
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn extract_prefers_the_transport_and_always_clears_the_metadata() {
        const BODY: &str = "00-11111111111111111111111111111111-2222222222222222-01";
        let headers = pairs(&[("traceparent", VALID), ("tracestate", "a=1"), ("x", "y")]);
        let mut metadata: BTreeMap<String, String> =
            pairs(&[("traceparent", BODY), ("TraceState", "b=2"), ("x", "y")])
                .into_iter()
                .collect();
        let c = extract(&headers, &mut metadata).expect("transport context");
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.tracestate.as_deref(), Some("a=1"));
        assert_eq!(metadata.keys().collect::<Vec<_>>(), ["x"]);

        // An invalid transport traceparent: the body's is taken, with the body's tracestate.
        let headers = pairs(&[("traceparent", "00-bad"), ("tracestate", "a=1")]);
        let mut metadata: BTreeMap<String, String> =
            pairs(&[("Traceparent", BODY), ("tracestate", "b=2")])
                .into_iter()
                .collect();
        let c = extract(&headers, &mut metadata).expect("body context");
        assert_eq!(c.trace_id_hex(), "11111111111111111111111111111111");
        assert_eq!(c.tracestate.as_deref(), Some("b=2"));
        assert!(metadata.is_empty());

        // Neither valid: none, and nothing of them left to forward.
        let headers = pairs(&[("traceparent", "00-bad")]);
        let mut metadata: BTreeMap<String, String> = headers.iter().cloned().collect();
        assert_eq!(extract(&headers, &mut metadata), None);
        assert!(metadata.is_empty());

        // A bad tracestate is dropped; the traceparent stays.
        let headers = pairs(&[("traceparent", VALID), ("tracestate", "Bad")]);
        let mut metadata = BTreeMap::new();
        let c = extract(&headers, &mut metadata).expect("context");
        assert_eq!(c.tracestate, None);
    }

    #[test]
    fn stored_as_hex() {
        let mut c = TraceContext::parse(VALID).expect("valid");
        c.tracestate = Some("a=1".into());
        let json = serde_json::to_string(&c).expect("serialise");
        assert_eq!(
            json,
            r#"{"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","parent_id":"00f067aa0ba902b7","flags":1,"tracestate":"a=1"}"#
        );
        let back: TraceContext = serde_json::from_str(&json).expect("read back");
        assert_eq!(back, c);
        assert!(serde_json::from_str::<TraceContext>(
            r#"{"trace_id":"xyz","parent_id":"00f067aa0ba902b7","flags":1}"#
        )
        .is_err());
    }
}
