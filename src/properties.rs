//! What an MQTT 5 PUBLISH says about its message besides the body and the user properties (which
//! become headers, like AMQP headers): the properties kept with the event so that an operator
//! reading a dead letter can answer its producer, and the expiry courier applies before the POST.

use std::fmt;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::config::ExpiredAction;

/// The MQTT 5 properties kept with an event and its dead letter. They are never sent to a
/// destination: they describe the MQTT exchange, not the event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageProperties {
    /// `content-type`, as the producer set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// `response-topic`: where the producer expects an answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_topic: Option<String>,
    /// `correlation-data`: the producer's key for matching an answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_data: Option<CorrelationData>,
}

impl MessageProperties {
    /// The properties, or `None` when the message carried none of them (no record grows for a
    /// message without them).
    pub fn non_empty(self) -> Option<Box<MessageProperties>> {
        (self != MessageProperties::default()).then(|| Box::new(self))
    }
}

/// `content_type=... response_topic=... correlation_data=text:...|base64:...`, the set ones only:
/// how `courier dead-letters list` shows them.
impl fmt::Display for MessageProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        if let Some(v) = &self.content_type {
            write!(f, "content_type={v}")?;
            sep = " ";
        }
        if let Some(v) = &self.response_topic {
            write!(f, "{sep}response_topic={v}")?;
            sep = " ";
        }
        match &self.correlation_data {
            Some(CorrelationData::Text(v)) => write!(f, "{sep}correlation_data=text:{v}"),
            Some(CorrelationData::Base64(v)) => write!(f, "{sep}correlation_data=base64:{v}"),
            None => Ok(()),
        }
    }
}

/// MQTT 5 correlation data is bytes; kept readable when it is text. Serialised as
/// `{"text": "..."}` or `{"base64": "..."}`, so the record says which.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CorrelationData {
    /// The bytes were UTF-8: the text itself.
    Text(String),
    /// Any other bytes, in standard base64.
    Base64(String),
}

impl CorrelationData {
    /// Text when `bytes` is UTF-8, else base64.
    pub fn from_bytes(bytes: &[u8]) -> CorrelationData {
        match std::str::from_utf8(bytes) {
            Ok(text) => CorrelationData::Text(text.to_string()),
            Err(_) => {
                CorrelationData::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            }
        }
    }
}

/// An MQTT 5 `message-expiry-interval`, counted from when courier received the message (the
/// broker sends what is left of the producer's interval).
#[derive(Debug, Clone, Copy)]
pub struct Expiry {
    /// The interval the broker sent.
    pub interval: Duration,
    /// When it runs out.
    pub deadline: Instant,
    /// What becomes of the message once it has.
    pub action: ExpiredAction,
}

impl Expiry {
    /// The interval `seconds`, received now.
    pub fn starting_now(seconds: u32, action: ExpiredAction) -> Expiry {
        let interval = Duration::from_secs(seconds.into());
        Expiry {
            interval,
            deadline: Instant::now() + interval,
            action,
        }
    }

    /// Whether the interval has run out.
    pub fn has_passed(&self) -> bool {
        Instant::now() >= self.deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlation_data_is_text_when_it_can_be() {
        assert_eq!(
            CorrelationData::from_bytes(b"req-7"),
            CorrelationData::Text("req-7".into())
        );
        assert_eq!(
            CorrelationData::from_bytes(&[0xff, 0x00, 0x01]),
            CorrelationData::Base64("/wAB".into())
        );
        let json = serde_json::to_string(&CorrelationData::Base64("/wAB".into())).unwrap();
        assert_eq!(json, r#"{"base64":"/wAB"}"#);
    }

    #[test]
    fn no_properties_no_record() {
        assert!(MessageProperties::default().non_empty().is_none());
        let some = MessageProperties {
            content_type: Some("application/json".into()),
            ..MessageProperties::default()
        };
        assert!(some.non_empty().is_some());
    }

    #[test]
    fn shown_as_keys_and_values() {
        let all = MessageProperties {
            content_type: Some("application/json".into()),
            response_topic: Some("replies/7".into()),
            correlation_data: Some(CorrelationData::Base64("/wAB".into())),
        };
        assert_eq!(
            all.to_string(),
            "content_type=application/json response_topic=replies/7 correlation_data=base64:/wAB"
        );
        let one = MessageProperties {
            correlation_data: Some(CorrelationData::Text("req-7".into())),
            ..MessageProperties::default()
        };
        assert_eq!(one.to_string(), "correlation_data=text:req-7");
    }

    #[test]
    fn expiry_counts_from_receipt() {
        assert!(Expiry::starting_now(0, ExpiredAction::Deliver).has_passed());
        assert!(!Expiry::starting_now(60, ExpiredAction::Deliver).has_passed());
    }
}
