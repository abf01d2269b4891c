//! What the store holds and how it is read and written: the dedup record (in the dedup table,
//! `dedup_table/`), the retry tree and its index, and the dead-letter tree. Each write is an
//! in-memory insert, durable after the next commit (see `commit.rs`).

use std::time::SystemTime;

use super::db::Handles;
use super::dedup_table::{key_hash, DedupTable};
use super::records::{millis, DeadLetter, LetterKey, RetryRecord};
use super::{Store, StoreError};

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

impl Store {
    pub(super) fn handles(&self) -> Result<std::sync::Arc<Handles>, StoreError> {
        self.inner.db.handles()
    }

    fn err(&self, source: sled::Error) -> StoreError {
        StoreError::Sled {
            path: self.inner.db.path().to_string(),
            source,
        }
    }

    fn io_err(&self, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: self.inner.db.path().to_string(),
            source,
        }
    }

    fn corrupt(&self, message: String) -> StoreError {
        StoreError::Corrupt {
            path: self.inner.db.path().to_string(),
            message,
        }
    }

    /// Counts a write to one of sled's trees: the next commit flushes sled.
    fn wrote(&self, h: &Handles) {
        h.sled_dirty
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.commits.wrote();
    }

    /// The dedup table, which a store with `dedup = "redis"` does not have. The store asks
    /// Redis then and never comes here; should it, the error says so instead of a silent miss.
    fn dedup_table<'h>(&self, h: &'h Handles) -> Result<&'h DedupTable, StoreError> {
        h.dedup.as_deref().ok_or_else(|| {
            StoreError::Redis(format!(
                "store {} keeps its dedup record in Redis (store.dedup = \"redis\"), not in a dedup table",
                self.inner.db.path()
            ))
        })
    }

    /// Whether the dedup check of an event that was never delivered is answered from memory.
    /// A store opened from disk reads its dedup table into the table's filter in the
    /// background, and until then each such check reads the file; this says when that ended.
    /// False with `dedup = "redis"` (no table) and while a failed store waits to be reopened.
    pub fn dedup_filter_ready(&self) -> bool {
        self.handles()
            .ok()
            .and_then(|h| h.dedup.as_ref().map(|table| table.filter_complete()))
            .unwrap_or(false)
    }

    /// Whether `event_id` was delivered with a 2xx to `destination` within the dedup TTL,
    /// by the dedup table.
    pub(super) fn local_is_delivered(
        &self,
        destination: &str,
        event_id: &str,
    ) -> Result<bool, StoreError> {
        let h = self.handles()?;
        self.dedup_table(&h)?
            .is_delivered(&key_hash(destination, event_id), millis(SystemTime::now()))
            .map_err(|e| self.io_err(e))
    }

    /// Remembers a 2xx delivery in the dedup table. Durable after the next commit.
    pub(super) fn local_record_delivered(
        &self,
        destination: &str,
        event_id: &str,
    ) -> Result<(), StoreError> {
        let h = self.handles()?;
        self.dedup_table(&h)?
            .record(key_hash(destination, event_id), millis(SystemTime::now()));
        self.inner.commits.wrote();
        Ok(())
    }

    /// Adds a dead letter. Durable after the next commit.
    pub fn dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        let h = self.handles()?;
        self.dead_letter_in(&h, letter)?;
        self.wrote(&h);
        Ok(())
    }

    /// Adds a dead letter in place of retry entry `old`, both in the same open store: a reopen
    /// (after a disk failure) between two separate writes would keep the second and lose the
    /// first, and the event with it. Durable after the next commit.
    pub fn dead_letter_in_place_of(
        &self,
        letter: &DeadLetter,
        old: &RetryRecord,
    ) -> Result<(), StoreError> {
        let h = self.handles()?;
        self.dead_letter_in(&h, letter)?;
        self.remove_retry_record_in(&h, old)?;
        self.wrote(&h);
        Ok(())
    }

    fn dead_letter_in(&self, h: &Handles, letter: &DeadLetter) -> Result<(), StoreError> {
        let seq = h.db.generate_id().map_err(|e| self.err(e))?;
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&letter.at_ms.to_be_bytes());
        key[8..].copy_from_slice(&seq.to_be_bytes());
        let value = serde_json::to_vec(letter).map_err(|e| StoreError::Corrupt {
            path: self.inner.db.path().to_string(),
            message: e.to_string(),
        })?;
        if h.dead
            .insert(key, value)
            .map_err(|e| self.err(e))?
            .is_none()
        {
            h.counts.dead_added();
        }
        Ok(())
    }

    /// Schedules (or re-schedules) the retry of one event at one destination; an earlier pending
    /// retry of the same pair is replaced. Durable after the next commit.
    pub fn schedule_retry(&self, record: &RetryRecord) -> Result<(), StoreError> {
        let h = self.handles()?;
        self.schedule_retry_in(&h, record)?;
        self.wrote(&h);
        Ok(())
    }

    /// Schedules `new` in place of retry entry `old` (removed by its own key: it may be an
    /// entry the index lost track of), both in the same open store, as
    /// [`Store::dead_letter_in_place_of`]. Durable after the next commit.
    pub fn replace_retry(&self, old: &RetryRecord, new: &RetryRecord) -> Result<(), StoreError> {
        let h = self.handles()?;
        self.schedule_retry_in(&h, new)?;
        if old.key() != new.key() {
            self.remove_retry_record_in(&h, old)?;
        }
        self.wrote(&h);
        Ok(())
    }

    fn schedule_retry_in(&self, h: &Handles, record: &RetryRecord) -> Result<(), StoreError> {
        let key = record.key();
        let pair = dedup_key(&record.destination, &record.event.id);
        let value = serde_json::to_vec(record).map_err(|e| self.corrupt(e.to_string()))?;
        // Entry first, index second: a crash in between leaves an entry the index does not know,
        // which the scheduler still attempts and then removes by its own key.
        h.retries
            .insert(key.as_slice(), value)
            .map_err(|e| self.err(e))?;
        match h
            .retry_index
            .insert(pair.as_slice(), key.as_slice())
            .map_err(|e| self.err(e))?
        {
            Some(old) => {
                if old.as_ref() != key.as_slice() {
                    h.retries.remove(old).map_err(|e| self.err(e))?;
                }
            }
            None => h.counts.retry_added(&record.destination),
        }
        Ok(())
    }

    /// Drops the pending retry of `event_id` at `destination`, if any.
    pub fn remove_retry(&self, destination: &str, event_id: &str) -> Result<(), StoreError> {
        let h = self.handles()?;
        let pair = dedup_key(destination, event_id);
        if let Some(key) = h.retry_index.remove(pair).map_err(|e| self.err(e))? {
            h.counts.retry_removed(destination);
            h.retries.remove(key).map_err(|e| self.err(e))?;
        }
        self.wrote(&h);
        Ok(())
    }

    /// Drops exactly this entry (found by its own key, so also one the index lost track of) and
    /// the index entry if it points here.
    pub fn remove_retry_record(&self, record: &RetryRecord) -> Result<(), StoreError> {
        let h = self.handles()?;
        self.remove_retry_record_in(&h, record)?;
        self.wrote(&h);
        Ok(())
    }

    fn remove_retry_record_in(&self, h: &Handles, record: &RetryRecord) -> Result<(), StoreError> {
        let key = record.key();
        h.retries.remove(key.as_slice()).map_err(|e| self.err(e))?;
        let pair = dedup_key(&record.destination, &record.event.id);
        let swapped = h
            .retry_index
            .compare_and_swap(pair, Some(key.as_slice()), None::<&[u8]>)
            .map_err(|e| self.err(e))?;
        if swapped.is_ok() {
            h.counts.retry_removed(&record.destination);
        }
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

    /// Destinations that have pending retries.
    pub fn retry_destinations(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .pending_retries_by_destination()?
            .into_iter()
            .map(|(name, _)| name)
            .collect())
    }

    /// Pending retries per destination, by name; a destination that a reload removed is listed
    /// too, its retries kept until it comes back.
    pub fn pending_retries_by_destination(&self) -> Result<Vec<(String, usize)>, StoreError> {
        Ok(self.handles()?.counts.retries())
    }

    /// Dead letters kept.
    pub fn dead_letter_count(&self) -> usize {
        self.handles().map(|h| h.counts.dead()).unwrap_or(0)
    }

    /// Pending retries.
    pub fn pending_retries(&self) -> usize {
        self.handles()
            .map(|h| h.counts.retries_total())
            .unwrap_or(0)
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

    /// Replaces the dead letter stored under `key` (its hex form, as listed), if it is still
    /// there; returns whether it was. A replay that failed must not bring back a letter a purge
    /// removed while the attempt ran.
    pub fn update_dead_letter(&self, letter: &DeadLetter) -> Result<bool, StoreError> {
        let h = self.handles()?;
        let key = unhex(&letter.key)
            .ok_or_else(|| self.corrupt(format!("bad dead-letter key {:?}", letter.key)))?;
        let value = serde_json::to_vec(letter).map_err(|e| self.corrupt(e.to_string()))?;
        let was = h
            .dead
            .fetch_and_update(key, |old| old.map(|_| value.clone()))
            .map_err(|e| self.err(e))?;
        if was.is_some() {
            self.wrote(&h);
        }
        Ok(was.is_some())
    }

    /// Removes the dead letter stored under `key` (its hex form, as listed).
    pub fn remove_dead_letter(&self, key: &str) -> Result<bool, StoreError> {
        let h = self.handles()?;
        let raw = unhex(key).ok_or_else(|| self.corrupt(format!("bad dead-letter key {key:?}")))?;
        let removed = h.dead.remove(raw).map_err(|e| self.err(e))?.is_some();
        if removed {
            h.counts.dead_removed();
            self.wrote(&h);
        }
        Ok(removed)
    }

    /// Every dead letter, oldest first (for tests and small stores: it holds them all in memory).
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        self.scan_dead_letters(None, None, usize::MAX, |_| true)
    }

    /// Up to `limit` dead letters that `keep` accepts, oldest first, from just after `after`
    /// (from the oldest when `None`) up to and including `until`. Reads the tree one letter at
    /// a time, so a command on a large tree holds one page in memory, not the tree.
    pub fn scan_dead_letters(
        &self,
        after: Option<&LetterKey>,
        until: Option<&LetterKey>,
        limit: usize,
        keep: impl FnMut(&DeadLetter) -> bool,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.scan_dead_letters_for(after, until, limit, usize::MAX, keep)
            .map(|(letters, _)| letters)
    }

    /// As [`Store::scan_dead_letters`], reading at most `visits` letters; also returns the key
    /// of the last letter read when the scan stopped before the end (at `limit` or `visits`),
    /// where the next scan goes on. A caller on the async runtime yields between such scans, so
    /// a filter that matches few of many letters never holds a runtime thread for long.
    pub fn scan_dead_letters_for(
        &self,
        after: Option<&LetterKey>,
        until: Option<&LetterKey>,
        limit: usize,
        visits: usize,
        mut keep: impl FnMut(&DeadLetter) -> bool,
    ) -> Result<(Vec<DeadLetter>, Option<LetterKey>), StoreError> {
        use std::ops::Bound;
        let h = self.handles()?;
        let mut out = Vec::new();
        if limit == 0 {
            return Ok((out, after.copied()));
        }
        let lower = after.map_or(Bound::Unbounded, |k| Bound::Excluded(k.0));
        let upper = until.map_or(Bound::Unbounded, |k| Bound::Included(k.0));
        let mut visited = 0usize;
        for item in h.dead.range::<[u8; 16], _>((lower, upper)) {
            let (key, value) = item.map_err(|e| self.err(e))?;
            visited += 1;
            let mut letter: DeadLetter =
                serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt {
                    path: self.inner.db.path().to_string(),
                    message: format!("dead letter {}: {e}", hex(&key)),
                })?;
            letter.key = hex(&key);
            let last = <[u8; 16]>::try_from(key.as_ref()).ok().map(LetterKey);
            if keep(&letter) {
                out.push(letter);
            }
            if out.len() >= limit || visited >= visits {
                return Ok((out, last));
            }
        }
        Ok((out, None))
    }

    /// The key of the newest dead letter: where a replay or a purge stops, so that letters
    /// dead-lettered while it runs are not taken into it.
    pub fn newest_dead_letter(&self) -> Result<Option<LetterKey>, StoreError> {
        let h = self.handles()?;
        let last = h.dead.last().map_err(|e| self.err(e))?;
        Ok(last.and_then(|(key, _)| <[u8; 16]>::try_from(key.as_ref()).ok().map(LetterKey)))
    }

    /// Drops expired dedup records when they hold most of the dedup table's slots in use (a
    /// rebuild of the table); returns how many. Runs in the background.
    pub fn sweep_expired(&self) -> Result<usize, StoreError> {
        let h = self.handles()?;
        let Some(dedup) = &h.dedup else {
            return Ok(0);
        };
        dedup
            .sweep(millis(SystemTime::now()))
            .map_err(|e| self.io_err(e))
    }

    /// Number of remembered deliveries within the TTL (for logs and tests; reads the whole
    /// dedup table).
    pub fn delivered_count(&self) -> usize {
        self.handles()
            .and_then(|h| match &h.dedup {
                Some(dedup) => dedup
                    .live_count(millis(SystemTime::now()))
                    .map_err(|e| self.io_err(e)),
                None => Ok(0),
            })
            .unwrap_or(0)
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
