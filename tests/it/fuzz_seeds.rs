//! Replays the fuzz seeds (`fuzz/corpus/<target>/seed-*`) and the reproducers of what the
//! fuzzers found (`fuzz/regressions/<target>/*`) through the fuzz targets' own checks, on the
//! stable toolchain, so CI keeps them fixed. The fuzzing itself is described in fuzz/README.md.

#[allow(dead_code)]
#[path = "../../fuzz/checks.rs"]
mod checks;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

/// Every seed and regression input of `target`, by path.
fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut out = Vec::new();
    for (dir, seeds_only) in [
        (root.join("corpus").join(target), true),
        (root.join("regressions").join(target), false),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("directory entry").path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if !path.is_file() || (seeds_only && !name.starts_with("seed-")) {
                continue;
            }
            let bytes = std::fs::read(&path).expect("readable input");
            out.push((path.display().to_string(), bytes));
        }
    }
    out.sort();
    out
}

fn replay(target: &str, check: fn(&[u8])) {
    let inputs = inputs(target);
    assert!(
        inputs.len() >= 3,
        "expected the committed seeds of {target}, found {}",
        inputs.len()
    );
    let failed: Vec<&str> = inputs
        .iter()
        .filter(|(_, bytes)| catch_unwind(AssertUnwindSafe(|| check(bytes))).is_err())
        .map(|(path, _)| path.as_str())
        .collect();
    assert!(failed.is_empty(), "{target}: checks failed for {failed:#?}");
}

#[test]
fn parse_event_seeds_and_regressions() {
    replay("parse_event", checks::check_parse);
}

#[test]
fn route_topic_seeds_and_regressions() {
    replay("route_topic", checks::check_route);
}

/// The reference matcher itself, on the documented examples, so a wrong reference cannot
/// hide a wrong router.
#[test]
fn reference_matcher_follows_the_documented_examples() {
    use checks::reference_match as m;
    assert!(m("a.#", "a") && m("a.#", "a.b") && m("a.#", "a.b.c"));
    assert!(m("a.#.z", "a.z") && m("a.#.z", "a.b.c.z") && !m("a.#.z", "a.b.c"));
    assert!(m("*", "a.b.c") && m("user.*", "user.x") && !m("user.*", "user.x.y"));
    assert!(m("user/+/done", "user.x/done") && !m("+", "a.b") && m("+", "a"));
    assert!(!m("User.created", "user.created"));
}
