//! What every case uses: the run's settings, the receiver, courier as a process, the event body
//! and the MQTT publisher.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use courier_testkit::{
    ConfigBuilder, CourierProcess, Dest, Launch, MqttPublisher, MqttPublisherOptions, Publisher,
    Rabbit, Receiver, Recording, TestCa, Tls, TlsRedis, Tracing, REDIS_URL,
};

use crate::{Args, DedupMode, TraceMode};

/// The run: its settings, the one receiver every case POSTs to, and what it found.
pub struct Bench {
    pub args: Args,
    /// The courier binary under test.
    pub exe: PathBuf,
    pub rx: Receiver,
    /// Events per drain run (`--events`).
    pub n: usize,
    /// Bytes per event.
    pub size: usize,
    /// This process's id, which names every queue, topic and directory of the run.
    pub pid: u32,
    /// The raw figures the limits were computed from, for the table's last row.
    pub raw_limits: Vec<String>,
    /// Lost or duplicated events, for the exit code.
    pub failures: Vec<String>,
    /// With `--dedup rediss`: the Redis over TLS and what courier presents to it.
    pub tls_redis: Option<BenchRedis>,
}

/// The benchmark's own Redis over TLS, in a directory of its own that goes with it.
pub struct BenchRedis {
    redis: TlsRedis,
    tls: Tls,
    dir: PathBuf,
}

impl BenchRedis {
    /// Started in `dir`, with a CA of its own, requiring a client certificate and a password, as
    /// managed Redis services over TLS do.
    fn start(dir: PathBuf) -> BenchRedis {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("bench redis dir");
        let server_ca = TestCa::new("bench redis CA");
        let client_ca = TestCa::new("bench redis client CA");
        let redis = TlsRedis::start(
            &dir,
            &server_ca.server(&["127.0.0.1"]),
            &client_ca,
            "bench-redis",
        );
        let ca_file = server_ca.write(&dir, "redis-ca.pem");
        let (cert, key) = client_ca.client("courier").write(&dir, "courier");
        let tls = Tls::default().ca_only(ca_file).client(cert, key);
        BenchRedis { redis, tls, dir }
    }
}

impl Drop for BenchRedis {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bench {
    /// Finds the courier binary and starts the receiver; prints the run's settings. `None` (with
    /// a message) when there is no courier binary.
    pub async fn start(args: Args) -> Option<Bench> {
        let exe = match args.courier.clone().or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(|d| d.join("courier")))
        }) {
            Some(exe) if exe.is_file() => exe,
            other => {
                eprintln!(
                    "courier-bench: no courier binary at {} (cargo build --release, or --courier PATH)",
                    other.map(|p| p.display().to_string()).unwrap_or_default()
                );
                return None;
            }
        };
        let pid = std::process::id();
        let tls_redis = (args.dedup == DedupMode::Rediss).then(|| {
            BenchRedis::start(std::env::temp_dir().join(format!("courier-bench-{pid}-redis")))
        });
        let b = Bench {
            tls_redis,
            n: args.events,
            size: 512,
            pid,
            rx: Receiver::start_with(Recording::Counts).await,
            exe,
            args,
            raw_limits: Vec::new(),
            failures: Vec::new(),
        };
        println!(
            "courier-bench: {} events of {} bytes, {}, prefetch {}, max_concurrency {}, dedup {:?}, machine: {} cores, courier {}",
            b.n,
            b.size,
            match b.args.id_len {
                0 => "short ids".to_string(),
                n => format!("ids of {n} characters"),
            },
            b.args.prefetch,
            b.args.max_concurrency,
            b.args.dedup,
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            b.exe.display()
        );
        Some(b)
    }

    /// A destination `name` POSTing to `path` on the receiver.
    pub fn dest(&self, name: &str, path: &str) -> Dest {
        Dest::new(name, &self.rx.url(path)).max_concurrency(self.args.max_concurrency)
    }

    /// courier on `queue` with the run's prefetch.
    pub fn rabbit(&self, queue: &str) -> Rabbit {
        Rabbit::queue(queue).prefetch(self.args.prefetch)
    }

    /// courier for the case `name`, with its store and config in a directory of its own
    /// (`<tmp>/courier-bench-<pid>-<name>/courier.toml`, which scripts/bench_counts.sh looks
    /// for), configured by `configure`.
    pub fn spawn(
        &self,
        name: &str,
        configure: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
    ) -> BenchCourier {
        let dir = self.case_dir(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("bench dir");
        self.spawn_in(dir, configure)
    }

    /// The directory of the case `name`: its store and its config file.
    pub fn case_dir(&self, name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("courier-bench-{}-{name}", self.pid))
    }

    /// courier in `dir` as it is (a restart keeps the store), configured by `configure`.
    pub fn spawn_in(
        &self,
        dir: PathBuf,
        configure: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
    ) -> BenchCourier {
        let base = ConfigBuilder::new(dir.join("store"))
            .max_in_flight(256)
            .shutdown_timeout(Duration::from_secs(5));
        let base = match self.args.tracing {
            TraceMode::Off => base,
            TraceMode::Start => base.tracing(Tracing::default().start_traces(true)),
            TraceMode::Export => {
                base.tracing(Tracing::export_to(&self.rx.url("/otlp")).start_traces(true))
            }
        };
        let base = match self.args.dedup {
            DedupMode::Local => base,
            DedupMode::Redis | DedupMode::Rediss => {
                let case = dir.file_name().map(|n| n.to_string_lossy().into_owned());
                let prefix = format!("{}:", case.unwrap_or_default());
                let base = match &self.tls_redis {
                    Some(r) => base
                        .redis_dedup(&r.redis.url(), &prefix)
                        .redis_tls(r.tls.clone()),
                    None => base.redis_dedup(REDIS_URL, &prefix),
                };
                base.dedup_ttl(Duration::from_secs(600))
            }
        };
        let config = configure(base);
        let process = Launch::new(&self.exe, &dir, config.toml())
            .config_file("courier.toml")
            .rust_log("warn")
            .inherit_stderr()
            .sample_memory()
            .spawn();
        BenchCourier { process, dir }
    }

    /// courier on `queue` with one destination, `/<name>` on the receiver.
    pub fn spawn_amqp(&self, name: &str, queue: &str) -> BenchCourier {
        self.spawn(name, |c| {
            c.rabbitmq(self.rabbit(queue))
                .destination(self.dest("d", &format!("/{name}")))
        })
    }

    /// The id of event `i` of a run whose ids start with `prefix`: `<prefix><i>`, with `i`
    /// zero-padded to make up `--id-len` characters.
    pub fn id(&self, prefix: &str, i: usize) -> String {
        let width = self.args.id_len.saturating_sub(prefix.len());
        format!("{prefix}{i:0>width$}")
    }

    /// `n` events (ids [`Bench::id`]) published into the fresh queue `queue`.
    pub async fn fill(&self, queue: &str, prefix: &str, n: usize) {
        let publisher = Publisher::connect().await;
        publisher.fresh_queue(queue).await;
        publisher
            .fill(
                queue,
                (0..n).map(|i| event(&self.id(prefix, i), self.size)),
                2000,
            )
            .await;
    }

    /// Waits until `path` has `n` distinct ids; `None` after `timeout`, or as soon as
    /// `exited()` says the courier process behind them is gone, instead of waiting out the
    /// timeout.
    pub async fn wait_unique(
        &self,
        path: &str,
        n: usize,
        timeout: Duration,
        exited: impl Fn() -> bool,
    ) -> Option<Instant> {
        wait_unique_on(&self.rx, path, n, timeout, exited).await
    }

    /// Publishes `n` QoS 1 events (ids [`Bench::id`]) to `topic`, paced by `consumed()`, from a
    /// client of its own; returns once the broker has PUBACKed them all (or after 60 s).
    pub async fn publish_mqtt(
        &self,
        topic: &str,
        prefix: &str,
        n: usize,
        consumed: impl Fn() -> usize,
    ) {
        let bodies = (0..n).map(|i| event(&self.id(prefix, i), self.size));
        self.publish_mqtt_bodies(topic, prefix, bodies, consumed)
            .await
    }

    /// [`Bench::publish_mqtt`] with these bodies, from the client `bench-pub-<pid>-<client>`.
    pub async fn publish_mqtt_bodies(
        &self,
        topic: &str,
        client: &str,
        bodies: impl ExactSizeIterator<Item = Vec<u8>>,
        consumed: impl Fn() -> usize,
    ) {
        let publisher = MqttPublisher::connect_with(MqttPublisherOptions {
            client_id: format!("bench-pub-{}-{client}", self.pid),
            inflight: 500,
            capacity: 10_000,
            max_packet_size: Some(1 << 20),
            ..MqttPublisherOptions::default()
        })
        .await;
        let n = bodies.len();
        if let Err(e) = publisher.publish_paced(topic, bodies, 0, consumed).await {
            println!("MQTT publisher: {e} of {n}; giving up");
            return;
        }
        // publish() only queues: wait until the broker has PUBACKed every message.
        publisher.acked_within(Duration::from_secs(60)).await;
    }
}

/// A case's courier process and its directory, removed once it has stopped.
pub struct BenchCourier {
    process: CourierProcess,
    dir: PathBuf,
}

impl std::ops::Deref for BenchCourier {
    type Target = CourierProcess;
    fn deref(&self) -> &CourierProcess {
        &self.process
    }
}

impl BenchCourier {
    /// SIGTERM, at most 20 s for the drain, then SIGKILL; the directory goes too.
    pub async fn stop(self) {
        self.process.stop(Duration::from_secs(20)).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// SIGKILL, keeping the directory (the store) for the next process.
    pub fn kill9(self) {
        let _ = self.process.kill9();
    }
}

/// An event of about `size` bytes with id `id` and the publish time inside `data`.
pub fn event(id: &str, size: usize) -> Vec<u8> {
    event_on(id, "bench.t", size)
}

/// [`event`] on `topic`, which routes it.
pub fn event_on(id: &str, topic: &str, size: usize) -> Vec<u8> {
    let head = format!(
        r#"{{"id":"{id}","topic":"{topic}","data":{{"sent_ns":{},"pad":""#,
        courier_testkit::now_ns()
    );
    let pad = size.saturating_sub(head.len() + 4);
    let mut body = head.into_bytes();
    body.extend(std::iter::repeat_n(b'x', pad));
    body.extend_from_slice(b"\"}}");
    body
}

/// [`Bench::wait_unique`] on another receiver than the run's.
pub async fn wait_unique_on(
    rx: &Receiver,
    path: &str,
    n: usize,
    timeout: Duration,
    exited: impl Fn() -> bool,
) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    let mut report = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let got = rx.unique(path);
        if got >= n {
            return Some(Instant::now());
        }
        if exited() {
            eprintln!("  ... {path}: {got} of {n}, and courier has exited (its stderr is above)");
            return None;
        }
        if Instant::now() > report {
            eprintln!("  ... {path}: {got} of {n}");
            report = Instant::now() + Duration::from_secs(10);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}
