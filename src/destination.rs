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
use crate::config::{Config, DestinationConfig, OrganizationConfig};
use crate::http_client::{Clients, HttpClient, SenderError};
use crate::oauth2::TokenSource;
use crate::ratelimit::RateLimiter;
use crate::router::{Routable, Router};
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
    /// Who is sending, for the `Metadata` block.
    organization: Arc<OrganizationConfig>,
    client: HttpClient,
    circuit: Circuit,
    limit: Semaphore,
    metrics: DestinationMetrics,
    /// The OAuth2 token, for `auth.type = "oauth2"`.
    token: Option<TokenSource>,
    rate_limit: Option<RateLimiter>,
}

impl Destination {
    /// Builds the destination of `config`, sending through `client` on behalf of `organization`;
    /// an OAuth2 destination asks its token endpoint through `token_client`.
    pub fn new(
        config: DestinationConfig,
        organization: Arc<OrganizationConfig>,
        client: HttpClient,
        token_client: Option<reqwest::Client>,
        stats: &Stats,
    ) -> Destination {
        Destination {
            organization,
            id: DestinationId::new(&config.name),
            circuit: Circuit::new(&config.name, config.circuit.clone()),
            limit: Semaphore::new(config.max_concurrency),
            metrics: DestinationMetrics::new(stats, &config.name),
            // The token client has the destination's timeout, TLS settings and proxy.
            token: config
                .auth
                .as_ref()
                .and_then(|auth| auth.oauth2())
                .zip(token_client)
                .map(|(request, client)| TokenSource::new(&config.name, request.clone(), client)),
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

    /// Who is sending, for the `Metadata` block.
    pub fn organization(&self) -> &OrganizationConfig {
        &self.organization
    }

    /// Its configuration, with every value already parsed.
    pub fn config(&self) -> &DestinationConfig {
        &self.config
    }

    /// The HTTP client its POSTs go through (shared with the destinations that have the same
    /// TLS setting and timeout).
    pub fn client(&self) -> &HttpClient {
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

    /// Its OAuth2 token, for `auth.type = "oauth2"`.
    pub fn token(&self) -> Option<&TokenSource> {
        self.token.as_ref()
    }

    /// Why the destination cannot take events until something outside courier changes, for
    /// `/readyz`: its OAuth2 token endpoint refuses the client.
    pub fn not_ready_reason(&self) -> Option<String> {
        let refused = self.token.as_ref()?.refused()?;
        Some(format!("destination {:?}: {refused}", self.id.as_str()))
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
    rebuild(None, config, stats).map(|(set, _)| set)
}

/// What a new configuration changed in the set of destinations, by name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

/// The destinations of `config`. A destination of `current` whose configuration (and the
/// organization) did not change is kept as it is, with its circuit, its slots, its connections
/// and its OAuth2 token; a new or changed one is built afresh. Also says what changed.
pub fn rebuild(
    current: Option<&DestinationSet>,
    config: &Config,
    stats: &Stats,
) -> Result<(DestinationSet, Changes), SenderError> {
    let mut clients = Clients::default();
    let mut changes = Changes::default();
    let organization = Arc::new(config.organization.clone());
    let mut destinations = Vec::with_capacity(config.destinations.len());
    let fresh: Vec<&DestinationConfig> = config
        .destinations
        .iter()
        .filter(|d| {
            !current
                .and_then(|set| set.get(&d.name))
                .is_some_and(|old| old.config == **d && old.organization == organization)
        })
        .collect();
    if fresh.iter().any(|d| d.proxy.is_none()) {
        let from_env = crate::http_client::environment_proxies();
        if !from_env.is_empty() {
            tracing::info!(
                variables = %from_env.join(" "),
                "destinations without a proxy of their own follow the proxy environment variables"
            );
        }
    }
    for (i, dest) in config.destinations.iter().enumerate() {
        let old = current.and_then(|set| set.get(&dest.name));
        if let Some(old) = old.filter(|_| !fresh.iter().any(|f| std::ptr::eq(*f, dest))) {
            destinations.push(Arc::clone(old));
            continue;
        }
        match old {
            Some(_) => changes.changed.push(dest.name.clone()),
            None if current.is_some() => changes.added.push(dest.name.clone()),
            None => {}
        }
        if let Some(proxy) = &dest.proxy {
            tracing::info!(destination = %dest.name, %proxy, "destination goes through its proxy");
        }
        if !dest.tls_verify {
            tracing::warn!(
                destination = %dest.name,
                url = %dest.url,
                "TLS certificate verification is OFF for this destination (tls_verify = false): \
                 anyone on the network path can read and alter its requests"
            );
        }
        let key = format!("destinations[{i}]");
        let client = clients.for_destination(&key, dest)?;
        let token_client = match dest.auth.as_ref().and_then(|auth| auth.oauth2()) {
            Some(_) => Some(clients.token_client(&key, dest)?),
            None => None,
        };
        destinations.push(Arc::new(Destination::new(
            dest.clone(),
            Arc::clone(&organization),
            client,
            token_client,
            stats,
        )));
    }
    if let Some(set) = current {
        changes.removed = set
            .iter()
            .filter(|old| {
                !config
                    .destinations
                    .iter()
                    .any(|d| d.name == old.id().as_str())
            })
            .map(|old| old.id().to_string())
            .collect();
    }
    Ok((Router::new(destinations), changes))
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

    #[test]
    fn a_rebuild_keeps_unchanged_destinations_and_says_what_changed() {
        crate::install_crypto_provider();
        let stats = Stats::default();
        let text = |extra: &str| {
            format!(
                "[rabbitmq]\nurl = \"amqp://127.0.0.1\"\nqueue = \"q\"\n{extra}\
                 [[destinations]]\nname = \"kept\"\nurl = \"http://127.0.0.1/k\"\n\
                 [[destinations]]\nname = \"moved\"\nurl = \"http://127.0.0.1/m\"\n"
            )
        };
        let first = Config::from_toml(&text("")).expect("first");
        let (old, changes) = rebuild(None, &first, &stats).expect("built");
        assert_eq!(
            changes,
            Changes::default(),
            "a first build reports no changes"
        );

        let mut second = Config::from_toml(&text("")).expect("second");
        second.destinations[1].url = crate::config::HttpUrl::parse("http://127.0.0.1/m2").unwrap();
        second.destinations.push(second.destinations[0].clone());
        second.destinations[2].name = "new".into();
        second.destinations.remove(0);
        let (set, changes) = rebuild(Some(&old), &second, &stats).expect("rebuilt");
        assert_eq!(
            changes,
            Changes {
                added: vec!["new".into()],
                changed: vec!["moved".into()],
                removed: vec!["kept".into()],
            }
        );
        assert!(!Arc::ptr_eq(
            set.get("moved").expect("moved"),
            old.get("moved").expect("moved")
        ));

        let same = rebuild(Some(&old), &first, &stats).expect("same").0;
        assert!(Arc::ptr_eq(
            same.get("kept").unwrap(),
            old.get("kept").unwrap()
        ));
        assert!(Arc::ptr_eq(
            same.get("moved").unwrap(),
            old.get("moved").unwrap()
        ));

        let renamed_org = Config::from_toml(&text("[organization]\nname = \"Other\"\n")).unwrap();
        let (all_new, changes) = rebuild(Some(&old), &renamed_org, &stats).expect("org");
        assert!(!Arc::ptr_eq(
            all_new.get("kept").unwrap(),
            old.get("kept").unwrap()
        ));
        assert_eq!(
            changes.changed,
            ["kept", "moved"],
            "the organization is in every Metadata block"
        );
    }
}
