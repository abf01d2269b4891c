//! The bare HTTP clients a delivery could be built on, against the same receiver and in
//! alternating rounds: reqwest over HTTP/1.1, reqwest over HTTP/2 with prior knowledge (h2c, one
//! connection), and hyper-util's pooled client over HTTP/1.1 (what courier uses). A client that
//! POSTs no faster bare cannot make courier faster.

use crate::bench::Bench;
use crate::raw::{post_rate as hyper_rate, post_rate_with};

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
