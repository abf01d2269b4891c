//! Bad configurations fail before courier connects anywhere, with a message that names the key.

use courier::Config;

const SOURCE: &str = r#"
[rabbitmq]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
queue = "q"
"#;

fn err(text: &str) -> String {
    match Config::from_toml(text) {
        Ok(_) => panic!("config should be rejected:\n{text}"),
        Err(e) => e.to_string(),
    }
}

fn with_dest(dest: &str) -> String {
    format!("{SOURCE}\n[[destinations]]\nname = \"a\"\nurl = \"http://127.0.0.1:1/x\"\n{dest}\n")
}

#[test]
fn unknown_keys_are_named() {
    let e = err(&format!("{SOURCE}\n[service]\nmax_inflight = 3\n"));
    assert!(e.contains("max_inflight") && e.contains("service"), "{e}");
    let e = err(&with_dest("tls_verfy = false"));
    assert!(e.contains("tls_verfy"), "{e}");
    let e = err(&format!("{}\n[bogus]\nx = 1\n", with_dest("")));
    assert!(e.contains("bogus"), "{e}");
}

#[test]
fn bad_values_name_the_key() {
    let cases = [
        (with_dest("").replace("http://127.0.0.1:1/x", "/relative"), "destinations[0].url", "relative URL without a base"),
        (with_dest("").replace("http://127.0.0.1:1/x", "ftp://h/x"), "destinations[0].url", "not http or https"),
        (with_dest("topics = [\"a.b*\"]"), "destinations[0].topics[0]", "whole segment"),
        (with_dest("topics = []"), "destinations[0].topics", "is empty"),
        (with_dest("headers = { \"X-Request-Id\" = \"x\" }"), "destinations[0].headers.X-Request-Id", "cannot be overridden"),
        (with_dest("headers = { \"bad header\" = \"x\" }"), "destinations[0].headers.bad header", "not a valid HTTP header name"),
        (with_dest("auth = { type = \"api_key\", header = \"Authorization\", key = \"k\" }"), "destinations[0].auth.header", "contract header"),
        (with_dest("auth = { type = \"basic\", username = \"a\", password = \"${COURIER_TEST_UNSET_SECRET}\" }"), "destinations[0].auth.password", "COURIER_TEST_UNSET_SECRET is not set"),
        (with_dest("timeout = \"0s\""), "destinations[0].timeout", "longer than 0s"),
        (with_dest("tenant = \"\""), "destinations[0].tenant", "must not be empty"),
        (format!("{}\n[[destinations]]\nname = \"a\"\nurl = \"http://h/\"\n", with_dest("")), "destinations[1].name", "duplicate destination name"),
        (with_dest("").replace("amqp://guest", "http://guest"), "rabbitmq.url", "not an amqp"),
        (with_dest("").replace("queue = \"q\"", "queue = \"\""), "rabbitmq.queue", "must not be empty"),
        (format!("{}\n[service]\nmax_in_flight = 0\n", with_dest("")), "service.max_in_flight", "at least 1"),
        (SOURCE.to_string(), "destinations", "at least one"),
        (with_dest("").replace("[rabbitmq]", "[other]"), "", "other"),
    ];
    for (text, key, what) in cases {
        let e = err(&text);
        assert!(
            e.contains(key) && e.contains(what),
            "want {key:?} and {what:?} in: {e}"
        );
    }
}

#[test]
fn wrong_types_name_the_key() {
    let e = err(&format!(
        "{}\n[service]\nmax_in_flight = \"many\"\n",
        with_dest("")
    ));
    assert!(e.contains("service.max_in_flight"), "{e}");
    let e = err(&with_dest("timeout = \"soon\""));
    assert!(e.contains("timeout"), "{e}");
    let e = err(&with_dest("auth = { type = \"oauth\" }"));
    assert!(e.contains("oauth"), "{e}");
}

#[test]
fn the_example_config_is_valid() {
    for file in ["config.toml", "docker/config.toml"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let c = Config::load(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(c.rabbitmq.is_some(), "{file}");
        assert!(!c.destinations.is_empty(), "{file}");
    }
}
