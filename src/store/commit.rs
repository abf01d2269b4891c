//! Durability: the group commit, and the background flush behind deferred commits.
//!
//! Writes are cheap in-memory inserts; a commit makes them durable with one sled flush plus one
//! `fdatasync` of its log, covering every write made before it started, so a burst of events
//! costs one flush, not one per message.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::db::{Db, Handles};
use super::records::millis;
use super::StoreError;

/// Writes a deferred commit may leave to the background flush unless [`Commits::cap_deferred`]
/// sets fewer. Past this many, a deferred commit waits for a flush like a commit does: a disk
/// that stalls then slows the pipeline down instead of letting unflushed records pile up.
pub(super) const MAX_DEFERRED: u64 = 4096;

/// The counts behind the group commit, and the state of the background flush.
#[derive(Default)]
pub(super) struct Commits {
    /// Writes counted so far (each counted after it is in sled's memory).
    written: AtomicU64,
    /// How many of them the last finished flush covers.
    flushed: AtomicU64,
    flush_lock: tokio::sync::Mutex<()>,
    /// Wakes the background flush.
    deferred: tokio::sync::Notify,
    /// Whether a background flush takes deferred commits; without one they flush themselves.
    background: AtomicBool,
    /// Whether the background flush's last commit failed: deferred commits then flush
    /// themselves, so the failure reaches a caller that recovers the store.
    background_failed: AtomicBool,
    /// The most writes a deferred commit leaves waiting; 0 means [`MAX_DEFERRED`]. A crash loses
    /// at most these, so it bounds the second POSTs a crash can cause beyond the deliveries
    /// under way.
    max_deferred: AtomicU64,
    /// Cuts the background flush's interval short once half of `max_deferred` writes wait, so
    /// the cap is rarely met on the ack path.
    urgent: tokio::sync::Notify,
}

impl Commits {
    /// Counts one write.
    pub(super) fn wrote(&self) {
        self.written.fetch_add(1, Ordering::SeqCst);
    }

    /// Leaves at most `writes` (at least 1) to the background flush; more wait for a flush.
    pub(super) fn cap_deferred(&self, writes: u64) {
        self.max_deferred.store(writes.max(1), Ordering::SeqCst);
    }

    fn max_deferred(&self) -> u64 {
        match self.max_deferred.load(Ordering::SeqCst) {
            0 => MAX_DEFERRED,
            n => n,
        }
    }

    /// Whether every write made so far is covered by a finished flush.
    pub(super) fn all_durable(&self) -> bool {
        self.flushed.load(Ordering::SeqCst) >= self.written.load(Ordering::SeqCst)
    }

    /// Makes every write made before this call durable. Concurrent callers share one flush: a
    /// caller whose writes were covered by a flush that started after them returns without its
    /// own, and so does one with nothing new to flush.
    pub(super) async fn commit(&self, db: &Db) -> Result<(), StoreError> {
        let wanted = self.written.load(Ordering::SeqCst);
        if self.flushed.load(Ordering::SeqCst) >= wanted {
            return Ok(());
        }
        let _guard = self.flush_lock.lock().await;
        if self.flushed.load(Ordering::SeqCst) >= wanted {
            return Ok(());
        }
        let h = db.handles()?;
        // Each write counted by now was in sled's memory before this flush starts.
        let covered = self.written.load(Ordering::SeqCst);
        flush_and_sync(db, &h).await?;
        self.flushed.store(covered, Ordering::SeqCst);
        self.background_failed.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// A commit for writes whose loss in a crash costs at most a second POST (the dedup records
    /// of delivered events): returns at once and leaves them to the background flush, which
    /// makes them durable within `store.dedup_flush_interval`, or sooner once half of the cap
    /// waits. Waits for a commit instead when no background flush runs, when its last flush
    /// failed, or when more writes than the cap ([`Commits::cap_deferred`]) already wait.
    pub(super) async fn commit_deferred(&self, db: &Db) -> Result<(), StoreError> {
        let waiting = self
            .written
            .load(Ordering::SeqCst)
            .saturating_sub(self.flushed.load(Ordering::SeqCst));
        if waiting == 0 {
            return Ok(());
        }
        let cap = self.max_deferred();
        if waiting <= cap
            && self.background.load(Ordering::SeqCst)
            && !self.background_failed.load(Ordering::SeqCst)
        {
            if waiting > cap / 2 {
                self.urgent.notify_one();
            }
            self.deferred.notify_one();
            return Ok(());
        }
        self.commit(db).await
    }

    /// From now on deferred commits are left to [`Commits::flush_in_background`].
    pub(super) fn take_deferred_commits(&self) {
        self.background.store(true, Ordering::SeqCst);
    }

    /// The background flush: once a deferred write waits, lets `interval` go by (or less, when
    /// half of the cap waits), so the writes of that interval share it, then commits. Until
    /// `stop`; then commits what is left and returns, and deferred commits flush themselves
    /// again.
    pub(super) async fn flush_in_background(
        &self,
        db: &Db,
        interval: Duration,
        stop: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = self.deferred.notified() => {}
                _ = stop.cancelled() => break,
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.urgent.notified() => {}
                _ = stop.cancelled() => break,
            }
            if let Err(error) = self.commit(db).await {
                // The next deferred commit flushes by itself and meets this error, and the
                // caller's store-failure handling reopens the store.
                self.background_failed.store(true, Ordering::SeqCst);
                tracing::error!(%error, "background flush of dedup records failed");
            }
        }
        self.background.store(false, Ordering::SeqCst);
        // Returns at once when nothing waits.
        if let Err(error) = self.commit(db).await {
            tracing::error!(%error, "last background flush of dedup records failed");
        }
    }
}

/// sled's flush, then an `fdatasync` of its log file (see [`Handles::log`]), when sled's trees
/// were written since the last commit; then the dedup table's commit (its writes and its own
/// `fdatasync`, when it has records waiting).
pub(super) async fn flush_and_sync(db: &Db, h: &Handles) -> Result<(), StoreError> {
    let path = db.path().to_string();
    // Cleared before the flush: a write that lands during it sets the flag again for the next.
    let sled_dirty = h.sled_dirty.swap(false, Ordering::SeqCst);
    if sled_dirty {
        if let Err(source) = h.db.flush_async().await {
            h.sled_dirty.store(true, Ordering::SeqCst);
            return Err(StoreError::Sled { path, source });
        }
    }
    // With Redis holding the dedup record there is nothing more to sync.
    if !sled_dirty && h.dedup.is_none() {
        return Ok(());
    }
    let (log, dedup) = (h.log.clone(), h.dedup.clone());
    let blocking = tokio::task::spawn_blocking(move || {
        if sled_dirty {
            log.sync_data().map_err(|e| StoreError::Sled {
                path: path.clone(),
                source: sled::Error::Io(e),
            })?;
        }
        match dedup {
            Some(dedup) => dedup
                .commit(millis(SystemTime::now()), spawn_background)
                .map_err(|source| StoreError::Io { path, source }),
            None => Ok(()),
        }
    });
    let result = match blocking.await {
        Ok(done) => done,
        Err(panicked) => Err(StoreError::Sled {
            path: db.path().to_string(),
            source: sled::Error::ReportableBug(format!(
                "fdatasync of the store panicked: {panicked}"
            )),
        }),
    };
    if result.is_err() && sled_dirty {
        h.sled_dirty.store(true, Ordering::SeqCst);
    }
    result
}

/// Runs a checkpoint of the dedup table in a thread of its own (it writes many pages, and a
/// rebuild the whole table), so that commits go on meanwhile. Returns whether it started.
fn spawn_background(task: Box<dyn FnOnce() + Send>) -> bool {
    match std::thread::Builder::new()
        .name("courier-dedup-table".to_string())
        .spawn(task)
    {
        Ok(_) => true,
        Err(error) => {
            tracing::error!(%error, "cannot start a thread for a dedup table checkpoint; a later commit tries again");
            false
        }
    }
}
