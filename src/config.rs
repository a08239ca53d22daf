//! Configuration: built-in defaults < config file < `LARDER_*` environment < flags.
//!
//! Every option is declared once, in the `options!` table below: its
//! section, name, type and help. From that one declaration come the
//! [`Config`] struct, the `larder serve` flag (`--max-size`), the
//! environment variable (`LARDER_MAX_SIZE`) and the keys a file may use:
//! `max_size` under `[store]`, or its flat name `max_size` (the flag's name
//! with underscores), which larder has always read.
//!
//! The built-in defaults are config/larder.toml itself, embedded at build time,
//! so the documented file and the real defaults can never drift apart.

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// config/larder.toml: every key, documented, with its default value.
pub const DEFAULT_TOML: &str = include_str!("../config/larder.toml");

/// Declares the sections and their options, once: see the module comment.
/// Each section names the prefix its options' flat names carry (`tls_` makes
/// `[tls] cert` the flag `--tls-cert`); each option, the value name its flag
/// shows (`BOOL` for a switch, which may be given without a value) and,
/// rarely, an alias of its flag.
macro_rules! options {
    ($(
        $(#[doc = $section_doc:literal])+
        [$section:ident] $Section:ident, flat $prefix:literal {
            $(
                $(#[doc = $doc:literal])+
                $(#[serde($($serde:tt)*)])*
                $name:ident: $ty:ty, $value_name:literal $(, alias $alias:literal)?;
            )*
        }
    )*) => {
        $(
            $(#[doc = $section_doc])+
            #[derive(Clone, Debug, Deserialize)]
            #[serde(deny_unknown_fields)]
            pub struct $Section {
                $( $(#[doc = $doc])+ $(#[serde($($serde)*)])* pub $name: $ty, )*
            }
        )*

        /// The whole configuration, a section at a time.
        #[derive(Clone, Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct Config {
            $( $(#[doc = $section_doc])+ pub $section: $Section, )*
            /// What loading noticed but did not refuse (unknown `LARDER_*`
            /// variables), to log once logging is set up.
            #[serde(skip)]
            pub warnings: Vec<String>,
        }

        /// Every option, in declaration order.
        const OPTIONS: &[Opt] = &[
            $( $( Opt {
                section: stringify!($section),
                name: stringify!($name),
                flat: concat!($prefix, stringify!($name)),
                doc: concat!($($doc, "\n"),+),
                value_name: $value_name,
                alias: options!(@alias $($alias)?),
            }, )* )*
        ];

        /// The sections, for reading files.
        const SECTIONS: &[&str] = &[$(stringify!($section)),*];
    };
    (@alias) => { None };
    (@alias $alias:literal) => { Some($alias) };
}

options! {
    /// Listeners, connections and logs.
    [server] Server, flat "" {
        /// Address every client is served on: gRPC, and HTTP (REST and
        /// Bazel's HTTP cache) routed by content type. Port 0 picks a free port.
        listen: SocketAddr, "ADDR:PORT";
        /// A second address for HTTP clients, if any.
        #[serde(default, deserialize_with = "optional")]
        http_listen: Option<SocketAddr>, "ADDR:PORT";
        /// An address serving only /metrics and /healthz, if any.
        #[serde(default, deserialize_with = "optional")]
        metrics_listen: Option<SocketAddr>, "ADDR:PORT";
        /// At shutdown, in-flight calls have this long to finish.
        #[serde(deserialize_with = "duration")]
        drain_timeout: Duration, "DURATION";
        /// A connection must bring its first call (and an HTTP/1.1 request
        /// its headers) within this long.
        #[serde(deserialize_with = "duration")]
        header_timeout: Duration, "DURATION";
        /// A connection with no call in flight for this long is closed.
        #[serde(deserialize_with = "duration")]
        idle_timeout: Duration, "DURATION";
        /// Most connections open at once (also bounded by the open-file limit).
        max_connections: usize, "N";
        /// Most bytes held for calls in flight, all together.
        max_inflight_bytes: ByteSize, "SIZE";
        /// How logs are written to stderr: compact (for people) or json
        /// (for log collectors).
        log_format: LogFormat, "FORMAT";
        /// Store and serve Bazel's HTTP cache's /ac/ bodies as they come,
        /// unchecked (ccache's entries are not ActionResults), apart from
        /// the action cache gRPC and REST serve.
        disable_http_ac_validation: bool, "BOOL";
    }

    /// The data directory and how blobs are stored in it.
    [store] Store, flat "" {
        /// Data directory [default: $XDG_CACHE_HOME/larder, else ~/.cache/larder].
        #[serde(default, deserialize_with = "path_or_empty")]
        dir: PathBuf, "PATH";
        /// Size budget of the data directory (the real bytes on disk).
        max_size: ByteSize, "SIZE";
        /// Uncompressed size of the chunks blobs are stored in.
        chunk_size: ByteSize, "SIZE";
        /// zstd level of stored chunks (1 is fast; higher trades ingest
        /// speed for disk; 0 stores them uncompressed).
        zstd_level: i32, "LEVEL";
        /// Blobs of at least this size are cut into content-defined chunks,
        /// each stored once however many blobs contain it (0: no
        /// deduplication).
        dedup_min_size: ByteSize, "SIZE";
        /// Chunks of blobs under 256 KiB, from 4 KiB, go to RocksDB's blob
        /// files rather than into SST files.
        blob_files: bool, "BOOL";
        /// RocksDB's block cache.
        cache_size: ByteSize, "SIZE";
        /// Memory for the digests of present blobs, which FindMissingBlobs
        /// is answered from (at most 76 bytes a blob; 0: every lookup reads
        /// RocksDB).
        index_memory: ByteSize, "SIZE";
        /// fsync the write-ahead log on every commit (survives power loss,
        /// costs throughput).
        sync_writes: bool, "BOOL";
        /// Partial uploads untouched for this long are deleted.
        #[serde(deserialize_with = "duration")]
        partial_upload_max_age: Duration, "DURATION";
        /// Bytes per second the server re-hashes stored blobs at, in the
        /// background (0: no online scrub).
        scrub_rate: ByteSize, "SIZE";
    }

    /// How eviction keeps the data directory under its size budget.
    [eviction] Eviction, flat "eviction_" {
        /// Eviction starts when disk use passes this fraction of max_size...
        high_watermark: f64, "FRACTION";
        /// ...and stops below this fraction.
        low_watermark: f64, "FRACTION";
        /// Blobs used more recently than this are never evicted. A use is
        /// written to disk only if it comes at least half this long after
        /// the last one written, so a blob may be kept up to 1.5 times it.
        #[serde(deserialize_with = "duration")]
        min_age: Duration, "DURATION";
    }

    /// What one call may ask for.
    [limits] Limits, flat "" {
        /// Largest total of blob sizes in one BatchUpdateBlobs or
        /// BatchReadBlobs (advertised).
        max_batch_size: ByteSize, "SIZE";
        /// Largest gRPC message accepted or sent.
        max_message_size: ByteSize, "SIZE";
        /// Most entries (digests, blobs, output files...) in one request.
        max_call_entries: usize, "N";
        /// Largest Directory or Tree blob GetTree and GetActionResult read.
        max_directory_size: ByteSize, "SIZE";
        /// Largest blob accepted in any upload (advertised); 0: no limit.
        max_blob_size: ByteSize, "SIZE";
    }

    /// TLS on every port.
    [tls] Tls, flat "tls_" {
        /// TLS certificate chain (PEM) for every port; needs the key.
        #[serde(default, deserialize_with = "optional")]
        cert: Option<PathBuf>, "FILE";
        /// TLS private key (PEM).
        #[serde(default, deserialize_with = "optional")]
        key: Option<PathBuf>, "FILE";
        /// Clients must present a certificate signed by this CA (PEM):
        /// mutual TLS.
        #[serde(default, deserialize_with = "optional")]
        client_ca: Option<PathBuf>, "FILE";
    }

    /// Who may call.
    [auth] Auth, flat "" {
        /// Users and their bcrypt hashes (htpasswd -B): clients must
        /// authenticate.
        #[serde(default, deserialize_with = "optional")]
        htpasswd_file: Option<PathBuf>, "FILE", alias "htpasswd";
        /// With htpasswd_file: anonymous clients may read; writes need
        /// credentials.
        allow_unauthenticated_reads: bool, "BOOL";
        /// With htpasswd_file: the metrics port serves /metrics without
        /// credentials, for Prometheus.
        public_metrics_port: bool, "BOOL";
    }

    /// The Remote Asset API's downloads (FetchBlob of a URI no one pushed).
    [assets] Assets, flat "" {
        /// Hosts FetchBlob may download from: names (`github.com`), domains
        /// (`*.example.com`), or `*` for any host at a public address.
        /// Empty: no downloads; Fetch answers only from pushed records.
        #[serde(deserialize_with = "parsed")]
        download_allow: crate::download::AllowList, "HOSTS";
        /// Headers to send to some hosts, one `HOST HEADER: VALUE` a line
        /// (`mirror.example.com Authorization: Bearer ...`); never logged.
        #[serde(default, deserialize_with = "optional")]
        download_credentials: Option<PathBuf>, "FILE";
        /// More CA certificates (PEM) to trust for HTTPS downloads, beside
        /// the system's.
        #[serde(default, deserialize_with = "optional")]
        download_ca_file: Option<PathBuf>, "FILE";
        /// Largest download (also bounded by max_blob_size).
        download_max_size: ByteSize, "SIZE";
        /// Longest a download may take (a request's `timeout` may ask for less).
        #[serde(deserialize_with = "duration")]
        download_timeout: Duration, "DURATION";
    }

    /// The object store tier: an S3-compatible bucket larder nodes share.
    [s3] S3, flat "s3_" {
        /// S3-compatible object store behind the local tier, e.g.
        /// http://127.0.0.1:7480 (credentials: AWS_ACCESS_KEY_ID and
        /// AWS_SECRET_ACCESS_KEY, or AWS_PROFILE).
        #[serde(default, deserialize_with = "optional")]
        endpoint: Option<String>, "URL";
        /// Bucket of the object store tier.
        #[serde(default, deserialize_with = "optional")]
        bucket: Option<String>, "NAME";
        /// Key prefix of larder's objects in the bucket.
        #[serde(default)]
        prefix: String, "PREFIX";
        /// Region of the object store.
        region: String, "REGION";
        /// Path-style addressing (http://host/bucket/key), which
        /// self-hosted stores need; false for virtual-hosted style.
        path_style: bool, "BOOL";
        /// Acknowledge writes once the local tier holds them, and copy them
        /// to the object store from a persistent queue (false: write-through).
        write_back: bool, "BOOL";
        /// Most bytes of writes waiting for the object store (at most half
        /// of max_size, so that eviction always has room).
        queue_size: ByteSize, "SIZE";
        /// A blob this node wrote, read or found in the object store is
        /// not asked about again for this long.
        #[serde(deserialize_with = "duration")]
        existence_ttl: Duration, "DURATION";
        /// Most blobs remembered present at once (8 bytes each; 0: none).
        existence_entries: usize, "N";
        /// Most small blobs indexed in packs (about 70 bytes each; 0: no
        /// packs: each blob is an object of its own).
        pack_index_entries: usize, "N";
        /// FindMissingBlobs waits this long for the object store; blobs not
        /// answered by then count as missing (clients send them again).
        #[serde(deserialize_with = "duration")]
        lookup_timeout: Duration, "DURATION";
        /// Bytes the bucket may hold; beyond them, the least recently used
        /// objects are deleted (0: no limit). Set it on every node.
        max_size: ByteSize, "SIZE";
        /// Which node trims: `lease` (nodes take turns through the bucket),
        /// `always` (this node; say `never` on the others) or `never`.
        trim: crate::objstore::trim::Turns, "TURNS";
        /// How often the trimming node measures the bucket.
        #[serde(deserialize_with = "duration")]
        trim_interval: Duration, "DURATION";
        /// Objects used more recently are never trimmed (at least
        /// s3_existence_ttl + s3_touch_interval).
        #[serde(deserialize_with = "duration")]
        trim_min_age: Duration, "DURATION";
        /// Each node records a use of one object in the bucket at most
        /// this often.
        #[serde(deserialize_with = "duration")]
        touch_interval: Duration, "DURATION";
        /// A trimming node silent this long loses its turn to another.
        #[serde(deserialize_with = "duration")]
        trim_lease: Duration, "DURATION";
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One compact line per event, for people.
    Compact,
    /// One JSON object per line, for log collectors.
    Json,
}

/// One option, as the `options!` table declares it.
#[derive(Debug)]
struct Opt {
    section: &'static str,
    name: &'static str,
    /// Its name outside the file's sections: the flag's and the variable's.
    flat: &'static str,
    doc: &'static str,
    value_name: &'static str,
    alias: Option<&'static str>,
}

impl Opt {
    fn by_flat(flat: &str) -> Option<&'static Opt> {
        OPTIONS.iter().find(|o| o.flat == flat)
    }

    fn in_section(section: &str, name: &str) -> Option<&'static Opt> {
        OPTIONS.iter().find(|o| o.section == section && o.name == name)
    }

    /// Its key in the layered configuration: `section.name`.
    fn key(&self) -> String {
        format!("{}.{}", self.section, self.name)
    }

    /// Its value in the embedded defaults, as written there (for --help).
    fn default(&self) -> Option<String> {
        let mut section = "";
        for line in DEFAULT_TOML.lines() {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name;
            } else if section == self.section
                && let Some((key, value)) = line.split_once(" = ")
                && key == self.name
            {
                return Some(value.trim_matches('"').to_string());
            }
        }
        None
    }

    fn switch(&self) -> bool {
        self.value_name == "BOOL"
    }

    fn arg(&'static self) -> clap::Arg {
        let help = self.doc.split_whitespace().collect::<Vec<_>>().join(" ");
        let (section, name, variable) = (self.section, self.name, self.flat.to_uppercase());
        let default = self.default().map(|d| format!("default: {d}; ")).unwrap_or_default();
        let arg = clap::Arg::new(self.flat)
            .long(self.flat.replace('_', "-"))
            .value_name(self.value_name)
            .help(format!("{help} [{default}file: {name} in [{section}]; env: LARDER_{variable}]"));
        let arg = match self.alias {
            Some(alias) => arg.visible_alias(alias),
            None => arg,
        };
        match self.switch() {
            true => arg.num_args(0..=1).require_equals(true).default_missing_value("true"),
            false => arg,
        }
    }
}

/// Options given as flags (or set by a program): the top layer. The
/// `larder serve` flags are derived from the `options!` table.
#[derive(Clone, Debug, Default)]
pub struct Flags(Vec<(&'static Opt, String)>);

impl Flags {
    /// Sets the option whose flat name is `flat` (programs that embed a
    /// server, benchmarks). An unknown name is a programming error.
    pub fn with(mut self, flat: &str, value: impl Into<String>) -> Flags {
        let opt = Opt::by_flat(flat).unwrap_or_else(|| panic!("{flat} is not a larder option"));
        self.0.push((opt, value.into()));
        self
    }
}

impl clap::FromArgMatches for Flags {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Flags, clap::Error> {
        let mut flags = Flags::default();
        flags.update_from_arg_matches(matches)?;
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        for opt in OPTIONS {
            if let Some(value) = matches.get_one::<String>(opt.flat) {
                self.0.push((opt, value.clone()));
            }
        }
        Ok(())
    }
}

impl clap::Args for Flags {
    fn augment_args(command: clap::Command) -> clap::Command {
        command.args(OPTIONS.iter().map(Opt::arg))
    }

    fn augment_args_for_update(command: clap::Command) -> clap::Command {
        Flags::augment_args(command)
    }
}

impl Config {
    /// Layers the sources and validates the result.
    pub fn load(file: Option<&Path>, flags: Flags) -> Result<Config, Error> {
        use config::{File, FileFormat};
        let mut layers = config::Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(file) = file {
            if !file.exists() {
                return Err(Error::Missing(file.to_path_buf()));
            }
            let read =
                config::Config::builder().add_source(File::from(file).format(FileFormat::Toml)).build()?;
            for (key, value) in read.try_deserialize::<config::Map<String, config::Value>>()? {
                layers = set_from_file(layers, key, value)?;
            }
        }
        let mut warnings = Vec::new();
        for (variable, value) in std::env::vars_os() {
            let Some(name) = variable.to_str().and_then(|v| v.strip_prefix("LARDER_")) else { continue };
            match (Opt::by_flat(&name.to_lowercase()), value.into_string()) {
                (Some(opt), Ok(value)) => layers = layers.set_override(opt.key(), value)?,
                (Some(_), Err(value)) => return Err(Error::NotUnicode(variable, value)),
                // Container platforms set LARDER_PORT and the like for a
                // service named larder: larder must still start.
                (None, _) => warnings.push(format!(
                    "ignoring the environment variable {}: it is not a larder setting (those are LARDER_ and a key in capitals, such as LARDER_MAX_SIZE)",
                    variable.to_string_lossy()
                )),
            }
        }
        for (opt, value) in flags.0 {
            layers = layers.set_override(opt.key(), value)?;
        }
        let mut config: Config = layers.build()?.try_deserialize()?;
        if config.store.dir.as_os_str().is_empty() {
            config.store.dir = default_dir()?;
        }
        config.warnings = warnings;
        config.validate()?;
        Ok(config)
    }

    /// The object store tier, if one is configured.
    pub fn s3(&self) -> Option<crate::objstore::Settings> {
        let s3 = &self.s3;
        s3.endpoint.as_ref().map(|endpoint| crate::objstore::Settings {
            endpoint: endpoint.clone(),
            bucket: s3.bucket.clone().unwrap_or_default(),
            prefix: s3.prefix.clone(),
            region: s3.region.clone(),
            path_style: s3.path_style,
            max_action_result: self.limits.max_message_size.0 as usize,
            existence_ttl: s3.existence_ttl,
            existence_entries: s3.existence_entries,
            pack_index_entries: s3.pack_index_entries,
            trim: (s3.max_size.0 > 0).then_some(crate::objstore::trim::Trim {
                max_size: s3.max_size.0,
                min_age: s3.trim_min_age,
                interval: s3.trim_interval,
                touch_interval: s3.touch_interval,
                turns: s3.trim,
                lease: s3.trim_lease,
            }),
        })
    }

    /// The store settings this configuration asks for.
    pub fn store_options(&self) -> crate::store::StoreOptions {
        let store = &self.store;
        crate::store::StoreOptions {
            chunk_size: store.chunk_size.0 as usize,
            zstd_level: store.zstd_level,
            dedup_min_size: store.dedup_min_size.0,
            sync_writes: store.sync_writes,
            blob_files: store.blob_files,
            cache_size: store.cache_size.0 as usize,
            max_size: store.max_size.0,
            queue_limit: self.queue_limit(),
            index_memory: store.index_memory.0,
            // A use is written at most about twice per protected age, and a
            // blob kept up to 1.5 times it after its last use.
            use_resolution: self.eviction.min_age / 2,
        }
    }

    /// Bytes of writes that may wait in the queue for the object store: 0
    /// without one (nothing is queued).
    pub fn queue_limit(&self) -> u64 {
        match self.s3.endpoint {
            None => 0,
            Some(_) => self.s3.queue_size.0.clamp(1, self.store.max_size.0 / 2),
        }
    }

    /// The TLS files, if TLS is on: certificate, key, and client CA.
    pub fn tls(&self) -> Option<(&Path, &Path, Option<&Path>)> {
        let tls = &self.tls;
        Some((tls.cert.as_deref()?, tls.key.as_deref()?, tls.client_ca.as_deref()))
    }

    fn validate(&self) -> Result<(), Error> {
        let invalid = |key: &str, why: String| Err(Error::Invalid(key.to_string(), why));
        let (server, store, limits, tls, auth, s3) =
            (&self.server, &self.store, &self.limits, &self.tls, &self.auth, &self.s3);
        let eviction = &self.eviction;
        if !(4 << 10..=crate::store::chunk::MAX_CHUNK_SIZE as u64).contains(&store.chunk_size.0) {
            return invalid("chunk_size", "must be between 4KiB and 64MiB".into());
        }
        if s3.endpoint.is_some() && s3.bucket.is_none() {
            return invalid("s3_bucket", "is required with s3_endpoint".into());
        }
        if s3.write_back && s3.endpoint.is_none() {
            return invalid("s3_write_back", "only means something with s3_endpoint".into());
        }
        // A blob a node remembers present, or saw used, must not be trimmed
        // while that memory lasts.
        if s3.max_size.0 > 0 && s3.trim_min_age < s3.existence_ttl + s3.touch_interval {
            return invalid(
                "s3_trim_min_age",
                format!(
                    "must be at least s3_existence_ttl + s3_touch_interval ({:?}), so that no node remembers a trimmed blob present",
                    s3.existence_ttl + s3.touch_interval
                ),
            );
        }
        if s3.max_size.0 > 0 && (s3.trim_lease < Duration::from_secs(3) || s3.trim_interval.is_zero()) {
            return invalid("s3_trim_lease", "must be at least 3s, and s3_trim_interval more than 0".into());
        }
        let largest_chunk = crate::store::Store::chunking().window() as u64;
        if store.dedup_min_size.0 != 0 && store.dedup_min_size.0 <= largest_chunk {
            return invalid(
                "dedup_min_size",
                format!("must be 0 (no deduplication) or more than the largest chunk, {largest_chunk} bytes"),
            );
        }
        if !(0..=22).contains(&store.zstd_level) {
            return invalid("zstd_level", "must be between 0 (no compression) and 22".into());
        }
        if limits.max_message_size.0 < limits.max_batch_size.0 + (1 << 20) {
            return invalid(
                "max_message_size",
                format!("must exceed max_batch_size ({}) by at least 1MiB", limits.max_batch_size),
            );
        }
        if !(0.0 < eviction.low_watermark
            && eviction.low_watermark < eviction.high_watermark
            && eviction.high_watermark <= 1.0)
        {
            return invalid(
                "eviction_low_watermark",
                format!(
                    "watermarks must satisfy 0 < low ({}) < high ({}) <= 1",
                    eviction.low_watermark, eviction.high_watermark
                ),
            );
        }
        if store.max_size.0 < 16 << 20 {
            return invalid("max_size", format!("{} is too small: use at least 16MiB", store.max_size));
        }
        if tls.cert.is_some() != tls.key.is_some() {
            return invalid("tls_cert", "tls_cert and tls_key go together: give both, or neither".into());
        }
        if tls.client_ca.is_some() && tls.cert.is_none() {
            return invalid("tls_client_ca", "mutual TLS needs TLS: give tls_cert and tls_key too".into());
        }
        if auth.allow_unauthenticated_reads && auth.htpasswd_file.is_none() {
            return invalid(
                "allow_unauthenticated_reads",
                "only means something with htpasswd_file: without one, everyone may read and write".into(),
            );
        }
        if server.header_timeout < Duration::from_secs(1) || server.idle_timeout < server.header_timeout {
            return invalid(
                "idle_timeout",
                format!(
                    "header_timeout ({:?}) must be at least 1s, and idle_timeout ({:?}) at least as long",
                    server.header_timeout, server.idle_timeout
                ),
            );
        }
        if server.max_inflight_bytes.0 < 16 << 20 {
            return invalid("max_inflight_bytes", "must be at least 16MiB".into());
        }
        if server.max_connections < 16 {
            return invalid("max_connections", "must be at least 16".into());
        }
        if limits.max_call_entries < 1000 {
            return invalid(
                "max_call_entries",
                format!("{} is too few: use at least 1000", limits.max_call_entries),
            );
        }
        if limits.max_directory_size.0 < 64 << 10 {
            return invalid("max_directory_size", "must be at least 64KiB".into());
        }
        if auth.public_metrics_port && server.metrics_listen.is_none() {
            return invalid(
                "public_metrics_port",
                "only means something with metrics_listen: the main port's /metrics needs read access".into(),
            );
        }
        if limits.max_message_size.0 > 1 << 30 {
            return invalid("max_message_size", "must be at most 1GiB".into());
        }
        Ok(())
    }
}

/// Adds one top-level entry of a config file: a section's table, or an
/// option under its flat name.
fn set_from_file(
    layers: config::builder::ConfigBuilder<config::builder::DefaultState>,
    key: String,
    value: config::Value,
) -> Result<config::builder::ConfigBuilder<config::builder::DefaultState>, Error> {
    let unknown = |key: String| Error::Unknown(key);
    if SECTIONS.contains(&key.as_str())
        && let config::ValueKind::Table(entries) = value.kind
    {
        let mut layers = layers;
        for (name, value) in entries {
            let opt = Opt::in_section(&key, &name).ok_or_else(|| unknown(format!("{name} in [{key}]")))?;
            layers = layers.set_override(opt.key(), value)?;
        }
        return Ok(layers);
    }
    let opt = Opt::by_flat(&key).ok_or_else(|| unknown(key))?;
    Ok(layers.set_override(opt.key(), value)?)
}

/// A value that may be absent: a missing key, or "" as older files wrote it.
fn optional<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
}

/// A value written as a string in its own syntax.
fn parsed<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    let s = String::deserialize(d)?;
    s.parse().map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
}

/// The data directory: "" (or a missing key) is resolved to the default.
fn path_or_empty<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    Ok(PathBuf::from(String::deserialize(d)?))
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
    #[error(
        "config key {0} is not a larder setting: see config/larder.toml (or `larder serve --help`) for every key"
    )]
    Unknown(String),
    #[error("the environment variable {0:?} is not UTF-8: {1:?}")]
    NotUnicode(OsString, OsString),
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
            let toml = format!(
                "[store]\nmax_size = {:?}\n[server]\nidle_timeout = {:?}\n[limits]\nmax_call_entries = {:?}\n",
                text, text, text
            );
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
        let config = Config::load(None, Flags::default()).unwrap();
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:9092");
        assert_eq!(config.store.max_size, ByteSize(10 << 30));
        assert!(config.store.dir.ends_with("larder"));
    }

    /// A file may write a key in its section or by its flat name; a key in
    /// the wrong section is refused by name.
    #[test]
    fn keys_in_sections_or_flat() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("larder.toml");
        let toml =
            "eviction_min_age = \"5s\"\n[eviction]\nhigh_watermark = 0.95\n[tls]\n[s3]\nendpoint = \"\"\n";
        std::fs::write(&file, toml).unwrap();
        let config = Config::load(Some(&file), Flags::default()).unwrap();
        assert_eq!(config.eviction.min_age, Duration::from_secs(5));
        // Uses are written at the resolution the protection allows.
        assert_eq!(config.store_options().use_resolution, Duration::from_millis(2500));
        assert_eq!(config.eviction.high_watermark, 0.95);
        assert_eq!((config.tls.cert.as_deref(), config.s3.endpoint.as_deref()), (None, None));
        std::fs::write(&file, "[store]\nlisten = \"127.0.0.1:1\"\n").unwrap();
        let err = Config::load(Some(&file), Flags::default()).unwrap_err();
        assert!(err.to_string().contains("listen in [store]"), "{err}");
    }

    /// Each option is a flag named for its flat name, and its help says
    /// where else it is set.
    #[test]
    fn every_option_is_a_flag() {
        use clap::{Args, FromArgMatches};
        let command = Flags::augment_args(clap::Command::new("serve"));
        for opt in OPTIONS {
            let flag = format!("--{}", opt.flat.replace('_', "-"));
            let value = if opt.switch() { format!("{flag}=true") } else { format!("{flag}=x") };
            let matches = command.clone().try_get_matches_from(["serve", &value]).unwrap();
            let flags = Flags::from_arg_matches(&matches).unwrap();
            assert_eq!(flags.0.len(), 1, "{flag}");
            assert_eq!(flags.0[0].0.key(), opt.key());
        }
        let matches = command.try_get_matches_from(["serve", "--htpasswd", "f", "--s3-write-back"]).unwrap();
        let flags = Flags::from_arg_matches(&matches).unwrap();
        let set: Vec<(String, &str)> = flags.0.iter().map(|(o, v)| (o.key(), v.as_str())).collect();
        assert_eq!(set, [("auth.htpasswd_file".to_string(), "f"), ("s3.write_back".to_string(), "true")]);
    }

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("larder.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:1\"\nmax_size = \"1GiB\"\n").unwrap();
        let config = Config::load(Some(&file), Flags::default().with("max_size", "2GiB")).unwrap();
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:1");
        assert_eq!(config.store.max_size, ByteSize(2 << 30));
        std::fs::write(&file, "no_such_key = 1\n").unwrap();
        let err = Config::load(Some(&file), Flags::default()).unwrap_err();
        assert!(err.to_string().contains("no_such_key"), "{err}");
    }
}
