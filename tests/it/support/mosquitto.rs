//! A Mosquitto of the test's own, beside the machine's one on 1883: a TLS listener that requires
//! a client certificate (`require_certificate true`), and a plain listener on another port for
//! the test's publisher. Both on free ports of 127.0.0.1, so the shared broker is not disturbed.

use std::path::{Path, PathBuf};
use std::process::Child;

use courier_testkit::{free_port, Issued, TestCa};

use courier_testkit::servers::{start, stop, wait_port};

/// The broker; stopped when dropped.
pub struct TlsMosquitto {
    /// The TLS listener (client certificate required).
    pub tls_port: u16,
    /// The plain listener, for the publisher.
    pub plain_port: u16,
    dir: PathBuf,
    child: Child,
}

impl TlsMosquitto {
    /// Starts it in `dir` (which must be readable by the `mosquitto` user, as Mosquitto started
    /// by root drops to it) with `server`'s certificate, requiring client certificates issued by
    /// `client_ca`.
    pub fn start(dir: &Path, server: &Issued, client_ca: &TestCa) -> TlsMosquitto {
        let (tls_port, plain_port) = (free_port(), free_port());
        let child = launch(dir, tls_port, plain_port, server, client_ca);
        TlsMosquitto {
            tls_port,
            plain_port,
            dir: dir.to_path_buf(),
            child,
        }
    }

    /// `mqtts://127.0.0.1:<tls port>`.
    pub fn url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.tls_port)
    }

    /// Stops it and starts it again on the same ports, now requiring client certificates of
    /// `client_ca` (a broker whose CA was rotated).
    pub fn restart(&mut self, server: &Issued, client_ca: &TestCa) {
        stop(&mut self.child);
        wait_port("the test's Mosquitto", self.tls_port, false);
        self.child = launch(&self.dir, self.tls_port, self.plain_port, server, client_ca);
    }
}

impl Drop for TlsMosquitto {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

fn launch(dir: &Path, tls_port: u16, plain_port: u16, server: &Issued, ca: &TestCa) -> Child {
    readable(dir);
    let ca_file = ca.write(dir, "broker-client-ca.pem");
    let (cert, key) = server.write(dir, "broker");
    for file in [&ca_file, &cert, &key] {
        readable(file);
    }
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "per_listener_settings false\n\
             allow_anonymous true\n\
             persistence false\n\
             log_dest stderr\n\
             listener {plain_port} 127.0.0.1\n\
             listener {tls_port} 127.0.0.1\n\
             cafile {}\n\
             certfile {}\n\
             keyfile {}\n\
             require_certificate true\n",
            ca_file.display(),
            cert.display(),
            key.display()
        ),
    )
    .expect("write mosquitto.conf");
    readable(&conf);
    let child = start(
        "mosquitto",
        &["-c", &conf.to_string_lossy()],
        &dir.join("mosquitto.log"),
        "mosquitto",
    );
    wait_port("the test's Mosquitto", tls_port, true);
    wait_port("the test's Mosquitto", plain_port, true);
    child
}

/// Readable by everyone: Mosquitto started as root reads its files as the `mosquitto` user.
fn readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = if path.is_dir() { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}
