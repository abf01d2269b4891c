//! The `courier` binary: exit codes, and a clean exit on SIGTERM.

use std::time::Duration;

use crate::support::*;

#[test]
fn validate_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, config: ConfigBuilder| {
        let path = dir.path().join(name);
        std::fs::write(&path, config.toml()).unwrap();
        path
    };
    let rabbit = |url: &str| {
        ConfigBuilder::new(dir.path().join("store"))
            .rabbitmq(Rabbit::queue("q").url("amqp://127.0.0.1"))
            .destination(Dest::new("a", url))
    };
    let good = write("good.toml", rabbit("http://127.0.0.1/"));
    let (code, out, err) = run_cli(&["validate"], &good);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("sources: rabbitmq"));
    let both = write(
        "both.toml",
        rabbit("http://127.0.0.1/").mqtt(Mqtt::new("c", "t/#")),
    );
    let (_, out, _) = run_cli(&["validate"], &both);
    assert!(out.contains("sources: rabbitmq, mqtt"), "{out}");

    let bad = write("bad.toml", rabbit("not a url"));
    for sub in ["validate", "run"] {
        let (code, _, err) = run_cli(&[sub], &bad);
        assert_eq!(code, 2, "{sub}");
        assert!(err.contains("destinations[0].url"), "{sub}: {err}");
    }
    let (code, _, _) = run_cli(&["validate"], "/nonexistent/courier.toml".as_ref());
    assert_eq!(code, 2);

    // Environment overrides reach the config (and are validated like the file).
    let out = courier_command()
        .args(["validate", "--config"])
        .arg(&good)
        .env("COURIER_SERVICE__MAX_IN_FLIGHT", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("service.max_in_flight"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    rx.set_delay(Duration::from_millis(200));
    let queue = unique("sigterm");
    let dir = tempfile::tempdir().unwrap();
    // The password comes from the environment, through the config's ${VAR} expansion.
    let config = ConfigBuilder::new(dir.path().join("store"))
        .shutdown_timeout(Duration::from_secs(10))
        .rabbitmq(Rabbit::queue(&queue))
        .destination(Dest::new("s", &rx.url("/s")).basic_auth("u", "${COURIER_TEST_PW}"));
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    publish_events(&pub_, &queue, "s", 0..20).await;
    let mut child = spawn_launch(
        launch(&config, dir.path())
            .env("COURIER_TEST_PW", "pw-should-not-be-logged")
            .rust_log("debug"),
    );
    rx.wait_for(3, Duration::from_secs(20)).await;
    assert!(child.sigterm());
    let exit = child
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("courier did not exit after SIGTERM");
    let logs = std::fs::read_to_string(child.log()).unwrap();
    assert_eq!(exit.code(), Some(0), "logs:\n{logs}");
    assert!(logs.contains("shutdown requested"), "{logs}");
    assert!(
        !logs.contains("pw-should-not-be-logged"),
        "secret in logs:\n{logs}"
    );
    // Whatever was not delivered is back in the queue, nothing is stuck unacked.
    let delivered = rx.delivered_counts().len() as u64;
    let (ready, unacked) = Publisher::counts(&queue);
    assert_eq!(unacked, 0);
    assert_eq!(
        ready + delivered,
        20,
        "delivered {delivered}, ready {ready}"
    );
}
