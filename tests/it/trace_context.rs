//! W3C trace context end to end over the real RabbitMQ: a `traceparent` in an AMQP header (or the
//! envelope's metadata) comes out at the partner with the same trace id and a span id of the
//! attempt's own; `start_traces` decides about events without one; with `[tracing]
//! otlp_endpoint`, one span per attempt reaches an OTLP/HTTP collector started by the test.

use std::time::Duration;

use courier::trace::TraceContext;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;

use crate::support::otlp::Collector;
use crate::support::*;

const WAIT: Duration = Duration::from_secs(20);

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const BODY_TRACEPARENT: &str = "00-11111111111111111111111111111111-2222222222222222-01";

fn headers(pairs: &[(&str, &str)]) -> BasicProperties {
    let mut table = FieldTable::default();
    for (k, v) in pairs {
        table.insert((*k).into(), AMQPValue::LongString((*v).into()));
    }
    BasicProperties::default().with_headers(table)
}

/// The traceparent a request carried, read by courier's own parser (so it is valid).
fn traceparent_of(r: &Recorded) -> TraceContext {
    let value = r
        .header("traceparent")
        .unwrap_or_else(|| panic!("{} came without traceparent: {:?}", r.id(), r.headers));
    TraceContext::parse(value).unwrap_or_else(|e| panic!("{} sent {value:?}: {e}", r.id()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incoming_trace_context_is_continued_with_a_span_id_of_its_own() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let queue = unique("trace-continue");
    let store = tempfile::tempdir().unwrap();
    let config = rabbit_config(&queue, store.path()).destination(Dest::new("p", &rx.url("/p")));
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    let courier = Courier::start(&config);

    let send = |id: &str, metadata: &str, props: BasicProperties| {
        let body = format!(r#"{{"id":"{id}","topic":"t","metadata":{{{metadata}}},"data":{{}}}}"#);
        let pub_ = &pub_;
        let queue = &queue;
        async move { pub_.publish("", queue, body.as_bytes(), props).await }
    };
    send(
        "in-header",
        "",
        headers(&[
            ("traceparent", TRACEPARENT),
            ("tracestate", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
        ]),
    )
    .await;
    send(
        "invalid",
        "",
        headers(&[
            (
                "traceparent",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            ),
            ("tracestate", "rojo=1"),
        ]),
    )
    .await;
    send(
        "in-body",
        &format!(r#""traceparent":"{BODY_TRACEPARENT}","tracestate":"b=2""#),
        headers(&[("traceparent", "not-a-traceparent")]),
    )
    .await;
    send(
        "both",
        &format!(r#""traceparent":"{BODY_TRACEPARENT}""#),
        headers(&[("traceparent", TRACEPARENT)]),
    )
    .await;
    send("none", "", BasicProperties::default()).await;
    send(
        "unsampled",
        "",
        headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        )]),
    )
    .await;

    let r = rx.wait_for_id("in-header", WAIT).await;
    let got = traceparent_of(&r);
    assert_eq!(got.trace_id_hex(), TRACE_ID, "same trace");
    let span_id: String = r.header("traceparent").unwrap()[36..52].to_string();
    assert_ne!(span_id, PARENT_ID, "a span id of the attempt's own");
    assert!(got.sampled(), "the flags pass on");
    assert_eq!(
        r.header("tracestate"),
        Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
        "tracestate unchanged"
    );

    let r = rx.wait_for_id("invalid", WAIT).await;
    assert_eq!(
        r.header("traceparent"),
        None,
        "an invalid traceparent is not forwarded"
    );
    assert_eq!(r.header("tracestate"), None, "nor the tracestate beside it");

    let r = rx.wait_for_id("in-body", WAIT).await;
    let got = traceparent_of(&r);
    assert_eq!(
        got.trace_id_hex(),
        "11111111111111111111111111111111",
        "the body's metadata serves when the transport has no valid traceparent"
    );
    assert_ne!(r.header("traceparent"), Some(BODY_TRACEPARENT));
    assert_eq!(r.header("tracestate"), Some("b=2"));

    let r = rx.wait_for_id("both", WAIT).await;
    assert_eq!(
        traceparent_of(&r).trace_id_hex(),
        TRACE_ID,
        "the transport header wins"
    );

    let r = rx.wait_for_id("none", WAIT).await;
    assert_eq!(
        r.header("traceparent"),
        None,
        "start_traces is off by default"
    );

    let r = rx.wait_for_id("unsampled", WAIT).await;
    let got = traceparent_of(&r);
    assert_eq!(got.trace_id_hex(), TRACE_ID);
    assert!(!got.sampled(), "an unsampled trace stays unsampled");
    courier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_traces_gives_an_event_without_a_trace_a_new_one() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let queue = unique("trace-start");
    let store = tempfile::tempdir().unwrap();
    let config = rabbit_config(&queue, store.path())
        .tracing(Tracing::default().start_traces(true))
        .destination(Dest::new("p", &rx.url("/p")));
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    let courier = Courier::start(&config);
    pub_.to_queue(&queue, event("fresh-1", "t").as_bytes())
        .await;
    pub_.to_queue(&queue, event("fresh-2", "t").as_bytes())
        .await;
    pub_.publish(
        "",
        &queue,
        event("fresh-invalid", "t").as_bytes(),
        headers(&[(
            "traceparent",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]),
    )
    .await;
    pub_.publish(
        "",
        &queue,
        event("kept", "t").as_bytes(),
        headers(&[("traceparent", TRACEPARENT)]),
    )
    .await;
    let one = traceparent_of(&rx.wait_for_id("fresh-1", WAIT).await);
    let two = traceparent_of(&rx.wait_for_id("fresh-2", WAIT).await);
    assert!(one.sampled(), "a trace courier starts is sampled");
    assert_ne!(one.trace_id, two.trace_id, "one new trace per event");
    let invalid = traceparent_of(&rx.wait_for_id("fresh-invalid", WAIT).await);
    assert_ne!(
        invalid.trace_id_hex(),
        TRACE_ID,
        "an invalid one starts a new trace"
    );
    let kept = traceparent_of(&rx.wait_for_id("kept", WAIT).await);
    assert_eq!(kept.trace_id_hex(), TRACE_ID, "a valid one is continued");
    courier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_span_per_attempt_reaches_the_collector() {
    let _brokers = brokers().await;
    let collector = Collector::start().await;
    let steady = Receiver::start().await;
    let flaky = Receiver::start().await;
    flaky.fail_next(1, 503);
    let queue = unique("trace-export");
    let store = tempfile::tempdir().unwrap();
    let config = rabbit_config(&queue, store.path())
        .tracing(
            Tracing::export_to(&collector.endpoint())
                .start_traces(true)
                .service_name("courier-test")
                .header("x-collector-key", "k-1"),
        )
        .destination(Dest::new("steady", &steady.url("/s")).topics(["ok"]))
        .destination(
            Dest::new("flaky", &flaky.url("/f"))
                .topics(["flaky"])
                .retry(Retry::backoff(
                    3,
                    Duration::from_millis(100),
                    2.0,
                    Duration::from_secs(1),
                )),
        );
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    let courier = Courier::start(&config);

    pub_.publish(
        "",
        &queue,
        event("retried", "flaky").as_bytes(),
        headers(&[("traceparent", TRACEPARENT)]),
    )
    .await;
    pub_.to_queue(&queue, event("started", "ok").as_bytes())
        .await;
    pub_.publish(
        "",
        &queue,
        event("unsampled", "ok").as_bytes(),
        headers(&[(
            "traceparent",
            "00-99999999999999999999999999999999-00f067aa0ba902b7-00",
        )]),
    )
    .await;

    let requests = flaky.wait_for(2, WAIT).await;
    let sent: Vec<String> = requests
        .iter()
        .map(|r| r.header("traceparent").expect("traceparent").to_string())
        .collect();
    let started = steady.wait_for_id("started", WAIT).await;
    let unsampled = steady.wait_for_id("unsampled", WAIT).await;
    // A graceful stop flushes the batch.
    courier.stop().await;

    let spans = collector.wait_spans("courier.deliver", 2, WAIT).await;
    let mut retried: Vec<_> = spans
        .iter()
        .filter(|s| s.attr("courier.event_id") == Some("retried"))
        .collect();
    retried.sort_by_key(|s| s.attr("courier.attempt").map(str::to_string));
    assert_eq!(retried.len(), 2, "{spans:#?}");
    for (i, span) in retried.iter().enumerate() {
        assert_eq!(
            span.trace_id,
            TRACE_ID,
            "attempt {} continues the trace",
            i + 1
        );
        assert_eq!(
            span.parent_span_id, PARENT_ID,
            "child of the producer's span"
        );
        assert_eq!(span.kind, 3, "client");
        assert_eq!(span.service_name, "courier-test");
        assert_eq!(span.attr("courier.destination"), Some("flaky"));
        assert_eq!(span.attr("courier.topic"), Some("flaky"));
        assert_eq!(
            span.attr("courier.attempt"),
            Some((i + 1).to_string().as_str())
        );
        assert_eq!(
            sent[i],
            format!("00-{TRACE_ID}-{}-01", span.span_id),
            "the POST carried the span's own id"
        );
    }
    let (first, second) = (retried[0], retried[1]);
    assert_eq!(first.attr("courier.outcome"), Some("retry_scheduled"));
    assert_eq!(first.attr("http.response.status_code"), Some("503"));
    assert_eq!(first.attr("courier.origin"), Some("message"));
    assert_eq!(first.status_code, 2, "error");
    assert!(
        first.status_message.contains("503"),
        "{}",
        first.status_message
    );
    assert_eq!(second.attr("courier.outcome"), Some("delivered"));
    assert_eq!(second.attr("http.response.status_code"), Some("200"));
    assert_eq!(second.attr("courier.origin"), Some("retry"));
    assert_eq!(second.status_code, 1, "ok");
    assert_ne!(first.span_id, second.span_id);

    // start_traces: the event's trace has a courier.receive root, the attempt is its child.
    let receive = collector.wait_spans("courier.receive", 1, WAIT).await;
    let root = receive
        .iter()
        .find(|s| s.attr("courier.event_id") == Some("started"))
        .expect("courier.receive span of the started trace");
    assert_eq!(root.kind, 5, "consumer");
    assert_eq!(root.parent_span_id, "", "a root");
    let deliver = spans
        .iter()
        .find(|s| s.attr("courier.event_id") == Some("started"))
        .expect("courier.deliver span of the started trace");
    assert_eq!(deliver.trace_id, root.trace_id);
    assert_eq!(deliver.parent_span_id, root.span_id);
    assert_eq!(deliver.attr("courier.destination"), Some("steady"));
    assert_eq!(
        started.header("traceparent"),
        Some(format!("00-{}-{}-01", deliver.trace_id, deliver.span_id).as_str())
    );

    // An unsampled trace is continued on the wire, not exported.
    let sent = traceparent_of(&unsampled);
    assert_eq!(sent.trace_id_hex(), "99999999999999999999999999999999");
    assert!(
        !collector
            .spans()
            .iter()
            .any(|s| s.trace_id == "99999999999999999999999999999999"),
        "no span of an unsampled trace"
    );
    let keys: Vec<_> = collector
        .request_headers()
        .iter()
        .map(|h| {
            h.get("x-collector-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .collect();
    assert!(
        !keys.is_empty() && keys.iter().all(|k| k.as_deref() == Some("k-1")),
        "every export carries [tracing] headers: {keys:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_dead_letter_continues_its_trace_and_the_cli_flushes_its_span() {
    let _brokers = brokers().await;
    let collector = Collector::start().await;
    let rx = Receiver::start().await;
    rx.set_status(400);
    let queue = unique("trace-replay");
    let dir = tempfile::tempdir().unwrap();
    let config = rabbit_config(&queue, &dir.path().join("store"))
        .tracing(Tracing::export_to(&collector.endpoint()))
        .destination(Dest::new("final", &rx.url("/r")));
    let cfg_path = dir.path().join("courier.toml");
    std::fs::write(&cfg_path, config.toml()).unwrap();
    let pub_ = Publisher::connect().await;
    pub_.declare_queue(&queue).await;
    let courier = Courier::start(&config);
    pub_.publish(
        "",
        &queue,
        event("dead", "t").as_bytes(),
        headers(&[("traceparent", TRACEPARENT), ("tracestate", "rojo=1")]),
    )
    .await;
    let first = rx.wait_for_id("dead", WAIT).await;
    courier.stop().await;

    // The offline CLI replays the letter through the same attempt path, and exits only after
    // its span is sent.
    rx.set_status(200);
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        run_cli(&["dead-letters", "replay", "--id", "dead"], &cfg_path)
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    let requests = rx.requests();
    assert_eq!(requests.len(), 2, "the first attempt and the replay");
    let replayed = traceparent_of(&requests[1]);
    assert_eq!(
        replayed.trace_id_hex(),
        TRACE_ID,
        "the letter kept its trace"
    );
    assert_eq!(requests[1].header("tracestate"), Some("rojo=1"));
    assert_ne!(
        requests[1].header("traceparent"),
        first.header("traceparent")
    );

    let spans = collector.wait_spans("courier.deliver", 2, WAIT).await;
    let replay = spans
        .iter()
        .find(|s| s.attr("courier.origin") == Some("replay"))
        .unwrap_or_else(|| panic!("the CLI's span: {spans:#?}"));
    assert_eq!(replay.trace_id, TRACE_ID);
    assert_eq!(replay.parent_span_id, PARENT_ID);
    assert_eq!(replay.attr("courier.attempt"), Some("2"));
    assert_eq!(replay.attr("courier.outcome"), Some("delivered"));
    let dead = spans
        .iter()
        .find(|s| s.attr("courier.origin") == Some("message"))
        .expect("the first attempt's span");
    assert_eq!(dead.attr("courier.outcome"), Some("dead_lettered"));
    assert_eq!(dead.attr("http.response.status_code"), Some("400"));
}
