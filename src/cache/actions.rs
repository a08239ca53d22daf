//! Action results: stored in both tiers, and served only when complete,
//! every blob they name present (or brought in from the object store).

use std::collections::HashSet;
use std::sync::Arc;

use prost::Message;

use super::{Cache, DirectoryLimit, Error, blocking};
use crate::digest::{Digest, FunctionHint};
use crate::objstore;
use crate::proto::reapi::{self, ActionResult, Directory, Tree};
use crate::store::{self, Store};

/// What a lookup inlines into the result, as far as it fits in a message.
#[derive(Clone, Debug, Default)]
pub struct Inline {
    pub stdout: bool,
    pub stderr: bool,
    /// Paths of output files.
    pub files: Vec<String>,
}

/// A lookup's answer.
pub enum Lookup {
    Hit(Box<ActionResult>),
    /// Why it is a miss.
    Miss(String),
}

/// Levels of one result's outputs fetched from the object store before
/// giving up (a directory tree this deep).
const FETCH_ROUNDS: usize = 64;

impl Cache {
    /// Stores an action result in the local tier, and in the object store
    /// (write-through) or its queue (write-back): any node can answer the
    /// hit. `size` is the action's size, when the client gave one (Bazel's
    /// HTTP cache names actions by hash alone). A result whose digests are
    /// malformed is refused: it could never be served back.
    pub async fn put_action_result(
        &self,
        instance: String,
        action: Digest,
        size: Option<u64>,
        result: &ActionResult,
    ) -> Result<(), Error> {
        // The blobs a result names use the action's function.
        referenced_blobs(result, FunctionHint::Given(action.function))?;
        let encoded = result.encode_to_vec();
        let store = Arc::clone(&self.store);
        let local = (instance.clone(), encoded.clone());
        blocking(move || store.put_action_result(&local.0, &action, size, &local.1)).await?;
        self.replicate_action_result(instance, action, encoded).await
    }

    /// The result for `action` if it is complete: its blobs in the local
    /// tier, or brought in from the object store (as is a result only the
    /// object store holds). A result stored for another size of the action
    /// is a miss (`size` is `None` for a caller that names the action by
    /// hash alone). Counted in the metrics as a hit or a miss.
    pub async fn get_action_result(
        &self,
        instance: String,
        action: Digest,
        size: Option<u64>,
        inline: Inline,
    ) -> Result<Lookup, Error> {
        let lookup = self.lookup(instance, action, size, inline).await?;
        self.metrics.action_cache_lookup(matches!(lookup, Lookup::Hit(_)));
        Ok(lookup)
    }

    /// Stores a raw entry of Bazel's HTTP cache (`disable_http_ac_validation`):
    /// bytes no one checks, apart from action results, in the local tier
    /// only.
    pub async fn put_raw_entry(
        &self,
        instance: String,
        key: Digest,
        value: bytes::Bytes,
    ) -> Result<(), Error> {
        let store = Arc::clone(&self.store);
        blocking(move || store.put_raw_entry(&instance, &key, &value)).await
    }

    /// The raw entry stored under `key`, if any; counted in the metrics as
    /// an action cache hit or miss.
    pub async fn get_raw_entry(&self, instance: String, key: Digest) -> Result<Option<bytes::Bytes>, Error> {
        let store = Arc::clone(&self.store);
        let found = blocking(move || {
            let found = store.get_raw_entry(&instance, &key)?;
            if found.is_some() {
                store.touch_raw_entry(&instance, &key);
            }
            Ok::<_, store::Error>(found)
        })
        .await?;
        self.metrics.action_cache_lookup(found.is_some());
        Ok(found)
    }

    pub(super) async fn lookup(
        &self,
        instance: String,
        action: Digest,
        size: Option<u64>,
        inline: Inline,
    ) -> Result<Lookup, Error> {
        // The blobs a result names use the action's function.
        let function = FunctionHint::Given(action.function);
        let store = Arc::clone(&self.store);
        let looked_up = instance.clone();
        let stored = blocking(move || store.get_action_result(&looked_up, &action)).await?;
        let mut bytes = match stored {
            Some(stored) if size.is_some() && stored.size.is_some() && stored.size != size => {
                return Ok(Lookup::Miss(format!(
                    "no action result for {action}: one is stored for size {}",
                    stored.size.unwrap_or_default()
                )));
            }
            stored => stored.map(|s| s.result),
        };
        let from_remote = bytes.is_none() && self.tier.is_some();
        if let (None, Some(tier)) = (&bytes, &self.tier) {
            match tier.bucket.get_action_result(&instance, &action).await {
                Ok(found) => bytes = found,
                Err(e @ objstore::Error::Damaged(_)) => {
                    self.metrics.tier_error(true);
                    tracing::warn!("deleted, to be written again: {e}");
                    let _ = tier.bucket.forget_action_result(&instance, &action).await;
                }
                Err(e) => tracing::warn!("GetActionResult answered from the local tier alone: {e}"),
            }
        }
        let Some(bytes) = bytes else {
            return Ok(Lookup::Miss(format!("no action result for {action}")));
        };
        // Counted before it is decoded: the object store holds anyone's
        // bytes. One over this node's limit is a miss (other nodes may
        // accept it); a local one was stored under another limit, and goes.
        if let Err(e) = crate::codec::check_entries::<ActionResult>(&bytes) {
            tracing::warn!("the action result of {action} is a miss here: {e}");
            if !from_remote {
                let (store, instance) = (Arc::clone(&self.store), instance.clone());
                blocking(move || store.delete_action_result(&instance, &action)).await?;
            }
            return Ok(Lookup::Miss(format!("no action result for {action} within max_call_entries")));
        }
        let result = match ActionResult::decode(bytes.clone()) {
            Ok(result) => result,
            // A result that does not decode is a miss, and is deleted so
            // that the client stores it again.
            Err(e) if from_remote => {
                let tier = self.tier.as_ref().expect("from the object store");
                self.metrics.tier_error(true);
                tracing::warn!(
                    "deleted, to be written again: the action result of {action} in the object store: {e}"
                );
                let _ = tier.bucket.forget_action_result(&instance, &action).await;
                return Ok(Lookup::Miss(format!("no action result for {action}")));
            }
            Err(e) => return Err(Error::DataLoss(format!("action result of {action}: {e}"))),
        };
        let mut rounds = 0;
        loop {
            let (store, checked, limit) = (Arc::clone(&self.store), result.clone(), self.limits.directories);
            let (missing, used) = blocking(move || missing_blobs(&store, &checked, function, limit)).await?;
            let Some(&first) = missing.first() else {
                // A hit: the result and all it names are used, in the object store too.
                if let Some(tier) = &self.tier {
                    tier.bucket.touch_action_result(&instance, &action);
                    self.touch(&used).await;
                }
                break;
            };
            // Each round brings in one level: outputs, then what their
            // trees name, and so on, all of a level in one parallel fetch.
            rounds += 1;
            if self.tier.is_some() && rounds <= FETCH_ROUNDS && self.fetch(&missing).await.is_ok() {
                let store = Arc::clone(&self.store);
                if blocking(move || store.contains(&missing)).await?.contains(&true) {
                    continue;
                }
            }
            if self.tier.is_none() {
                // Its outputs were evicted: the entry can never be a hit again.
                let (store, instance) = (Arc::clone(&self.store), instance.clone());
                blocking(move || store.delete_action_result(&instance, &action)).await?;
            }
            return Ok(Lookup::Miss(format!(
                "the action result of {action} refers to blob {first}, which is not in the CAS"
            )));
        }
        let store = Arc::clone(&self.store);
        let limit = self.limits.max_message_size;
        let _held = self.budget.hold(inlined_bytes(&result, &inline, function).min(limit as u64)).await?;
        let result = blocking(move || {
            if from_remote {
                store.copy_action_result(&instance, &action, size, &bytes)?;
            } else {
                // A hit keeps the result from eviction, like its blobs.
                store.touch_action_result(&instance, &action);
            }
            let mut result = result;
            self::inline(&store, &mut result, &inline, function, limit)?;
            Ok::<_, store::Error>(result)
        })
        .await?;
        Ok(Lookup::Hit(Box::new(result)))
    }
}

/// The blobs an action result names directly (outputs, stdout, stderr, and
/// the Tree or root Directory of each output directory).
fn referenced_blobs(result: &ActionResult, function: FunctionHint) -> Result<Vec<Digest>, Error> {
    let mut digests = Vec::new();
    let mut add = |d: Option<&reapi::Digest>, what: &str| -> Result<(), Error> {
        if let Some(d) = d {
            let d = Digest::from_proto(d, function).map_err(|e| Error::Invalid(format!("{what}: {e}")))?;
            digests.push(d);
        }
        Ok(())
    };
    for f in &result.output_files {
        add(f.digest.as_ref(), &format!("output file {:?}", f.path))?;
    }
    for d in &result.output_directories {
        add(d.tree_digest.as_ref(), &format!("output directory {:?}", d.path))?;
        add(d.root_directory_digest.as_ref(), &format!("output directory {:?}", d.path))?;
    }
    add(result.stdout_digest.as_ref(), "stdout_digest")?;
    add(result.stderr_digest.as_ref(), "stderr_digest")?;
    Ok(digests)
}

/// The blobs the result depends on that are missing from the CAS, at the
/// first level that has any: direct references, else the files and
/// directories inside output directories (as far as their Directory blobs
/// are present). Every blob found counts as used. With them, every blob
/// looked at: when none is missing, all the result depends on.
fn missing_blobs(
    store: &Store,
    result: &ActionResult,
    function: FunctionHint,
    limit: DirectoryLimit,
) -> Result<(Vec<Digest>, Vec<Digest>), Error> {
    let Ok(direct) = referenced_blobs(result, function) else {
        return Err(Error::DataLoss("a stored action result has a malformed digest".into()));
    };
    let missing = absent(store, &direct)?;
    if !missing.is_empty() {
        return Ok((missing, direct));
    }
    let mut missing_directories = Vec::new();
    let mut inner = Vec::new();
    let mut seen = HashSet::new();
    let parse = |d: &Option<reapi::Digest>| d.as_ref().and_then(|d| Digest::from_proto(d, function).ok());
    let add_directory = |dir: &Directory, inner: &mut Vec<Digest>| {
        inner.extend(dir.files.iter().filter_map(|f| parse(&f.digest)));
        dir.directories.iter().filter_map(|d| parse(&d.digest)).collect::<Vec<_>>()
    };
    for output in &result.output_directories {
        if let Some(tree_digest) = parse(&output.tree_digest) {
            // Present: the direct references were checked above.
            let tree = limit.read::<Tree>(store, &tree_digest)?.unwrap_or_default();
            for dir in tree.root.iter().chain(&tree.children) {
                add_directory(dir, &mut inner);
            }
        } else if let Some(root) = parse(&output.root_directory_digest) {
            // Directory-only format: walk the Directory blobs.
            let mut queue = vec![root];
            while let Some(d) = queue.pop() {
                if !seen.insert(d) {
                    continue;
                }
                let Some(dir) = limit.read::<Directory>(store, &d)? else {
                    missing_directories.push(d);
                    continue;
                };
                queue.extend(add_directory(&dir, &mut inner));
            }
        }
    }
    inner.sort_unstable();
    inner.dedup();
    missing_directories.extend(absent(store, &inner)?);
    inner.extend(direct);
    inner.extend(seen);
    Ok((missing_directories, inner))
}

fn absent(store: &Store, digests: &[Digest]) -> Result<Vec<Digest>, Error> {
    let present = store.contains(digests)?;
    Ok(digests.iter().zip(present).filter(|(_, p)| !p).map(|(d, _)| *d).collect())
}

/// The bytes [`inline`] may add to a result: what the reply holds.
fn inlined_bytes(result: &ActionResult, inline: &Inline, function: FunctionHint) -> u64 {
    let size = |d: &Option<reapi::Digest>| {
        d.as_ref().and_then(|d| Digest::from_proto(d, function).ok()).map_or(0, |d| d.size)
    };
    let wanted: HashSet<&str> = inline.files.iter().map(String::as_str).collect();
    let files =
        result.output_files.iter().filter(|f| wanted.contains(f.path.as_str())).map(|f| size(&f.digest));
    let stdout = if inline.stdout { size(&result.stdout_digest) } else { 0 };
    let stderr = if inline.stderr { size(&result.stderr_digest) } else { 0 };
    files.fold(stdout.saturating_add(stderr), u64::saturating_add)
}

/// Inlines stdout, stderr and the requested output files, as far as they fit
/// in a response message.
fn inline(
    store: &Store,
    result: &mut ActionResult,
    inline: &Inline,
    function: FunctionHint,
    limit: usize,
) -> Result<(), store::Error> {
    // Headroom for the response framing.
    let mut budget = limit.saturating_sub(result.encoded_len() + (64 << 10));
    let mut fetch = |d: &Option<reapi::Digest>| -> Result<Option<bytes::Bytes>, store::Error> {
        let Some(d) = d.as_ref().and_then(|d| Digest::from_proto(d, function).ok()) else {
            return Ok(None);
        };
        if d.size as usize > budget {
            return Ok(None);
        }
        let data = store.read_all(&d)?;
        if let Some(data) = &data {
            budget -= data.len();
        }
        Ok(data)
    };
    if inline.stdout
        && result.stdout_raw.is_empty()
        && let Some(data) = fetch(&result.stdout_digest)?
    {
        result.stdout_raw = data;
    }
    if inline.stderr
        && result.stderr_raw.is_empty()
        && let Some(data) = fetch(&result.stderr_digest)?
    {
        result.stderr_raw = data;
    }
    let wanted: HashSet<&str> = inline.files.iter().map(String::as_str).collect();
    for file in
        result.output_files.iter_mut().filter(|f| wanted.contains(f.path.as_str()) && f.contents.is_empty())
    {
        if let Some(data) = fetch(&file.digest)? {
            file.contents = data;
        }
    }
    Ok(())
}
