//! Broker failover: with `urls`, courier tries the nodes in turn. The first URL names a port
//! nothing listens on and the second the machine's real broker; courier connects to the second
//! and delivers, on both sources.

use std::time::Duration;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_goes_on_to_the_next_node() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let queue = unique("failover");
    let store = tempfile::tempdir().unwrap();
    let closed = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let config = test_defaults(store.path())
        .rabbitmq(
            Rabbit::queue(&queue)
                .connection_name(&queue)
                .urls(&[&closed, AMQP_URL]),
        )
        .destination(Dest::new("d", &rx.url("/d")));
    let publisher = Publisher::connect().await;
    publisher.declare_queue(&queue).await;
    let courier = Courier::start(&config);
    publish_events(&publisher, &queue, "F", 0..5).await;
    rx.wait_for(5, WAIT).await;
    assert_eq!(rx.delivered_distinct(), 5);
    courier.stop().await;
}

/// A node that takes TCP connections and never answers (a hung or stopped broker process) is
/// given up after the URL's `connection_timeout`, and the next node is tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_gives_up_a_node_that_takes_connections_and_never_answers() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let queue = unique("failover-hung");
    let store = tempfile::tempdir().unwrap();
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let hung = format!("amqp://guest:guest@127.0.0.1:{port}/%2f?connection_timeout=500");
    let config = test_defaults(store.path())
        .rabbitmq(
            Rabbit::queue(&queue)
                .connection_name(&queue)
                .urls(&[&hung, AMQP_URL]),
        )
        .destination(Dest::new("d", &rx.url("/d")));
    let publisher = Publisher::connect().await;
    publisher.declare_queue(&queue).await;
    let courier = Courier::start(&config);
    publish_events(&publisher, &queue, "H", 0..5).await;
    rx.wait_for(5, Duration::from_secs(10)).await;
    assert_eq!(rx.delivered_distinct(), 5);
    courier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_goes_on_to_the_next_broker() {
    mqtt_failover(MqttProtocol::V3).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_goes_on_to_the_next_broker() {
    mqtt_failover(MqttProtocol::V5).await
}

async fn mqtt_failover(protocol: MqttProtocol) {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let store = tempfile::tempdir().unwrap();
    let topic = unique("failover");
    let closed = format!("mqtt://127.0.0.1:{}", free_port());
    let config = test_defaults(store.path())
        .mqtt(
            mqtt_source_as(&unique("courier-failover"), &topic, protocol)
                .urls(&[&closed, courier_testkit::config::MQTT_URL]),
        )
        .destination(Dest::new("d", &rx.url("/d")));
    let courier = Courier::start(&config);
    let publisher = subscribed_publisher(&topic, &rx).await;
    for i in 0..5 {
        publisher
            .publish(&topic, event(&format!("M{i}"), "t").into_bytes())
            .await;
    }
    eventually("the five events arrive", WAIT, || {
        (0..5).all(|i| rx.delivered_counts().contains_key(&format!("M{i}")))
    })
    .await;
    courier.stop().await;
}
