//! What this node knows the bucket holds, for a while: blobs it wrote or
//! read there, and blobs a HEAD found. A blob known present is not asked
//! about again until its memory expires.
//!
//! The memory is two generations of digest fingerprints: entries go into
//! the current one, which becomes the previous one when it is full or half
//! the time to live has passed, and the previous one is dropped then; a
//! generation that began `ttl` ago is dropped whatever happens. So an entry
//! is forgotten less than `ttl` after it was learnt (sooner when many
//! arrive), and memory stays at most `max` fingerprints of 8 bytes.
//!
//! Only presence is remembered: any node may write a blob at any time, so an
//! absence is always asked again. A fingerprint is 64 bits of the hash,
//! size and function: two digests sharing one would need a collision that
//! no realistic number of blobs makes, and would only make a client skip an
//! upload that an action result's completeness check then misses.

use std::collections::HashSet;
use std::hash::BuildHasherDefault;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::digest::Digest;

/// Fingerprints are uniformly random already: hashing them again is waste.
#[derive(Default)]
pub(super) struct Identity(u64);

impl std::hash::Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Fingerprints = HashSet<u64, BuildHasherDefault<Identity>>;

pub struct Known {
    ttl: Duration,
    /// Most fingerprints held, both generations together; 0: none.
    max: usize,
    generations: Mutex<Generations>,
}

struct Generations {
    current: Fingerprints,
    previous: Fingerprints,
    /// When each generation began: none of its entries is older.
    since: Instant,
    previous_since: Instant,
}

pub fn fingerprint(digest: &Digest) -> u64 {
    let hash = digest.hash();
    let head = u64::from_le_bytes(hash[..8].try_into().expect("every hash has 8 bytes or more"));
    head ^ digest.size.rotate_left(17) ^ ((digest.function as u64) << 56)
}

impl Known {
    pub fn new(ttl: Duration, max: usize) -> Known {
        let now = Instant::now();
        let generations = Generations {
            current: Fingerprints::default(),
            previous: Fingerprints::default(),
            since: now,
            previous_since: now,
        };
        Known { ttl, max, generations: Mutex::new(generations) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        self.generations.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops what is too old to trust, and makes room.
    fn age(&self, g: &mut Generations) {
        let now = Instant::now();
        if now.duration_since(g.previous_since) >= self.ttl {
            g.previous.clear();
        }
        if now.duration_since(g.since) >= self.ttl {
            g.current.clear();
            g.since = now;
        }
        if now.duration_since(g.since) >= self.ttl / 2 || g.current.len() >= self.max / 2 {
            g.previous = std::mem::take(&mut g.current);
            g.previous_since = g.since;
            g.since = now;
        }
    }

    /// Whether `digest` is known present.
    pub fn holds(&self, digest: &Digest) -> bool {
        if self.max == 0 {
            return false;
        }
        let f = fingerprint(digest);
        let mut g = self.lock();
        self.age(&mut g);
        g.current.contains(&f) || g.previous.contains(&f)
    }

    /// Remembers that the bucket holds `digest` as of now.
    pub fn insert(&self, digest: &Digest) {
        if self.max == 0 {
            return;
        }
        let f = fingerprint(digest);
        let mut g = self.lock();
        self.age(&mut g);
        g.current.insert(f);
    }

    /// Remembers each of `fingerprints`, and says which were new: for a
    /// memory of what was done lately, not to be done again for a while.
    pub fn insert_new(&self, fingerprints: impl Iterator<Item = u64>) -> Vec<bool> {
        if self.max == 0 {
            return fingerprints.map(|_| true).collect();
        }
        let mut g = self.lock();
        self.age(&mut g);
        fingerprints.map(|f| !g.previous.contains(&f) && g.current.insert(f)).collect()
    }

    /// Forgets `digest` (its object was deleted).
    pub fn remove(&self, digest: &Digest) {
        self.remove_fingerprint(fingerprint(digest));
    }

    pub fn remove_fingerprint(&self, f: u64) {
        let mut g = self.lock();
        g.current.remove(&f);
        g.previous.remove(&f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u32) -> Digest {
        Digest::of(&n.to_le_bytes())
    }

    #[test]
    fn presence_is_remembered_within_the_bound_and_forgotten() {
        let known = Known::new(Duration::from_secs(3600), 100);
        for n in 0..40 {
            known.insert(&digest(n));
        }
        assert!((0..40).all(|n| known.holds(&digest(n))));
        assert!(!known.holds(&digest(1000)));
        known.remove(&digest(3));
        assert!(!known.holds(&digest(3)));
        // Far more than the bound: the oldest go, memory stays bounded.
        for n in 100..10_000 {
            known.insert(&digest(n));
        }
        let g = known.lock();
        assert!(g.current.len() + g.previous.len() <= 100);
        drop(g);
        assert!(known.holds(&digest(9_999)));
        assert!(!known.holds(&digest(0)));
    }

    #[test]
    fn entries_expire_within_the_time_to_live() {
        let known = Known::new(Duration::from_millis(100), 1000);
        known.insert(&digest(1));
        assert!(known.holds(&digest(1)));
        std::thread::sleep(Duration::from_millis(120));
        assert!(!known.holds(&digest(1)));
        let off = Known::new(Duration::from_secs(60), 0);
        off.insert(&digest(1));
        assert!(!off.holds(&digest(1)));
    }

    #[test]
    fn insert_new_says_what_was_not_remembered() {
        let known = Known::new(Duration::from_secs(60), 1000);
        let fps = |ns: &[u32]| ns.iter().map(|&n| fingerprint(&digest(n))).collect::<Vec<_>>();
        assert_eq!(known.insert_new(fps(&[1, 2]).into_iter()), [true, true]);
        assert_eq!(known.insert_new(fps(&[2, 3, 3]).into_iter()), [false, true, false]);
        known.remove_fingerprint(fps(&[2])[0]);
        assert_eq!(known.insert_new(fps(&[1, 2]).into_iter()), [false, true]);
    }
}
