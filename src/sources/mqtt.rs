//! The MQTT source (rumqttc, MQTT 3.1.1): a persistent session, subscriptions at QoS 1, and
//! PUBACKs sent only after delivery, in the order the PUBLISHes arrived.
//!
//! Three tasks, so that nothing can block the event loop:
//! - the **driver** owns rumqttc's `EventLoop` and only polls it, forwarding what arrives over an
//!   unbounded channel; it never waits on the pipeline, so keep-alive pings and outgoing PUBACKs
//!   keep flowing however slow the endpoints are;
//! - the **session** task numbers each QoS 1 PUBLISH, hands it to the pipeline, and subscribes
//!   on every connect (so a changed filter list takes effect; retained re-sends hit dedup);
//! - the **sequencer** receives "done" marks in any order and sends PUBACKs for the longest done
//!   prefix ([`AckOrder`]), as MQTT requires (3.1.1, 4.6.0-2).
//!
//! A broker may cap the unacked QoS 1 messages in flight per client (Mosquitto's
//! `max_inflight_messages`, 20 by default, which 2.0.11 does not hold to for a client that
//! acknowledges: docs/mqtt.md and docs/performance.md measure it); a PUBACK is sent the moment
//! its prefix completes, so such a window refills without waiting for a batch.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS,
    SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::failover::Failover;
use super::{AckFuture, AckHandle, Delivery, InFlight};
use crate::config::MqttConfig;
use crate::event::{Inbound, SourceKind};
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

/// Consumes the configured MQTT subscriptions.
pub struct MqttSource {
    config: MqttConfig,
    /// The client options of each broker URL, in the order they are tried.
    brokers: Vec<Broker>,
    qos: QoS,
    stats: Arc<Stats>,
    /// Its messages not yet settled.
    in_flight: InFlight,
}

impl MqttSource {
    /// Builds the client options; fails only when TLS is asked for and cannot be set up.
    pub fn new(config: MqttConfig, stats: Arc<Stats>) -> Result<MqttSource, TlsSetupError> {
        let client_id = config.client_id.clone().unwrap_or_else(|| {
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            format!("courier-{}-{nanos:x}", std::process::id())
        });
        // The URLs of one cluster share everything but the address (and the name TLS checks).
        let tls = match config.endpoints().any(|u| u.tls()) {
            true => Some(Arc::new(crate::tls::client_config(
                "mqtt.tls",
                config.tls.as_ref(),
                true,
                &[],
            )?)),
            false => None,
        };
        let brokers = config
            .endpoints()
            .map(|url| {
                let mut options = MqttOptions::new(client_id.clone(), url.host(), url.port());
                options
                    .set_keep_alive(config.keep_alive)
                    .set_clean_session(config.clean_session)
                    .set_manual_acks(true)
                    .set_max_packet_size(MQTT_MAX_PACKET, MQTT_MAX_PACKET);
                if let Some(user) = &config.username {
                    let password = config.password.as_ref().map(|p| p.expose()).unwrap_or("");
                    options.set_credentials(user.clone(), password);
                }
                if let (true, Some(tls)) = (url.tls(), &tls) {
                    // rumqttc sends the URL's host as SNI (none for an IP address);
                    // `tls.server_name` changes the name the certificate is verified against.
                    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                        Arc::clone(tls),
                    )));
                }
                Broker {
                    options,
                    url: url.to_string(),
                }
            })
            .collect();
        let qos = if config.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        stats.set_connected("mqtt", false);
        Ok(MqttSource {
            config,
            brokers,
            in_flight: InFlight::default(),
            qos,
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
        let first = self.brokers[0].options.clone();
        let (client, eventloop) = AsyncClient::new(first, 256);
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let backlog = Arc::new(AtomicUsize::new(0));
        let finish = CancellationToken::new();
        let driver = tokio::spawn(drive(
            eventloop,
            events_tx,
            backlog.clone(),
            finish.clone(),
            self.brokers.clone(),
            self.stats.clone(),
        ));
        let (seq_tx, seq_rx) = mpsc::unbounded_channel();
        let sequencer = tokio::spawn(sequence(client.clone(), seq_rx));
        let subscriptions = self.config.subscriptions();
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
                } => {
                    self.stats.set_connected("mqtt", true);
                    generation += 1;
                    next_seq = 0;
                    let _ = seq_tx.send(SeqCmd::NewSession(generation));
                    tracing::info!(
                        %url,
                        session_present,
                        "connected to the MQTT broker"
                    );
                    // Subscribe on every connect, resumed session or not: a changed `topics`,
                    // `qos` or `shared_group` takes effect, and a refused subscription is tried
                    // again. The broker re-sends retained messages; dedup absorbs them.
                    let filters: Vec<SubscribeFilter> = subscriptions
                        .iter()
                        .map(|f| SubscribeFilter::new(f.clone(), self.qos))
                        .collect();
                    if let Err(error) = client.subscribe_many(filters).await {
                        tracing::error!(%error, "could not queue the MQTT subscription");
                    }
                }
                DriverEvent::SubAck(codes) => {
                    for (filter, code) in subscriptions.iter().zip(codes) {
                        match code {
                            SubscribeReasonCode::Success(qos) => {
                                tracing::info!(%filter, ?qos, "subscribed")
                            }
                            SubscribeReasonCode::Failure => tracing::error!(
                                %filter,
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
                    let acker = match publish.qos {
                        QoS::AtMostOnce => self.in_flight.acker(NoAck),
                        _ => {
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
                            format: self.config.format,
                            topic: publish.topic,
                            message_id: None,
                            headers: Vec::new(),
                            body: publish.payload,
                            received_at: SystemTime::now(),
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
        if let Err(error) = client.try_disconnect() {
            tracing::debug!(%error, "could not queue the MQTT disconnect");
        }
        let mut driver = driver;
        if tokio::time::timeout(Duration::from_secs(5), &mut driver)
            .await
            .is_err()
        {
            // The DISCONNECT never went out (broker unreachable?): stop the driver anyway.
            finish.cancel();
            let _ = driver.await;
        }
        drop(seq_tx);
        let _ = sequencer.await;
        tracing::info!("MQTT source stopped");
    }
}

enum DriverEvent {
    Connected { session_present: bool, url: String },
    SubAck(Vec<SubscribeReasonCode>),
    Publish(Publish),
}

/// One broker URL: the client options that connect to it, and the URL for logs.
#[derive(Clone)]
struct Broker {
    options: MqttOptions,
    url: String,
}

/// Polls the event loop forever (reconnecting on errors, each time to the next broker URL:
/// [`Failover`]) and forwards what matters. Stops after our DISCONNECT went out, or when `finish`
/// is cancelled.
async fn drive(
    mut eventloop: EventLoop,
    events: mpsc::UnboundedSender<DriverEvent>,
    backlog: Arc<AtomicUsize>,
    finish: CancellationToken,
    brokers: Vec<Broker>,
    stats: Arc<Stats>,
) {
    let mut failover = Failover::new(brokers.len());
    let mut dropped_qos0 = 0u64;
    loop {
        // Cancelling poll() is only done when leaving for good, where losing its state is fine.
        let polled = tokio::select! {
            polled = eventloop.poll() => polled,
            _ = finish.cancelled() => return,
        };
        let forwarded = match polled {
            Ok(Event::Incoming(Packet::ConnAck(ack))) if ack.code == ConnectReturnCode::Success => {
                failover.connected();
                events.send(DriverEvent::Connected {
                    session_present: ack.session_present,
                    url: brokers[failover.current()].url.clone(),
                })
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                events.send(DriverEvent::SubAck(ack.return_codes))
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if publish.qos == QoS::AtMostOnce && backlog.load(Ordering::Relaxed) >= QOS0_BACKLOG
                {
                    dropped_qos0 += 1;
                    if dropped_qos0.is_power_of_two() {
                        tracing::warn!(dropped = dropped_qos0, "QoS 0 backlog full: dropping QoS 0 messages (use qos = 1 for flow control)");
                    }
                    continue;
                }
                backlog.fetch_add(1, Ordering::Relaxed);
                events.send(DriverEvent::Publish(publish))
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                finish.cancel();
                return;
            }
            Ok(_) => Ok(()),
            Err(error) => {
                let url = &brokers[failover.current()].url;
                let delay = failover.failed();
                let next = &brokers[failover.current()];
                // The next poll connects with these options (rumqttc reads them at every
                // connect); the session and its pending packets stay with the event loop.
                eventloop.mqtt_options = next.options.clone();
                let error = crate::error_chain(&error);
                stats.reconnecting("mqtt", &error);
                tracing::warn!(%url, %error, next = %next.url, retry_in = ?delay, "MQTT connection failed or lost; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = finish.cancelled() => return,
                }
                Ok(())
            }
        };
        if forwarded.is_err() {
            // The session task is gone.
            return;
        }
    }
}

enum SeqCmd {
    NewSession(u64),
    Done {
        generation: u64,
        seq: u64,
        pkid: u16,
    },
    Flush(oneshot::Sender<()>),
}

/// Sends PUBACKs in arrival order. Runs apart from the driver, so a full request channel only
/// delays acks; it never stops the event loop from being polled.
async fn sequence(client: AsyncClient, mut commands: mpsc::UnboundedReceiver<SeqCmd>) {
    let mut order = AckOrder::default();
    let mut ready = Vec::new();
    while let Some(command) = commands.recv().await {
        match command {
            SeqCmd::NewSession(generation) => order.new_session(generation),
            SeqCmd::Done {
                generation,
                seq,
                pkid,
            } => {
                order.done(generation, seq, pkid, &mut ready);
                for pkid in ready.drain(..) {
                    let mut puback = Publish::new("", QoS::AtLeastOnce, Vec::new());
                    puback.pkid = pkid;
                    if let Err(error) = client.ack(&puback).await {
                        tracing::debug!(%error, pkid, "PUBACK not queued; the broker will redeliver");
                    }
                }
            }
            SeqCmd::Flush(done) => {
                tracing::debug!(
                    next = order.next,
                    waiting = order.waiting(),
                    "PUBACKs flushed at shutdown"
                );
                let _ = done.send(());
            }
        }
    }
}

/// The in-order ack rule, apart from any I/O: messages are numbered 0, 1, 2… per connection
/// (`generation`); a PUBACK may go out for message n only once 0..=n are all done.
///
/// Marks from an earlier connection are ignored: the broker redelivers those messages on the
/// resumed session, and their PUBACK belongs to the new delivery.
#[derive(Debug, Default)]
pub struct AckOrder {
    generation: u64,
    next: u64,
    done: BTreeMap<u64, u16>,
}

impl AckOrder {
    /// A new connection: numbering restarts and marks still waiting are forgotten.
    pub fn new_session(&mut self, generation: u64) {
        self.generation = generation;
        self.next = 0;
        self.done.clear();
    }

    /// Marks message `seq` done; appends to `ready` the packet ids that may be acked now, in order.
    pub fn done(&mut self, generation: u64, seq: u64, pkid: u16, ready: &mut Vec<u16>) {
        if generation != self.generation || seq < self.next {
            return;
        }
        self.done.insert(seq, pkid);
        while let Some(pkid) = self.done.remove(&self.next) {
            ready.push(pkid);
            self.next += 1;
        }
    }

    /// Messages done but held behind an earlier one still in delivery.
    pub fn waiting(&self) -> usize {
        self.done.len()
    }
}

struct MqttAck {
    generation: u64,
    seq: u64,
    pkid: u16,
    sequencer: mpsc::UnboundedSender<SeqCmd>,
}

impl AckHandle for MqttAck {
    /// Hands the mark to the sequencer and returns at once: the PUBACK itself goes out when every
    /// earlier message is done too, so a slow message never holds a pipeline slot of a later one.
    fn ack(self: Box<Self>) -> AckFuture {
        let sent = self.sequencer.send(SeqCmd::Done {
            generation: self.generation,
            seq: self.seq,
            pkid: self.pkid,
        });
        Box::pin(async move {
            sent.map_err(|_| "the MQTT source stopped; the broker will redeliver".to_string())
        })
    }
}

/// QoS 0 messages have nothing to acknowledge.
struct NoAck;

impl AckHandle for NoAck {
    fn ack(self: Box<Self>) -> AckFuture {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_leave_in_arrival_order() {
        let mut order = AckOrder::default();
        order.new_session(1);
        let mut ready = Vec::new();
        order.done(1, 2, 102, &mut ready);
        order.done(1, 1, 101, &mut ready);
        assert!(ready.is_empty(), "0 is still in delivery");
        assert_eq!(order.waiting(), 2);
        order.done(1, 0, 100, &mut ready);
        assert_eq!(ready, vec![100, 101, 102]);
        ready.clear();
        order.done(1, 3, 103, &mut ready);
        assert_eq!(ready, vec![103]);
    }

    #[test]
    fn marks_of_an_old_connection_are_dropped() {
        let mut order = AckOrder::default();
        order.new_session(1);
        let mut ready = Vec::new();
        order.done(1, 1, 11, &mut ready);
        order.new_session(2);
        assert_eq!(order.waiting(), 0);
        order.done(1, 0, 10, &mut ready);
        assert!(ready.is_empty(), "old generation ignored");
        order.done(2, 0, 20, &mut ready);
        assert_eq!(ready, vec![20]);
    }
}
