//! What must survive a restart: which event went to which destination (dedup), what waits for
//! another attempt (retries), and what could not be delivered (dead letters). The only module
//! that knows sled, and the owner of its own lifecycle: it opens (or keeps trying to), reopens
//! itself after a disk failure, runs its background flush and dedup sweep, and stops them.
//!
//! Callers see one interface:
//! - fallible operations on the trees (`schedule_retry`, `dead_letters`, ...), for commands and
//!   tests that report an error;
//! - [`Store::until_stored`] and [`Store::until_ok`], which run an operation until it works,
//!   reopening the store when that can help; the worker uses them, because a message whose
//!   outcome cannot be stored is not acked, and waiting is the only way not to lose it;
//! - [`Store::commit`] (durable now) and [`Store::commit_deferred`] (durable within
//!   `store.dedup_flush_interval`, for dedup records only), and [`Store::epoch`], which tells a
//!   caller whether a reopen may have dropped the writes it made before its commit.
//!
//! sled 0.34 is the last stable line and unmaintained upstream; keeping every sled call in this
//! module is what lets it be swapped.

mod commit;
mod counts;
mod db;
mod dedup;
mod dedup_table;
mod records;
mod redis_link;
mod trees;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use records::{
    crash_reason, millis, panic_message, DeadLetter, DeadLetterKind, LetterKey, RetryRecord,
    StoredEvent,
};

use crate::backoff::ReconnectBackoff;
use crate::config::{DedupBackend, StoreConfig};
use crate::shutdown::Shutdown;
use commit::Commits;
use db::Db;
use dedup::RedisDedup;

/// The longest wait between two tries of a failing store: also the longest delay between a
/// disk becoming writable again and acks resuming.
const RETRY_MAX: Duration = Duration::from_secs(5);

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
    /// A read or write of the dedup table failed.
    #[error("store {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The shared dedup in Redis failed.
    #[error("redis dedup: {0}")]
    Redis(String),
    /// The store is closed after a disk failure, waiting to be reopened.
    #[error("store {path} is closed until it can be reopened: {reason}")]
    Closed { path: String, reason: String },
    /// A stored record could not be decoded.
    #[error("store {path}: corrupt record: {message}")]
    Corrupt { path: String, message: String },
    /// The store's operations kept failing for this long (the log says why), and the caller
    /// stopped waiting: only a caller that can answer with an error does ([`Store::failing_for`]).
    #[error("store {path}: its operations kept failing for {} (the log says why)", humantime::format_duration(*.waited))]
    Failing { path: String, waited: Duration },
}

impl StoreError {
    /// Whether closing and reopening the store can make the operation work again: true for disk
    /// errors (sled refuses everything after one), a closed store, and a lock still held by a
    /// stopping predecessor; false for a corrupt record and for Redis.
    pub fn cured_by_reopen(&self) -> bool {
        matches!(
            self,
            StoreError::Sled { .. }
                | StoreError::Io { .. }
                | StoreError::Closed { .. }
                | StoreError::Locked { .. }
        )
    }
}

/// A point in the store's life: writes made after it and committed are durable unless the store
/// was reopened since ([`Store::reopened_since`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch(u64);

/// The store. Cloning it is cheap; every clone is the same store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    commits: Commits,
    /// Where the dedup record lives when it is not the sled tree.
    redis: Option<RedisDedup>,
    dedup_ttl: Duration,
    dedup_flush_interval: Duration,
    /// Whether the last operation run by `until_ok` failed (for readiness).
    failing: AtomicBool,
    /// The background flush and sweep, while they run.
    background: Mutex<Option<Background>>,
}

struct Background {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Store {
    /// Opens the store now, or fails. sled takes an exclusive lock: a second process on the same
    /// path gets [`StoreError::Locked`] instead of corrupting it. No background task runs, so a
    /// deferred commit flushes at once; for commands and tests.
    pub fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        let (db, opened) = Db::open(config);
        opened?;
        Store::with_db(config, db)
    }

    /// The worker's store: opened now when it can be, and otherwise closed, to be opened by
    /// [`Store::wait_open`]; an unwritable disk, or a lock still held by a stopping
    /// predecessor, then holds deliveries back the way an unreachable broker does, as does a
    /// Redis that holds the dedup record and cannot be reached yet. Starts the background flush
    /// of deferred commits and the dedup sweep, which [`Store::close`] stops.
    pub fn start(config: &StoreConfig) -> Result<Store, StoreError> {
        let (db, opened) = Db::open(config);
        if let Err(error) = opened {
            tracing::error!(%error, "STORE CANNOT BE OPENED: nothing is acked until it can; retrying");
        }
        let store = Store::with_db(config, db)?;
        let stop = CancellationToken::new();
        store.inner.commits.take_deferred_commits();
        let flush = tokio::spawn({
            let (store, stop) = (store.clone(), stop.clone());
            async move {
                let inner = &store.inner;
                inner
                    .commits
                    .flush_in_background(&inner.db, inner.dedup_flush_interval, stop)
                    .await
            }
        });
        let sweep = tokio::spawn(store.clone().sweep(stop.clone()));
        *store.lock_background() = Some(Background {
            stop,
            tasks: vec![flush, sweep],
        });
        Ok(store)
    }

    fn with_db(config: &StoreConfig, db: Db) -> Result<Store, StoreError> {
        let redis = match config.dedup {
            DedupBackend::Local => None,
            DedupBackend::Redis => Some(RedisDedup::new(config)?),
        };
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                commits: Commits::default(),
                redis,
                dedup_ttl: config.dedup_ttl,
                dedup_flush_interval: config.dedup_flush_interval,
                failing: AtomicBool::new(false),
                background: Mutex::new(None),
            }),
        })
    }

    fn lock_background(&self) -> std::sync::MutexGuard<'_, Option<Background>> {
        self.inner
            .background
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Returns once the store is open (at once, normally) and the Redis of the dedup record, if
    /// any, has been reached, trying both with backoff, or when the stop is requested. Until
    /// then, [`Store::not_ready_reasons`] says why, and the admin port already answers.
    pub async fn wait_open(&self, shutdown: &Shutdown) {
        let mut backoff = ReconnectBackoff::new(Duration::from_millis(100), RETRY_MAX);
        while !self.inner.db.open_if_closed().await {
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = shutdown.requested() => return,
            }
        }
        if let Some(redis) = &self.inner.redis {
            // An error here means the stop was requested.
            let _ = redis.connect(shutdown).await;
        }
    }

    /// Stops the background tasks (the flush commits what waits), then flushes everything.
    /// sled releases its file lock when the last clone of the store is gone; after this, no
    /// background task holds one.
    pub async fn close(&self) -> Result<(), StoreError> {
        if let Some(dedup) = self.inner.db.handles().ok().and_then(|h| h.dedup.clone()) {
            dedup.stop_background();
        }
        let background = self.lock_background().take();
        if let Some(background) = background {
            background.stop.cancel();
            for task in background.tasks {
                let _ = task.await;
            }
        }
        match self.inner.db.handles() {
            Ok(h) => commit::flush_and_sync(&self.inner.db, &h).await,
            // Closed after a failure: nothing it holds can be flushed.
            Err(_) => Ok(()),
        }
    }

    /// The store's directory, as shown in errors.
    pub fn path(&self) -> &str {
        self.inner.db.path()
    }

    /// Why the store is closed, or `None` while it is open.
    pub fn closed_reason(&self) -> Option<String> {
        self.inner.db.closed_reason()
    }

    /// Why the store keeps courier from being ready (empty when it does not).
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if self.inner.failing.load(Ordering::Relaxed) {
            reasons.push("store: the last write or flush failed".to_string());
        }
        if let Some(why) = self.closed_reason() {
            reasons.push(format!("store: closed: {why}"));
        }
        if let Some(why) = self.inner.redis.as_ref().and_then(RedisDedup::unreachable) {
            reasons.push(format!("store: cannot reach Redis: {why}"));
        }
        reasons
    }

    /// Resolves once the store's operations have failed, or the store has been closed, for
    /// `patience` without a break. A queue message waits for the store as long as it takes
    /// ([`Store::until_ok`]), because the broker holds it meanwhile; an operator waiting for an
    /// answer ([`crate::deadletters::replay`]) gets this error instead of an answer that never
    /// comes while the disk is broken.
    pub async fn failing_for(&self, patience: Duration) -> StoreError {
        const LOOK_EVERY: Duration = Duration::from_millis(100);
        let mut since: Option<std::time::Instant> = None;
        loop {
            let failing =
                self.inner.failing.load(Ordering::Relaxed) || self.closed_reason().is_some();
            let now = std::time::Instant::now();
            since = if failing { since.or(Some(now)) } else { None };
            if let Some(since) = since.filter(|s| now.duration_since(*s) >= patience) {
                return StoreError::Failing {
                    path: self.path().to_string(),
                    // Whole seconds: the message is for people.
                    waited: Duration::from_secs(now.duration_since(since).as_secs()),
                };
            }
            tokio::time::sleep(LOOK_EVERY).await;
        }
    }

    /// Now, as a point to compare with [`Store::reopened_since`].
    pub fn epoch(&self) -> Epoch {
        Epoch(self.inner.db.generation())
    }

    /// Whether the store was reopened after `epoch`: writes made since may never have reached
    /// the disk, and must be made again before the message they belong to is acked.
    pub fn reopened_since(&self, epoch: Epoch) -> bool {
        self.inner.db.generation() != epoch.0
    }

    /// Whether `event_id` was delivered with a 2xx to `destination` within the dedup TTL, by
    /// whichever record is configured (this store's tree, or Redis).
    pub async fn is_delivered(
        &self,
        destination: &str,
        event_id: &str,
    ) -> Result<bool, StoreError> {
        match &self.inner.redis {
            None => self.local_is_delivered(destination, event_id),
            Some(redis) => redis.is_delivered(destination, event_id).await,
        }
    }

    /// Remembers a 2xx delivery: in this store's tree (durable after the next commit), or in
    /// Redis (when this returns).
    pub async fn record_delivered(
        &self,
        destination: &str,
        event_id: &str,
    ) -> Result<(), StoreError> {
        match &self.inner.redis {
            None => self.local_record_delivered(destination, event_id),
            Some(redis) => redis.record(destination, event_id).await,
        }
    }

    /// Makes every write made before this call durable (one attempt). Concurrent callers share
    /// one flush.
    pub async fn try_commit(&self) -> Result<(), StoreError> {
        self.inner.commits.commit(&self.inner.db).await
    }

    /// [`Store::try_commit`] until it works.
    pub async fn commit(&self) {
        self.until_ok(|| self.try_commit()).await
    }

    /// A commit for writes whose loss in a crash costs at most a second POST (the dedup records
    /// of delivered events): returns at once and leaves them to the background flush, which
    /// makes them durable within `store.dedup_flush_interval`. So a burst of deliveries shares
    /// one flush per interval, and no message holds its in-flight slot while a flush runs.
    /// Flushes at once (until it works) when no background flush runs, when its last flush
    /// failed, or when more than a few thousand writes already wait.
    pub async fn commit_deferred(&self) {
        self.until_ok(|| self.inner.commits.commit_deferred(&self.inner.db))
            .await
    }

    /// Leaves at most `writes` dedup records to the background flush: a deferred commit with
    /// more waiting flushes before it returns. courier sets it to `service.max_in_flight`, so a
    /// crash loses the records of at most that many finished deliveries besides those under way
    /// (docs/reliability.md#what-a-duplicate-is).
    pub fn cap_deferred(&self, writes: usize) {
        self.inner.commits.cap_deferred(writes as u64);
    }

    /// Whether every write made so far is covered by a finished flush: what a crash now would
    /// keep. The pipeline's ack rule is tested with it.
    pub fn all_durable(&self) -> bool {
        self.inner.commits.all_durable()
    }

    /// Runs a store operation until it works (see [`Store::until_ok`]).
    pub async fn until_stored<T>(&self, mut op: impl FnMut() -> Result<T, StoreError>) -> T {
        self.until_ok(|| std::future::ready(op())).await
    }

    /// Runs an operation until it works. While it fails, nothing that depends on it is acked, so
    /// nothing is lost: each failure is logged loudly, marks the store not ready, reopens the
    /// store when a reopen can cure it, and waits (backoff up to 5 s). The shutdown timeout
    /// aborts a caller whose store never recovers.
    pub async fn until_ok<T, F, Fut>(&self, mut op: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut backoff = ReconnectBackoff::new(Duration::from_millis(100), RETRY_MAX);
        loop {
            let generation = self.inner.db.generation();
            match op().await {
                Ok(v) => {
                    self.inner.failing.store(false, Ordering::Relaxed);
                    return v;
                }
                Err(error) => {
                    self.inner.failing.store(true, Ordering::Relaxed);
                    let delay = backoff.next_delay();
                    tracing::error!(%error, retry_in = ?delay, "STORE OPERATION FAILED: not acking until the store works again");
                    // A reopen can succeed on a disk that is still full; waiting even then keeps
                    // a failing disk from turning into a busy loop. The caller's epoch check
                    // redoes lost writes.
                    self.inner.db.recover(&error, generation).await;
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Drops expired dedup entries at start and then every tenth of the TTL (at most hourly, at
    /// least every second), until `stop`.
    async fn sweep(self, stop: CancellationToken) {
        let every =
            (self.inner.dedup_ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600));
        while !stop.is_cancelled() {
            let store = self.clone();
            match tokio::task::spawn_blocking(move || store.sweep_expired()).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::info!(removed = n, "expired dedup entries swept"),
                // Closed after a failure: the next sweep finds it reopened.
                Ok(Err(StoreError::Closed { .. })) => {}
                // Stopped by a close or reopen of the store: not a failure.
                Ok(Err(StoreError::Io { source, .. })) if dedup_table::is_stopped(&source) => {}
                Ok(Err(error)) => tracing::warn!(%error, "dedup sweep failed; will try again"),
                Err(error) => tracing::warn!(%error, "dedup sweep task failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.cancelled() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests;
