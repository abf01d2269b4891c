//! Hash maps whose keys already are hashes: the dedup table's SHA-256 prefixes and the
//! delivery claims' 64-bit keys.
//!
//! Every delivery looks such keys up about ten times. SipHash, the standard maps' hasher, costs
//! more per look than the look itself; these keys are already spread evenly, so [`Prehashed`]
//! only folds their first eight bytes with a seed of the map's own. The seed is random, so a
//! producer that picks event ids still cannot choose keys that share a bucket.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher, RandomState};

/// A map keyed by a hash.
pub type PrehashedMap<K, V> = HashMap<K, V, Prehashed>;
/// A set of hashes.
pub type PrehashedSet<K> = HashSet<K, Prehashed>;

/// Builds [`PrehashedHasher`]s with one random seed.
#[derive(Clone, Copy, Debug)]
pub struct Prehashed {
    seed: u64,
}

impl Default for Prehashed {
    fn default() -> Prehashed {
        // `RandomState` is seeded from the OS once per thread and stepped for each new state,
        // so each map gets its own seed.
        Prehashed {
            seed: RandomState::new().hash_one(0x5eed_u64),
        }
    }
}

impl BuildHasher for Prehashed {
    type Hasher = PrehashedHasher;

    fn build_hasher(&self) -> PrehashedHasher {
        PrehashedHasher {
            state: self.seed,
            words: 0,
        }
    }
}

/// Folds up to the first eight bytes (or the first integer) of a key into the seed; whatever
/// the key's `Hash` writes after that (for arrays, after their length) is ignored, as it is no
/// more random than those bytes.
#[derive(Debug)]
pub struct PrehashedHasher {
    state: u64,
    /// How many writes have been folded in: a slice's length, then its first eight bytes.
    words: u8,
}

/// An odd constant with its bits spread (2^64 / φ).
const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;

impl PrehashedHasher {
    fn fold(&mut self, word: u64) {
        if self.words < 2 {
            self.words += 1;
            let product = u128::from(self.state ^ word) * u128::from(MULTIPLIER);
            // Both halves: the map takes its bucket from the low bits, which the product's low
            // half alone would take from the word's low bits only.
            self.state = (product as u64) ^ ((product >> 64) as u64);
        }
    }
}

impl Hasher for PrehashedHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.fold(u64::from_le_bytes(word));
    }

    fn write_u64(&mut self, n: u64) {
        self.fold(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.fold(n as u64);
    }

    fn finish(&self) -> u64 {
        self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_keys_hash_alike_and_the_seed_changes_the_hash() {
        let (a, b) = (Prehashed::default(), Prehashed::default());
        let key = [7u8; 16];
        assert_eq!(a.hash_one(key), a.hash_one(key));
        assert_ne!(a.hash_one(key), b.hash_one(key));
        assert_ne!(a.hash_one(42u64), b.hash_one(42u64));
    }

    #[test]
    fn keys_that_differ_in_their_first_eight_bytes_hash_apart() {
        let state = Prehashed::default();
        let mut seen = HashSet::new();
        for i in 0..10_000u64 {
            let mut key = [0u8; 16];
            key[..8].copy_from_slice(&i.to_le_bytes());
            assert!(seen.insert(state.hash_one(key)), "{i}");
        }
    }

    #[test]
    fn keys_that_share_their_low_bits_still_spread_over_the_buckets() {
        // Keys alike in their low 16 bits, as a producer could find by trying ids: the buckets
        // of a 1,024-bucket map (the hash's low 10 bits) must still differ.
        let state = Prehashed::default();
        let buckets: HashSet<u64> = (0..1_000u64)
            .map(|i| state.hash_one((i << 16) | 0xbeef) & 1023)
            .collect();
        assert!(buckets.len() > 500, "{} buckets", buckets.len());
    }

    #[test]
    fn maps_find_what_they_hold() {
        let mut map: PrehashedMap<[u8; 16], u64> = PrehashedMap::default();
        for i in 0..1_000u64 {
            let mut key = [0u8; 16];
            key[..8].copy_from_slice(&(i * 0x1_0001).to_le_bytes());
            map.insert(key, i);
        }
        for i in 0..1_000u64 {
            let mut key = [0u8; 16];
            key[..8].copy_from_slice(&(i * 0x1_0001).to_le_bytes());
            assert_eq!(map.get(&key), Some(&i));
        }
    }
}
