//! A destination's own delivery policy over the real RabbitMQ: status-code rules, signing with
//! several secrets, and replays that respect the circuit unless forced.

use std::time::Duration;

use courier::store::DeadLetterKind;

use crate::support::webhooks::{self, Verifier};
use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_rules_override_the_default_table() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let (queue, store, publisher) = setup("rules").await;
    let courier = Courier::start(
        &rabbit_config(&queue, store.path()).destination(
            Dest::new("rules", &rx.url("/rules"))
                .retry_on(&["404", "5xx"])
                .final_on(&["501"])
                .success_on(&["409"])
                .retry(Retry::backoff(
                    4,
                    Duration::from_millis(100),
                    2.0,
                    Duration::from_secs(1),
                )),
        ),
    );

    // 409 under success_on: delivered, and the dedup record stops a second POST.
    rx.fail_next(1, 409);
    publisher
        .to_queue(&queue, event("C409", "t").as_bytes())
        .await;
    courier.wait_count(1, WAIT, |s| &s.delivered).await;
    publisher
        .to_queue(&queue, event("C409", "t").as_bytes())
        .await;
    courier.wait_count(1, WAIT, |s| &s.duplicates).await;

    // 404 under retry_on: retried (by default a 404 is final).
    rx.fail_next(1, 404);
    publisher
        .to_queue(&queue, event("R404", "t").as_bytes())
        .await;
    eventually("R404 delivered on its second attempt", WAIT, || {
        rx.delivered_counts().get("R404") == Some(&1)
    })
    .await;

    // 501 under final_on beats "5xx" under retry_on: a dead letter after one attempt.
    rx.fail_next(1, 501);
    publisher
        .to_queue(&queue, event("F501", "t").as_bytes())
        .await;
    courier.wait_count(1, WAIT, |s| &s.dead_lettered).await;
    // 503 is still retried through "5xx".
    rx.fail_next(1, 503);
    publisher
        .to_queue(&queue, event("R503", "t").as_bytes())
        .await;
    eventually("R503 delivered on its second attempt", WAIT, || {
        rx.delivered_counts().get("R503") == Some(&1)
    })
    .await;
    courier.stop().await;

    assert_eq!(rx.arrival_times("C409").len(), 1, "deduplicated");
    assert_eq!(rx.arrival_times("R404").len(), 2);
    assert_eq!(rx.arrival_times("F501").len(), 1);
    assert_eq!(rx.arrival_times("R503").len(), 2);
    let store = open_store(store.path());
    assert!(store.is_delivered("rules", "C409").await.unwrap());
    let letters = store.dead_letters().unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].event_id.as_deref(), Some("F501"));
    assert_eq!(
        (letters[0].kind, letters[0].last_status, letters[0].attempts),
        (DeadLetterKind::Failed, Some(501), 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_verifies_with_the_old_secret_and_with_the_new_one() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let (queue, store, publisher) = setup("rotation").await;
    let new = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let old = "whsec_b2xkLXNlY3JldC1vZi10aGUtcGFydG5lcg==";
    let courier = Courier::start(
        &rabbit_config(&queue, store.path()).destination(
            Dest::new("rotating", &rx.url("/rotating"))
                .signing_secrets(&[new, old])
                .metadata_in_payload(),
        ),
    );
    publisher
        .to_queue(&queue, br#"{"id":"ROT1","topic":"a.b","data":{"x":1.50}}"#)
        .await;
    let request = rx.wait_for_id("ROT1", WAIT).await;
    courier.stop().await;
    let signatures = request.header("webhook-signature").unwrap_or_default();
    assert_eq!(
        signatures
            .split(' ')
            .filter(|s| s.starts_with("v1,"))
            .count(),
        2,
        "{signatures}"
    );
    // The partner still on the old secret, then the partner on the new one.
    let (verifier, with_old) = webhooks::verify(old, &request);
    println!("verified with {verifier:?}");
    assert_eq!(with_old, Ok(()), "old secret");
    let (_, with_new) = webhooks::verify(new, &request);
    assert_eq!(with_new, Ok(()), "new secret");
    // And a secret courier does not hold does not verify: the check is real.
    let (_, with_other) = webhooks::verify("whsec_c29tZW9uZS1lbHNl", &request);
    assert!(with_other.is_err(), "{with_other:?}");
    if std::env::var_os("COURIER_REQUIRE_STANDARDWEBHOOKS").is_some() {
        assert_eq!(verifier, Verifier::Reference);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_waits_for_an_open_circuit_unless_forced() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let (queue, dir, publisher) = setup("replay-policy").await;
    let config = rabbit_config(&queue, &dir.path().join("store"))
        .admin(free_port())
        .destination(
            Dest::new("guarded", &rx.url("/guarded"))
                .retry(Retry::default().max_attempts(1))
                .circuit(
                    Circuit::default()
                        .failures(1)
                        .open_for(Duration::from_secs(120)),
                ),
        );
    let cfg_path = dir.path().join("courier.toml");
    std::fs::write(&cfg_path, config.toml()).unwrap();
    let courier = Courier::start(&config);

    // A 400 dead-letters D1 (the endpoint answered: the circuit stays closed) ...
    rx.set_status(400);
    publisher
        .to_queue(&queue, event("D1", "t").as_bytes())
        .await;
    courier.wait_count(1, WAIT, |s| &s.dead_lettered).await;
    // ... then a 503 opens the circuit for two minutes.
    rx.set_status(503);
    publisher
        .to_queue(&queue, event("D2", "t").as_bytes())
        .await;
    courier.wait_count(2, WAIT, |s| &s.dead_lettered).await;
    rx.set_status(200);
    let attempts_before = rx.arrivals().len();

    let replay = |args: &'static [&'static str]| {
        let path = cfg_path.clone();
        tokio::task::spawn_blocking(move || run_cli(args, &path))
    };
    // Through the worker's admin port, which holds the circuit: blocked, the letter stays.
    let (code, out, err) = replay(&["dead-letters", "replay", "--id", "D1"])
        .await
        .unwrap();
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("blocked") && out.contains("circuit is open") && out.contains("--force"),
        "{out}"
    );
    assert_eq!(rx.arrivals().len(), attempts_before, "nothing was sent");
    // Forced: through the open circuit.
    let (code, out, err) = replay(&["dead-letters", "replay", "--id", "D1", "--force"])
        .await
        .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 of 1 replayed letter(s) delivered"), "{out}");
    assert_eq!(rx.delivered_counts().get("D1"), Some(&1));
    courier.stop().await;
    let letters = open_store(&dir.path().join("store"))
        .dead_letters()
        .unwrap();
    let ids: Vec<_> = letters.iter().filter_map(|l| l.event_id.clone()).collect();
    assert_eq!(ids, ["D2"], "D1 left the dead letters, D2 stayed");
}
