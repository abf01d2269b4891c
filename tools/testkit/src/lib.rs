//! What courier's integration tests (`tests/it`) and `courier-bench` share, with no dependency on
//! the courier crate itself:
//!
//! - [`receiver`]: the recording HTTP receiver partners are played by, and [`BlackHole`];
//! - [`config`]: a typed builder that renders courier's TOML configuration;
//! - [`pki`]: a CA, server and client certificates for TLS tests;
//! - [`process`]: the `courier` binary as a child process (kill -9, RSS and CPU from `/proc`);
//! - [`amqp`], [`mqtt`], [`brokers`]: publishers for the machine's RabbitMQ and Mosquitto, and
//!   the commands that inspect or restart them;
//! - [`servers`]: servers of a test's own beside those, such as a Redis over TLS.

pub mod amqp;
pub mod brokers;
pub mod config;
pub mod mqtt;
pub mod pki;
pub mod process;
pub mod receiver;
pub mod servers;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use amqp::{Publisher, AMQP_URL};
pub use brokers::{rabbitmqctl, restart_mosquitto};
pub use config::{
    Auth, Circuit, ConfigBuilder, Dest, Mqtt, MqttProtocol, OAuth2, Rabbit, Retry, Tls, Tracing,
    REDIS_URL,
};
pub use mqtt::{Mqtt5Publisher, MqttPublisher, MqttPublisherOptions};
pub use pki::{Issued, TestCa};
pub use process::{CourierProcess, Launch};
pub use receiver::{BlackHole, Receiver, Recorded, Recording};
pub use servers::TlsRedis;

/// Makes ring the process-wide rustls provider, as courier does, for the clients and the TLS
/// receiver; calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        now_ns(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Nanoseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A port on 127.0.0.1 that was free a moment ago (for admin ports).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Polls `cond` until it holds, or panics with `what`.
pub async fn eventually(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Which broker a benchmark case or measurement feeds courier from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Rabbitmq,
    Mqtt,
}

impl Source {
    /// The name printed in figures.
    pub fn name(self) -> &'static str {
        match self {
            Source::Rabbitmq => "RabbitMQ",
            Source::Mqtt => "MQTT",
        }
    }

    /// A short tag for queue, topic and directory names.
    pub fn tag(self) -> &'static str {
        match self {
            Source::Rabbitmq => "amqp",
            Source::Mqtt => "mqtt",
        }
    }
}
