//! What must survive a restart, and the only module that knows sled: the dedup tree (which event
//! went to which destination), the retry tree (what waits for another attempt, and when), and the
//! dead-letter tree (what could not be delivered, and why).
//!
//! Writes are cheap in-memory inserts; durability comes from [`Store::commit`], a group commit: one
//! fsync covers every write made before it started, so a burst of events costs one flush, not one
//! per message. The pipeline acks a message only after its commit returned.
//!
//! sled 0.34 is the last stable line and unmaintained upstream; keeping every sled call in this file
//! is what lets it be swapped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::StoreConfig;
use crate::event::{Event, SourceKind};

/// A store operation failed; the message that needed it is not acked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled reported an I/O or corruption error.
    #[error("store {path}: {source}")]
    Sled {
        path: String,
        #[source]
        source: sled::Error,
    },
    /// Another process (a running `courier run`) holds the store.
    #[error("store {path} is in use by another courier process")]
    Locked { path: String },
    /// The shared dedup in Redis failed.
    #[error("redis dedup: {0}")]
    Redis(String),
    /// A stored record could not be decoded.
    #[error("store {path}: corrupt record: {message}")]
    Corrupt { path: String, message: String },
}

/// Why a message ended in the dead-letter tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterKind {
    /// The body could not be parsed; there is no event to deliver.
    BadInput,
    /// The envelope's `destination_id` names no (acceptable) destination.
    Unroutable,
    /// The destination answered with a failure that is not worth retrying.
    Failed,
    /// Every attempt the retry policy allows failed.
    Exhausted,
}

/// An attempt still to make: kept in the retry tree, ordered by `next_at_ms`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetryRecord {
    pub destination: String,
    pub event: StoredEvent,
    /// Attempts made so far (0 for an event parked by an open circuit before any attempt).
    pub attempts: u32,
    /// When to attempt next (Unix milliseconds).
    pub next_at_ms: u64,
    #[serde(default)]
    pub last_status: Option<u16>,
    #[serde(default)]
    pub last_error: String,
}

impl RetryRecord {
    fn key(&self) -> Vec<u8> {
        let mut key = retry_prefix(&self.destination);
        key.extend_from_slice(&self.next_at_ms.to_be_bytes());
        key.extend_from_slice(self.event.id.as_bytes());
        key
    }
}

fn retry_prefix(destination: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(destination.len() + 1 + 8 + 40);
    key.extend_from_slice(destination.as_bytes());
    key.push(0);
    key
}

/// The parts of an [`Event`] needed to deliver it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredEvent {
    pub id: String,
    pub topic: String,
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub destination_id: Option<String>,
    pub eligible_for_retry: bool,
    #[serde(default)]
    pub time: Option<String>,
    #[serde(default)]
    pub metadata: std::collections::BTreeMap<String, String>,
    /// The JSON body to POST, kept as JSON rather than an escaped string.
    pub body: Box<RawValue>,
    pub received_at_ms: u64,
    pub source: SourceKind,
}

impl StoredEvent {
    /// Copies what a later delivery needs from `event`.
    pub fn from_event(event: &Event) -> StoredEvent {
        let body = std::str::from_utf8(&event.body)
            .ok()
            .and_then(|s| RawValue::from_string(s.to_string()).ok())
            .unwrap_or_else(|| {
                // Event bodies are validated JSON; this arm only guards against a programming error.
                Box::<RawValue>::default()
            });
        StoredEvent {
            id: event.id.clone(),
            topic: event.topic.clone(),
            tenant_id: event.tenant_id.clone(),
            destination_id: event.destination_id.clone(),
            eligible_for_retry: event.eligible_for_retry,
            time: event.time.clone(),
            metadata: event.metadata.clone(),
            body,
            received_at_ms: millis(event.received_at),
            source: event.source,
        }
    }

    /// The event again, as the sender needs it.
    pub fn to_event(&self) -> Event {
        Event {
            id: self.id.clone(),
            topic: self.topic.clone(),
            tenant_id: self.tenant_id.clone(),
            destination_id: self.destination_id.clone(),
            eligible_for_retry: self.eligible_for_retry,
            time: self.time.clone(),
            metadata: self.metadata.clone(),
            body: bytes::Bytes::copy_from_slice(self.body.get().as_bytes()),
            received_at: UNIX_EPOCH + Duration::from_millis(self.received_at_ms),
            source: self.source,
        }
    }
}

/// One dead letter: what failed, why, and what is needed to deliver it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Unique, time-ordered key, in hex; what `dead-letters replay --id` takes.
    #[serde(default)]
    pub key: String,
    /// When it was dead-lettered (Unix milliseconds).
    pub at_ms: u64,
    pub kind: DeadLetterKind,
    /// The reason, for people.
    pub reason: String,
    pub source: SourceKind,
    /// The destination that failed, when there was one.
    #[serde(default)]
    pub destination: Option<String>,
    #[serde(default)]
    pub event_id: Option<String>,
    /// The transport topic or the event topic.
    #[serde(default)]
    pub topic: Option<String>,
    pub attempts: u32,
    #[serde(default)]
    pub last_status: Option<u16>,
    /// The parsed event, when parsing succeeded.
    #[serde(default)]
    pub event: Option<StoredEvent>,
    /// The raw body in base64, when parsing failed.
    #[serde(default)]
    pub raw_base64: Option<String>,
}

impl DeadLetter {
    /// A message that could not be parsed: keep its bytes exactly.
    pub fn bad_input(source: SourceKind, topic: &str, body: &[u8], reason: String) -> DeadLetter {
        DeadLetter {
            key: String::new(),
            at_ms: millis(SystemTime::now()),
            kind: DeadLetterKind::BadInput,
            reason,
            source,
            destination: None,
            event_id: None,
            topic: Some(topic.to_string()),
            attempts: 0,
            last_status: None,
            event: None,
            raw_base64: Some(base64::engine::general_purpose::STANDARD.encode(body)),
        }
    }

    /// A parsed event that cannot go (further) to `destination`.
    pub fn for_event(
        event: &Event,
        kind: DeadLetterKind,
        destination: Option<&str>,
        reason: String,
        attempts: u32,
        last_status: Option<u16>,
    ) -> DeadLetter {
        DeadLetter {
            key: String::new(),
            at_ms: millis(SystemTime::now()),
            kind,
            reason,
            source: event.source,
            destination: destination.map(str::to_string),
            event_id: Some(event.id.clone()),
            topic: Some(event.topic.clone()),
            attempts,
            last_status,
            event: Some(StoredEvent::from_event(event)),
            raw_base64: None,
        }
    }

    /// The raw body of a bad-input letter.
    pub fn raw(&self) -> Option<Vec<u8>> {
        self.raw_base64
            .as_ref()
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
    }
}

/// The sled-backed store.
pub struct Store {
    db: sled::Db,
    delivered: sled::Tree,
    dead: sled::Tree,
    /// `destination ++ 0 ++ next_at (u64 BE) ++ event id` → [`RetryRecord`]: a destination's due
    /// entries are one range scan, and a destination whose circuit is open is simply not scanned.
    retries: sled::Tree,
    /// `destination ++ 0 ++ event id` → its key in `retries`: one pending retry per pair.
    retry_index: sled::Tree,
    dedup_ttl: Duration,
    path: String,
    /// Group commit: tickets handed out to writers, and the highest ticket known durable.
    requested: AtomicU64,
    flushed: AtomicU64,
    flush_lock: tokio::sync::Mutex<()>,
}

impl Store {
    /// Opens (or creates) the store. sled takes an exclusive lock: a second process on the same
    /// path gets a clear error instead of corrupting it.
    pub fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        let path = config.path.display().to_string();
        let sled_err = |source| StoreError::Sled {
            path: path.clone(),
            source,
        };
        let db = sled::Config::new()
            .path(&config.path)
            .cache_capacity(config.cache_capacity)
            .flush_every_ms(None)
            .open()
            .map_err(|e| {
                if e.to_string().contains("could not acquire lock") {
                    StoreError::Locked { path: path.clone() }
                } else {
                    sled_err(e)
                }
            })?;
        let delivered = db.open_tree("delivered").map_err(sled_err)?;
        let dead = db.open_tree("dead").map_err(sled_err)?;
        let retries = db.open_tree("retries").map_err(sled_err)?;
        let retry_index = db.open_tree("retry_index").map_err(sled_err)?;
        Ok(Store {
            db,
            delivered,
            dead,
            retries,
            retry_index,
            dedup_ttl: config.dedup_ttl,
            path,
            requested: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            flush_lock: tokio::sync::Mutex::new(()),
        })
    }

    fn err(&self, source: sled::Error) -> StoreError {
        StoreError::Sled {
            path: self.path.clone(),
            source,
        }
    }

    /// Whether `event_id` was delivered with a 2xx to `destination` within the dedup TTL.
    pub fn is_delivered(&self, destination: &str, event_id: &str) -> Result<bool, StoreError> {
        let key = dedup_key(destination, event_id);
        let Some(value) = self.delivered.get(&key).map_err(|e| self.err(e))? else {
            return Ok(false);
        };
        let at = decode_millis(&value);
        let now = millis(SystemTime::now());
        Ok(now.saturating_sub(at) < self.dedup_ttl.as_millis() as u64)
    }

    /// Remembers a 2xx delivery. Durable after the next [`Store::commit`].
    pub fn record_delivered(&self, destination: &str, event_id: &str) -> Result<(), StoreError> {
        let now = millis(SystemTime::now());
        self.delivered
            .insert(dedup_key(destination, event_id), &now.to_be_bytes())
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Adds a dead letter. Durable after the next [`Store::commit`].
    pub fn dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        let seq = self.db.generate_id().map_err(|e| self.err(e))?;
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&letter.at_ms.to_be_bytes());
        key[8..].copy_from_slice(&seq.to_be_bytes());
        let value = serde_json::to_vec(letter).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        self.dead.insert(key, value).map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Schedules (or re-schedules) the retry of one event at one destination; an earlier pending
    /// retry of the same pair is replaced. Durable after the next [`Store::commit`].
    pub fn schedule_retry(&self, record: &RetryRecord) -> Result<(), StoreError> {
        let key = record.key();
        let pair = dedup_key(&record.destination, &record.event.id);
        let value = serde_json::to_vec(record).map_err(|e| self.corrupt(e.to_string()))?;
        // Entry first, index second: a crash in between leaves an entry the index does not know,
        // which the scheduler still attempts and then removes by its own key.
        self.retries
            .insert(key.as_slice(), value)
            .map_err(|e| self.err(e))?;
        if let Some(old) = self
            .retry_index
            .insert(pair.as_slice(), key.as_slice())
            .map_err(|e| self.err(e))?
        {
            if old.as_ref() != key.as_slice() {
                self.retries.remove(old).map_err(|e| self.err(e))?;
            }
        }
        Ok(())
    }

    /// Drops the pending retry of `event_id` at `destination`, if any.
    pub fn remove_retry(&self, destination: &str, event_id: &str) -> Result<(), StoreError> {
        let pair = dedup_key(destination, event_id);
        if let Some(key) = self.retry_index.remove(pair).map_err(|e| self.err(e))? {
            self.retries.remove(key).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Drops exactly this entry (found by its own key, so also one the index lost track of) and
    /// the index entry if it points here.
    pub fn remove_retry_record(&self, record: &RetryRecord) -> Result<(), StoreError> {
        let key = record.key();
        self.retries
            .remove(key.as_slice())
            .map_err(|e| self.err(e))?;
        let pair = dedup_key(&record.destination, &record.event.id);
        let _ = self
            .retry_index
            .compare_and_swap(pair, Some(key.as_slice()), None::<&[u8]>)
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Up to `limit` retries of `destination` due at `now_ms`, earliest first, skipping the event
    /// ids `skip` says are taken.
    pub fn due_retries(
        &self,
        destination: &str,
        now_ms: u64,
        limit: usize,
        skip: impl Fn(&str) -> bool,
    ) -> Result<Vec<RetryRecord>, StoreError> {
        let start = retry_prefix(destination);
        let mut end = start.clone();
        end.extend_from_slice(&now_ms.saturating_add(1).to_be_bytes());
        let mut out = Vec::new();
        for item in self.retries.range(start..end) {
            let (_, value) = item.map_err(|e| self.err(e))?;
            let record: RetryRecord =
                serde_json::from_slice(&value).map_err(|e| self.corrupt(format!("retry: {e}")))?;
            if skip(&record.event.id) {
                continue;
            }
            out.push(record);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// When `destination`'s earliest pending retry is due (Unix milliseconds).
    pub fn next_retry_at(&self, destination: &str) -> Result<Option<u64>, StoreError> {
        let prefix = retry_prefix(destination);
        match self.retries.scan_prefix(&prefix).next() {
            Some(item) => {
                let (key, _) = item.map_err(|e| self.err(e))?;
                Ok(key.get(prefix.len()..prefix.len() + 8).map(decode_millis))
            }
            None => Ok(None),
        }
    }

    /// Destinations that have pending retries (one pass over the index).
    pub fn retry_destinations(&self) -> Result<Vec<String>, StoreError> {
        let mut out: Vec<String> = Vec::new();
        for item in self.retry_index.iter() {
            let (pair, _) = item.map_err(|e| self.err(e))?;
            let name = pair.split(|b| *b == 0).next().unwrap_or(&[]);
            let name = String::from_utf8_lossy(name).into_owned();
            if out.last() != Some(&name) {
                out.push(name);
            }
        }
        out.dedup();
        Ok(out)
    }

    /// Dead letters kept.
    pub fn dead_letter_count(&self) -> usize {
        self.dead.len()
    }

    /// Pending retries.
    pub fn pending_retries(&self) -> usize {
        self.retry_index.len()
    }

    /// Every pending retry, by destination and then time.
    pub fn retries(&self) -> Result<Vec<RetryRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.retries.iter() {
            let (_, value) = item.map_err(|e| self.err(e))?;
            out.push(
                serde_json::from_slice(&value).map_err(|e| self.corrupt(format!("retry: {e}")))?,
            );
        }
        Ok(out)
    }

    /// Replaces the dead letter stored under `key` (its hex form, as listed).
    pub fn update_dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        let key = unhex(&letter.key)
            .ok_or_else(|| self.corrupt(format!("bad dead-letter key {:?}", letter.key)))?;
        let value = serde_json::to_vec(letter).map_err(|e| self.corrupt(e.to_string()))?;
        self.dead.insert(key, value).map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Removes the dead letter stored under `key` (its hex form, as listed).
    pub fn remove_dead_letter(&self, key: &str) -> Result<bool, StoreError> {
        let raw = unhex(key).ok_or_else(|| self.corrupt(format!("bad dead-letter key {key:?}")))?;
        Ok(self.dead.remove(raw).map_err(|e| self.err(e))?.is_some())
    }

    fn corrupt(&self, message: String) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            message,
        }
    }

    /// Every dead letter, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let mut out = Vec::new();
        for item in self.dead.iter() {
            let (key, value) = item.map_err(|e| self.err(e))?;
            let mut letter: DeadLetter =
                serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt {
                    path: self.path.clone(),
                    message: format!("dead letter {}: {e}", hex(&key)),
                })?;
            letter.key = hex(&key);
            out.push(letter);
        }
        Ok(out)
    }

    /// Makes every write made before this call durable. Concurrent callers share one flush: a
    /// caller whose writes were covered by a flush that started after them returns without its own.
    pub async fn commit(&self) -> Result<(), StoreError> {
        let ticket = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let _guard = self.flush_lock.lock().await;
        if self.flushed.load(Ordering::SeqCst) >= ticket {
            return Ok(());
        }
        // Every ticket up to here belongs to a write that happened before this flush starts.
        let covered = self.requested.load(Ordering::SeqCst);
        self.db.flush_async().await.map_err(|e| self.err(e))?;
        self.flushed.store(covered, Ordering::SeqCst);
        Ok(())
    }

    /// Drops dedup entries older than the TTL; returns how many. Runs in the background.
    pub fn sweep_expired(&self) -> Result<usize, StoreError> {
        let now = millis(SystemTime::now());
        let ttl = self.dedup_ttl.as_millis() as u64;
        let mut removed = 0;
        for item in self.delivered.iter() {
            let (key, value) = item.map_err(|e| self.err(e))?;
            if now.saturating_sub(decode_millis(&value)) >= ttl {
                self.delivered.remove(key).map_err(|e| self.err(e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Number of remembered deliveries (for logs and tests).
    pub fn delivered_count(&self) -> usize {
        self.delivered.len()
    }

    /// Flushes everything; called at shutdown.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await.map_err(|e| self.err(e))?;
        Ok(())
    }
}

fn dedup_key(destination: &str, event_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(destination.len() + 1 + event_id.len());
    key.extend_from_slice(destination.as_bytes());
    key.push(0);
    key.extend_from_slice(event_id.as_bytes());
    key
}

fn decode_millis(value: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    if value.len() == 8 {
        buf.copy_from_slice(value);
    }
    u64::from_be_bytes(buf)
}

/// Unix milliseconds.
pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path, ttl: Duration) -> StoreConfig {
        StoreConfig {
            path: dir.to_path_buf(),
            dedup_ttl: ttl,
            cache_capacity: 1 << 20,
            ..StoreConfig::default()
        }
    }

    #[tokio::test]
    async fn dedup_survives_reopen_and_expires() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(&config(dir.path(), Duration::from_secs(3600))).expect("open");
            assert!(!store.is_delivered("d", "e1").unwrap());
            store.record_delivered("d", "e1").unwrap();
            store.commit().await.unwrap();
            assert!(store.is_delivered("d", "e1").unwrap());
            assert!(!store.is_delivered("other", "e1").unwrap());
        }
        let store = Store::open(&config(dir.path(), Duration::from_secs(3600))).expect("reopen");
        assert!(store.is_delivered("d", "e1").unwrap());
        drop(store);
        let store = Store::open(&config(dir.path(), Duration::from_millis(1))).expect("reopen");
        std::thread::sleep(Duration::from_millis(5));
        assert!(!store.is_delivered("d", "e1").unwrap(), "expired");
        assert_eq!(store.sweep_expired().unwrap(), 1);
        assert_eq!(store.delivered_count(), 0);
    }

    #[tokio::test]
    async fn concurrent_commits_share_flushes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = std::sync::Arc::new(
            Store::open(&config(dir.path(), Duration::from_secs(60))).expect("open"),
        );
        let mut tasks = Vec::new();
        for i in 0..64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store.record_delivered("d", &format!("e{i}")).unwrap();
                store.commit().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(store.delivered_count(), 64);
    }

    fn stored(id: &str) -> StoredEvent {
        StoredEvent {
            id: id.into(),
            topic: "t".into(),
            tenant_id: None,
            destination_id: None,
            eligible_for_retry: true,
            time: None,
            metadata: Default::default(),
            body: RawValue::from_string("{}".into()).unwrap(),
            received_at_ms: 0,
            source: SourceKind::Rabbitmq,
        }
    }

    #[tokio::test]
    async fn retries_are_ordered_unique_per_pair_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(&config(dir.path(), Duration::from_secs(60))).expect("open");
            let rec = |id: &str, at: u64, attempts: u32| RetryRecord {
                destination: "d".into(),
                event: stored(id),
                attempts,
                next_at_ms: at,
                last_status: Some(503),
                last_error: "HTTP 503".into(),
            };
            store.schedule_retry(&rec("b", 200, 1)).unwrap();
            store.schedule_retry(&rec("a", 100, 1)).unwrap();
            store.schedule_retry(&rec("c", 300, 1)).unwrap();
            // Rescheduling a pair replaces its earlier entry.
            store.schedule_retry(&rec("a", 250, 2)).unwrap();
            let mut other = rec("z", 50, 1);
            other.destination = "e".into();
            store.schedule_retry(&other).unwrap();
            assert_eq!(store.pending_retries(), 4);
            assert_eq!(store.next_retry_at("d").unwrap(), Some(200));
            assert_eq!(store.next_retry_at("e").unwrap(), Some(50));
            assert_eq!(store.next_retry_at("none").unwrap(), None);
            assert_eq!(store.retry_destinations().unwrap(), vec!["d", "e"]);
            let due = store.due_retries("d", 260, 10, |_| false).unwrap();
            let ids: Vec<_> = due
                .iter()
                .map(|r| (r.event.id.as_str(), r.attempts))
                .collect();
            assert_eq!(ids, vec![("b", 1), ("a", 2)]);
            let due = store.due_retries("d", 260, 10, |id| id == "b").unwrap();
            assert_eq!(due.len(), 1);
            store.remove_retry("e", "z").unwrap();
            store.remove_retry("d", "b").unwrap();
            store.commit().await.unwrap();
        }
        let store = Store::open(&config(dir.path(), Duration::from_secs(60))).expect("reopen");
        let all: Vec<_> = store
            .retries()
            .unwrap()
            .into_iter()
            .map(|r| r.event.id)
            .collect();
        assert_eq!(all, vec!["a", "c"]);
    }

    #[tokio::test]
    async fn dead_letters_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&config(dir.path(), Duration::from_secs(60))).expect("open");
        let letter = DeadLetter::bad_input(SourceKind::Rabbitmq, "t", b"\xff", "not UTF-8".into());
        store.dead_letter(&letter).unwrap();
        store.commit().await.unwrap();
        let all = store.dead_letters().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].raw().unwrap(), b"\xff");
        assert_eq!(all[0].key.len(), 32);
        let mut changed = all[0].clone();
        changed.attempts = 3;
        store.update_dead_letter(&changed).unwrap();
        assert_eq!(store.dead_letters().unwrap()[0].attempts, 3);
        assert!(store.remove_dead_letter(&changed.key).unwrap());
        assert!(store.dead_letters().unwrap().is_empty());
    }
}
