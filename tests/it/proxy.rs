//! Destinations behind HTTP proxies: a destination's own `proxy`, and the proxy environment
//! variables that every other destination follows (docs/connecting.md#proxies), through the
//! forwarding proxy of `support/proxy.rs`.

use std::time::Duration;

use base64::Engine as _;
use courier_testkit::pki::server_config;

use crate::support::proxy::Proxy;
use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);

fn basic(credentials: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(credentials)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_destination_that_names_a_proxy_goes_through_it() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let proxy = Proxy::start().await;
    let store = tempfile::tempdir().unwrap();
    let queue = unique("proxy");
    let publisher = Publisher::connect().await;
    publisher.declare_queue(&queue).await;
    let courier = Courier::start(&rabbit_config(&queue, store.path()).destinations([
        Dest::new("via", &rx.url("/via")).proxy(&proxy.url(Some("courier:pw%40x"))),
        Dest::new("direct", &rx.url("/direct")),
    ]));
    publisher
        .to_queue(&queue, event("P1", "t").as_bytes())
        .await;
    publisher
        .to_queue(&queue, event("P2", "t").as_bytes())
        .await;
    rx.wait_for(4, WAIT).await;
    courier.stop().await;
    let seen = proxy.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for p in &seen {
        assert_eq!(p.method, "POST");
        assert_eq!(p.target, rx.url("/via"), "{seen:?}");
        // The password is percent-decoded before it goes into the header.
        assert_eq!(
            p.authorization.as_deref(),
            Some(basic("courier:pw@x").as_str())
        );
    }
    let through = |path: &str| rx.requests_to(path).len();
    assert_eq!((through("/via"), through("/direct")), (2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_without_a_proxy_follow_the_environment() {
    let _brokers = brokers().await;
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start().await;
    let server_ca = TestCa::new("partner CA");
    let client_ca = TestCa::new("client CA");
    let tls_rx = Receiver::start_with_tls(server_config(
        &server_ca.server(&["127.0.0.1"]),
        &[client_ca.cert_der()],
    ))
    .await;
    let ca_file = server_ca.write(dir.path(), "partner-ca.pem");
    let (cert, key) = client_ca.client("courier").write(dir.path(), "client");
    let mtls = || Tls::default().ca_file(&ca_file).client(&cert, &key);
    let (env_proxy, own_proxy) = (Proxy::start().await, Proxy::start().await);
    let own = format!("http://courier:${{PROXY_PASSWORD}}@{}", own_proxy.addr);
    let queue = unique("envproxy");
    let publisher = Publisher::connect().await;
    publisher.declare_queue(&queue).await;
    let config = rabbit_config(&queue, &dir.path().join("store")).destinations([
        // HTTP_PROXY.
        Dest::new("env-http", &rx.url("/env-http")),
        // NO_PROXY=localhost: straight to the receiver.
        Dest::new(
            "no-proxy",
            &format!("http://localhost:{}/no-proxy", rx.addr.port()),
        ),
        // Its own proxy, whatever the environment says.
        Dest::new("own-http", &rx.url("/own-http")).proxy(&own),
        // HTTPS_PROXY, with a CONNECT tunnel; mutual TLS inside it.
        Dest::new("env-https", &tls_rx.url("/env-https")).tls(mtls()),
        Dest::new("own-https", &tls_rx.url("/own-https"))
            .tls(mtls())
            .proxy(&own),
    ]);
    let child = spawn_launch(
        launch(&config, dir.path())
            .env("HTTP_PROXY", &env_proxy.url(Some("env:env-pw-123")))
            .env("HTTPS_PROXY", &env_proxy.url(None))
            .env("NO_PROXY", "localhost")
            .env("PROXY_PASSWORD", "s3cret-proxy-pw"),
    );
    publisher.wait_consumers(&queue, 1).await;
    publisher
        .to_queue(&queue, event("E1", "t").as_bytes())
        .await;
    rx.wait_for(3, WAIT).await;
    tls_rx.wait_for(2, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.sigterm();
    let mut child = child;
    let _ = child.wait_exit(Duration::from_secs(20)).await;

    let targets = |p: &Proxy| -> Vec<String> {
        let mut t: Vec<String> = p
            .seen()
            .iter()
            .map(|s| format!("{} {}", s.method, s.target))
            .collect();
        t.sort();
        t
    };
    let tls_authority = tls_rx.addr.to_string();
    assert_eq!(
        targets(&env_proxy),
        [
            format!("CONNECT {tls_authority}"),
            format!("POST {}", rx.url("/env-http")),
        ]
    );
    assert_eq!(
        targets(&own_proxy),
        [
            format!("CONNECT {tls_authority}"),
            format!("POST {}", rx.url("/own-http")),
        ]
    );
    assert!(own_proxy
        .seen()
        .iter()
        .all(|p| p.authorization.as_deref() == Some(basic("courier:s3cret-proxy-pw").as_str())));
    let http = env_proxy
        .seen()
        .into_iter()
        .find(|p| p.method == "POST")
        .expect("the env proxy saw the http request");
    assert_eq!(
        http.authorization.as_deref(),
        Some(basic("env:env-pw-123").as_str())
    );
    assert_eq!(rx.requests_to("/no-proxy").len(), 1);

    // Both proxies are named in the log, without their passwords.
    let logs = std::fs::read_to_string(child.log()).unwrap();
    for secret in ["s3cret-proxy-pw", "env-pw-123"] {
        assert!(!logs.contains(secret), "{secret} in the logs:\n{logs}");
    }
    assert!(
        logs.contains(&format!("http://courier:***@{}", own_proxy.addr)),
        "{logs}"
    );
    assert!(
        logs.contains(&format!("HTTP_PROXY=http://env:***@{}", env_proxy.addr)),
        "{logs}"
    );
}
