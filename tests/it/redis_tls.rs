//! The shared dedup record in a Redis reached over TLS (`rediss://`): a Redis of the test's own
//! with a TLS port that requires a client certificate and a password.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);

/// The Redis key of `event_id`'s record for `destination` (see src/store/dedup.rs).
fn key(prefix: &str, destination: &str, event_id: &str) -> Vec<u8> {
    [
        prefix.as_bytes(),
        destination.as_bytes(),
        b"\0",
        event_id.as_bytes(),
    ]
    .concat()
}

/// Publishes the event `id` into `queue` and waits until `rx` has it and the queue is drained.
async fn deliver(publisher: &Publisher, queue: &str, rx: &Receiver, id: &str) {
    publisher.to_queue(queue, event(id, "t").as_bytes()).await;
    eventually(&format!("{id} delivered"), WAIT, || {
        rx.delivered_counts().contains_key(id)
    })
    .await;
    wait_drained(queue, "queue drained", WAIT).await;
}

/// A connection to `redis`'s plain port.
async fn plain(redis: &TlsRedis) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!(
        "redis://:{}@127.0.0.1:{}/0",
        redis.password, redis.plain_port
    ))
    .expect("redis URL")
    .get_multiplexed_async_connection()
    .await
    .expect("connect to the test's Redis on its plain port")
}

/// The seconds to live of the record of `id` for destination `d` in `redis` (-2: no record).
async fn record_ttl(redis: &TlsRedis, prefix: &str, id: &str) -> i64 {
    let mut plain = plain(redis).await;
    redis::cmd("TTL")
        .arg(key(prefix, "d", id))
        .query_async(&mut plain)
        .await
        .expect("TTL")
}

/// The test's Redis (password `redis-secret`), with the files of its CA and of a client
/// certificate and key it accepts, written in `dir`.
fn start_redis(dir: &Path) -> (TlsRedis, [PathBuf; 3]) {
    let server_ca = TestCa::new("redis CA");
    let client_ca = TestCa::new("redis client CA");
    let redis = TlsRedis::start(
        dir,
        &server_ca.server(&["127.0.0.1"]),
        &client_ca,
        "redis-secret",
    );
    let ca_file = server_ca.write(dir, "redis-ca.pem");
    let (cert, key) = client_ca.client("courier").write(dir, "courier");
    (redis, [ca_file, cert, key])
}

/// A courier on its own queue with its dedup record in `redis`, presenting `tls`.
fn config(
    queue: &str,
    store: &Path,
    redis: &TlsRedis,
    prefix: &str,
    tls: Tls,
    rx: &Receiver,
) -> ConfigBuilder {
    rabbit_config(queue, store)
        .redis_dedup(&redis.url(), prefix)
        .redis_tls(tls)
        .destination(Dest::new("d", &rx.url("/d")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_in_redis_over_mutual_tls_records_recognises_and_reconnects() {
    let _brokers = brokers().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut redis, [ca_file, cert, key_file]) = start_redis(dir.path());
    let (queue, store, publisher) = setup("redis-tls").await;
    let rx = Receiver::start().await;
    let prefix = format!("{}:", unique("courier-tls"));
    let tls = Tls::default().ca_only(&ca_file).client(&cert, &key_file);
    let port = free_port();
    let courier = spawn(
        &config(&queue, store.path(), &redis, &prefix, tls, &rx).admin(port),
        store.path(),
    );

    deliver(&publisher, &queue, &rx, "R1").await;
    wait_http_status(&format!("http://127.0.0.1:{port}/readyz"), 200, WAIT).await;
    // The record went to the test's Redis, through TLS, with the URL's password.
    let ttl = record_ttl(&redis, &prefix, "R1").await;
    assert!(ttl > 0, "the record of R1 in the test's Redis: TTL {ttl}");

    // A second copy of R1 is recognised from that record and not POSTed.
    publisher
        .to_queue(&queue, event("R1", "t").as_bytes())
        .await;
    wait_drained(&queue, "second copy settled", WAIT).await;
    deliver(&publisher, &queue, &rx, "R2").await;
    assert_eq!(rx.delivered_counts().get("R1"), Some(&1));

    // The server closes courier's connection (as an idle timeout or a failover does): the next
    // dedup check notices, and is sent again on a new connection instead of failing.
    let mut plain = plain(&redis).await;
    let killed: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query_async(&mut plain)
        .await
        .expect("CLIENT KILL");
    assert!(killed >= 1, "courier's connection was not there to close");
    deliver(&publisher, &queue, &rx, "R4").await;
    let log = std::fs::read_to_string(courier.log()).unwrap_or_default();
    assert!(
        !log.contains("STORE OPERATION FAILED"),
        "a closed connection failed a store operation:\n{log}"
    );

    // Redis goes away and comes back empty: courier connects again on its own.
    redis.restart();
    deliver(&publisher, &queue, &rx, "R3").await;
    let ttl = record_ttl(&redis, &prefix, "R3").await;
    assert!(
        ttl > 0,
        "the record of R3 in the restarted Redis: TTL {ttl}"
    );
    let log = std::fs::read_to_string(courier.log()).unwrap_or_default();
    assert!(
        !log.contains("redis-secret"),
        "the password in the log:\n{log}"
    );
    courier.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_without_a_client_certificate_or_the_ca_does_not_connect_and_says_why_on_readyz(
) {
    let _brokers = brokers().await;
    let dir = tempfile::tempdir().unwrap();
    let (redis, [ca_file, cert, key_file]) = start_redis(dir.path());
    let rx = Receiver::start().await;
    // Under TLS 1.3 the server judges the client's certificate after the client's side of the
    // handshake is done, so its refusal comes as an alert, or a reset, on the first request.
    let refused: fn(&str) -> bool = |line| {
        refused_by_tls(line) || line.contains("reset by peer") || line.contains("Broken pipe")
    };
    let untrusted: fn(&str) -> bool =
        |line| line.contains("TLS handshake failed: invalid peer certificate: UnknownIssuer");
    let cases = [
        // The server asks for a certificate and gets none.
        ("no-certificate", Tls::default().ca_only(&ca_file), refused),
        // The server's certificate is from a CA courier does not trust.
        (
            "unknown-ca",
            Tls::default().client(&cert, &key_file),
            untrusted,
        ),
    ];
    let mut running = Vec::new();
    for (name, tls, reason) in cases {
        let (queue, store, publisher) = setup(&format!("redis-tls-{name}")).await;
        let prefix = format!("{}:", unique(name));
        let port = free_port();
        let courier = spawn(
            &config(&queue, store.path(), &redis, &prefix, tls, &rx).admin(port),
            store.path(),
        );
        publisher
            .to_queue(&queue, event(name, "t").as_bytes())
            .await;
        running.push((name, reason, queue, store, courier, port));
    }
    for (name, reason, _, _, courier, port) in &running {
        let line = wait_log_line(courier.log(), &["cannot reach Redis for dedup; retrying"]).await;
        println!("{name}: {line}");
        assert!(line.contains("WARN") && reason(&line), "{name}: {line}");
        assert!(line.contains("rediss://:***@127.0.0.1:"), "{name}: {line}");
        assert!(
            !line.contains("redis-secret"),
            "{name}: the password in {line}"
        );
        // The admin port answers meanwhile: alive, not ready, and why.
        wait_http_status(&format!("http://127.0.0.1:{port}/healthz"), 200, WAIT).await;
        let body = wait_not_ready(*port, "store: cannot reach Redis: ").await;
        assert!(reason(&body), "{name}: {body}");
    }
    // Nothing is taken from the queue while the dedup record cannot be reached.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rx.requests().is_empty(), "{:?}", rx.requests());
    for (_, _, queue, _, mut courier, _) in running {
        assert_eq!(Publisher::counts(&queue).0, 1, "{queue} keeps its message");
        // A stop while waiting for Redis is a clean one.
        assert!(courier.sigterm());
        let status = courier.wait_exit(Duration::from_secs(10)).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "{queue}: exit after SIGTERM while waiting for Redis: {status:?}"
        );
    }
}
