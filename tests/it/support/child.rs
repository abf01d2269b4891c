//! Servers of a test's own (a TLS Mosquitto, a TLS Redis) run as child processes beside the
//! machine's shared ones, on free ports of 127.0.0.1.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the command with none of this process's file descriptors but stdin, stdout and stderr
/// (see tools/testkit/src/brokers.rs), in the foreground so that the test owns the process.
const START: &str = r#"
for fd in /proc/$$/fd/*; do
    fd=${fd##*/}
    if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi
done 2>/dev/null
exec "$@"
"#;

/// Starts `program` with `args`, its output in `log`; `package` names the Debian package that
/// scripts/test.sh installs it from, for the panic when it is missing.
pub fn start(program: &str, args: &[&str], log: &Path, package: &str) -> Child {
    let log = std::fs::File::create(log).expect("log file");
    let path = format!(
        "{}:/usr/sbin:/sbin",
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("bash")
        .args(["-c", START, "start", program])
        .args(args)
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {program} (scripts/test.sh installs {package}): {e}"))
}

/// Kills the process and waits for it.
pub fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits until a TCP connect to 127.0.0.1:`port` succeeds (`open`) or fails; `what` names the
/// server in the panic.
pub fn wait_port(what: &str, port: u16, open: bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() != open {
        assert!(
            Instant::now() < deadline,
            "{what} never became open={open} on port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
