//! Running totals and health, shared by the pipeline, the sources, the retry scheduler and whoever
//! reports them: the log line at shutdown, tests, and the admin port's `/metrics` and `/readyz`.
//!
//! The plain atomics are the cheap totals tests read; the labelled families are the Prometheus
//! series (prometheus-client), registered by [`Stats::registry`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// `source="rabbitmq"|"mqtt"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

/// `result="..."`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// `action="dead_lettered"|"delivered"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    pub action: String,
}

/// `destination="..."`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabel {
    pub destination: String,
}

/// `destination="...", outcome="delivered"|"retry_scheduled"|"dead_lettered"|"parked"|"duplicate"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub destination: String,
    pub outcome: String,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s: a fast local receiver up to the 60 s default timeout.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Counters since start, and the health `/readyz` reports.
#[derive(Debug)]
pub struct Stats {
    /// Messages taken from a source.
    pub received: AtomicU64,
    /// POSTs answered with 2xx.
    pub delivered: AtomicU64,
    /// POSTs that failed (non-2xx or no answer).
    pub failed: AtomicU64,
    /// POSTs skipped because the store says that event already reached that destination.
    pub duplicates: AtomicU64,
    /// Events that matched no destination (acked, not stored).
    pub unrouted: AtomicU64,
    /// Dead letters written (bad input, unroutable, failed, exhausted).
    pub dead_lettered: AtomicU64,
    /// Failed attempts written to the retry store for another attempt.
    pub retries_scheduled: AtomicU64,
    /// Attempts made by the retry scheduler.
    pub retried: AtomicU64,
    /// Events written to the retry store without an attempt: the circuit was open, or a token
    /// of the rate limit was further away than `circuit.max_wait`.
    pub parked: AtomicU64,
    /// Of `parked`, those parked for the rate limit.
    pub parked_for_rate: AtomicU64,
    /// Messages acked.
    pub acked: AtomicU64,
    /// Acks the broker did not take (the message will be redelivered).
    pub ack_failures: AtomicU64,
    /// `basic.ack` frames sent to RabbitMQ: one per message, or one per run of messages acked
    /// together with `multiple`.
    pub amqp_ack_frames: AtomicU64,
    /// MQTT 5 messages whose `message-expiry-interval` passed before their POST.
    pub expired: AtomicU64,

    /// Per source: messages received.
    pub received_by_source: Family<SourceLabel, Counter>,
    /// Per source: reconnect attempts after a failed or lost connection.
    pub reconnects: Family<SourceLabel, Counter>,
    /// Per destination and outcome.
    pub deliveries: Family<DeliveryLabels, Counter>,
    /// Per destination: seconds from the start of a POST to its answer (or failure).
    pub latency: Family<DestinationLabel, Histogram, fn() -> Histogram>,
    /// Events being worked on (taken from a source, not yet acked).
    pub in_flight: Gauge,
    /// Configuration reloads by result (`applied`, `invalid`, `refused`, `failed`).
    pub config_reloads: Family<ResultLabel, Counter>,
    /// Per destination: seconds attempts waited for a token of the rate limit.
    pub rate_limit_wait: Family<DestinationLabel, Counter<f64, AtomicU64>>,
    /// Per destination: events parked because their token was too far away.
    pub rate_limit_parked: Family<DestinationLabel, Counter>,
    /// Expired MQTT 5 messages by what became of them (`mqtt.expired`).
    pub expired_by_action: Family<ActionLabel, Counter>,

    sources: Mutex<BTreeMap<String, SourceHealth>>,
}

/// A source's connection as `/readyz` reports it.
#[derive(Debug, Default)]
struct SourceHealth {
    connected: bool,
    /// Why the last connection failed or was lost, until the next connect.
    last_error: Option<String>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            received: AtomicU64::default(),
            delivered: AtomicU64::default(),
            failed: AtomicU64::default(),
            duplicates: AtomicU64::default(),
            unrouted: AtomicU64::default(),
            dead_lettered: AtomicU64::default(),
            retries_scheduled: AtomicU64::default(),
            retried: AtomicU64::default(),
            parked: AtomicU64::default(),
            parked_for_rate: AtomicU64::default(),
            acked: AtomicU64::default(),
            ack_failures: AtomicU64::default(),
            amqp_ack_frames: AtomicU64::default(),
            expired: AtomicU64::default(),
            received_by_source: Family::default(),
            reconnects: Family::default(),
            deliveries: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            in_flight: Gauge::default(),
            config_reloads: Family::default(),
            rate_limit_wait: Family::default(),
            rate_limit_parked: Family::default(),
            expired_by_action: Family::default(),
            sources: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Stats {
    /// Adds one to `counter`.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The current value of `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// The series counting `outcome` at `destination`. Callers keep the handle, so the hot path
    /// increments it without building labels.
    pub fn delivery_counter(&self, destination: &str, outcome: &str) -> Counter {
        self.deliveries
            .get_or_create(&DeliveryLabels {
                destination: destination.to_string(),
                outcome: outcome.to_string(),
            })
            .clone()
    }

    /// The POST duration histogram of `destination` (a handle, as for counters).
    pub fn latency_histogram(&self, destination: &str) -> Histogram {
        self.latency
            .get_or_create(&DestinationLabel {
                destination: destination.to_string(),
            })
            .clone()
    }

    /// The seconds `destination` waited for tokens (a handle, as for counters).
    pub fn rate_limit_wait_counter(&self, destination: &str) -> Counter<f64, AtomicU64> {
        self.rate_limit_wait
            .get_or_create(&DestinationLabel {
                destination: destination.to_string(),
            })
            .clone()
    }

    /// The events of `destination` parked for the rate limit (a handle, as for counters).
    pub fn rate_limit_parked_counter(&self, destination: &str) -> Counter {
        self.rate_limit_parked
            .get_or_create(&DestinationLabel {
                destination: destination.to_string(),
            })
            .clone()
    }

    /// The series counting messages from `source` (a handle, as for counters).
    pub fn received_counter(&self, source: &str) -> Counter {
        self.received_by_source
            .get_or_create(&SourceLabel {
                source: source.to_string(),
            })
            .clone()
    }

    /// Counts a reconnect attempt of `source`, marks it disconnected and keeps `error` (why the
    /// connection failed or was lost) for `/readyz`.
    pub fn reconnecting(&self, source: &str, error: &str) {
        self.reconnects
            .get_or_create(&SourceLabel {
                source: source.to_string(),
            })
            .inc();
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let health = sources.entry(source.to_string()).or_default();
        health.connected = false;
        health.last_error = Some(error.to_string());
    }

    /// Counts an MQTT 5 message that expired before its POST and was then `action`
    /// (`dead_lettered` or `delivered`).
    pub fn expired(&self, action: &str) {
        Stats::inc(&self.expired);
        self.expired_by_action
            .get_or_create(&ActionLabel {
                action: action.to_string(),
            })
            .inc();
    }

    /// Counts a configuration reload that ended with `result`.
    pub fn reloaded(&self, result: &str) {
        self.config_reloads
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    /// Forgets a source that a configuration reload removed, so readiness no longer waits for it.
    pub fn forget_source(&self, source: &str) {
        self.sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(source);
    }

    /// Registers a configured source (not connected yet) or reports its connection state; a
    /// connect forgets the last error.
    pub fn set_connected(&self, source: &str, up: bool) {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let health = sources.entry(source.to_string()).or_default();
        health.connected = up;
        if up {
            health.last_error = None;
        }
    }

    /// Why courier is not ready as far as the sources go (empty when they are): a source not
    /// connected, with the reason of its last failed connection when there was one. The store
    /// gives its own reasons.
    pub fn not_ready_reasons(&self) -> Vec<String> {
        self.sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, health)| !health.connected)
            .map(|(name, health)| match &health.last_error {
                Some(error) => format!("{name}: not connected: {error}"),
                None => format!("{name}: not connected"),
            })
            .collect()
    }

    /// A Prometheus registry over these series; the admin port adds the gauges it reads at
    /// scrape time.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("courier");
        r.register(
            "events_received",
            "Messages taken from a source",
            self.received_by_source.clone(),
        );
        r.register(
            "config_reload",
            "Configuration reloads by result: applied, invalid (the file did not load), refused (a change that needs a restart), failed (could not be put in force)",
            self.config_reloads.clone(),
        );
        r.register(
            "source_reconnects",
            "Reconnect attempts after a failed or lost broker connection",
            self.reconnects.clone(),
        );
        r.register(
            "deliveries",
            "Delivery outcomes by destination (delivered, retry_scheduled, dead_lettered, parked, duplicate)",
            self.deliveries.clone(),
        );
        r.register(
            "delivery_duration_seconds",
            "Time from the start of a POST to its answer or failure",
            self.latency.clone(),
        );
        r.register(
            "rate_limit_wait_seconds",
            "Seconds attempts waited for a token of their destination's rate limit",
            self.rate_limit_wait.clone(),
        );
        r.register(
            "rate_limit_parked",
            "Events parked in the retry store because their destination's rate limit had no token within circuit.max_wait",
            self.rate_limit_parked.clone(),
        );
        r.register(
            "mqtt_expired",
            "MQTT 5 messages whose message-expiry-interval passed before their POST, by action (dead_lettered, delivered; mqtt.expired)",
            self.expired_by_action.clone(),
        );
        r.register(
            "in_flight",
            "Events taken from a source and not yet acked",
            self.in_flight.clone(),
        );
        let ack_frames: Counter = Counter::default();
        ack_frames.inc_by(Stats::get(&self.amqp_ack_frames));
        r.register(
            "amqp_ack_frames",
            "basic.ack frames sent to RabbitMQ (one covers a run of messages when they are acked together)",
            ack_frames,
        );
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_the_last_connection_error_until_the_next_connect() {
        let stats = Stats::default();
        stats.set_connected("mqtt", false);
        assert_eq!(stats.not_ready_reasons(), ["mqtt: not connected"]);
        stats.reconnecting("mqtt", "received fatal alert: UnknownCA");
        assert_eq!(
            stats.not_ready_reasons(),
            ["mqtt: not connected: received fatal alert: UnknownCA"]
        );
        stats.set_connected("mqtt", true);
        assert!(stats.not_ready_reasons().is_empty());
        stats.set_connected("mqtt", false);
        assert_eq!(stats.not_ready_reasons(), ["mqtt: not connected"]);
    }
}
