//! Running totals, shared by the pipeline, the retry scheduler and whoever reports them (the log
//! line at shutdown, tests, the admin port).

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters since start.
#[derive(Debug, Default)]
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
    /// Events written to the retry store without an attempt because the circuit was open.
    pub parked: AtomicU64,
    /// Messages acked.
    pub acked: AtomicU64,
    /// Acks the broker did not take (the message will be redelivered).
    pub ack_failures: AtomicU64,
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
}
