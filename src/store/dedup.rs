//! The shared dedup record in Redis, for replicas that consume the same queue or shared
//! subscription: a message redelivered to another replica after a crash must still be recognised.
//! Retries and dead letters stay in each replica's own store.
//!
//! Keys are `<prefix><destination>\0<event id>` set with `SET NX EX <dedup_ttl>`, so Redis
//! expires them itself. Durability is Redis's own (AOF/RDB settings); see docs/operations.md.
//! The connection, plain or TLS, is [`RedisLink`]'s.

use std::time::Duration;

use super::redis_link::RedisLink;
use super::StoreError;
use crate::backoff::ReconnectBackoff;
use crate::config::StoreConfig;
use crate::shutdown::Shutdown;

/// A Redis that holds the dedup record. The connection is made on first use, or by
/// [`RedisDedup::connect`] before the worker takes messages.
pub(super) struct RedisDedup {
    link: RedisLink,
    prefix: String,
    ttl_secs: u64,
}

impl RedisDedup {
    /// The Redis of `config`; connects to nothing yet.
    pub(super) fn new(config: &StoreConfig) -> Result<RedisDedup, StoreError> {
        Ok(RedisDedup {
            link: RedisLink::new(config)?,
            prefix: config.redis_prefix.clone(),
            ttl_secs: config.dedup_ttl.as_secs().max(1),
        })
    }

    /// Connects, retrying with backoff until it works or the stop is requested.
    pub(super) async fn connect(&self, shutdown: &Shutdown) -> Result<(), StoreError> {
        let mut backoff =
            ReconnectBackoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            match self.link.connection().await {
                Ok(_) => {
                    tracing::info!(url = %self.link.shown(), "dedup in Redis");
                    return Ok(());
                }
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, retry_in = ?delay, "cannot reach Redis for dedup; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.requested() => return Err(error),
                    }
                }
            }
        }
    }

    /// Why Redis has not been reached since start, while it has not (for `/readyz`, while
    /// [`RedisDedup::connect`] holds the worker back).
    pub(super) fn unreachable(&self) -> Option<String> {
        self.link.unreachable()
    }

    fn key(&self, destination: &str, event_id: &str) -> Vec<u8> {
        let mut key =
            Vec::with_capacity(self.prefix.len() + destination.len() + 1 + event_id.len());
        key.extend_from_slice(self.prefix.as_bytes());
        key.extend_from_slice(destination.as_bytes());
        key.push(0);
        key.extend_from_slice(event_id.as_bytes());
        key
    }

    /// Whether `event_id` already reached `destination` with a 2xx (within the TTL).
    pub(super) async fn is_delivered(
        &self,
        destination: &str,
        event_id: &str,
    ) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("EXISTS");
        cmd.arg(self.key(destination, event_id));
        self.link.query::<u64>(&cmd).await.map(|n| n > 0)
    }

    /// Remembers a 2xx delivery; durable as Redis keeps it when this returns.
    pub(super) async fn record(&self, destination: &str, event_id: &str) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(destination, event_id))
            .arg(1)
            .arg("NX")
            .arg("EX")
            .arg(self.ttl_secs);
        self.link.query::<Option<String>>(&cmd).await.map(|_| ())
    }
}
