//! MQTT 5 through rumqttc's `v5` client: a session kept for `session_expiry`, the broker's
//! in-flight window set by `receive_maximum`, and the message properties courier uses (user
//! properties as headers; content type, response topic and correlation data kept; the expiry
//! interval applied before the POST).
//!
//! rumqttc 0.25's v5 client always acknowledges with reason code Success (`AsyncClient::ack`
//! takes no reason); courier needs no other, since it acknowledges only a message it has settled.

use std::sync::Arc;

use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Filter, Packet, Publish, PublishProperties, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{Outgoing, TlsConfiguration, Transport};

use super::{Client, Connect, Connection, Polled, Received, MQTT_MAX_PACKET, REQUEST_CAPACITY};
use crate::config::ExpiredAction;
use crate::properties::{CorrelationData, Expiry, MessageProperties};

/// The client and the event loop, connecting first to the first URL.
pub(super) fn open(connect: &Connect) -> (V5Client, V5Connection) {
    let config = &connect.config;
    // Validated to fit: whole seconds, at most u32::MAX (which MQTT 5 reads as "never").
    let session_expiry = u32::try_from(config.session_expiry().as_secs()).unwrap_or(u32::MAX);
    let brokers: Vec<MqttOptions> = config
        .endpoints()
        .map(|url| {
            let mut options = MqttOptions::new(connect.client_id.clone(), url.host(), url.port());
            options
                .set_keep_alive(config.keep_alive)
                // A session that outlives the connection is resumed, not started again.
                .set_clean_start(session_expiry == 0)
                .set_session_expiry_interval(Some(session_expiry))
                .set_receive_maximum(Some(connect.receive_maximum))
                .set_manual_acks(true)
                .set_max_packet_size(Some(MQTT_MAX_PACKET as u32));
            if let Some((user, password)) = connect.credentials() {
                options.set_credentials(user, password);
            }
            if let (true, Some(tls)) = (url.tls(), &connect.tls) {
                // As under 3.1.1: the URL's host is the SNI, `tls.server_name` the name verified.
                options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                    Arc::clone(tls),
                )));
            }
            options
        })
        .collect();
    let (client, eventloop) = AsyncClient::new(brokers[0].clone(), REQUEST_CAPACITY);
    (
        V5Client(client),
        V5Connection {
            eventloop,
            brokers,
            expired: config.expired(),
        },
    )
}

#[derive(Clone)]
pub(super) struct V5Client(AsyncClient);

impl Client for V5Client {
    async fn subscribe(&self, filters: Vec<String>, qos: u8) -> Result<(), String> {
        let qos = match qos {
            0 => QoS::AtMostOnce,
            _ => QoS::AtLeastOnce,
        };
        let filters = filters.into_iter().map(|f| Filter::new(f, qos));
        self.0
            .subscribe_many(filters)
            .await
            .map_err(|e| e.to_string())
    }

    async fn ack(&self, pkid: u16) -> Result<(), String> {
        let mut puback = Publish::new("", QoS::AtLeastOnce, Vec::new(), None);
        puback.pkid = pkid;
        self.0.ack(&puback).await.map_err(|e| e.to_string())
    }

    fn try_disconnect(&self) -> Result<(), String> {
        self.0.try_disconnect().map_err(|e| e.to_string())
    }
}

pub(super) struct V5Connection {
    eventloop: EventLoop,
    /// The connect options of each broker URL.
    brokers: Vec<MqttOptions>,
    /// `mqtt.expired`, given to each message that carries an expiry interval.
    expired: ExpiredAction,
}

impl Connection for V5Connection {
    async fn poll(&mut self) -> Result<Polled, String> {
        let event = self
            .eventloop
            .poll()
            .await
            .map_err(|e| crate::error_chain(&e))?;
        Ok(match event {
            Event::Incoming(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => {
                Polled::Connected {
                    session_present: ack.session_present,
                }
            }
            Event::Incoming(Packet::SubAck(ack)) => Polled::SubAck(
                ack.return_codes
                    .into_iter()
                    .map(|code| match code {
                        SubscribeReasonCode::Success(qos) => Ok(qos as u8),
                        refused => Err(format!("{refused:?}")),
                    })
                    .collect(),
            ),
            Event::Incoming(Packet::Publish(publish)) => {
                Polled::Publish(received(publish, self.expired))
            }
            Event::Outgoing(Outgoing::Disconnect) => Polled::DisconnectSent,
            _ => Polled::Other,
        })
    }

    fn use_broker(&mut self, index: usize) {
        // rumqttc reads the options at every connect.
        self.eventloop.options = self.brokers[index].clone();
    }

    fn after_loss(&mut self) -> Vec<Received> {
        // As in v3.rs.
        self.eventloop.clean();
        let mut left = Vec::new();
        let expired = self.expired;
        self.eventloop.state.events.retain(|event| match event {
            Event::Incoming(Packet::Publish(publish)) => {
                left.push(received(publish.clone(), expired));
                false
            }
            _ => true,
        });
        left
    }
}

/// A PUBLISH as the session hands it on: user properties become headers (in order, so a name
/// given twice keeps its last value, as metadata keeps one value per name), the expiry counts
/// from now.
fn received(publish: Publish, expired: ExpiredAction) -> Received {
    let Publish {
        qos,
        topic,
        pkid,
        payload,
        properties,
        ..
    } = publish;
    let PublishProperties {
        message_expiry_interval,
        response_topic,
        correlation_data,
        user_properties,
        content_type,
        ..
    } = properties.unwrap_or_default();
    let kept = MessageProperties {
        content_type,
        response_topic,
        correlation_data: correlation_data.map(|bytes| CorrelationData::from_bytes(&bytes)),
    };
    Received {
        // MQTT 5 requires UTF-8 topic names; rumqttc hands them over as bytes.
        topic: String::from_utf8_lossy(&topic).into_owned(),
        pkid,
        at_most_once: qos == QoS::AtMostOnce,
        payload,
        headers: user_properties,
        properties: kept.non_empty(),
        expiry: message_expiry_interval.map(|seconds| Expiry::starting_now(seconds, expired)),
    }
}
