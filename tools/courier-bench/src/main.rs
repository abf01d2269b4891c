//! courier-bench: end-to-end throughput, latency, fanout, routing and memory of courier, next to
//! the raw limits of the same machine, all measured in one run.
//!
//!     scripts/bench.sh [--events N] [--latency-seconds S] [--rate R] [--prefetch P]
//!                      [--max-concurrency C] [--only mqtt,fanout,...] [--courier PATH]
//!                      [--tracing off|start|export]
//!     (= cargo build --release -p courier -p courier-bench && target/release/courier-bench ...;
//!     --help lists the cases)
//!
//! Needs RabbitMQ (127.0.0.1:5672), Mosquitto (127.0.0.1:1883), the release `courier` binary next
//! to this one, and python3 with aio-pika and aiohttp for the baseline. It starts its own HTTP
//! receiver. It prints one line per case and a table, and exits non-zero if an event was lost or
//! POSTed twice.

mod bench;
mod cases;
mod raw;

use std::path::PathBuf;
use std::process::ExitCode;

use bench::Bench;
use cases::{AmqpFigures, MqttFigures};

/// The cases `--only` can pick; each one also runs the raw limits its figure is divided by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Case {
    /// RabbitMQ -> HTTP drain rate (also the single-destination rate fanout is compared with).
    Amqp,
    /// The Python aio-pika + aiohttp baseline (compared with the RabbitMQ case).
    Python,
    /// MQTT -> HTTP drain rate.
    Mqtt,
    /// Publish-to-receive latency at a steady rate.
    Latency,
    /// One event to 10 destinations.
    Fanout,
    /// Routing with 10,000 destination patterns (in-process).
    Routing,
    /// courier's RSS at idle.
    Idle,
}

/// End-to-end throughput, latency, fanout, routing and memory of courier, next to the raw
/// limits of this machine, in one run.
#[derive(clap::Parser, Debug)]
#[command(name = "courier-bench")]
struct Args {
    /// Events pre-filled for the RabbitMQ and MQTT drain runs (fanout uses a fifth of them).
    #[arg(long, default_value_t = 50_000)]
    events: usize,
    /// Length of the steady-rate latency run.
    #[arg(long, default_value_t = 30)]
    latency_seconds: u64,
    /// Offered rate of the latency run, events/s.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// RabbitMQ prefetch, for courier and the raw consumer alike.
    #[arg(long, default_value_t = 256)]
    prefetch: u16,
    /// Every destination's `max_concurrency` (courier's default is 64).
    #[arg(long, default_value_t = 64)]
    max_concurrency: usize,
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
        self.only.is_empty() || self.only.contains(&case)
    }
}

/// What every case measured; `None` for a case that did not run.
struct Results {
    /// RabbitMQ -> HTTP limit L, from the raw drain and POST rates.
    limit: f64,
    /// The same model for fanout, in deliveries/s.
    fanout_limit: f64,
    idle_kib: Option<u64>,
    amqp: Option<AmqpFigures>,
    python: Option<f64>,
    mqtt: Option<MqttFigures>,
    /// p50, p99 and max, in ms.
    latency: Option<(f64, f64, f64)>,
    /// Deliveries/s and courier's CPU µs per delivery.
    fanout: Option<(f64, f64)>,
    routing_ns: Option<f64>,
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
    // The single-destination rate, which fanout and Python are compared with, so it runs
    // whenever one of them does.
    let amqp = if needs_amqp {
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
    let mqtt = if needs_mqtt {
        Some(cases::mqtt(&mut b, raw.post, needs_amqp).await)
    } else {
        None
    };
    let latency = if b.args.runs(Case::Latency) {
        Some(cases::latency(&b).await)
    } else {
        None
    };
    let fanout = if b.args.runs(Case::Fanout) {
        Some(cases::fanout(&mut b, courier_rate, raw.fanout_limit()).await)
    } else {
        None
    };
    let routing_ns = b.args.runs(Case::Routing).then(cases::routing);
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
    };
    print_table(&rows(&results), &b.raw_limits);
    if b.args.tracing == TraceMode::Export {
        println!(
            "\nOTLP/HTTP export requests answered: {}",
            b.rx.answered("/otlp/v1/traces")
        );
    }
    if b.failures.is_empty() {
        println!("\nno event lost, none POSTed twice");
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
        rows.push(drain_row("RabbitMQ -> HTTP", a.rate, r.limit, a.cpu_us));
    }
    if let Some(py) = r.python {
        rows.push(Row {
            case: "vs Python aio-pika",
            figure: format!("{:.1}x ({py:.0}/s)", courier_rate / py),
            target: ">= 3x".into(),
            met: Some(courier_rate >= 3.0 * py),
        });
    }
    if let Some(m) = &r.mqtt {
        rows.push(drain_row("MQTT -> HTTP", m.rate, m.limit, m.cpu_us));
    }
    if let Some((p50, p99, max)) = r.latency {
        rows.push(Row {
            case: "p99 latency",
            figure: format!("{p99:.2} ms (p50 {p50:.2}, max {max:.2})"),
            target: "< 10 ms".into(),
            met: Some(p99 < 10.0),
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
                "{fan_rate:.0} deliveries/s = {:.2} x, {:.2} x L_fanout ({fan_cpu_us:.0} us CPU/delivery)",
                fan_rate / (10.0 * courier_rate),
                fan_rate / r.fanout_limit
            ),
            target: ">= 0.5 x".into(),
            met: Some(fan_rate > 0.0 && fan_rate >= 0.5 * 10.0 * courier_rate),
        });
    }
    let amqp_peak = r.amqp.as_ref().map(|a| a.peak_kib);
    let mqtt_peak = r.mqtt.as_ref().map(|m| m.peak_kib);
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

/// A drain case's row: its rate against its limit L, and courier's CPU per event.
fn drain_row(case: &'static str, rate: f64, limit: f64, cpu_us: f64) -> Row {
    Row {
        case,
        figure: format!(
            "{rate:.0}/s = {:.2} x L ({cpu_us:.0} us CPU/event)",
            rate / limit
        ),
        target: ">= 0.85 x L".into(),
        met: Some(rate >= 0.85 * limit),
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
