//! What an HTTP status means for a delivery: delivered, worth another attempt, or final. The
//! default table, and a destination's own rules over it (`success_on`, `retry_on`, `final_on`),
//! parsed once when the configuration is loaded.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What an answer with a given status makes of an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Delivered: the dedup record is written.
    Success,
    /// A failure worth another attempt.
    Retryable,
    /// A failure that another attempt will not cure: a dead letter.
    Final,
}

/// The default: 2xx delivered; 408, 429 and 5xx retryable; everything else final.
pub fn default_verdict(code: u16) -> Verdict {
    match code {
        200..=299 => Verdict::Success,
        408 | 429 | 500..=599 => Verdict::Retryable,
        _ => Verdict::Final,
    }
}

/// One entry of `retry_on`, `final_on` or `success_on`: a status code (`404`) or a class
/// (`"4xx"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusMatch {
    /// One status code, 100 to 599.
    Code(u16),
    /// Every code of this hundred: `Class(4)` is `"4xx"`.
    Class(u16),
}

impl StatusMatch {
    /// Parses `404`, `"404"` or `"4xx"` (`X` in either case). The error text completes
    /// `destinations[i].retry_on[j]: ...`.
    pub fn parse(text: &str) -> Result<StatusMatch, String> {
        let bytes = text.as_bytes();
        if let [d @ b'1'..=b'5', x, y] = bytes {
            if x.eq_ignore_ascii_case(&b'x') && y.eq_ignore_ascii_case(&b'x') {
                return Ok(StatusMatch::Class(u16::from(d - b'0')));
            }
        }
        match text.parse::<i64>() {
            Ok(code) => StatusMatch::code(code),
            Err(_) => Err(format!("{text:?} {EXPECTED}")),
        }
    }

    fn code(code: i64) -> Result<StatusMatch, String> {
        match u16::try_from(code) {
            Ok(code @ 100..=599) => Ok(StatusMatch::Code(code)),
            _ => Err(format!("{code} {EXPECTED}")),
        }
    }
}

const EXPECTED: &str = "is not a status code from 100 to 599 or a class \"1xx\" to \"5xx\"";

impl fmt::Display for StatusMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatusMatch::Code(c) => write!(f, "{c}"),
            StatusMatch::Class(class) => write!(f, "\"{class}xx\""),
        }
    }
}

impl<'de> Deserialize<'de> for StatusMatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = StatusMatch;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a status code such as 404 or a class such as \"4xx\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<StatusMatch, E> {
                StatusMatch::code(v).map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<StatusMatch, E> {
                StatusMatch::code(i64::try_from(v).unwrap_or(i64::MAX)).map_err(E::custom)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<StatusMatch, E> {
                StatusMatch::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl Serialize for StatusMatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            StatusMatch::Code(c) => s.serialize_u16(c),
            StatusMatch::Class(class) => s.serialize_str(&format!("{class}xx")),
        }
    }
}

/// A destination's rules over the default table.
#[derive(Debug, Clone, Copy)]
pub struct StatusRules<'a> {
    pub success_on: &'a [StatusMatch],
    pub retry_on: &'a [StatusMatch],
    pub final_on: &'a [StatusMatch],
}

impl StatusRules<'_> {
    /// The verdict for `code`: a list that names the code itself wins, then a list that names
    /// its class, then the default table.
    pub fn verdict(&self, code: u16) -> Verdict {
        let lists = [
            (self.success_on, Verdict::Success),
            (self.retry_on, Verdict::Retryable),
            (self.final_on, Verdict::Final),
        ];
        let exact = StatusMatch::Code(code);
        let class = StatusMatch::Class(code / 100);
        for wanted in [exact, class] {
            for (list, verdict) in lists {
                if list.contains(&wanted) {
                    return verdict;
                }
            }
        }
        default_verdict(code)
    }

    /// The first code or class named in two lists, as `(list, entry, other list)`: a code may
    /// be in one list only, and so may a class (a code in one list and its class in another is
    /// fine: the code wins).
    pub fn overlap(&self) -> Option<(&'static str, StatusMatch, &'static str)> {
        let lists = [
            ("retry_on", self.retry_on),
            ("final_on", self.final_on),
            ("success_on", self.success_on),
        ];
        for (i, (name, list)) in lists.iter().enumerate() {
            for (earlier, earlier_list) in &lists[..i] {
                if let Some(entry) = list.iter().find(|m| earlier_list.contains(m)) {
                    return Some((name, *entry, earlier));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_table() {
        for (code, want) in [
            (200, Verdict::Success),
            (204, Verdict::Success),
            (301, Verdict::Final),
            (400, Verdict::Final),
            (404, Verdict::Final),
            (408, Verdict::Retryable),
            (409, Verdict::Final),
            (429, Verdict::Retryable),
            (500, Verdict::Retryable),
            (501, Verdict::Retryable),
            (599, Verdict::Retryable),
        ] {
            assert_eq!(default_verdict(code), want, "{code}");
        }
    }

    #[test]
    fn a_code_beats_its_class_and_the_default() {
        let retry_on = [
            StatusMatch::Code(404),
            StatusMatch::Code(409),
            StatusMatch::Class(5),
        ];
        let final_on = [StatusMatch::Code(501)];
        let success_on = [StatusMatch::Code(202)];
        let rules = StatusRules {
            success_on: &success_on,
            retry_on: &retry_on,
            final_on: &final_on,
        };
        assert_eq!(rules.verdict(404), Verdict::Retryable);
        assert_eq!(rules.verdict(409), Verdict::Retryable);
        assert_eq!(rules.verdict(501), Verdict::Final);
        assert_eq!(rules.verdict(503), Verdict::Retryable);
        assert_eq!(rules.verdict(400), Verdict::Final);
        assert_eq!(rules.verdict(200), Verdict::Success);
        assert!(rules.overlap().is_none());

        let final_on = [StatusMatch::Class(4)];
        let success_on = [StatusMatch::Code(409)];
        let rules = StatusRules {
            success_on: &success_on,
            retry_on: &[],
            final_on: &final_on,
        };
        assert_eq!(rules.verdict(409), Verdict::Success);
        assert_eq!(
            rules.verdict(408),
            Verdict::Final,
            "the class beats the default"
        );
    }

    #[test]
    fn overlaps_are_named() {
        let retry_on = [StatusMatch::Code(409), StatusMatch::Class(5)];
        let success_on = [StatusMatch::Code(409)];
        let rules = StatusRules {
            success_on: &success_on,
            retry_on: &retry_on,
            final_on: &[],
        };
        assert_eq!(
            rules.overlap(),
            Some(("success_on", StatusMatch::Code(409), "retry_on"))
        );
        let final_on = [StatusMatch::Class(5)];
        let rules = StatusRules {
            success_on: &[],
            retry_on: &retry_on,
            final_on: &final_on,
        };
        let (list, entry, other) = rules.overlap().expect("5xx twice");
        assert_eq!(
            (list, entry.to_string(), other),
            ("final_on", "\"5xx\"".into(), "retry_on")
        );
    }

    #[test]
    fn parsing() {
        assert_eq!(StatusMatch::parse("4xx"), Ok(StatusMatch::Class(4)));
        assert_eq!(StatusMatch::parse("5XX"), Ok(StatusMatch::Class(5)));
        assert_eq!(StatusMatch::parse("404"), Ok(StatusMatch::Code(404)));
        assert!(StatusMatch::parse("6xx").is_err());
        assert!(StatusMatch::parse("99").is_err());
        assert!(StatusMatch::parse("600").is_err());
        assert!(StatusMatch::parse("4x").is_err());
        assert!(StatusMatch::parse("client errors").is_err());
    }
}
