//! The dedup table's file: its layout, a lookup, and the batched writes of a checkpoint or a
//! rebuild.
//!
//! - a 4 KiB header: magic, capacity (a power of two), slots in use;
//! - `capacity` slots of 32 bytes: the key hash (16 bytes), the delivery time (Unix
//!   milliseconds, u64 LE), a CRC-32 of those 24 bytes, 4 bytes of padding. A zero slot is
//!   empty. A key's home slot is its hash's first 8 bytes modulo the capacity, and a key lives
//!   in the first slot from its home on that holds it or is empty (linear probing).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::filter::Filter;
use super::KeyHash;

const MAGIC: &[u8; 16] = b"courier-dedup-1\n";
const HEADER: u64 = 4096;
pub(super) const SLOT: usize = 32;
const PAGE: usize = 4096;
const SLOTS_PER_PAGE: u64 = (PAGE / SLOT) as u64;
/// Slots read per positioned read of a lookup: at most half of the slots are in use, so a
/// probe nearly always ends within the first read.
const PROBE_READ: usize = 8;
/// Slots read per read while a rebuild or a count scans the table (1 MiB).
pub(super) const SCAN_SLOTS: usize = 32 * 1024;
/// Pages a batched write keeps before it writes them back (1 MiB).
const DIRTY_PAGES: usize = 256;

/// What a slot holds.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Slot {
    Empty,
    /// A record: key hash and delivery time.
    Record(KeyHash, u64),
    /// Bytes whose CRC does not match: a torn or damaged write, which a probe passes over.
    Damaged,
}

fn decode(bytes: &[u8]) -> Slot {
    if bytes.iter().all(|b| *b == 0) {
        return Slot::Empty;
    }
    let crc = u32::from_le_bytes([bytes[24], bytes[25], bytes[26], bytes[27]]);
    if crc32fast::hash(&bytes[..24]) != crc {
        return Slot::Damaged;
    }
    let mut hash = [0u8; 16];
    hash.copy_from_slice(&bytes[..16]);
    let mut at = [0u8; 8];
    at.copy_from_slice(&bytes[16..24]);
    Slot::Record(hash, u64::from_le_bytes(at))
}

/// The record in `bytes` (one slot's worth), or `None` for an empty or damaged slot.
pub(super) fn decode_record(bytes: &[u8]) -> Option<(KeyHash, u64)> {
    match decode(bytes) {
        Slot::Record(hash, at) => Some((hash, at)),
        Slot::Empty | Slot::Damaged => None,
    }
}

pub(super) fn encode(hash: &KeyHash, at_ms: u64) -> [u8; SLOT] {
    let mut bytes = [0u8; SLOT];
    bytes[..16].copy_from_slice(hash);
    bytes[16..24].copy_from_slice(&at_ms.to_le_bytes());
    let crc = crc32fast::hash(&bytes[..24]);
    bytes[24..28].copy_from_slice(&crc.to_le_bytes());
    bytes
}

pub(super) fn is_live(at_ms: u64, now_ms: u64, ttl_ms: u64) -> bool {
    now_ms.saturating_sub(at_ms) < ttl_ms
}

/// One table file.
pub(super) struct TableFile {
    pub(super) file: File,
    pub(super) capacity: u64,
    /// Which keys the file may hold: a lookup of any other reads nothing.
    pub(super) filter: Filter,
    /// Positioned reads made by lookups.
    #[cfg(test)]
    pub(super) lookup_reads: std::sync::atomic::AtomicU64,
}

impl TableFile {
    /// Creates `path` empty with `capacity` slots, replacing what is there. Every byte is
    /// written (zeros), not left a hole: a slot write then never needs a new disk block, so a
    /// full disk cannot fail a checkpoint once the table exists.
    pub(super) fn create(path: &Path, capacity: u64) -> io::Result<TableFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let len = HEADER + capacity * SLOT as u64;
        let zeros = vec![0u8; (1 << 20).min(len) as usize];
        let mut at = 0u64;
        while at < len {
            let n = (zeros.len() as u64).min(len - at) as usize;
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        let table = TableFile {
            file,
            capacity,
            filter: Filter::new(capacity, true),
            #[cfg(test)]
            lookup_reads: Default::default(),
        };
        table.write_header(0)?;
        Ok(table)
    }

    /// Opens `path` and reads its header (capacity, slots in use); `Ok(None)` when there is
    /// no such file.
    pub(super) fn open(path: &Path) -> io::Result<Option<(TableFile, u64)>> {
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let invalid = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{what}; move the file away to start an empty dedup record (events delivered within store.dedup_ttl may then be POSTed again)"),
            )
        };
        let len = file.metadata()?.len();
        if len < HEADER {
            return Err(invalid(
                "not a courier dedup table (shorter than its header)",
            ));
        }
        let mut header = [0u8; 32];
        file.read_exact_at(&mut header, 0)?;
        if &header[..16] != MAGIC {
            return Err(invalid("not a courier dedup table (bad magic)"));
        }
        let word = |at: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&header[at..at + 8]);
            u64::from_le_bytes(bytes)
        };
        let (capacity, occupied) = (word(16), word(24));
        if !capacity.is_power_of_two() || capacity < SLOTS_PER_PAGE {
            return Err(invalid(
                "capacity is not a power of two of at least one page",
            ));
        }
        if len < HEADER + capacity * SLOT as u64 {
            return Err(invalid("file shorter than its capacity says"));
        }
        // Incomplete until [`TableFile::scan_into_filter`] has read the records on disk.
        let filter = Filter::new(capacity, false);
        Ok(Some((
            TableFile {
                file,
                capacity,
                filter,
                #[cfg(test)]
                lookup_reads: Default::default(),
            },
            occupied,
        )))
    }

    pub(super) fn write_header(&self, occupied: u64) -> io::Result<()> {
        let mut header = [0u8; 32];
        header[..16].copy_from_slice(MAGIC);
        header[16..24].copy_from_slice(&self.capacity.to_le_bytes());
        header[24..32].copy_from_slice(&occupied.to_le_bytes());
        self.file.write_all_at(&header, 0)
    }

    pub(super) fn home(&self, hash: &KeyHash) -> u64 {
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash[..8]);
        u64::from_le_bytes(first) & (self.capacity - 1)
    }

    pub(super) fn offset(index: u64) -> u64 {
        HEADER + index * SLOT as u64
    }

    /// The delivery time recorded for `hash`, if any: nothing when the filter rules the key
    /// out, else reads a few slots at a time from the home slot on until it finds the key or
    /// an empty slot.
    pub(super) fn get(&self, hash: &KeyHash) -> io::Result<Option<u64>> {
        if !self.filter.may_hold(hash) {
            return Ok(None);
        }
        let mut index = self.home(hash);
        let mut seen = 0u64;
        let mut buf = [0u8; SLOT * PROBE_READ];
        while seen < self.capacity {
            let run = (PROBE_READ as u64)
                .min(self.capacity - index)
                .min(self.capacity - seen) as usize;
            let bytes = &mut buf[..run * SLOT];
            #[cfg(test)]
            self.lookup_reads.fetch_add(1, Ordering::Relaxed);
            self.file.read_exact_at(bytes, Self::offset(index))?;
            for slot in bytes.chunks_exact(SLOT) {
                match decode(slot) {
                    Slot::Record(h, at) if h == *hash => return Ok(Some(at)),
                    Slot::Empty => return Ok(None),
                    _ => {}
                }
            }
            seen += run as u64;
            index = (index + run as u64) & (self.capacity - 1);
        }
        Ok(None)
    }

    /// Writes `records` into their slots (not synced), in the order of their home slots and a
    /// page at a time, so that records sharing a page cost one read and one write of it.
    /// Returns how many empty slots they took. Gives up, between two writes, once `stop` is set.
    pub(super) fn apply(
        &self,
        records: &mut [(KeyHash, u64)],
        now_ms: u64,
        ttl_ms: u64,
        stop: &AtomicBool,
    ) -> io::Result<u64> {
        records.sort_unstable_by_key(|(hash, _)| self.home(hash));
        let mut pages = Pages {
            table: self,
            cached: HashMap::new(),
        };
        let mut taken = 0;
        for (hash, at) in records.iter() {
            // Before the write: a lookup that no longer finds the record in memory must not
            // be told it is absent.
            self.filter.insert(hash);
            if pages.put(hash, *at, now_ms, ttl_ms)? {
                taken += 1;
            }
            if pages.cached.len() >= DIRTY_PAGES {
                if stop.load(Ordering::SeqCst) {
                    return Err(super::stopped());
                }
                pages.write_back()?;
            }
        }
        if stop.load(Ordering::SeqCst) {
            return Err(super::stopped());
        }
        pages.write_back()?;
        Ok(taken)
    }

    /// Reads every record on disk into the filter, then lets the filter answer "absent".
    /// Records written meanwhile set their own bits.
    pub(super) fn scan_into_filter(&self, stop: &AtomicBool) -> io::Result<()> {
        self.for_each_record(stop, |hash, _| {
            self.filter.insert(hash);
            Ok(())
        })?;
        self.filter.set_complete();
        Ok(())
    }

    /// Calls `visit` with every record, in slot order, until `stop` is set.
    pub(super) fn for_each_record(
        &self,
        stop: &AtomicBool,
        mut visit: impl FnMut(&KeyHash, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut buf = vec![0u8; SCAN_SLOTS * SLOT];
        let mut index = 0u64;
        while index < self.capacity {
            if stop.load(Ordering::SeqCst) {
                return Err(super::stopped());
            }
            let run = (SCAN_SLOTS as u64).min(self.capacity - index) as usize;
            let bytes = &mut buf[..run * SLOT];
            self.file.read_exact_at(bytes, Self::offset(index))?;
            for chunk in bytes.chunks_exact(SLOT) {
                if let Slot::Record(hash, at) = decode(chunk) {
                    visit(&hash, at)?;
                }
            }
            index += run as u64;
        }
        Ok(())
    }
}

/// The pages a batched write has read, changed or not, until it writes them back.
struct Pages<'a> {
    table: &'a TableFile,
    cached: HashMap<u64, (Box<[u8; PAGE]>, bool)>,
}

impl Pages<'_> {
    fn page(&mut self, page: u64) -> io::Result<&mut (Box<[u8; PAGE]>, bool)> {
        if !self.cached.contains_key(&page) {
            let mut bytes = Box::new([0u8; PAGE]);
            self.table
                .file
                .read_exact_at(&mut bytes[..], HEADER + page * PAGE as u64)?;
            self.cached.insert(page, (bytes, false));
        }
        self.cached
            .get_mut(&page)
            .ok_or_else(|| io::Error::other("page cache lost a page it just read"))
    }

    fn slot(&mut self, index: u64) -> io::Result<Slot> {
        let at = (index % SLOTS_PER_PAGE) as usize * SLOT;
        let (bytes, _) = self.page(index / SLOTS_PER_PAGE)?;
        Ok(decode(&bytes[at..at + SLOT]))
    }

    fn set(&mut self, index: u64, slot: &[u8; SLOT]) -> io::Result<()> {
        let at = (index % SLOTS_PER_PAGE) as usize * SLOT;
        let (bytes, dirty) = self.page(index / SLOTS_PER_PAGE)?;
        bytes[at..at + SLOT].copy_from_slice(slot);
        *dirty = true;
        Ok(())
    }

    /// Puts a record for `hash`: over its own slot, else over the first expired or damaged
    /// slot on its probe path, else into the empty slot that ends it. Returns whether an empty
    /// slot was taken.
    fn put(&mut self, hash: &KeyHash, at_ms: u64, now_ms: u64, ttl_ms: u64) -> io::Result<bool> {
        let capacity = self.table.capacity;
        let mut index = self.table.home(hash);
        let mut reusable = None;
        let mut target = None;
        for _ in 0..capacity {
            match self.slot(index)? {
                Slot::Record(h, at) if h == *hash => {
                    if at >= at_ms {
                        // Already there, as new or newer.
                        return Ok(false);
                    }
                    target = Some((index, false));
                    break;
                }
                Slot::Record(_, at) if is_live(at, now_ms, ttl_ms) => {}
                Slot::Record(..) | Slot::Damaged => {
                    reusable.get_or_insert(index);
                }
                Slot::Empty => {
                    target = Some(match reusable {
                        Some(r) => (r, false),
                        None => (index, true),
                    });
                    break;
                }
            }
            index = (index + 1) & (capacity - 1);
        }
        let (index, took_empty) = match (target, reusable) {
            (Some(t), _) => t,
            (None, Some(r)) => (r, false),
            (None, None) => {
                return Err(io::Error::other(
                    "dedup table full: every slot holds a live record",
                ))
            }
        };
        self.set(index, &encode(hash, at_ms))?;
        Ok(took_empty)
    }

    /// Writes the changed pages back, runs of adjacent pages in one write, and forgets them all.
    fn write_back(&mut self) -> io::Result<()> {
        let mut dirty: Vec<(u64, Box<[u8; PAGE]>)> = self
            .cached
            .drain()
            .filter(|(_, (_, dirty))| *dirty)
            .map(|(page, (bytes, _))| (page, bytes))
            .collect();
        dirty.sort_unstable_by_key(|(page, _)| *page);
        let mut run: Vec<u8> = Vec::new();
        let mut run_start = 0u64;
        for (page, bytes) in dirty {
            let next = run_start + (run.len() / PAGE) as u64;
            if !run.is_empty() && page != next {
                self.table
                    .file
                    .write_all_at(&run, HEADER + run_start * PAGE as u64)?;
                run.clear();
            }
            if run.is_empty() {
                run_start = page;
            }
            run.extend_from_slice(&bytes[..]);
        }
        if !run.is_empty() {
            self.table
                .file
                .write_all_at(&run, HEADER + run_start * PAGE as u64)?;
        }
        Ok(())
    }
}
