//! One partner endpoint as courier runs it: its configuration (already parsed into typed values),
//! its HTTP client, its circuit, its concurrency limit and its metrics, in one [`Destination`]
//! built once. The set of destinations and the routing table over them are swapped as one
//! ([`Destinations`]), so an event is never routed against a mix of two configurations.

use std::borrow::Borrow;
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::Semaphore;

use crate::circuit::Circuit;
use crate::config::{Config, DestinationConfig};
use crate::ratelimit::RateLimiter;
use crate::router::{Routable, Router};
use crate::sender::{Clients, SenderError};
use crate::stats::Stats;
use crate::topic::TopicPattern;

/// A destination's name: the key of its dedup records, retries and dead letters, and what an
/// envelope's `destination_id` refers to. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DestinationId(Arc<str>);

impl DestinationId {
    /// The id of the destination called `name`.
    pub fn new(name: &str) -> DestinationId {
        DestinationId(name.into())
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for DestinationId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DestinationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DestinationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// One destination's Prometheus series, created once so delivering builds no labels.
pub struct DestinationMetrics {
    pub delivered: Counter,
    pub retry_scheduled: Counter,
    pub dead_lettered: Counter,
    pub parked: Counter,
    pub duplicate: Counter,
    /// Seconds from the start of a POST to its answer or failure.
    pub latency: Histogram,
    /// Seconds attempts waited for a token of the rate limit.
    pub rate_limit_wait: Counter<f64, AtomicU64>,
    /// Events parked because their token was further away than `circuit.max_wait`.
    pub rate_limit_parked: Counter,
}

impl DestinationMetrics {
    fn new(stats: &Stats, name: &str) -> DestinationMetrics {
        DestinationMetrics {
            delivered: stats.delivery_counter(name, "delivered"),
            retry_scheduled: stats.delivery_counter(name, "retry_scheduled"),
            dead_lettered: stats.delivery_counter(name, "dead_lettered"),
            parked: stats.delivery_counter(name, "parked"),
            duplicate: stats.delivery_counter(name, "duplicate"),
            latency: stats.latency_histogram(name),
            rate_limit_wait: stats.rate_limit_wait_counter(name),
            rate_limit_parked: stats.rate_limit_parked_counter(name),
        }
    }
}

/// One partner endpoint and everything its deliveries share.
pub struct Destination {
    id: DestinationId,
    config: DestinationConfig,
    client: reqwest::Client,
    circuit: Circuit,
    limit: Semaphore,
    metrics: DestinationMetrics,
    rate_limit: Option<RateLimiter>,
}

impl Destination {
    /// Builds the destination of `config`, sending through `client`.
    pub fn new(config: DestinationConfig, client: reqwest::Client, stats: &Stats) -> Destination {
        Destination {
            id: DestinationId::new(&config.name),
            circuit: Circuit::new(&config.name, config.circuit.clone()),
            limit: Semaphore::new(config.max_concurrency),
            metrics: DestinationMetrics::new(stats, &config.name),
            rate_limit: config
                .rate_limit
                .as_ref()
                .map(|r| RateLimiter::new(r, Instant::now())),
            client,
            config,
        }
    }

    /// Its name, as an id.
    pub fn id(&self) -> &DestinationId {
        &self.id
    }

    /// Its configuration, with every value already parsed.
    pub fn config(&self) -> &DestinationConfig {
        &self.config
    }

    /// The HTTP client its POSTs go through (shared with the destinations that have the same
    /// TLS setting and timeout).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Its circuit.
    pub fn circuit(&self) -> &Circuit {
        &self.circuit
    }

    /// Its `max_concurrency` slots, shared by first attempts, retries and replays.
    pub fn limit(&self) -> &Semaphore {
        &self.limit
    }

    /// How long a first attempt or a retry waits for a slot (`circuit.max_wait`).
    pub fn max_wait(&self) -> Duration {
        self.config.circuit.max_wait
    }

    /// Its series.
    pub fn metrics(&self) -> &DestinationMetrics {
        &self.metrics
    }

    /// Its token bucket, when it has a `rate_limit`.
    pub fn rate_limit(&self) -> Option<&RateLimiter> {
        self.rate_limit.as_ref()
    }
}

impl fmt::Debug for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Destination")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Routable for Arc<Destination> {
    fn name(&self) -> &str {
        self.id.as_str()
    }
    fn tenant(&self) -> Option<&str> {
        self.config.tenant.as_deref()
    }
    fn topics(&self) -> &[TopicPattern] {
        &self.config.topics
    }
}

/// The destinations of one configuration and the routing table over them.
pub type DestinationSet = Router<Arc<Destination>>;

/// The set of destinations in force. Each event and each retry pass takes the current set once
/// and keeps it to the end, so replacing the set (a configuration reload) never changes the
/// destinations of an event already routed, and in-flight requests finish on their old settings.
pub struct Destinations {
    current: RwLock<Arc<DestinationSet>>,
}

impl Destinations {
    /// The destinations of `config`; HTTP clients are shared where the TLS setting and timeout
    /// are the same. Fails only when an HTTP client cannot be built.
    pub fn from_config(config: &Config, stats: &Stats) -> Result<Destinations, SenderError> {
        Ok(Destinations::new(build(config, stats)?))
    }

    /// Puts `set` in force.
    pub fn new(set: DestinationSet) -> Destinations {
        Destinations {
            current: RwLock::new(Arc::new(set)),
        }
    }

    /// The set in force now.
    pub fn current(&self) -> Arc<DestinationSet> {
        // A panic cannot leave an `Arc` half-written: the value behind a poisoned lock is whole.
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts `set` in force for every event routed from now on; returns the set it replaces.
    pub fn replace(&self, set: DestinationSet) -> Arc<DestinationSet> {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *current, Arc::new(set))
    }
}

/// Builds the destinations of `config`, in configuration order.
pub fn build(config: &Config, stats: &Stats) -> Result<DestinationSet, SenderError> {
    let mut clients = Clients::default();
    let mut destinations = Vec::with_capacity(config.destinations.len());
    for dest in &config.destinations {
        if !dest.tls_verify {
            tracing::warn!(
                destination = %dest.name,
                url = %dest.url,
                "TLS certificate verification is OFF for this destination (tls_verify = false): \
                 anyone on the network path can read and alter its requests"
            );
        }
        let client = clients.for_destination(dest)?;
        destinations.push(Arc::new(Destination::new(dest.clone(), client, stats)));
    }
    Ok(Router::new(destinations))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(names: &[&str]) -> Config {
        let mut text = String::from("[rabbitmq]\nurl = \"amqp://127.0.0.1\"\nqueue = \"q\"\n");
        for name in names {
            text.push_str(&format!(
                "[[destinations]]\nname = \"{name}\"\nurl = \"http://127.0.0.1/\"\n"
            ));
        }
        Config::from_toml(&text).expect("config")
    }

    #[test]
    fn a_replaced_set_routes_new_events_and_leaves_taken_ones_alone() {
        crate::install_crypto_provider();
        let stats = Stats::default();
        let destinations = Destinations::from_config(&config(&["a", "b"]), &stats).expect("a, b");
        let taken = destinations.current();
        let old = destinations.replace(build(&config(&["c"]), &stats).expect("c"));
        assert!(Arc::ptr_eq(&old, &taken));
        let names = |set: &DestinationSet| -> Vec<String> {
            set.match_topic("t")
                .iter()
                .map(|d| d.id().to_string())
                .collect()
        };
        assert_eq!(
            names(&taken),
            ["a", "b"],
            "an event routed before keeps its set"
        );
        assert_eq!(names(&destinations.current()), ["c"]);
        assert!(destinations.current().get("a").is_none());
    }

    #[test]
    fn a_set_keeps_the_configuration_order_and_finds_by_name() {
        crate::install_crypto_provider();
        let set = build(&config(&["a", "b"]), &Stats::default()).expect("set");
        let ids: Vec<&DestinationId> = set.iter().map(|d| d.id()).collect();
        assert_eq!(ids, [&DestinationId::new("a"), &DestinationId::new("b")]);
        assert_eq!(
            set.get("b").map(|d| d.max_wait()),
            Some(Duration::from_secs(1))
        );
    }
}
