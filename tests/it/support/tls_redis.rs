//! A Redis of the test's own, beside the machine's one on 6379: a TLS port that requires a client
//! certificate (`tls-auth-clients yes`) and a password, and a plain port (same password) for the
//! test to look at what courier wrote. Nothing is kept on disk.

use std::path::{Path, PathBuf};
use std::process::Child;

use courier_testkit::{free_port, Issued, TestCa};

use super::child::{start, stop, wait_port};

/// The server; stopped when dropped.
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

    /// A connection to the plain port.
    pub async fn plain(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(format!(
            "redis://:{}@127.0.0.1:{}/0",
            self.password, self.plain_port
        ))
        .expect("redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test's Redis on its plain port")
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
