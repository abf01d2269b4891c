//! courier-bench: end-to-end throughput, latency, fanout, routing and memory of courier, next to
//! the raw limits of the same machine, all measured in one run.
//!
//!     scripts/bench.sh [--events N] [--latency-seconds S] [--rate R,...] [--prefetch P]
//!                      [--max-concurrency C] [--mqtt-runs N] [--slow-seconds S] [--kills K]
//!                      [--only mqtt,fanout,...] [--courier PATH]
//!                      [--tracing off|start|export] [--dedup local|redis|rediss] [--id-len N]
//!                      [--post-limit driven|pooled]
//!     (= cargo build --release -p courier -p courier-bench && target/release/courier-bench ...;
//!     --help lists the cases)
//!
//! Needs RabbitMQ (127.0.0.1:5672), Mosquitto (127.0.0.1:1883), Redis (127.0.0.1:6379) with
//! `--dedup redis`, the release `courier` binary next to this one, and python3 with aio-pika and
//! aiohttp for the baseline. It starts its own HTTP receiver. It prints one line per case and a
//! table, and exits non-zero if an event was lost or POSTed twice.

mod bench;
mod cases;
mod clients;
mod kill;
mod raw;
mod slow;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bench::Bench;
use cases::{AmqpFigures, MqttFigures};
use courier_testkit::Source;
use kill::KillFigures;
use slow::{MixFigures, SlowFigures};

/// The cases `--only` can pick; each one also runs the raw limits its figure is divided by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Case {
    /// RabbitMQ -> HTTP drain rate (also the single-destination rate fanout is compared with).
    Amqp,
    /// The Python aio-pika + aiohttp baseline (compared with the RabbitMQ case).
    Python,
    /// MQTT -> HTTP drain rate, `--mqtt-runs` times.
    Mqtt,
    /// Publish-to-receive latency, and courier's CPU, at each steady `--rate`.
    Latency,
    /// One event to 10 destinations.
    Fanout,
    /// Routing with 10,000 destination patterns (in-process).
    Routing,
    /// courier's RSS at idle.
    Idle,
    /// Partners answering after 50 and 500 ms, alone over RabbitMQ, and next to a fast one over
    /// each source.
    Slow,
    /// `--kills` kill -9s in a row during a stream, per source: the most duplicates after one.
    KillBound,
    /// Bare HTTP clients (reqwest HTTP/1.1 and h2c, hyper HTTP/1.1) POSTing to the receiver.
    /// Not part of a run without `--only`.
    Clients,
}

/// End-to-end throughput, latency, fanout, routing and memory of courier, next to the raw
/// limits of this machine, in one run.
#[derive(clap::Parser, Debug)]
#[command(name = "courier-bench")]
struct Args {
    /// Events pre-filled for the RabbitMQ and MQTT drain runs (fanout uses a fifth of them).
    #[arg(long, default_value_t = 50_000)]
    events: usize,
    /// Length of each steady-rate latency run.
    #[arg(long, default_value_t = 30)]
    latency_seconds: u64,
    /// Offered rates of the latency runs, events/s (comma-separated, one run each).
    #[arg(long, value_delimiter = ',', default_values_t = [1_000, 5_000])]
    rate: Vec<u64>,
    /// RabbitMQ prefetch, for courier and the raw consumer alike.
    #[arg(long, default_value_t = 256)]
    prefetch: u16,
    /// Every destination's `max_concurrency` (courier's default is 64).
    #[arg(long, default_value_t = 64)]
    max_concurrency: usize,
    /// MQTT runs in a row, reported as min / median / max of their ratios to L.
    #[arg(long, default_value_t = 5)]
    mqtt_runs: usize,
    /// About how long each slow-partner run lasts at its limit, in seconds.
    #[arg(long, default_value_t = 8)]
    slow_seconds: u64,
    /// kill -9s per source in the kill-bound case.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Events per kill round (courier is killed once half of them have arrived).
    #[arg(long, default_value_t = 4_000)]
    kill_events: usize,
    /// `service.max_in_flight` of the kill-bound case.
    #[arg(long, default_value_t = 64)]
    kill_max_in_flight: usize,
    /// Run only these cases (comma-separated); all by default.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Case>,
    /// The courier binary to measure; by default the one next to this program. Lets two builds
    /// be compared on the same machine, one run after the other.
    #[arg(long)]
    courier: Option<PathBuf>,
    /// Trace context and span export, to measure what they cost.
    #[arg(long, value_enum, default_value_t = TraceMode::Off)]
    tracing: TraceMode,
    /// Where courier keeps its dedup record in every case.
    #[arg(long, value_enum, default_value_t = DedupMode::Local)]
    dedup: DedupMode,
    /// Characters per event id in the pre-filled and MQTT runs, the number zero-padded to make
    /// up the length (36 is a UUID's); 0 keeps ids as short as `<prefix><number>`. The dedup
    /// record's key holds the id, so its length is part of what a delivery costs.
    #[arg(long, default_value_t = 0)]
    id_len: usize,
    /// The bare client whose POST rate is the raw POST limit in L and L_fanout.
    #[arg(long, value_enum, default_value_t = PostLimit::Driven)]
    post_limit: PostLimit,
}

impl PostLimit {
    fn name(self) -> &'static str {
        match self {
            PostLimit::Driven => "hyper HTTP/1.1, connections driven by their sender",
            PostLimit::Pooled => "hyper-util's pooled client",
        }
    }
}

/// The bare client of the raw POST limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum PostLimit {
    /// hyper's HTTP/1.1 connections, each driven by the task that sends on it, as courier does:
    /// the fastest bare client of the `clients` case.
    Driven,
    /// hyper-util's pooled client, a task per connection: the raw POST limit before courier
    /// drove its own connections, for figures that compare with those of that time.
    Pooled,
}

/// `store.dedup` of courier in every case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DedupMode {
    /// The dedup table in courier's own store (courier's default).
    #[value(alias = "sled")]
    Local,
    /// The Redis on 127.0.0.1:6379, under a prefix of the case's own, with a `dedup_ttl` of
    /// 10 minutes so the keys of a run do not stay in Redis for a week.
    Redis,
    /// As `redis`, but a Redis of the benchmark's own reached over TLS (`rediss://`), which
    /// requires a client certificate and a password, as managed Redis services do.
    Rediss,
}

/// How much of `[tracing]` courier runs with in every case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum TraceMode {
    /// No `[tracing]` section: events without trace context, nothing exported.
    Off,
    /// `start_traces = true`: every event starts a trace and every POST carries a
    /// `traceparent`; nothing exported.
    Start,
    /// `start_traces = true` and `otlp_endpoint` at the bench's receiver: two spans per event
    /// (the trace's root and the attempt), batched and exported over OTLP/HTTP.
    Export,
}

impl Args {
    fn runs(&self, case: Case) -> bool {
        (self.only.is_empty() && case != Case::Clients) || self.only.contains(&case)
    }
}

/// What every case measured; `None` or empty for a case that did not run.
struct Results {
    /// RabbitMQ -> HTTP limit L, from the raw drain and POST rates.
    limit: f64,
    /// The same model for fanout, in deliveries/s.
    fanout_limit: f64,
    idle_kib: Option<u64>,
    amqp: Option<AmqpFigures>,
    python: Option<f64>,
    mqtt: Vec<MqttFigures>,
    /// Offered rate, p50, p99 and max, in ms.
    latency: Vec<cases::Latency>,
    /// Deliveries/s and courier's CPU µs per delivery.
    fanout: Option<(f64, f64)>,
    routing_ns: Option<f64>,
    slow: Vec<SlowFigures>,
    mix: Vec<MixFigures>,
    kills: Vec<KillFigures>,
}

#[tokio::main]
async fn main() -> ExitCode {
    courier_testkit::install_crypto_provider();
    let args = <Args as clap::Parser>::parse();
    let Some(mut b) = Bench::start(args).await else {
        return ExitCode::FAILURE;
    };
    let needs_amqp =
        b.args.runs(Case::Amqp) || b.args.runs(Case::Python) || b.args.runs(Case::Fanout);
    let needs_mqtt = b.args.runs(Case::Mqtt);
    let raw = raw::limits(&mut b, needs_amqp, needs_mqtt).await;
    let idle_kib = if b.args.runs(Case::Idle) {
        Some(cases::idle(&b).await)
    } else {
        None
    };
    // The single-destination rate, which Python is compared with.
    let amqp = if b.args.runs(Case::Amqp) || b.args.runs(Case::Python) {
        Some(cases::amqp(&mut b, raw.limit()).await)
    } else {
        None
    };
    let courier_rate = amqp.as_ref().map_or(f64::NAN, |a| a.rate);
    let python = if b.args.runs(Case::Python) {
        cases::python(&b, courier_rate).await
    } else {
        None
    };
    let mut mqtt = Vec::new();
    if needs_mqtt {
        for run in 0..b.args.mqtt_runs {
            // The POST rate is measured again before every run but a first one that opens the
            // benchmark, so each L describes the machine during its run.
            mqtt.push(cases::mqtt(&mut b, run, raw.post, needs_amqp || run > 0).await);
        }
    }
    let mut latency = Vec::new();
    if b.args.runs(Case::Latency) {
        for rate in b.args.rate.clone() {
            latency.push(cases::latency(&b, rate).await);
        }
    }
    let fanout = if b.args.runs(Case::Fanout) {
        Some(cases::fanout(&mut b, raw.fanout_limit()).await)
    } else {
        None
    };
    let routing_ns = b.args.runs(Case::Routing).then(cases::routing);
    let (mut slow, mut mix) = (Vec::new(), Vec::new());
    if b.args.runs(Case::Slow) {
        for ms in [50, 500] {
            slow.push(slow::slow(&mut b, Duration::from_millis(ms)).await);
        }
        for source in [Source::Rabbitmq, Source::Mqtt] {
            mix.push(slow::mix(&mut b, source, Duration::from_millis(50)).await);
        }
    }
    if b.args.runs(Case::Clients) {
        clients::clients(&b).await;
    }
    let mut kills = Vec::new();
    if b.args.runs(Case::KillBound) {
        for source in [Source::Rabbitmq, Source::Mqtt] {
            kills.push(kill::kill_bound(&mut b, source).await);
        }
    }
    let results = Results {
        limit: raw.limit(),
        fanout_limit: raw.fanout_limit(),
        idle_kib,
        amqp,
        python,
        mqtt,
        latency,
        fanout,
        routing_ns,
        slow,
        mix,
        kills,
    };
    print_table(&rows(&results), &b.raw_limits);
    if b.args.tracing == TraceMode::Export {
        println!(
            "\nOTLP/HTTP export requests answered: {}",
            b.rx.answered("/otlp/v1/traces")
        );
    }
    if b.failures.is_empty() {
        println!("\nno event lost, none POSTed twice beyond what its case allows");
        ExitCode::SUCCESS
    } else {
        for f in &b.failures {
            println!("FAILED: {f}");
        }
        ExitCode::FAILURE
    }
}

/// One line of the table.
struct Row {
    case: &'static str,
    figure: String,
    target: String,
    met: Option<bool>,
}

/// The table's rows, each figure next to its target.
fn rows(r: &Results) -> Vec<Row> {
    let mut rows = Vec::new();
    let courier_rate = r.amqp.as_ref().map_or(f64::NAN, |a| a.rate);
    if let Some(a) = &r.amqp {
        rows.push(Row {
            case: "RabbitMQ -> HTTP",
            figure: format!(
                "{:.0}/s = {:.2} x L ({:.0} us CPU/event)",
                a.rate,
                a.rate / r.limit,
                a.cpu_us
            ),
            target: ">= 0.90 x L".into(),
            met: Some(a.rate >= 0.90 * r.limit),
        });
    }
    if let Some(py) = r.python {
        rows.push(Row {
            case: "vs Python aio-pika",
            figure: format!("{:.1}x ({py:.0}/s)", courier_rate / py),
            target: ">= 3x".into(),
            met: Some(courier_rate >= 3.0 * py),
        });
    }
    if !r.mqtt.is_empty() {
        rows.push(mqtt_row(&r.mqtt));
    }
    for l in &r.latency {
        let (c, raw) = (&l.courier, &l.raw);
        rows.push(Row {
            case: "p99 latency",
            figure: format!(
                "{:.2} ms at {}/s (p50 {:.2}, max {:.2}); RabbitMQ alone p99 {:.2} (p50 {:.2}, max {:.2}); courier CPU {:.0} us/event, {:.2} of a core",
                c.p99, l.rate, c.p50, c.max, raw.p99, raw.p50, raw.max, l.cpu_us, l.cores
            ),
            target: "< 10 ms".into(),
            met: Some(c.p99 < 10.0),
        });
    }
    if let Some(per_event_ns) = r.routing_ns {
        rows.push(Row {
            case: "routing, 10k patterns",
            figure: format!("{per_event_ns:.0} ns/event"),
            target: "< 2000 ns".into(),
            met: Some(per_event_ns < 2000.0),
        });
    }
    if let Some((fan_rate, fan_cpu_us)) = r.fanout {
        rows.push(Row {
            case: "fanout x10",
            figure: format!(
                "{fan_rate:.0} deliveries/s = {:.2} x L_fanout ({fan_cpu_us:.0} us CPU/delivery)",
                fan_rate / r.fanout_limit
            ),
            target: ">= 0.85 x L_fanout".into(),
            met: Some(fan_rate >= 0.85 * r.fanout_limit),
        });
    }
    for s in &r.slow {
        rows.push(Row {
            case: "slow partner, RabbitMQ",
            figure: format!(
                "{} ms: {:.0}/s = {:.2} x limit",
                s.latency_ms,
                s.rate,
                s.rate / s.limit
            ),
            target: ">= 0.90 x max_concurrency / latency".into(),
            met: Some(s.rate >= 0.90 * s.limit),
        });
    }
    for m in &r.mix {
        rows.push(Row {
            case: "slow + fast partner",
            figure: format!(
                "{}, {} ms: slow {:.0}/s = {:.2} x limit, fast {:.0}/s",
                m.source,
                m.latency_ms,
                m.slow_rate,
                m.slow_rate / m.limit,
                m.fast_rate
            ),
            target: "measured".into(),
            met: None,
        });
    }
    for k in &r.kills {
        rows.push(Row {
            case: "kill -9, duplicates",
            figure: format!(
                "{}: worst {} after one of {} kills ({} in all)",
                k.source, k.worst, k.kills, k.total
            ),
            target: format!("<= {}", k.bound),
            met: Some(k.worst <= k.bound),
        });
    }
    let amqp_peak = r.amqp.as_ref().map(|a| a.peak_kib);
    let mqtt_peak = r.mqtt.iter().map(|m| m.peak_kib).max();
    if let Some(peak) = amqp_peak.into_iter().chain(mqtt_peak).max() {
        let mib = |k: Option<u64>| {
            k.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                .unwrap_or_else(|| "not run".into())
        };
        rows.push(Row {
            case: "peak RSS under load",
            figure: format!("{} (MQTT run {})", mib(amqp_peak), mib(mqtt_peak)),
            target: "< 64 MiB".into(),
            met: Some(peak < 64 * 1024),
        });
    }
    if let Some(idle_kib) = r.idle_kib {
        rows.push(Row {
            case: "idle RSS",
            figure: format!("{:.1} MiB", idle_kib as f64 / 1024.0),
            target: "< 20 MiB".into(),
            met: Some(idle_kib < 20 * 1024),
        });
    }
    rows
}

/// The MQTT row: the ratios to L of every run, as min / median / max, and how many met 0.85.
fn mqtt_row(runs: &[MqttFigures]) -> Row {
    let mut ratios: Vec<f64> = runs.iter().map(|m| m.rate / m.limit).collect();
    ratios.sort_by(f64::total_cmp);
    let met = ratios.iter().filter(|&&x| x >= 0.85).count();
    let median = ratios[ratios.len() / 2];
    let cpu: Vec<String> = runs.iter().map(|m| format!("{:.0}", m.cpu_us)).collect();
    Row {
        case: "MQTT -> HTTP",
        figure: format!(
            "{:.2} / {median:.2} / {:.2} x L (min / median / max of {}), {met} of {} >= 0.85 ({} us CPU/event)",
            ratios[0],
            ratios[ratios.len() - 1],
            runs.len(),
            runs.len(),
            cpu.join(", ")
        ),
        target: ">= 0.85 x L in 4 of 5".into(),
        met: Some(met * 5 >= 4 * runs.len()),
    }
}

fn print_table(rows: &[Row], raw_limits: &[String]) {
    println!();
    println!("| case | figure | target | met |");
    println!("|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} |",
            r.case,
            r.figure,
            r.target,
            match r.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            }
        );
    }
    if !raw_limits.is_empty() {
        println!("| raw limits | {} | | |", raw_limits.join(", "));
    }
}
