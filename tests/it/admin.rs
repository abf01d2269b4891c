//! The admin port's access rule, over real HTTP: probes and metrics are open; the dead-letter
//! endpoints need `[admin] token`, or, without one, a loopback listen address. The CLI sends the
//! token from the configuration or `COURIER_ADMIN_TOKEN`.

use std::time::{Duration, Instant};

use crate::support::*;

const TOKEN: &str = "s3cret-admin-token";

/// Status, `WWW-Authenticate` and body of `method url`, with `token` as a bearer token.
async fn call(method: reqwest::Method, url: &str, token: Option<&str>) -> (u16, String, String) {
    install_crypto_provider();
    let client = reqwest::Client::new();
    let mut request = client.request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("admin port answers");
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (status, challenge, response.text().await.unwrap_or_default())
}

async fn get(url: &str, token: Option<&str>) -> (u16, String, String) {
    call(reqwest::Method::GET, url, token).await
}

/// Waits for the admin port to answer /healthz.
async fn wait_up(base: &str) {
    install_crypto_provider();
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("{base}/healthz")).await.is_err() {
        assert!(Instant::now() < deadline, "the admin port never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// courier with its admin port on `listen` and an optional token.
fn start_courier(listen: &str, token: Option<&str>, store: &std::path::Path) -> Courier {
    let rx_url = "http://127.0.0.1:9/never";
    Courier::start(
        &rabbit_config(&unique("admin-access"), store)
            .admin_on(listen, token)
            .destination(Dest::new("d", rx_url)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_dead_letter_endpoints_need_it_and_the_probes_do_not() {
    let _brokers = brokers().await;
    let store = tempfile::tempdir().unwrap();
    let port = free_port();
    let courier = start_courier(&format!("0.0.0.0:{port}"), Some(TOKEN), store.path());
    let base = format!("http://127.0.0.1:{port}");
    wait_up(&base).await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (status, _, _) = get(&format!("{base}{path}"), None).await;
        assert!(status == 200 || status == 503, "{path} answered {status}");
    }
    for (method, path) in [
        (reqwest::Method::GET, "/dead-letters"),
        (reqwest::Method::POST, "/dead-letters/replay"),
        (reqwest::Method::POST, "/dead-letters/purge"),
    ] {
        let url = format!("{base}{path}");
        let (status, challenge, body) = call(method.clone(), &url, None).await;
        assert_eq!(
            (status, challenge.as_str()),
            (401, "Bearer"),
            "{path}: {body}"
        );
        let (status, _, _) = call(method.clone(), &url, Some("wrong")).await;
        assert_eq!(status, 401, "{path} with a wrong token");
        let (status, _, _) = call(method.clone(), &url, Some(&TOKEN[..TOKEN.len() - 1])).await;
        assert_eq!(status, 401, "{path} with a prefix of the token");
        let (status, _, body) = call(method.clone(), &url, Some(TOKEN)).await;
        assert_eq!(status, 200, "{path} with the token: {body}");
        // The scheme's name in any case (RFC 9110).
        let answer = reqwest::Client::new()
            .request(method, &url)
            .header("Authorization", format!("bearer {TOKEN}"))
            .send()
            .await
            .expect("request");
        assert_eq!(
            answer.status().as_u16(),
            200,
            "{path} with bearer in lower case"
        );
    }
    courier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_they_answer_on_loopback_only() {
    let _brokers = brokers().await;
    let store = tempfile::tempdir().unwrap();
    let port = free_port();
    let courier = start_courier(&format!("127.0.0.1:{port}"), None, store.path());
    let base = format!("http://127.0.0.1:{port}");
    wait_up(&base).await;
    let (status, _, body) = get(&format!("{base}/dead-letters"), None).await;
    assert_eq!(status, 200, "loopback without a token: {body}");
    // Not to a web page, though: one that POSTs to 127.0.0.1 (its browser sends Origin), or
    // whose own name resolves to 127.0.0.1 (DNS rebinding: the name stays in Host).
    let client = reqwest::Client::new();
    let send = |method: reqwest::Method, path: &str, header: (&'static str, String)| {
        client
            .request(method, format!("{base}{path}"))
            .header(header.0, header.1)
            .send()
    };
    for (method, path, header, want) in [
        (
            reqwest::Method::POST,
            "/dead-letters/purge",
            ("Origin", "https://evil.example".to_string()),
            403,
        ),
        (
            reqwest::Method::GET,
            "/dead-letters",
            ("Host", format!("rebound.evil.example:{port}")),
            403,
        ),
        (
            reqwest::Method::GET,
            "/dead-letters",
            ("Host", format!("localhost:{port}")),
            200,
        ),
        (
            reqwest::Method::GET,
            "/dead-letters",
            ("Host", format!("[::1]:{port}")),
            200,
        ),
    ] {
        let answer = send(method.clone(), path, header.clone())
            .await
            .expect("request");
        let status = answer.status().as_u16();
        let body = answer.text().await.unwrap_or_default();
        assert_eq!(status, want, "{method} {path} with {header:?}: {body}");
        if want == 403 {
            assert!(body.contains("do not answer browsers"), "{body}");
        }
    }
    let (status, _, _) = get(&format!("{base}/healthz"), None).await;
    assert_eq!(status, 200, "health is for anyone");
    courier.stop().await;

    let store = tempfile::tempdir().unwrap();
    let port = free_port();
    let courier = start_courier(&format!("0.0.0.0:{port}"), None, store.path());
    let base = format!("http://127.0.0.1:{port}");
    wait_up(&base).await;
    let (status, _, body) = get(&format!("{base}/dead-letters"), None).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("set [admin] token") && body.contains("Authorization: Bearer"),
        "the refusal says how to set a token: {body}"
    );
    let (status, _, body) = call(
        reqwest::Method::POST,
        &format!("{base}/dead-letters/purge"),
        Some("anything"),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, _, _) = get(&format!("{base}/healthz"), None).await;
    assert_eq!(status, 200);
    courier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sends_the_token_from_the_config_or_the_environment() {
    let _brokers = brokers().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let queue = unique("admin-cli");
    let worker = rabbit_config(&queue, &dir.path().join("store"))
        .admin_on(&format!("0.0.0.0:{port}"), Some(TOKEN))
        .destination(Dest::new("d", "http://127.0.0.1:9/never"));
    let courier = Courier::start(&worker);
    wait_up(&format!("http://127.0.0.1:{port}")).await;
    let with_token = dir.path().join("with-token.toml");
    std::fs::write(&with_token, worker.toml()).unwrap();
    let without_token = dir.path().join("without-token.toml");
    std::fs::write(
        &without_token,
        rabbit_config(&queue, &dir.path().join("store"))
            .admin_on(&format!("0.0.0.0:{port}"), None)
            .destination(Dest::new("d", "http://127.0.0.1:9/never"))
            .toml(),
    )
    .unwrap();
    let list = |config: std::path::PathBuf, env_token: Option<&'static str>| {
        tokio::task::spawn_blocking(move || {
            let mut command = courier_command();
            command
                .args(["dead-letters", "list", "--config"])
                .arg(&config)
                .env_remove("COURIER_ADMIN_TOKEN");
            if let Some(token) = env_token {
                command.env("COURIER_ADMIN_TOKEN", token);
            }
            let out = command.output().expect("run courier");
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
    };
    let (code, out, err) = list(with_token, None).await.unwrap();
    assert_eq!(code, 0, "token from the config: {out}{err}");
    assert!(out.contains("0 dead letter(s)"), "{out}");
    let (code, out, err) = list(without_token.clone(), Some(TOKEN)).await.unwrap();
    assert_eq!(code, 0, "token from COURIER_ADMIN_TOKEN: {out}{err}");
    let (code, _, err) = list(without_token, None).await.unwrap();
    assert_eq!(code, 1);
    assert!(
        err.contains("401") && err.contains("[admin] token"),
        "no token: the worker's reason is shown: {err}"
    );
    assert!(!err.contains(TOKEN), "{err}");
    courier.stop().await;
}

/// A replay through the admin port whose POST hangs does not hold a stop past the shutdown
/// timeout: the port stops then, and the letter stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_replay_does_not_hold_the_stop_past_the_shutdown_timeout() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let (queue, store, publisher) = setup("admin-replay-stop").await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let config = rabbit_config(&queue, store.path())
        .admin(port)
        .shutdown_timeout(Duration::from_secs(2))
        .destination(Dest::new("d", &rx.url("/d")));
    let mut courier = spawn(&config, store.path());
    wait_up(&base).await;
    // A 400 is final: the event becomes a dead letter.
    rx.set_status(400);
    publisher
        .to_queue(&queue, event("H1", "t").as_bytes())
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !get(&format!("{base}/dead-letters"), None)
        .await
        .2
        .contains("H1")
    {
        assert!(Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The replay's POST is held at the receiver, well past the shutdown timeout.
    rx.set_status(200);
    rx.hold();
    let url = format!("{base}/dead-letters/replay");
    let replay = tokio::spawn(async move { call(reqwest::Method::POST, &url, None).await });
    eventually(
        "the replay's POST at the receiver",
        Duration::from_secs(20),
        || rx.held() == 1,
    )
    .await;
    let asked = Instant::now();
    assert!(courier.sigterm());
    let status = courier.wait_exit(Duration::from_secs(20)).await;
    let took = asked.elapsed();
    rx.release();
    assert!(
        status.is_some_and(|s| s.success()),
        "courier did not stop within 20 s of SIGTERM with a replay under way: {status:?}"
    );
    assert!(
        took < Duration::from_secs(10),
        "stopped {took:?} after SIGTERM"
    );
    let _ = replay.await;
    // The letter stays for the next replay.
    let letters = open_store(store.path()).dead_letters().unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
}
