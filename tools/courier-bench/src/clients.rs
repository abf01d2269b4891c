//! The bare HTTP clients a fanout delivery could be built on, against the same receiver and in
//! alternating rounds: reqwest over HTTP/1.1 (what courier uses), reqwest over HTTP/2 with prior
//! knowledge (h2c, one connection), and hyper's own pooled client over HTTP/1.1 without
//! reqwest's layers. A client that POSTs no faster bare cannot make courier faster.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;

use crate::bench::{event, Bench};
use crate::raw::post_rate_with;

/// Requests/s of each client, per round.
pub struct ClientFigures {
    pub h1: Vec<f64>,
    pub h2c: Vec<f64>,
    pub hyper: Vec<f64>,
}

/// Three alternating rounds of `--events` POSTs per client, 64 at a time, after an untimed
/// warm-up of each.
pub async fn clients(b: &Bench) -> ClientFigures {
    let (n, size) = (b.n, b.size);
    let h2c = || {
        reqwest::Client::builder()
            .tcp_nodelay(true)
            .http2_prior_knowledge()
            .build()
            .expect("client")
    };
    let h1 = || {
        reqwest::Client::builder()
            .tcp_nodelay(true)
            .build()
            .expect("client")
    };
    let warm = n.min(5_000);
    post_rate_with(h1(), &b.rx.url("/clients-warm"), warm, size, 64).await;
    post_rate_with(h2c(), &b.rx.url("/clients-warm"), warm, size, 64).await;
    hyper_rate(&b.rx.url("/clients-warm"), warm, size, 64).await;
    let mut figures = ClientFigures {
        h1: Vec::new(),
        h2c: Vec::new(),
        hyper: Vec::new(),
    };
    for round in 0..3 {
        let url = |kind: &str| b.rx.url(&format!("/clients-{kind}-{round}"));
        figures
            .h1
            .push(post_rate_with(h1(), &url("h1"), n, size, 64).await);
        figures
            .h2c
            .push(post_rate_with(h2c(), &url("h2c"), n, size, 64).await);
        figures
            .hyper
            .push(hyper_rate(&url("hyper"), n, size, 64).await);
    }
    let show = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "bare clients, requests/s in 3 alternating rounds: reqwest HTTP/1.1 {}; reqwest h2c {}; hyper HTTP/1.1 {}",
        show(&figures.h1),
        show(&figures.h2c),
        show(&figures.hyper)
    );
    figures
}

/// hyper-util's pooled client POSTing `n` bodies with `concurrency` workers: requests/s.
async fn hyper_rate(url: &str, n: usize, size: usize, concurrency: usize) -> f64 {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client: HyperClient<_, Full<Bytes>> =
        HyperClient::builder(TokioExecutor::new()).build(connector);
    let uri: hyper::Uri = url.parse().expect("receiver URL");
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, next, uri) = (client.clone(), next.clone(), uri.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    break;
                }
                let request = hyper::Request::post(uri.clone())
                    .header("content-type", "application/json")
                    .header("x-request-id", format!("p{i}"))
                    .body(Full::new(Bytes::from(event(&format!("p{i}"), size))))
                    .expect("request");
                if let Ok(response) = client.request(request).await {
                    let _ = response.into_body().collect().await;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    n as f64 / start.elapsed().as_secs_f64()
}
