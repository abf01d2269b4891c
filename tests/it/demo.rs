//! scripts/demo.sh, end to end on the machine's brokers: it starts the receiver and courier with
//! config.toml, publishes one event on each source, and reports where both arrived.

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_delivers_one_event_from_each_source() {
    let _brokers = brokers().await;
    let store = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tokio::task::spawn_blocking({
        let store = store.path().to_path_buf();
        move || {
            std::process::Command::new(root.join("scripts/demo.sh"))
                .arg("--check")
                .env("COURIER_BIN", COURIER_EXE)
                .env("COURIER_STORE__PATH", store)
                .output()
                .expect("run scripts/demo.sh")
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("The RabbitMQ event demo-rabbitmq-")
            && stdout.contains("The MQTT event demo-mqtt-"),
        "{stdout}"
    );
    assert!(stdout.contains("    POST /events"), "{stdout}");
}
