//! The HTTP clients courier POSTs through: one per distinct connection settings (TLS, timeout,
//! proxy), shared by the destinations that have the same ones, with courier's redirect policy
//! and without the client's own retries.

use std::time::Duration;

use reqwest::Client;

use crate::config::{DestinationConfig, ProxyUrl, TlsConfig};
use crate::error_chain;

/// Could not build an HTTP client (bad TLS setup); a start-up error.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client: {0}")]
pub struct SenderError(pub(crate) String);

/// What a destination's HTTP client is built from. Destinations whose settings are equal share
/// one client, and so one connection pool; the timeout is the client's own, so a request carries
/// none of its own to allocate.
#[derive(Clone, PartialEq, Eq)]
struct ClientSettings {
    verify: bool,
    timeout: Duration,
    tls: Option<TlsConfig>,
    proxy: Option<ProxyUrl>,
}

/// The HTTP clients of a set of destinations, one per [`ClientSettings`].
#[derive(Default)]
pub struct Clients {
    built: Vec<(ClientSettings, Client)>,
}

impl Clients {
    /// The client for `dest`, built on first use; `key` (`destinations[i]`) names the
    /// destination in a TLS set-up error and in the logs of its TLS material.
    pub fn for_destination(
        &mut self,
        key: &str,
        dest: &DestinationConfig,
    ) -> Result<Client, SenderError> {
        let settings = ClientSettings {
            verify: dest.tls_verify,
            timeout: dest.timeout,
            tls: dest.tls.clone(),
            proxy: dest.proxy.clone(),
        };
        if let Some((_, client)) = self.built.iter().find(|(s, _)| *s == settings) {
            return Ok(client.clone());
        }
        let client = build_client(key, &settings)?;
        self.built.push((settings, client.clone()));
        Ok(client)
    }
}

/// Redirects are followed only when they keep the request a POST with its body (307, 308) and
/// stay on the same origin: a 301/302/303 would turn it into a body-less GET that a 2xx would
/// wrongly mark delivered, and another host must not receive the destination's API key. A redirect
/// that is not followed comes back as the 3xx answer and counts as a failed attempt.
fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let keeps_post = matches!(attempt.status().as_u16(), 307 | 308);
        let same_origin = attempt
            .previous()
            .last()
            .is_some_and(|prev| prev.origin() == attempt.url().origin());
        // `previous()` includes the original URL: this follows at most 10 redirects.
        if keeps_post && same_origin && attempt.previous().len() <= 10 {
            attempt.follow()
        } else {
            attempt.stop()
        }
    })
}

fn build_client(key: &str, settings: &ClientSettings) -> Result<Client, SenderError> {
    // The one TLS set-up of courier (`crate::tls`), shared with the brokers: CA file, client
    // certificate, `server_name`, reloading on change, and `tls_verify = false`.
    let tls = crate::tls::client_config(
        &format!("{key}.tls"),
        settings.tls.as_ref(),
        settings.verify,
        crate::tls::HTTP_ALPN,
    )
    .map_err(|e| SenderError(e.to_string()))?;
    let mut builder = Client::builder();
    // A destination with `proxy` sends every request through it; any other follows the
    // environment (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY and their lower-case forms, as
    // curl reads them), which reqwest reads when the client is built, that is at start-up.
    // docs/connecting.md#proxies says why.
    if let Some(proxy) = &settings.proxy {
        let proxy = reqwest::Proxy::all(proxy.url().as_str())
            .map_err(|e| SenderError(format!("{key}.proxy: {}", error_chain(&e))))?;
        builder = builder.proxy(proxy);
    }
    builder
        .timeout(settings.timeout)
        // courier's retry policy is the only one: a retry inside the HTTP client would be a
        // second POST that no metric, log or attempt count knows about. It also spares reqwest
        // a copy of every request kept for that retry.
        .retry(reqwest::retry::never().max_retries_per_request(0))
        .redirect(redirect_policy())
        .referer(false)
        .tls_backend_preconfigured(tls)
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("courier/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| SenderError(error_chain(&e)))
}

/// The proxy variables of the environment that the HTTP client reads, as `NAME=value` with any
/// password replaced by `***`, for the start-up log.
pub fn environment_proxies() -> Vec<String> {
    [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ]
    .iter()
    .filter_map(|name| {
        let value = std::env::var(name).ok().filter(|v| !v.is_empty())?;
        Some(format!("{name}={}", crate::config::redact_url(&value)))
    })
    .collect()
}
