//! QoS 1 publishers for the machine's Mosquitto on 127.0.0.1:1883 (or another broker on
//! 127.0.0.1): [`MqttPublisher`] speaks MQTT 3.1.1, [`Mqtt5Publisher`] MQTT 5 with properties.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a [`MqttPublisher`] connects.
#[derive(Clone, Debug)]
pub struct MqttPublisherOptions {
    pub client_id: String,
    /// Publishes sent and not yet PUBACKed at once.
    pub inflight: u16,
    /// Requests rumqttc queues before `publish` waits.
    pub capacity: usize,
    /// The largest packet, both ways; `None` keeps rumqttc's default.
    pub max_packet_size: Option<u32>,
    /// The broker's port on 127.0.0.1.
    pub port: u16,
}

impl Default for MqttPublisherOptions {
    fn default() -> Self {
        MqttPublisherOptions {
            client_id: crate::unique("test-pub"),
            inflight: 1000,
            capacity: 1000,
            max_packet_size: None,
            port: 1883,
        }
    }
}

/// How far ahead of the consumer [`MqttPublisher::publish_paced`] runs: Mosquitto drops QoS 1
/// messages for a subscriber more than `max_queued_messages` (1,000 by default) behind, and the
/// window it counts includes messages delivered but not yet PUBACKed.
pub const PACE_AHEAD: usize = 300;

/// Publishes sent and PUBACKs received, whichever protocol.
#[derive(Default)]
struct AckCount {
    acked: Arc<AtomicUsize>,
    sent: AtomicUsize,
}

impl AckCount {
    /// Whether the broker acknowledged everything published so far within `timeout`.
    async fn acked_within(&self, timeout: Duration) -> bool {
        let want = self.sent.load(Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        while self.acked.load(Ordering::SeqCst) < want {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Panics unless the broker acknowledged everything published so far within 20 s.
    async fn wait_acked(&self) {
        assert!(
            self.acked_within(Duration::from_secs(20)).await,
            "broker acked {} of {} publishes",
            self.acked.load(Ordering::SeqCst),
            self.sent.load(Ordering::SeqCst)
        );
    }
}

/// A client publishing at QoS 1, counting the broker's PUBACKs.
pub struct MqttPublisher {
    pub client: rumqttc::AsyncClient,
    acks: AckCount,
    task: tokio::task::JoinHandle<()>,
}

impl MqttPublisher {
    pub async fn connect() -> MqttPublisher {
        Self::connect_with(MqttPublisherOptions::default()).await
    }

    /// Connects and waits (at most 10 s) for the broker's CONNACK.
    pub async fn connect_with(options: MqttPublisherOptions) -> MqttPublisher {
        let port = options.port;
        let mut mqtt = rumqttc::MqttOptions::new(options.client_id, "127.0.0.1", port);
        mqtt.set_keep_alive(Duration::from_secs(10));
        mqtt.set_inflight(options.inflight);
        if let Some(max) = options.max_packet_size {
            mqtt.set_max_packet_size(max as usize, max as usize);
        }
        let (client, mut eventloop) = rumqttc::AsyncClient::new(mqtt, options.capacity);
        let acks = AckCount::default();
        let counter = acks.acked.clone();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .unwrap_or_else(|_| panic!("publisher connects to Mosquitto on 127.0.0.1:{port}"))
            .ok();
        MqttPublisher { client, acks, task }
    }

    /// Publishes at QoS 1 (not retained).
    pub async fn publish(&self, topic: &str, body: impl Into<Vec<u8>>) {
        self.acks.sent.fetch_add(1, Ordering::SeqCst);
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, body.into())
            .await
            .expect("queue MQTT publish");
    }

    /// Publishes every body, never more than [`PACE_AHEAD`] ahead of `consumed()`, counting
    /// `before` bodies published earlier (so `consumed()` counts those too). Gives up when
    /// `consumed()` has not moved for 30 s, saying after how many of `bodies`.
    pub async fn publish_paced(
        &self,
        topic: &str,
        bodies: impl IntoIterator<Item = Vec<u8>>,
        before: usize,
        consumed: impl Fn() -> usize,
    ) -> Result<(), String> {
        let mut progress = (consumed(), Instant::now());
        for (i, body) in bodies.into_iter().enumerate() {
            while before + i >= consumed() + PACE_AHEAD {
                let now = consumed();
                if now != progress.0 {
                    progress = (now, Instant::now());
                } else if progress.1.elapsed() > Duration::from_secs(30) {
                    return Err(format!("no progress for 30 s after {i}"));
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            self.publish(topic, body).await;
        }
        Ok(())
    }

    /// Whether the broker acknowledged everything published so far within `timeout`.
    pub async fn acked_within(&self, timeout: Duration) -> bool {
        self.acks.acked_within(timeout).await
    }

    /// Waits until the broker acknowledged everything published so far; panics after 20 s.
    pub async fn wait_acked(&self) {
        self.acks.wait_acked().await
    }

    /// Publishes `{"id":"probe-<i>","data":{}}` to `topic` every `every` until `done()` holds;
    /// false if it still does not after `timeout`. For a subscription to be in place (a
    /// persistent session only keeps messages once it exists).
    pub async fn probe_until(
        &self,
        topic: &str,
        every: Duration,
        timeout: Duration,
        done: impl Fn() -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        for i in 0.. {
            self.publish(topic, format!(r#"{{"id":"probe-{i}","data":{{}}}}"#))
                .await;
            let next = Instant::now() + every;
            while Instant::now() < next {
                if done() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(20).min(every)).await;
            }
            if Instant::now() >= deadline {
                return done();
            }
        }
        false
    }
}

impl Drop for MqttPublisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An MQTT 5 client publishing at QoS 1 with properties, counting the broker's PUBACKs.
pub struct Mqtt5Publisher {
    client: rumqttc::v5::AsyncClient,
    acks: AckCount,
    task: tokio::task::JoinHandle<()>,
}

impl Mqtt5Publisher {
    /// Connects to Mosquitto on 127.0.0.1:1883 and waits (at most 10 s) for the CONNACK.
    pub async fn connect() -> Mqtt5Publisher {
        use rumqttc::v5::{mqttbytes::v5::Packet, Event};
        let mut mqtt = rumqttc::v5::MqttOptions::new(crate::unique("test-pub5"), "127.0.0.1", 1883);
        mqtt.set_keep_alive(Duration::from_secs(10));
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(mqtt, 1000);
        let acks = AckCount::default();
        let counter = acks.acked.clone();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready)
            .await
            .expect("MQTT 5 publisher connects to Mosquitto on 127.0.0.1:1883")
            .ok();
        Mqtt5Publisher { client, acks, task }
    }

    /// Publishes at QoS 1 (not retained) with `properties`.
    pub async fn publish(
        &self,
        topic: &str,
        body: impl Into<Vec<u8>>,
        properties: rumqttc::v5::mqttbytes::v5::PublishProperties,
    ) {
        self.acks.sent.fetch_add(1, Ordering::SeqCst);
        self.client
            .publish_with_properties(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                body.into(),
                properties,
            )
            .await
            .expect("queue MQTT 5 publish");
    }

    /// Waits until the broker acknowledged everything published so far; panics after 20 s.
    pub async fn wait_acked(&self) {
        self.acks.wait_acked().await
    }
}

impl Drop for Mqtt5Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}
