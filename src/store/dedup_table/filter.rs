//! A Bloom filter of the key hashes a table file holds, so that the lookup of a key it does
//! not hold (every new event, the common case) reads nothing from the file.
//!
//! Why: a positioned read is a system call, and a check that costs one per delivery was about
//! a twentieth of courier's CPU per delivery (docs/performance.md). The filter answers "not in
//! the file" for most such keys from memory; "maybe" still reads the file, so an answer is
//! never wrong, only sometimes slower.
//!
//! - 4 bits per slot of the table (1/64 of the file's size), 3 bits per key: a file at most half
//!   full (as the table keeps it) answers "maybe" for about 3 % of the keys it does not hold.
//! - Every record written into the file sets its bits first ([`super::file::TableFile::apply`]),
//!   and bits are never cleared: an expired or overwritten record's bits only cost a read.
//! - A file opened from disk is read once by a scan in the background; until the scan has
//!   seen every slot, every lookup reads the file, as without a filter.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::KeyHash;

/// Filter bits per table slot.
const BITS_PER_SLOT: u64 = 4;
/// Bits set per key.
const PROBES: u64 = 3;

pub(super) struct Filter {
    words: Box<[AtomicU64]>,
    /// The number of bits minus one (a power of two minus one).
    mask: u64,
    /// Whether every record in the file has its bits set, so that a clear bit means "not in
    /// the file".
    complete: AtomicBool,
}

impl Filter {
    /// A filter for a table of `capacity` slots (a power of two of at least 16); `complete`
    /// for a new, empty file.
    pub(super) fn new(capacity: u64, complete: bool) -> Filter {
        let bits = capacity.saturating_mul(BITS_PER_SLOT).max(64);
        let words = (0..bits / 64).map(|_| AtomicU64::new(0)).collect();
        Filter {
            words,
            mask: bits - 1,
            complete: AtomicBool::new(complete),
        }
    }

    /// The key's bits, by double hashing of its hash's two halves (a cryptographic hash, so
    /// the halves are independent).
    fn positions(&self, hash: &KeyHash) -> [u64; PROBES as usize] {
        let mut low = [0u8; 8];
        let mut high = [0u8; 8];
        low.copy_from_slice(&hash[..8]);
        high.copy_from_slice(&hash[8..]);
        // The table's home slot is the low half modulo its capacity: start from the high half,
        // and step by an odd number so that the probes never coincide.
        let (start, step) = (u64::from_le_bytes(high), u64::from_le_bytes(low) | 1);
        let mut positions = [0u64; PROBES as usize];
        for (i, position) in positions.iter_mut().enumerate() {
            *position = start.wrapping_add((i as u64).wrapping_mul(step)) & self.mask;
        }
        positions
    }

    /// Remembers that the file holds (or is about to hold) `hash`.
    pub(super) fn insert(&self, hash: &KeyHash) {
        for bit in self.positions(hash) {
            let word = &self.words[(bit / 64) as usize];
            let flag = 1u64 << (bit % 64);
            if word.load(Ordering::Relaxed) & flag == 0 {
                word.fetch_or(flag, Ordering::Relaxed);
            }
        }
    }

    /// Whether the file may hold `hash`: `false` only when it certainly does not.
    pub(super) fn may_hold(&self, hash: &KeyHash) -> bool {
        // Acquire pairs with `set_complete`'s release: the scan's bits are visible once it
        // says it is done. A record written since sets its bits before its lookup can miss
        // it in memory (the checkpoint drops its frozen records after writing them).
        if !self.complete.load(Ordering::Acquire) {
            return true;
        }
        self.positions(hash).iter().all(|bit| {
            let word = self.words[(bit / 64) as usize].load(Ordering::Relaxed);
            word & (1u64 << (bit % 64)) != 0
        })
    }

    /// Called once the scan has inserted every record the file held when the filter was made.
    pub(super) fn set_complete(&self) {
        self.complete.store(true, Ordering::Release);
    }

    pub(super) fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// The filter's size in bytes (for the docs' memory figures and the tests).
    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.words.len() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64) -> KeyHash {
        super::super::key_hash("d", &n.to_string())
    }

    #[test]
    fn an_inserted_key_is_always_maybe_and_an_incomplete_filter_says_maybe() {
        let filter = Filter::new(1 << 12, false);
        assert!(filter.may_hold(&key(1)), "incomplete: every key is maybe");
        for n in 0..2048 {
            filter.insert(&key(n));
        }
        filter.set_complete();
        for n in 0..2048 {
            assert!(
                filter.may_hold(&key(n)),
                "key {n} inserted but reported absent"
            );
        }
    }

    #[test]
    fn at_half_full_most_absent_keys_are_answered_from_memory() {
        let capacity = 1u64 << 14;
        let filter = Filter::new(capacity, true);
        assert_eq!(filter.bytes() as u64, capacity / 2);
        for n in 0..capacity / 2 {
            filter.insert(&key(n));
        }
        let absent = 20_000u64;
        let maybe = (capacity..capacity + absent)
            .filter(|n| filter.may_hold(&key(*n)))
            .count();
        // 3 bits per key over 8 bits per key: about 3 %.
        assert!(
            (maybe as f64) < absent as f64 * 0.06,
            "{maybe} of {absent} absent keys answered maybe"
        );
    }
}
