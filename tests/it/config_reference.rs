//! docs/config-reference.toml cannot drift from the code: it must load, and its keys must be
//! exactly the keys the configuration structs know (checked by serialising what was loaded).

use std::collections::BTreeSet;

use courier::Config;

/// Maps whose keys are user data (header names, queue argument names), not configuration keys.
const USER_MAPS: &[&str] = &[
    "destinations[].headers",
    "destinations[].auth.extra_params",
    "rabbitmq.queue_arguments",
];

/// The reference, with the TLS files it names (under `/etc/courier/tls/`) made in a directory of
/// their own; the directory lives as long as the returned guard.
fn reference_text() -> (String, tempfile::TempDir) {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/config-reference.toml"
    ))
    .expect("docs/config-reference.toml exists");
    let dir = tempfile::tempdir().expect("temporary directory");
    let ca = courier_testkit::TestCa::new("reference CA");
    ca.write(dir.path(), "ca.pem");
    ca.client("courier").write(dir.path(), "courier");
    let text = text.replace("/etc/courier/tls/", &format!("{}/", dir.path().display()));
    (text, dir)
}

/// Every key path of `v` (`a.b`, `list[].c`) into `out`, not descending into [`USER_MAPS`].
fn walk_json(v: &serde_json::Value, path: String, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(map) if !USER_MAPS.contains(&path.as_str()) => {
            for (k, v) in map {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                out.insert(p.clone());
                walk_json(v, p, out);
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                walk_json(item, format!("{path}[]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn the_reference_loads_and_names_exactly_the_keys_the_code_knows() {
    let (text, _files) = reference_text();
    let config =
        Config::from_toml(&text).unwrap_or_else(|e| panic!("docs/config-reference.toml: {e}"));

    let mut code_keys = BTreeSet::new();
    walk_json(
        &serde_json::to_value(&config).expect("serialise"),
        String::new(),
        &mut code_keys,
    );

    // The file as the config crate reads it, before courier's types see it.
    let raw: serde_json::Value = config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize())
        .expect("reference parses as TOML");
    let mut doc_keys = BTreeSet::new();
    walk_json(&raw, String::new(), &mut doc_keys);

    let undocumented: Vec<_> = code_keys.difference(&doc_keys).collect();
    let unknown: Vec<_> = doc_keys.difference(&code_keys).collect();
    assert!(
        undocumented.is_empty(),
        "keys the code knows but docs/config-reference.toml does not show: {undocumented:?}"
    );
    assert!(
        unknown.is_empty(),
        "keys in the reference the code does not know: {unknown:?}"
    );
    // Every auth scheme is shown.
    for key in [
        "destinations[].auth.key",
        "destinations[].auth.password",
        "destinations[].auth.token",
        "destinations[].auth.client_secret",
    ] {
        assert!(doc_keys.contains(key), "no {key} in the reference");
    }
}

#[test]
fn serialised_config_hides_secrets() {
    let (text, _files) = reference_text();
    let config = Config::from_toml(&text).expect("loads");
    let dumped = serde_json::to_string(&config).expect("serialise");
    assert!(
        !dumped.contains("change-me") && !dumped.contains("whsec_"),
        "{dumped}"
    );
}
