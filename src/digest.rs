//! Digests and the ByteStream resource names that carry them.
//!
//! Everything a client sends that names a blob is parsed here, once, into a
//! [`Digest`]; the rest of larder never looks at hex strings or resource names.

use std::fmt;
use std::sync::LazyLock;

use sha2::Digest as _;

use crate::proto::reapi;
use crate::proto::reapi::digest_function::Value as WireFunction;

/// The hash functions larder stores blobs under. The discriminant is part of
/// the on-disk key layout: never renumber.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Function {
    Sha256 = 1,
    Sha1 = 2,
    Sha384 = 3,
    Sha512 = 4,
    Blake3 = 5,
}

/// The longest hash of any function served (SHA-512).
pub const MAX_HASH_LEN: usize = 64;

impl Function {
    /// Every function served, in the order Capabilities advertises them.
    pub const ALL: [Function; 5] =
        [Function::Sha256, Function::Blake3, Function::Sha384, Function::Sha512, Function::Sha1];

    /// Hash length in bytes.
    pub fn hash_len(self) -> usize {
        match self {
            Function::Sha1 => 20,
            Function::Sha256 | Function::Blake3 => 32,
            Function::Sha384 => 48,
            Function::Sha512 => 64,
        }
    }

    /// The lowercase name used in resource names and messages.
    pub fn name(self) -> &'static str {
        match self {
            Function::Sha256 => "sha256",
            Function::Sha1 => "sha1",
            Function::Sha384 => "sha384",
            Function::Sha512 => "sha512",
            Function::Blake3 => "blake3",
        }
    }

    pub fn to_wire(self) -> WireFunction {
        match self {
            Function::Sha256 => WireFunction::Sha256,
            Function::Sha1 => WireFunction::Sha1,
            Function::Sha384 => WireFunction::Sha384,
            Function::Sha512 => WireFunction::Sha512,
            Function::Blake3 => WireFunction::Blake3,
        }
    }

    /// The function behind a key byte (its discriminant).
    pub fn from_byte(b: u8) -> Option<Function> {
        Function::ALL.into_iter().find(|f| *f as u8 == b)
    }

    /// Resolves the `digest_function` field of a request. Unset (UNKNOWN)
    /// means the client predates REAPI 2.3: each hash's length tells.
    pub fn from_request(value: i32) -> Result<FunctionHint, Error> {
        match WireFunction::try_from(value) {
            Ok(WireFunction::Unknown) => Ok(FunctionHint::ByLength),
            Ok(wire) => Function::ALL
                .into_iter()
                .find(|f| f.to_wire() == wire)
                .map(FunctionHint::Given)
                .ok_or_else(|| Error::UnsupportedFunction(wire.as_str_name().to_lowercase())),
            Err(_) => Err(Error::UnsupportedFunction(format!("enum value {value}"))),
        }
    }

    /// Hashes `data` (on the calling thread: keep large inputs off the runtime).
    pub fn digest(self, data: &[u8]) -> Digest {
        let mut hasher = Hasher::new(self);
        hasher.update(data);
        hasher.finish()
    }

    fn hex_len_rule(self) -> &'static str {
        match self {
            Function::Sha1 => "must be 40 hex digits for sha1",
            Function::Sha256 => "must be 64 hex digits for sha256",
            Function::Blake3 => "must be 64 hex digits for blake3",
            Function::Sha384 => "must be 96 hex digits for sha384",
            Function::Sha512 => "must be 128 hex digits for sha512",
        }
    }

    /// The function whose hashes have `hex_len` hex digits, among those that
    /// may be inferred (BLAKE3 shares SHA-256's length and never is).
    fn by_hex_len(hex_len: usize) -> Option<Function> {
        [Function::Sha256, Function::Sha1, Function::Sha384, Function::Sha512]
            .into_iter()
            .find(|f| f.hash_len() * 2 == hex_len)
    }
}

/// Which function a request's digests use: named by the request (REAPI 2.3+),
/// or inferred from each hash's length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FunctionHint {
    Given(Function),
    ByLength,
}

/// A parsed, validated content digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    pub function: Function,
    /// The hash, zero-padded past the function's length (so that derived
    /// equality and hashing see only the real bytes).
    hash: [u8; MAX_HASH_LEN],
    pub size: u64,
}

/// The digests of no bytes: the empty blob every server must pretend to hold.
static EMPTY: LazyLock<Vec<Digest>> = LazyLock::new(|| Function::ALL.map(|f| f.digest(b"")).to_vec());

/// Each byte's value as a lowercase hex digit, 0xff for any other byte: a
/// table, so that parsing a hash takes no branch per digit.
const HEX_VALUES: [u8; 256] = {
    let mut table = [0xff; 256];
    let mut i = 0;
    while i < 16 {
        table[b"0123456789abcdef"[i] as usize] = i as u8;
        i += 1;
    }
    table
};

impl Digest {
    /// A digest from raw hash bytes; `None` if their length does not fit the function.
    pub fn new(function: Function, hash: &[u8], size: u64) -> Option<Digest> {
        if hash.len() != function.hash_len() {
            return None;
        }
        let mut padded = [0u8; MAX_HASH_LEN];
        padded[..hash.len()].copy_from_slice(hash);
        Some(Digest { function, hash: padded, size })
    }

    /// Validates a digest from the wire.
    pub fn from_proto(d: &reapi::Digest, function: FunctionHint) -> Result<Digest, Error> {
        Digest::parse(&d.hash, d.size_bytes, function)
    }

    /// Like [`Digest::from_proto`], for an optional field: `None` when unset.
    pub fn from_optional(d: Option<&reapi::Digest>, function: FunctionHint) -> Result<Option<Digest>, Error> {
        d.map(|d| Digest::from_proto(d, function)).transpose()
    }

    pub fn parse(hash: &str, size: i64, function: FunctionHint) -> Result<Digest, Error> {
        let size = u64::try_from(size).map_err(|_| Error::NegativeSize(size))?;
        let function = match function {
            FunctionHint::Given(f) if hash.len() == f.hash_len() * 2 => f,
            FunctionHint::Given(f) => return Err(Error::BadHash(hash.to_string(), f.hex_len_rule())),
            FunctionHint::ByLength => Function::by_hex_len(hash.len()).ok_or_else(|| {
                Error::BadHash(
                    hash.to_string(),
                    "has a length of no digest function (40, 64, 96 or 128 hex digits for sha1, sha256, sha384, sha512; name blake3 explicitly)",
                )
            })?,
        };
        let mut out = [0u8; MAX_HASH_LEN];
        // One pass that takes lowercase hex only, checked at the end (a
        // digit that is not one sets high bits): every FindMissingBlobs
        // digest comes through here.
        let mut invalid = 0;
        for (byte, pair) in out.iter_mut().zip(hash.as_bytes().chunks_exact(2)) {
            let (high, low) = (HEX_VALUES[pair[0] as usize], HEX_VALUES[pair[1] as usize]);
            invalid |= high | low;
            *byte = high << 4 | low;
        }
        if invalid & 0xf0 != 0 {
            if hash.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(Error::BadHash(hash.to_string(), "must be lowercase hex"));
            }
            return Err(Error::BadHash(hash.to_string(), "is not hex"));
        }
        Ok(Digest { function, hash: out, size })
    }

    /// The SHA-256 digest of `data`: the function clients use unless they
    /// name another.
    pub fn of(data: &[u8]) -> Digest {
        Function::Sha256.digest(data)
    }

    pub fn empty(function: Function) -> Digest {
        EMPTY[Function::ALL.iter().position(|f| *f == function).expect("ALL lists every function")]
    }

    pub fn is_empty_blob(&self) -> bool {
        self.size == 0 && *self == Digest::empty(self.function)
    }

    pub fn hash(&self) -> &[u8] {
        &self.hash[..self.function.hash_len()]
    }

    pub fn hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = Vec::with_capacity(self.hash().len() * 2);
        for b in self.hash() {
            out.extend_from_slice(&[DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 15)]]);
        }
        String::from_utf8(out).expect("hex digits are ASCII")
    }

    pub fn to_proto(&self) -> reapi::Digest {
        reapi::Digest { hash: self.hex(), size_bytes: self.size as i64 }
    }
}

impl fmt::Display for Digest {
    /// `hash/size`, with the function first unless it is SHA-256.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.function != Function::Sha256 {
            write!(f, "{}:", self.function.name())?;
        }
        write!(f, "{}/{}", self.hex(), self.size)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A streaming hash of any served function that yields a [`Digest`].
#[derive(Clone)]
pub struct Hasher {
    function: Function,
    state: State,
    len: u64,
}

#[derive(Clone)]
enum State {
    Sha256(sha2::Sha256),
    Sha1(sha1::Sha1),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
    // Boxed: its state is about 2 KiB.
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    pub fn new(function: Function) -> Hasher {
        let state = match function {
            Function::Sha256 => State::Sha256(Default::default()),
            Function::Sha1 => State::Sha1(Default::default()),
            Function::Sha384 => State::Sha384(Default::default()),
            Function::Sha512 => State::Sha512(Default::default()),
            Function::Blake3 => State::Blake3(Default::default()),
        };
        Hasher { function, state, len: 0 }
    }

    pub fn update(&mut self, data: &[u8]) {
        match &mut self.state {
            State::Sha256(h) => h.update(data),
            State::Sha1(h) => h.update(data),
            State::Sha384(h) => h.update(data),
            State::Sha512(h) => h.update(data),
            State::Blake3(h) => {
                h.update(data);
            }
        }
        self.len += data.len() as u64;
    }

    pub fn finish(self) -> Digest {
        let mut hash = [0u8; MAX_HASH_LEN];
        let mut put = |bytes: &[u8]| hash[..bytes.len()].copy_from_slice(bytes);
        match self.state {
            State::Sha256(h) => put(&h.finalize()),
            State::Sha1(h) => put(&h.finalize()),
            State::Sha384(h) => put(&h.finalize()),
            State::Sha512(h) => put(&h.finalize()),
            State::Blake3(h) => put(h.finalize().as_bytes()),
        }
        Digest { function: self.function, hash, size: self.len }
    }
}
/// How a blob's bytes travel on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    /// A zstd stream of one or more frames (`compressed-blobs/zstd/`).
    Zstd,
}

/// The blob a ByteStream resource name designates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobResource {
    pub instance: String,
    pub encoding: Encoding,
    pub digest: Digest,
}

/// Segments an instance name may not contain, because they mark the start of
/// the blob part of a resource name.
const RESERVED: &[&str] =
    &["blobs", "uploads", "actions", "actionResults", "operations", "capabilities", "compressed-blobs"];

/// Parses `{instance}/blobs/{hash}/{size}` or
/// `{instance}/compressed-blobs/{compressor}/{hash}/{size}` (a Read).
pub fn parse_read_resource(name: &str) -> Result<BlobResource, Error> {
    let segments: Vec<&str> = name.split('/').collect();
    let marker = segments
        .iter()
        .position(|s| *s == "blobs" || *s == "compressed-blobs")
        .ok_or_else(|| Error::BadResource(name.to_string(), "has no blobs/ segment"))?;
    if segments[..marker].contains(&"uploads") {
        return Err(Error::BadResource(
            name.to_string(),
            "names an upload: reads take {instance}/blobs/{hash}/{size}",
        ));
    }
    let (blob, rest) = parse_blob_part(name, &segments[marker..])?;
    if !rest.is_empty() {
        return Err(Error::BadResource(name.to_string(), "has segments after the size"));
    }
    let instance = segments[..marker].join("/");
    check_instance(&instance)?;
    Ok(BlobResource { instance, ..blob })
}

/// Parses `{instance}/uploads/{uuid}/blobs/{hash}/{size}{/metadata...}` (a Write).
pub fn parse_write_resource(name: &str) -> Result<BlobResource, Error> {
    let segments: Vec<&str> = name.split('/').collect();
    let marker = segments
        .iter()
        .position(|s| *s == "uploads")
        .ok_or_else(|| Error::BadResource(name.to_string(), "has no uploads/ segment"))?;
    if segments.len() < marker + 2 || segments[marker + 1].is_empty() {
        return Err(Error::BadResource(name.to_string(), "has no upload id after uploads/"));
    }
    // Anything after the size is client metadata and is ignored.
    let (blob, _metadata) = parse_blob_part(name, &segments[marker + 2..])?;
    let instance = segments[..marker].join("/");
    check_instance(&instance)?;
    Ok(BlobResource { instance, ..blob })
}

/// Parses `blobs/[function/]hash/size...` or `compressed-blobs/comp/[function/]hash/size...`,
/// returning the blob and the segments after the size.
fn parse_blob_part<'a>(name: &str, segments: &'a [&'a str]) -> Result<(BlobResource, &'a [&'a str]), Error> {
    let bad = |why| Error::BadResource(name.to_string(), why);
    let (encoding, rest) = match segments.first() {
        Some(&"blobs") => (Encoding::Identity, &segments[1..]),
        Some(&"compressed-blobs") => match segments.get(1) {
            Some(&"zstd") => (Encoding::Zstd, &segments[2..]),
            Some(c) if !c.is_empty() => return Err(Error::UnsupportedCompressor(c.to_string())),
            _ => return Err(bad("has no compressor after compressed-blobs/")),
        },
        _ => return Err(bad("has no blobs/ or compressed-blobs/ segment")),
    };
    // A digest function segment precedes the hash for functions whose hash
    // length is ambiguous (and is accepted for the others); without one,
    // the length tells.
    let (function, rest) = match rest.first() {
        Some(s) if FUNCTION_NAMES.contains(s) => match Function::ALL.into_iter().find(|f| f.name() == *s) {
            Some(f) => (FunctionHint::Given(f), &rest[1..]),
            None => return Err(Error::UnsupportedFunction(s.to_string())),
        },
        _ => (FunctionHint::ByLength, rest),
    };
    let [hash, size, rest @ ..] = rest else {
        return Err(bad("must end in {hash}/{size}"));
    };
    let size: i64 = size.parse().map_err(|_| bad("has a size that is not a number"))?;
    let digest = Digest::parse(hash, size, function)?;
    Ok((BlobResource { instance: String::new(), encoding, digest }, rest))
}

/// Every digest function name REAPI defines, served or not.
const FUNCTION_NAMES: &[&str] =
    &["sha256", "sha1", "md5", "vso", "sha384", "sha512", "murmur3", "sha256tree", "blake3", "gitsha1"];

/// Checks an instance name given in a request field.
pub fn check_instance(name: &str) -> Result<(), Error> {
    if name.contains('\0') {
        // NUL separates the instance from the digest in action cache keys.
        return Err(Error::BadInstance(name.to_string(), "\0".to_string()));
    }
    match name.split('/').find(|s| RESERVED.contains(s)) {
        Some(seg) => Err(Error::BadInstance(name.to_string(), seg.to_string())),
        None => Ok(()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("digest size {0} is negative")]
    NegativeSize(i64),
    #[error("digest hash {0:?} {1}")]
    BadHash(String, &'static str),
    #[error("resource name {0:?} {1}")]
    BadResource(String, &'static str),
    #[error(
        "digest function {0} is not supported by this server (it serves sha256, blake3, sha384, sha512 and sha1)"
    )]
    UnsupportedFunction(String),
    #[error("compressor {0:?} is not supported by this server (it serves zstd)")]
    UnsupportedCompressor(String),
    #[error("instance name {0:?} contains the reserved segment or character {1:?}")]
    BadInstance(String, String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(crate::hostile::config())]

        /// Any name parses or is refused; what parses names the same blob
        /// when written out again, under an instance that is allowed.
        #[test]
        fn resource_names_parse_or_are_refused(name in crate::hostile::path()) {
            if let Ok(read) = parse_read_resource(&name) {
                prop_assert!(check_instance(&read.instance).is_ok());
                let d = read.digest;
                let again = format!("blobs/{}/{}/{}", d.function.name(), d.hex(), d.size);
                prop_assert_eq!(parse_read_resource(&again).unwrap().digest, d);
            }
            if let Ok(write) = parse_write_resource(&name) {
                prop_assert!(check_instance(&write.instance).is_ok());
            }
        }

        #[test]
        fn digests_parse_or_are_refused(hash in crate::hostile::text(), size in any::<i64>(), f in 0i32..12) {
            for hint in [FunctionHint::ByLength, FunctionHint::Given(Function::Blake3)] {
                if let Ok(d) = Digest::parse(&hash, size, hint) {
                    prop_assert_eq!(d.size as i64, size);
                    prop_assert_eq!(d.hex(), hash.to_ascii_lowercase());
                }
            }
            let _ = Function::from_request(f);
        }
    }

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn hashes_parse_as_lowercase_hex_only_and_print_back() {
        for f in Function::ALL {
            let d = f.digest(b"parsed");
            assert_eq!(d.hex(), hex::encode(d.hash()));
            assert_eq!(Digest::parse(&d.hex(), 6, FunctionHint::Given(f)).unwrap(), d);
            let upper = d.hex().to_uppercase();
            let Err(Error::BadHash(_, why)) = Digest::parse(&upper, 6, FunctionHint::Given(f)) else {
                panic!("{upper} parsed")
            };
            assert_eq!(why, "must be lowercase hex");
            let mut bad = d.hex();
            bad.replace_range(bad.len() - 1.., "g");
            let Err(Error::BadHash(_, why)) = Digest::parse(&bad, 6, FunctionHint::Given(f)) else {
                panic!("{bad} parsed")
            };
            assert_eq!(why, "is not hex");
        }
    }

    #[test]
    fn empty_digests_are_the_hashes_of_nothing() {
        assert_eq!(Digest::of(b"").hex(), H);
        assert!(Digest::of(b"").is_empty_blob());
        assert!(!Digest::of(b"x").is_empty_blob());
        // Known answers for the empty input.
        let known = [
            (Function::Sha1, "da39a3ee5e6b4b0d3255bfef95601890afd80709"),
            (Function::Blake3, "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"),
        ];
        for (f, hex) in known {
            assert_eq!(Digest::empty(f).hex(), hex);
            assert!(Digest::empty(f).is_empty_blob());
        }
        for f in Function::ALL {
            assert_eq!(Digest::empty(f).hash().len(), f.hash_len());
        }
        // The same hash bytes under another function are another digest.
        let blake3_as_sha256 = Digest::new(Function::Sha256, Digest::empty(Function::Blake3).hash(), 0);
        assert!(!blake3_as_sha256.unwrap().is_empty_blob());
    }

    #[test]
    fn streaming_hash_equals_one_shot() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        for f in Function::ALL {
            let mut h = Hasher::new(f);
            for part in data.chunks(999) {
                h.update(part);
            }
            assert_eq!(h.finish(), f.digest(&data));
        }
    }

    #[test]
    fn functions_from_requests_and_lengths() {
        assert_eq!(Function::from_request(0).unwrap(), FunctionHint::ByLength);
        assert_eq!(Function::from_request(9).unwrap(), FunctionHint::Given(Function::Blake3));
        assert!(matches!(Function::from_request(3), Err(Error::UnsupportedFunction(f)) if f == "md5"));
        assert!(Function::from_request(99).is_err());
        let sha1 = "da39a3ee5e6b4b0d3255bfef95601890afd80709";
        assert_eq!(Digest::parse(sha1, 0, FunctionHint::ByLength).unwrap().function, Function::Sha1);
        assert_eq!(Digest::parse(H, 0, FunctionHint::ByLength).unwrap().function, Function::Sha256);
        let blake3 = Digest::parse(H, 0, FunctionHint::Given(Function::Blake3)).unwrap();
        assert_eq!((blake3.function, blake3.hex().as_str()), (Function::Blake3, H));
        assert!(Digest::parse(sha1, 0, FunctionHint::Given(Function::Sha256)).is_err());
        assert!(Digest::parse(&H[..62], 0, FunctionHint::ByLength).is_err());
    }

    #[test]
    fn read_resources() {
        let r = parse_read_resource(&format!("blobs/{H}/0")).unwrap();
        assert_eq!((r.instance.as_str(), r.digest.size, r.encoding), ("", 0, Encoding::Identity));
        let r = parse_read_resource(&format!("a/b/blobs/sha256/{H}/12")).unwrap();
        assert_eq!((r.instance.as_str(), r.digest.size), ("a/b", 12));
        let r = parse_read_resource(&format!("x/compressed-blobs/zstd/{H}/5")).unwrap();
        assert_eq!(r.encoding, Encoding::Zstd);
        let r = parse_read_resource(&format!("compressed-blobs/zstd/blake3/{H}/5")).unwrap();
        assert_eq!((r.encoding, r.digest.function), (Encoding::Zstd, Function::Blake3));
        assert!(parse_read_resource(&format!("blobs/{H}")).is_err());
        assert!(parse_read_resource(&format!("blobs/{H}/1/extra")).is_err());
        assert!(parse_read_resource(&format!("blobs/{H}/-1")).is_err());
        assert!(parse_read_resource(&format!("blobs/{}/1", H.to_uppercase())).is_err());
        assert!(matches!(
            parse_read_resource(&format!("blobs/md5/{}/1", &H[..32])),
            Err(Error::UnsupportedFunction(_))
        ));
        assert!(matches!(
            parse_read_resource(&format!("compressed-blobs/deflate/{H}/1")),
            Err(Error::UnsupportedCompressor(_))
        ));
    }

    #[test]
    fn write_resources() {
        let r = parse_write_resource(&format!("uploads/u-1/blobs/{H}/3")).unwrap();
        assert_eq!((r.instance.as_str(), r.digest.size), ("", 3));
        // Metadata after the size may contain anything, even marker words.
        let r = parse_write_resource(&format!("i/j/uploads/u/blobs/{H}/3/blobs/x")).unwrap();
        assert_eq!(r.instance, "i/j");
        let r = parse_write_resource(&format!("uploads/u/compressed-blobs/zstd/blake3/{H}/3")).unwrap();
        assert_eq!((r.encoding, r.digest.function), (Encoding::Zstd, Function::Blake3));
        assert!(parse_write_resource(&format!("uploads/blobs/{H}/3")).is_err());
        assert!(parse_write_resource(&format!("blobs/{H}/3")).is_err());
    }

    #[test]
    fn instance_names() {
        assert!(check_instance("").is_ok());
        assert!(check_instance("team/main").is_ok());
        assert!(check_instance("team/blobs").is_err());
    }
}
