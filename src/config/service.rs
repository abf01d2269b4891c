//! `[service]`, `[organization]` and `[admin]`: the settings of the worker as a whole.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Secret, MAX_PERMITS};

/// Limits for the whole worker.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// Events in delivery at once, over all sources. Bounds memory and open requests.
    pub max_in_flight: usize,
    /// How long a graceful shutdown waits for in-flight deliveries before leaving them unacked.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Bodies larger than this are dead-lettered unparsed, so one huge message cannot exhaust memory.
    pub max_payload_bytes: usize,
    /// Threads of the async runtime of `courier run`; unset, one per core (or tokio's
    /// `TOKIO_WORKER_THREADS`). One suits a sidecar: a lone worker thread wakes no other, which
    /// saves more CPU at moderate rates than a second thread gains.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<usize>,
}

/// The most `service.worker_threads` takes: far more than any machine courier runs on needs.
pub const MAX_WORKER_THREADS: usize = 256;

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            max_in_flight: 256,
            shutdown_timeout: Duration::from_secs(30),
            max_payload_bytes: 1024 * 1024,
            worker_threads: None,
        }
    }
}

impl ServiceConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_in_flight == 0 {
            return Err(ConfigError::invalid(
                "service.max_in_flight",
                "must be at least 1",
            ));
        }
        if self.max_in_flight > MAX_PERMITS {
            return Err(ConfigError::invalid(
                "service.max_in_flight",
                format!("must be at most {MAX_PERMITS}"),
            ));
        }
        if self.max_payload_bytes == 0 {
            return Err(ConfigError::invalid(
                "service.max_payload_bytes",
                "must be at least 1",
            ));
        }
        match self.worker_threads {
            Some(0) => Err(ConfigError::invalid(
                "service.worker_threads",
                "must be at least 1",
            )),
            Some(n) if n > MAX_WORKER_THREADS => Err(ConfigError::invalid(
                "service.worker_threads",
                format!("must be at most {MAX_WORKER_THREADS}"),
            )),
            _ => Ok(()),
        }
    }
}

/// The sender's identity, copied into the `Metadata` block when a destination asks for it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrganizationConfig {
    /// `Metadata.OrganizationID`.
    pub id: String,
    /// `Metadata.OrganizationName`.
    pub name: String,
    /// `Metadata.OrganizationURL`.
    pub url: String,
    /// `Metadata.SourceEnvironment`.
    pub environment: String,
}

/// The admin HTTP port: health, and the dead-letter commands of a running worker.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `host:port` to listen on, e.g. `127.0.0.1:9464`; absent means no admin port. The
    /// `courier dead-letters` commands use it to reach a worker that holds the store.
    pub listen: Option<String>,
    /// The bearer token the dead-letter endpoints require (`Authorization: Bearer <token>`).
    /// Without one they answer only on a loopback `listen` address: their bodies are partner
    /// data, and replay and purge change the store.
    pub token: Option<Secret>,
}

impl AdminConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(listen) = &self.listen {
            listen.parse::<std::net::SocketAddr>().map_err(|_| {
                ConfigError::invalid(
                    "admin.listen",
                    format!("{listen:?} is not an IP:port address such as 127.0.0.1:9464 (host names are not accepted)"),
                )
            })?;
        }
        if let Some(token) = &self.token {
            if token.expose().is_empty() {
                return Err(ConfigError::invalid(
                    "admin.token",
                    "must not be empty; remove the key to allow the dead-letter endpoints on a loopback address only",
                ));
            }
            if !token.expose().bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError::invalid(
                    "admin.token",
                    "must be printable ASCII without spaces (it is sent in an HTTP header)",
                ));
            }
        }
        Ok(())
    }

    /// Whether `listen` is a loopback address, reachable from this machine only.
    pub fn is_loopback(&self) -> bool {
        self.listen
            .as_deref()
            .and_then(|l| l.parse::<std::net::SocketAddr>().ok())
            .is_some_and(|a| a.ip().is_loopback())
    }
}
