//! Configuration: built-in defaults < config file < `LARDER_*` environment < flags.
//!
//! The built-in defaults are config/larder.toml itself, embedded at build time,
//! so the documented file and the real defaults can never drift apart.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// config/larder.toml: every key, documented, with its default value.
pub const DEFAULT_TOML: &str = include_str!("../config/larder.toml");

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address every client is served on: gRPC, and HTTP (REST and Bazel's
    /// HTTP cache) routed by content type.
    pub listen: SocketAddr,
    /// A second address for HTTP clients, if any ("" for none).
    #[serde(deserialize_with = "optional_addr")]
    pub http_listen: Option<SocketAddr>,
    /// An address serving only /metrics and /healthz, if any ("" for none).
    #[serde(deserialize_with = "optional_addr")]
    pub metrics_listen: Option<SocketAddr>,
    /// Data directory; empty means `$XDG_CACHE_HOME/larder` (else `~/.cache/larder`).
    #[serde(default)]
    pub dir: PathBuf,
    /// Size budget of the data directory.
    pub max_size: ByteSize,
    /// Uncompressed size of the chunks blobs are stored in.
    pub chunk_size: ByteSize,
    /// zstd level for stored chunks (1 is fast; higher trades ingest speed
    /// for disk; 0 stores them uncompressed).
    pub zstd_level: i32,
    /// Chunks of blobs under 256 KiB, from 4 KiB, go to RocksDB's blob files
    /// rather than into SST files.
    pub blob_files: bool,
    /// RocksDB's block cache.
    pub cache_size: ByteSize,
    /// Largest total of blob sizes accepted in one BatchUpdateBlobs or BatchReadBlobs.
    pub max_batch_size: ByteSize,
    /// Largest gRPC message accepted or sent.
    pub max_message_size: ByteSize,
    /// Most entries (digests, blobs, output files...) in one request.
    pub max_call_entries: usize,
    /// Largest Directory or Tree blob GetTree and GetActionResult read.
    pub max_directory_size: ByteSize,
    /// Partial uploads untouched for this long are deleted.
    #[serde(deserialize_with = "duration")]
    pub partial_upload_max_age: Duration,
    /// fsync the write-ahead log on every commit (survives power loss, costs throughput).
    pub sync_writes: bool,
    /// Eviction starts when disk use passes this fraction of max_size...
    pub eviction_high_watermark: f64,
    /// ...and stops below this fraction.
    pub eviction_low_watermark: f64,
    /// Blobs used more recently than this are never evicted.
    #[serde(deserialize_with = "duration")]
    pub eviction_min_age: Duration,
    /// At shutdown, in-flight calls have this long to finish.
    #[serde(deserialize_with = "duration")]
    pub drain_timeout: Duration,
    /// A connection must bring its first call (and an HTTP/1.1 request its
    /// headers) within this long.
    #[serde(deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// A connection with no call in flight for this long is closed.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// Most connections open at once (also bounded by the open-file limit).
    pub max_connections: usize,
    /// Most bytes held for calls in flight, all together.
    pub max_inflight_bytes: ByteSize,
    /// How logs are written to stderr.
    pub log_format: LogFormat,
    /// TLS certificate chain and key (PEM) for every port; empty for plain TCP.
    #[serde(default)]
    pub tls_cert: PathBuf,
    #[serde(default)]
    pub tls_key: PathBuf,
    /// Clients must present a certificate signed by this CA (PEM); empty for none.
    #[serde(default)]
    pub tls_client_ca: PathBuf,
    /// Users and their bcrypt hashes (htpasswd -B); empty for no authentication.
    #[serde(default)]
    pub htpasswd_file: PathBuf,
    /// With htpasswd_file: anonymous clients may read; writes need credentials.
    pub allow_unauthenticated_reads: bool,
    /// With htpasswd_file: the metrics port serves /metrics without credentials.
    pub public_metrics_port: bool,
    /// Bytes per second the server re-hashes stored blobs at, in the
    /// background (0: no online scrub).
    pub scrub_rate: ByteSize,
    /// S3-compatible object store behind the local tier ("" for none).
    #[serde(default)]
    pub s3_endpoint: String,
    #[serde(default)]
    pub s3_bucket: String,
    /// Key prefix of larder's objects in the bucket.
    #[serde(default)]
    pub s3_prefix: String,
    pub s3_region: String,
    /// Path-style addressing (http://host/bucket/key), which self-hosted
    /// stores need; false for virtual-hosted style (http://bucket.host/key).
    pub s3_path_style: bool,
    /// Acknowledge writes once the local tier holds them; copy them to the
    /// object store from the persistent queue (false: write-through).
    pub s3_write_back: bool,
    /// Most bytes of writes waiting for the object store (at most half of
    /// max_size, so that eviction always has room).
    pub s3_queue_size: ByteSize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One compact line per event, for people.
    Compact,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Values given on the command line; `None` leaves the lower layers' value.
#[derive(Debug, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub http_listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub dir: Option<PathBuf>,
    pub max_size: Option<String>,
    pub drain_timeout: Option<String>,
    pub log_format: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub htpasswd_file: Option<PathBuf>,
    /// `Some(true)` when the flag is given.
    pub allow_unauthenticated_reads: Option<bool>,
    /// `Some(true)` when the flag is given.
    pub public_metrics_port: Option<bool>,
    pub scrub_rate: Option<String>,
    pub s3_endpoint: Option<String>,
    pub s3_bucket: Option<String>,
    pub s3_prefix: Option<String>,
    pub s3_region: Option<String>,
    /// `Some(true)` when the flag is given.
    pub s3_write_back: Option<bool>,
    pub s3_queue_size: Option<String>,
}

impl Config {
    /// Layers the sources and validates the result.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Config, Error> {
        use config::{Environment, File, FileFormat};
        let mut builder =
            config::Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(file) = file {
            if !file.exists() {
                return Err(Error::Missing(file.to_path_buf()));
            }
            builder = builder.add_source(File::from(file).format(FileFormat::Toml));
        }
        builder = builder.add_source(Environment::with_prefix("LARDER"));
        builder = builder
            .set_override_option("listen", overrides.listen)?
            .set_override_option("http_listen", overrides.http_listen)?
            .set_override_option("metrics_listen", overrides.metrics_listen)?
            .set_override_option("dir", overrides.dir.map(|d| d.display().to_string()))?
            .set_override_option("max_size", overrides.max_size)?
            .set_override_option("drain_timeout", overrides.drain_timeout)?
            .set_override_option("log_format", overrides.log_format)?
            .set_override_option("tls_cert", overrides.tls_cert.map(|p| p.display().to_string()))?
            .set_override_option("tls_key", overrides.tls_key.map(|p| p.display().to_string()))?
            .set_override_option("tls_client_ca", overrides.tls_client_ca.map(|p| p.display().to_string()))?
            .set_override_option("htpasswd_file", overrides.htpasswd_file.map(|p| p.display().to_string()))?
            .set_override_option("allow_unauthenticated_reads", overrides.allow_unauthenticated_reads)?
            .set_override_option("public_metrics_port", overrides.public_metrics_port)?
            .set_override_option("scrub_rate", overrides.scrub_rate)?
            .set_override_option("s3_endpoint", overrides.s3_endpoint)?
            .set_override_option("s3_bucket", overrides.s3_bucket)?
            .set_override_option("s3_prefix", overrides.s3_prefix)?
            .set_override_option("s3_region", overrides.s3_region)?
            .set_override_option("s3_write_back", overrides.s3_write_back)?
            .set_override_option("s3_queue_size", overrides.s3_queue_size)?;
        let mut config: Config = builder.build()?.try_deserialize()?;
        if config.dir.as_os_str().is_empty() {
            config.dir = default_dir()?;
        }
        config.validate()?;
        Ok(config)
    }

    /// The object store tier, if one is configured.
    pub fn s3(&self) -> Option<crate::objstore::Settings> {
        (!self.s3_endpoint.is_empty()).then(|| crate::objstore::Settings {
            endpoint: self.s3_endpoint.clone(),
            bucket: self.s3_bucket.clone(),
            prefix: self.s3_prefix.clone(),
            region: self.s3_region.clone(),
            path_style: self.s3_path_style,
            max_action_result: self.max_message_size.0 as usize,
        })
    }

    /// The store settings this configuration asks for.
    pub fn store_options(&self) -> crate::store::StoreOptions {
        crate::store::StoreOptions {
            chunk_size: self.chunk_size.0 as usize,
            zstd_level: self.zstd_level,
            sync_writes: self.sync_writes,
            blob_files: self.blob_files,
            cache_size: self.cache_size.0 as usize,
            max_size: self.max_size.0,
            queue_limit: self.queue_limit(),
        }
    }

    /// Bytes of writes that may wait in the queue for the object store: 0
    /// without one (nothing is queued).
    pub fn queue_limit(&self) -> u64 {
        match self.s3_endpoint.is_empty() {
            true => 0,
            false => self.s3_queue_size.0.clamp(1, self.max_size.0 / 2),
        }
    }

    /// The TLS files, if TLS is on: certificate, key, and client CA.
    pub fn tls(&self) -> Option<(&Path, &Path, Option<&Path>)> {
        let ca = Some(self.tls_client_ca.as_path()).filter(|p| !p.as_os_str().is_empty());
        (!self.tls_cert.as_os_str().is_empty()).then_some((
            self.tls_cert.as_path(),
            self.tls_key.as_path(),
            ca,
        ))
    }

    fn validate(&self) -> Result<(), Error> {
        let invalid = |key: &str, why: String| Err(Error::Invalid(key.to_string(), why));
        if !(4 << 10..=crate::store::chunk::MAX_CHUNK_SIZE as u64).contains(&self.chunk_size.0) {
            return invalid("chunk_size", "must be between 4KiB and 64MiB".into());
        }
        if !self.s3_endpoint.is_empty() && self.s3_bucket.is_empty() {
            return invalid("s3_bucket", "is required with s3_endpoint".into());
        }
        if self.s3_write_back && self.s3_endpoint.is_empty() {
            return invalid("s3_write_back", "only means something with s3_endpoint".into());
        }
        if !(0..=22).contains(&self.zstd_level) {
            return invalid("zstd_level", "must be between 0 (no compression) and 22".into());
        }
        if self.max_message_size.0 < self.max_batch_size.0 + (1 << 20) {
            return invalid(
                "max_message_size",
                format!("must exceed max_batch_size ({}) by at least 1MiB", self.max_batch_size),
            );
        }
        if !(0.0 < self.eviction_low_watermark
            && self.eviction_low_watermark < self.eviction_high_watermark
            && self.eviction_high_watermark <= 1.0)
        {
            return invalid(
                "eviction_low_watermark",
                format!(
                    "watermarks must satisfy 0 < low ({}) < high ({}) <= 1",
                    self.eviction_low_watermark, self.eviction_high_watermark
                ),
            );
        }
        if self.max_size.0 < 16 << 20 {
            return invalid("max_size", format!("{} is too small: use at least 16MiB", self.max_size));
        }
        let set = |p: &PathBuf| !p.as_os_str().is_empty();
        if set(&self.tls_cert) != set(&self.tls_key) {
            return invalid("tls_cert", "tls_cert and tls_key go together: give both, or neither".into());
        }
        if set(&self.tls_client_ca) && !set(&self.tls_cert) {
            return invalid("tls_client_ca", "mutual TLS needs TLS: give tls_cert and tls_key too".into());
        }
        if self.allow_unauthenticated_reads && !set(&self.htpasswd_file) {
            return invalid(
                "allow_unauthenticated_reads",
                "only means something with htpasswd_file: without one, everyone may read and write".into(),
            );
        }
        if self.header_timeout < Duration::from_secs(1) || self.idle_timeout < self.header_timeout {
            return invalid(
                "idle_timeout",
                format!(
                    "header_timeout ({:?}) must be at least 1s, and idle_timeout ({:?}) at least as long",
                    self.header_timeout, self.idle_timeout
                ),
            );
        }
        if self.max_inflight_bytes.0 < 16 << 20 {
            return invalid("max_inflight_bytes", "must be at least 16MiB".into());
        }
        if self.max_connections < 16 {
            return invalid("max_connections", "must be at least 16".into());
        }
        if self.max_call_entries < 1000 {
            return invalid(
                "max_call_entries",
                format!("{} is too few: use at least 1000", self.max_call_entries),
            );
        }
        if self.max_directory_size.0 < 64 << 10 {
            return invalid("max_directory_size", "must be at least 64KiB".into());
        }
        if self.public_metrics_port && self.metrics_listen.is_none() {
            return invalid(
                "public_metrics_port",
                "only means something with metrics_listen: the main port's /metrics needs read access".into(),
            );
        }
        if self.max_message_size.0 > 1 << 30 {
            return invalid("max_message_size", "must be at most 1GiB".into());
        }
        Ok(())
    }
}

/// An address, or nothing for "".
fn optional_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| serde::de::Error::custom(format!("{s:?} is not an address like 127.0.0.1:8080")))
}

fn default_dir() -> Result<PathBuf, Error> {
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("larder"));
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".cache").join("larder")),
        None => {
            Err(Error::Invalid("dir".into(), "neither XDG_CACHE_HOME nor HOME is set: pass --dir".into()))
        }
    }
}

/// A byte count written in human units: `10GiB`, `512 MiB`, `1GB`, `4096`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<ByteSize, String> {
        let s = s.trim();
        let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let number: f64 =
            number.parse().map_err(|_| format!("{s:?} is not a size (examples: 4096, 64KiB, 10GiB, 1TB)"))?;
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            "t" | "tb" => 1_000_000_000_000,
            "tib" => 1 << 40,
            other => {
                return Err(format!(
                    "unknown size unit {other:?} in {s:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
                ));
            }
        };
        Ok(ByteSize((number * multiplier as f64) as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        if unit == 0 || value.fract() == 0.0 {
            write!(f, "{}{}", value, UNITS[unit])
        } else {
            write!(f, "{:.1}{}", value, UNITS[unit])
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration like 90s, 30m or 2h: {e}")))
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config file {0} does not exist")]
    Missing(PathBuf),
    #[error("{0}")]
    Load(#[from] config::ConfigError),
    #[error("config key {0}: {1}")]
    Invalid(String, String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(crate::hostile::config())]

        /// Any text is a size or is refused; a size written out reads back.
        #[test]
        fn sizes_parse_or_are_refused(text in crate::hostile::text(), n in any::<u64>()) {
            if let Ok(size) = text.parse::<ByteSize>() {
                prop_assert!(size.to_string().parse::<ByteSize>().is_ok());
            }
            prop_assert!(ByteSize(n).to_string().parse::<ByteSize>().is_ok());
            let _ = humantime::parse_duration(&text);
            // Every key's value from the environment's side: a string.
            let toml = format!("max_size = {:?}\nidle_timeout = {:?}\nmax_call_entries = {:?}\n", text, text, text);
            let _ = config::Config::builder()
                .add_source(config::File::from_str(DEFAULT_TOML, config::FileFormat::Toml))
                .add_source(config::File::from_str(&toml, config::FileFormat::Toml))
                .build()
                .and_then(|c| c.try_deserialize::<Config>());
        }
    }

    #[test]
    fn sizes() {
        assert_eq!("10GiB".parse::<ByteSize>().unwrap(), ByteSize(10 << 30));
        assert_eq!("512 MiB".parse::<ByteSize>().unwrap(), ByteSize(512 << 20));
        assert_eq!("1GB".parse::<ByteSize>().unwrap(), ByteSize(1_000_000_000));
        assert_eq!("4096".parse::<ByteSize>().unwrap(), ByteSize(4096));
        assert_eq!("1.5KiB".parse::<ByteSize>().unwrap(), ByteSize(1536));
        assert!("ten".parse::<ByteSize>().is_err());
        assert!("10 parsecs".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(10 << 30).to_string(), "10GiB");
    }

    #[test]
    fn embedded_defaults_load() {
        let config = Config::load(None, Overrides::default()).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:9092");
        assert_eq!(config.max_size, ByteSize(10 << 30));
        assert!(config.dir.ends_with("larder"));
    }

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("larder.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:1\"\nmax_size = \"1GiB\"\n").unwrap();
        let config =
            Config::load(Some(&file), Overrides { max_size: Some("2GiB".into()), ..Overrides::default() })
                .unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:1");
        assert_eq!(config.max_size, ByteSize(2 << 30));
        std::fs::write(&file, "no_such_key = 1\n").unwrap();
        let err = Config::load(Some(&file), Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("no_such_key"), "{err}");
    }
}
