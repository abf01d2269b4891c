//! Standard Webhooks signatures (`webhook-id`, `webhook-timestamp`, `webhook-signature`), so a
//! partner can check that a request came from courier and was not altered or replayed.

use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The HMAC key of a destination's `signing_secret`, decoded and keyed once when the
/// configuration is loaded, so signing a request cannot fail. Never printed: `Debug` and
/// `Serialize` show `***`.
#[derive(Clone)]
pub struct SigningKey {
    /// The decoded secret, kept to compare keys (a reload keeps unchanged destinations).
    key: Vec<u8>,
    /// HMAC-SHA256 already keyed with `key`; each request signs with a copy of it.
    mac: HmacSha256,
}

impl PartialEq for SigningKey {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for SigningKey {}

impl SigningKey {
    /// A Standard Webhooks secret: base64 after an optional `whsec_` prefix. The error text
    /// completes `destinations[i].signing_secret: ...`.
    pub fn parse(secret: &str) -> Result<SigningKey, String> {
        let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
        let key = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| {
                "must be whsec_ followed by base64 (the Standard Webhooks secret format)"
                    .to_string()
            })?;
        if key.is_empty() {
            return Err("is empty".into());
        }
        use hmac::Mac as _;
        let mac = HmacSha256::new_from_slice(&key)
            .map_err(|e| format!("cannot key HMAC-SHA256 with it: {e}"))?;
        Ok(SigningKey { key, mac })
    }

    /// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, as Standard Webhooks receivers
    /// verify it.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        use hmac::Mac as _;
        let mut mac = self.mac.clone();
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        let digest = mac.finalize().into_bytes();
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(digest)
        )
    }
}

/// The `webhook-signature` value for `keys`: one `v1,<signature>` per key, in the order given,
/// separated by spaces as the Standard Webhooks specification allows, so a receiver that knows
/// any one of the secrets accepts the request (a secret can be rotated without a gap).
pub fn signature_header(keys: &[SigningKey], id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut header = String::with_capacity(keys.len() * 48);
    for key in keys {
        if !header.is_empty() {
            header.push(' ');
        }
        header.push_str(&key.sign(id, timestamp, body));
    }
    header
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl<'de> Deserialize<'de> for SigningKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let secret = String::deserialize(d)?;
        SigningKey::parse(&secret).map_err(serde::de::Error::custom)
    }
}

impl Serialize for SigningKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_test_vector() {
        // The vector of the Standard Webhooks / Svix reference libraries.
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("valid");
        assert_eq!(
            key.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert_eq!(
            SigningKey::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("valid"),
            key
        );
        assert!(SigningKey::parse("whsec_not base64!").is_err());
        assert!(SigningKey::parse("whsec_").is_err());
        assert_eq!(format!("{key:?}"), "\"***\"");
    }

    #[test]
    fn one_signature_per_key_space_separated() {
        let new = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("valid");
        let old = SigningKey::parse("whsec_c2VjcmV0LW9sZA==").expect("valid");
        let (id, ts, body) = (
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        let header = signature_header(&[new.clone(), old.clone()], id, ts, body);
        assert_eq!(
            header,
            format!("{} {}", new.sign(id, ts, body), old.sign(id, ts, body))
        );
        assert_eq!(
            signature_header(std::slice::from_ref(&new), id, ts, body),
            new.sign(id, ts, body)
        );
    }
}
