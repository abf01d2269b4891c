//! Servers of a test's own, run as child processes beside the machine's shared ones on free
//! ports of 127.0.0.1: the helpers that start and stop them, and [`TlsRedis`], a Redis with a
//! TLS port that requires a client certificate, for the tests and the benchmark's `--dedup
//! rediss`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, Issued, TestCa};

/// Runs the command with none of this process's file descriptors but stdin, stdout and stderr
/// (see [`crate::brokers`]), in the foreground so that the test owns the process.
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

/// A Redis with a TLS port that requires a client certificate (`tls-auth-clients yes`) and a
/// password, and a plain port (same password) to look at what courier wrote. Nothing is kept on
/// disk. Stopped when dropped.
pub struct TlsRedis {
    /// The TLS port (client certificate required).
    pub tls_port: u16,
    /// The plain port, for the test.
    pub plain_port: u16,
    /// The password both ports ask for.
    pub password: String,
    /// The files of the server's certificate, its key and the client CA, and the directory.
    files: [PathBuf; 4],
    child: Child,
}

impl TlsRedis {
    /// Starts it in `dir` with `server`'s certificate, requiring client certificates issued by
    /// `client_ca` and the password `password`.
    pub fn start(dir: &Path, server: &Issued, client_ca: &TestCa, password: &str) -> TlsRedis {
        let (cert, key) = server.write(dir, "redis-server");
        let ca = client_ca.write(dir, "redis-client-ca.pem");
        let files = [cert, key, ca, dir.to_path_buf()];
        let (tls_port, plain_port) = (free_port(), free_port());
        let child = launch(&files, tls_port, plain_port, password);
        TlsRedis {
            tls_port,
            plain_port,
            password: password.to_string(),
            files,
            child,
        }
    }

    /// `rediss://:<password>@127.0.0.1:<tls port>/0`.
    pub fn url(&self) -> String {
        format!("rediss://:{}@127.0.0.1:{}/0", self.password, self.tls_port)
    }

    /// Stops it and starts it again on the same ports, empty (a failover, or a restart of a
    /// Redis that keeps nothing).
    pub fn restart(&mut self) {
        stop(&mut self.child);
        wait_port("the test's Redis", self.tls_port, false);
        self.child = launch(&self.files, self.tls_port, self.plain_port, &self.password);
    }
}

fn launch(files: &[PathBuf; 4], tls_port: u16, plain_port: u16, password: &str) -> Child {
    let [cert, key, ca, dir] = files.each_ref().map(|p| p.to_string_lossy().into_owned());
    let (tls, plain) = (tls_port.to_string(), plain_port.to_string());
    #[rustfmt::skip]
    let args = [
        "--bind", "127.0.0.1",
        "--port", &plain,
        "--tls-port", &tls,
        "--tls-cert-file", &cert,
        "--tls-key-file", &key,
        "--tls-ca-cert-file", &ca,
        "--tls-auth-clients", "yes",
        "--requirepass", password,
        "--save", "",
        "--appendonly", "no",
        "--dir", &dir,
    ];
    let child = start(
        "redis-server",
        &args,
        &files[3].join("redis.log"),
        "redis-server",
    );
    wait_port("the test's Redis", tls_port, true);
    wait_port("the test's Redis", plain_port, true);
    child
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}
