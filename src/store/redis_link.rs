//! The connection to the Redis that holds the dedup record, plain (`redis://`) or TLS
//! (`rediss://`), made again when it breaks.
//!
//! courier makes the TCP and TLS connection itself and hands the stream to the redis crate's
//! multiplexed connection, so that a `rediss://` Redis is verified with `store.redis_tls` by
//! [`crate::tls::client_config`], as the brokers and the destinations are: a private CA, a client
//! certificate, a verification name, and files read again when they change on disk.
//!
//! One connection carries every request (the redis crate pipelines them). Callers that find no
//! connection wait for one connect together instead of each making their own, and a connect that
//! failed answers the callers of the next second with its error instead of being tried again by
//! each. A request whose connection broke (closed by the server's idle timeout, or by a failover)
//! or reached a primary that became a replica (`READONLY`) is sent once more on a new connection:
//! `EXISTS` and `SET NX` are safe to repeat. A connection that stops answering is dropped too, and
//! the next request connects again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_rustls::TlsConnector;

use super::StoreError;
use crate::config::{RedisEndpoint, StoreConfig};

/// How long making a connection may take: TCP, the TLS handshake and the setup (`AUTH`,
/// `SELECT`). A managed Redis in another zone answers within it; a dead address does not hold a
/// delivery longer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a request may wait for its answer before it fails (and the connection is dropped,
/// because a connection that stopped answering may be one whose peer is gone without a reset).
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);

/// How long a failed connect answers for the next ones: at most one connect a second while
/// Redis cannot be reached, whatever the number of deliveries that wait for it.
const CONNECT_AGAIN_AFTER: Duration = Duration::from_secs(1);

/// The link to one Redis.
pub(super) struct RedisLink {
    endpoint: RedisEndpoint,
    /// The TLS connector and the name the server's certificate must carry, for `rediss://`.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// Looked at by every request, briefly: never held across an await.
    current: std::sync::Mutex<Current>,
    /// Held by the one caller that connects while the others wait for its connection.
    connecting: Mutex<()>,
}

/// The connection in use, if any (none until the first request, and after one broke), how many
/// were made (a connection's number tells a request whether the one that failed it is still the
/// one in use, or was already replaced), and the last failed connect.
#[derive(Default)]
struct Current {
    connection: Option<MultiplexedConnection>,
    made: u64,
    failed: Option<(Instant, String)>,
}

impl RedisLink {
    /// The link to `config`'s Redis; connects to nothing yet.
    pub(super) fn new(config: &StoreConfig) -> Result<RedisLink, StoreError> {
        let endpoint = config.redis_endpoint().map_err(StoreError::Redis)?;
        let tls = if endpoint.tls {
            let tls_config = config.redis_tls.as_ref();
            let client = crate::tls::client_config("store.redis_tls", tls_config, true, &[])
                .map_err(|e| StoreError::Redis(e.to_string()))?;
            let name = crate::tls::server_name(tls_config, &endpoint.host);
            let name = ServerName::try_from(name.into_owned()).map_err(|_| {
                StoreError::Redis(format!(
                    "{}: the host is not a DNS name or an IP address to verify the certificate against",
                    endpoint.shown
                ))
            })?;
            Some((TlsConnector::from(Arc::new(client)), name))
        } else {
            None
        };
        Ok(RedisLink {
            endpoint,
            tls,
            current: std::sync::Mutex::new(Current::default()),
            connecting: Mutex::new(()),
        })
    }

    /// Why Redis has not been reached since start, by any request, while it has not: the last
    /// connect's error, if one was tried.
    pub(super) fn unreachable(&self) -> Option<String> {
        let current = self.lock_current();
        if current.made > 0 {
            return None;
        }
        let why = current.failed.as_ref().map(|(_, error)| error.as_str());
        Some(why.unwrap_or("not connected yet").to_string())
    }

    /// The URL without its password, for logs.
    pub(super) fn shown(&self) -> &str {
        &self.endpoint.shown
    }

    /// Sends `cmd` and reads its answer as `T`; `cmd` must be safe to send twice.
    pub(super) async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, StoreError> {
        let mut again = true;
        loop {
            let (number, mut connection) = self.connection().await?;
            let error = match cmd.query_async::<T>(&mut connection).await {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            // A timeout is not sent again (the first may still be answered); an answer that
            // does not parse or a server error such as NOAUTH leaves the connection as it is.
            let stalled = error.is_timeout();
            let broken = !stalled
                && (error.is_io_error()
                    || error.is_connection_dropped()
                    || error.code() == Some("READONLY"));
            if stalled || broken {
                let mut current = self.lock_current();
                if current.made == number {
                    current.connection = None;
                }
            }
            if !(broken && std::mem::take(&mut again)) {
                return Err(StoreError::Redis(format!(
                    "{}: {error}",
                    self.endpoint.shown
                )));
            }
            tracing::debug!(url = %self.endpoint.shown, %error, "Redis connection lost; sending again on a new one");
        }
    }

    /// The connection in use, with its number.
    fn in_use(&self) -> Option<(u64, MultiplexedConnection)> {
        let current = self.lock_current();
        current
            .connection
            .as_ref()
            .map(|connection| (current.made, connection.clone()))
    }

    fn lock_current(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection in use, or a new one.
    pub(super) async fn connection(&self) -> Result<(u64, MultiplexedConnection), StoreError> {
        if let Some(in_use) = self.in_use() {
            return Ok(in_use);
        }
        let _turn = self.connecting.lock().await;
        // Made by the caller that held the turn before.
        if let Some(in_use) = self.in_use() {
            return Ok(in_use);
        }
        if let Some((at, error)) = &self.lock_current().failed {
            if at.elapsed() < CONNECT_AGAIN_AFTER {
                return Err(StoreError::Redis(error.clone()));
            }
        }
        let made = tokio::time::timeout(CONNECT_TIMEOUT, self.connect())
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "{}: no connection within {CONNECT_TIMEOUT:?}",
                    self.endpoint.shown
                ))
            });
        let mut current = self.lock_current();
        match made {
            Ok(connection) => {
                current.made += 1;
                current.connection = Some(connection.clone());
                current.failed = None;
                Ok((current.made, connection))
            }
            Err(error) => {
                current.failed = Some((Instant::now(), error.clone()));
                Err(StoreError::Redis(error))
            }
        }
    }

    async fn connect(&self) -> Result<MultiplexedConnection, String> {
        let fail =
            |what: &str, e: &dyn std::fmt::Display| format!("{}: {what}: {e}", self.endpoint.shown);
        let tcp = TcpStream::connect((self.endpoint.host.as_str(), self.endpoint.port))
            .await
            .map_err(|e| fail("cannot connect", &e))?;
        // Requests are small and each waits for its answer: send them at once.
        tcp.set_nodelay(true)
            .map_err(|e| fail("cannot set TCP_NODELAY", &e))?;
        let config = AsyncConnectionConfig::new().set_response_timeout(Some(RESPONSE_TIMEOUT));
        match &self.tls {
            Some((connector, name)) => {
                let stream = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| fail("TLS handshake failed", &e))?;
                self.set_up(stream, config).await
            }
            None => self.set_up(tcp, config).await,
        }
    }

    /// Logs in on `stream` (`AUTH`, `SELECT`) and starts the driver that reads and writes it,
    /// which ends when the stream breaks or every clone of the connection is gone.
    async fn set_up<S>(
        &self,
        stream: S,
        config: AsyncConnectionConfig,
    ) -> Result<MultiplexedConnection, String>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (connection, driver) =
            MultiplexedConnection::new_with_config(&self.endpoint.settings, stream, config)
                .await
                .map_err(|e| {
                    format!(
                        "{}: setting up the connection failed: {e}",
                        self.endpoint.shown
                    )
                })?;
        tokio::spawn(driver);
        Ok(connection)
    }
}
