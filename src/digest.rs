//! Digests and the ByteStream resource names that carry them.
//!
//! Everything a client sends that names a blob is parsed here, once, into a
//! [`Digest`]; the rest of larder never looks at hex strings or resource names.

use std::fmt;

use sha2::{Digest as _, Sha256};

use crate::proto::reapi;

/// The hash functions larder stores blobs under. The discriminant is part of
/// the on-disk key layout: never renumber.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Function {
    Sha256 = 1,
}

impl Function {
    /// Resolves the `digest_function` field of a request. UNKNOWN (0) means
    /// "infer from the hash length", which for the functions served is SHA-256.
    pub fn from_request(value: i32) -> Result<Function, Error> {
        match reapi::digest_function::Value::try_from(value) {
            Ok(reapi::digest_function::Value::Unknown | reapi::digest_function::Value::Sha256) => {
                Ok(Function::Sha256)
            }
            Ok(other) => Err(Error::UnsupportedFunction(other.as_str_name().to_lowercase())),
            Err(_) => Err(Error::UnsupportedFunction(format!("enum value {value}"))),
        }
    }
}

/// A parsed, validated content digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest {
    pub function: Function,
    pub hash: [u8; 32],
    pub size: u64,
}

/// SHA-256 of no bytes: the empty blob every server must pretend to hold.
const EMPTY_SHA256: [u8; 32] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24, 0x27,
    0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

impl Digest {
    /// Validates a digest from the wire.
    pub fn from_proto(d: &reapi::Digest, function: Function) -> Result<Digest, Error> {
        Digest::parse(&d.hash, d.size_bytes, function)
    }

    /// Like [`Digest::from_proto`], for an optional field: `None` when unset.
    pub fn from_optional(d: Option<&reapi::Digest>, function: Function) -> Result<Option<Digest>, Error> {
        d.map(|d| Digest::from_proto(d, function)).transpose()
    }

    pub fn parse(hash: &str, size: i64, function: Function) -> Result<Digest, Error> {
        let size = u64::try_from(size).map_err(|_| Error::NegativeSize(size))?;
        if hash.len() != 64 {
            return Err(Error::BadHash(hash.to_string(), "must be 64 hex digits for SHA-256"));
        }
        if hash.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(Error::BadHash(hash.to_string(), "must be lowercase hex"));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hash, &mut out).map_err(|_| Error::BadHash(hash.to_string(), "is not hex"))?;
        Ok(Digest { function, hash: out, size })
    }

    /// Hashes `data` (on the calling thread: keep large inputs off the runtime).
    pub fn of(data: &[u8]) -> Digest {
        Digest { function: Function::Sha256, hash: Sha256::digest(data).into(), size: data.len() as u64 }
    }

    pub fn empty(function: Function) -> Digest {
        match function {
            Function::Sha256 => Digest { function, hash: EMPTY_SHA256, size: 0 },
        }
    }

    pub fn is_empty_blob(&self) -> bool {
        self.size == 0 && *self == Digest::empty(self.function)
    }

    pub fn hex(&self) -> String {
        hex::encode(self.hash)
    }

    pub fn to_proto(&self) -> reapi::Digest {
        reapi::Digest { hash: self.hex(), size_bytes: self.size as i64 }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hex(), self.size)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A streaming SHA-256 that yields a [`Digest`].
#[derive(Clone, Default)]
pub struct Hasher {
    inner: Sha256,
    len: u64,
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        self.inner.update(data);
        self.len += data.len() as u64;
    }

    pub fn finish(self) -> Digest {
        Digest { function: Function::Sha256, hash: self.inner.finalize().into(), size: self.len }
    }
}

/// The blob a ByteStream resource name designates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobResource {
    pub instance: String,
    pub compressor: Option<String>,
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
    let (blob, rest) = parse_blob_part(name, &segments[marker..])?;
    if !rest.is_empty() {
        return Err(Error::BadResource(name.to_string(), "has segments after the size"));
    }
    Ok(BlobResource { instance: segments[..marker].join("/"), ..blob })
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
    Ok(BlobResource { instance: segments[..marker].join("/"), ..blob })
}

/// Parses `blobs/[function/]hash/size...` or `compressed-blobs/comp/[function/]hash/size...`,
/// returning the blob and the segments after the size.
fn parse_blob_part<'a>(name: &str, segments: &'a [&'a str]) -> Result<(BlobResource, &'a [&'a str]), Error> {
    let bad = |why| Error::BadResource(name.to_string(), why);
    let (compressor, rest) = match segments.first() {
        Some(&"blobs") => (None, &segments[1..]),
        Some(&"compressed-blobs") => match segments.get(1) {
            Some(c) if !c.is_empty() => (Some(c.to_string()), &segments[2..]),
            _ => return Err(bad("has no compressor after compressed-blobs/")),
        },
        _ => return Err(bad("has no blobs/ or compressed-blobs/ segment")),
    };
    // An explicit digest function segment precedes the hash only for functions
    // whose hash length is ambiguous; none of those is served yet.
    let (function, rest) = match rest.first() {
        Some(&"sha256") => (Function::Sha256, &rest[1..]),
        Some(f) if is_function_name(f) => {
            return Err(Error::UnsupportedFunction(f.to_string()));
        }
        _ => (Function::Sha256, rest),
    };
    let [hash, size, rest @ ..] = rest else {
        return Err(bad("must end in {hash}/{size}"));
    };
    let size: i64 = size.parse().map_err(|_| bad("has a size that is not a number"))?;
    let digest = Digest::parse(hash, size, function)?;
    Ok((BlobResource { instance: String::new(), compressor, digest }, rest))
}

fn is_function_name(s: &str) -> bool {
    matches!(s, "sha1" | "sha384" | "sha512" | "md5" | "blake3" | "sha256tree" | "vso" | "gitsha1")
}

/// Checks an instance name given in a request field.
pub fn check_instance(name: &str) -> Result<(), Error> {
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
    #[error("digest function {0} is not supported by this server (it serves sha256)")]
    UnsupportedFunction(String),
    #[error("instance name {0:?} contains the reserved segment {1:?}")]
    BadInstance(String, String),
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn empty_constant_is_sha256_of_nothing() {
        assert_eq!(Digest::of(b""), Digest::empty(Function::Sha256));
        assert!(Digest::of(b"").is_empty_blob());
        assert!(!Digest::of(b"x").is_empty_blob());
    }

    #[test]
    fn read_resources() {
        let r = parse_read_resource(&format!("blobs/{H}/0")).unwrap();
        assert_eq!((r.instance.as_str(), r.digest.size), ("", 0));
        let r = parse_read_resource(&format!("a/b/blobs/sha256/{H}/12")).unwrap();
        assert_eq!((r.instance.as_str(), r.digest.size), ("a/b", 12));
        let r = parse_read_resource(&format!("x/compressed-blobs/zstd/{H}/5")).unwrap();
        assert_eq!(r.compressor.as_deref(), Some("zstd"));
        assert!(parse_read_resource(&format!("blobs/{H}")).is_err());
        assert!(parse_read_resource(&format!("blobs/{H}/1/extra")).is_err());
        assert!(parse_read_resource(&format!("blobs/{H}/-1")).is_err());
        assert!(parse_read_resource(&format!("blobs/{}/1", H.to_uppercase())).is_err());
        assert!(matches!(
            parse_read_resource(&format!("blobs/blake3/{H}/1")),
            Err(Error::UnsupportedFunction(_))
        ));
    }

    #[test]
    fn write_resources() {
        let r = parse_write_resource(&format!("uploads/u-1/blobs/{H}/3")).unwrap();
        assert_eq!((r.instance.as_str(), r.digest.size), ("", 3));
        // Metadata after the size may contain anything, even marker words.
        let r = parse_write_resource(&format!("i/j/uploads/u/blobs/{H}/3/blobs/x")).unwrap();
        assert_eq!(r.instance, "i/j");
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
