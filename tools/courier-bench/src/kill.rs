//! The duplicate bound after `kill -9`: courier killed in the middle of a stream and started
//! again at once on the same store (and, over MQTT, the same session), `--kills` times in a row
//! per source; each kill's second POSTs are counted and the worst is checked against the bound
//! docs/reliability.md states.

use std::time::Duration;

use courier_testkit::{ConfigBuilder, Mqtt, MqttPublisher, Publisher, Source};

use crate::bench::{event, Bench, BenchCourier};

/// What `--kills` kills of one source cost.
pub struct KillFigures {
    pub source: &'static str,
    pub kills: usize,
    /// The most events POSTed twice after one kill.
    pub worst: usize,
    pub total: usize,
    /// The bound `worst` is checked against.
    pub bound: usize,
}

/// Kills courier `--kills` times while `source` streams to it, each time once half of a round of
/// `--kill-events` events has arrived.
pub async fn kill_bound(b: &mut Bench, source: Source) -> KillFigures {
    let max_in_flight = b.args.kill_max_in_flight;
    let tag = source.tag();
    let name = format!("kill-{tag}");
    let path = format!("/{name}");
    let pid = b.pid;
    let dir = b.case_dir(&name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    let q = format!("bench-{name}-{pid}");
    let topic = format!("bench/{name}/{pid}/e");
    let publisher = Publisher::connect().await;
    if source == Source::Rabbitmq {
        publisher.fresh_queue(&q).await;
    }
    let configure = |c: ConfigBuilder| {
        let c = c.max_in_flight(max_in_flight);
        let c = match source {
            Source::Rabbitmq => c.rabbitmq(b.rabbit(&q)),
            Source::Mqtt => c.mqtt(Mqtt::new(
                &format!("bench-{name}-{pid}"),
                &format!("bench/{name}/{pid}/#"),
            )),
        };
        c.destination(b.dest("d", &path))
    };
    let mut courier = Some(b.spawn_in(dir.clone(), configure));
    if source == Source::Mqtt {
        let probe = MqttPublisher::connect().await;
        probe
            .probe_until(
                &format!("bench/{name}/{pid}/probe"),
                Duration::from_millis(100),
                Duration::from_secs(30),
                || b.rx.unique(&path) > 0,
            )
            .await;
    }
    let round = b.args.kill_events;
    let (mut worst, mut total, mut counted) = (0, 0, b.rx.duplicates(&path));
    let mut lost = false;
    for k in 0..b.args.kills {
        let base = b.rx.unique(&path);
        let bodies = (0..round).map(|i| event(&format!("k{k}-{i}"), b.size));
        // Kill once half the round has arrived, start again at once, wait for the rest.
        let kill_and_restart = async {
            let half = b
                .wait_unique(&path, base + round / 2, Duration::from_secs(60), || false)
                .await;
            if let Some(running) = courier.take() {
                BenchCourier::kill9(running);
            }
            courier = Some(b.spawn_in(dir.clone(), configure));
            let all = b
                .wait_unique(&path, base + round, Duration::from_secs(60), || false)
                .await;
            half.is_some() && all.is_some()
        };
        let arrived = match source {
            Source::Rabbitmq => {
                publisher.fill(&q, bodies, 2000).await;
                kill_and_restart.await
            }
            Source::Mqtt => {
                let consumed = || b.rx.unique(&path) - base;
                let client = format!("{name}-{k}");
                let publish = b.publish_mqtt_bodies(&topic, &client, bodies, consumed);
                tokio::join!(publish, kill_and_restart).1
            }
        };
        // Second POSTs of redelivered messages come with the first ones after the restart;
        // give stragglers a moment.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let dups = b.rx.duplicates(&path);
        let this = dups - counted;
        counted = dups;
        worst = worst.max(this);
        total += this;
        if !arrived {
            lost = true;
            break;
        }
    }
    if let Some(running) = courier.take() {
        running.stop().await;
    }
    if source == Source::Rabbitmq {
        publisher.delete_queue(&q).await;
    }
    let bound = match source {
        Source::Rabbitmq => max_in_flight,
        Source::Mqtt => 2 * max_in_flight,
    };
    let what = source.name();
    if lost {
        b.failures.push(format!(
            "kill -9 over {what}: a round's events did not all arrive"
        ));
    }
    if worst > bound {
        b.failures.push(format!(
            "kill -9 over {what}: {worst} events POSTed twice after one kill, above the bound of {bound}"
        ));
    }
    println!(
        "kill -9 over {what}, {} kills (max_in_flight {max_in_flight}, {round} events a round): worst {worst} events POSTed twice after one kill, {total} in all (bound {bound})",
        b.args.kills
    );
    KillFigures {
        source: what,
        kills: b.args.kills,
        worst,
        total,
        bound,
    }
}
