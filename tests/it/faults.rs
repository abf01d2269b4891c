//! The fault suite: real traffic through real failures, every event counted at the receiver.
//!
//! Each case runs the courier binary against the machine's RabbitMQ or Mosquitto, sends a few
//! thousand events (`COURIER_FAULT_EVENTS`, default 3,000; `scripts/test.sh --long` sends
//! 20,000), breaks something mid-stream, repairs it, and then checks that every id reached the
//! receiver with a 2xx. A second 2xx for one id (a duplicate) is allowed only where the dedup
//! store could not know about the first: a POST under way when courier was killed or its store
//! failed, so at most `IN_FLIGHT` per such failure, and none for the other faults.
//!
//! Each case prints one line of figures (`FAULT ...`) on stderr and appends it to
//! `target/tmp/fault-figures.txt`; docs/reliability.md carries them.
//!
//! The cases run one at a time ([`SERIAL`]): each sends thousands of events, and alone it keeps
//! the machine's two cores for courier and the brokers, so its figures mean the same from run to
//! run. The cases that stop RabbitMQ, close its connections or restart Mosquitto also hold the
//! brokers exclusively (`support::brokers_exclusive`), so no other test of the binary runs
//! meanwhile; the others share them. The tmpfs mount needs root, or sudo without a password.

use std::collections::HashSet;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;

/// Events in flight in courier at once (also the RabbitMQ prefetch).
const IN_FLIGHT: usize = 16;

/// How long a case may take to deliver everything after its fault is repaired.
const DRAIN: Duration = Duration::from_secs(120);

/// Held by each case for its whole run (in [`Turn`]).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Whether a case disturbs the brokers for the other tests.
enum Disturbs {
    Nothing,
    /// Stops RabbitMQ, closes its connections or restarts Mosquitto.
    Brokers,
}

/// A case's turn: the fault suite to itself, then the brokers (shared, or to itself alone when
/// it disturbs them). Always taken in this order, so two cases cannot wait on each other.
struct Turn {
    _brokers: Brokers,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl Turn {
    async fn take(disturbs: Disturbs) -> Turn {
        let serial = SERIAL.lock().await;
        let brokers = match disturbs {
            Disturbs::Nothing => brokers().await,
            Disturbs::Brokers => brokers_exclusive().await,
        };
        Turn {
            _brokers: brokers,
            _serial: serial,
        }
    }
}

fn event_count() -> usize {
    std::env::var("COURIER_FAULT_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

/// The ids of a case's events.
fn case_ids(case: &str) -> Vec<String> {
    (0..event_count()).map(|i| format!("{case}-{i}")).collect()
}

fn body(id: &str) -> Vec<u8> {
    format!(
        r#"{{"id":"{id}","topic":"fault.event","data":{{"pad":"{}"}}}}"#,
        "x".repeat(400)
    )
    .into_bytes()
}

/// The partner: retried for as long as any case lasts, its circuit opening for a second at a
/// time.
fn partner(url: &str) -> Dest {
    Dest::new("partner", url)
        .timeout(Duration::from_secs(10))
        .retry(Retry::backoff(
            1000,
            Duration::from_millis(200),
            2.0,
            Duration::from_secs(1),
        ))
        .circuit(
            Circuit::default()
                .failures(5)
                .open_for(Duration::from_secs(1)),
        )
}

/// Publishes every id into `queue` (durable, persistent messages) and waits for the confirms.
async fn prefill(publisher: &Publisher, queue: &str, ids: &[String]) {
    publisher.declare_queue(queue).await;
    publisher
        .fill(queue, ids.iter().map(|id| body(id)), 500)
        .await;
}

/// Publishes `ids` over MQTT QoS 1, paced by what the receiver has (`before` events of this case
/// were published earlier), and waits for the broker's PUBACKs.
async fn publish_paced(
    publisher: &MqttPublisher,
    topic: &str,
    ids: &[String],
    before: usize,
    rx: &Receiver,
) {
    if let Err(e) = publisher
        .publish_paced(topic, ids.iter().map(|id| body(id)), before, || {
            delivered(rx)
        })
        .await
    {
        panic!("MQTT publisher: {e} of {} events", ids.len());
    }
    publisher.wait_acked().await;
}

/// Distinct ids delivered with a 2xx.
fn delivered(rx: &Receiver) -> usize {
    rx.delivered_distinct()
}

/// Waits until `n` of `ids` were delivered with a 2xx.
async fn wait_delivered(rx: &Receiver, ids: &[String], n: usize, log: &Path) {
    let deadline = Instant::now() + DRAIN;
    let count = || rx.delivered_of(ids);
    while count() < n {
        if Instant::now() > deadline {
            panic!(
                "{} of {n} events delivered within {DRAIN:?}; courier log:\n{}",
                count(),
                log_tail(log)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The figures of one case.
struct Figures {
    case: &'static str,
    sent: usize,
    received: usize,
    lost: usize,
    duplicates: usize,
    /// From the repair to the first request courier made afterwards.
    recovery: Option<Duration>,
    total: Duration,
}

impl Figures {
    fn count(
        case: &'static str,
        ids: &[String],
        rx: &Receiver,
        started: Instant,
        repaired: Instant,
    ) -> Figures {
        let counts = rx.delivered_counts();
        let sent: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let lost = sent.iter().filter(|id| !counts.contains_key(**id)).count();
        let duplicates = counts
            .iter()
            .filter(|(id, _)| sent.contains(id.as_str()))
            .map(|(_, n)| n - 1)
            .sum();
        Figures {
            case,
            sent: ids.len(),
            received: ids.len() - lost,
            lost,
            duplicates,
            recovery: rx
                .first_arrival_after(repaired)
                .map(|t| t.duration_since(repaired)),
            total: started.elapsed(),
        }
    }

    /// Prints the line, appends it to the figures file, and checks it.
    fn check(&self, max_duplicates: usize, log: &Path) {
        let line = format!(
            "FAULT {:<28} sent={} received={} lost={} duplicates={} recovery={} total={:.1}s",
            self.case,
            self.sent,
            self.received,
            self.lost,
            self.duplicates,
            self.recovery
                .map(|d| format!("{:.2}s", d.as_secs_f64()))
                .unwrap_or_else(|| "-".into()),
            self.total.as_secs_f64(),
        );
        eprintln!("{line}");
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fault-figures.txt");
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(file, "{line}");
        }
        assert_eq!(self.lost, 0, "{line}\n{}", log_tail(log));
        assert!(
            self.duplicates <= max_duplicates,
            "{line}: more than {max_duplicates} duplicates\n{}",
            log_tail(log)
        );
    }
}

/// The partner's receiver, answering every request after `delay`.
async fn receiver(delay: Duration) -> Arc<Receiver> {
    let rx = Receiver::start().await;
    rx.set_delay(delay);
    Arc::new(rx)
}

/// A TCP forwarder in front of the receiver that can go away (connection refused) and come back
/// on the same port: a partner endpoint that is down.
struct Gate {
    port: u16,
    target: SocketAddr,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Gate {
    async fn start(target: SocketAddr) -> Gate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gate");
        let port = listener.local_addr().expect("gate addr").port();
        let gate = Gate {
            port,
            target,
            task: Mutex::new(None),
        };
        gate.serve(listener);
        gate
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let target = self.target;
        let task = tokio::spawn(async move {
            // Dropping the set (when this task is aborted) cuts every open connection.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                connections.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                while connections.try_join_next().is_some() {}
            }
        });
        *self.task.lock().unwrap() = Some(task);
    }

    /// Closes the port and every connection through it.
    async fn down(&self) {
        let task = self.task.lock().unwrap().take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    async fn up(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(listener) => return self.serve(listener),
                Err(e) if Instant::now() < deadline => {
                    eprintln!("gate: rebinding port {}: {e}", self.port);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("gate cannot listen on {} again: {e}", self.port),
            }
        }
    }
}

/// Runs a command as root (directly, or through `sudo -n`); returns whether it succeeded.
fn as_root(program: &str, args: &[&str]) -> bool {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let mut command = if root {
        std::process::Command::new(program)
    } else {
        let mut c = std::process::Command::new("sudo");
        c.arg("-n").arg(program);
        c
    };
    command
        .args(args)
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Starts RabbitMQ's application again if a case stopped it and then failed.
struct RabbitGuard;

impl Drop for RabbitGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = std::process::Command::new("rabbitmqctl")
                .arg("start_app")
                .status();
        }
    }
}

/// Waits until `/readyz` answers `status`, failing with `what` and the log's tail after `within`.
async fn wait_readyz(port: u16, status: u16, within: Duration, what: &str, log: &Path) {
    let deadline = Instant::now() + within;
    while readyz(port).await != Some(status) {
        assert!(Instant::now() < deadline, "{what}:\n{}", log_tail(log));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn readyz(port: u16) -> Option<u16> {
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// Waits until a quarter of `ids` were delivered: the point where each case breaks something.
async fn mid_stream(rx: &Receiver, ids: &[String], log: &Path) {
    wait_delivered(rx, ids, ids.len() / 4, log).await;
}

/// Fails a case whose fault was over only after every event was delivered: it proved nothing.
fn assert_mid_stream(rx: &Receiver, ids: &[String], log: &Path) {
    let done = rx.delivered_of(ids);
    assert!(
        done < ids.len(),
        "all {done} events were delivered before the fault was repaired: slow the stream down\n{}",
        log_tail(log)
    );
}

/// A running courier process and what it takes to start it again.
struct Running {
    courier: CourierProcess,
    config: ConfigBuilder,
    dir: PathBuf,
}

impl Running {
    /// SIGKILL, then the same config and store again after `down_for`.
    async fn kill9_and_restart(self, down_for: Duration) -> Running {
        self.courier.kill9();
        tokio::time::sleep(down_for).await;
        Running {
            courier: spawn(&self.config, &self.dir),
            ..self
        }
    }
}

/// An AMQP case: the queue pre-filled with every event, courier started, `fault` run once a
/// quarter was delivered; `fault` returns when the fault is repaired.
async fn amqp_case<F, Fut>(
    case: &'static str,
    rx: &Receiver,
    url: &str,
    max_duplicates: usize,
    fault: F,
) where
    F: FnOnce(Running) -> Fut,
    Fut: std::future::Future<Output = Running>,
{
    let ids = case_ids(case);
    let queue = unique(case);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let publisher = Publisher::connect().await;
    prefill(&publisher, &queue, &ids).await;
    drop(publisher);
    let config = rabbit_config(&queue, &store)
        .max_in_flight(IN_FLIGHT)
        .admin(free_port())
        .destination(partner(url));
    let started = Instant::now();
    let courier = spawn(&config, dir.path());
    mid_stream(rx, &ids, courier.log()).await;
    let running = fault(Running {
        courier,
        config,
        dir: dir.path().to_path_buf(),
    })
    .await;
    let repaired = Instant::now();
    let log = running.courier.log().to_path_buf();
    assert_mid_stream(rx, &ids, &log);
    wait_delivered(rx, &ids, ids.len(), &log).await;
    Figures::count(case, &ids, rx, started, repaired).check(max_duplicates, &log);
    drop(running);
    Publisher::connect().await.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_stopped_and_started_mid_stream() {
    let _turn = Turn::take(Disturbs::Brokers).await;
    // Slow enough that the broker's stop (seconds of rabbitmqctl) lands mid-stream.
    let rx = receiver(Duration::from_millis(50)).await;
    // Messages unacked at the stop come back; their outcome was committed before the ack was
    // attempted, so dedup skips them: no duplicate.
    amqp_case("rabbit-restart", &rx, &rx.url("/e"), 0, |running| async {
        let guard = RabbitGuard;
        tokio::task::spawn_blocking(|| {
            rabbitmqctl(&["stop_app"]);
            std::thread::sleep(Duration::from_secs(3));
            rabbitmqctl(&["start_app"]);
        })
        .await
        .expect("restart RabbitMQ");
        drop(guard);
        running
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_connections_force_closed_mid_stream() {
    // Closes every connection of the default vhost, other tests' included.
    let _turn = Turn::take(Disturbs::Brokers).await;
    // Slow enough that the closes (seconds of rabbitmqctl) land mid-stream.
    let rx = receiver(Duration::from_millis(50)).await;
    let close_all = || rabbitmqctl(&["close_all_connections", "courier fault suite"]);
    let close_thrice = |running: Running| async move {
        for _ in 0..3 {
            tokio::task::spawn_blocking(close_all)
                .await
                .expect("close connections");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        running
    };
    amqp_case("rabbit-close-conns", &rx, &rx.url("/e"), 0, close_thrice).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn courier_sigkilled_mid_stream_amqp() {
    let _turn = Turn::take(Disturbs::Nothing).await;
    let rx = receiver(Duration::from_millis(2)).await;
    // The same store: dedup must remember what the killed process delivered.
    let kill9 = |running: Running| running.kill9_and_restart(Duration::ZERO);
    amqp_case("courier-kill9-amqp", &rx, &rx.url("/e"), IN_FLIGHT, kill9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_down_for_a_while() {
    let _turn = Turn::take(Disturbs::Nothing).await;
    let rx = receiver(Duration::from_millis(2)).await;
    let gate = Arc::new(Gate::start(rx.addr).await);
    let g = gate.clone();
    // Going down cuts the requests under way: one the receiver had already answered 2xx
    // reaches courier as "connection closed" and is sent again (delivery.md, "When a POST can
    // happen twice", case 2). At most the requests in flight; a refused connection is none.
    amqp_case(
        "receiver-down",
        &rx,
        &gate.url("/e"),
        IN_FLIGHT,
        |running| async move {
            g.down().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            g.up().await;
            running
        },
    )
    .await;
}

/// An AMQP case whose fault is the receiver's own answer: `fault` for `lasting`, then `repair`;
/// no duplicate allowed.
async fn receiver_case(
    case: &'static str,
    lasting: Duration,
    fault: fn(&Receiver),
    repair: fn(&Receiver),
) {
    let _turn = Turn::take(Disturbs::Nothing).await;
    let rx = receiver(Duration::from_millis(2)).await;
    let r = rx.clone();
    amqp_case(case, &rx, &rx.url("/e"), 0, |running| async move {
        fault(&r);
        tokio::time::sleep(lasting).await;
        repair(&r);
        running
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_slow_for_a_while() {
    // Two seconds per request stays inside the 10 s timeout: slow, not failed, no duplicate.
    receiver_case(
        "receiver-slow",
        Duration::from_secs(8),
        |r| r.set_delay(Duration::from_secs(2)),
        |r| r.set_delay(Duration::from_millis(2)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_answers_500_for_a_while() {
    receiver_case(
        "receiver-500",
        Duration::from_secs(5),
        |r| r.set_status(500),
        |r| r.set_status(200),
    )
    .await;
}

/// A tmpfs mounted on the store directory, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let options = format!("size={size}");
        assert!(
            as_root(
                "mount",
                &[
                    "-t",
                    "tmpfs",
                    "-o",
                    &options,
                    "tmpfs",
                    &dir.to_string_lossy()
                ]
            ),
            "cannot mount a tmpfs on {}: this case needs root or passwordless sudo",
            dir.display()
        );
        Tmpfs(dir.to_path_buf())
    }

    fn remount(&self, mode: &str) -> bool {
        as_root(
            "mount",
            &["-o", &format!("remount,{mode}"), &self.0.to_string_lossy()],
        )
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        as_root("umount", &["-l", &self.0.to_string_lossy()]);
    }
}

/// Writes zeros into `path` until the disk is full.
fn fill(path: &Path) {
    let mut file = std::fs::File::create(path).expect("filler");
    let chunk = vec![0u8; 1 << 20];
    while file.write_all(&chunk).is_ok() {}
    let _ = file.sync_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_disk_full_then_read_only_then_writable() {
    let _turn = Turn::take(Disturbs::Nothing).await;
    let rx = receiver(Duration::from_millis(2)).await;
    let case = "store-full-readonly";
    let ids = case_ids(case);
    let queue = unique(case);
    let dir = tempfile::tempdir().expect("tempdir");
    let mount = dir.path().join("disk");
    let disk = Tmpfs::mount(&mount, "64m");
    let store = mount.join("store");
    let publisher = Publisher::connect().await;
    prefill(&publisher, &queue, &ids).await;
    let admin = free_port();
    let config = rabbit_config(&queue, &store)
        .max_in_flight(IN_FLIGHT)
        .admin(admin)
        .destination(partner(&rx.url("/e")));
    let started = Instant::now();
    let courier = spawn(&config, dir.path());
    let log = courier.log().to_path_buf();
    mid_stream(&rx, &ids, &log).await;

    // Disk full: the next flush fails.
    let filler = mount.join("filler");
    fill(&filler);
    wait_readyz(
        admin,
        503,
        Duration::from_secs(20),
        "courier stayed ready on a full disk",
        &log,
    )
    .await;
    // Nothing is acked while the store fails: the queue and the receiver stand still.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ready, unacked) = Publisher::counts(&queue);
    let got = delivered(&rx);
    let requests = rx.arrivals().len();
    // Long enough for several of courier's store retries (100 ms doubling up to 5 s).
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        Publisher::counts(&queue),
        (ready, unacked),
        "messages were acked while the store was failing"
    );
    assert!(
        unacked > 0 && unacked <= IN_FLIGHT as u64,
        "unacked {unacked}"
    );
    assert_eq!(delivered(&rx), got, "deliveries went on without a store");
    // Not even a POST of an event already sent: a store that reopens but cannot write must not
    // count as recovered (each false recovery would send the held messages again).
    assert_eq!(
        rx.arrivals().len(),
        requests,
        "POSTs went on without a store"
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("STORE OPERATION FAILED") || text.contains("STORE CANNOT BE"),
        "the store failure was not logged loudly:\n{}",
        log_tail(&log)
    );

    // Read-only: possible once courier has closed the failed store's files (a remount while a
    // file is open for writing is refused with EBUSY).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !disk.remount("ro") {
        assert!(
            Instant::now() < deadline,
            "the store's files stayed open after the failure; cannot remount read-only:\n{}",
            log_tail(&log)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(readyz(admin).await, Some(503), "ready on a read-only disk");
    assert_eq!(
        rx.arrivals().len(),
        requests,
        "POSTs went on with a read-only disk"
    );
    assert_eq!(
        Publisher::counts(&queue),
        (ready, unacked),
        "messages were acked while the disk was read-only"
    );

    // Writable again, with room.
    assert!(disk.remount("rw"), "remount rw");
    std::fs::remove_file(&filler).expect("remove filler");
    let repaired = Instant::now();
    assert_mid_stream(&rx, &ids, &log);
    wait_delivered(&rx, &ids, ids.len(), &log).await;
    wait_readyz(
        admin,
        200,
        Duration::from_secs(30),
        "not ready after the disk came back",
        &log,
    )
    .await;
    wait_drained(&queue, "queue drained", Duration::from_secs(30)).await;
    Figures::count(case, &ids, &rx, started, repaired).check(IN_FLIGHT, &log);
    drop(courier);
    publisher.delete_queue(&queue).await;
}

/// An MQTT case: events published (paced) for the whole case, `fault` run once a quarter was
/// delivered, and the publisher reconnected afterwards when `fault` says it broke it.
async fn mqtt_case<F, Fut>(case: &'static str, max_duplicates: usize, fault: F)
where
    F: FnOnce(Running) -> Fut,
    Fut: std::future::Future<Output = Running>,
{
    let rx = receiver(Duration::from_millis(2)).await;
    let ids = case_ids(case);
    let topic = unique(case);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let config = mqtt_config(&topic, &unique(case), &store)
        .max_in_flight(IN_FLIGHT)
        .destination(partner(&rx.url("/e")));
    let started = Instant::now();
    let courier = spawn(&config, dir.path());
    let publisher = MqttPublisher::connect().await;
    wait_subscribed(&publisher, &topic, &rx).await;
    let quarter = ids.len() / 4;
    publish_paced(&publisher, &topic, &ids[..quarter], 0, &rx).await;
    drop(publisher);
    mid_stream(&rx, &ids, courier.log()).await;
    let running = fault(Running {
        courier,
        config,
        dir: dir.path().to_path_buf(),
    })
    .await;
    let repaired = Instant::now();
    assert_mid_stream(&rx, &ids, running.courier.log());
    let publisher = MqttPublisher::connect().await;
    publish_paced(&publisher, &topic, &ids[quarter..], quarter, &rx).await;
    let log = running.courier.log().to_path_buf();
    wait_delivered(&rx, &ids, ids.len(), &log).await;
    Figures::count(case, &ids, &rx, started, repaired).check(max_duplicates, &log);
    drop(running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_restarted_mid_stream() {
    let _turn = Turn::take(Disturbs::Brokers).await;
    // A PUBACK lost with the connection makes Mosquitto send the message again; the outcome was
    // committed before the PUBACK, so dedup skips it.
    mqtt_case("mosquitto-restart", 0, |running| async {
        tokio::task::spawn_blocking(|| restart_mosquitto("TERM", Duration::from_secs(2)))
            .await
            .expect("restart Mosquitto");
        running
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn courier_sigkilled_mid_stream_mqtt() {
    let _turn = Turn::take(Disturbs::Nothing).await;
    // The documented MQTT bound (docs/reliability.md): the messages under way, plus the
    // finished ones whose PUBACK waited behind them and whose dedup record was not yet flushed.
    mqtt_case("courier-kill9-mqtt", 2 * IN_FLIGHT, |running| {
        running.kill9_and_restart(Duration::from_secs(1))
    })
    .await;
}

/// An operator's replay that meets a broken store gets an error within
/// `REPLAY_STORE_PATIENCE` and a bit, not an answer that never comes; once the disk is fixed,
/// replaying again delivers the letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_on_a_broken_store_answers_with_the_error() {
    let _turn = Turn::take(Disturbs::Nothing).await;
    let rx = receiver(Duration::from_millis(2)).await;
    let queue = unique("replay-broken-store");
    let dir = tempfile::tempdir().expect("tempdir");
    let mount = dir.path().join("disk");
    let _disk = Tmpfs::mount(&mount, "64m");
    let admin = free_port();
    // Topic `a` goes to the receiver; topic `b` to a port nobody listens on, so that its event
    // needs a retry written to the store.
    let nobody = format!("http://127.0.0.1:{}/", free_port());
    let config = rabbit_config(&queue, &mount.join("store"))
        .admin(admin)
        .destination(
            Dest::new("partner", &rx.url("/a"))
                .timeout(Duration::from_secs(60))
                .topics(["a"]),
        )
        .destination(Dest::new("nobody", &nobody).topics(["b"]));
    let publisher = Publisher::connect().await;
    publisher.declare_queue(&queue).await;
    let courier = spawn(&config, dir.path());
    let log = courier.log().to_path_buf();
    publisher.wait_consumers(&queue, 1).await;
    let event = |id: &str, topic: &str| {
        let pad = "x".repeat(4000);
        format!(r#"{{"id":"{id}","topic":"{topic}","data":{{"pad":"{pad}"}}}}"#).into_bytes()
    };
    let base = format!("http://127.0.0.1:{admin}");
    let http = reqwest::Client::new();
    let letters = || async {
        match http.get(format!("{base}/dead-letters")).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    };

    // A 400 is final: the event becomes a dead letter.
    rx.set_status(400);
    publisher
        .publish("", &queue, &event("r-1", "a"), Default::default())
        .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !letters().await.contains("r-1") {
        assert!(
            Instant::now() < deadline,
            "no dead letter:\n{}",
            log_tail(&log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The replay's POST is held at the receiver while the store breaks.
    rx.set_status(200);
    rx.hold();
    let replay = {
        let (http, url) = (http.clone(), format!("{base}/dead-letters/replay"));
        tokio::spawn(async move {
            let answer = http.post(url).timeout(Duration::from_secs(90)).send().await;
            match answer {
                Ok(r) => Some((r.status().as_u16(), r.text().await.unwrap_or_default())),
                Err(_) => None,
            }
        })
    };
    eventually(
        "the replay's POST at the receiver",
        Duration::from_secs(20),
        || rx.held() == 1,
    )
    .await;
    let filler = mount.join("filler");
    fill(&filler);
    // Each of these needs a retry written; sled's log soon needs room the disk does not have.
    publisher
        .fill(
            &queue,
            (0..3000).map(|i| event(&format!("r-b-{i}"), "b")),
            500,
        )
        .await;
    wait_readyz(
        admin,
        503,
        Duration::from_secs(30),
        "courier stayed ready on a full disk",
        &log,
    )
    .await;
    let released = Instant::now();
    rx.release();
    let answer = replay.await.expect("replay task");
    let took = released.elapsed();
    let (status, text) = answer.unwrap_or_else(|| {
        panic!(
            "the replay did not answer while the store was broken:\n{}",
            log_tail(&log)
        )
    });
    println!("replay on a broken store: {status} {took:?} after its POST was answered: {text}");
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("kept failing"), "{text}");
    assert!(
        took < Duration::from_secs(30),
        "answered {took:?} after the POST"
    );

    // Disk fixed: the store recovers, and a replay delivers the letter (or finds it delivered).
    std::fs::remove_file(&filler).expect("remove filler");
    wait_readyz(
        admin,
        200,
        Duration::from_secs(30),
        "not ready after the disk came back",
        &log,
    )
    .await;
    let again = http
        .post(format!("{base}/dead-letters/replay"))
        .send()
        .await
        .expect("replay again");
    assert_eq!(again.status().as_u16(), 200);
    let text = again.text().await.unwrap_or_default();
    assert!(text.contains(r#""outcome":"delivered""#), "{text}");
    assert!(!letters().await.contains("r-1"), "the letter stayed");
    assert!(
        rx.delivered_counts().contains_key("r-1"),
        "r-1 never reached the receiver with a 2xx"
    );
    drop(courier);
    publisher.delete_queue(&queue).await;
}
