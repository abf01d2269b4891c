//! Destination auth with tokens: a static bearer token, and OAuth2 client credentials against a
//! real token endpoint on 127.0.0.1 (`support::TokenEndpoint`), with the real RabbitMQ and a
//! recording receiver. One token for many deliveries, a refresh before expiry, one refresh after
//! a 401, a token endpoint that is down or refuses the client, and no secret or token in logs,
//! `Debug` output or dead letters.

use std::time::{Duration, Instant};

use courier::store::DeadLetterKind;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);
const CLIENT_ID: &str = "courier";
const CLIENT_SECRET: &str = "oauth-secret-789";

/// The client of `endpoint`, with `secret`.
fn client(endpoint: &TokenEndpoint, secret: &str) -> OAuth2 {
    OAuth2::new(&endpoint.url(), CLIENT_ID, secret).scope("events:write")
}

fn authorizations(rx: &Receiver, id: &str) -> Vec<(String, u16)> {
    rx.requests()
        .into_iter()
        .filter(|r| r.id() == id)
        .map(|r| {
            (
                r.header("authorization").unwrap_or("").to_string(),
                r.status,
            )
        })
        .collect()
}

async fn get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
        Err(_) => (0, String::new()),
    }
}

/// Polls `url` until its answer satisfies `want`; returns the body.
async fn wait_for_answer(url: &str, what: &str, want: impl Fn(u16, &str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = get(url).await;
        if want(status, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{url} answered {status} {body}; waited for {what}"
        );
        tokio::time::sleep(ms(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_auth_arrives_as_authorization_bearer() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let (queue, store, pub_) = setup("bearer").await;
    let courier = Courier::start(
        &rabbit_config(&queue, store.path())
            .destination(Dest::new("b", &rx.url("/b")).bearer("static-bearer-654")),
    );
    pub_.to_queue(&queue, event("BE1", "t").as_bytes()).await;
    let r = rx.wait_for_id("BE1", WAIT).await;
    assert_eq!(r.header("authorization"), Some("Bearer static-bearer-654"));
    courier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_serves_a_thousand_deliveries_while_it_is_valid() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let endpoint = TokenEndpoint::start(CLIENT_ID, CLIENT_SECRET, ClientAuth::Basic).await;
    // Slow enough that the first deliveries (up to max_in_flight at once) all find no token.
    endpoint.set_delay(ms(200));
    let (queue, store, pub_) = setup("oauth-many").await;
    let courier = Courier::start(
        &rabbit_config(&queue, store.path()).destination(
            Dest::new("o", &rx.url("/o")).oauth2(
                client(&endpoint, CLIENT_SECRET)
                    .audience("https://api.partner.example")
                    .extra_param("resource", "events"),
            ),
        ),
    );
    let prefix = unique("M");
    publish_events(&pub_, &queue, &prefix, 0..1000).await;
    eventually("1,000 events delivered", Duration::from_secs(120), || {
        rx.delivered_with_prefix(&prefix) == 1000
    })
    .await;
    let stats = courier.stop().await;
    assert_eq!(endpoint.grants(), 1, "one token for every delivery");
    assert_eq!(endpoint.refusals(), 0);
    let form = endpoint.last_form();
    for pair in [
        ("grant_type", "client_credentials"),
        ("scope", "events:write"),
        ("audience", "https://api.partner.example"),
        ("resource", "events"),
    ] {
        assert!(
            form.contains(&(pair.0.to_string(), pair.1.to_string())),
            "{pair:?} not in {form:?}"
        );
    }
    assert!(rx
        .requests()
        .iter()
        .all(|r| r.header("authorization") == Some("Bearer tok-1")));
    assert_eq!(
        stats
            .retries_scheduled
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_refreshed_before_it_expires() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let endpoint = TokenEndpoint::start(CLIENT_ID, CLIENT_SECRET, ClientAuth::Body).await;
    // A lifetime of 4 s is replaced after 2 s (half of it; 30 s for longer ones).
    endpoint.set_expires_in(Some(4));
    let (queue, store, pub_) = setup("oauth-expiry").await;
    let courier = Courier::start(
        &rabbit_config(&queue, store.path()).destination(
            Dest::new("o", &rx.url("/o"))
                .oauth2(client(&endpoint, CLIENT_SECRET).client_auth_in_body()),
        ),
    );
    pub_.to_queue(&queue, event("X1", "t").as_bytes()).await;
    rx.wait_for_id("X1", WAIT).await;
    let first = endpoint.grant_times()[0];
    tokio::time::sleep((first + ms(2500)).saturating_duration_since(Instant::now())).await;
    pub_.to_queue(&queue, event("X2", "t").as_bytes()).await;
    rx.wait_for_id("X2", WAIT).await;
    courier.stop().await;
    assert_eq!(
        authorizations(&rx, "X1"),
        [("Bearer tok-1".to_string(), 200)]
    );
    assert_eq!(
        authorizations(&rx, "X2"),
        [("Bearer tok-2".to_string(), 200)]
    );
    let times = endpoint.grant_times();
    assert_eq!(times.len(), 2);
    assert!(
        times[1] < first + Duration::from_secs(4),
        "refreshed {:?} after the first token, which lived 4 s",
        times[1] - first
    );
    assert_eq!(
        endpoint.refusals(),
        0,
        "client_id and client_secret in the body"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_refreshes_the_token_once_and_the_event_is_delivered() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let endpoint = TokenEndpoint::start(CLIENT_ID, CLIENT_SECRET, ClientAuth::Basic).await;
    let (queue, store, pub_) = setup("oauth-401").await;
    let courier = Courier::start(
        &rabbit_config(&queue, store.path())
            .destination(Dest::new("o", &rx.url("/o")).oauth2(client(&endpoint, CLIENT_SECRET))),
    );
    // The receiver rejects the first token once.
    rx.fail_next(1, 401);
    pub_.to_queue(&queue, event("U1", "t").as_bytes()).await;
    eventually("U1 delivered", WAIT, || {
        rx.delivered_counts().get("U1") == Some(&1)
    })
    .await;
    assert_eq!(
        authorizations(&rx, "U1"),
        [
            ("Bearer tok-1".to_string(), 401),
            ("Bearer tok-2".to_string(), 200)
        ]
    );
    assert_eq!(endpoint.grants(), 2, "exactly one refresh");
    assert_eq!(
        courier.count(|s| &s.retries_scheduled),
        0,
        "in the same attempt"
    );
    // A 401 to the new token as well, moments after it replaced a refused one: the partner
    // refuses this client's tokens, so no third is asked for, and the 401 is the attempt's
    // outcome, a final failure.
    rx.fail_next(2, 401);
    pub_.to_queue(&queue, event("U2", "t").as_bytes()).await;
    courier.wait_count(1, WAIT, |s| &s.dead_lettered).await;
    courier.stop().await;
    assert_eq!(
        authorizations(&rx, "U2"),
        [("Bearer tok-2".to_string(), 401)]
    );
    assert_eq!(endpoint.grants(), 2);
    let letters = open_store(store.path()).dead_letters().unwrap();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(
        (letter.kind, letter.attempts, letter.last_status),
        (DeadLetterKind::Failed, 1, Some(401))
    );
    assert!(
        letter
            .reason
            .starts_with("HTTP 401 to an oauth2 token that replaced a refused one"),
        "{}",
        letter.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_that_is_down_delays_delivery_and_loses_nothing() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let endpoint = TokenEndpoint::start(CLIENT_ID, CLIENT_SECRET, ClientAuth::Basic).await;
    endpoint.stop().await;
    let (queue, store, pub_) = setup("oauth-down").await;
    let config = rabbit_config(&queue, store.path()).destination(
        Dest::new("o", &rx.url("/o"))
            .oauth2(client(&endpoint, CLIENT_SECRET))
            .retry(Retry::every(30, ms(200)))
            .circuit(Circuit::default().open_for(ms(300))),
    );
    let courier = Courier::start(&config);
    let prefix = unique("D");
    publish_events(&pub_, &queue, &prefix, 0..20).await;
    courier.wait_count(20, WAIT, |s| &s.acked).await;
    // Retried a while against the closed port, then stopped: the events wait in the store.
    tokio::time::sleep(ms(1000)).await;
    let stats = courier.stop().await;
    assert!(
        stats
            .retries_scheduled
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1
    );
    assert!(rx.requests().is_empty(), "nothing is sent without a token");
    assert_eq!(
        Publisher::counts(&queue),
        (0, 0),
        "acked: the store holds them"
    );
    {
        let store = open_store(store.path());
        assert!(store.dead_letters().unwrap().is_empty(), "no dead letter");
        let pending = store.retries().unwrap();
        assert_eq!(pending.len(), 20, "every event waits for a retry");
        for record in pending.iter().filter(|r| r.attempts > 0) {
            assert!(
                record
                    .last_error
                    .starts_with("oauth2 token endpoint failed: error sending request for url"),
                "{}",
                record.last_error
            );
            assert_eq!(record.last_status, None);
        }
        assert!(pending.iter().any(|r| r.attempts > 0));
    }
    endpoint.restart().await;
    let courier = Courier::start(&config);
    eventually(
        "every event delivered once the endpoint is back",
        WAIT,
        || rx.delivered_with_prefix(&prefix) == 20,
    )
    .await;
    courier.stop().await;
    assert_eq!(endpoint.grants(), 1);
    assert_eq!(rx.delivered_twice_with_prefix(&prefix), 0);
    let store = open_store(store.path());
    assert_eq!(store.pending_retries(), 0);
    assert!(store.dead_letters().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_reads_on_readyz_and_opens_the_circuit_until_a_token_is_granted() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let endpoint = TokenEndpoint::start(CLIENT_ID, CLIENT_SECRET, ClientAuth::Basic).await;
    let (queue, store, pub_) = setup("oauth-refused").await;
    let port = free_port();
    let courier = Courier::start(
        &rabbit_config(&queue, store.path()).admin(port).destination(
            Dest::new("partner", &rx.url("/p"))
                .oauth2(client(&endpoint, "wrong-secret-321"))
                .retry(Retry::every(100, ms(200)))
                .circuit(Circuit::default().open_for(Duration::from_secs(1))),
        ),
    );
    pub_.to_queue(&queue, event("R1", "t").as_bytes()).await;
    let base = format!("http://127.0.0.1:{port}");
    let want = "destination \"partner\": oauth2 token endpoint refused the client: \
                invalid_client (HTTP 401: client authentication failed)";
    let body = wait_for_answer(&format!("{base}/readyz"), "the refusal", |status, body| {
        status == 503 && body.contains("invalid_client")
    })
    .await;
    let ready: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(ready["reasons"], serde_json::json!([want]), "{body}");
    let (_, metrics) = get(&format!("{base}/metrics")).await;
    assert!(
        metrics.lines().any(|l| l == "courier_circuits_open 1"),
        "{metrics}"
    );
    // Parked while the circuit is open: the token endpoint is asked again only by the probes.
    tokio::time::sleep(ms(1500)).await;
    assert!(
        endpoint.refusals() <= 3,
        "{} refused token requests in 1.5 s",
        endpoint.refusals()
    );
    assert!(rx.requests().is_empty());
    // The authorization server now accepts the secret courier has.
    endpoint.set_secret("wrong-secret-321");
    rx.wait_for_id("R1", WAIT).await;
    wait_for_answer(&format!("{base}/readyz"), "ready again", |status, _| {
        status == 200
    })
    .await;
    let (_, metrics) = get(&format!("{base}/metrics")).await;
    assert!(
        metrics.lines().any(|l| l == "courier_circuits_open 0"),
        "{metrics}"
    );
    courier.stop().await;
    assert!(open_store(store.path()).dead_letters().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_and_tokens_stay_out_of_logs_debug_output_and_dead_letters() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    // Its own receiver, so that the 401 below goes to the OAuth2 destination.
    let rx_bearer = Receiver::start().await;
    let endpoint = TokenEndpoint::start_with_prefix(
        CLIENT_ID,
        CLIENT_SECRET,
        ClientAuth::Basic,
        "opaque-token-value-",
    )
    .await;
    let queue = unique("oauth-secrets");
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::new(dir.path().join("store"))
        .rabbitmq(Rabbit::queue(&queue))
        .destinations([
            Dest::new("good", &rx.url("/good")).oauth2(client(&endpoint, CLIENT_SECRET)),
            Dest::new("refused", &rx.url("/refused"))
                .oauth2(client(&endpoint, "wrong-secret-321").client_auth_in_body())
                .retry(Retry::default().max_attempts(1)),
            Dest::new("bearer", &rx_bearer.url("/bearer")).bearer("static-bearer-654"),
        ]);
    let secrets = [
        CLIENT_SECRET,
        "wrong-secret-321",
        "static-bearer-654",
        "opaque-token-value-",
    ];
    let debug = format!("{:?}", load(&config));
    for secret in secrets {
        assert!(!debug.contains(secret), "{secret} in Debug output: {debug}");
    }
    // The receiver rejects the first token once, so a refresh is logged too.
    rx.fail_next(1, 401);
    let mut child = spawn_launch(
        launch(&config, dir.path())
            .global_arg("--log-format")
            .global_arg("json")
            .rust_log("debug"),
    );
    let pub_ = Publisher::connect().await;
    pub_.wait_consumers(&queue, 1).await;
    pub_.to_queue(&queue, event("S1", "t").as_bytes()).await;
    eventually("S1 delivered to good and bearer", WAIT, || {
        rx.requests_to("/good").iter().any(|r| r.status == 200) && !rx_bearer.requests().is_empty()
    })
    .await;
    assert_eq!(endpoint.grants(), 2, "a new token after the 401");
    tokio::time::sleep(ms(500)).await;
    child.sigterm();
    let _ = child.wait_exit(Duration::from_secs(30)).await;
    let logs = std::fs::read_to_string(child.log()).unwrap();
    for secret in secrets {
        assert!(!logs.contains(secret), "{secret} in the logs:\n{logs}");
    }
    let basic = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
    };
    assert!(!logs.contains(&basic), "the Basic credentials in the logs");
    assert!(
        logs.lines().any(|l| l.contains("\"ERROR\"")
            && l.contains("oauth2 token endpoint refused the client")
            && l.contains("invalid_client")),
        "the refusal is not logged as an error:\n{logs}"
    );
    let letters = open_store(&dir.path().join("store"))
        .dead_letters()
        .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.destination.as_deref(), Some("refused"));
    assert_eq!(letter.kind, DeadLetterKind::Exhausted);
    assert_eq!(
        letter.reason,
        "gave up after 1 attempts; last: oauth2 token endpoint refused the client: \
         invalid_client (HTTP 401: client authentication failed)"
    );
    let stored = serde_json::to_string(&letters).unwrap();
    for secret in secrets {
        assert!(
            !stored.contains(secret),
            "{secret} in a dead letter: {stored}"
        );
    }
}
