//! A RabbitMQ client for tests and the benchmark: publishing with confirms, and what
//! `rabbitmqctl` says about queues.

use std::time::{Duration, Instant};

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, PublisherConfirm};

use crate::brokers::rabbitmqctl;

/// The local RabbitMQ, as guest, on the default vhost.
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A RabbitMQ connection and a channel with publisher confirms on.
pub struct Publisher {
    pub conn: Connection,
    pub channel: Channel,
}

impl Publisher {
    pub async fn connect() -> Publisher {
        Self::connect_to(AMQP_URL).await
    }

    pub async fn connect_to(url: &str) -> Publisher {
        crate::install_crypto_provider();
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("RabbitMQ on 127.0.0.1:5672 (scripts/test.sh starts it)");
        let channel = conn.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm_select");
        Publisher { conn, channel }
    }

    /// Declares the durable queue courier will consume, so messages published before courier
    /// connects are kept; returns how many messages are ready in it.
    pub async fn declare_queue(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue_declare")
            .message_count()
    }

    /// Deletes `queue` if it exists.
    pub async fn delete_queue(&self, queue: &str) {
        let _ = self
            .channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
    }

    /// `queue` declared afresh: deleted with whatever it held, then declared empty.
    pub async fn fresh_queue(&self, queue: &str) {
        self.delete_queue(queue).await;
        self.declare_queue(queue).await;
    }

    /// Publishes a persistent message to the default exchange straight into `queue`; the
    /// returned confirm resolves once the broker has it.
    pub async fn send(&self, queue: &str, body: &[u8]) -> PublisherConfirm {
        self.channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("basic_publish")
    }

    /// Publishes into `queue` and waits for the broker's confirm.
    pub async fn to_queue(&self, queue: &str, body: &[u8]) {
        self.publish("", queue, body, BasicProperties::default())
            .await;
    }

    /// Publishes every body into `queue`, `batch` at a time before waiting for their confirms.
    pub async fn fill(&self, queue: &str, bodies: impl IntoIterator<Item = Vec<u8>>, batch: usize) {
        let mut bodies = bodies.into_iter().peekable();
        while bodies.peek().is_some() {
            let mut confirms = Vec::with_capacity(batch);
            for body in bodies.by_ref().take(batch) {
                confirms.push(self.send(queue, &body).await);
            }
            for confirm in confirms {
                confirm.await.expect("publisher confirm");
            }
        }
    }

    /// Publishes a persistent message and waits for the broker's confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) {
        self.channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                props.with_delivery_mode(2),
            )
            .await
            .expect("basic_publish")
            .await
            .expect("publisher confirm");
    }

    /// Ready and unacked counts for `queue`, from `rabbitmqctl`.
    pub fn counts(queue: &str) -> (u64, u64) {
        Self::counts_in("/", queue)
    }

    pub fn counts_in(vhost: &str, queue: &str) -> (u64, u64) {
        let out = rabbitmqctl(&[
            "list_queues",
            "-p",
            vhost,
            "-q",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ]);
        for line in out.lines() {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() == 3 && cols[0] == queue {
                return (
                    cols[1].parse().unwrap_or(u64::MAX),
                    cols[2].parse().unwrap_or(u64::MAX),
                );
            }
        }
        panic!("queue {queue} not found in rabbitmqctl output:\n{out}");
    }

    /// Waits until `queue` exists and has `n` consumers (i.e. courier declared and subscribed).
    pub async fn wait_consumers(&self, queue: &str, n: u32) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // A passive declare on a missing queue closes the channel, so use a throwaway one.
            if let Ok(ch) = self.conn.create_channel().await {
                if let Ok(q) = ch
                    .queue_declare(
                        queue.into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                {
                    if q.consumer_count() >= n {
                        let _ = ch.close(200, "ok".into()).await;
                        return;
                    }
                }
                let _ = ch.close(200, "ok".into()).await;
            }
            if Instant::now() > deadline {
                panic!("queue {queue} did not get {n} consumer(s) within 20s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
