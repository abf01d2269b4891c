//! The local dedup record: an on-disk hash table of fixed 32-byte slots, one per (destination,
//! event id) delivered with a 2xx, in `<store.path>/dedup.table` (`file.rs`), with a
//! write-ahead log in front of it (`wal.rs`).
//!
//! Why not a sled tree: sled 0.34 copies a 16-key leaf on every insert and walks the whole tree
//! to find it, which made the dedup record a large part of courier's CPU and memory per event,
//! and its cost grew several-fold as the tree filled to millions of records
//! (docs/performance.md). Here a check is at most one positioned read of a few slots whatever
//! the table holds (none for most new keys, which the filter rules out), and memory is the
//! operating system's page cache, not courier's, but for the filter.
//!
//! A record's way to the disk:
//! 1. [`DedupTable::record`] puts it in `pending`, in memory;
//! 2. the store's group commit ([`DedupTable::commit`]) appends what is pending to the log and
//!    `fdatasync`s it (one sequential write), and moves it to the `memtable`: it is durable;
//! 3. once the memtable holds enough records, a checkpoint (in a thread of its own) freezes it,
//!    starts a new log for the commits that follow, writes the frozen records into their slots
//!    a page at a time (or rebuilds the table into a larger file with them, once it would be
//!    more than half full), syncs the table, and deletes the old log.
//!
//! Only a checkpoint or a rebuild writes the table file, one at a time. A lookup reads
//! `pending`, the memtable and the frozen memtable first, then the file, unless the file's
//! Bloom filter (`filter.rs`) says it does not hold the key. At open, the logs left behind are
//! read back into the memtable and checkpointed, and a background scan reads the file into its
//! filter.
//!
//! A 128-bit cryptographic hash keeps the answers exact in practice (two keys share one with a
//! probability near 2^-128 per pair) and keeps a producer from choosing ids that collide on
//! purpose. A record older than the TTL is expired: a lookup passes over it, an insert may reuse
//! its slot, and a rebuild drops it. A slot whose CRC does not match (a torn write) is treated
//! the same. The dedup sweep rebuilds the table at the size its live records need once expired
//! records are at least as many, which is how disk space comes back.

mod file;
mod filter;
mod wal;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use sha2::{Digest, Sha256};

use crate::prehashed::PrehashedMap;

use file::{is_live, TableFile, SCAN_SLOTS};
use wal::Wal;

/// The first 16 bytes of SHA-256 of a dedup key.
pub(super) type KeyHash = [u8; 16];

/// The capacity of a new table (2 MiB of slots).
pub(super) const INITIAL_CAPACITY: u64 = 1 << 16;
/// Committed records after which a checkpoint writes them into the table (2 MiB of log).
const CHECKPOINT_RECORDS: usize = 1 << 16;
/// Committed records waiting for a checkpoint, in multiples of the checkpoint's size, past
/// which a commit runs or waits for a checkpoint first: checkpoints that keep failing (a full
/// disk) must not let memory grow without bound. The store then holds acks back and reopens,
/// as after any failed write.
const MAX_WAITING_CHECKPOINTS: usize = 8;

/// The table's file name inside the store's directory.
const FILE_NAME: &str = "dedup.table";
const NEW_FILE_NAME: &str = "dedup.table.new";

/// Hashes `destination ++ 0 ++ event id`.
pub(super) fn key_hash(destination: &str, event_id: &str) -> KeyHash {
    let mut hasher = Sha256::new();
    hasher.update(destination.as_bytes());
    hasher.update([0u8]);
    hasher.update(event_id.as_bytes());
    finish(hasher)
}

/// Hashes a key already joined as `destination ++ 0 ++ event id` (the sled tree's keys).
pub(super) fn joined_key_hash(key: &[u8]) -> KeyHash {
    finish(Sha256::new_with_prefix(key))
}

fn finish(hasher: Sha256) -> KeyHash {
    let digest = hasher.finalize();
    let mut hash = [0u8; 16];
    hash.copy_from_slice(&digest[..16]);
    // An all-zero hash would read as an empty slot.
    if hash == [0u8; 16] {
        hash[0] = 1;
    }
    hash
}

/// The records in memory, by how far they are on their way to the table file.
#[derive(Default)]
struct Records {
    /// Made, not committed yet.
    pending: PrehashedMap<KeyHash, u64>,
    /// Committed (in the log), not in the table file yet.
    memtable: PrehashedMap<KeyHash, u64>,
    /// Being written into the table file by a checkpoint.
    frozen: Option<Arc<PrehashedMap<KeyHash, u64>>>,
}

impl Records {
    fn get(&self, hash: &KeyHash) -> Option<u64> {
        self.pending
            .get(hash)
            .or_else(|| self.memtable.get(hash))
            .or_else(|| self.frozen.as_ref().and_then(|f| f.get(hash)))
            .copied()
    }
}

/// The log and what commits and checkpoints must do one at a time.
struct Log {
    wal: Wal,
    /// Logs whose records are in the memtable or frozen, not yet synced in the table file.
    retired: Vec<u64>,
    /// Set by [`DedupTable::close`]: the store was reopened, and another table now owns the
    /// files.
    closed: bool,
}

/// The dedup table of one open store.
pub(super) struct DedupTable {
    dir: PathBuf,
    /// `store.dedup_ttl`: an older record is expired.
    ttl_ms: u64,
    checkpoint_records: usize,
    current: RwLock<Arc<TableFile>>,
    records: Mutex<Records>,
    log: Mutex<Log>,
    /// Slots in use in the table file; only a checkpoint or a rebuild changes it.
    occupied: AtomicU64,
    /// Whether a checkpoint, a rebuild or a sweep runs (one at a time).
    maintaining: AtomicBool,
    /// Asks a running checkpoint or rebuild to give up (the store is closing or reopening).
    stop: AtomicBool,
}

/// The error of a checkpoint, rebuild or sweep that gave up because the store is closing or
/// reopening ([`DedupTable::stop_background`]): not a failure, and its records stay in their
/// log for the next instance.
fn stopped() -> io::Error {
    io::Error::new(
        io::ErrorKind::Interrupted,
        "stopped: the store is closing or reopening",
    )
}

/// Whether `error` is [`stopped`]'s (kept through [`io_context`]).
pub(super) fn is_stopped(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::Interrupted
}

fn io_context(what: &str, path: &Path, error: io::Error) -> io::Error {
    io::Error::new(
        error.kind(),
        format!("dedup table {}: {what}: {error}", path.display()),
    )
}

impl DedupTable {
    /// Opens the table in `dir`, creating it with room for `capacity_hint` records or more when
    /// there is none, and checkpoints the logs left by the last run. A rebuild that a crash
    /// interrupted is discarded (the old file is whole).
    pub(super) fn open(dir: &Path, capacity_hint: u64, ttl_ms: u64) -> io::Result<Arc<DedupTable>> {
        DedupTable::open_with(dir, capacity_hint, ttl_ms, CHECKPOINT_RECORDS)
    }

    fn open_with(
        dir: &Path,
        capacity_hint: u64,
        ttl_ms: u64,
        checkpoint_records: usize,
    ) -> io::Result<Arc<DedupTable>> {
        let path = dir.join(FILE_NAME);
        match std::fs::remove_file(dir.join(NEW_FILE_NAME)) {
            Ok(()) => {
                tracing::info!(dir = %dir.display(), "discarded an unfinished dedup table rebuild")
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_context("removing an unfinished rebuild", dir, e)),
        }
        let (table, occupied) = match TableFile::open(&path) {
            Ok(Some(found)) => found,
            Ok(None) => {
                // Written whole under another name, then renamed: a crash never leaves a table
                // without its header.
                let new_path = dir.join(NEW_FILE_NAME);
                let table = TableFile::create(&new_path, capacity_for(capacity_hint))
                    .and_then(|t| t.file.sync_all().map(|()| t))
                    .and_then(|t| std::fs::rename(&new_path, &path).map(|()| t))
                    .map_err(|e| io_context("creating", &path, e))?;
                sync_dir(dir);
                (table, 0)
            }
            Err(e) => return Err(io_context("opening", &path, e)),
        };
        let logs = wal::list(dir).map_err(|e| io_context("listing its logs", dir, e))?;
        let mut memtable = PrehashedMap::default();
        for seq in &logs {
            let records =
                wal::read(dir, *seq).map_err(|e| io_context("reading its log", dir, e))?;
            for (hash, at) in records {
                let at = memtable.get(&hash).map_or(at, |seen: &u64| at.max(*seen));
                memtable.insert(hash, at);
            }
        }
        let next = logs.last().map_or(0, |last| last + 1);
        let wal = Wal::create(dir, next).map_err(|e| io_context("creating its log", dir, e))?;
        let replayed = memtable.len();
        let opened = Arc::new(DedupTable {
            dir: dir.to_path_buf(),
            ttl_ms,
            checkpoint_records,
            current: RwLock::new(Arc::new(table)),
            records: Mutex::new(Records {
                memtable,
                ..Records::default()
            }),
            log: Mutex::new(Log {
                wal,
                retired: logs,
                closed: false,
            }),
            occupied: AtomicU64::new(occupied),
            maintaining: AtomicBool::new(true),
            stop: AtomicBool::new(false),
        });
        let checkpointed = opened.checkpoint(super::records::millis(std::time::SystemTime::now()));
        opened.maintaining.store(false, Ordering::SeqCst);
        if let Err(error) = checkpointed {
            // The logs this open made hold nothing; without this, an open that fails every few
            // seconds (a full disk) would leave two more each time.
            let last = opened.lock_log().wal.seq();
            for seq in next..=last {
                let _ = wal::remove_if_empty(dir, seq);
            }
            return Err(error);
        }
        if replayed > 0 {
            tracing::debug!(dir = %dir.display(), records = replayed, "dedup table logs replayed");
        }
        opened.scan_filter_in_background();
        Ok(opened)
    }

    /// Reads the table file opened from disk into its filter, in a thread of its own so that
    /// a large table does not hold up the start; until the scan is done, every lookup reads
    /// the file. Stops when the table closes.
    fn scan_filter_in_background(self: &Arc<Self>) {
        let table = self.table();
        if table.filter.is_complete() {
            // Made by this open, or rebuilt by its checkpoint: its filter saw every record.
            return;
        }
        let this = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("courier-dedup-scan".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                match table.scan_into_filter(&this.stop) {
                    Ok(()) => tracing::debug!(
                        capacity = table.capacity,
                        took = ?started.elapsed(),
                        "dedup table read into its filter"
                    ),
                    Err(error) if is_stopped(&error) => {}
                    Err(error) => tracing::warn!(
                        path = %this.path().display(),
                        %error,
                        "cannot read the dedup table into its filter; every dedup check reads the file"
                    ),
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start the dedup table's filter scan; every dedup check reads the file");
        }
    }

    /// Whether the current file's filter answers "absent" (its scan is done).
    pub(in crate::store) fn filter_complete(&self) -> bool {
        self.table().filter.is_complete()
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    fn table(&self) -> Arc<TableFile> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn lock_records(&self) -> std::sync::MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The delivery time recorded for `hash`: in memory, or in the file.
    pub(super) fn get(&self, hash: &KeyHash) -> io::Result<Option<u64>> {
        if let Some(at) = self.lock_records().get(hash) {
            return Ok(Some(at));
        }
        // Read after the records in memory: a checkpoint drops its frozen records only once
        // the file (this one, or the one a rebuild put in its place) holds them.
        self.table()
            .get(hash)
            .map_err(|e| io_context("reading", &self.path(), e))
    }

    /// Whether `hash` was recorded less than the TTL before `now_ms`.
    pub(super) fn is_delivered(&self, hash: &KeyHash, now_ms: u64) -> io::Result<bool> {
        Ok(self
            .get(hash)?
            .is_some_and(|at| is_live(at, now_ms, self.ttl_ms)))
    }

    /// Records a delivery at `at_ms`; durable after the next commit.
    pub(super) fn record(&self, hash: KeyHash, at_ms: u64) {
        self.lock_records().pending.insert(hash, at_ms);
    }

    /// Makes the records made before this call durable: appends them to the log and
    /// `fdatasync`s it. Once enough records wait for the table file, starts a checkpoint in
    /// `spawn_background`.
    pub(super) fn commit(
        self: &Arc<Self>,
        now_ms: u64,
        spawn_background: impl FnOnce(Box<dyn FnOnce() + Send>) -> bool,
    ) -> io::Result<()> {
        self.wait_for_room(now_ms)?;
        let checkpoint = {
            let mut log = self.lock_log();
            if log.closed {
                return Err(self.closed_error());
            }
            let batch: Vec<(KeyHash, u64)> = self
                .lock_records()
                .pending
                .iter()
                .map(|(h, at)| (*h, *at))
                .collect();
            if batch.is_empty() {
                return Ok(());
            }
            let wal_path = log.wal.path();
            log.wal
                .append(&batch)
                .map_err(|e| io_context("appending to its log", &wal_path, e))?;
            let mut records = self.lock_records();
            for (hash, at) in batch {
                // A record made again since the snapshot stays pending for the next commit.
                if records.pending.get(&hash) == Some(&at) {
                    records.pending.remove(&hash);
                }
                let newest = records.memtable.get(&hash).map_or(at, |seen| at.max(*seen));
                records.memtable.insert(hash, newest);
            }
            records.memtable.len() >= self.checkpoint_records
                && !self.maintaining.swap(true, Ordering::SeqCst)
        };
        if checkpoint {
            let table = Arc::clone(self);
            let started = spawn_background(Box::new(move || {
                let _release = Release(&table.maintaining);
                match table.checkpoint(now_ms) {
                    Ok(()) => {}
                    Err(error) if is_stopped(&error) => {
                        tracing::debug!(%error, "dedup table checkpoint stopped; its records stay in their log");
                    }
                    Err(error) => {
                        tracing::warn!(%error, "dedup table checkpoint failed; will try again at a later commit");
                    }
                }
            }));
            if !started {
                self.maintaining.store(false, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    /// Returns once fewer than [`MAX_WAITING_CHECKPOINTS`] checkpoints' worth of records wait for the table file: at
    /// once normally. When a burst outran the checkpoints (a rebuild of a large table, or a
    /// sweep, takes seconds), waits for the one under way, or runs one itself; fails when that
    /// one fails, and the caller's store-failure handling takes over.
    fn wait_for_room(&self, now_ms: u64) -> io::Result<()> {
        loop {
            let waiting = {
                let records = self.lock_records();
                records.memtable.len() + records.frozen.as_ref().map_or(0, |f| f.len())
            };
            if waiting < MAX_WAITING_CHECKPOINTS * self.checkpoint_records {
                return Ok(());
            }
            if self.maintaining.swap(true, Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(5));
                continue;
            }
            let _release = Release(&self.maintaining);
            self.checkpoint(now_ms).map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!("{waiting} dedup records wait for a checkpoint, which failed: {error}"),
                )
            })?;
        }
    }

    fn closed_error(&self) -> io::Error {
        io::Error::other(format!(
            "dedup table {}: closed by a reopen of the store",
            self.path().display()
        ))
    }

    /// Writes the memtable into the table file (growing the file when it would be more than
    /// half full), syncs it, and deletes the logs that held those records. The caller holds
    /// `maintaining`.
    fn checkpoint(&self, now_ms: u64) -> io::Result<()> {
        let (frozen, retired) = {
            let mut log = self.lock_log();
            if log.closed {
                return Err(self.closed_error());
            }
            if self.lock_records().memtable.is_empty() {
                // Every record of the retired logs is in the file already (or they were
                // empty): nothing to write, only logs to delete.
                let retired = std::mem::take(&mut log.retired);
                drop(log);
                for seq in retired {
                    wal::remove(&self.dir, seq)
                        .map_err(|e| io_context("removing an empty log", &self.dir, e))?;
                }
                return Ok(());
            }
            // The new log first: when it cannot be made, nothing has moved.
            let next = Wal::create(&self.dir, log.wal.seq() + 1)
                .map_err(|e| io_context("creating its log", &self.dir, e))?;
            let old = std::mem::replace(&mut log.wal, next);
            log.retired.push(old.seq());
            let mut records = self.lock_records();
            let frozen = Arc::new(std::mem::take(&mut records.memtable));
            records.frozen = Some(Arc::clone(&frozen));
            (frozen, log.retired.clone())
        };
        match self.write_frozen(&frozen, now_ms) {
            Ok(()) => {
                self.lock_records().frozen = None;
                let mut log = self.lock_log();
                log.retired.retain(|seq| !retired.contains(seq));
                drop(log);
                for seq in retired {
                    wal::remove(&self.dir, seq)
                        .map_err(|e| io_context("removing a checkpointed log", &self.dir, e))?;
                }
                Ok(())
            }
            Err(error) => {
                // Back into the memtable, for the next checkpoint; their logs stay.
                let mut records = self.lock_records();
                records.frozen = None;
                for (hash, at) in frozen.iter() {
                    let newest = records.memtable.get(hash).map_or(*at, |m| (*at).max(*m));
                    records.memtable.insert(*hash, newest);
                }
                Err(error)
            }
        }
    }

    fn write_frozen(&self, frozen: &PrehashedMap<KeyHash, u64>, now_ms: u64) -> io::Result<()> {
        let mut batch: Vec<(KeyHash, u64)> = frozen.iter().map(|(h, at)| (*h, *at)).collect();
        let table = self.table();
        let occupied = self.occupied.load(Ordering::SeqCst);
        let incoming = batch.len() as u64;
        if (occupied + incoming).saturating_mul(2) > table.capacity {
            return self.rebuild(capacity_for(occupied + incoming), now_ms, batch);
        }
        let path = self.path();
        let written = table
            .apply(&mut batch, now_ms, self.ttl_ms, &self.stop)
            .map_err(|e| io_context("writing", &path, e))
            .and_then(|taken| {
                table
                    .write_header(occupied + taken)
                    .map_err(|e| io_context("writing the header", &path, e))?;
                table
                    .file
                    .sync_data()
                    .map_err(|e| io_context("syncing", &path, e))?;
                Ok(taken)
            });
        match written {
            Ok(taken) => {
                self.occupied.store(occupied + taken, Ordering::SeqCst);
                Ok(())
            }
            Err(error) => {
                // Some of the batch may be in the file already, where the next try finds it in
                // its own slot and does not count it again: count it all now. Too high a count
                // only makes the table grow sooner.
                self.occupied.store(occupied + incoming, Ordering::SeqCst);
                Err(error)
            }
        }
    }

    /// Writes a new file of `capacity` slots with the live records of the table and `extra`,
    /// syncs it and renames it over the table. The caller holds `maintaining`.
    fn rebuild(
        &self,
        capacity: u64,
        now_ms: u64,
        mut extra: Vec<(KeyHash, u64)>,
    ) -> io::Result<()> {
        let new_path = self.dir.join(NEW_FILE_NAME);
        let ctx = |what: &'static str| {
            let new_path = new_path.clone();
            move |e| io_context(what, &new_path, e)
        };
        let started = std::time::Instant::now();
        let old = self.table();
        let result = (|| {
            let new = TableFile::create(&new_path, capacity).map_err(ctx("creating"))?;
            let mut occupied = 0u64;
            let mut chunk = Vec::with_capacity(SCAN_SLOTS);
            old.for_each_record(&self.stop, |hash, at| {
                if is_live(at, now_ms, self.ttl_ms) {
                    chunk.push((*hash, at));
                }
                if chunk.len() >= SCAN_SLOTS {
                    occupied += new.apply(&mut chunk, now_ms, self.ttl_ms, &self.stop)?;
                    chunk.clear();
                }
                Ok(())
            })
            .map_err(ctx("copying records"))?;
            occupied += new
                .apply(&mut chunk, now_ms, self.ttl_ms, &self.stop)
                .map_err(ctx("copying records"))?;
            // After the file's records, so that a key in both keeps the newer time.
            occupied += new
                .apply(&mut extra, now_ms, self.ttl_ms, &self.stop)
                .map_err(ctx("writing"))?;
            new.write_header(occupied)
                .map_err(ctx("writing the header"))?;
            new.file.sync_all().map_err(ctx("syncing"))?;
            let log = self.lock_log();
            if log.closed {
                return Err(self.closed_error());
            }
            std::fs::rename(&new_path, self.path()).map_err(ctx("renaming"))?;
            sync_dir(&self.dir);
            *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
            self.occupied.store(occupied, Ordering::SeqCst);
            drop(log);
            Ok(occupied)
        })();
        match result {
            Ok(records) => {
                tracing::info!(
                    from = old.capacity,
                    to = capacity,
                    records,
                    took = ?started.elapsed(),
                    "dedup table rebuilt"
                );
                Ok(())
            }
            Err(error) => {
                // Once closed, the file of that name may be the new instance's.
                if !self.lock_log().closed {
                    let _ = std::fs::remove_file(&new_path);
                }
                Err(error)
            }
        }
    }

    /// Live records: in memory or in the file, and younger than the TTL. Reads the whole file.
    pub(super) fn live_count(&self, now_ms: u64) -> io::Result<usize> {
        let ttl_ms = self.ttl_ms;
        let mut in_memory: HashMap<KeyHash, u64> = HashMap::new();
        {
            let records = self.lock_records();
            let frozen = records.frozen.iter().flat_map(|f| f.iter());
            for (hash, at) in records
                .pending
                .iter()
                .chain(&records.memtable)
                .chain(frozen)
            {
                in_memory.insert(*hash, *at);
            }
        }
        let mut count = in_memory
            .values()
            .filter(|at| is_live(**at, now_ms, ttl_ms))
            .count();
        let never = AtomicBool::new(false);
        self.table()
            .for_each_record(&never, |hash, at| {
                if is_live(at, now_ms, ttl_ms) && !in_memory.contains_key(hash) {
                    count += 1;
                }
                Ok(())
            })
            .map_err(|e| io_context("counting", &self.path(), e))?;
        Ok(count)
    }

    /// The dedup sweep: when expired records in the file are at least as many as live ones,
    /// rebuilds it without them (at the size its live records need) and returns how many it
    /// dropped. Skips a round while a checkpoint or a rebuild runs.
    pub(super) fn sweep(&self, now_ms: u64) -> io::Result<usize> {
        if self.maintaining.swap(true, Ordering::SeqCst) {
            return Ok(0);
        }
        // Released however the sweep ends: left set by a panic, no checkpoint would run again.
        let _release = Release(&self.maintaining);
        self.sweep_claimed(now_ms)
    }

    fn sweep_claimed(&self, now_ms: u64) -> io::Result<usize> {
        let (mut live, mut expired) = (0u64, 0usize);
        self.table()
            .for_each_record(&self.stop, |_, at| {
                if is_live(at, now_ms, self.ttl_ms) {
                    live += 1;
                } else {
                    expired += 1;
                }
                Ok(())
            })
            .map_err(|e| io_context("sweeping", &self.path(), e))?;
        if expired == 0 || (expired as u64) < live {
            return Ok(0);
        }
        self.rebuild(capacity_for(live), now_ms, Vec::new())?;
        Ok(expired)
    }

    /// Asks a running checkpoint or rebuild to stop; the table keeps answering.
    pub(super) fn stop_background(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// For a reopen of the store: after this, commits, checkpoints and rebuilds of this
    /// instance fail, so only the table the reopen opens writes to the files. A checkpoint or
    /// rebuild under way stops at its next write; [`DedupTable::busy`] says when it has.
    pub(super) fn close(&self) {
        self.stop_background();
        self.lock_log().closed = true;
    }

    /// Whether a checkpoint, a rebuild or a sweep still runs: a reopen waits for it to stop
    /// before another instance opens the same file.
    pub(super) fn busy(&self) -> bool {
        self.maintaining.load(Ordering::SeqCst)
    }
}

/// Clears a `maintaining` flag when dropped, so that a checkpoint that fails or panics lets the
/// next one start.
struct Release<'a>(&'a AtomicBool);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Makes a rename in `dir` survive a power loss. Best effort, as for the store's own directory
/// entries: some filesystems refuse to sync a directory.
fn sync_dir(dir: &Path) {
    if let Err(error) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), %error, "cannot sync the store directory after renaming the dedup table");
    }
}

/// The smallest power of two that holds `records` at most a quarter full, and at least
/// [`INITIAL_CAPACITY`].
fn capacity_for(records: u64) -> u64 {
    records
        .saturating_mul(4)
        .max(INITIAL_CAPACITY)
        .checked_next_power_of_two()
        .unwrap_or(1 << 62)
}

#[cfg(test)]
mod tests;
