//! The bare HTTP clients a delivery could be built on, against the same receiver and in
//! alternating rounds: reqwest over HTTP/1.1, reqwest over HTTP/2 with prior knowledge (h2c, one
//! connection), hyper-util's pooled client over HTTP/1.1 (a task per connection), and hyper's
//! HTTP/1.1 connection driven by the task that sends the request, with no task of its own (what
//! courier does, and the raw POST limit). A client that POSTs no faster bare cannot make courier
//! faster.

use courier_testkit::process::cpu_seconds;

use crate::bench::Bench;
use crate::raw::{pooled_post_rate, post_rate as inline_rate, post_rate_with};

/// Requests/s and the benchmark's CPU per request (client and receiver) of one round.
#[derive(Clone, Copy)]
pub struct Round {
    pub rate: f64,
    pub cpu_us: f64,
}

/// Each client's rounds.
pub struct ClientFigures {
    pub h1: Vec<Round>,
    pub h2c: Vec<Round>,
    pub hyper: Vec<Round>,
    pub inline: Vec<Round>,
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
    pooled_post_rate(&b.rx.url("/clients-warm"), warm, size, 64).await;
    inline_rate(&b.rx.url("/clients-warm"), warm, size, 64).await;
    let mut figures = ClientFigures {
        h1: Vec::new(),
        h2c: Vec::new(),
        hyper: Vec::new(),
        inline: Vec::new(),
    };
    for round in 0..3 {
        let url = |kind: &str| b.rx.url(&format!("/clients-{kind}-{round}"));
        let measured = |rate: f64, cpu_before: f64| Round {
            rate,
            cpu_us: (cpu_seconds(b.pid).unwrap_or(0.0) - cpu_before) * 1e6 / n as f64,
        };
        let cpu = cpu_seconds(b.pid).unwrap_or(0.0);
        let rate = post_rate_with(h1(), &url("h1"), n, size, 64).await;
        figures.h1.push(measured(rate, cpu));
        let cpu = cpu_seconds(b.pid).unwrap_or(0.0);
        let rate = post_rate_with(h2c(), &url("h2c"), n, size, 64).await;
        figures.h2c.push(measured(rate, cpu));
        let cpu = cpu_seconds(b.pid).unwrap_or(0.0);
        let rate = pooled_post_rate(&url("hyper"), n, size, 64).await;
        figures.hyper.push(measured(rate, cpu));
        let cpu = cpu_seconds(b.pid).unwrap_or(0.0);
        let rate = inline_rate(&url("inline"), n, size, 64).await;
        figures.inline.push(measured(rate, cpu));
    }
    let show = |v: &[Round]| {
        v.iter()
            .map(|r| format!("{:.0} ({:.1} us)", r.rate, r.cpu_us))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "bare clients, requests/s (client + receiver CPU per request) in 3 alternating rounds: reqwest HTTP/1.1 {}; reqwest h2c {}; hyper-util pooled HTTP/1.1 {}; hyper HTTP/1.1 driven in the sending task {}",
        show(&figures.h1),
        show(&figures.h2c),
        show(&figures.hyper),
        show(&figures.inline)
    );
    figures
}
