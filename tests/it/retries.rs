//! Retries from the store, dead letters, circuits, signatures and TLS, over the real RabbitMQ and
//! real HTTP(S) servers.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use courier::store::DeadLetterKind;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);

/// Four attempts, 100 ms apart at first, doubling up to 1 s.
fn fast_retry() -> Retry {
    Retry::backoff(4, ms(100), 2.0, Duration::from_secs(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_are_retried_from_the_store_after_the_ack() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    rx.fail_next(2, 503);
    let (queue, store, pub_) = setup("retry").await;
    let courier = Courier::start(
        &rabbit_config(&queue, store.path())
            .destination(Dest::new("r", &rx.url("/r")).retry(fast_retry())),
    );
    pub_.to_queue(&queue, br#"{"id":"R1","topic":"t","data":{"n":1}}"#)
        .await;
    // The message is acked once the first attempt is recorded, not held for the retries.
    courier.wait_count(1, WAIT, |s| &s.acked).await;
    wait_drained(&queue, "queue drained", WAIT).await;
    eventually("delivered on the third attempt", WAIT, || {
        rx.delivered_counts().get("R1") == Some(&1)
    })
    .await;
    let stats = courier.stop().await;
    assert_eq!(rx.arrival_times("R1").len(), 3);
    assert_eq!(stats.retries_scheduled.load(Ordering::SeqCst), 2);
    let store = open_store(store.path());
    assert_eq!(store.pending_retries(), 0);
    assert!(store.dead_letters().unwrap().is_empty());
    assert!(
        store.is_delivered("r", "R1").await.unwrap(),
        "a retry that succeeds lands in the dedup tree"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    rx.fail_next(1, 429);
    rx.set_retry_after(2);
    let (queue, store, pub_) = setup("retry-after").await;
    let courier = Courier::start(
        &rabbit_config(&queue, store.path())
            .destination(Dest::new("r", &rx.url("/r")).retry(fast_retry())),
    );
    pub_.to_queue(&queue, event("RA", "t").as_bytes()).await;
    eventually("delivered after Retry-After", WAIT, || {
        rx.delivered_counts().get("RA") == Some(&1)
    })
    .await;
    courier.stop().await;
    let times = rx.arrival_times("RA");
    assert_eq!(times.len(), 2);
    let gap = times[1] - times[0];
    // max_interval (1 s) bounds the server's wish of 2 s; without it the wait would be ~100 ms.
    assert!(
        gap >= Duration::from_millis(950) && gap < Duration::from_millis(1800),
        "{gap:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_retryable_status_and_ineligible_events_get_one_attempt() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let (queue, store, pub_) = setup("once").await;
    let courier = Courier::start(
        &rabbit_config(&queue, store.path()).destinations([
            Dest::new("bad-request", &rx.url("/400"))
                .topics(["a"])
                .retry(fast_retry()),
            Dest::new("unavailable", &rx.url("/503"))
                .topics(["b"])
                .retry(fast_retry()),
        ]),
    );
    rx.fail_next(1, 400);
    pub_.to_queue(&queue, event("F400", "a").as_bytes()).await;
    courier.wait_count(1, WAIT, |s| &s.acked).await;
    rx.fail_next(1, 503);
    pub_.to_queue(
        &queue,
        br#"{"id":"NR","topic":"b","eligible_for_retry":false,"data":{}}"#,
    )
    .await;
    courier.wait_count(2, WAIT, |s| &s.acked).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    courier.stop().await;
    assert_eq!(rx.arrival_times("F400").len(), 1);
    assert_eq!(rx.arrival_times("NR").len(), 1);
    let letters = open_store(store.path()).dead_letters().unwrap();
    assert_eq!(letters.len(), 2);
    let f400 = letters
        .iter()
        .find(|l| l.event_id.as_deref() == Some("F400"))
        .unwrap();
    assert_eq!(
        (f400.kind, f400.last_status, f400.attempts),
        (DeadLetterKind::Failed, Some(400), 1)
    );
    let nr = letters
        .iter()
        .find(|l| l.event_id.as_deref() == Some("NR"))
        .unwrap();
    assert_eq!(nr.last_status, Some(503));
    assert!(
        nr.reason.contains("eligible_for_retry is false"),
        "{}",
        nr.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_end_in_a_dead_letter() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    rx.set_status(500);
    let (queue, store, pub_) = setup("exhaust").await;
    let courier = Courier::start(
        &rabbit_config(&queue, store.path()).destination(
            Dest::new("x", &rx.url("/x"))
                .retry(Retry::backoff(3, ms(50), 2.0, ms(200)))
                .circuit(Circuit::default().failures(100)),
        ),
    );
    pub_.to_queue(&queue, event("EX", "t").as_bytes()).await;
    courier.wait_count(1, WAIT, |s| &s.dead_lettered).await;
    courier.stop().await;
    assert_eq!(rx.arrival_times("EX").len(), 3);
    let store = open_store(store.path());
    assert_eq!(store.pending_retries(), 0);
    let letters = store.dead_letters().unwrap();
    assert_eq!(letters.len(), 1);
    let l = &letters[0];
    assert_eq!(
        (l.kind, l.attempts, l.last_status),
        (DeadLetterKind::Exhausted, 3, Some(500))
    );
    assert!(
        l.reason
            .starts_with("gave up after 3 attempts; last: HTTP 500"),
        "{}",
        l.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_retries_survive_a_restart() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    rx.set_status(503);
    let (queue, store, pub_) = setup("restart-retry").await;
    let config = rabbit_config(&queue, store.path())
        .destination(Dest::new("p", &rx.url("/p")).retry(Retry::every(5, ms(1500))));
    let courier = Courier::start(&config);
    pub_.to_queue(&queue, event("P1", "t").as_bytes()).await;
    courier.wait_count(1, WAIT, |s| &s.retries_scheduled).await;
    courier.stop().await;
    {
        let s = open_store(store.path());
        let pending = s.retries().unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(
            (pending[0].attempts, pending[0].last_status),
            (1, Some(503))
        );
    }
    assert_eq!(
        Publisher::counts(&queue),
        (0, 0),
        "the queue no longer holds it: the store does"
    );
    rx.set_status(200);
    let courier = Courier::start(&config);
    eventually("the pending retry is made after the restart", WAIT, || {
        rx.delivered_counts().get("P1") == Some(&1)
    })
    .await;
    courier.stop().await;
    assert_eq!(open_store(store.path()).pending_retries(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_never_answers_does_not_hold_back_the_others() {
    let _brokers = brokers().await;
    let good = Receiver::start().await;
    let hole = BlackHole::start().await;
    let (queue, store, pub_) = setup("clog").await;
    let courier = Courier::start(
        &rabbit_config(&queue, store.path())
            .shutdown_timeout(Duration::from_secs(2))
            .destinations([
                Dest::new("good", &good.url("/g")),
                Dest::new("hole", &hole.url("/h"))
                    .timeout(Duration::from_secs(60))
                    .max_concurrency(4)
                    .circuit(
                        Circuit::default()
                            .failures(5)
                            .open_for(Duration::from_secs(60))
                            .max_wait(Duration::from_millis(200)),
                    ),
            ]),
    );
    const N: usize = 300;
    publish_events(&pub_, &queue, "c", 0..N).await;
    let started = Instant::now();
    eventually("the good destination gets every event", WAIT, || {
        good.delivered_counts().len() == N
    })
    .await;
    let took = started.elapsed();
    // 4 messages wait on the hole's 60 s timeout; everything else was acked (its hole part parked).
    eventually("all but the in-flight ones acked", WAIT, || {
        Publisher::counts(&queue).0 == 0
    })
    .await;
    let parked = courier.count(|s| &s.parked);
    assert!(
        took < Duration::from_secs(15),
        "good destination took {took:?}"
    );
    assert!(parked as usize >= N - 4 - 1, "parked {parked}");
    assert!(
        hole.connections.load(Ordering::SeqCst) <= 4,
        "the hole never got more than max_concurrency"
    );
    courier.stop().await;
    let s = open_store(store.path());
    let parked_entries = s.retries().unwrap();
    assert!(parked_entries
        .iter()
        .all(|r| r.destination == "hole" && r.attempts == 0));
    assert!(
        parked_entries.len() >= N - 5,
        "parked events are durable: {}",
        parked_entries.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_probe_closes_it_and_parked_events_are_delivered() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    rx.set_status(503);
    let (queue, store, pub_) = setup("probe").await;
    let courier = Courier::start(
        &rabbit_config(&queue, store.path()).destination(
            Dest::new("p", &rx.url("/p"))
                .retry(Retry::every(10, ms(100)))
                .circuit(
                    Circuit::default()
                        .failures(2)
                        .open_for(Duration::from_secs(1)),
                ),
        ),
    );
    publish_events(&pub_, &queue, "o", 0..2).await;
    courier.wait_count(2, WAIT, |s| &s.failed).await;
    // Open now: these are parked without an attempt.
    publish_events(&pub_, &queue, "o", 2..20).await;
    courier.wait_count(20, WAIT, |s| &s.acked).await;
    assert!(
        courier.count(|s| &s.parked) >= 18,
        "parked {}",
        courier.count(|s| &s.parked)
    );
    let attempts_while_open = rx.arrivals().len();
    rx.set_status(200);
    eventually("all 20 delivered once the probe succeeded", WAIT, || {
        rx.delivered_counts().len() == 20
    })
    .await;
    courier.stop().await;
    assert!(
        attempts_while_open <= 3,
        "{attempts_while_open} attempts reached a destination whose circuit was open"
    );
    assert_eq!(open_store(store.path()).pending_retries(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_signed_the_standard_webhooks_way() {
    let _brokers = brokers().await;
    use hmac::Mac as _;
    let rx = Receiver::start().await;
    let (queue, store, pub_) = setup("signed").await;
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let courier = Courier::start(
        &rabbit_config(&queue, store.path()).destination(
            Dest::new("s", &rx.url("/s"))
                .signing_secret(secret)
                .metadata_in_payload(),
        ),
    );
    pub_.to_queue(
        &queue,
        br#"{"id":"SIG1","topic":"a.b","data":{"x":1.50},"metadata":{"webhook-id":"forged"}}"#,
    )
    .await;
    let r = rx.wait_for_id("SIG1", WAIT).await;
    courier.stop().await;
    assert_eq!(
        r.header("webhook-id"),
        Some("SIG1"),
        "metadata cannot override it"
    );
    let ts: u64 = r.header("webhook-timestamp").unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now.abs_diff(ts) < 60);
    // Verify as a receiver would: HMAC-SHA256 over "id.timestamp.body" with the decoded secret.
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD
        .decode(&secret[6..])
        .unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("SIG1.{ts}.").as_bytes());
    mac.update(&r.body);
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    assert_eq!(r.header("webhook-signature"), Some(expected.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_signed_https_is_refused_by_default_and_accepted_when_relaxed() {
    let _brokers = brokers().await;
    let tls = Receiver::start_tls().await;
    let (queue, store, pub_) = setup("tls").await;
    let courier = Courier::start(
        &rabbit_config(&queue, store.path()).destinations([
            Dest::new("strict", &tls.url("/strict"))
                .topics(["a"])
                .retry(Retry::default().max_attempts(1)),
            Dest::new("relaxed", &tls.url("/relaxed"))
                .topics(["b"])
                .no_tls_verify(),
        ]),
    );
    pub_.to_queue(&queue, event("T1", "a").as_bytes()).await;
    pub_.to_queue(
        &queue,
        br#"{"id":"T2","topic":"b","data":{"secure":"enough"}}"#,
    )
    .await;
    let r = tls.wait_for_id("T2", WAIT).await;
    assert_eq!(r.path, "/relaxed");
    assert_eq!(r.body, br#"{"secure":"enough"}"#);
    courier.wait_count(2, WAIT, |s| &s.acked).await;
    courier.stop().await;
    assert!(tls.requests_to("/strict").is_empty());
    let letters = open_store(store.path()).dead_letters().unwrap();
    assert_eq!(letters.len(), 1);
    let reason = &letters[0].reason;
    assert!(
        reason.contains("certificate") || reason.contains("UnknownIssuer"),
        "a clear TLS reason: {reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_cli_lists_replays_and_purges_offline_and_through_a_running_worker() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    rx.set_status(400);
    let (queue, dir, pub_) = setup("cli").await;
    let config = ConfigBuilder::new(dir.path().join("store"))
        .admin(free_port())
        .rabbitmq(Rabbit::queue(&queue))
        .destination(Dest::new("cli-dest", &rx.url("/c")));
    let cfg_path = dir.path().join("courier.toml");
    std::fs::write(&cfg_path, config.toml()).unwrap();

    // A worker dead-letters three events (400) and a poison message.
    let worker = spawn(&config, dir.path());
    publish_events(&pub_, &queue, "D", 1..4).await;
    pub_.to_queue(&queue, b"not json").await;
    eventually("all four settled", WAIT, || {
        Publisher::counts(&queue) == (0, 0) && rx.arrivals().len() == 3
    })
    .await;

    // While the worker holds the store, the CLI goes through its admin port.
    let (code, out, err) = tokio::task::spawn_blocking({
        let p = cfg_path.clone();
        move || run_cli(&["dead-letters", "list", "--json"], &p)
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    let letters: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(letters.as_array().unwrap().len(), 4, "{out}");
    rx.set_status(200);
    let (code, out, _) = tokio::task::spawn_blocking({
        let p = cfg_path.clone();
        move || run_cli(&["dead-letters", "replay", "--id", "D1"], &p)
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("delivered") && out.contains("D1"), "{out}");
    assert_eq!(rx.delivered_counts().get("D1"), Some(&1));
    drop(worker);

    // Stopped worker: the CLI opens the store itself.
    let (code, out, err) = run_cli(&["dead-letters", "list"], &cfg_path);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("3 dead letter(s)"), "{out}");
    assert!(
        out.contains("BadInput") && out.contains("not valid JSON"),
        "{out}"
    );
    let (code, out, _) = run_cli(
        &["dead-letters", "replay", "--destination", "cli-dest"],
        &cfg_path,
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 of 2 replayed letter(s) delivered"), "{out}");
    let (code, out, _) = run_cli(&["dead-letters", "replay"], &cfg_path);
    assert_eq!(code, 1, "the bad-input letter cannot be delivered");
    assert!(
        out.contains("cannot replay: the message could not be parsed"),
        "{out}"
    );
    let (code, out, _) = run_cli(&["dead-letters", "purge"], &cfg_path);
    assert_eq!(code, 0);
    assert!(out.contains("1 dead letter(s) purged"), "{out}");
    let counts = rx.delivered_counts();
    assert_eq!((counts["D1"], counts["D2"], counts["D3"]), (1, 1, 1));
}

/// A worker of a version before `after` and `limit` would ignore them and purge every letter:
/// the CLI finds out first and refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_refuses_to_page_through_a_worker_that_ignores_pages() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    // An "old worker": holds the store, and answers every admin request 200 with no letters.
    let _held = open_store(&dir.path().join("store"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_port = listener.local_addr().unwrap().port();
    let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = requests.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut head = vec![0u8; 4096];
            let n = socket.read(&mut head).await.unwrap_or(0);
            let line = String::from_utf8_lossy(&head[..n]);
            let line = line.lines().next().unwrap_or_default().to_string();
            seen.lock().unwrap().push(line);
            let _ = socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n[]")
                .await;
        }
    });
    let config = ConfigBuilder::new(dir.path().join("store"))
        .admin(admin_port)
        .rabbitmq(Rabbit::queue("unused"))
        .destination(Dest::new("d", "http://127.0.0.1:9/"));
    let cfg_path = dir.path().join("courier.toml");
    std::fs::write(&cfg_path, config.toml()).unwrap();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        run_cli(&["dead-letters", "purge", "--limit", "1"], &cfg_path)
    })
    .await
    .unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("older than this command"), "{err}");
    let requests = requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 1, "only the probe: {requests:?}");
    assert!(
        requests[0].starts_with("GET /dead-letters?"),
        "{requests:?}"
    );
}

/// The event ids of `dead-letters list` text lines, in order.
fn listed_ids(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|line| line.split("  event=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_dead_letter_tree_is_listed_replayed_and_purged_in_pages() {
    const LETTERS: usize = 2_500;
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let (queue, dir, pub_) = setup("pages").await;
    let admin_port = free_port();
    let config = ConfigBuilder::new(dir.path().join("store"))
        .admin(admin_port)
        .rabbitmq(Rabbit::queue(&queue))
        .destination(Dest::new("pg", &rx.url("/pg")));
    let cfg_path = dir.path().join("courier.toml");
    std::fs::write(&cfg_path, config.toml()).unwrap();

    // More letters than one page of the admin port (1,000) or of a replay (256).
    {
        let store = open_store(&dir.path().join("store"));
        for i in 0..LETTERS {
            let inbound = courier::event::Inbound {
                source: courier::event::SourceKind::Rabbitmq,
                format: courier::config::Format::Auto,
                body: bytes::Bytes::from(event(&format!("P{i:04}"), "t")),
                topic: "t".into(),
                message_id: None,
                headers: Vec::new(),
                received_at: std::time::SystemTime::now(),
                properties: None,
                expiry: None,
            };
            let event = courier::event::parse(&inbound, 1 << 20).unwrap();
            let letter = courier::store::DeadLetter::for_event(
                &event,
                DeadLetterKind::Failed,
                Some("pg"),
                "HTTP 400".into(),
                1,
                Some(400),
            );
            store.dead_letter(&letter).unwrap();
        }
        store.try_commit().await.unwrap();
        store.close().await.unwrap();
    }
    let id = |i: usize| format!("P{i:04}");

    // Through a running worker's admin port: pages of 1,000, each leading to the next.
    let worker = spawn(&config, dir.path());
    pub_.wait_consumers(&queue, 1).await;
    install_crypto_provider();
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{admin_port}");
    let mut url = format!("{base}/dead-letters");
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let link = response
            .headers()
            .get("link")
            .map(|v| v.to_str().unwrap().to_string());
        let letters: Vec<serde_json::Value> = response.json().await.unwrap();
        pages += 1;
        seen.extend(
            letters
                .iter()
                .map(|l| l["event_id"].as_str().unwrap().to_string()),
        );
        let Some(link) = link else { break };
        assert_eq!(letters.len(), 1_000, "a page with a next one is full");
        let path = link
            .strip_prefix('<')
            .and_then(|l| l.strip_suffix(">; rel=\"next\""))
            .unwrap_or_else(|| panic!("a next link: {link}"));
        url = format!("{base}{path}");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, (0..LETTERS).map(id).collect::<Vec<_>>());
    let response = client
        .get(format!("{base}/dead-letters?limit=10001"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("at most 10000"));
    let response = client
        .get(format!("{base}/dead-letters?after=zz"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(response
        .text()
        .await
        .unwrap()
        .contains("not a dead-letter key"));
    // A misspelt parameter is refused, not taken for "every letter".
    let response = client
        .post(format!("{base}/dead-letters/purge?destinaton=pg"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("destinaton"));
    // The CLI pages through the worker too, and prints one JSON array.
    let (code, out, err) = tokio::task::spawn_blocking({
        let p = cfg_path.clone();
        move || run_cli(&["dead-letters", "list", "--json"], &p)
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    let letters: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(letters.len(), LETTERS);
    let keys: Vec<String> = letters
        .iter()
        .map(|l| l["key"].as_str().unwrap().to_string())
        .collect();
    drop(worker);

    // Offline: a window of the list, a replay of the oldest five, purges in two steps.
    let (code, out, err) = run_cli(
        &[
            "dead-letters",
            "list",
            "--after",
            &keys[1_499],
            "--limit",
            "3",
        ],
        &cfg_path,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(listed_ids(&out), [id(1_500), id(1_501), id(1_502)], "{out}");
    assert!(out.contains("3 dead letter(s)"), "{out}");
    let (code, out, err) = run_cli(&["dead-letters", "list", "--after", "123"], &cfg_path);
    assert_eq!(code, 2, "{out}");
    assert!(err.contains("not a dead-letter key"), "{err}");
    let (code, out, _) = run_cli(&["dead-letters", "replay", "--limit", "5"], &cfg_path);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("5 of 5 replayed letter(s) delivered"), "{out}");
    assert!(
        out.contains(&format!("key={} event={}", keys[4], id(4))),
        "each line names its letter, for --after: {out}"
    );
    let mut delivered: Vec<String> = rx.delivered_counts().into_keys().collect();
    delivered.sort();
    assert_eq!(delivered, (0..5).map(id).collect::<Vec<_>>());
    let (code, out, _) = run_cli(
        &[
            "dead-letters",
            "purge",
            "--destination",
            "pg",
            "--limit",
            "1000",
        ],
        &cfg_path,
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1000 dead letter(s) purged"), "{out}");
    let (code, out, _) = run_cli(&["dead-letters", "list", "--limit", "1"], &cfg_path);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        listed_ids(&out),
        [id(1_005)],
        "the oldest 1,000 left went: {out}"
    );
    let (code, out, _) = run_cli(&["dead-letters", "purge"], &cfg_path);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1495 dead letter(s) purged"), "{out}");
    let (code, out, _) = run_cli(&["dead-letters", "list"], &cfg_path);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 dead letter(s)"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_says_what_to_do_when_the_store_is_busy_and_no_admin_port_is_set() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let (queue, dir, _pub) = setup("busy").await;
    let config = ConfigBuilder::new(dir.path().join("store"))
        .rabbitmq(Rabbit::queue(&queue))
        .destination(Dest::new("b", &rx.url("/b")));
    let cfg_path = dir.path().join("courier.toml");
    std::fs::write(&cfg_path, config.toml()).unwrap();
    let _worker = spawn(&config, dir.path());
    _pub.wait_consumers(&queue, 1).await;
    let (code, _, err) = run_cli(&["dead-letters", "list"], &cfg_path);
    assert_eq!(code, 1);
    assert!(
        err.contains("in use by a running courier") && err.contains("[admin] listen"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_destination_recovers_once_it_answers_again() {
    let _brokers = brokers().await;
    // A slot timeout on a half-open circuit gives the probe back: kept, the destination would stay
    // blocked (everything parked) until a restart.
    let rx = Receiver::start().await;
    rx.hold();
    let (queue, store, pub_) = setup("saturated").await;
    let courier = Courier::start(
        &rabbit_config(&queue, store.path()).destination(
            Dest::new("s", &rx.url("/s"))
                .max_concurrency(1)
                .timeout(Duration::from_secs(1))
                .retry(
                    Retry::default()
                        .initial_interval(Duration::from_millis(200))
                        .max_interval(Duration::from_millis(500)),
                )
                .circuit(
                    Circuit::default()
                        .failures(5)
                        .open_for(Duration::from_millis(300))
                        .max_wait(Duration::from_millis(100)),
                ),
        ),
    );
    for i in 0..30 {
        pub_.to_queue(&queue, event(&format!("s{i}"), "t").as_bytes())
            .await;
        // Spread over several open / half-open periods.
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    courier.wait_count(25, WAIT, |s| &s.parked).await;
    // The held request times out (a failure, which heals nothing) before the receiver recovers.
    courier.wait_count(1, WAIT, |s| &s.failed).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    rx.release();
    eventually(
        "every parked event delivered after the destination recovered",
        WAIT,
        || rx.delivered_counts().len() == 30,
    )
    .await;
    courier.stop().await;
    assert_eq!(open_store(store.path()).pending_retries(), 0);
}
