//! Authentication from an htpasswd file (bcrypt entries, as `htpasswd -B`
//! writes them), for gRPC and HTTP alike: the `authorization: Basic …`
//! header. Passwords are never logged, and checks take the same time
//! whether the user exists or not.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

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
}

impl Auth {
    pub fn new(users: Htpasswd, anonymous_reads: bool) -> Auth {
        Auth { users, anonymous_reads, bcrypt: tokio::sync::Semaphore::new(2) }
    }
}

pub struct Htpasswd {
    /// User → bcrypt hash.
    users: HashMap<String, String>,
    /// User → SHA-256 of the password last verified for them: bcrypt costs
    /// milliseconds on purpose, and a build makes thousands of calls.
    verified: Mutex<HashMap<String, [u8; 32]>>,
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
        Ok(Htpasswd { users, verified: Mutex::new(HashMap::new()), dummy })
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
        known
            .filter(|known| constant_time_eq::constant_time_eq_32(known, &digest))
            .map(|_| Caller::User(user))
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
            return Caller::Refused;
        }
        self.verified.lock().unwrap_or_else(|e| e.into_inner()).insert(user.clone(), digest);
        Caller::User(user)
    }
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
}
