//! Slow partners: a receiver that answers after a fixed latency, whose limit is
//! `max_concurrency / latency`, alone over RabbitMQ, and next to a fast destination over each
//! source, which shows what MQTT's in-order PUBACKs cost the fast one.

use std::time::{Duration, Instant};

use courier_testkit::{Dest, Mqtt, Publisher, Receiver, Recording, Source};

use crate::bench::{event_on, wait_unique_on, Bench};

/// A slow destination alone: its rate against `max_concurrency / latency`.
pub struct SlowFigures {
    pub latency_ms: u64,
    /// Events/s, from the first answer to the last.
    pub rate: f64,
    pub limit: f64,
}

/// A slow and a fast destination fed by one source, every other event for each.
pub struct MixFigures {
    pub source: &'static str,
    pub latency_ms: u64,
    pub slow_rate: f64,
    pub fast_rate: f64,
    /// The slow destination's limit, `max_concurrency / latency`.
    pub limit: f64,
}

/// The slow destination's receiver and its limit, and how many events make the run last about
/// `--slow-seconds` at that limit.
async fn slow_receiver(b: &Bench, latency: Duration) -> (Receiver, f64, usize) {
    // Only the full recording can answer late; at these rates its cost does not matter.
    let rx = Receiver::start_with(Recording::Full).await;
    rx.set_delay(latency);
    let limit = b.args.max_concurrency as f64 / latency.as_secs_f64();
    let n = ((limit * b.args.slow_seconds as f64) as usize).max(100);
    (rx, limit, n)
}

/// Events/s from the first arrival at `path` to the `n`th, not counting the first answers, which
/// come together (one per slot): they are counted `settle` after the first one, so that a burst
/// still arriving is not counted as taking no time. `None` when they did not all arrive within
/// `timeout`.
async fn rate_from_first(
    rx: &Receiver,
    path: &str,
    n: usize,
    settle: Duration,
    timeout: Duration,
    exited: impl Fn() -> bool,
) -> Option<f64> {
    let deadline = Instant::now() + timeout;
    while rx.unique(path) == 0 {
        if Instant::now() > deadline || exited() {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let t0 = Instant::now();
    tokio::time::sleep(settle).await;
    let seen = rx.unique(path);
    let done = wait_unique_on(rx, path, n, deadline - Instant::now(), exited).await?;
    Some(n.saturating_sub(seen) as f64 / (done - t0).as_secs_f64())
}

/// courier draining a pre-filled queue to one destination that answers after `latency`.
pub async fn slow(b: &mut Bench, latency: Duration) -> SlowFigures {
    let ms = latency.as_millis() as u64;
    let (rx, limit, n) = slow_receiver(b, latency).await;
    let q = format!("bench-slow{ms}-{}", b.pid);
    b.fill(&q, &format!("s{ms}-"), n).await;
    let courier = b.spawn(&format!("slow{ms}"), |c| {
        c.rabbitmq(b.rabbit(&q)).destination(
            Dest::new("slow", &rx.url("/slow")).max_concurrency(b.args.max_concurrency),
        )
    });
    let rate = rate_from_first(
        &rx,
        "/slow",
        n,
        latency / 4,
        Duration::from_secs(300),
        || courier.exited(),
    )
    .await;
    courier.stop().await;
    Publisher::connect().await.delete_queue(&q).await;
    check(
        &mut b.failures,
        &format!("slow {ms} ms"),
        &rx,
        "/slow",
        n,
        rate.is_some(),
    );
    let rate = rate.unwrap_or(0.0);
    println!(
        "slow partner ({ms} ms, max_concurrency {}), RabbitMQ: {rate:.0} events/s = {:.2} x limit (limit = {limit:.0}/s), at most {} requests at the receiver at once",
        b.args.max_concurrency,
        rate / limit,
        rx.max_concurrent()
    );
    SlowFigures {
        latency_ms: ms,
        rate,
        limit,
    }
}

/// One slow destination (answering after `latency`) and one fast one on the run's receiver, fed
/// alternately by `source`: each one's rate from its first arrival.
pub async fn mix(b: &mut Bench, source: Source, latency: Duration) -> MixFigures {
    let ms = latency.as_millis() as u64;
    let (slow_rx, limit, n) = slow_receiver(b, latency).await;
    let tag = source.tag();
    let name = format!("mix-{tag}-{ms}");
    let fast_path = format!("/{name}-fast");
    let (pid, size) = (b.pid, b.size);
    let bodies = move || {
        (0..2 * n).map(move |i| {
            let (kind, k) = if i % 2 == 0 {
                ("slow", i / 2)
            } else {
                ("fast", i / 2)
            };
            event_on(&format!("{kind}{ms}-{k}"), &format!("bench.{kind}"), size)
        })
    };
    let dests = |b: &Bench| {
        [
            Dest::new("slow", &slow_rx.url("/slow"))
                .max_concurrency(b.args.max_concurrency)
                .topics(["bench.slow"]),
            // The probes that show the MQTT subscription is in place come here too.
            b.dest("fast", &fast_path)
                .topics(["bench.fast".to_string(), format!("bench/{name}/#")]),
        ]
    };
    let q = format!("bench-{name}-{pid}");
    let courier = match source {
        Source::Rabbitmq => {
            let publisher = Publisher::connect().await;
            publisher.fresh_queue(&q).await;
            publisher.fill(&q, bodies(), 2000).await;
            let dests = dests(&*b);
            b.spawn(&name, |c| c.rabbitmq(b.rabbit(&q)).destinations(dests))
        }
        Source::Mqtt => {
            let filter = format!("bench/{name}/{pid}/#");
            let dests = dests(&*b);
            let courier = b.spawn(&name, |c| {
                c.mqtt(Mqtt::new(&format!("bench-{name}-{pid}"), &filter))
                    .destinations(dests)
            });
            // The subscription exists once courier has connected; a probe on the fast path
            // shows it.
            let probe = courier_testkit::MqttPublisher::connect().await;
            probe
                .probe_until(
                    &format!("bench/{name}/{pid}/probe"),
                    Duration::from_millis(100),
                    Duration::from_secs(30),
                    || b.rx.unique(&fast_path) > 0 || courier.exited(),
                )
                .await;
            drop(probe);
            courier
        }
    };
    let probes = b.rx.unique(&fast_path);
    let exited = || courier.exited();
    let slow_and_fast = async {
        tokio::join!(
            rate_from_first(
                &slow_rx,
                "/slow",
                n,
                latency / 4,
                Duration::from_secs(300),
                exited
            ),
            rate_from_first(
                &b.rx,
                &fast_path,
                n + probes,
                latency / 4,
                Duration::from_secs(300),
                exited
            ),
        )
    };
    let (slow_rate, fast_rate) = match source {
        Source::Rabbitmq => slow_and_fast.await,
        Source::Mqtt => {
            let consumed = || slow_rx.unique("/slow") + b.rx.unique(&fast_path) - probes;
            let topic = format!("bench/{name}/{pid}/e");
            let publish = b.publish_mqtt_bodies(&topic, &name, bodies(), consumed);
            tokio::join!(publish, slow_and_fast).1
        }
    };
    courier.stop().await;
    if source == Source::Rabbitmq {
        Publisher::connect().await.delete_queue(&q).await;
    }
    let what = format!("{} mix {ms} ms", source.name());
    check(
        &mut b.failures,
        &what,
        &slow_rx,
        "/slow",
        n,
        slow_rate.is_some(),
    );
    check(
        &mut b.failures,
        &what,
        &b.rx,
        &fast_path,
        n + probes,
        fast_rate.is_some(),
    );
    let (slow_rate, fast_rate) = (slow_rate.unwrap_or(0.0), fast_rate.unwrap_or(0.0));
    println!(
        "slow ({ms} ms) and fast destination, every other event, {}: slow {slow_rate:.0} events/s = {:.2} x limit (limit = {limit:.0}/s), fast {fast_rate:.0} events/s",
        source.name(),
        slow_rate / limit
    );
    MixFigures {
        source: source.name(),
        latency_ms: ms,
        slow_rate,
        fast_rate,
        limit,
    }
}

/// Records a lost or duplicated event of the run `what` in `failures`.
fn check(failures: &mut Vec<String>, what: &str, rx: &Receiver, path: &str, n: usize, done: bool) {
    if !done {
        failures.push(format!(
            "{what}: only {} of {n} events arrived at {path}",
            rx.unique(path)
        ));
    }
    let dups = rx.duplicates(path);
    if dups > 0 {
        failures.push(format!("{what}: {dups} events POSTed twice to {path}"));
    }
}
