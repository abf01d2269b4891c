//! The topic grammar, in one place: how a topic splits into segments, what a destination's
//! pattern may say, what an MQTT subscription filter may say, what makes an event's topic
//! concrete, and the `EventType`/`EventTrigger` a topic implies.
//!
//! AMQP routing keys use `.` and MQTT topics use `/`; courier treats both as segment separators,
//! so one pattern serves events from either source.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The characters that separate topic segments.
const SEPARATORS: [char; 2] = ['.', '/'];

/// The segments of `topic`, split at `.` and `/`.
pub fn segments(topic: &str) -> impl DoubleEndedIterator<Item = &str> {
    topic.split(SEPARATORS)
}

/// One segment of a [`TopicPattern`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Matches this exact segment.
    Literal(Box<str>),
    /// `*` or `+`: exactly one segment.
    One,
    /// `#`: zero or more segments.
    Many,
}

/// A destination's topic pattern, checked once when the configuration is loaded so matching
/// never meets a malformed one.
///
/// `*` or `+` stands for one segment and `#` for any number; the lone pattern `*` matches every
/// topic, however many segments it has.
#[derive(Clone, PartialEq, Eq)]
pub struct TopicPattern {
    text: String,
    segments: Vec<Segment>,
}

impl TopicPattern {
    /// Parses a pattern; the error text completes `destinations[i].topics[j]: ...`.
    pub fn parse(text: &str) -> Result<TopicPattern, String> {
        if text.is_empty() {
            return Err("empty pattern; use \"*\" for every topic".to_string());
        }
        let segments = segments(text)
            .map(|segment| match segment {
                "*" | "+" => Ok(Segment::One),
                "#" => Ok(Segment::Many),
                s if s.contains(['#', '*', '+']) => Err(format!(
                    "{text:?}: a wildcard must be a whole segment, found {s:?}"
                )),
                s => Ok(Segment::Literal(s.into())),
            })
            .collect::<Result<_, _>>()?;
        Ok(TopicPattern {
            text: text.to_string(),
            segments,
        })
    }

    /// The lone `*`, which matches every topic: what a destination without `topics` takes.
    pub fn every_topic() -> TopicPattern {
        TopicPattern {
            text: "*".to_string(),
            segments: vec![Segment::One],
        }
    }

    /// Whether this is the lone `*`, which matches every topic whatever its length.
    pub fn matches_everything(&self) -> bool {
        self.text == "*"
    }

    /// The segments, in order.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The pattern as configured.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Debug for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

impl fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for TopicPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        TopicPattern::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Serialize for TopicPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

/// Checks an MQTT subscription filter: `#` only as the whole last level, `+` only as a whole
/// level (MQTT 3.1.1 section 4.7.1). The broker would refuse anything else, later and less clearly.
pub fn check_mqtt_filter(filter: &str) -> Result<(), String> {
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

/// Checks an event's topic. Wildcards are for patterns: a topic that contained one would match
/// patterns it was never meant to.
pub fn check_concrete(topic: &str) -> Result<(), String> {
    if segments(topic).any(|s| s == "#" || s == "+" || s == "*") {
        return Err(format!(
            "{topic:?} contains a wildcard segment (#, + or *); a topic must be concrete"
        ));
    }
    if topic.contains('\0') {
        return Err("contains a NUL character".into());
    }
    Ok(())
}

/// The `EventType` and `EventTrigger` of the `Metadata` block, from the topic: the trigger is its
/// last segment, the type the segment before it with an upper case first letter
/// (`tempo.batch.batch_run_status` → `Batch`, `batch_run_status`). A one-segment topic gives
/// both from that segment.
pub fn type_and_trigger(topic: &str) -> (String, String) {
    let mut segments = segments(topic).rev().filter(|s| !s.is_empty());
    let trigger = segments.next().unwrap_or("").to_string();
    let kind = segments.next().unwrap_or(&trigger);
    let mut chars = kind.chars();
    let kind = match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    };
    (kind, trigger)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(TopicPattern::parse("").is_err());
        assert!(TopicPattern::parse("a.b*").is_err());
        assert!(TopicPattern::parse("a.#x").is_err());
        let p = TopicPattern::parse("a.#.b/+/*").expect("valid");
        assert_eq!(
            p.segments(),
            [
                Segment::Literal("a".into()),
                Segment::Many,
                Segment::Literal("b".into()),
                Segment::One,
                Segment::One
            ]
        );
        assert!(!p.matches_everything());
        assert!(TopicPattern::parse("*")
            .expect("valid")
            .matches_everything());
        assert_eq!(TopicPattern::parse("*"), Ok(TopicPattern::every_topic()));
    }

    #[test]
    fn mqtt_filters() {
        assert!(check_mqtt_filter("a/+/b/#").is_ok());
        assert!(check_mqtt_filter("#").is_ok());
        assert!(check_mqtt_filter("a/#/b").is_err());
        assert!(check_mqtt_filter("a/b+").is_err());
        assert!(check_mqtt_filter("").is_err());
    }

    #[test]
    fn concrete_topics() {
        assert!(check_concrete("a.b/c").is_ok());
        assert!(check_concrete("").is_ok());
        assert!(check_concrete("a.#").is_err());
        assert!(check_concrete("a/+/b").is_err());
        assert!(check_concrete("a\0b").is_err());
    }

    #[test]
    fn type_and_trigger_from_topic() {
        assert_eq!(
            type_and_trigger("tempo.batch.batch_run_status"),
            ("Batch".into(), "batch_run_status".into())
        );
        assert_eq!(
            type_and_trigger("tempo/events/equipment/status"),
            ("Equipment".into(), "status".into())
        );
        assert_eq!(type_and_trigger("ping"), ("Ping".into(), "ping".into()));
        assert_eq!(type_and_trigger(""), (String::new(), String::new()));
    }
}
