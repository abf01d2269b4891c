//! The RabbitMQ source (lapin): connect, declare, set the prefetch, consume with manual acks, and
//! reconnect forever when the connection or channel goes away.

use std::time::SystemTime;

use bytes::Bytes;
use futures_util::StreamExt as _;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::amqp_acks::AckTask;
use super::failover::Failover;
use super::{Delivery, InFlight};
use crate::config::{AmqpUrl, QueueArgument, RabbitMqConfig};
use crate::event::{Inbound, SourceKind};
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::tls::TlsSetupError;

/// The AMQP frame size courier proposes when the URL does not set `frame_max`. lapin keeps a
/// read and a write buffer of 32 frames each, zero-filled, for the life of the connection: at
/// RabbitMQ's default of 128 KiB that is 8 MiB of resident memory, most of courier's idle RSS.
/// At 32 KiB it is 2 MiB; a larger message only takes more frames.
const DEFAULT_FRAME_MAX: u32 = 32 * 1024;

/// The connection URI: the configured URL, with [`DEFAULT_FRAME_MAX`] unless the URL's own
/// `frame_max` says otherwise (the broker's limit applies either way).
fn connection_uri(url: &AmqpUrl) -> lapin::uri::AMQPUri {
    let mut uri = url.uri().clone();
    uri.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
    uri
}

/// Why a consuming session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Lapin(#[from] lapin::Error),
    #[error("the broker cancelled the consumer (was the queue deleted?)")]
    Cancelled,
    #[error("no consumer within {0:?} of connecting (a node that takes connections but does not answer?; the URL's connection_timeout sets this, in milliseconds)")]
    SetupTimeout(Duration),
}

/// How long connecting and setting up the consumer may take, unless the URL's
/// `connection_timeout` (milliseconds) says otherwise: a node that accepts TCP connections but
/// never answers (a hung or stopped broker process) would hold courier there for good, and the
/// other nodes of `urls` would never be tried.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a session whose consumer the broker cancelled waits for its messages under way to
/// be acked before it reconnects.
const CANCELLED_SETTLE: Duration = Duration::from_secs(30);

/// Consumes one RabbitMQ queue.
pub struct AmqpSource {
    config: RabbitMqConfig,
    prefetch: u16,
    stats: Arc<Stats>,
    /// The broker URLs, in the order they are tried.
    endpoints: Vec<Endpoint>,
    /// Its messages not yet settled.
    in_flight: InFlight,
}

/// One broker URL and how to reach it.
struct Endpoint {
    url: AmqpUrl,
    /// For `amqps://`: the TLS settings and the server name (SNI and verification).
    tls: Option<(lapin::tcp::RustlsConnector, String)>,
}

impl AmqpSource {
    /// The prefetch is capped at `max_in_flight`: more unacked messages than courier will work on
    /// at once would only sit in memory. Fails only when TLS is asked for and cannot be set up.
    pub fn new(
        config: RabbitMqConfig,
        max_in_flight: usize,
        stats: Arc<Stats>,
    ) -> Result<AmqpSource, TlsSetupError> {
        let cap = u16::try_from(max_in_flight).unwrap_or(u16::MAX);
        let prefetch = config.prefetch.min(cap).max(1);
        if prefetch < config.prefetch {
            tracing::info!(
                configured = config.prefetch,
                used = prefetch,
                "rabbitmq.prefetch capped at service.max_in_flight"
            );
        }
        // The URLs of one cluster share the TLS settings; each has its own server name.
        let mut tls_config = None;
        let mut endpoints = Vec::new();
        for url in config.endpoints() {
            let tls = if url.tls() {
                let connector = match &tls_config {
                    Some(c) => Arc::clone(c),
                    None => {
                        let c = Arc::new(crate::tls::client_config(
                            "rabbitmq.tls",
                            config.tls.as_ref(),
                            true,
                            &[],
                        )?);
                        tls_config = Some(Arc::clone(&c));
                        c
                    }
                };
                let host = &url.uri().authority.host;
                let name = crate::tls::server_name(config.tls.as_ref(), host).into_owned();
                Some((connector.into(), name))
            } else {
                None
            };
            endpoints.push(Endpoint {
                url: url.clone(),
                tls,
            });
        }
        Ok(AmqpSource {
            config,
            prefetch,
            stats,
            endpoints,
            in_flight: InFlight::default(),
        })
    }

    /// Opens the connection. `amqps://` goes through courier's own TLS settings (see
    /// `crate::tls`): lapin takes a TCP connection from the closure below, where the TLS
    /// handshake uses them, at every connect.
    async fn connect(
        endpoint: &Endpoint,
        properties: ConnectionProperties,
    ) -> Result<Connection, lapin::Error> {
        let uri = connection_uri(&endpoint.url);
        let Some((connector, server_name)) = &endpoint.tls else {
            return Connection::connect_uri(uri, properties).await;
        };
        let connector = connector.clone();
        let server_name = server_name.clone();
        let runtime = lapin::runtime::default_runtime()?;
        Connection::connector(
            uri,
            runtime,
            async move |uri: lapin::uri::AMQPUri, runtime| {
                let (host, port) = (uri.authority.host.as_str(), uri.authority.port);
                let mut last = None;
                for addr in tokio::net::lookup_host((host, port)).await? {
                    match lapin::AsyncTcpStream::connect(&runtime, addr).await {
                        Ok(tcp) => return Ok(tcp.into_rustls(&connector, &server_name).await?),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last
                    .unwrap_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            format!("{host} has no address"),
                        )
                    })
                    .into())
            },
            properties,
        )
        .await
    }

    /// Its messages handed to the pipeline and not yet settled.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.clone()
    }

    /// Runs until the stop is requested: consumes into `tx`, reconnecting forever, each time to
    /// the next of the broker URLs ([`Failover`]). Then it cancels the consumer but keeps the
    /// connection open until the pipeline has drained, so the pipeline can still ack what it
    /// holds; then it closes the connection.
    pub async fn run(self, tx: mpsc::Sender<Delivery>, shutdown: Shutdown) {
        // Not when built: a reload builds a source and may then keep the running one, whose
        // connection is up.
        self.stats.set_connected("rabbitmq", false);
        let mut failover = Failover::new(self.endpoints.len());
        loop {
            let endpoint = &self.endpoints[failover.current()];
            match self.session(endpoint, &tx, &shutdown, &mut failover).await {
                Ok(()) => return,
                Err(error) => {
                    if shutdown.is_requested() {
                        return;
                    }
                    let url = endpoint.url.redacted();
                    let delay = failover.failed();
                    self.stats
                        .reconnecting("rabbitmq", &crate::error_chain(&error));
                    let next = self.endpoints[failover.current()].url.redacted();
                    tracing::warn!(%url, %error, %next, retry_in = ?delay, "RabbitMQ connection failed or lost; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.requested() => return,
                    }
                }
            }
        }
    }

    /// Connects, opens the channel, declares what `declare` asks for, and starts the consumer.
    async fn set_up(
        &self,
        endpoint: &Endpoint,
        properties: ConnectionProperties,
    ) -> Result<(Connection, lapin::Channel, lapin::Consumer), SessionError> {
        let cfg = &self.config;
        let conn = Self::connect(endpoint, properties).await?;
        let channel = conn.create_channel().await?;
        if cfg.declare {
            let durable = QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            };
            channel
                .queue_declare(cfg.queue.as_str().into(), durable, queue_arguments(cfg))
                .await?;
            for binding in &cfg.bindings {
                let options = ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                };
                channel
                    .exchange_declare(
                        binding.exchange.as_str().into(),
                        ExchangeKind::Topic,
                        options,
                        FieldTable::default(),
                    )
                    .await?;
                channel
                    .queue_bind(
                        cfg.queue.as_str().into(),
                        binding.exchange.as_str().into(),
                        binding.routing_key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
        }
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                cfg.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((conn, channel, consumer))
    }

    async fn session(
        &self,
        endpoint: &Endpoint,
        tx: &mpsc::Sender<Delivery>,
        shutdown: &Shutdown,
        failover: &mut Failover,
    ) -> Result<(), SessionError> {
        let cfg = &self.config;
        let properties = ConnectionProperties::default()
            .with_connection_name(cfg.connection_name.clone().into());
        let limit = endpoint
            .url
            .uri()
            .query
            .connection_timeout
            .map_or(SETUP_TIMEOUT, Duration::from_millis);
        let setup = tokio::time::timeout(limit, self.set_up(endpoint, properties));
        let (conn, channel, mut consumer) = tokio::select! {
            set_up = setup => set_up.map_err(|_| SessionError::SetupTimeout(limit))??,
            _ = shutdown.requested() => return Ok(()),
        };
        tracing::info!(url = %endpoint.url.redacted(), queue = %cfg.queue, prefetch = self.prefetch, "consuming from RabbitMQ");
        self.stats.set_connected("rabbitmq", true);
        failover.connected();
        // Acks go through it, coalesced; it stops sending on this channel when the session ends.
        let acks = AckTask::start(channel.clone(), Arc::clone(&self.stats), cfg.ack_hold);
        loop {
            let next = tokio::select! {
                _ = shutdown.requested() => break,
                next = consumer.next() => next,
            };
            let delivery = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(e.into()),
                None => {
                    // The broker cancelled the consumer (the queue deleted, its quorum queue's
                    // leader moved) but the channel is open: the messages under way are still
                    // acked on it, rather than redelivered, before the reconnect.
                    let settled = tokio::time::timeout(CANCELLED_SETTLE, self.in_flight.settled());
                    tokio::select! {
                        _ = settled => {}
                        _ = shutdown.requested() => {}
                    }
                    return Err(SessionError::Cancelled);
                }
            };
            let acker = self.in_flight.acker(acks.register(delivery.delivery_tag));
            let delivery = to_delivery(delivery, cfg.format, acker);
            tokio::select! {
                sent = tx.send(delivery) => if sent.is_err() { break },
                // Dropped unacked: the broker redelivers it.
                _ = shutdown.requested() => break,
            }
        }
        // Stop receiving, but keep the channel open: the pipeline acks in-flight messages on it.
        if let Err(error) = channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await
        {
            tracing::debug!(%error, "basic.cancel at shutdown failed");
        }
        shutdown.drained().await;
        // Acks still waiting for their hold (of messages the shutdown timeout cut short after
        // their POST) go out before the connection closes.
        acks.close(Duration::from_secs(1)).await;
        if let Err(error) = conn.close(200, "courier shutting down".into()).await {
            tracing::debug!(%error, "closing the RabbitMQ connection at shutdown failed");
        }
        Ok(())
    }
}

fn queue_arguments(cfg: &RabbitMqConfig) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in &cfg.queue_arguments {
        let value = match value {
            QueueArgument::Bool(b) => AMQPValue::Boolean(*b),
            QueueArgument::Int(i) => AMQPValue::LongLongInt(*i),
            QueueArgument::Text(s) => AMQPValue::LongString(s.as_str().into()),
        };
        table.insert(key.as_str().into(), value);
    }
    table
}

fn to_delivery(
    delivery: lapin::message::Delivery,
    format: crate::config::Format,
    acker: super::Acker,
) -> Delivery {
    let properties = &delivery.properties;
    let message_id = properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_string());
    let headers = properties
        .headers()
        .as_ref()
        .map(|table| {
            table
                .inner()
                .iter()
                .filter_map(|(k, v)| {
                    let value = match v {
                        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?,
                        AMQPValue::ShortString(s) => s.as_str(),
                        _ => return None,
                    };
                    Some((k.as_str().to_string(), value.to_string()))
                })
                .collect()
        })
        .unwrap_or_default();
    let inbound = Inbound {
        source: SourceKind::Rabbitmq,
        format,
        topic: delivery.routing_key.as_str().to_string(),
        message_id,
        headers,
        body: Bytes::from(delivery.data),
        received_at: SystemTime::now(),
        properties: None,
        expiry: None,
    };
    Delivery { inbound, acker }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(text: &str) -> lapin::uri::AMQPUri {
        connection_uri(&AmqpUrl::parse(text).expect("valid URL"))
    }

    #[test]
    fn proposes_a_smaller_frame_unless_the_url_sets_one() {
        let uri = uri("amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(uri.query.frame_max, Some(DEFAULT_FRAME_MAX));
        let uri = self::uri("amqp://127.0.0.1/%2f?frame_max=131072&heartbeat=30");
        assert_eq!(uri.query.frame_max, Some(131_072));
        assert_eq!(uri.query.heartbeat, Some(30));
    }

    #[test]
    fn a_bad_url_does_not_show_the_password() {
        let err = AmqpUrl::parse("amqp://user:s3cret@127.0.0.1:notaport/%2f").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
        let url = AmqpUrl::parse("amqp://user:s3cret@127.0.0.1/%2f").expect("valid");
        assert!(!format!("{url:?}").contains("s3cret"));
    }
}
