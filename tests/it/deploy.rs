//! The Kubernetes manifests of deploy/kubernetes: each one valid against the Kubernetes schemas
//! (kubernetes-validate, offline, strict), and each ConfigMap's courier configuration valid for
//! `courier validate`. scripts/test.sh provides the validator and names its Python in
//! `COURIER_PYTHON`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;

fn python() -> String {
    std::env::var("COURIER_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn manifests() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/kubernetes exists")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "manifests: {files:?}");
    files
}

#[test]
fn every_manifest_is_valid_against_the_kubernetes_schemas() {
    let out = Command::new(python())
        .args(["-m", "kubernetes_validate", "--strict", "--quiet"])
        .args(manifests())
        .output()
        .expect("run kubernetes-validate (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_configmap_config_passes_courier_validate() {
    // Prints the file name, a NUL, and the config, for each ConfigMap's config.toml.
    let script = r#"
import sys, yaml
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        if doc and doc.get("kind") == "ConfigMap" and "config.toml" in doc.get("data", {}):
            sys.stdout.write(doc["metadata"]["name"] + "\0" + doc["data"]["config.toml"] + "\0")
"#;
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(manifests())
        .output()
        .expect("run python3 with PyYAML");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let parts: Vec<&str> = text.split('\0').filter(|p| !p.is_empty()).collect();
    assert!(
        parts.len() >= 4,
        "two ConfigMaps with a config.toml each: {parts:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    for pair in parts.chunks(2) {
        let (name, config) = (pair[0], pair[1]);
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        // The values the Secret and the downward API give the container.
        let out = courier_command()
            .args(["validate", "--config"])
            .arg(&path)
            .env(
                "AMQP_URL",
                "amqp://courier:pw@rabbitmq.messaging.svc:5672/%2f",
            )
            .env("REDIS_URL", "redis://:pw@redis.messaging.svc:6379/0")
            .env("PARTNER_PASSWORD", "pw")
            .env("COURIER_ADMIN_TOKEN", "token")
            .env("POD_NAME", "courier-0")
            .output()
            .expect("run courier validate");
        assert!(
            out.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
