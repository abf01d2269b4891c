//! TLS with private CAs and client certificates, on every connection courier makes: a Mosquitto
//! of the test's own that requires client certificates, RabbitMQ's TLS listener on 5671 (set up
//! by scripts/test.sh), and HTTPS receivers that require client certificates. Certificates are
//! made by the tests (rcgen, and openssl for the key formats rcgen does not write); rotation
//! replaces the files while courier runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use courier::store::DeadLetterKind;
use courier_testkit::pki::server_config;

use crate::support::mosquitto::TlsMosquitto;
use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);

/// Where scripts/test.sh keeps the CA, the server and the client certificate of RabbitMQ's TLS
/// listener on 127.0.0.1:5671.
const RABBIT_TLS_DIR: &str = "/var/lib/courier-test/tls";

/// A directory that Mosquitto, started as root and running as the `mosquitto` user, can read.
fn broker_dir(parent: &Path) -> PathBuf {
    let dir = parent.join("broker");
    std::fs::create_dir(&dir).expect("broker dir");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_mutual_tls_delivers_and_a_rotated_client_certificate_is_used_without_a_restart() {
    mqtt_mutual_tls(MqttProtocol::V3).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_mutual_tls_delivers_and_a_rotated_client_certificate_is_used_without_a_restart() {
    mqtt_mutual_tls(MqttProtocol::V5).await
}

async fn mqtt_mutual_tls(protocol: MqttProtocol) {
    let _brokers = brokers().await;
    let dir = tempfile::tempdir().unwrap();
    // The broker's certificate names it only by a DNS name: courier reaches it by IP address
    // and verifies that name (tls.server_name).
    let broker_ca = TestCa::new("broker CA");
    let server = broker_ca.server(&["mqtt.courier.test"]);
    let (old_ca, new_ca) = (TestCa::new("client CA 1"), TestCa::new("client CA 2"));
    let mut broker = TlsMosquitto::start(&broker_dir(dir.path()), &server, &old_ca);
    let ca_file = broker_ca.write(dir.path(), "broker-ca.pem");
    let (cert, key) = old_ca.client("courier").write(dir.path(), "client");
    let rx = Receiver::start().await;
    let topic = unique("tls/mqtt");
    let port = free_port();
    let courier = Courier::start(
        &test_defaults(&dir.path().join("store"))
            .admin(port)
            .mqtt(
                mqtt_source_as(&unique("courier-mtls"), &topic, protocol)
                    .url(&broker.url())
                    .tls(
                        Tls::default()
                            .ca_only(&ca_file)
                            .client(&cert, &key)
                            .server_name("mqtt.courier.test"),
                    ),
            )
            .destination(Dest::new("d", &rx.url("/d"))),
    );
    let publisher = MqttPublisher::connect_with(MqttPublisherOptions {
        port: broker.plain_port,
        ..Default::default()
    })
    .await;
    wait_subscribed(&publisher, &topic, &rx).await;
    publisher.publish(&topic, event("M1", "t")).await;
    rx.wait_for_id("M1", WAIT).await;
    wait_http_status(&format!("http://127.0.0.1:{port}/readyz"), 200, WAIT).await;

    // The broker now requires certificates of the new CA: courier's old one is refused, and it
    // says so.
    drop(publisher);
    broker.restart(&server, &new_ca);
    let body = wait_not_ready(port, "mqtt: not connected: ").await;
    assert!(refused_by_tls(&body), "{body}");

    // The new certificate lands on disk; the next reconnect uses it. The broker kept no
    // session, so courier subscribes again once connected: publish until one arrives.
    new_ca.client("courier").replace(&cert, &key);
    let publisher = MqttPublisher::connect_with(MqttPublisherOptions {
        port: broker.plain_port,
        ..Default::default()
    })
    .await;
    let mut n = 0;
    while !rx.arrivals().iter().any(|id| id.starts_with("M2-")) {
        assert!(n < 100, "nothing arrived after the rotation");
        publisher
            .publish(&topic, event(&format!("M2-{n}"), "t"))
            .await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_http_status(&format!("http://127.0.0.1:{port}/readyz"), 200, WAIT).await;
    courier.stop().await;
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_without_a_client_certificate_or_with_one_of_another_ca_does_not_connect() {
    let _brokers = brokers().await;
    let dir = tempfile::tempdir().unwrap();
    let broker_ca = TestCa::new("broker CA");
    let server = broker_ca.server(&["127.0.0.1"]);
    let client_ca = TestCa::new("client CA");
    let broker = TlsMosquitto::start(&broker_dir(dir.path()), &server, &client_ca);
    let ca_file = broker_ca.write(dir.path(), "broker-ca.pem");
    let (stranger_cert, stranger_key) = TestCa::new("another CA")
        .client("courier")
        .write(dir.path(), "stranger");
    let rx = Receiver::start().await;
    let topic = unique("tls/refused");
    let cases = [
        ("none", Tls::default().ca_file(&ca_file)),
        (
            "stranger",
            Tls::default()
                .ca_file(&ca_file)
                .client(&stranger_cert, &stranger_key),
        ),
    ];
    let mut running = Vec::new();
    for (name, tls) in cases {
        let port = free_port();
        let work = dir.path().join(name);
        std::fs::create_dir(&work).unwrap();
        let config = test_defaults(&work.join("store"))
            .admin(port)
            .mqtt(
                mqtt_source(&unique("courier-refused"), &topic)
                    .url(&broker.url())
                    .tls(tls),
            )
            .destination(Dest::new("d", &rx.url("/d")));
        running.push((name, port, spawn(&config, &work)));
    }
    for (name, port, child) in &running {
        if *name == "none" {
            wait_log_line(
                child.log(),
                &[
                    "mqtt.tls",
                    "asked for a client certificate and none is configured",
                ],
            )
            .await;
        }
        let body = wait_not_ready(*port, "mqtt: not connected: ").await;
        // The TLS failure is the reason, in the log and on /readyz.
        assert!(refused_by_tls(&body), "{name}: {body}");
        let line = wait_log_line(child.log(), &["MQTT connection failed"]).await;
        assert!(
            line.contains("WARN") && refused_by_tls(&line),
            "{name}: {line}"
        );
    }
    let publisher = MqttPublisher::connect_with(MqttPublisherOptions {
        port: broker.plain_port,
        ..Default::default()
    })
    .await;
    publisher.publish(&topic, event("NOPE", "t")).await;
    publisher.wait_acked().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rx.requests().is_empty(), "{:?}", rx.requests());
    for (_, _, child) in running {
        child.stop(Duration::from_secs(10)).await;
    }
}

/// The files scripts/test.sh made for RabbitMQ's TLS listener, or a panic saying how to get them.
fn rabbit_tls_file(name: &str) -> PathBuf {
    let path = Path::new(RABBIT_TLS_DIR).join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests through scripts/test.sh, which sets up RabbitMQ's TLS \
         listener on 127.0.0.1:5671",
        path.display()
    );
    path
}

const AMQPS_URL: &str = "amqps://guest:guest@127.0.0.1:5671/%2f";

/// `queue` at `url`, RabbitMQ's TLS listener, with the test CA and its client certificate;
/// the connection is named after the queue.
fn with_client_certificate(queue: &str, url: &str) -> Rabbit {
    Rabbit::queue(queue).connection_name(queue).url(url).tls(
        Tls::default()
            .ca_only(rabbit_tls_file("ca.pem"))
            .client(rabbit_tls_file("client.pem"), rabbit_tls_file("client.key"))
            // The listener's certificate names localhost and 127.0.0.1.
            .server_name("localhost"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_over_tls_with_a_client_certificate_delivers() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let store = tempfile::tempdir().unwrap();
    let queue = unique("tls");
    let publisher = Publisher::connect().await;
    publisher.declare_queue(&queue).await;
    let port = free_port();
    let courier = Courier::start(
        &test_defaults(store.path())
            .admin(port)
            .rabbitmq(with_client_certificate(&queue, AMQPS_URL))
            .destination(Dest::new("d", &rx.url("/d"))),
    );
    publisher.wait_consumers(&queue, 1).await;
    publisher
        .to_queue(&queue, event("A1", "t").as_bytes())
        .await;
    rx.wait_for_id("A1", WAIT).await;
    wait_http_status(&format!("http://127.0.0.1:{port}/readyz"), 200, WAIT).await;
    let connections = rabbitmqctl(&["-q", "list_connections", "port", "ssl"]);
    assert!(
        connections.lines().any(|l| l.trim() == "5671\ttrue"),
        "{connections}"
    );
    courier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_over_tls_without_a_client_certificate_does_not_connect() {
    let _brokers = brokers().await;
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("tls-refused");
    let publisher = Publisher::connect().await;
    publisher.declare_queue(&queue).await;
    let port = free_port();
    let config = test_defaults(&dir.path().join("store"))
        .admin(port)
        .rabbitmq(
            Rabbit::queue(&queue)
                .url(AMQPS_URL)
                .tls(Tls::default().ca_only(rabbit_tls_file("ca.pem"))),
        )
        .destination(Dest::new("d", &rx.url("/d")));
    let child = spawn(&config, dir.path());
    // RabbitMQ (TLS 1.3) refuses the connection after the handshake, which reads here like a
    // lost connection; the log says what the server asked for.
    wait_not_ready(port, "rabbitmq: not connected: ").await;
    wait_log_line(child.log(), &["RabbitMQ connection failed"]).await;
    wait_log_line(
        child.log(),
        &[
            "rabbitmq.tls",
            "asked for a client certificate and none is configured",
        ],
    )
    .await;
    publisher
        .to_queue(&queue, event("A2", "t").as_bytes())
        .await;
    eventually("the message waits in the queue", WAIT, || {
        Publisher::counts(&queue) == (1, 0)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        Publisher::counts(&queue),
        (1, 0),
        "the message is not consumed"
    );
    assert!(rx.requests().is_empty());
    child.stop(Duration::from_secs(10)).await;
}

/// The RabbitMQ user that SASL EXTERNAL logs the test's client certificate in as: RabbitMQ names
/// it by the certificate's distinguished name (`ssl_cert_login_from` at its default).
const EXTERNAL_USER: &str = "CN=courier test client";

/// Makes [`EXTERNAL_USER`], with every permission on the default vhost and no password (the
/// certificate is its only way in), unless it exists.
fn ensure_external_user() {
    let users = rabbitmqctl(&["-q", "list_users", "--no-table-headers"]);
    if !users
        .lines()
        .any(|l| l.split('\t').next() == Some(EXTERNAL_USER))
    {
        // Another run may make it between the look and the add; the permissions are set anyway.
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "add_user", EXTERNAL_USER, &unique("cleared-next")])
            .output();
    }
    rabbitmqctl(&["-q", "clear_password", EXTERNAL_USER]);
    rabbitmqctl(&[
        "-q",
        "set_permissions",
        "-p",
        "/",
        EXTERNAL_USER,
        ".*",
        ".*",
        ".*",
    ]);
}

/// `?auth_mechanism=external` logs in with the client certificate alone (RabbitMQ's
/// rabbitmq_auth_mechanism_ssl, which scripts/test.sh turns on): no user or password in the URL,
/// and RabbitMQ names the connection's user after the certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_sasl_external_logs_in_with_the_client_certificate_alone() {
    let _brokers = brokers().await;
    ensure_external_user();
    let rx = Receiver::start().await;
    let store = tempfile::tempdir().unwrap();
    let queue = unique("tls-external");
    let publisher = Publisher::connect().await;
    publisher.declare_queue(&queue).await;
    let courier = Courier::start(
        &test_defaults(store.path())
            .rabbitmq(with_client_certificate(
                &queue,
                "amqps://127.0.0.1:5671/%2f?auth_mechanism=external",
            ))
            .destination(Dest::new("d", &rx.url("/d"))),
    );
    publisher.wait_consumers(&queue, 1).await;
    publisher
        .to_queue(&queue, event("X1", "t").as_bytes())
        .await;
    rx.wait_for_id("X1", WAIT).await;
    let connections = rabbitmqctl(&[
        "-q",
        "list_connections",
        "--no-table-headers",
        "client_properties",
        "user",
        "auth_mechanism",
        "ssl",
    ]);
    let ours: Vec<&str> = connections.lines().filter(|l| l.contains(&queue)).collect();
    assert_eq!(ours.len(), 1, "{connections}");
    assert!(
        ours[0].ends_with(&format!("\t{EXTERNAL_USER}\tEXTERNAL\ttrue")),
        "courier's connection: {}",
        ours[0]
    );
    courier.stop().await;
}

/// The RabbitMQ queue of a test and a courier that POSTs from it; `dests` are its destinations.
async fn from_queue(prefix: &str, store: &Path, dests: Vec<Dest>) -> (String, Publisher, Courier) {
    let queue = unique(prefix);
    let publisher = Publisher::connect().await;
    publisher.declare_queue(&queue).await;
    let courier = Courier::start(&rabbit_config(&queue, store).destinations(dests));
    (queue, publisher, courier)
}

/// A partner that offers HTTP/2 by ALPN gets the POSTs over HTTP/2, with the whole contract;
/// one that offers nothing gets them over HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_partner_that_offers_http2_gets_the_posts_over_http2() {
    let _brokers = brokers().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("partner CA");
    let mut offers_h2 = server_config(&ca.server(&["127.0.0.1"]), &[]);
    offers_h2.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let rx_h2 = Receiver::start_with_tls(offers_h2).await;
    let rx_h1 = Receiver::start_with_tls(server_config(&ca.server(&["127.0.0.1"]), &[])).await;
    let ca_file = ca.write(dir.path(), "partner-ca.pem");
    let (queue, publisher, courier) = from_queue(
        "h2",
        &dir.path().join("store"),
        vec![
            Dest::new("h2", &rx_h2.url("/h2")).tls(Tls::default().ca_file(&ca_file)),
            Dest::new("h1", &rx_h1.url("/h1")).tls(Tls::default().ca_file(&ca_file)),
        ],
    )
    .await;
    for id in ["V1", "V2"] {
        publisher.to_queue(&queue, event(id, "t").as_bytes()).await;
    }
    rx_h2.wait_for(2, WAIT).await;
    rx_h1.wait_for(2, WAIT).await;
    courier.stop().await;
    for (rx, version) in [(&rx_h2, "HTTP/2.0"), (&rx_h1, "HTTP/1.1")] {
        let requests = rx.requests();
        assert_eq!(requests.len(), 2, "{version}");
        for r in &requests {
            assert_eq!((r.method.as_str(), r.version.as_str()), ("POST", version));
            assert!(matches!(r.id().as_str(), "V1" | "V2"), "{:?}", r.headers);
            assert_eq!(r.header("x-correlation-id"), Some(r.id().as_str()));
            assert_eq!(r.header("content-type"), Some("application/json"));
            assert!(
                r.header("user-agent")
                    .is_some_and(|a| a.starts_with("courier/")),
                "{:?}",
                r.headers
            );
            assert!(r.json().is_object(), "{:?}", r.body);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_requires_a_client_certificate_gets_it_and_a_missing_one_is_a_retry_with_its_reason(
) {
    let _brokers = brokers().await;
    let dir = tempfile::tempdir().unwrap();
    let server_ca = TestCa::new("partner CA");
    let client_ca = TestCa::new("courier client CA");
    let rx = Receiver::start_with_tls(server_config(
        &server_ca.server(&["127.0.0.1"]),
        &[client_ca.cert_der()],
    ))
    .await;
    let ca_file = server_ca.write(dir.path(), "partner-ca.pem");
    let (cert, key) = client_ca.client("courier").write(dir.path(), "client");
    let (queue, publisher, courier) = from_queue(
        "mtls",
        &dir.path().join("store"),
        vec![
            Dest::new("with", &rx.url("/with"))
                .topics(["with"])
                .tls(Tls::default().ca_file(&ca_file).client(&cert, &key)),
            Dest::new("without", &rx.url("/without"))
                .topics(["without"])
                .tls(Tls::default().ca_file(&ca_file))
                .retry(Retry::every(2, Duration::from_millis(200))),
        ],
    )
    .await;
    publisher
        .to_queue(&queue, event("W1", "with").as_bytes())
        .await;
    publisher
        .to_queue(&queue, event("N1", "without").as_bytes())
        .await;
    assert_eq!(rx.wait_for_id("W1", WAIT).await.path, "/with");
    courier.wait_count(1, WAIT, |s| &s.retries_scheduled).await;
    courier.wait_count(1, WAIT, |s| &s.dead_lettered).await;
    courier.stop().await;
    assert!(!rx.requests().iter().any(|r| r.id() == "N1"));
    assert!(
        rx.tls_failures()
            .iter()
            .any(|f| f.contains("peer sent no certificates")),
        "{:?}",
        rx.tls_failures()
    );
    let letters = open_store(&dir.path().join("store"))
        .dead_letters()
        .unwrap();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(
        (letter.kind, letter.attempts, letter.destination.as_deref()),
        (DeadLetterKind::Exhausted, 2, Some("without"))
    );
    assert!(
        letter.reason.contains("CertificateRequired"),
        "the reason names the missing certificate: {}",
        letter.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_client_certificate_and_ca_file_are_used_for_the_next_connection() {
    let _brokers = brokers().await;
    let dir = tempfile::tempdir().unwrap();
    let (old_server_ca, new_server_ca) = (TestCa::new("partner CA 1"), TestCa::new("partner CA 2"));
    let (old_client_ca, new_client_ca) = (TestCa::new("client CA 1"), TestCa::new("client CA 2"));
    let rx = Receiver::start_with_tls(server_config(
        &old_server_ca.server(&["127.0.0.1"]),
        &[old_client_ca.cert_der()],
    ))
    .await;
    // Every request on a connection of its own, so each one shows which files courier read.
    rx.close_connections();
    let ca_file = old_server_ca.write(dir.path(), "partner-ca.pem");
    let (cert, key) = old_client_ca.client("courier").write(dir.path(), "client");
    let (queue, publisher, courier) = from_queue(
        "rotate",
        &dir.path().join("store"),
        vec![Dest::new("p", &rx.url("/p"))
            .tls(Tls::default().ca_only(&ca_file).client(&cert, &key))
            .retry(Retry::every(20, Duration::from_millis(200)))],
    )
    .await;
    publisher
        .to_queue(&queue, event("R1", "t").as_bytes())
        .await;
    rx.wait_for_id("R1", WAIT).await;

    // The partner moves to a new server certificate and a new client CA: the old files fail.
    rx.set_tls(server_config(
        &new_server_ca.server(&["127.0.0.1"]),
        &[new_client_ca.cert_der()],
    ));
    publisher
        .to_queue(&queue, event("R2", "t").as_bytes())
        .await;
    courier.wait_count(2, WAIT, |s| &s.retries_scheduled).await;
    assert!(!rx.requests().iter().any(|r| r.id() == "R2"));

    // The new files land on disk while courier runs; the next retry uses them.
    new_client_ca.client("courier").replace(&cert, &key);
    let aside = dir.path().join("partner-ca.new");
    std::fs::write(&aside, &new_server_ca.cert_pem).unwrap();
    std::fs::rename(&aside, &ca_file).unwrap();
    rx.wait_for_id("R2", WAIT).await;
    publisher
        .to_queue(&queue, event("R3", "t").as_bytes())
        .await;
    rx.wait_for_id("R3", WAIT).await;
    let stats = courier.stop().await;
    assert_eq!(
        stats
            .dead_lettered
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

/// Runs openssl (scripts/test.sh installs it) in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_keys_in_every_supported_type_and_format_are_accepted() {
    let _brokers = brokers().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A client CA made by openssl, and one client key per type and format, each with its
    // certificate.
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=openssl client CA",
            "-days",
            "2",
        ],
    );
    let keys: [(&str, &[&str]); 5] = [
        (
            "rsa-pkcs1",
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                "k.tmp",
            ],
        ),
        (
            "rsa-pkcs8",
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                "k.tmp",
            ],
        ),
        (
            "ec-sec1",
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "k.tmp",
            ],
        ),
        (
            "ec384-pkcs8",
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-384",
                "-out",
                "k.tmp",
            ],
        ),
        (
            "ed25519",
            &["genpkey", "-algorithm", "ed25519", "-out", "k.tmp"],
        ),
    ];
    // X.509 version 3, as webpki requires, for client authentication.
    std::fs::write(
        d.join("client.ext"),
        "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    let mut dests = Vec::new();
    for (name, generate) in keys {
        openssl(d, generate);
        let key = format!("{name}.key");
        match name {
            "rsa-pkcs1" => openssl(d, &["rsa", "-in", "k.tmp", "-traditional", "-out", &key]),
            "ec-sec1" => std::fs::rename(d.join("k.tmp"), d.join(&key)).unwrap(),
            _ => openssl(
                d,
                &["pkcs8", "-topk8", "-nocrypt", "-in", "k.tmp", "-out", &key],
            ),
        }
        let header = std::fs::read_to_string(d.join(&key)).unwrap();
        let want = match name {
            "rsa-pkcs1" => "-----BEGIN RSA PRIVATE KEY-----",
            "ec-sec1" => "-----BEGIN EC PRIVATE KEY-----",
            _ => "-----BEGIN PRIVATE KEY-----",
        };
        assert!(header.starts_with(want), "{name}: {header}");
        let csr = format!("{name}.csr");
        let cert = format!("{name}.pem");
        openssl(
            d,
            &[
                "req",
                "-new",
                "-key",
                &key,
                "-subj",
                &format!("/CN={name}"),
                "-out",
                &csr,
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "client.ext",
                "-out",
                &cert,
            ],
        );
        dests.push((name, d.join(cert), d.join(key)));
    }
    let client_roots: Vec<_> = {
        use rustls::pki_types::pem::PemObject as _;
        rustls::pki_types::CertificateDer::pem_file_iter(d.join("ca.pem"))
            .unwrap()
            .map(|c| c.unwrap())
            .collect()
    };
    let server_ca = TestCa::new("partner CA");
    let rx = Receiver::start_with_tls(server_config(
        &server_ca.server(&["127.0.0.1"]),
        &client_roots,
    ))
    .await;
    let ca_file = server_ca.write(d, "partner-ca.pem");
    let (queue, publisher, courier) = from_queue(
        "keys",
        &d.join("store"),
        dests
            .iter()
            .map(|(name, cert, key)| {
                Dest::new(name, &rx.url(&format!("/{name}")))
                    .tls(Tls::default().ca_file(&ca_file).client(cert, key))
            })
            .collect(),
    )
    .await;
    publisher
        .to_queue(&queue, event("K1", "t").as_bytes())
        .await;
    let requests = rx.wait_for(dests.len(), WAIT).await;
    let mut paths: Vec<String> = requests.iter().map(|r| r.path.clone()).collect();
    paths.sort();
    let mut want: Vec<String> = dests.iter().map(|(n, _, _)| format!("/{n}")).collect();
    want.sort();
    assert_eq!(paths, want, "TLS failures: {:?}", rx.tls_failures());
    courier.stop().await;
}
