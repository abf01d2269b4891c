//! The MQTT source (rumqttc; MQTT 3.1.1 or 5): a persistent session, subscriptions at QoS 1, and
//! PUBACKs sent only after delivery, in the order the PUBLISHes arrived.
//!
//! Three tasks, so that nothing can block the event loop:
//! - the **driver** owns rumqttc's event loop and only polls it, forwarding what arrives over an
//!   unbounded channel; it never waits on the pipeline, so keep-alive pings and outgoing PUBACKs
//!   keep flowing however slow the endpoints are;
//! - the **session** task numbers each QoS 1 PUBLISH, hands it to the pipeline, and subscribes
//!   on every connect (so a changed filter list takes effect; retained re-sends hit dedup);
//! - the **sequencer** (`ack_order`) receives "done" marks in any order and sends PUBACKs for
//!   the longest done prefix, as MQTT requires.
//!
//! The three are written once. What differs between the protocols (rumqttc has a client per
//! version, with its own packet types) sits behind `Client` and `Connection`, in `v3` and
//! `v5`: the connect options, and turning packets into `Polled`.
//!
//! A broker may cap the unacked QoS 1 messages in flight per client (Mosquitto's
//! `max_inflight_messages` under 3.1.1, courier's `receive_maximum` under 5: docs/mqtt.md
//! measures both); a PUBACK is sent the moment its prefix completes, so such a window refills
//! without waiting for a batch.

mod ack_order;
mod v3;
mod v5;

pub use ack_order::AckOrder;

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use self::ack_order::{sequence, MqttAck, NoAck, SeqCmd};
use super::failover::Failover;
use super::{Delivery, InFlight};
use crate::config::{MqttConfig, MqttProtocol};
use crate::event::{Inbound, SourceKind};
use crate::properties::{Expiry, MessageProperties};
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::tls::TlsSetupError;

/// The largest packet MQTT allows. Accepting it means an oversized message is dead-lettered by
/// `service.max_payload_bytes` instead of failing the connection, which the broker would answer by
/// redelivering the same message forever.
const MQTT_MAX_PACKET: usize = 268_435_455;
/// QoS 0 messages (no acks, so no broker flow control) waiting for the pipeline beyond this are
/// dropped; QoS 1 backlog is bounded by the broker's in-flight window instead.
const QOS0_BACKLOG: usize = 10_000;
/// Requests (subscriptions, PUBACKs) queued for rumqttc's event loop before the sender waits.
const REQUEST_CAPACITY: usize = 256;

/// What a protocol's client does for the session and the sequencer.
trait Client: Clone + Send + Sync + 'static {
    /// Subscribes to every filter at `qos` (0 or 1).
    fn subscribe(
        &self,
        filters: Vec<String>,
        qos: u8,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Queues the PUBACK of packet `pkid`.
    fn ack(&self, pkid: u16) -> impl Future<Output = Result<(), String>> + Send;
    /// Queues a DISCONNECT, which ends the session cleanly.
    fn try_disconnect(&self) -> Result<(), String>;
}

/// A protocol's event loop, as the driver polls it.
trait Connection: Send + 'static {
    /// The next thing that happened: an error is a failed or lost connection, after which the
    /// next poll connects again.
    fn poll(&mut self) -> impl Future<Output = Result<Polled, String>> + Send;
    /// Makes the next connect go to broker `index` of the configured URLs; the session and its
    /// pending packets stay with the event loop.
    fn use_broker(&mut self, index: usize);
    /// After a loss, before the next connect: takes the PUBACKs queued since the loss out of
    /// the request channel (they would go out on the next connection), and returns the
    /// PUBLISHes the lost connection read but did not hand out yet, which only the next CONNACK
    /// says whether the broker sends again.
    fn after_loss(&mut self) -> Vec<Received>;
}

/// What a poll yields that courier cares about.
enum Polled {
    /// A CONNACK with success.
    Connected { session_present: bool },
    /// A SUBACK: per filter, the granted QoS or why it was refused.
    SubAck(Vec<Result<u8, String>>),
    /// A PUBLISH.
    Publish(Received),
    /// Our DISCONNECT went out.
    DisconnectSent,
    /// Anything else (pings, our own PUBACKs, ...).
    Other,
}

/// A PUBLISH, whatever the protocol.
struct Received {
    topic: String,
    pkid: u16,
    /// QoS 0: nothing to acknowledge.
    at_most_once: bool,
    payload: Bytes,
    /// MQTT 5 user properties.
    headers: Vec<(String, String)>,
    properties: Option<Box<MessageProperties>>,
    expiry: Option<Expiry>,
}

/// How to reach the brokers: what both protocols' connect options are built from.
struct Connect {
    config: MqttConfig,
    client_id: String,
    /// Set when any URL uses TLS; the URLs of one cluster share it.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// MQTT 5 `receive_maximum`, the default filled in.
    receive_maximum: u16,
}

impl Connect {
    /// The broker's password, or none.
    fn credentials(&self) -> Option<(String, String)> {
        let user = self.config.username.clone()?;
        let password = self
            .config
            .password
            .as_ref()
            .map(|p| p.expose())
            .unwrap_or("");
        Some((user, password.to_string()))
    }
}

/// Consumes the configured MQTT subscriptions.
pub struct MqttSource {
    connect: Connect,
    /// The broker URLs, in the order they are tried, for logs.
    urls: Vec<String>,
    stats: Arc<Stats>,
    /// Its messages not yet settled.
    in_flight: InFlight,
}

impl MqttSource {
    /// Prepares the connection; fails only when TLS is asked for and cannot be set up.
    /// `max_in_flight` is the default MQTT 5 receive maximum.
    pub fn new(
        config: MqttConfig,
        max_in_flight: usize,
        stats: Arc<Stats>,
    ) -> Result<MqttSource, TlsSetupError> {
        let client_id = config.client_id.clone().unwrap_or_else(|| {
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            format!("courier-{}-{nanos:x}", std::process::id())
        });
        let tls = match config.endpoints().any(|u| u.tls()) {
            true => Some(Arc::new(crate::tls::client_config(
                "mqtt.tls",
                config.tls.as_ref(),
                true,
                &[],
            )?)),
            false => None,
        };
        let urls = config.endpoints().map(|u| u.to_string()).collect();
        Ok(MqttSource {
            connect: Connect {
                receive_maximum: config.receive_maximum(max_in_flight),
                config,
                client_id,
                tls,
            },
            urls,
            in_flight: InFlight::default(),
            stats,
        })
    }

    /// Its messages handed to the pipeline and not yet settled.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.clone()
    }

    /// Runs until the stop is requested, then keeps the session open (and PUBACKs flowing)
    /// until the pipeline has drained, sends the last PUBACKs and disconnects cleanly.
    /// Reconnects with capped backoff meanwhile.
    pub async fn run(self, tx: mpsc::Sender<Delivery>, shutdown: Shutdown) {
        // Not when built: a reload builds a source and may then keep the running one, whose
        // connection is up.
        self.stats.set_connected("mqtt", false);
        match self.connect.config.protocol {
            MqttProtocol::V3 => {
                let (client, connection) = v3::open(&self.connect);
                self.run_with(client, connection, tx, shutdown).await
            }
            MqttProtocol::V5 => {
                let (client, connection) = v5::open(&self.connect);
                self.run_with(client, connection, tx, shutdown).await
            }
        }
    }

    /// The session task, over either protocol.
    async fn run_with(
        self,
        client: impl Client,
        connection: impl Connection,
        tx: mpsc::Sender<Delivery>,
        shutdown: Shutdown,
    ) {
        let config = &self.connect.config;
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let backlog = Arc::new(AtomicUsize::new(0));
        let finish = CancellationToken::new();
        let link = Arc::new(AtomicU64::new(0));
        let driver = tokio::spawn(drive(
            connection,
            events_tx,
            backlog.clone(),
            link.clone(),
            finish.clone(),
            self.urls.clone(),
            self.stats.clone(),
        ));
        let (seq_tx, seq_rx) = mpsc::unbounded_channel();
        let sequencer = tokio::spawn(sequence(client.clone(), seq_rx, link.clone()));
        let subscriptions = config.subscriptions();
        let mut generation = 0u64;
        let mut next_seq = 0u64;

        loop {
            let event = tokio::select! {
                event = events.recv() => event,
                _ = shutdown.drained() => break,
            };
            let Some(event) = event else { break };
            match event {
                DriverEvent::Connected {
                    session_present,
                    url,
                    link,
                } => {
                    self.stats.set_connected("mqtt", true);
                    generation = link;
                    next_seq = 0;
                    let _ = seq_tx.send(SeqCmd::NewSession(generation));
                    tracing::info!(
                        %url,
                        session_present,
                        protocol = ?config.protocol,
                        "connected to the MQTT broker"
                    );
                    // Subscribe on every connect, resumed session or not: a changed `topics`,
                    // `qos` or `shared_group` takes effect, and a refused subscription is tried
                    // again. The broker re-sends retained messages; dedup absorbs them.
                    if let Err(error) = client.subscribe(subscriptions.clone(), config.qos).await {
                        tracing::error!(%error, "could not queue the MQTT subscription");
                    }
                }
                DriverEvent::SubAck(codes) => {
                    for (filter, code) in subscriptions.iter().zip(codes) {
                        match code {
                            Ok(qos) => tracing::info!(%filter, qos, "subscribed"),
                            Err(reason) => tracing::error!(
                                %filter,
                                %reason,
                                "the broker refused the subscription (ACL or invalid filter)"
                            ),
                        }
                    }
                }
                DriverEvent::Publish(publish) => {
                    backlog.fetch_sub(1, Ordering::Relaxed);
                    if shutdown.is_requested() {
                        // Not started: without a PUBACK the broker redelivers it next session.
                        continue;
                    }
                    let acker = match publish.at_most_once {
                        true => self.in_flight.acker(NoAck),
                        false => {
                            let seq = next_seq;
                            next_seq += 1;
                            self.in_flight.acker(MqttAck {
                                generation,
                                seq,
                                pkid: publish.pkid,
                                sequencer: seq_tx.clone(),
                            })
                        }
                    };
                    let delivery = Delivery {
                        inbound: Inbound {
                            source: SourceKind::Mqtt,
                            format: config.format,
                            topic: publish.topic,
                            message_id: None,
                            headers: publish.headers,
                            body: publish.payload,
                            received_at: SystemTime::now(),
                            properties: publish.properties,
                            expiry: publish.expiry,
                        },
                        acker,
                    };
                    // If the pipeline no longer takes messages (it is draining), the delivery is
                    // dropped unacked. The loop itself runs on until the drain: the deliveries
                    // still under way need their PUBACKs sent before the DISCONNECT.
                    tokio::select! {
                        _ = tx.send(delivery) => {}
                        _ = shutdown.requested() => {}
                    }
                }
            }
        }

        // Every delivery is acked or abandoned: send the PUBACKs still due, then DISCONNECT, so
        // the broker keeps the session and redelivers only what was not acked.
        let (flushed_tx, flushed) = oneshot::channel();
        let _ = seq_tx.send(SeqCmd::Flush(flushed_tx));
        let _ = tokio::time::timeout(Duration::from_secs(5), flushed).await;
        let mut driver = driver;
        // While no connection is up (the broker unreachable, the driver waiting to reconnect),
        // there is no session to end and no PUBACK to send: a DISCONNECT would wait for a
        // connect that may never come.
        let connected = generation != 0 && link.load(Ordering::Acquire) == generation;
        if !connected {
            finish.cancel();
        } else if let Err(error) = client.try_disconnect() {
            tracing::debug!(%error, "could not queue the MQTT disconnect");
            finish.cancel();
        }
        if tokio::time::timeout(Duration::from_secs(5), &mut driver)
            .await
            .is_err()
        {
            // The DISCONNECT never went out (the connection broke meanwhile?): stop the driver
            // anyway.
            finish.cancel();
            let _ = driver.await;
        }
        drop(seq_tx);
        let _ = sequencer.await;
        tracing::info!("MQTT source stopped");
    }
}

enum DriverEvent {
    /// `link` numbers the connection ([`drive`]).
    Connected {
        session_present: bool,
        url: String,
        link: u64,
    },
    SubAck(Vec<Result<u8, String>>),
    Publish(Received),
}

/// Polls the event loop forever (reconnecting on errors, each time to the next broker URL:
/// [`Failover`]) and forwards what matters. Stops after our DISCONNECT went out, or when `finish`
/// is cancelled.
///
/// `link` moves on at every connect and at every loss, here, as the event loop reports them: the
/// sequencer sends a connection's PUBACKs only while `link` still names it, so that none queued
/// after its loss goes out on the next connection, where it would ack the redelivered copy
/// before its POST, or another message that got the same packet id.
async fn drive(
    mut connection: impl Connection,
    events: mpsc::UnboundedSender<DriverEvent>,
    backlog: Arc<AtomicUsize>,
    link: Arc<AtomicU64>,
    finish: CancellationToken,
    urls: Vec<String>,
    stats: Arc<Stats>,
) {
    let mut failover = Failover::new(urls.len());
    let mut dropped_qos0 = 0u64;
    // What lost connections read and did not hand out, until the next CONNACK.
    let mut left_behind: Vec<Received> = Vec::new();
    loop {
        // Cancelling poll() is only done when leaving for good, where losing its state is fine.
        let polled = tokio::select! {
            polled = connection.poll() => polled,
            _ = finish.cancelled() => return,
        };
        let forwarded = match polled {
            Ok(Polled::Connected { session_present }) => {
                failover.connected();
                let sent = events.send(DriverEvent::Connected {
                    session_present,
                    url: urls[failover.current()].clone(),
                    link: link.fetch_add(1, Ordering::AcqRel) + 1,
                });
                // A resumed session sends its QoS 1 messages again; QoS 0 ones, and all of them
                // when the session is new, come only from here. Their packet ids belong to the
                // lost connection, so they are handed out with nothing to acknowledge.
                for mut publish in left_behind.drain(..) {
                    if session_present && !publish.at_most_once {
                        continue;
                    }
                    publish.at_most_once = true;
                    backlog.fetch_add(1, Ordering::Relaxed);
                    let _ = events.send(DriverEvent::Publish(publish));
                }
                sent
            }
            Ok(Polled::SubAck(codes)) => events.send(DriverEvent::SubAck(codes)),
            Ok(Polled::Publish(publish)) => {
                if publish.at_most_once && backlog.load(Ordering::Relaxed) >= QOS0_BACKLOG {
                    dropped_qos0 += 1;
                    if dropped_qos0.is_power_of_two() {
                        tracing::warn!(dropped = dropped_qos0, "QoS 0 backlog full: dropping QoS 0 messages (use qos = 1 for flow control)");
                    }
                    continue;
                }
                backlog.fetch_add(1, Ordering::Relaxed);
                events.send(DriverEvent::Publish(publish))
            }
            Ok(Polled::DisconnectSent) => {
                finish.cancel();
                return;
            }
            Ok(Polled::Other) => Ok(()),
            Err(error) => {
                link.fetch_add(1, Ordering::AcqRel);
                let url = &urls[failover.current()];
                let delay = failover.failed();
                connection.use_broker(failover.current());
                let next = &urls[failover.current()];
                stats.reconnecting("mqtt", &error);
                tracing::warn!(%url, %error, %next, retry_in = ?delay, "MQTT connection failed or lost; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = finish.cancelled() => return,
                }
                left_behind.extend(connection.after_loss());
                Ok(())
            }
        };
        if forwarded.is_err() {
            // The session task is gone.
            return;
        }
    }
}
