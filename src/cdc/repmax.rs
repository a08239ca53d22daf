//! RepMaxCDC (`REP_MAX_CDC`), bit-exact with buildbarn/go-cdc and Bazel's
//! `RepMaxCdcChunker`: every chunk is in [min, 2·min), cut where the gear
//! hash of the 64 bytes before the cut is largest among the positions a
//! horizon of bytes ahead allows.
//!
//! The rule (go-cdc's simple form, kept in the tests as the oracle): of a
//! window of 2·min + horizon bytes from the chunk's start, take the cut
//! position p in [min, len − min] with the largest hash, the earliest of
//! equals; if the chunk would be 2·min or longer, look again in [min, p − min].
//! Windows overlap by most of their length, so the simple form hashes each
//! byte several times over. A [`Pass`] hashes each byte once, in order, and
//! keeps the largest hash of each block of positions: a search reads the
//! blocks it spans whole, and hashes again only the two ends it covers in part.

use std::collections::VecDeque;

use super::gear::GEAR;

/// The chunker for one minimum size and horizon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepMax {
    min: usize,
    horizon: usize,
}

impl RepMax {
    /// The gear hash covers 64 bytes: a chunk must be at least that long.
    pub const MIN_MIN: u64 = 64;
    /// Bounds that keep a window within memory a call may hold.
    pub const MAX_MIN: u64 = 16 << 20;
    pub const MAX_HORIZON: u64 = 64 << 20;

    pub fn new(min: u64, horizon: u64) -> Option<RepMax> {
        if !(Self::MIN_MIN..=Self::MAX_MIN).contains(&min) || horizon > Self::MAX_HORIZON {
            return None;
        }
        Some(RepMax { min: min as usize, horizon: horizon as usize })
    }

    /// The bytes a cut is decided with: 2·min + horizon, or all that are
    /// left of the blob.
    pub fn window(&self) -> usize {
        2 * self.min + self.horizon
    }

    /// A pass over one blob, from its first byte.
    pub fn pass(&self) -> Pass {
        Pass::with_block(self.clone(), 1024)
    }
}

/// The largest hash of the positions of one block, and the first of them
/// that has it.
#[derive(Clone, Copy, Debug)]
struct Block {
    best: u64,
    at: u64,
}

/// One pass of the chunker over one blob, chunk after chunk.
pub struct Pass {
    chunker: RepMax,
    /// Positions per block.
    block: u64,
    /// Where the next chunk starts, from the start of the blob.
    start: u64,
    /// The hash at every position up to here is known (the hash at
    /// position x covers the 64 bytes before x).
    hashed: u64,
    rolling: u64,
    /// The blocks from `first_block` on, each complete up to `hashed`.
    blocks: VecDeque<Block>,
    first_block: u64,
}

impl Pass {
    fn with_block(chunker: RepMax, block: u64) -> Pass {
        Pass { chunker, block, start: 0, hashed: 0, rolling: 0, blocks: VecDeque::new(), first_block: 0 }
    }

    /// The length of the next chunk: `data` starts where the last chunk
    /// ended, and holds at least [`RepMax::window`] bytes or everything
    /// that is left of the blob.
    pub fn cut(&mut self, data: &[u8]) -> usize {
        let min = self.chunker.min;
        let d = &data[..data.len().min(self.chunker.window())];
        let cut = if d.len() < 2 * min {
            d.len()
        } else {
            let s = self.start;
            let mut last = (d.len() - min) as u64;
            self.hash_to(d, s + last);
            loop {
                let p = self.argmax(d, s + min as u64, s + last) - s;
                if p < 2 * min as u64 {
                    break p as usize;
                }
                // Too long a chunk: look again, ending min bytes before that cut.
                last = p - min as u64;
            }
        };
        self.start += cut as u64;
        // Positions before the next chunk's first cut are never asked again.
        let keep_from = (self.start + min as u64) / self.block;
        while self.first_block < keep_from && !self.blocks.is_empty() {
            self.blocks.pop_front();
            self.first_block += 1;
        }
        cut
    }

    /// Hashes on to position `to` (`d` starts at `self.start`), keeping
    /// each block's largest hash.
    fn hash_to(&mut self, d: &[u8], to: u64) {
        while self.hashed < to {
            // The positions from here to the end of their block, at most `to`.
            let index = (self.hashed + 1) / self.block;
            let until = to.min((index + 1) * self.block - 1);
            if self.blocks.is_empty() {
                self.first_block = index;
            }
            let open = self.first_block + self.blocks.len() as u64 == index + 1;
            let mut block = match (open, self.blocks.back()) {
                (true, Some(block)) => *block,
                _ => Block { best: 0, at: u64::MAX },
            };
            let mut rolling = self.rolling;
            let from = (self.hashed - self.start) as usize;
            for (i, &byte) in d[from..from + (until - self.hashed) as usize].iter().enumerate() {
                rolling = (rolling << 1).wrapping_add(GEAR[byte as usize]);
                // The earliest of equal maxima.
                if block.at == u64::MAX || block.best < rolling {
                    block = Block { best: rolling, at: self.hashed + i as u64 + 1 };
                }
            }
            match open {
                true => *self.blocks.back_mut().expect("an open block") = block,
                false => self.blocks.push_back(block),
            }
            (self.rolling, self.hashed) = (rolling, until);
        }
    }

    /// The first position in [a, b] with the largest hash.
    fn argmax(&self, d: &[u8], a: u64, b: u64) -> u64 {
        // Blocks wholly inside [a, b] are read; the ends are hashed again.
        let (first_whole, end_whole) = (a.div_ceil(self.block), (b + 1) / self.block);
        if first_whole >= end_whole {
            return self.scan(d, a, b).at;
        }
        let mut best = match a < first_whole * self.block {
            true => Some(self.scan(d, a, first_whole * self.block - 1)),
            false => None,
        };
        let mut consider = |candidate: Block| {
            if best.is_none_or(|best| best.best < candidate.best) {
                best = Some(candidate);
            }
        };
        for index in first_whole..end_whole {
            consider(self.blocks[(index - self.first_block) as usize]);
        }
        if end_whole * self.block <= b {
            consider(self.scan(d, end_whole * self.block, b));
        }
        best.expect("a non-empty range").at
    }

    /// The first position in [a, b] with the largest hash, hashing again.
    fn scan(&self, d: &[u8], a: u64, b: u64) -> Block {
        let offset = |x: u64| (x - self.start) as usize;
        let hash =
            d[offset(a) - 64..offset(a)].iter().fold(0u64, |h, &x| (h << 1).wrapping_add(GEAR[x as usize]));
        let mut best = Block { best: hash, at: a };
        let mut hash = hash;
        for x in a..b {
            hash = (hash << 1).wrapping_add(GEAR[d[offset(x)] as usize]);
            if best.best < hash {
                best = Block { best: hash, at: x + 1 };
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdc::tests::{sekien, sha256};

    /// From Bazel's `RepMaxCdcChunkerTest` (`chunkToDigests_testVectors`,
    /// "generated with the Go reference implementation of RepMaxCDC"):
    /// SekienAkashita.jpg, min 4096, horizon 32768. Offset, length, SHA-256.
    const HORIZON_32K: [(usize, usize, &str); 19] = [
        (0, 7026, "3c386537b8c3200dd2ab6623f6096a576d07844a4a0d5d2994d13e24887dae46"),
        (7026, 5198, "cc7fb08694b471e3ba660b700b347775d1e7a55db8f308c176e2eb6776b5222c"),
        (12224, 5310, "096a3e0e42f0a8b7a5a3a337e9b5b4c7fc59abcd6f69486fb68fe4c5c156300f"),
        (17534, 4271, "3f4a0b00f9a04959806c9ce9e530fa5d761930ef6c8477117b58eb93196342e8"),
        (21805, 5278, "d0c2f82664d8887bd2d289a75baea1d5688e6ee586f8767149bfef9c6df8fe63"),
        (27083, 5588, "558e6b58c659f7463c846a0d18c155a86520d1ca69102f102635c08e8b0897e2"),
        (32671, 5017, "c3c66478eb8e1632768e6e13dc31e492ac78befca38e9db85525b4b274c5b5d7"),
        (37688, 6761, "a5ce22ca3a02323451ddca6db5319c26b5fc1abc5621a033c98cd3de154cd29d"),
        (44449, 5541, "ec4752962eda083bf78b24cb087e07451ced85d8c0d719f32c474f7dae8fd764"),
        (49990, 7612, "3d9e8dc0a5f14dee7db5eabf99bb636352081423f122a84fdb160cecc2ad01bb"),
        (57602, 5501, "f8c747a292f7fd6433945356ee314b978b423ac4c3d248c8fdf36c0693eb6006"),
        (63103, 4695, "71249e1031dc237ab6393381a30a10ef90d9a93f532c135b11cc0df60a767b5f"),
        (67798, 4362, "95c42ec307be0ce1efde6de814c668f05a31887fde9501b478faca225cf9b8c7"),
        (72160, 6221, "8869f4871a0f3fb63775e0fb7f10e170a59b71a6fa0a91a18fa3cf5fff987eba"),
        (78381, 7190, "d2f91644457863f716071e76e9b1046408820aa95b36471d5e70ee5c91b611a2"),
        (85571, 5858, "3507024624db4ff48ee546e984d7c60461d6a526aba7e4aa33833b162785e79e"),
        (91429, 4382, "9b19e98bc5d9b6f486c7c7281fd61044b8e5333363048b20ce3dcb2ee0172980"),
        (95811, 8022, "e56dbfa2a82695fed3c565857dbc644af91c983b55c13fe20d9e03bb89e009e2"),
        (103833, 5633, "7d76fde9af9a911c4e580db9227e5109c5de28101f3f26637c527e80215aad38"),
    ];

    /// Bazel's `chunkToDigests_testVectorsZeroHorizon`: min 8192, horizon 0
    /// (chunks of exactly min, the last one up to 2·min).
    const HORIZON_0: [(usize, usize, &str); 13] = [
        (0, 8192, "716c5e702f4bee5f18426da9e9eb77d22aa936486741768b86fff472bc18c363"),
        (8192, 8192, "33df8556634b77338abee984190d1aa21efb10411edeae3820fd61a93e489f58"),
        (16384, 8192, "a05018146657a5c999868a9e3f6e94da715c519f929005ca50404eb5a30caf1f"),
        (24576, 8192, "e124b2b4e8847def80e1b8da2fbfa5b483c3bcab6cf2d88e50d598d6c2d2e65c"),
        (32768, 8192, "7855d8367f097e33d0d3afbdba0e17749309a0dfb48f3d373bdf94b9b8f378e1"),
        (40960, 8192, "782a8f7b5367f177b94da16dc14026a3af3dcfc25b6b53f2060eafee0bc16922"),
        (49152, 8192, "3be28a5d9d67d5f8f9b30fbe742406cfefb46c139b48a47eeb98837fbb55128b"),
        (57344, 8192, "e6d7615aeefa30776bd0de14ad0e9ac5a738a767c63aa8c3310aa85c49d16d44"),
        (65536, 8192, "316e9ca063049a490d8f8431f109f2eaf0bf74739b4c3f4be9da46144733c327"),
        (73728, 8192, "2b4a043bd77df955a9fa30358597a90bca046474917e91d3715205f9d674a3bf"),
        (81920, 8192, "78abb22658ea5642440139f1bf86382d4bca2d33858fd8e15a170f1c1ac19651"),
        (90112, 8192, "076758af278b0fb9fd0313db8f6b796639c23241e2c8d831503e272e069d9aea"),
        (98304, 11162, "e776b8d90b880e10e4fdc4f99ba3b0bfbe471f26362007a1775d4cab46a539c7"),
    ];

    /// go-cdc's simple form, step by step: the rule itself.
    fn simple_cut(c: &RepMax, data: &[u8]) -> usize {
        let min = c.min;
        let d = &data[..data.len().min(c.window())];
        if d.len() < 2 * min {
            return d.len();
        }
        let start = d[min - 64..min].iter().fold(0u64, |h, &b| (h << 1).wrapping_add(GEAR[b as usize]));
        let mut last = d.len() - min;
        loop {
            let (mut hash, mut best, mut best_end) = (start, start, min);
            for (i, &b) in d.iter().enumerate().take(last).skip(min) {
                hash = (hash << 1).wrapping_add(GEAR[b as usize]);
                if best < hash {
                    (best, best_end) = (hash, i + 1);
                }
            }
            if best_end < 2 * min {
                return best_end;
            }
            last = best_end - min;
        }
    }

    #[test]
    fn the_reference_vectors() {
        let data = sekien();
        for (min, horizon, vectors) in [(4096, 32768, &HORIZON_32K[..]), (8192, 0, &HORIZON_0[..])] {
            let chunker = RepMax::new(min, horizon).unwrap();
            let (mut pass, mut at) = (chunker.pass(), 0);
            for &(offset, length, hash) in vectors {
                assert_eq!(simple_cut(&chunker, &data[at..]), length, "the simple form");
                let cut = pass.cut(&data[at..]);
                assert_eq!((at, cut), (offset, length), "min {min}, horizon {horizon}");
                assert_eq!(sha256(&data[at..at + cut]), hash);
                at += cut;
            }
            assert_eq!(at, data.len());
        }
    }

    proptest::proptest! {
        #![proptest_config(crate::hostile::config())]

        /// A pass cuts where the simple form does, whatever the block
        /// size; every chunk but a blob shorter than min is in [min, 2·min).
        #[test]
        fn a_pass_cuts_where_the_rule_does(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40_000),
            low_entropy in proptest::prelude::any::<bool>(),
            min in 64u64..2048,
            horizon in 0u64..8192,
            block in proptest::sample::select(vec![1u64, 3, 64, 1024]),
        ) {
            let data: Vec<u8> = if low_entropy { data.iter().map(|b| b % 7).collect() } else { data };
            let c = RepMax::new(min, horizon).unwrap();
            let mut pass = Pass::with_block(c.clone(), block);
            let mut at = 0;
            while at < data.len() {
                let rest = &data[at..];
                let cut = pass.cut(rest);
                proptest::prop_assert_eq!(cut, simple_cut(&c, rest));
                proptest::prop_assert!(cut > 0 && cut < 2 * c.min);
                proptest::prop_assert!(cut >= c.min || cut == rest.len());
                at += cut;
            }
        }
    }

    #[test]
    fn bounds_are_checked() {
        assert!(RepMax::new(63, 0).is_none());
        assert!(RepMax::new(64, RepMax::MAX_HORIZON + 1).is_none());
        let c = RepMax::new(1024, 8192).unwrap();
        assert_eq!((c.pass().cut(&[]), c.pass().cut(&[5; 100]), c.pass().cut(&[5; 1024])), (0, 100, 1024));
        assert_eq!(c.window(), 10240);
    }
}
