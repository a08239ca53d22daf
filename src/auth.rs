//! Authentication from an htpasswd file (bcrypt entries, as `htpasswd -B`
//! writes them), for gRPC and HTTP alike: the `authorization: Basic …`
//! header. Passwords are never logged, and checks take the same time
//! whether the user exists or not.
//!
//! bcrypt is slow on purpose, so a flood of wrong passwords must not queue
//! valid users behind it: a password refused once is refused again without
//! bcrypt, and an address (or, from addresses that failed, a user) with too
//! many failures in the last minute is refused at once (see [`Throttle`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use sha2::{Digest as _, Sha256};

/// Who is calling.
#[derive(Debug, PartialEq, Eq)]
pub enum Caller {
    /// Good credentials.
    User(String),
    /// No credentials at all.
    Anonymous,
    /// Credentials that are wrong, or not Basic ones.
    Refused,
}

/// The rules of a server: its users, and whether anonymous clients may read.
pub struct Auth {
    pub users: Htpasswd,
    pub anonymous_reads: bool,
    /// Bounds the bcrypt checks running at once.
    pub bcrypt: tokio::sync::Semaphore,
    pub throttle: Throttle,
}

impl Auth {
    pub fn new(users: Htpasswd, anonymous_reads: bool) -> Auth {
        Auth { users, anonymous_reads, bcrypt: tokio::sync::Semaphore::new(2), throttle: Throttle::default() }
    }
}

/// What a caller may do, once authenticated (or let in anonymously).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// May store blobs and action results.
    pub write: bool,
    /// Came without credentials: never shown paths or endpoints.
    pub anonymous: bool,
}

impl Access {
    /// Without authentication, everyone is trusted.
    pub const ALL: Access = Access { write: true, anonymous: false };
}

/// How long failed logins are remembered.
const WINDOW: Duration = Duration::from_secs(60);
/// Failures from one address within [`WINDOW`] before its attempts are refused at once.
const PER_ADDRESS: u32 = 5;
/// Failures for one user within [`WINDOW`] before attempts for it from
/// addresses that failed too are refused at once.
const PER_USER: u32 = 20;
/// Addresses tracked at most: memory stays bounded under a spoofed flood.
const MAX_ADDRESSES: usize = 10_000;

/// Failed logins per client address and per user, over the last [`WINDOW`].
#[derive(Default)]
pub struct Throttle {
    failures: Mutex<Failures>,
}

#[derive(Default)]
struct Failures {
    addresses: HashMap<IpAddr, (Instant, u32)>,
    users: HashMap<String, (Instant, u32)>,
}

impl Throttle {
    /// How long the caller must wait before bcrypt will check a password
    /// for `user` from `address`; `None` if it may try now.
    pub fn wait(&self, address: Option<IpAddr>, user: &str) -> Option<Duration> {
        let address = address.map(network);
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let recent = |entry: Option<&(Instant, u32)>, limit: u32| {
            entry
                .filter(|(since, count)| *count >= limit && since.elapsed() < WINDOW)
                .map(|(since, _)| WINDOW - since.elapsed())
        };
        let from_address = address.and_then(|a| failures.addresses.get(&a));
        if let Some(wait) = recent(from_address, PER_ADDRESS) {
            return Some(wait);
        }
        // A user under attack: addresses with failures of their own wait;
        // others (the user, most likely) are still checked.
        let address_failed = from_address.is_some_and(|(since, _)| since.elapsed() < WINDOW);
        recent(failures.users.get(user), PER_USER).filter(|_| address_failed)
    }

    /// Records a password bcrypt refused. Only known users are counted per
    /// user, so random names cannot grow the table.
    pub fn failed(&self, address: Option<IpAddr>, user: &str, known_user: bool) {
        let address = address.map(network);
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let count = |entry: &mut (Instant, u32)| {
            if entry.0.elapsed() >= WINDOW {
                *entry = (Instant::now(), 0);
            }
            entry.1 += 1;
        };
        if let Some(address) = address {
            if failures.addresses.len() >= MAX_ADDRESSES {
                failures.addresses.retain(|_, (since, _)| since.elapsed() < WINDOW);
            }
            if failures.addresses.len() >= MAX_ADDRESSES {
                // Still full of recent failures: the oldest half goes, so
                // that no flood can wipe the addresses it throttles.
                let mut since: Vec<Instant> = failures.addresses.values().map(|(s, _)| *s).collect();
                let (_, middle, _) = since.select_nth_unstable(MAX_ADDRESSES / 2);
                let middle = *middle;
                failures.addresses.retain(|_, (s, _)| *s > middle);
            }
            count(failures.addresses.entry(address).or_insert((Instant::now(), 0)));
        }
        if known_user {
            count(failures.users.entry(user.to_string()).or_insert((Instant::now(), 0)));
        }
    }
}

pub struct Htpasswd {
    /// User → bcrypt hash.
    users: HashMap<String, String>,
    /// User → SHA-256 of the password last verified for them: bcrypt costs
    /// milliseconds on purpose, and a build makes thousands of calls.
    verified: Mutex<HashMap<String, [u8; 32]>>,
    /// (user, SHA-256 of a password) bcrypt refused: refused again at once,
    /// so that repeating one wrong password costs no bcrypt work.
    refused: Mutex<HashMap<(String, [u8; 32]), Instant>>,
    /// A hash of nothing anyone types, at the file's cost, checked for
    /// unknown users so that they take as long as known ones.
    dummy: String,
}

impl Htpasswd {
    pub fn load(path: &Path) -> Result<Htpasswd, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the htpasswd file {}: {e}", path.display()))?;
        Htpasswd::parse(&text).map_err(|e| format!("htpasswd file {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Htpasswd, String> {
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate().map(|(n, l)| (n + 1, l.trim())) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line.split_once(':').ok_or_else(|| format!("line {n} is not user:hash"))?;
            if !["$2a$", "$2b$", "$2x$", "$2y$"].iter().any(|p| hash.starts_with(p)) {
                return Err(format!(
                    "line {n} (user {user:?}) is not a bcrypt entry: only bcrypt is accepted (htpasswd -B)"
                ));
            }
            users.insert(user.to_string(), hash.to_string());
        }
        // The dummy costs what the dearest entry does: refusing an unknown
        // user must not be quicker than refusing a known one.
        let Some(cost) = users.values().filter_map(|h| h.get(4..6)?.parse::<u32>().ok()).max() else {
            return Err("no users in it".into());
        };
        let dummy = bcrypt::hash("no one's password", cost).map_err(|e| format!("bcrypt: {e}"))?;
        Ok(Htpasswd {
            users,
            verified: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            dummy,
        })
    }

    /// Checks an `authorization` header value, if that is quick: no header,
    /// a malformed one, or a password verified before. `None` means bcrypt
    /// must decide ([`Htpasswd::check`]).
    pub fn check_quickly(&self, authorization: Option<&[u8]>) -> Option<Caller> {
        let Some(header) = authorization else {
            return Some(Caller::Anonymous);
        };
        let Some((user, password)) = basic_credentials(header) else {
            return Some(Caller::Refused);
        };
        let digest: [u8; 32] = Sha256::digest(password.as_bytes()).into();
        let known = self.verified.lock().unwrap_or_else(|e| e.into_inner()).get(&user).copied();
        if known.is_some_and(|known| constant_time_eq::constant_time_eq_32(&known, &digest)) {
            return Some(Caller::User(user));
        }
        let refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        refused.get(&(user, digest)).filter(|at| at.elapsed() < REFUSED_FOR).map(|_| Caller::Refused)
    }

    /// Whether `user` is in the file.
    pub fn knows(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Checks an `authorization` header value. Slow (bcrypt) the first time
    /// for each user and password: run it off the async runtime.
    pub fn check(&self, authorization: Option<&[u8]>) -> Caller {
        if let Some(caller) = self.check_quickly(authorization) {
            return caller;
        }
        let Some((user, password)) = authorization.and_then(basic_credentials) else {
            return Caller::Refused;
        };
        let digest: [u8; 32] = Sha256::digest(password.as_bytes()).into();
        let hash = self.users.get(&user).unwrap_or(&self.dummy);
        let good = bcrypt::verify(&password, hash).unwrap_or(false) && self.users.contains_key(&user);
        if !good {
            let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
            if refused.len() >= MAX_REFUSED {
                refused.retain(|_, at| at.elapsed() < REFUSED_FOR);
                if refused.len() >= MAX_REFUSED {
                    refused.clear();
                }
            }
            refused.insert((user, digest), Instant::now());
            return Caller::Refused;
        }
        self.verified.lock().unwrap_or_else(|e| e.into_inner()).insert(user.clone(), digest);
        Caller::User(user)
    }
}

/// The address failures are counted under: an IPv6 host has a /64 of them.
fn network(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & (u128::MAX << 64)).into()),
        },
        v4 => v4,
    }
}

/// How long a refused password is refused without bcrypt.
const REFUSED_FOR: Duration = Duration::from_secs(600);
/// Refused passwords remembered at most.
const MAX_REFUSED: usize = 4096;

/// The user named by an `authorization` header, if it is a Basic one.
pub fn user_of(authorization: &[u8]) -> Option<String> {
    basic_credentials(authorization).map(|(user, _)| user)
}

/// `Basic base64(user:password)`.
fn basic_credentials(header: &[u8]) -> Option<(String, String)> {
    let header = std::str::from_utf8(header).ok()?.trim();
    let (scheme, encoded) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let (user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(crate::hostile::config())]

        /// Any authorization header is a caller or a refusal; credentials
        /// read back as they were written.
        #[test]
        fn authorization_headers_parse_or_are_refused(
            header in crate::hostile::bytes(),
            text in crate::hostile::text(),
            user in "[^:]{0,12}",
            password in ".{0,12}",
        ) {
            let _ = basic_credentials(&header);
            let _ = basic_credentials(format!("Basic {text}").as_bytes());
            let written = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")));
            prop_assert_eq!(basic_credentials(written.as_bytes()), Some((user.clone(), password)));
            prop_assert_eq!(user_of(written.as_bytes()), Some(user));
        }
    }

    fn header(user: &str, password: &str) -> Vec<u8> {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
            .into_bytes()
    }

    #[test]
    fn bcrypt_entries_check_and_others_are_refused() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let file = Htpasswd::parse(&format!("# team\nalice:{hash}\n")).unwrap();
        assert_eq!(file.check_quickly(Some(&header("alice", "s3cret"))), None, "bcrypt decides");
        assert_eq!(file.check(Some(&header("alice", "s3cret"))), Caller::User("alice".into()));
        // Again, from the cache of verified passwords.
        let quick = file.check_quickly(Some(&header("alice", "s3cret")));
        assert_eq!(quick, Some(Caller::User("alice".into())));
        assert_eq!(file.check_quickly(Some(&header("alice", "s3creT"))), None);
        assert_eq!(file.check(Some(&header("alice", "wrong"))), Caller::Refused);
        assert_eq!(file.check(Some(&header("bob", "s3cret"))), Caller::Refused);
        assert_eq!(file.check(Some(b"Bearer abc")), Caller::Refused);
        assert_eq!(file.check(None), Caller::Anonymous);
        let sha = Htpasswd::parse("carol:{SHA}fEqNCco3Yq9h5ZUglD3CZJT4lBs=");
        assert!(sha.err().unwrap().contains("bcrypt"));
        assert!(Htpasswd::parse("dave:$apr1$abc$def").is_err());
        assert!(Htpasswd::parse("").is_err());
    }

    #[test]
    fn a_refused_password_is_refused_again_without_bcrypt() {
        let file = Htpasswd::parse(&format!("alice:{}\n", bcrypt::hash("s3cret", 4).unwrap())).unwrap();
        assert_eq!(
            file.check_quickly(Some(&header("alice", "guess"))),
            None,
            "bcrypt decides the first time"
        );
        assert_eq!(file.check(Some(&header("alice", "guess"))), Caller::Refused);
        assert_eq!(file.check_quickly(Some(&header("alice", "guess"))), Some(Caller::Refused));
        assert_eq!(file.check(Some(&header("alice", "s3cret"))), Caller::User("alice".into()));
    }

    #[test]
    fn failures_throttle_their_address_and_then_their_user() {
        let throttle = Throttle::default();
        let (attacker, other): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..PER_ADDRESS {
            assert_eq!(throttle.wait(Some(attacker), "alice"), None);
            throttle.failed(Some(attacker), "alice", true);
        }
        assert!(throttle.wait(Some(attacker), "bob").is_some_and(|w| w <= WINDOW), "the address waits");
        assert_eq!(throttle.wait(Some(other), "alice"), None, "other addresses do not");
        // Many addresses, a few failures each, against one user.
        for i in 0..PER_USER {
            throttle.failed(Some(IpAddr::from([10, 1, 0, i as u8])), "alice", true);
        }
        assert!(
            throttle.wait(Some(IpAddr::from([10, 1, 0, 1])), "alice").is_some(),
            "a failed address waits"
        );
        assert_eq!(throttle.wait(Some(other), "alice"), None, "a clean address is still checked");
        // An IPv6 host's /64 is one address.
        let host = |last: u16| IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, last]);
        for last in 0..PER_ADDRESS as u16 {
            throttle.failed(Some(host(last)), "bob", true);
        }
        assert!(throttle.wait(Some(host(999)), "carol").is_some(), "the /64 waits");
        assert_eq!(throttle.wait(Some(IpAddr::from([0x2001, 0xdb8, 0, 2, 0, 0, 0, 1])), "carol"), None);
        // Unknown users are not tracked.
        throttle.failed(None, "nobody", false);
        assert!(!throttle.failures.lock().unwrap().users.contains_key("nobody"));
    }
}
