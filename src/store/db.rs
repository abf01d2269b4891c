//! The sled database itself: opening it, and reopening it after a disk failure. The only file
//! that opens sled.
//!
//! sled stops serving every operation after one failed disk write (a full or read-only disk), and
//! only a fresh open clears that. So the open database sits behind a slot that [`Db::recover`]
//! empties and refills; each reopen bumps [`Db::generation`], which tells a caller that writes it
//! made before may not have reached the disk and must be made again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use super::counts::Counts;
use super::dedup_table::{joined_key_hash, DedupTable};
use super::records::millis;
use super::StoreError;
use crate::config::{DedupBackend, StoreConfig};

/// The open sled database and its trees. Replaced as a whole when the store is reopened.
pub(super) struct Handles {
    pub(super) db: sled::Db,
    /// sled's log file (`<path>/db`), opened a second time for `fdatasync`: sled's flush waits
    /// with `sync_file_range`, which on Linux writes neither the file's metadata (its growing
    /// length) nor the disk's write cache, so a power loss could drop writes it reported
    /// flushed. Syncing the same file through another descriptor covers both.
    pub(super) log: Arc<std::fs::File>,
    /// The dedup record: which event reached which destination with a 2xx, and when. `None`
    /// with `dedup = "redis"`, where Redis holds it and no table file is made.
    pub(super) dedup: Option<Arc<DedupTable>>,
    /// Whether sled's trees were written since the last commit began. A commit whose writes
    /// are all dedup records (the commit after each 2xx-only message) then skips sled's flush
    /// and its `fdatasync`, and costs one `fdatasync`, the dedup table's.
    pub(super) sled_dirty: std::sync::atomic::AtomicBool,
    /// Time-ordered key → [`DeadLetter`].
    pub(super) dead: sled::Tree,
    /// `destination ++ 0 ++ next_at (u64 BE) ++ event id` → [`RetryRecord`]: a destination's due
    /// entries are one range scan, and a destination whose circuit is open is simply not scanned.
    pub(super) retries: sled::Tree,
    /// `destination ++ 0 ++ event id` → its key in `retries`: one pending retry per pair.
    pub(super) retry_index: sled::Tree,
    /// How many entries `dead` and `retry_index` hold, kept as they are written.
    pub(super) counts: Counts,
}

/// The database slot: open, or closed and waiting to be opened.
pub(super) struct Db {
    handles: RwLock<Option<Arc<Handles>>>,
    config: StoreConfig,
    path: String,
    generation: AtomicU64,
    /// Why the store is closed, while it is (for errors and readiness).
    closed_because: Mutex<Option<String>>,
    reopen_lock: tokio::sync::Mutex<()>,
}

impl Db {
    /// Opens the database, or returns it closed with the reason when it cannot be opened now.
    pub(super) fn open(config: &StoreConfig) -> (Db, Result<(), StoreError>) {
        let db = Db {
            handles: RwLock::new(None),
            config: config.clone(),
            path: config.path.display().to_string(),
            generation: AtomicU64::new(0),
            closed_because: Mutex::new(Some("not opened yet".to_string())),
            reopen_lock: tokio::sync::Mutex::new(()),
        };
        let opened = open_handles(config, &db.path).map(|handles| db.install(handles));
        if let Err(error) = &opened {
            *db.lock_reason() = Some(error.to_string());
        }
        (db, opened)
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

    /// The open database, or [`StoreError::Closed`].
    pub(super) fn handles(&self) -> Result<Arc<Handles>, StoreError> {
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

    /// The store's directory, as shown in errors.
    pub(super) fn path(&self) -> &str {
        &self.path
    }

    /// Why the database is closed, or `None` while it is open.
    pub(super) fn closed_reason(&self) -> Option<String> {
        self.lock_reason().clone()
    }

    /// Counts reopens. A caller that wrote, then committed, and sees a different generation than
    /// before its first write must write again: the reopen may have dropped writes that were
    /// only in memory.
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// After `error`: reopens the database when a reopen can cure it (a failed disk write or read,
    /// the store being closed, a lock still held by a stopping predecessor) and no other caller
    /// has reopened it since `seen_generation`. Returns whether it is open afterwards.
    pub(super) async fn recover(&self, error: &StoreError, seen_generation: u64) -> bool {
        if !error.cured_by_reopen() {
            return self.handles().is_ok();
        }
        self.reopen(seen_generation, Some(error)).await
    }

    /// Tries to open a closed database, as [`Db::recover`] does after a failure.
    pub(super) async fn open_if_closed(&self) -> bool {
        self.handles().is_ok() || self.reopen(self.generation(), None).await
    }

    async fn reopen(&self, seen_generation: u64, error: Option<&StoreError>) -> bool {
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
            // Commits still holding the old handles must not write the table file the new
            // handles open.
            if let Some(dedup) = &old.dedup {
                dedup.close();
            }
            self.generation.fetch_add(1, Ordering::SeqCst);
            if let Some(error) = error {
                *self.lock_reason() = Some(error.to_string());
            }
            // sled releases its file lock only when the last handle is dropped; operations that
            // cloned it finish quickly (they fail). A checkpoint of the old dedup table stops at
            // its next page write, before the new table reads the file.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while (Arc::strong_count(&old) > 1 || old.dedup.as_ref().is_some_and(|d| d.busy()))
                && std::time::Instant::now() < deadline
            {
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
}

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
    let dedup = match config.dedup {
        DedupBackend::Local => Some(open_dedup_table(config, path, &db)?),
        // Redis holds the record; a `delivered` tree of an earlier version stays as it was.
        DedupBackend::Redis => None,
    };
    let dead = db.open_tree("dead").map_err(sled_err)?;
    let retry_index = db.open_tree("retry_index").map_err(sled_err)?;
    Ok(Handles {
        log: Arc::new(log),
        dedup,
        sled_dirty: std::sync::atomic::AtomicBool::new(false),
        counts: Counts::read(&dead, &retry_index).map_err(sled_err)?,
        dead,
        retries: db.open_tree("retries").map_err(sled_err)?,
        retry_index,
        db,
    })
}

/// Opens the dedup table, moving into it the records of the sled tree that held them in earlier
/// versions (once; the tree is left empty).
fn open_dedup_table(
    config: &StoreConfig,
    path: &str,
    db: &sled::Db,
) -> Result<Arc<DedupTable>, StoreError> {
    let io_err = |source| StoreError::Io {
        path: path.to_string(),
        source,
    };
    let sled_err = |source| StoreError::Sled {
        path: path.to_string(),
        source,
    };
    let ttl_ms = config.dedup_ttl.as_millis() as u64;
    let had_tree = db
        .tree_names()
        .iter()
        .any(|name| name.as_ref() == OLD_DEDUP_TREE.as_bytes());
    let tree = match had_tree {
        true => Some(db.open_tree(OLD_DEDUP_TREE).map_err(sled_err)?),
        false => None,
    };
    let Some(tree) = tree.filter(|t| !t.is_empty()) else {
        return DedupTable::open(&config.path, 0, ttl_ms).map_err(io_err);
    };
    let table = DedupTable::open(&config.path, tree.len() as u64, ttl_ms).map_err(io_err)?;
    let now = millis(SystemTime::now());
    let mut moved = 0u64;
    for item in tree.iter() {
        let (key, value) = item.map_err(sled_err)?;
        let mut at = [0u8; 8];
        if value.len() == 8 {
            at.copy_from_slice(&value);
        }
        table.record(joined_key_hash(&key), u64::from_be_bytes(at));
        moved += 1;
        if moved % 100_000 == 0 {
            table.commit(now, run_now).map_err(io_err)?;
        }
    }
    table.commit(now, run_now).map_err(io_err)?;
    // Emptied, not dropped: sled 0.34 keeps a dropped tree's handle, and with it the store's
    // file lock, until its epoch-based garbage collection runs.
    tree.clear().map_err(sled_err)?;
    db.flush().map_err(sled_err)?;
    tracing::info!(store = %path, records = moved, "dedup records moved from the sled tree to the dedup table");
    Ok(table)
}

/// Runs a dedup table checkpoint on the caller's thread (while the store opens).
fn run_now(checkpoint: Box<dyn FnOnce() + Send>) -> bool {
    checkpoint();
    true
}

/// The sled tree that held the dedup record before the dedup table.
const OLD_DEDUP_TREE: &str = "delivered";
