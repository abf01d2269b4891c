//! How many dead letters and pending retries the store holds, kept as the trees are written.
//! sled counts a tree only by walking it, and `/metrics` asks at every scrape: the millions of
//! entries a long outage leaves would cost each scrape a walk of each tree, on a runtime
//! thread. The trees are walked once, when the store opens.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// The counts of one open store.
#[derive(Debug, Default)]
pub(super) struct Counts {
    dead: AtomicUsize,
    /// Pending retries by destination; a destination with none is absent.
    retries: Mutex<BTreeMap<String, usize>>,
}

impl Counts {
    /// Counts the trees as they are on disk.
    pub(super) fn read(dead: &sled::Tree, retry_index: &sled::Tree) -> sled::Result<Counts> {
        let mut retries: BTreeMap<String, usize> = BTreeMap::new();
        for item in retry_index.iter() {
            let (pair, _) = item?;
            *retries.entry(destination_of(&pair)).or_default() += 1;
        }
        Ok(Counts {
            dead: AtomicUsize::new(dead.len()),
            retries: Mutex::new(retries),
        })
    }

    pub(super) fn dead_added(&self) {
        self.dead.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn dead_removed(&self) {
        // Never below zero, whatever the order of concurrent updates.
        let _ = self
            .dead
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    pub(super) fn dead(&self) -> usize {
        self.dead.load(Ordering::Relaxed)
    }

    pub(super) fn retry_added(&self, destination: &str) {
        *self.lock().entry(destination.to_string()).or_default() += 1;
    }

    pub(super) fn retry_removed(&self, destination: &str) {
        let mut retries = self.lock();
        if let Some(n) = retries.get_mut(destination) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                retries.remove(destination);
            }
        }
    }

    /// Pending retries by destination, by name.
    pub(super) fn retries(&self) -> Vec<(String, usize)> {
        self.lock().iter().map(|(d, n)| (d.clone(), *n)).collect()
    }

    pub(super) fn retries_total(&self) -> usize {
        self.lock().values().sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, usize>> {
        self.retries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The destination of a retry index key (`destination ++ 0 ++ event id`).
fn destination_of(pair: &[u8]) -> String {
    let name = pair.split(|b| *b == 0).next().unwrap_or(&[]);
    String::from_utf8_lossy(name).into_owned()
}
