//! Verifying courier's signatures the way a partner does: with the Standard Webhooks reference
//! library (`standardwebhooks` from PyPI, which scripts/test.sh installs), through
//! `verify_standard_webhooks.py`. Where Python or the package is missing, the reference
//! algorithm below stands in, unless `COURIER_REQUIRE_STANDARDWEBHOOKS` is set (scripts/test.sh
//! sets it once the package is installed), in which case the test fails instead.

use std::io::Write as _;
use std::process::{Command, Stdio};

use base64::Engine as _;
use courier_testkit::Recorded;

/// Which verifier judged a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verifier {
    /// The `standardwebhooks` Python package.
    Reference,
    /// The port of its algorithm below.
    Algorithm,
}

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/it/support/verify_standard_webhooks.py"
);

/// Whether `request` verifies with `secret`, and which verifier said so.
pub fn verify(secret: &str, request: &Recorded) -> (Verifier, Result<(), String>) {
    let input = serde_json::json!({
        "headers": {
            "webhook-id": request.header("webhook-id").unwrap_or_default(),
            "webhook-timestamp": request.header("webhook-timestamp").unwrap_or_default(),
            "webhook-signature": request.header("webhook-signature").unwrap_or_default(),
        },
        "body_base64": base64::engine::general_purpose::STANDARD.encode(&request.body),
    });
    match run_script(secret, &input.to_string()) {
        Some((0, _)) => (Verifier::Reference, Ok(())),
        Some((1, out)) => (Verifier::Reference, Err(out)),
        other => {
            assert!(
                std::env::var_os("COURIER_REQUIRE_STANDARDWEBHOOKS").is_none(),
                "the standardwebhooks reference library is required but did not run: {other:?}"
            );
            (Verifier::Algorithm, verify_by_algorithm(secret, request))
        }
    }
}

/// Exit code and output of the script, or `None` when Python cannot be started.
fn run_script(secret: &str, input: &str) -> Option<(i32, String)> {
    let mut child = Command::new("python3")
        .arg(SCRIPT)
        .arg(secret)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(input.as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.code().unwrap_or(-1), text.trim().to_string()))
}

/// The reference libraries' verification: HMAC-SHA256 over `id.timestamp.body` with the key
/// after `whsec_`, compared with each space-separated `v1,` signature of the header.
fn verify_by_algorithm(secret: &str, request: &Recorded) -> Result<(), String> {
    use hmac::Mac as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .map_err(|e| format!("secret: {e}"))?;
    let id = request.header("webhook-id").ok_or("no webhook-id")?;
    let ts = request
        .header("webhook-timestamp")
        .ok_or("no webhook-timestamp")?;
    let header = request
        .header("webhook-signature")
        .ok_or("no webhook-signature")?;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).map_err(|e| e.to_string())?;
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&request.body);
    let expected = format!("v1,{}", b64.encode(mac.finalize().into_bytes()));
    if header.split(' ').any(|s| s == expected) {
        Ok(())
    } else {
        Err("No matching signature found".into())
    }
}
