//! Commands on the machine's brokers: `rabbitmqctl`, and stopping and starting Mosquitto.

use std::time::{Duration, Instant};

/// Runs `rabbitmqctl` and returns its stdout, panicking with its stderr on failure.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs (is RabbitMQ installed? scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mosquitto_port_open() -> bool {
    std::net::TcpStream::connect_timeout(
        &"127.0.0.1:1883".parse().expect("addr"),
        Duration::from_millis(200),
    )
    .is_ok()
}

fn wait_mosquitto_port(open: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while mosquitto_port_open() != open {
        assert!(
            Instant::now() < deadline,
            "Mosquitto port never became open={open}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts Mosquitto as scripts/test.sh does, with no file descriptor of this process but stdin,
/// stdout and stderr: a daemon keeps what it inherits for as long as it runs, such as the lock
/// of `flock LOCK scripts/test.sh`, which would then never be released.
const START_MOSQUITTO: &str = r#"
for fd in /proc/$$/fd/*; do
    fd=${fd##*/}
    if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi
done 2>/dev/null
mkdir -p /run/mosquitto && chown mosquitto /run/mosquitto
exec mosquitto -d -c /etc/mosquitto/mosquitto.conf
"#;

/// Stops the machine's Mosquitto with `signal` (TERM: it saves its persistent sessions first),
/// waits `down_for`, and starts it again with the same command as scripts/test.sh. Blocking.
pub fn restart_mosquitto(signal: &str, down_for: Duration) {
    let path = format!(
        "{}:/usr/sbin:/sbin",
        std::env::var("PATH").unwrap_or_default()
    );
    let status = std::process::Command::new("pkill")
        .args([&format!("-{signal}"), "-x", "mosquitto"])
        .status()
        .expect("pkill");
    assert!(status.success(), "no mosquitto process to stop");
    wait_mosquitto_port(false);
    std::thread::sleep(down_for);
    let status = std::process::Command::new("bash")
        .args(["-c", START_MOSQUITTO])
        .env("PATH", path)
        .status()
        .expect("start mosquitto");
    assert!(status.success(), "mosquitto did not start again");
    wait_mosquitto_port(true);
}
