//! The raw limits of the machine each courier figure is divided by: how fast a bare consumer
//! drains RabbitMQ and Mosquitto, and how fast a bare client POSTs to the receiver.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{select, Either};
use futures_util::{FutureExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;

use courier_testkit::process::cpu_seconds;
use courier_testkit::Publisher;

use crate::bench::{event, Bench};
use crate::PostLimit;

/// The raw RabbitMQ drain and POST rates at the start of the run (NaN where not measured).
pub struct RawLimits {
    pub drain: f64,
    pub post: f64,
}

impl RawLimits {
    /// L for RabbitMQ -> HTTP: one drain and one POST per event, one after the other.
    pub fn limit(&self) -> f64 {
        1.0 / (1.0 / self.drain + 1.0 / self.post)
    }

    /// The same model for fanout, in deliveries/s: one message drained per ten POSTs.
    pub fn fanout_limit(&self) -> f64 {
        1.0 / (1.0 / (10.0 * self.drain) + 1.0 / self.post)
    }
}

/// The raw RabbitMQ drain (for the RabbitMQ cases) and the raw POST rate (for any drain case).
/// The raw MQTT drain is measured by the MQTT case itself, right before and right after
/// courier's run.
pub async fn limits(b: &mut Bench, needs_amqp: bool, needs_mqtt: bool) -> RawLimits {
    let drain = if needs_amqp {
        let q_raw = format!("bench-raw-{}", b.pid);
        b.fill(&q_raw, "raw", b.n).await;
        let drain = amqp_drain(&q_raw, b.n, b.args.prefetch).await;
        Publisher::connect().await.delete_queue(&q_raw).await;
        println!("raw RabbitMQ drain (lapin, parse + multiple acks): {drain:.0} events/s");
        b.raw_limits.push(format!("RabbitMQ drain {drain:.0}/s"));
        drain
    } else {
        f64::NAN
    };
    // This process is both the bare client and the receiver here; the fanout case measures the
    // receiver alone, so the difference is what a bare client spends per request.
    let post = if needs_amqp || needs_mqtt {
        // Untimed first: the first POSTs of a process (new connections, a cold receiver) can be
        // far slower than later ones, which would make L too low.
        limit_post_rate(b, &b.rx.url("/warm-up"), b.n.min(5_000)).await;
        let cpu_before = cpu_seconds(b.pid).unwrap_or(0.0);
        let post = limit_post_rate(b, &b.rx.url("/raw-post"), b.n).await;
        let post_cpu_us = (cpu_seconds(b.pid).unwrap_or(0.0) - cpu_before) * 1e6 / b.n as f64;
        println!(
            "raw HTTP POST ({}, 64 concurrent): {post:.0} requests/s, client + receiver CPU {post_cpu_us:.1} us/request",
            b.args.post_limit.name()
        );
        b.raw_limits.push(format!("POST {post:.0}/s"));
        post
    } else {
        f64::NAN
    };
    RawLimits { drain, post }
}

/// A consumer of `queue` on a connection of its own (kept open while the first is alive), with
/// `prefetch` unacked deliveries at most.
async fn amqp_consumer(queue: &str, prefetch: u16) -> (Publisher, lapin::Consumer) {
    let publisher = Publisher::connect().await;
    let ch = publisher.conn.create_channel().await.expect("channel");
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .expect("qos");
    let consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    (publisher, consumer)
}

/// A minimal lapin consumer that only parses and acks, the broker's ceiling for the prefetch:
/// events/s. It acks with `multiple` once a quarter of the prefetch is unacked, or as soon as no
/// delivery is ready, so the broker never waits for an ack and gets as few ack frames as it can.
async fn amqp_drain(queue: &str, n: usize, prefetch: u16) -> f64 {
    let (_publisher, mut consumer) = amqp_consumer(queue, prefetch).await;
    let batch = (usize::from(prefetch) / 4).max(1);
    let multiple = BasicAckOptions { multiple: true };
    let start = Instant::now();
    let mut got = 0;
    let mut unacked: Option<lapin::Acker> = None;
    let mut pending = 0;
    while got < n {
        let next = match consumer.next().now_or_never() {
            Some(next) => next,
            None => {
                if let Some(acker) = unacked.take() {
                    let _ = acker.ack(multiple).await;
                    pending = 0;
                }
                consumer.next().await
            }
        };
        let Some(Ok(d)) = next else {
            break;
        };
        let _: serde_json::Value = serde_json::from_slice(&d.data).unwrap_or_default();
        got += 1;
        pending += 1;
        if pending >= batch || got == n {
            let _ = d.acker.ack(multiple).await;
            unacked = None;
            pending = 0;
        } else {
            unacked = Some(d.acker);
        }
    }
    got as f64 / start.elapsed().as_secs_f64()
}

/// A bare client POSTing `n` bodies to `url` with `concurrency` workers: requests/s. Each
/// worker owns one HTTP/1.1 connection and drives it itself while it waits for its answer, as
/// courier does (src/http_pool.rs), without courier's work per request: the fastest POST rate
/// the receiver allows on this machine (the `clients` case compares it with other clients).
pub async fn post_rate(url: &str, n: usize, size: usize, concurrency: usize) -> f64 {
    let uri: hyper::Uri = url.parse().expect("receiver URL");
    let host = uri.authority().expect("host and port").to_string();
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (next, uri, host) = (next.clone(), uri.clone(), host.clone());
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(&host)
                .await
                .expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            let (mut sender, mut conn) =
                hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                    .await
                    .expect("handshake");
            let path = hyper::Uri::from(uri.path_and_query().expect("path").clone());
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    break;
                }
                let request = hyper::Request::post(path.clone())
                    .header("host", &host)
                    .header("content-type", "application/json")
                    .header("x-request-id", format!("p{i}"))
                    .body(Full::new(Bytes::from(event(&format!("p{i}"), size))))
                    .expect("request");
                let response = driving(&mut conn, sender.send_request(request))
                    .await
                    .expect("answer");
                let _ = driving(&mut conn, response.into_body().collect()).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// `work`'s output, polling `conn` alongside it, as a connection task would.
async fn driving<C, F>(conn: &mut C, work: F) -> F::Output
where
    C: Future + Unpin,
    F: Future,
{
    match select(conn, pin!(work)).await {
        Either::Right((out, _)) => out,
        Either::Left(_) => panic!("the receiver closed a connection"),
    }
}

/// The raw POST limit: [`post_rate`], or with `--post-limit pooled` [`pooled_post_rate`].
pub async fn limit_post_rate(b: &Bench, url: &str, n: usize) -> f64 {
    match b.args.post_limit {
        PostLimit::Driven => post_rate(url, n, b.size, 64).await,
        PostLimit::Pooled => pooled_post_rate(url, n, b.size, 64).await,
    }
}

/// What [`post_rate`] measures, with hyper-util's pooled client, which runs a task per
/// connection (the `clients` case).
pub async fn pooled_post_rate(url: &str, n: usize, size: usize, concurrency: usize) -> f64 {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client: HyperClient<_, Full<Bytes>> =
        HyperClient::builder(TokioExecutor::new()).build(connector);
    let uri: hyper::Uri = url.parse().expect("receiver URL");
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, next, uri) = (client.clone(), next.clone(), uri.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    break;
                }
                let request = hyper::Request::post(uri.clone())
                    .header("content-type", "application/json")
                    .header("x-request-id", format!("p{i}"))
                    .body(Full::new(Bytes::from(event(&format!("p{i}"), size))))
                    .expect("request");
                if let Ok(response) = client.request(request).await {
                    let _ = response.into_body().collect().await;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// What [`post_rate`] measures, with a reqwest `client` (the `clients` case).
pub async fn post_rate_with(
    client: reqwest::Client,
    url: &str,
    n: usize,
    size: usize,
    concurrency: usize,
) -> f64 {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let next = next.clone();
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    break;
                }
                let body = event(&format!("p{i}"), size);
                if let Ok(r) = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("x-request-id", format!("p{i}"))
                    .body(body)
                    .send()
                    .await
                {
                    let _ = r.bytes().await;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// A lapin consumer of `queue` that takes each event's publish time from its body as it
/// arrives and acks it by itself: the latencies, in ns, of `n` events (fewer if the queue goes
/// away).
pub async fn amqp_latencies(queue: String, n: usize, prefetch: u16) -> Vec<u64> {
    let (_publisher, mut consumer) = amqp_consumer(&queue, prefetch).await;
    let mut latencies = Vec::with_capacity(n);
    while latencies.len() < n {
        let Some(Ok(d)) = consumer.next().await else {
            break;
        };
        let now = courier_testkit::now_ns();
        if let Some(sent) = courier_testkit::receiver::sent_ns(&d.data) {
            latencies.push(now.saturating_sub(sent));
        }
        let _ = d.acker.ack(BasicAckOptions::default()).await;
    }
    latencies
}

/// A QoS 1 subscriber with manual acks that only parses and acks, fed by a paced publisher:
/// events/s.
pub async fn mqtt_drain(b: &Bench) -> f64 {
    let (n, pid) = (b.n, b.pid);
    let topic = format!("bench/raw/{pid}");
    let mut o = rumqttc::MqttOptions::new(format!("bench-sub-{pid}"), "127.0.0.1", 1883);
    o.set_manual_acks(true)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (sub, mut sub_loop) = rumqttc::AsyncClient::new(o, 10_000);
    sub.subscribe(&topic, rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let received = Arc::new(AtomicU64::new(0));
    let r = received.clone();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    let subscriber = tokio::spawn(async move {
        loop {
            match sub_loop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    if let Some(t) = ready_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let _: serde_json::Value =
                        serde_json::from_slice(&p.payload).unwrap_or_default();
                    let _ = sub.try_ack(&p);
                    r.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let _ = ready.await;
    let start = Instant::now();
    b.publish_mqtt(&topic, "r", n, || received.load(Ordering::Relaxed) as usize)
        .await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while (received.load(Ordering::Relaxed) as usize) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = received.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    subscriber.abort();
    rate
}
