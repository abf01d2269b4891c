//! One function per case: each runs courier (or the Python baseline, or the router), prints its
//! line, records lost or duplicated events in `Bench::failures`, and returns its figures.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use courier_testkit::process::cpu_seconds;
use courier_testkit::{ConfigBuilder, Dest, Mqtt, MqttPublisher, Publisher, Rabbit, AMQP_URL};

use crate::bench::{event, Bench};
use crate::raw;

/// courier's RSS at idle, in KiB: subscribed to an empty queue for 3 s.
pub async fn idle(b: &Bench) -> u64 {
    let q_idle = format!("bench-idle-{}", b.pid);
    let publisher = Publisher::connect().await;
    publisher.fresh_queue(&q_idle).await;
    let courier = b.spawn_amqp("idle", &q_idle);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_kib = courier.rss_kib();
    courier.stop().await;
    publisher.delete_queue(&q_idle).await;
    idle_kib
}

/// The RabbitMQ -> HTTP case's figures.
pub struct AmqpFigures {
    /// Events/s.
    pub rate: f64,
    /// courier's CPU µs per event.
    pub cpu_us: f64,
    pub peak_kib: u64,
}

/// courier draining a pre-filled queue to one destination, against `limit` (L).
pub async fn amqp(b: &mut Bench, limit: f64) -> AmqpFigures {
    let n = b.n;
    let q = format!("bench-courier-{}", b.pid);
    b.fill(&q, "c", n).await;
    let courier = b.spawn_amqp("amqp", &q);
    let start = Instant::now();
    let done = b
        .wait_unique("/amqp", n, Duration::from_secs(600), || courier.exited())
        .await;
    // What arrived, over the time it took: a run that did not finish counts only its events.
    let rate = match done {
        Some(d) => n as f64 / (d - start).as_secs_f64(),
        None => b.rx.unique("/amqp") as f64 / start.elapsed().as_secs_f64(),
    };
    let cpu_us = courier.cpu_seconds() * 1e6 / n as f64;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let peak_kib = courier.peak_rss_kib();
    courier.stop().await;
    Publisher::connect().await.delete_queue(&q).await;
    if done.is_none() {
        b.failures.push(format!(
            "RabbitMQ: only {} of {n} events arrived",
            b.rx.unique("/amqp")
        ));
    }
    let dups = b.rx.duplicates("/amqp");
    if dups > 0 {
        b.failures
            .push(format!("RabbitMQ: {dups} events POSTed twice"));
    }
    println!(
        "courier RabbitMQ -> HTTP: {rate:.0} events/s = {:.2} x L (L = {limit:.0}/s), courier CPU {cpu_us:.1} us/event",
        rate / limit
    );
    AmqpFigures {
        rate,
        cpu_us,
        peak_kib,
    }
}

/// The Python aio-pika + aiohttp worker on the same kind of queue: events/s, `None` if it did
/// not finish.
pub async fn python(b: &Bench, courier_rate: f64) -> Option<f64> {
    let n = b.n;
    let q_py = format!("bench-python-{}", b.pid);
    b.fill(&q_py, "py", n).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python_baseline.py");
    let started = Instant::now();
    let python = Command::new("python3")
        .args([
            script,
            AMQP_URL,
            &q_py,
            &b.rx.url("/python"),
            &b.args.prefetch.to_string(),
            &n.to_string(),
        ])
        .stdout(Stdio::null())
        .spawn();
    let py_rate = match python {
        Ok(mut child) => {
            // Polled in short steps so a baseline that dies (a missing package) ends the wait.
            let deadline = Instant::now() + Duration::from_secs(900);
            let done = loop {
                if let Some(at) = b
                    .wait_unique("/python", n, Duration::from_millis(500), || false)
                    .await
                {
                    break Some(at);
                }
                if let Ok(Some(status)) = child.try_wait() {
                    println!(
                        "python baseline exited early ({status}), after {} of {n} events",
                        b.rx.unique("/python")
                    );
                    break None;
                }
                if Instant::now() > deadline {
                    break None;
                }
            };
            let _ = child.kill();
            let _ = child.wait();
            done.map(|d| n as f64 / (d - started).as_secs_f64())
        }
        Err(e) => {
            println!("python baseline not run: {e}");
            None
        }
    };
    Publisher::connect().await.delete_queue(&q_py).await;
    match py_rate {
        Some(r) => println!(
            "python aio-pika + aiohttp worker: {r:.0} events/s (courier is {:.1}x)",
            courier_rate / r
        ),
        None => println!(
            "python aio-pika + aiohttp worker: did not finish (pip install -r tools/courier-bench/requirements.txt)"
        ),
    }
    py_rate
}

/// The MQTT -> HTTP case's figures.
pub struct MqttFigures {
    /// Events/s.
    pub rate: f64,
    /// courier's CPU µs per event.
    pub cpu_us: f64,
    pub peak_kib: u64,
    /// L, from the mean raw figures before and after.
    pub limit: f64,
}

/// courier subscribed to a topic that a paced publisher fills, between two measurements of the
/// raw limits. `post` is the POST rate from the start of the run; it is measured again when the
/// RabbitMQ cases ran first (`after_amqp`), since by then it is a minute or more old, and L is
/// meant to describe the machine during this case.
pub async fn mqtt(b: &mut Bench, run: usize, post: f64, after_amqp: bool) -> MqttFigures {
    let (n, pid) = (b.n, b.pid);
    let post_before = if after_amqp {
        let p = raw::limit_post_rate(b, &b.rx.url("/raw-post-before"), n).await;
        println!("raw HTTP POST again before the MQTT run: {p:.0} requests/s");
        b.raw_limits
            .push(format!("before the MQTT run: POST {p:.0}/s"));
        p
    } else {
        post
    };
    let drain_before = raw::mqtt_drain(b).await;
    println!("raw MQTT QoS 1 drain (rumqttc, manual acks) before the MQTT run: {drain_before:.0} events/s");
    b.raw_limits.push(format!("MQTT drain {drain_before:.0}/s"));
    // Every run has its own ids, topic, client and receiver path.
    let path = format!("/mqtt{run}");
    let path = path.as_str();
    let topic = format!("bench/courier/{pid}/{run}/e");
    let probe_topic = format!("bench/courier/{pid}/{run}/probe");
    let courier = b.spawn("mqtt", |c| {
        c.mqtt(Mqtt::new(
            &format!("bench-courier-{pid}-{run}"),
            &format!("bench/courier/{pid}/{run}/#"),
        ))
        .destination(b.dest("d", path))
    });
    // Only a subscription that exists keeps messages: probe until one comes through.
    let probe = MqttPublisher::connect().await;
    probe
        .probe_until(
            &probe_topic,
            Duration::from_millis(100),
            Duration::from_secs(30),
            || b.rx.unique(path) > 0 || courier.exited(),
        )
        .await;
    drop(probe);
    if b.rx.unique(path) == 0 {
        b.failures.push(
            "MQTT: courier never subscribed (no probe came through in 30 s, or courier exited)"
                .into(),
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let probes = b.rx.unique(path);
    let cpu_before = courier.cpu_seconds();
    let start = Instant::now();
    b.publish_mqtt(&topic, &format!("m{run}-"), n, || {
        b.rx.unique(path).saturating_sub(probes)
    })
    .await;
    let done = b
        .wait_unique(path, n + probes, Duration::from_secs(600), || {
            courier.exited()
        })
        .await;
    let rate = match done {
        Some(d) => n as f64 / (d - start).as_secs_f64(),
        None => b.rx.unique(path).saturating_sub(probes) as f64 / start.elapsed().as_secs_f64(),
    };
    let peak_kib = courier.peak_rss_kib();
    let cpu_us = (courier.cpu_seconds() - cpu_before) * 1e6 / n as f64;
    courier.stop().await;
    // The raw limits again, right after: L is the model of their means, so a slow or fast spell
    // during one raw measurement moves the ratio half as much.
    let post_after = raw::limit_post_rate(b, &b.rx.url("/raw-post-after"), n).await;
    let drain_after = raw::mqtt_drain(b).await;
    println!(
        "raw limits again after the MQTT run: POST {post_after:.0} requests/s, MQTT drain {drain_after:.0} events/s"
    );
    b.raw_limits.push(format!(
        "after the MQTT run: POST {post_after:.0}/s, MQTT drain {drain_after:.0}/s"
    ));
    let limit = 1.0 / (2.0 / (drain_before + drain_after) + 2.0 / (post_before + post_after));
    if done.is_none() {
        b.failures.push(format!(
            "MQTT: only {} of {n} events arrived",
            b.rx.unique(path).saturating_sub(probes)
        ));
    }
    if b.rx.duplicates(path) > 0 {
        b.failures.push(format!(
            "MQTT: {} events POSTed twice",
            b.rx.duplicates(path)
        ));
    }
    println!(
        "courier MQTT -> HTTP: {rate:.0} events/s = {:.2} x L (L = {limit:.0}/s, from the mean raw figures before and after), courier CPU {cpu_us:.1} us/event",
        rate / limit
    );
    MqttFigures {
        rate,
        cpu_us,
        peak_kib,
        limit,
    }
}

/// Publish-to-receive latency at `rate` events/s for `--latency-seconds`: (p50, p99, max) in
/// ms, for courier and then, on a queue of its own, for RabbitMQ alone (a lapin consumer that
/// acks each event as it arrives, no HTTP): the part of the latency courier cannot remove.
pub async fn latency(b: &Bench, rate: u64) -> Latency {
    let a = &b.args;
    let q_lat = format!("bench-latency-{rate}-{}", b.pid);
    let publisher = Publisher::connect().await;
    publisher.fresh_queue(&q_lat).await;
    let name = format!("latency{rate}");
    let courier = b.spawn_amqp(&name, &q_lat);
    tokio::time::sleep(Duration::from_secs(2)).await;
    b.rx.record_latency(true);
    let total = (rate * a.latency_seconds) as usize;
    let (started, cpu_before) = (Instant::now(), courier.cpu_seconds());
    let offered = publish_paced(&publisher, &q_lat, rate, total, b.size).await;
    let _ = b
        .wait_unique(&format!("/{name}"), total, Duration::from_secs(60), || {
            courier.exited()
        })
        .await;
    // What courier costs at a steady rate well below its limit: the CPU a deployment sizes for.
    let cpu = courier.cpu_seconds() - cpu_before;
    let (cpu_us, cores) = (
        cpu * 1e6 / total.max(1) as f64,
        cpu / started.elapsed().as_secs_f64(),
    );
    b.rx.record_latency(false);
    courier.stop().await;
    publisher.delete_queue(&q_lat).await;
    let courier = Percentiles::of(b.rx.take_latencies_ns());
    println!(
        "latency at {rate} events/s for {} s (published at {offered:.0}/s): {courier} ({} samples), courier CPU {cpu_us:.1} us/event ({cores:.2} of a core)",
        a.latency_seconds, courier.samples
    );

    let q_raw = format!("bench-latency-raw-{rate}-{}", b.pid);
    publisher.fresh_queue(&q_raw).await;
    let consumer = tokio::spawn(raw::amqp_latencies(q_raw.clone(), total, a.prefetch));
    tokio::time::sleep(Duration::from_millis(500)).await;
    publish_paced(&publisher, &q_raw, rate, total, b.size).await;
    let raw = match tokio::time::timeout(Duration::from_secs(60), consumer).await {
        Ok(Ok(latencies)) => Percentiles::of(latencies),
        _ => Percentiles::of(Vec::new()),
    };
    publisher.delete_queue(&q_raw).await;
    println!("raw RabbitMQ publish-to-consume latency at {rate} events/s (lapin, ack on arrival, no HTTP): {raw} ({} samples)", raw.samples);
    Latency {
        rate,
        courier,
        raw,
        cpu_us,
        cores,
    }
}

/// The latency figures of one rate.
pub struct Latency {
    pub rate: u64,
    pub courier: Percentiles,
    pub raw: Percentiles,
    /// courier's CPU per event over the run, µs.
    pub cpu_us: f64,
    /// courier's CPU over the run, in cores.
    pub cores: f64,
}

/// p50, p99 and max of a set of latencies, in ms.
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub samples: usize,
}

impl Percentiles {
    fn of(mut ns: Vec<u64>) -> Percentiles {
        ns.sort_unstable();
        let ms = |v: Option<&u64>| v.copied().unwrap_or(0) as f64 / 1e6;
        let at =
            |p: f64| ms(ns.get(((ns.len() as f64 * p) as usize).min(ns.len().saturating_sub(1))));
        Percentiles {
            p50: at(0.50),
            p99: at(0.99),
            max: ms(ns.last()),
            samples: ns.len(),
        }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.p50, self.p99, self.max
        )
    }
}

/// Publishes `total` events to `queue` at `rate` a second, each carrying its publish time, with
/// publisher confirms awaited every 100: the offered rate.
async fn publish_paced(
    publisher: &Publisher,
    queue: &str,
    rate: u64,
    total: usize,
    size: usize,
) -> f64 {
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let start = Instant::now();
    let mut confirms = Vec::new();
    for i in 0..total {
        let due = start + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        confirms.push(
            publisher
                .send(queue, &event(&format!("l{rate}-{i}"), size))
                .await,
        );
        if confirms.len() >= 100 {
            for c in confirms.drain(..) {
                let _ = c.await;
            }
        }
    }
    for c in confirms {
        let _ = c.await;
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// One event to 10 destinations, a fifth of `--events` of them: deliveries/s and courier's CPU
/// µs per delivery.
pub async fn fanout(b: &mut Bench, fanout_limit: f64) -> (f64, f64) {
    let fan_n = (b.n / 5).max(1000);
    let q_fan = format!("bench-fanout-{}", b.pid);
    b.fill(&q_fan, "f", fan_n).await;
    let courier = b.spawn("fanout", |c| {
        c.rabbitmq(b.rabbit(&q_fan))
            .destinations((0..10).map(|i| b.dest(&format!("f{i}"), &format!("/fan{i}"))))
    });
    let cpu_before = cpu_seconds(b.pid).unwrap_or(0.0);
    let start = Instant::now();
    let mut fan_done = true;
    for i in 0..10 {
        if b.wait_unique(&format!("/fan{i}"), fan_n, Duration::from_secs(600), || {
            courier.exited()
        })
        .await
        .is_none()
        {
            fan_done = false;
        }
    }
    let delivered: usize = if fan_done {
        fan_n * 10
    } else {
        (0..10).map(|i| b.rx.unique(&format!("/fan{i}"))).sum()
    };
    let fan_rate = delivered as f64 / start.elapsed().as_secs_f64();
    let fan_cpu_us = courier.cpu_seconds() * 1e6 / (fan_n * 10) as f64;
    let receiver_cpu_us =
        (cpu_seconds(b.pid).unwrap_or(0.0) - cpu_before) * 1e6 / (fan_n * 10) as f64;
    courier.stop().await;
    Publisher::connect().await.delete_queue(&q_fan).await;
    if !fan_done {
        b.failures.push("fanout: not every delivery arrived".into());
    }
    println!("fanout to 10 destinations: {fan_rate:.0} deliveries/s = {:.2} x L_fanout (L_fanout = {fanout_limit:.0}/s), courier CPU {fan_cpu_us:.1} us/delivery, receiver CPU {receiver_cpu_us:.1} us/delivery", fan_rate / fanout_limit);
    (fan_rate, fan_cpu_us)
}

/// Matching 1,000 topics against 10,000 destination patterns, 1,000 rounds: ns per event.
pub fn routing() -> f64 {
    let dests = (0..10_000).map(|i| {
        let pattern = match i % 4 {
            0 => format!("tempo.site{i}.batch.*"),
            1 => format!("tempo/site{i}/#"),
            2 => format!("tempo.site{i}.+.status"),
            _ => format!("tempo.site{i}.equipment.run"),
        };
        Dest::new(&format!("r{i}"), "http://127.0.0.1/").topics([pattern])
    });
    let text = ConfigBuilder::new("unused")
        .rabbitmq(Rabbit::queue("q").url("amqp://127.0.0.1"))
        .destinations(dests)
        .toml();
    let match_count = router(&text);
    let topics: Vec<String> = (0..1000)
        .map(|i| format!("tempo.site{}.batch.batch_run_status", i * 7))
        .collect();
    let rounds = 1000;
    let start = Instant::now();
    let mut matched = 0usize;
    for _ in 0..rounds {
        for t in &topics {
            matched += match_count(t);
        }
    }
    let per_event_ns = start.elapsed().as_nanos() as f64 / (rounds * topics.len()) as f64;
    println!(
        "routing with 10,000 patterns: {:.0} ns per event ({matched} matches)",
        per_event_ns
    );
    per_event_ns
}

// courier API: the one place the benchmark calls into the library. Builds courier's router for
// the destinations of `config_text` and returns how many destinations a topic matches.
fn router(config_text: &str) -> impl Fn(&str) -> usize {
    let config = courier::Config::from_toml(config_text).expect("routing config");
    let router = courier::router::Router::new(config.destinations);
    move |topic| router.match_topic(topic).len()
}
