//! Which event already reached which destination: the local sled tree, or Redis when several
//! replicas share one queue (a message redelivered to another replica after a crash must still be
//! recognised). Retries and dead letters stay in each replica's own store either way.
//!
//! Redis keys are `<prefix><destination>\0<event id>` set with `SET NX EX <dedup_ttl>`, so Redis
//! expires them itself. Durability is Redis's own (AOF/RDB settings); see docs/operations.md.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{DedupBackend, StoreConfig};
use crate::store::{Store, StoreError};

/// The dedup record, local or shared.
#[derive(Clone)]
pub enum Dedup {
    /// The sled tree of this process's store.
    Local(Arc<Store>),
    /// A Redis shared by the replicas.
    Redis {
        conn: redis::aio::ConnectionManager,
        prefix: String,
        ttl_secs: u64,
    },
}

impl Dedup {
    /// The configured backend. Connecting to Redis is retried until it works or `stop`.
    pub async fn open(
        config: &StoreConfig,
        store: Arc<Store>,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<Dedup, StoreError> {
        match config.dedup {
            DedupBackend::Sled => Ok(Dedup::Local(store)),
            DedupBackend::Redis => {
                let url = config.redis_url.expose();
                let shown = crate::config::redact_url(url);
                let client = redis::Client::open(url)
                    .map_err(|e| StoreError::Redis(format!("{shown}: {e}")))?;
                let mut backoff = crate::backoff::ReconnectBackoff::new(
                    Duration::from_millis(200),
                    Duration::from_secs(10),
                );
                loop {
                    match redis::aio::ConnectionManager::new(client.clone()).await {
                        Ok(conn) => {
                            tracing::info!(url = %shown, "dedup in Redis");
                            return Ok(Dedup::Redis {
                                conn,
                                prefix: config.redis_prefix.clone(),
                                ttl_secs: config.dedup_ttl.as_secs().max(1),
                            });
                        }
                        Err(error) => {
                            let delay = backoff.next_delay();
                            tracing::warn!(url = %shown, %error, retry_in = ?delay, "cannot reach Redis for dedup; retrying");
                            tokio::select! {
                                _ = tokio::time::sleep(delay) => {}
                                _ = stop.cancelled() => return Err(StoreError::Redis(format!("{shown}: {error}"))),
                            }
                        }
                    }
                }
            }
        }
    }

    fn key(prefix: &str, destination: &str, event_id: &str) -> Vec<u8> {
        let mut key = Vec::with_capacity(prefix.len() + destination.len() + 1 + event_id.len());
        key.extend_from_slice(prefix.as_bytes());
        key.extend_from_slice(destination.as_bytes());
        key.push(0);
        key.extend_from_slice(event_id.as_bytes());
        key
    }

    /// Whether `event_id` already reached `destination` with a 2xx (within the TTL).
    pub async fn is_delivered(
        &self,
        destination: &str,
        event_id: &str,
    ) -> Result<bool, StoreError> {
        match self {
            Dedup::Local(store) => store.is_delivered(destination, event_id),
            Dedup::Redis { conn, prefix, .. } => {
                let mut conn = conn.clone();
                redis::cmd("EXISTS")
                    .arg(Self::key(prefix, destination, event_id))
                    .query_async::<u64>(&mut conn)
                    .await
                    .map(|n| n > 0)
                    .map_err(|e| StoreError::Redis(e.to_string()))
            }
        }
    }

    /// Remembers a 2xx delivery (sled: durable after the next commit; Redis: when this returns).
    pub async fn record(&self, destination: &str, event_id: &str) -> Result<(), StoreError> {
        match self {
            Dedup::Local(store) => store.record_delivered(destination, event_id),
            Dedup::Redis {
                conn,
                prefix,
                ttl_secs,
            } => {
                let mut conn = conn.clone();
                redis::cmd("SET")
                    .arg(Self::key(prefix, destination, event_id))
                    .arg(1)
                    .arg("NX")
                    .arg("EX")
                    .arg(*ttl_secs)
                    .query_async::<Option<String>>(&mut conn)
                    .await
                    .map(|_| ())
                    .map_err(|e| StoreError::Redis(e.to_string()))
            }
        }
    }
}
