//! A fast hasher for task and batch ids (u64 keys the cache looks up several times per acquire);
//! SipHash's flooding resistance buys nothing for ids the server itself hands around.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, id: u64) {
        // Multiply by an odd constant and fold the high half down: hashbrown uses the top bits.
        let x = (id ^ self.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = x ^ (x >> 29);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

pub type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;
pub type IdSet = HashSet<u64, BuildHasherDefault<IdHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_ids_spread() {
        let mut m: IdMap<u64> = IdMap::default();
        for id in 0..10_000u64 {
            m.insert(id * 64, id);
        }
        assert!((0..10_000u64).all(|id| m[&(id * 64)] == id));
    }
}
