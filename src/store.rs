//! What must survive a restart, and the only module that knows sled: the dedup tree (which event
//! went to which destination), the retry tree (what waits for another attempt, and when), and the
//! dead-letter tree (what could not be delivered, and why).
//!
//! Writes are cheap in-memory inserts; durability comes from [`Store::commit`], a group commit: one
//! sled flush plus one `fdatasync` of its log covers every write made before it started, so a
//! burst of events costs one flush, not one per message. The pipeline acks a message whose event
//! the store now owns (a retry, a parked event, a dead letter) only after its commit returned.
//!
//! sled 0.34 is the last stable line and unmaintained upstream; keeping every sled call in this file
//! is what lets it be swapped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
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
    /// The store is closed after a disk failure, waiting to be reopened.
    #[error("store {path} is closed until it can be reopened: {reason}")]
    Closed { path: String, reason: String },
    /// A stored record could not be decoded.
    #[error("store {path}: corrupt record: {message}")]
    Corrupt { path: String, message: String },
}

impl StoreError {
    /// Whether closing and reopening the store can make the operation work again: true for disk
    /// errors (sled refuses everything after one), a closed store, and a lock still held by a
    /// stopping predecessor; false for a corrupt record and for Redis.
    pub fn cured_by_reopen(&self) -> bool {
        matches!(
            self,
            StoreError::Sled { .. } | StoreError::Closed { .. } | StoreError::Locked { .. }
        )
    }
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
    /// Whether `raw_base64` holds only the first `service.max_payload_bytes` of a larger body.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub raw_truncated: bool,
}

impl DeadLetter {
    /// A message that could not be parsed: keep its bytes exactly, or their first `keep` bytes
    /// (`service.max_payload_bytes`: a 100 MB message must not become a 133 MB record; it cannot
    /// be replayed either way).
    pub fn bad_input(
        source: SourceKind,
        topic: &str,
        body: &[u8],
        reason: String,
        keep: usize,
    ) -> DeadLetter {
        let kept = &body[..body.len().min(keep)];
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
            raw_base64: Some(base64::engine::general_purpose::STANDARD.encode(kept)),
            raw_truncated: kept.len() < body.len(),
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
            raw_truncated: false,
        }
    }

    /// The raw body of a bad-input letter.
    pub fn raw(&self) -> Option<Vec<u8>> {
        self.raw_base64
            .as_ref()
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
    }
}

/// The open sled database and its trees. Replaced as a whole when the store is reopened.
struct Handles {
    db: sled::Db,
    /// sled's log file (`<path>/db`), opened a second time for `fdatasync`: sled's flush waits
    /// with `sync_file_range`, which on Linux writes neither the file's metadata (its growing
    /// length) nor the disk's write cache, so a power loss could drop writes it reported
    /// flushed. Syncing the same file through another descriptor covers both.
    log: Arc<std::fs::File>,
    /// `destination ++ 0 ++ event id` → delivery time (Unix milliseconds, u64 BE).
    delivered: sled::Tree,
    /// Time-ordered key → [`DeadLetter`].
    dead: sled::Tree,
    /// `destination ++ 0 ++ next_at (u64 BE) ++ event id` → [`RetryRecord`]: a destination's due
    /// entries are one range scan, and a destination whose circuit is open is simply not scanned.
    retries: sled::Tree,
    /// `destination ++ 0 ++ event id` → its key in `retries`: one pending retry per pair.
    retry_index: sled::Tree,
}

/// The sled-backed store.
///
/// sled stops serving every operation after one failed disk write (a full or read-only disk), and
/// only a fresh open clears that. So the open database sits behind a slot that
/// [`Store::recover`] empties and refills; each reopen bumps [`Store::generation`], which tells a
/// caller that writes it made before may not have reached the disk and must be made again.
pub struct Store {
    handles: std::sync::RwLock<Option<Arc<Handles>>>,
    config: StoreConfig,
    dedup_ttl: Duration,
    path: String,
    generation: AtomicU64,
    /// Why the store is closed, while it is (for errors and readiness).
    closed_because: std::sync::Mutex<Option<String>>,
    reopen_lock: tokio::sync::Mutex<()>,
    /// Group commit: writes counted so far (each counted after it is in sled's memory), and how
    /// many of them the last finished flush covers.
    written: AtomicU64,
    flushed: AtomicU64,
    flush_lock: tokio::sync::Mutex<()>,
    /// Deferred commits: wakes [`Store::flush_deferred`], whether it runs, and whether its last
    /// flush failed (then deferred commits flush themselves, so the failure reaches a caller
    /// that recovers the store).
    deferred: tokio::sync::Notify,
    flusher_running: AtomicBool,
    deferred_flush_failed: AtomicBool,
}

/// Writes a deferred commit may leave to the background flush. Past this many, a deferred
/// commit waits for a flush like [`Store::commit`] does: a disk that stalls then slows the
/// pipeline down instead of letting unflushed records pile up.
const MAX_DEFERRED: u64 = 4096;

/// Deletes `snap.*.generating` files: snapshots whose writing failed (a full disk) before sled
/// could rename them into place. sled 0.34 counts them as snapshots, picks the newest, finds it
/// truncated and refuses to open the store ("Read corrupted data") for good. An unfinished
/// snapshot holds nothing the log and the previous snapshot do not.
fn remove_unfinished_snapshots(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::warn!(file = %entry.path().display(), "removed an unfinished sled snapshot left by a failed write")
                }
                Err(error) => {
                    tracing::warn!(file = %entry.path().display(), %error, "cannot remove an unfinished sled snapshot")
                }
            }
        }
    }
}

fn open_handles(config: &StoreConfig, path: &str) -> Result<Handles, StoreError> {
    let sled_err = |source| StoreError::Sled {
        path: path.to_string(),
        source,
    };
    remove_unfinished_snapshots(&config.path);
    let db = sled::Config::new()
        .path(&config.path)
        .cache_capacity(config.cache_capacity)
        .flush_every_ms(None)
        .open()
        .map_err(|e| {
            if e.to_string().contains("could not acquire lock") {
                StoreError::Locked {
                    path: path.to_string(),
                }
            } else {
                sled_err(e)
            }
        })?;
    // Prove the disk takes a write before calling the store open. Otherwise a store reopened on
    // a disk that still refuses writes would pass its first commit when that commit has nothing
    // new to flush; the caller would take that for a recovery, handle its message again and POST
    // it again, every few seconds for as long as the disk refuses writes. (On the tmpfs of the
    // fault suite sled's open already fails on a full disk; other failures need not.)
    db.insert(
        "courier:write-probe",
        &millis(SystemTime::now()).to_be_bytes(),
    )
    .map_err(sled_err)?;
    db.flush().map_err(sled_err)?;
    let io_err = |e: std::io::Error| sled_err(sled::Error::Io(e));
    let log = std::fs::File::open(config.path.join("db")).map_err(io_err)?;
    log.sync_data().map_err(io_err)?;
    // The directory entries of a new store (its log, its config) must survive a power loss too.
    // Best effort: some filesystems (FUSE, some network mounts) refuse to sync a directory, and
    // that alone must not keep courier from running.
    if let Err(error) = std::fs::File::open(&config.path).and_then(|dir| dir.sync_all()) {
        tracing::warn!(store = %path, %error, "cannot sync the store directory; a power loss right after the store was created could lose it");
    }
    Ok(Handles {
        log: Arc::new(log),
        delivered: db.open_tree("delivered").map_err(sled_err)?,
        dead: db.open_tree("dead").map_err(sled_err)?,
        retries: db.open_tree("retries").map_err(sled_err)?,
        retry_index: db.open_tree("retry_index").map_err(sled_err)?,
        db,
    })
}

impl Store {
    /// Opens (or creates) the store. sled takes an exclusive lock: a second process on the same
    /// path gets a clear error instead of corrupting it.
    pub fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        let store = Store::closed(config, "not opened yet".to_string());
        let handles = open_handles(config, &store.path)?;
        store.install(handles);
        Ok(store)
    }

    /// Opens the store if it can, and otherwise returns it closed, to be opened by
    /// [`Store::recover`] once the disk allows. What the worker uses: an unwritable disk (or a
    /// lock still held by a stopping predecessor) then holds deliveries back instead of
    /// stopping the process, the way an unreachable broker does.
    pub fn open_or_closed(config: &StoreConfig) -> Store {
        let store = Store::closed(config, "not opened yet".to_string());
        match open_handles(config, &store.path) {
            Ok(handles) => store.install(handles),
            Err(error) => {
                tracing::error!(%error, "STORE CANNOT BE OPENED: nothing is acked until it can; retrying");
                *store.lock_reason() = Some(error.to_string());
            }
        }
        store
    }

    fn closed(config: &StoreConfig, reason: String) -> Store {
        Store {
            handles: std::sync::RwLock::new(None),
            config: config.clone(),
            dedup_ttl: config.dedup_ttl,
            path: config.path.display().to_string(),
            generation: AtomicU64::new(0),
            closed_because: std::sync::Mutex::new(Some(reason)),
            reopen_lock: tokio::sync::Mutex::new(()),
            written: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            flush_lock: tokio::sync::Mutex::new(()),
            deferred: tokio::sync::Notify::new(),
            flusher_running: AtomicBool::new(false),
            deferred_flush_failed: AtomicBool::new(false),
        }
    }

    fn install(&self, handles: Handles) {
        *self.handles.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(handles));
        *self.lock_reason() = None;
    }

    fn lock_reason(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.closed_because
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn handles(&self) -> Result<Arc<Handles>, StoreError> {
        if let Some(h) = self
            .handles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Ok(h.clone());
        }
        Err(StoreError::Closed {
            path: self.path.clone(),
            reason: self.lock_reason().clone().unwrap_or_default(),
        })
    }

    /// Counts reopens. A caller that wrote, then committed, and sees a different generation than
    /// before its first write must write again: the reopen may have dropped writes that were
    /// only in memory.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Reopens the store after `error`, if that error is one a reopen can cure (a failed disk
    /// write or read, or the store being closed) and no other caller has reopened it since
    /// `seen_generation`. Returns whether the store is open afterwards.
    pub async fn recover(&self, error: &StoreError, seen_generation: u64) -> bool {
        if !error.cured_by_reopen() {
            return self.handles().is_ok();
        }
        let _one_at_a_time = self.reopen_lock.lock().await;
        let open = self.handles().is_ok();
        if self.generation() != seen_generation && open {
            return true;
        }
        let old = self
            .handles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(old) = old {
            self.generation.fetch_add(1, Ordering::SeqCst);
            *self.lock_reason() = Some(error.to_string());
            // sled releases its file lock only when the last handle is dropped; operations that
            // cloned it finish quickly (they fail).
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while Arc::strong_count(&old) > 1 && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let _ = tokio::task::spawn_blocking(move || drop(old)).await;
        }
        let config = self.config.clone();
        let path = self.path.clone();
        match tokio::task::spawn_blocking(move || open_handles(&config, &path)).await {
            Ok(Ok(handles)) => {
                self.install(handles);
                tracing::warn!(path = %self.path, "store reopened: deliveries and acks resume");
                true
            }
            Ok(Err(reopen_error)) => {
                *self.lock_reason() = Some(reopen_error.to_string());
                tracing::error!(error = %reopen_error, "STORE CANNOT BE REOPENED: nothing is acked until it can; retrying");
                false
            }
            Err(join_error) => {
                tracing::error!(error = %join_error, "store reopen task failed; retrying");
                false
            }
        }
    }

    /// The store's directory, as shown in errors.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Why the store is closed, or `None` while it is open.
    pub fn closed_reason(&self) -> Option<String> {
        self.lock_reason().clone()
    }

    fn err(&self, source: sled::Error) -> StoreError {
        StoreError::Sled {
            path: self.path.clone(),
            source,
        }
    }

    /// Whether `event_id` was delivered with a 2xx to `destination` within the dedup TTL.
    pub fn is_delivered(&self, destination: &str, event_id: &str) -> Result<bool, StoreError> {
        let h = self.handles()?;
        let found = with_dedup_key(destination, event_id, |key| h.delivered.get(key));
        let Some(value) = found.map_err(|e| self.err(e))? else {
            return Ok(false);
        };
        let at = decode_millis(&value);
        let now = millis(SystemTime::now());
        Ok(now.saturating_sub(at) < self.dedup_ttl.as_millis() as u64)
    }

    /// Remembers a 2xx delivery. Durable after the next [`Store::commit`].
    pub fn record_delivered(&self, destination: &str, event_id: &str) -> Result<(), StoreError> {
        let h = self.handles()?;
        let now = millis(SystemTime::now());
        with_dedup_key(destination, event_id, |key| {
            h.delivered.insert(key, &now.to_be_bytes())
        })
        .map_err(|e| self.err(e))?;
        self.wrote();
        Ok(())
    }

    /// Adds a dead letter. Durable after the next [`Store::commit`].
    pub fn dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        let h = self.handles()?;
        let seq = h.db.generate_id().map_err(|e| self.err(e))?;
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&letter.at_ms.to_be_bytes());
        key[8..].copy_from_slice(&seq.to_be_bytes());
        let value = serde_json::to_vec(letter).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        h.dead.insert(key, value).map_err(|e| self.err(e))?;
        self.wrote();
        Ok(())
    }

    /// Schedules (or re-schedules) the retry of one event at one destination; an earlier pending
    /// retry of the same pair is replaced. Durable after the next [`Store::commit`].
    pub fn schedule_retry(&self, record: &RetryRecord) -> Result<(), StoreError> {
        let h = self.handles()?;
        let key = record.key();
        let pair = dedup_key(&record.destination, &record.event.id);
        let value = serde_json::to_vec(record).map_err(|e| self.corrupt(e.to_string()))?;
        // Entry first, index second: a crash in between leaves an entry the index does not know,
        // which the scheduler still attempts and then removes by its own key.
        h.retries
            .insert(key.as_slice(), value)
            .map_err(|e| self.err(e))?;
        if let Some(old) = h
            .retry_index
            .insert(pair.as_slice(), key.as_slice())
            .map_err(|e| self.err(e))?
        {
            if old.as_ref() != key.as_slice() {
                h.retries.remove(old).map_err(|e| self.err(e))?;
            }
        }
        self.wrote();
        Ok(())
    }

    /// Drops the pending retry of `event_id` at `destination`, if any.
    pub fn remove_retry(&self, destination: &str, event_id: &str) -> Result<(), StoreError> {
        let h = self.handles()?;
        let pair = dedup_key(destination, event_id);
        if let Some(key) = h.retry_index.remove(pair).map_err(|e| self.err(e))? {
            h.retries.remove(key).map_err(|e| self.err(e))?;
        }
        self.wrote();
        Ok(())
    }

    /// Drops exactly this entry (found by its own key, so also one the index lost track of) and
    /// the index entry if it points here.
    pub fn remove_retry_record(&self, record: &RetryRecord) -> Result<(), StoreError> {
        let h = self.handles()?;
        let key = record.key();
        h.retries.remove(key.as_slice()).map_err(|e| self.err(e))?;
        let pair = dedup_key(&record.destination, &record.event.id);
        let _ = h
            .retry_index
            .compare_and_swap(pair, Some(key.as_slice()), None::<&[u8]>)
            .map_err(|e| self.err(e))?;
        self.wrote();
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
        let h = self.handles()?;
        let start = retry_prefix(destination);
        let mut end = start.clone();
        end.extend_from_slice(&now_ms.saturating_add(1).to_be_bytes());
        let mut out = Vec::new();
        for item in h.retries.range(start..end) {
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
        let h = self.handles()?;
        let prefix = retry_prefix(destination);
        match h.retries.scan_prefix(&prefix).next() {
            Some(item) => {
                let (key, _) = item.map_err(|e| self.err(e))?;
                Ok(key.get(prefix.len()..prefix.len() + 8).map(decode_millis))
            }
            None => Ok(None),
        }
    }

    /// Destinations that have pending retries (one pass over the index).
    pub fn retry_destinations(&self) -> Result<Vec<String>, StoreError> {
        let h = self.handles()?;
        let mut out: Vec<String> = Vec::new();
        for item in h.retry_index.iter() {
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
        self.handles().map(|h| h.dead.len()).unwrap_or(0)
    }

    /// Pending retries.
    pub fn pending_retries(&self) -> usize {
        self.handles().map(|h| h.retry_index.len()).unwrap_or(0)
    }

    /// Every pending retry, by destination and then time.
    pub fn retries(&self) -> Result<Vec<RetryRecord>, StoreError> {
        let h = self.handles()?;
        let mut out = Vec::new();
        for item in h.retries.iter() {
            let (_, value) = item.map_err(|e| self.err(e))?;
            out.push(
                serde_json::from_slice(&value).map_err(|e| self.corrupt(format!("retry: {e}")))?,
            );
        }
        Ok(out)
    }

    /// Replaces the dead letter stored under `key` (its hex form, as listed).
    pub fn update_dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        let h = self.handles()?;
        let key = unhex(&letter.key)
            .ok_or_else(|| self.corrupt(format!("bad dead-letter key {:?}", letter.key)))?;
        let value = serde_json::to_vec(letter).map_err(|e| self.corrupt(e.to_string()))?;
        h.dead.insert(key, value).map_err(|e| self.err(e))?;
        self.wrote();
        Ok(())
    }

    /// Removes the dead letter stored under `key` (its hex form, as listed).
    pub fn remove_dead_letter(&self, key: &str) -> Result<bool, StoreError> {
        let h = self.handles()?;
        let raw = unhex(key).ok_or_else(|| self.corrupt(format!("bad dead-letter key {key:?}")))?;
        let removed = h.dead.remove(raw).map_err(|e| self.err(e))?.is_some();
        if removed {
            self.wrote();
        }
        Ok(removed)
    }

    fn corrupt(&self, message: String) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            message,
        }
    }

    /// Every dead letter, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let h = self.handles()?;
        let mut out = Vec::new();
        for item in h.dead.iter() {
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

    fn wrote(&self) {
        self.written.fetch_add(1, Ordering::SeqCst);
    }

    /// Makes every write made before this call durable. Concurrent callers share one flush: a
    /// caller whose writes were covered by a flush that started after them returns without its
    /// own, and so does one with nothing new to flush.
    pub async fn commit(&self) -> Result<(), StoreError> {
        let wanted = self.written.load(Ordering::SeqCst);
        if self.flushed.load(Ordering::SeqCst) >= wanted {
            return Ok(());
        }
        let _guard = self.flush_lock.lock().await;
        if self.flushed.load(Ordering::SeqCst) >= wanted {
            return Ok(());
        }
        let h = self.handles()?;
        // Each write counted by now was in sled's memory before this flush starts.
        let covered = self.written.load(Ordering::SeqCst);
        self.flush_and_sync(&h).await?;
        self.flushed.store(covered, Ordering::SeqCst);
        self.deferred_flush_failed.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// A commit for writes whose loss in a crash costs at most a second POST (the dedup records
    /// of delivered events): returns at once and leaves them to [`Store::flush_deferred`], which
    /// makes them durable within `store.dedup_flush_interval`. So a burst of deliveries shares
    /// one flush per interval, and no message holds its in-flight slot while a flush runs. Waits
    /// for a commit instead when no background flush runs, when its last flush failed, or when
    /// more than a few thousand writes already wait.
    pub async fn commit_deferred(&self) -> Result<(), StoreError> {
        let waiting = self
            .written
            .load(Ordering::SeqCst)
            .saturating_sub(self.flushed.load(Ordering::SeqCst));
        if waiting == 0 {
            return Ok(());
        }
        if waiting <= MAX_DEFERRED
            && self.flusher_running.load(Ordering::SeqCst)
            && !self.deferred_flush_failed.load(Ordering::SeqCst)
        {
            self.deferred.notify_one();
            return Ok(());
        }
        self.commit().await
    }

    /// The background flush behind [`Store::commit_deferred`]: once a deferred write waits, lets
    /// `store.dedup_flush_interval` go by, so the writes of that interval share it, then commits.
    /// Until `stop`; then commits what is left and returns.
    pub async fn flush_deferred(&self, stop: tokio_util::sync::CancellationToken) {
        self.flusher_running.store(true, Ordering::SeqCst);
        let interval = self.config.dedup_flush_interval;
        loop {
            tokio::select! {
                _ = self.deferred.notified() => {}
                _ = stop.cancelled() => break,
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.cancelled() => break,
            }
            if let Err(error) = self.commit().await {
                // The next deferred commit flushes by itself and meets this error, and the
                // caller's store-failure handling reopens the store.
                self.deferred_flush_failed.store(true, Ordering::SeqCst);
                tracing::error!(%error, "background flush of dedup records failed");
            }
        }
        self.flusher_running.store(false, Ordering::SeqCst);
        // Returns at once when nothing waits.
        if let Err(error) = self.commit().await {
            tracing::error!(%error, "last background flush of dedup records failed");
        }
    }

    /// sled's flush, then an `fdatasync` of its log file (see [`Handles::log`]).
    async fn flush_and_sync(&self, h: &Handles) -> Result<(), StoreError> {
        h.db.flush_async().await.map_err(|e| self.err(e))?;
        let log = h.log.clone();
        match tokio::task::spawn_blocking(move || log.sync_data()).await {
            Ok(synced) => synced.map_err(|e| self.err(sled::Error::Io(e))),
            Err(panicked) => Err(self.err(sled::Error::ReportableBug(format!(
                "fdatasync of the store log panicked: {panicked}"
            )))),
        }
    }

    /// Whether every write made so far is covered by a finished flush: what a crash now would
    /// keep. The pipeline's ack rule is tested with it.
    pub fn all_durable(&self) -> bool {
        self.flushed.load(Ordering::SeqCst) >= self.written.load(Ordering::SeqCst)
    }

    /// Drops dedup entries older than the TTL; returns how many. Runs in the background.
    pub fn sweep_expired(&self) -> Result<usize, StoreError> {
        let h = self.handles()?;
        let now = millis(SystemTime::now());
        let ttl = self.dedup_ttl.as_millis() as u64;
        let mut removed = 0;
        for item in h.delivered.iter() {
            let (key, value) = item.map_err(|e| self.err(e))?;
            if now.saturating_sub(decode_millis(&value)) >= ttl {
                h.delivered.remove(key).map_err(|e| self.err(e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Number of remembered deliveries (for logs and tests).
    pub fn delivered_count(&self) -> usize {
        self.handles().map(|h| h.delivered.len()).unwrap_or(0)
    }

    /// Flushes everything; called at shutdown.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let h = self.handles()?;
        self.flush_and_sync(&h).await
    }
}

/// Calls `f` with [`dedup_key`], built on the stack when it is short: the dedup check and record
/// run once per delivery, and sled copies the key anyway.
fn with_dedup_key<T>(destination: &str, event_id: &str, f: impl FnOnce(&[u8]) -> T) -> T {
    let (d, len) = (destination.len(), destination.len() + 1 + event_id.len());
    let mut stack = [0u8; 192];
    match stack.get_mut(..len) {
        Some(key) => {
            key[..d].copy_from_slice(destination.as_bytes());
            key[d] = 0;
            key[d + 1..].copy_from_slice(event_id.as_bytes());
            f(key)
        }
        None => f(&dedup_key(destination, event_id)),
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

    #[test]
    fn stack_and_heap_dedup_keys_are_the_same_bytes() {
        let long_id = "x".repeat(500);
        for (destination, id) in [("d", "e1"), ("partner", long_id.as_str()), ("", "")] {
            let built = with_dedup_key(destination, id, |key| key.to_vec());
            assert_eq!(
                built,
                dedup_key(destination, id),
                "{destination:?} {}",
                id.len()
            );
        }
    }

    #[tokio::test]
    async fn a_long_event_id_is_deduplicated_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&config(dir.path(), Duration::from_secs(3600))).expect("open");
        let long_id = "y".repeat(300);
        assert!(!store.is_delivered("d", &long_id).unwrap());
        store.record_delivered("d", &long_id).unwrap();
        assert!(store.is_delivered("d", &long_id).unwrap());
        assert!(!store.is_delivered("d", &long_id[1..]).unwrap());
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
        assert!(store.all_durable(), "every write was followed by a commit");
    }

    #[tokio::test]
    async fn a_write_is_durable_only_after_a_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&config(dir.path(), Duration::from_secs(60))).expect("open");
        assert!(store.all_durable(), "nothing written yet");
        store.record_delivered("d", "e1").unwrap();
        assert!(!store.all_durable());
        store.commit().await.unwrap();
        assert!(store.all_durable());
        store.remove_retry("d", "e1").unwrap();
        assert!(!store.all_durable(), "a removal counts as a write");
        store.commit().await.unwrap();
        assert!(store.all_durable());
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
    async fn a_store_that_cannot_open_waits_and_recovers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path(), Duration::from_secs(60));
        let first = Store::open(&cfg).expect("open");
        first.record_delivered("d", "e1").expect("write");
        first.commit().await.expect("commit");

        // The lock is held: the second store starts closed and says why.
        let second = Store::open_or_closed(&cfg);
        let error = second.is_delivered("d", "e1").expect_err("closed");
        assert!(matches!(error, StoreError::Closed { .. }), "{error}");
        assert!(error.to_string().contains("in use"), "{error}");
        assert!(second.closed_reason().is_some());
        assert!(!second.recover(&error, second.generation()).await);

        drop(first);
        assert!(second.recover(&error, second.generation()).await);
        assert!(second.closed_reason().is_none());
        assert!(second.is_delivered("d", "e1").expect("open now"));

        // A reopen of an open store (after a disk error) bumps the generation and keeps what
        // was committed.
        let before = second.generation();
        let disk_error = StoreError::Sled {
            path: "x".into(),
            source: sled::Error::Unsupported("simulated".into()),
        };
        assert!(second.recover(&disk_error, before).await);
        assert_eq!(second.generation(), before + 1);
        assert!(second.is_delivered("d", "e1").expect("reopened"));
        // A caller that saw the old generation does not reopen again.
        assert!(second.recover(&disk_error, before).await);
        assert_eq!(second.generation(), before + 1);
        // Errors a reopen cannot cure do not reopen.
        assert!(!StoreError::Redis("down".into()).cured_by_reopen());
    }

    #[tokio::test]
    async fn an_unfinished_snapshot_does_not_block_opening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path(), Duration::from_secs(60));
        {
            let store = Store::open(&cfg).expect("open");
            store.record_delivered("d", "e1").expect("write");
            store.commit().await.expect("commit");
        }
        // What a snapshot write that hit a full disk leaves behind.
        std::fs::write(dir.path().join("snap.FFFFFFFFFFFFFFFF.generating"), b"").expect("write");
        let store = Store::open(&cfg).expect("opens despite the unfinished snapshot");
        assert!(store.is_delivered("d", "e1").expect("read"));
        assert!(!dir.path().join("snap.FFFFFFFFFFFFFFFF.generating").exists());
    }

    #[tokio::test]
    async fn dead_letters_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&config(dir.path(), Duration::from_secs(60))).expect("open");
        let letter =
            DeadLetter::bad_input(SourceKind::Rabbitmq, "t", b"\xff", "not UTF-8".into(), 16);
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

    use tokio_util::sync::CancellationToken;

    /// A store whose background flush waits `interval`.
    fn store(dir: &std::path::Path, interval: Duration) -> Arc<Store> {
        let config = StoreConfig {
            dedup_flush_interval: interval,
            ..config(dir, Duration::from_secs(3600))
        };
        Arc::new(Store::open(&config).expect("open"))
    }

    /// Starts [`Store::flush_deferred`] and returns once it runs: until then a deferred
    /// commit would flush by itself.
    async fn start_flusher(store: &Arc<Store>) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let stop = CancellationToken::new();
        let flusher = tokio::spawn({
            let (store, stop) = (store.clone(), stop.clone());
            async move { store.flush_deferred(stop).await }
        });
        while !store.flusher_running.load(Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        (stop, flusher)
    }

    /// Waits up to `limit` for every write to be durable; returns how long that took.
    async fn durable_within(store: &Store, limit: Duration) -> Option<Duration> {
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            if store.all_durable() {
                return Some(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        None
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deferred_commit_returns_at_once_and_the_background_flush_follows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path(), Duration::from_millis(300));
        let (stop, flusher) = start_flusher(&store).await;
        store.record_delivered("d", "e1").expect("record");
        store.commit_deferred().await.expect("deferred commit");
        assert!(
            !store.all_durable(),
            "the deferred commit flushed by itself"
        );
        let took = durable_within(&store, Duration::from_secs(5))
            .await
            .expect("the background flush never came");
        assert!(
            took >= Duration::from_millis(200),
            "flushed after {took:?}, before the interval"
        );
        stop.cancel();
        flusher.await.expect("flusher");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stopping_the_background_flush_flushes_what_waits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path(), Duration::from_secs(60));
        let (stop, flusher) = start_flusher(&store).await;
        store.record_delivered("d", "e1").expect("record");
        store.commit_deferred().await.expect("deferred commit");
        assert!(!store.all_durable());
        stop.cancel();
        flusher.await.expect("flusher");
        assert!(store.all_durable(), "records left unflushed at stop");
        // With no background flush running any more, a deferred commit flushes by itself.
        store.record_delivered("d", "e2").expect("record");
        store.commit_deferred().await.expect("deferred commit");
        assert!(store.all_durable());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn too_many_waiting_writes_make_a_deferred_commit_flush() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(dir.path(), Duration::from_secs(60));
        let (stop, flusher) = start_flusher(&store).await;
        for i in 0..=MAX_DEFERRED {
            store
                .record_delivered("d", &format!("e{i}"))
                .expect("record");
        }
        store.commit_deferred().await.expect("deferred commit");
        assert!(
            store.all_durable(),
            "more than MAX_DEFERRED writes waited, and the deferred commit did not flush"
        );
        stop.cancel();
        flusher.await.expect("flusher");
    }
}
