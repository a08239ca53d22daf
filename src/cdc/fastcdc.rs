//! FastCDC 2020 (`FAST_CDC_2020`), bit-exact with Bazel's `FastCdcChunker`
//! (which is the fastcdc crate's `v2020::cut_gear` at normalisation level 2):
//! chunks between avg/4 and 4·avg, cut where a gear hash clears a mask that
//! is stricter below the average size than above it.

use super::gear::GEAR;

/// Masks by their number of set bits (FastCDC's table, as Bazel has it).
const MASKS: [u64; 26] = [
    0,
    0,
    0,
    0,
    0,
    0x0000000001804110,
    0x0000000001803110,
    0x0000000018035100,
    0x0000001800035300,
    0x0000019000353000,
    0x0000590003530000,
    0x0000d90003530000,
    0x0000d90103530000,
    0x0000d90303530000,
    0x0000d90313530000,
    0x0000d90f03530000,
    0x0000d90303537000,
    0x0000d90703537000,
    0x0000d90707537000,
    0x0000d91707537000,
    0x0000d91747537000,
    0x0000d91767537000,
    0x0000d93767537000,
    0x0000d93777537000,
    0x0000d93777577000,
    0x0000db3777577000,
];

/// Bits of normalisation: the mask below the average has this many more
/// bits than the average's, the one above this many fewer (REAPI fixes 2).
const NORMALIZATION: u32 = 2;

/// The chunker for one average size and seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FastCdc {
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
    /// The seed, XORed into every gear value (shifted for the shifted table).
    seed: u64,
}

impl FastCdc {
    /// The smallest and largest averages: the mask table's range, as Bazel
    /// accepts them (a power of two from 1 KiB to 1 MiB).
    pub const MIN_AVG: u64 = 1 << 10;
    pub const MAX_AVG: u64 = 1 << 20;

    /// A chunker of average size `avg` (a power of two in
    /// [`MIN_AVG`](Self::MIN_AVG)..=[`MAX_AVG`](Self::MAX_AVG)) and `seed`.
    pub fn new(avg: u64, seed: u32) -> Option<FastCdc> {
        if !avg.is_power_of_two() || !(Self::MIN_AVG..=Self::MAX_AVG).contains(&avg) {
            return None;
        }
        Some(FastCdc::with_sizes(avg as usize / 4, avg as usize, avg as usize * 4, seed))
    }

    /// Any bounds, as the reference test vectors use them (their maximum is
    /// 65535, not 4·avg).
    fn with_sizes(min: usize, avg: usize, max: usize, seed: u32) -> FastCdc {
        let bits = avg.ilog2();
        FastCdc {
            min,
            avg,
            max,
            mask_s: MASKS[(bits + NORMALIZATION) as usize],
            mask_l: MASKS[(bits - NORMALIZATION) as usize],
            seed: u64::from(seed),
        }
    }

    /// The most bytes a chunk has: [`FastCdc::cut`] decides with this many
    /// bytes, or all that are left.
    pub fn max_size(&self) -> usize {
        self.max
    }

    /// The length of the chunk at the start of `data`, which holds at least
    /// [`FastCdc::max_size`] bytes or everything that is left of the blob.
    pub fn cut(&self, data: &[u8]) -> usize {
        self.cut_with_hash(data).0
    }

    /// The cut and the gear hash where it was made (the test vectors'
    /// fingerprint). Bytes are hashed two at a time: the first of a pair
    /// against the masks shifted left by one, with a table shifted alike,
    /// so that one `<< 2` serves both. A cut lands before the byte whose
    /// hash cleared the mask, as in the reference.
    fn cut_with_hash(&self, data: &[u8]) -> (usize, u64) {
        let len = data.len();
        if len <= self.min {
            return (len, 0);
        }
        let n = len.min(self.max);
        let center = n.min(self.avg);
        let (seed, seed_ls) = (self.seed, self.seed << 1);
        let mut hash = 0u64;
        let mut a = self.min & !1;
        for (limit, mask) in [(center & !1, self.mask_s), (n & !1, self.mask_l)] {
            let mask_ls = mask << 1;
            while a < limit {
                hash = (hash << 2).wrapping_add((GEAR[data[a] as usize] << 1) ^ seed_ls);
                if hash & mask_ls == 0 {
                    return (a, hash);
                }
                hash = hash.wrapping_add(GEAR[data[a + 1] as usize] ^ seed);
                if hash & mask == 0 {
                    return (a + 1, hash);
                }
                a += 2;
            }
        }
        (n, hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdc::tests::{sekien, sha256};

    /// From remote-apis' `fastcdc2020_test_vectors.txt` (the same rows are
    /// in Bazel's `FastCdcChunkerTest`): SekienAkashita.jpg, min 4096, avg
    /// 16384, max 65535, normalisation 2. Offset, length, SHA-256, fingerprint.
    const SEED_0: [(usize, usize, &str, u64); 6] = [
        (0, 19186, "0f9efa589121d5d9e9e2c4ace91337d77cae866537143f6f15a0ffd525a77c2d", 17583755766661134474),
        (
            19186,
            19279,
            "c7c86a165573c16448cda35c9169742e85645af42be22889f8b96b8ee0ec7cb0",
            4098594969649699419,
        ),
        (
            38465,
            17354,
            "bc88521e28a8b4479cdea5f75aa721a24f3a0a7d0be903aa6d505c574e51e89d",
            2365586132076908760,
        ),
        (
            55819,
            16387,
            "4b8dac2652e4685c629d2bb1ae9d4448e676b86f2e67ca0b2fff3d9580184b79",
            16009206469796846404,
        ),
        (
            72206,
            19940,
            "c0a7062da6f2386c28e086ee0cedd5732252741269838773cff1ddb05b2df6ed",
            2473608525189754172,
        ),
        (
            92146,
            17320,
            "7fa5b12134dc75cd2ac8dc60d3a8f3c8d22f0ee9d4cf74a4aa937e2a0d2d79a5",
            2504464741100432583,
        ),
    ];
    const SEED_666: [(usize, usize, &str, u64); 6] = [
        (0, 17635, "cb3a9d80a3569772d4ed331ca37ab0c862c759897b890fc1aac90a4f2ea3a407", 17021115692437263050),
        (
            17635,
            17334,
            "d758c6b7b0b7eef1e996f8ccd17de6c645360b03a26c35541e7581348ac08944",
            8231525949846907466,
        ),
        (
            34969,
            19136,
            "24846aefd89e510594bae3e9d7d5ea5012067601512610fed126a3c57ba993f5",
            10944310959829698982,
        ),
        (
            54105,
            17467,
            "efa785e1fefb49f190e665f72fd246c1442079874508c312196da1fb3040d00b",
            13602876513398592944,
        ),
        (
            71572,
            23593,
            "a2f557bdd8d40d8faada963ad5f91ec54b10ccee7c5ae72754a65137592dc607",
            2945079350535657389,
        ),
        (
            95165,
            14301,
            "e131100b4a7147ccad19dc63c4a2fac1f5d8b644e1373eeb6803825024234efc",
            8981594897574481255,
        ),
    ];

    #[test]
    fn the_reference_vectors() {
        let data = sekien();
        for (seed, vectors) in [(0, SEED_0), (666, SEED_666)] {
            let chunker = FastCdc::with_sizes(4096, 16384, 65535, seed);
            let mut at = 0;
            for (offset, length, hash, fingerprint) in vectors {
                let (cut, got) = chunker.cut_with_hash(&data[at..]);
                assert_eq!((at, cut, got), (offset, length, fingerprint), "seed {seed}");
                assert_eq!(sha256(&data[at..at + cut]), hash, "seed {seed}");
                at += cut;
            }
            assert_eq!(at, data.len());
        }
    }

    /// The one-byte-at-a-time form the paired loop optimises: the plain
    /// gear hash, its mask tests, and the same cut rule (before the byte
    /// whose hash cleared the mask). A second implementation to check the
    /// first against, on inputs the vectors do not cover.
    fn simple_cut(c: &FastCdc, data: &[u8]) -> usize {
        if data.len() <= c.min {
            return data.len();
        }
        let n = data.len().min(c.max);
        let center = n.min(c.avg);
        let mut hash = 0u64;
        // Bytes are taken in pairs: a trailing odd byte is never hashed.
        for a in (c.min & !1)..(n & !1) {
            let mask = if a < (center & !1) { c.mask_s } else { c.mask_l };
            hash = (hash << 1).wrapping_add(GEAR[data[a] as usize] ^ c.seed);
            // After the first byte of a pair the reference compares in the
            // shifted domain: the same bits as this hash, one place higher.
            if hash & mask == 0 {
                return a;
            }
        }
        n
    }

    proptest::proptest! {
        #![proptest_config(crate::hostile::config())]

        #[test]
        fn the_paired_loop_cuts_where_the_simple_one_does(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20_000),
            low_entropy in proptest::prelude::any::<bool>(),
            seed in proptest::prelude::any::<u32>(),
            bits in 10u32..=12,
        ) {
            let data: Vec<u8> = if low_entropy { data.iter().map(|b| b % 3).collect() } else { data };
            let c = FastCdc::new(1 << bits, seed).unwrap();
            let mut at = 0;
            while at < data.len() {
                let cut = c.cut(&data[at..]);
                proptest::prop_assert_eq!(cut, simple_cut(&c, &data[at..]));
                proptest::prop_assert!(cut > 0 && cut <= c.max);
                at += cut;
            }
        }
    }

    #[test]
    fn averages_are_powers_of_two_within_the_mask_table() {
        assert!(FastCdc::new(512 << 10, 0).is_some());
        for avg in [0, 512, 3 << 10, 2 << 20] {
            assert_eq!(FastCdc::new(avg, 0), None, "{avg}");
        }
        let c = FastCdc::new(1 << 10, 7).unwrap();
        assert_eq!((c.min, c.max, c.cut(&[]), c.cut(&[1; 100])), (256, 4096, 0, 100));
    }
}
