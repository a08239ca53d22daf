//! Downloads from origins over HTTP and HTTPS, for the Remote Asset API's
//! FetchBlob: only from the hosts the operator allows, within a size and a
//! time limit, into a temporary file, hashed as the bytes arrive.
//!
//! Anyone who may read the cache may ask for a fetch, so the allow-list is
//! checked on every URL, every redirect and every address a name resolves
//! to: a host admitted by `*` alone must resolve to public addresses, and
//! loopback or private addresses are reached only through names the list
//! spells out.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{StatusCode, Url};
use sha2::Digest as _;
use tokio::io::AsyncWriteExt;

use crate::digest::{Digest, Function, Hasher};

/// Redirects followed before a download gives up.
const MAX_REDIRECTS: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot work (a CA file that does not parse).
    #[error("{0}")]
    Setup(String),
    /// The URL, a redirect or an address is off the allow-list.
    #[error("{0}")]
    NotAllowed(String),
    /// The origin refused (401, 403).
    #[error("{0}")]
    Refused(String),
    /// The origin has no such thing (404, 410).
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    TimedOut(String),
    /// Larger than the download limit.
    #[error("{0}")]
    TooLarge(String),
    /// The bytes do not match the checksum the client gave.
    #[error("{0}")]
    Mismatch(String),
    /// The origin could not be reached, or answered with an error.
    #[error("{0}")]
    Failed(String),
    /// This server could not keep what arrived (the temporary file).
    #[error("keeping a download: {0}")]
    Local(#[from] std::io::Error),
}

/// Which hosts downloads may reach.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    /// `*`: any host at a public address.
    any: bool,
    /// Hosts named exactly (lowercase; IPv6 addresses without brackets).
    hosts: Vec<String>,
    /// `*.example.com`: the subdomains of each (stored as `.example.com`).
    domains: Vec<String>,
}

impl FromStr for AllowList {
    type Err = String;

    fn from_str(s: &str) -> Result<AllowList, String> {
        let mut list = AllowList::default();
        for entry in s.split([',', ' ', '\n', '\t']).map(str::trim).filter(|e| !e.is_empty()) {
            let entry = entry.to_ascii_lowercase();
            if entry == "*" {
                list.any = true;
            } else if let Some(domain) = entry.strip_prefix("*.") {
                check_host(domain)?;
                list.domains.push(format!(".{domain}"));
            } else {
                let host = entry.trim_start_matches('[').trim_end_matches(']');
                check_host(host)?;
                list.hosts.push(host.to_string());
            }
        }
        Ok(list)
    }
}

fn check_host(host: &str) -> Result<(), String> {
    let valid = !host.is_empty()
        && (host.parse::<IpAddr>().is_ok()
            || host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{host:?} is not a host: list names (github.com), domains (*.example.com) or *, separated by commas"
        ))
    }
}

impl fmt::Display for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let any = self.any.then(|| "*".to_string());
        let domains = self.domains.iter().map(|d| format!("*{d}"));
        let all: Vec<String> = any.into_iter().chain(self.hosts.iter().cloned()).chain(domains).collect();
        f.write_str(&all.join(", "))
    }
}

impl AllowList {
    pub fn is_empty(&self) -> bool {
        !self.any && self.hosts.is_empty() && self.domains.is_empty()
    }

    /// Whether the list names `host` itself (or its domain): then it may
    /// resolve to loopback and private addresses.
    fn names(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.hosts.iter().any(|h| h == host) || self.domains.iter().any(|d| host.ends_with(d.as_str()))
    }

    /// Whether a download may fetch `url`: http or https (anything else,
    /// a URN say, can only have been pushed), to an allowed host, and to a
    /// public address unless the list names the host.
    fn admits(&self, url: &Url) -> Result<(), Error> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::NotFound(format!(
                "nothing was pushed for {url}, and only http and https URLs are downloaded"
            )));
        }
        let Some(host) = url.host_str() else {
            return Err(Error::NotAllowed(format!("{url} names no host")));
        };
        let named = self.names(host);
        if !named && !self.any {
            return Err(Error::NotAllowed(format!(
                "{host} is not on this server's download_allow list: add it there, or push the content"
            )));
        }
        // An address in the URL is not resolved: check it here.
        if let Ok(address) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>()
            && !named
            && !is_public(address)
        {
            return Err(not_public(host));
        }
        Ok(())
    }
}

fn not_public(host: &str) -> Error {
    Error::NotAllowed(format!(
        "{host} is a loopback, private or reserved address: download_allow must name it to reach it"
    ))
}

/// Whether an address is on the public internet, as far as this server
/// should trust a host admitted by `*` alone.
fn is_public(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(a) => {
            let [first, second, ..] = a.octets();
            !(a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || a.is_multicast()
                || a.is_documentation()
                || first == 0
                // Benchmarking, 198.18.0.0/15; IETF protocol assignments, 192.0.0.0/24.
                || (first == 198 && (second & 0xfe) == 18)
                || (first == 192 && second == 0 && a.octets()[2] == 0)
                // Shared address space (carrier-grade NAT), 100.64.0.0/10.
                || (first == 100 && (64..128).contains(&second))
                // Reserved for future use, 240.0.0.0/4.
                || first >= 240)
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            let v4 = |hi: u16, lo: u16| {
                IpAddr::V4(std::net::Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)))
            };
            match a.to_ipv4_mapped() {
                Some(v4) => is_public(IpAddr::V4(v4)),
                // IPv4 addresses inside IPv6 ones: NAT64 (64:ff9b::/96),
                // 6to4 (2002::/16) and IPv4-compatible (::/96).
                None if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] => is_public(v4(s[6], s[7])),
                None if s[0] == 0x2002 => is_public(v4(s[1], s[2])),
                None if s[..6] == [0; 6] => {
                    !(a.is_loopback() || a.is_unspecified()) && is_public(v4(s[6], s[7]))
                }
                None => {
                    let first = s[0];
                    !(a.is_loopback()
                        || a.is_unspecified()
                        || a.is_multicast()
                        // Unique local, fc00::/7; link-local, fe80::/10;
                        // site-local, fec0::/10; local-use NAT64, 64:ff9b:1::/48.
                        || (first & 0xfe00) == 0xfc00
                        || (first & 0xffc0) == 0xfe80
                        || (first & 0xffc0) == 0xfec0
                        || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1))
                }
            }
        }
    }
}

/// Resolves names as the system does, keeping only the addresses the
/// allow-list admits for each: a public name cannot lead to a private
/// address.
struct Resolver {
    allow: Arc<AllowList>,
}

/// A name that resolved to no address a download may reach.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Unreachable(String);

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = Arc::clone(&self.allow);
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let named = allow.names(&host);
            let kept: Vec<SocketAddr> = found.into_iter().filter(|a| named || is_public(a.ip())).collect();
            if kept.is_empty() {
                return Err(Box::new(Unreachable(host)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Checksums a download must match: a `checksum.sri` qualifier, Subresource
/// Integrity's `sha256-BASE64` entries separated by spaces. One match is
/// enough.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sri {
    entries: Vec<(SriAlgorithm, Vec<u8>)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SriAlgorithm {
    Sha256,
    Sha384,
    Sha512,
}

impl SriAlgorithm {
    /// The REAPI digest function that hashes the same way.
    pub fn function(self) -> Function {
        match self {
            SriAlgorithm::Sha256 => Function::Sha256,
            SriAlgorithm::Sha384 => Function::Sha384,
            SriAlgorithm::Sha512 => Function::Sha512,
        }
    }
}

impl FromStr for Sri {
    type Err = String;

    fn from_str(s: &str) -> Result<Sri, String> {
        let mut entries = Vec::new();
        for entry in s.split_ascii_whitespace() {
            // Options after `?` are reserved by SRI, and ignored.
            let entry = entry.split('?').next().unwrap_or_default();
            let Some((name, value)) = entry.split_once('-') else {
                return Err(format!("{entry:?} is not an SRI checksum (sha256-BASE64)"));
            };
            let (algorithm, len) = match name {
                "sha256" => (SriAlgorithm::Sha256, 32),
                "sha384" => (SriAlgorithm::Sha384, 48),
                "sha512" => (SriAlgorithm::Sha512, 64),
                // SRI lets clients list algorithms a server does not know.
                _ => continue,
            };
            let hash = base64::engine::general_purpose::STANDARD
                .decode(value)
                .map_err(|e| format!("{entry:?}: the checksum is not base64: {e}"))?;
            if hash.len() != len {
                return Err(format!("{entry:?}: a {name} checksum is {len} bytes, not {}", hash.len()));
            }
            entries.push((algorithm, hash));
        }
        if entries.is_empty() {
            return Err(format!("{s:?} holds no sha256, sha384 or sha512 checksum"));
        }
        Ok(Sri { entries })
    }
}

impl Sri {
    /// The hash of an entry that uses `function`, if any: content whose
    /// digest has it matches without being read again.
    pub fn hash_for(&self, function: Function) -> Option<&[u8]> {
        self.entries.iter().find(|(a, _)| a.function() == function).map(|(_, h)| h.as_slice())
    }

    /// Whether content with these hashes (one per algorithm computed)
    /// matches an entry.
    pub fn matches(&self, hashes: &[(SriAlgorithm, Vec<u8>)]) -> bool {
        self.entries.iter().any(|(a, h)| hashes.iter().any(|(b, g)| a == b && h == g))
    }

    /// The algorithms listed, each once.
    pub fn algorithms(&self) -> Vec<SriAlgorithm> {
        let mut algorithms: Vec<SriAlgorithm> = Vec::new();
        for (a, _) in &self.entries {
            if !algorithms.contains(a) {
                algorithms.push(*a);
            }
        }
        algorithms
    }
}

/// Hashes with one SRI algorithm as bytes arrive.
pub enum SriHasher {
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl SriHasher {
    pub fn new(algorithm: SriAlgorithm) -> SriHasher {
        match algorithm {
            SriAlgorithm::Sha256 => SriHasher::Sha256(sha2::Sha256::new()),
            SriAlgorithm::Sha384 => SriHasher::Sha384(sha2::Sha384::new()),
            SriAlgorithm::Sha512 => SriHasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            SriHasher::Sha256(h) => h.update(data),
            SriHasher::Sha384(h) => h.update(data),
            SriHasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> (SriAlgorithm, Vec<u8>) {
        match self {
            SriHasher::Sha256(h) => (SriAlgorithm::Sha256, h.finalize().to_vec()),
            SriHasher::Sha384(h) => (SriAlgorithm::Sha384, h.finalize().to_vec()),
            SriHasher::Sha512(h) => (SriAlgorithm::Sha512, h.finalize().to_vec()),
        }
    }
}

/// How downloads are made: the `[assets]` options.
pub struct Settings<'a> {
    pub allow: AllowList,
    pub credentials: Option<&'a Path>,
    pub ca_file: Option<&'a Path>,
    pub timeout: Duration,
}

/// Headers for some hosts, from `download_credentials`.
type Credentials = HashMap<String, Vec<(HeaderName, HeaderValue)>>;

/// Reads `HOST HEADER: VALUE` lines; a bad line is named by its number,
/// never shown (it holds a secret).
fn read_credentials(path: &Path) -> Result<Credentials, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Setup(format!("download_credentials {}: {e}", path.display())))?;
    let mut credentials = Credentials::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| {
            Error::Setup(format!(
                "download_credentials {} line {}: {why}; write HOST HEADER: VALUE",
                path.display(),
                n + 1
            ))
        };
        let (host, header) = line.split_once(char::is_whitespace).ok_or_else(|| bad("no header"))?;
        let (name, value) =
            header.trim().split_once(':').ok_or_else(|| bad("no ':' after the header name"))?;
        let name = HeaderName::from_str(name.trim()).map_err(|_| bad("not a header name"))?;
        let mut value = HeaderValue::from_str(value.trim()).map_err(|_| bad("not a header value"))?;
        value.set_sensitive(true);
        credentials.entry(host.to_ascii_lowercase()).or_default().push((name, value));
    }
    Ok(credentials)
}

/// A download kept in an unnamed temporary file (gone when dropped), with
/// its digest.
pub struct Downloaded {
    pub file: std::fs::File,
    pub digest: Digest,
}

/// One download.
pub struct One<'a> {
    pub uri: &'a str,
    /// From the client; the configured ones for the host are added.
    pub headers: &'a [(String, String)],
    /// The function of the digest it is stored under.
    pub function: Function,
    /// Checksums it must match.
    pub sri: Option<&'a Sri>,
    /// More bytes than this end it.
    pub limit: u64,
    pub deadline: Instant,
}

/// What downloads share: the HTTP client, the allow-list and credentials.
pub struct Downloader {
    client: reqwest::Client,
    /// For requests that carry headers (credentials): redirects only within
    /// the same scheme, host and port, so no header reaches another host.
    confined: reqwest::Client,
    allow: Arc<AllowList>,
    credentials: Credentials,
    timeout: Duration,
}

impl Downloader {
    pub fn new(settings: Settings<'_>) -> Result<Downloader, Error> {
        let allow = Arc::new(settings.allow);
        let roots = match settings.ca_file {
            None => Vec::new(),
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| Error::Setup(format!("download_ca_file {}: {e}", path.display())))?;
                let certificates = reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| Error::Setup(format!("download_ca_file {}: {e}", path.display())))?;
                if certificates.is_empty() {
                    return Err(Error::Setup(format!(
                        "download_ca_file {} holds no PEM certificate",
                        path.display()
                    )));
                }
                certificates
            }
        };
        let client = |confined: bool| {
            let resolver = Resolver { allow: Arc::clone(&allow) };
            let allow = Arc::clone(&allow);
            let policy = reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() > MAX_REDIRECTS {
                    return attempt.error(Error::Failed(format!("more than {MAX_REDIRECTS} redirects")));
                }
                let origin = |u: &Url| {
                    (u.scheme().to_string(), u.host_str().map(str::to_string), u.port_or_known_default())
                };
                if confined && attempt.previous().first().map(origin) != Some(origin(attempt.url())) {
                    let to = shown(attempt.url());
                    return attempt.error(Error::NotAllowed(format!(
                        "a redirect to {to}, another host, of a request carrying headers: they are not sent on"
                    )));
                }
                match allow.admits(attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(e) => attempt.error(e),
                }
            });
            let mut builder = reqwest::Client::builder()
                .redirect(policy)
                .dns_resolver(Arc::new(resolver))
                // Proxies from the environment would be asked for every host,
                // past the allow-list's address checks.
                .no_proxy()
                .connect_timeout(Duration::from_secs(30))
                .user_agent(concat!("larder/", env!("CARGO_PKG_VERSION")));
            for certificate in &roots {
                builder = builder.add_root_certificate(certificate.clone());
            }
            builder.build().map_err(|e| Error::Setup(format!("the download client: {e}")))
        };
        let (client, confined) = (client(false)?, client(true)?);
        let credentials = settings.credentials.map(read_credentials).transpose()?.unwrap_or_default();
        Ok(Downloader { client, confined, allow, credentials, timeout: settings.timeout })
    }

    /// The longest a download may take: the configured limit, or less if
    /// the client asks.
    pub fn timeout(&self, asked: Option<Duration>) -> Duration {
        asked.map_or(self.timeout, |asked| asked.min(self.timeout))
    }

    /// Whether `uri` may be downloaded at all (a URN never is).
    fn check(&self, uri: &str) -> Result<Url, Error> {
        let url = Url::parse(uri).map_err(|e| {
            Error::NotFound(format!("nothing was pushed for {uri:?}, which is not a URL: {e}"))
        })?;
        self.allow.admits(&url)?;
        Ok(url)
    }

    /// Downloads `one.uri` into a temporary file in `dir`, hashing it
    /// as it arrives.
    pub async fn download(&self, one: One<'_>, dir: &Path) -> Result<Downloaded, Error> {
        let One { uri, headers, function, sri, limit, deadline } = one;
        let url = self.check(uri)?;
        // Messages name the URL without its password.
        let uri = &shown(&url);
        let mut sent = HeaderMap::new();
        for (name, value) in headers {
            let (Ok(name), Ok(mut value)) = (HeaderName::from_str(name), HeaderValue::from_str(value)) else {
                continue;
            };
            value.set_sensitive(true);
            sent.append(name, value);
        }
        if let Some(configured) = url.host_str().and_then(|h| self.credentials.get(&h.to_ascii_lowercase())) {
            for (name, value) in configured {
                sent.insert(name.clone(), value.clone());
            }
        }
        let timed_out = || Error::TimedOut(format!("downloading {uri} took longer than its timeout"));
        let left = deadline.saturating_duration_since(Instant::now());
        let client = if sent.is_empty() { &self.client } else { &self.confined };
        let request = client.get(url).headers(sent).timeout(left);
        let mut response = tokio::time::timeout_at(deadline.into(), request.send())
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| sent_error(uri, e))?;
        // Only a whole body is content to record: a 206 or a 203 is not.
        let status = response.status();
        if status != StatusCode::OK {
            let why = format!("{uri} answered {status}, not 200 OK");
            return Err(match status {
                StatusCode::NOT_FOUND | StatusCode::GONE => Error::NotFound(why),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Error::Refused(why),
                _ => Error::Failed(why),
            });
        }
        let too_large = |size: u64| {
            Error::TooLarge(format!(
                "{uri} is {size} bytes or more, over this server's download limit ({limit} bytes)"
            ))
        };
        if let Some(length) = response.content_length()
            && length > limit
        {
            return Err(too_large(length));
        }
        let file = tempfile::tempfile_in(dir)?;
        let mut out = tokio::fs::File::from_std(file);
        let mut hasher = Hasher::new(function);
        let mut checks: Vec<SriHasher> =
            sri.map(|s| s.algorithms().into_iter().map(SriHasher::new).collect()).unwrap_or_default();
        let mut size = 0u64;
        loop {
            let chunk = tokio::time::timeout_at(deadline.into(), response.chunk())
                .await
                .map_err(|_| timed_out())?
                .map_err(|e| sent_error(uri, e))?;
            let Some(chunk) = chunk else { break };
            size += chunk.len() as u64;
            if size > limit {
                return Err(too_large(size));
            }
            hasher.update(&chunk);
            checks.iter_mut().for_each(|c| c.update(&chunk));
            out.write_all(&chunk).await?;
        }
        out.flush().await?;
        if let Some(sri) = sri {
            let hashes: Vec<(SriAlgorithm, Vec<u8>)> = checks.into_iter().map(SriHasher::finish).collect();
            if !sri.matches(&hashes) {
                let got: Vec<String> = hashes
                    .iter()
                    .map(|(a, h)| {
                        format!(
                            "{}-{}",
                            a.function().name(),
                            base64::engine::general_purpose::STANDARD.encode(h)
                        )
                    })
                    .collect();
                return Err(Error::Mismatch(format!(
                    "{uri} does not match its checksum.sri qualifier: its content is {}",
                    got.join(" ")
                )));
            }
        }
        Ok(Downloaded { file: out.into_std().await, digest: hasher.finish() })
    }
}

/// What a failed request means: a refused redirect or address is the
/// allow-list's answer; the rest are the network's.
fn sent_error(uri: &str, e: reqwest::Error) -> Error {
    // The URL is named once, without its password.
    let e = e.without_url();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(cause) = source {
        if let Some(found) = cause.downcast_ref::<Error>() {
            // The redirect policy's own answer, as it gave it.
            return match found {
                Error::Failed(why) => Error::Failed(why.clone()),
                _ => Error::NotAllowed(found.to_string()),
            };
        }
        if let Some(host) = cause.downcast_ref::<Unreachable>() {
            return not_public(&host.0);
        }
        source = cause.source();
    }
    if e.is_timeout() {
        return Error::TimedOut(format!("downloading {uri} took longer than its timeout"));
    }
    Error::Failed(format!("downloading {uri}: {}", chain(&e)))
}

/// A URL for messages: its password masked.
fn shown(url: &Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("***"));
    }
    shown.to_string()
}

/// An error with its causes, for messages: reqwest's own says little.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allow_list_admits_what_it_names_and_public_addresses_for_star() {
        let list: AllowList = "github.com, *.example.com, 127.0.0.1".parse().unwrap();
        let url = |s: &str| Url::parse(s).unwrap();
        assert!(list.admits(&url("https://github.com/a.tar.gz")).is_ok());
        assert!(list.admits(&url("https://GITHUB.com:8443/a")).is_ok());
        assert!(list.admits(&url("http://mirror.example.com/a")).is_ok());
        assert!(list.admits(&url("http://example.com.evil.net/a")).is_err());
        assert!(list.admits(&url("http://127.0.0.1:8080/a")).is_ok());
        assert!(list.admits(&url("http://10.0.0.1/a")).is_err());
        assert!(list.admits(&url("ftp://github.com/a")).is_err());
        assert!(list.admits(&url("file:///etc/passwd")).is_err());
        let any: AllowList = "*".parse().unwrap();
        assert!(any.admits(&url("https://crates.io/a")).is_ok());
        assert!(any.admits(&url("http://[64:ff9b::808:808]/")).is_ok(), "NAT64 of 8.8.8.8");
        for private in [
            "http://198.18.0.1/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[2002:a00:1::]/",
            "http://[::a00:1]/",
            "http://[fec0::1]/",
            "http://[64:ff9b:1::1]/",
            "http://127.0.0.1/",
            "http://10.1.2.3/",
            "http://[::1]/",
            "http://169.254.169.254/",
            "http://[::ffff:192.168.0.1]/",
            "http://0.0.0.0/",
            "http://100.64.0.1/",
        ] {
            assert!(any.admits(&url(private)).is_err(), "{private}");
        }
        assert!(AllowList::from_str("").unwrap().is_empty());
        assert!(AllowList::from_str("a/b").is_err());
        assert_eq!(list.to_string(), "github.com, 127.0.0.1, *.example.com");
    }

    #[test]
    fn messages_mask_a_url_password() {
        let url = Url::parse("https://user:pa55@example.com/a.tar.gz").unwrap();
        assert_eq!(shown(&url), "https://user:***@example.com/a.tar.gz");
        let plain = Url::parse("https://example.com/a").unwrap();
        assert_eq!(shown(&plain), "https://example.com/a");
    }

    #[test]
    fn sri_checksums_parse_and_match_one_of_their_entries() {
        let hash = sha2::Sha256::digest(b"hello").to_vec();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&hash);
        let sri: Sri = format!("md5-AAAA sha256-{b64}?opt").parse().unwrap();
        assert_eq!(sri.hash_for(Function::Sha256), Some(hash.as_slice()));
        assert_eq!(sri.hash_for(Function::Sha512), None);
        assert!(sri.matches(&[(SriAlgorithm::Sha256, hash.clone())]));
        assert!(!sri.matches(&[(SriAlgorithm::Sha256, vec![0; 32])]));
        assert!(Sri::from_str("sha256-AAAA").is_err(), "too short");
        assert!(Sri::from_str("sha256-!!!").is_err());
        assert!(Sri::from_str("md5-AAAA").is_err(), "nothing this server checks");
        assert!(Sri::from_str("").is_err());
    }
}
