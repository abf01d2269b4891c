//! The bad-input corpus through a real RabbitMQ queue, with the default limits: every bad
//! message is dead-lettered once with a reason that says what is wrong, the worker stays up, and
//! the good event published after each bad one is delivered.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(60);

/// (what it is, body, the words its dead-letter reason must contain)
fn corpus() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let many_keys: Vec<String> = (0..1000).map(|i| format!("\"k{i}\":\"v\"")).collect();
    vec![
        ("empty body", b"".to_vec(), "payload is empty"),
        ("blank body", b" \n\t ".to_vec(), "payload is empty"),
        ("invalid UTF-8", b"\xff\xfe\xfd".to_vec(), "not valid UTF-8"),
        ("invalid JSON", b"{\"id\": ".to_vec(), "not valid JSON"),
        (
            "JSON array",
            b"[1,2,3]".to_vec(),
            "JSON array, not an object",
        ),
        ("JSON number", b"42".to_vec(), "JSON number, not an object"),
        (
            "JSON string",
            b"\"hello\"".to_vec(),
            "JSON string, not an object",
        ),
        (
            "100 MB body",
            {
                let mut big = br#"{"id":"huge","data":""#.to_vec();
                big.resize(100 * 1024 * 1024, b'x');
                big.extend_from_slice(br#""}"#);
                big
            },
            "over service.max_payload_bytes = 1048576",
        ),
        (
            "10,000-level nesting (array)",
            ("[".repeat(10_000) + &"]".repeat(10_000)).into_bytes(),
            "JSON array, not an object",
        ),
        (
            "10,000-level nesting (in data)",
            format!(
                r#"{{"id":"deep","data":{}1{}}}"#,
                "{\"a\":".repeat(10_000),
                "}".repeat(10_000)
            )
            .into_bytes(),
            "deeper than 127 levels",
        ),
        (
            "id of the wrong type",
            br#"{"id":{"nested":true},"data":{}}"#.to_vec(),
            "id: expected a string or an integer",
        ),
        (
            "id with CR/LF",
            b"{\"id\":\"inj\\r\\nX-Evil: 1\",\"data\":{}}".to_vec(),
            "id: contains characters",
        ),
        (
            "metadata name not a header name",
            br#"{"id":"m1","data":{},"metadata":{"bad name":"v"}}"#.to_vec(),
            "metadata.bad name: is not a valid HTTP header name",
        ),
        (
            "metadata value with CR/LF",
            b"{\"id\":\"m2\",\"data\":{},\"metadata\":{\"x-a\":\"v\\r\\nX-Evil: 1\"}}".to_vec(),
            "metadata.x-a: is not a valid HTTP header value",
        ),
        (
            "metadata of the wrong type",
            br#"{"id":"m3","data":{},"metadata":[1]}"#.to_vec(),
            "metadata: expected an object",
        ),
        (
            "1,000 metadata keys",
            format!(
                r#"{{"id":"m4","data":{{}},"metadata":{{{}}}}}"#,
                many_keys.join(",")
            )
            .into_bytes(),
            "has 1000 keys",
        ),
        (
            "topic with #",
            br#"{"id":"t1","topic":"a.#","data":{}}"#.to_vec(),
            "wildcard segment",
        ),
        (
            "topic with +",
            br#"{"id":"t2","topic":"a/+/b","data":{}}"#.to_vec(),
            "wildcard segment",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_message_is_dead_lettered_with_its_reason_and_the_rest_flows() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let queue = unique("badinput");
    let store = tempfile::tempdir().unwrap();
    let publisher = Publisher::connect().await;
    publisher.declare_queue(&queue).await;
    let corpus = corpus();
    publisher
        .to_queue(&queue, event("good-first", "t").as_bytes())
        .await;
    for (i, (_, body, _)) in corpus.iter().enumerate() {
        publisher.to_queue(&queue, body).await;
        publisher
            .to_queue(&queue, event(&format!("good-{i}"), "t").as_bytes())
            .await;
    }
    let courier = Courier::start(
        &rabbit_config(&queue, store.path()).destination(Dest::new("d", &rx.url("/d"))),
    );

    rx.wait_for_id("good-first", WAIT).await;
    for i in 0..corpus.len() {
        rx.wait_for_id(&format!("good-{i}"), WAIT).await;
    }
    let total = 2 * corpus.len() as u64 + 1;
    courier.wait_count(total, WAIT, |s| &s.acked).await;
    wait_drained(&queue, "queue drained, nothing requeued", WAIT).await;
    let stats = courier.stop().await;
    assert_eq!(
        stats.received.load(Ordering::SeqCst),
        total,
        "each message seen once"
    );
    assert_eq!(
        rx.requests().len(),
        corpus.len() + 1,
        "only the good events"
    );

    let letters = open_store(store.path()).dead_letters().unwrap();
    assert_eq!(
        letters.len(),
        corpus.len(),
        "one dead letter per bad message"
    );
    for (what, body, want) in &corpus {
        let letter = letters
            .iter()
            .find(|l| {
                l.reason.contains(want)
                    && (l.raw().as_deref() == Some(&body[..]) || l.raw_truncated)
            })
            .unwrap_or_else(|| {
                panic!(
                    "{what}: no dead letter with {want:?}; reasons: {:#?}",
                    letters.iter().map(|l| &l.reason).collect::<Vec<_>>()
                )
            });
        eprintln!("{what:<32} → {}", letter.reason);
    }
    // The 100 MB body is kept only up to the limit.
    let huge = letters
        .iter()
        .find(|l| l.raw_truncated)
        .expect("the 100 MB letter is truncated");
    assert_eq!(huge.raw().map(|r| r.len()), Some(1024 * 1024));
}
