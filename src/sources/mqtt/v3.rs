//! MQTT 3.1.1 through rumqttc's client: a session kept by `clean_session = false`, and messages
//! with no properties.

use std::sync::Arc;

use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS,
    SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};

use super::{Client, Connect, Connection, Polled, Received, MQTT_MAX_PACKET, REQUEST_CAPACITY};

/// The client and the event loop, connecting first to the first URL.
pub(super) fn open(connect: &Connect) -> (V3Client, V3Connection) {
    let brokers: Vec<MqttOptions> = connect
        .config
        .endpoints()
        .map(|url| {
            let mut options = MqttOptions::new(connect.client_id.clone(), url.host(), url.port());
            options
                .set_keep_alive(connect.config.keep_alive)
                .set_clean_session(!connect.config.persistent_session())
                .set_manual_acks(true)
                .set_max_packet_size(MQTT_MAX_PACKET, MQTT_MAX_PACKET);
            if let Some((user, password)) = connect.credentials() {
                options.set_credentials(user, password);
            }
            if let (true, Some(tls)) = (url.tls(), &connect.tls) {
                // rumqttc sends the URL's host as SNI (none for an IP address);
                // `tls.server_name` changes the name the certificate is verified against.
                options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                    Arc::clone(tls),
                )));
            }
            options
        })
        .collect();
    let (client, eventloop) = AsyncClient::new(brokers[0].clone(), REQUEST_CAPACITY);
    (V3Client(client), V3Connection { eventloop, brokers })
}

#[derive(Clone)]
pub(super) struct V3Client(AsyncClient);

impl Client for V3Client {
    async fn subscribe(&self, filters: Vec<String>, qos: u8) -> Result<(), String> {
        let qos = qos_of(qos);
        let filters = filters.into_iter().map(|f| SubscribeFilter::new(f, qos));
        self.0
            .subscribe_many(filters)
            .await
            .map_err(|e| e.to_string())
    }

    async fn ack(&self, pkid: u16) -> Result<(), String> {
        let mut puback = Publish::new("", QoS::AtLeastOnce, Vec::new());
        puback.pkid = pkid;
        self.0.ack(&puback).await.map_err(|e| e.to_string())
    }

    fn try_disconnect(&self) -> Result<(), String> {
        self.0.try_disconnect().map_err(|e| e.to_string())
    }
}

pub(super) struct V3Connection {
    eventloop: EventLoop,
    /// The connect options of each broker URL.
    brokers: Vec<MqttOptions>,
}

impl Connection for V3Connection {
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
                        SubscribeReasonCode::Failure => Err("failure".to_string()),
                    })
                    .collect(),
            ),
            Event::Incoming(Packet::Publish(publish)) => Polled::Publish(received(publish)),
            Event::Outgoing(Outgoing::Disconnect) => Polled::DisconnectSent,
            _ => Polled::Other,
        })
    }

    fn use_broker(&mut self, index: usize) {
        // rumqttc reads the options at every connect.
        self.eventloop.mqtt_options = self.brokers[index].clone();
    }

    fn after_loss(&mut self) -> Vec<Received> {
        // clean() takes the PUBACKs out of the request channel, as rumqttc does at the loss;
        // a PUBACK that was waiting for room in the channel then may have landed since.
        self.eventloop.clean();
        let mut left = Vec::new();
        self.eventloop.state.events.retain(|event| match event {
            Event::Incoming(Packet::Publish(publish)) => {
                left.push(received(publish.clone()));
                false
            }
            _ => true,
        });
        left
    }
}

/// A PUBLISH as the session hands it on.
fn received(publish: Publish) -> Received {
    Received {
        topic: publish.topic,
        pkid: publish.pkid,
        at_most_once: publish.qos == QoS::AtMostOnce,
        payload: publish.payload,
        headers: Vec::new(),
        properties: None,
        expiry: None,
    }
}

fn qos_of(qos: u8) -> QoS {
    match qos {
        0 => QoS::AtMostOnce,
        _ => QoS::AtLeastOnce,
    }
}
