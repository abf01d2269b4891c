//! The shared dedup record in Redis, for replicas that consume the same queue or shared
//! subscription: a message redelivered to another replica after a crash must still be recognised.
//! Retries and dead letters stay in each replica's own store.
//!
//! Keys are `<prefix><destination>\0<event id>` set with `SET NX EX <dedup_ttl>`, so Redis
//! expires them itself. Durability is Redis's own (AOF/RDB settings); see docs/operations.md.

use std::time::Duration;

use tokio::sync::OnceCell;

use super::StoreError;
use crate::backoff::ReconnectBackoff;
use crate::config::{redact_url, StoreConfig};
use crate::shutdown::Shutdown;

/// A Redis that holds the dedup record. The connection is made on first use, or by
/// [`RedisDedup::connect`] before the worker takes messages.
pub(super) struct RedisDedup {
    client: redis::Client,
    /// The URL without its password, for logs and errors.
    shown: String,
    connection: OnceCell<redis::aio::ConnectionManager>,
    prefix: String,
    ttl_secs: u64,
}

impl RedisDedup {
    /// The Redis of `config`; connects to nothing yet.
    pub(super) fn new(config: &StoreConfig) -> Result<RedisDedup, StoreError> {
        Ok(RedisDedup {
            client: config.redis_client().map_err(StoreError::Redis)?,
            shown: redact_url(config.redis_url.expose()),
            connection: OnceCell::new(),
            prefix: config.redis_prefix.clone(),
            ttl_secs: config.dedup_ttl.as_secs().max(1),
        })
    }

    /// Connects, retrying with backoff until it works or the stop is requested.
    pub(super) async fn connect(&self, shutdown: &Shutdown) -> Result<(), StoreError> {
        let mut backoff =
            ReconnectBackoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            match self.connection().await {
                Ok(_) => {
                    tracing::info!(url = %self.shown, "dedup in Redis");
                    return Ok(());
                }
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(url = %self.shown, %error, retry_in = ?delay, "cannot reach Redis for dedup; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.requested() => return Err(error),
                    }
                }
            }
        }
    }

    async fn connection(&self) -> Result<redis::aio::ConnectionManager, StoreError> {
        self.connection
            .get_or_try_init(|| redis::aio::ConnectionManager::new(self.client.clone()))
            .await
            .cloned()
            .map_err(|e| StoreError::Redis(format!("{}: {e}", self.shown)))
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
        let mut conn = self.connection().await?;
        redis::cmd("EXISTS")
            .arg(self.key(destination, event_id))
            .query_async::<u64>(&mut conn)
            .await
            .map(|n| n > 0)
            .map_err(|e| StoreError::Redis(e.to_string()))
    }

    /// Remembers a 2xx delivery; durable as Redis keeps it when this returns.
    pub(super) async fn record(&self, destination: &str, event_id: &str) -> Result<(), StoreError> {
        let mut conn = self.connection().await?;
        redis::cmd("SET")
            .arg(self.key(destination, event_id))
            .arg(1)
            .arg("NX")
            .arg("EX")
            .arg(self.ttl_secs)
            .query_async::<Option<String>>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| StoreError::Redis(e.to_string()))
    }
}
