//! ActionCache: results are namespaced by instance name (the CAS is shared by
//! all instances), and a hit is only served when every blob it references is
//! in the CAS.

use std::collections::HashSet;
use std::sync::Arc;

use prost::Message;
use tonic::{Request, Response, Status};

use super::{DirectoryLimit, Shared, blocking, request_function, required_digest};
use crate::digest::{Digest, FunctionHint};
use crate::proto::reapi::{
    ActionResult, Directory, GetActionResultRequest, Tree, UpdateActionResultRequest,
    action_cache_server::ActionCache,
};
use crate::store::{self, Store};

pub struct ActionCacheService {
    shared: Arc<Shared>,
}

/// Marks a call from Bazel's HTTP cache, which names an action by its hash
/// alone: its digest's size is unknown, and matches any stored size.
#[derive(Clone, Copy)]
pub struct AnySize;

/// The action size a call names, `None` for [`AnySize`] calls.
fn named_size<T>(request: &Request<T>, action: &Digest) -> Option<u64> {
    request.extensions().get::<AnySize>().is_none().then_some(action.size)
}

impl ActionCacheService {
    pub fn new(shared: Arc<Shared>) -> Self {
        ActionCacheService { shared }
    }
}

#[tonic::async_trait]
impl ActionCache for ActionCacheService {
    async fn get_action_result(
        &self,
        request: Request<GetActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let function = request_function(&request.get_ref().instance_name, request.get_ref().digest_function)?;
        let action = required_digest(request.get_ref().action_digest.as_ref(), "action_digest", function)?;
        let size = named_size(&request, &action);
        // The blobs a result names use the action's function.
        let function = FunctionHint::Given(action.function);
        let lookup = self.lookup(request.into_inner(), action, size, function).await?;
        self.shared.metrics.action_cache_lookup(lookup.is_ok());
        lookup.map(Response::new).map_err(Status::not_found)
    }

    async fn update_action_result(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let function = request_function(&request.get_ref().instance_name, request.get_ref().digest_function)?;
        let action = required_digest(request.get_ref().action_digest.as_ref(), "action_digest", function)?;
        let size = named_size(&request, &action);
        let request = request.into_inner();
        // The blobs a result names use the action's function.
        let function = FunctionHint::Given(action.function);
        let result =
            request.action_result.ok_or_else(|| Status::invalid_argument("action_result is required"))?;
        // Refuse results that could never be served back.
        referenced_blobs(&result, function)?;
        let encoded = result.encode_to_vec();
        let store = Arc::clone(&self.shared.store);
        let instance = request.instance_name;
        let local = (instance.clone(), encoded.clone());
        blocking(move || store.put_action_result(&local.0, &action, size, &local.1)).await?;
        // In the object store too: any node can answer the hit.
        self.shared.replicate_action_result(instance, action, encoded).await?;
        Ok(Response::new(result))
    }
}

/// Levels of one result's outputs fetched from the object store before
/// giving up (a directory tree this deep).
const FETCH_ROUNDS: usize = 64;

impl ActionCacheService {
    /// The result for `action` if it is complete: its blobs in the local
    /// tier, or brought in from the object store (as is a result only the
    /// object store holds). A result stored for another size of the action
    /// is a miss. `Err` inside says why it is a miss.
    async fn lookup(
        &self,
        request: GetActionResultRequest,
        action: Digest,
        size: Option<u64>,
        function: FunctionHint,
    ) -> Result<Result<ActionResult, String>, Status> {
        let shared = &self.shared;
        let store = Arc::clone(&shared.store);
        let instance = request.instance_name.clone();
        let stored = blocking(move || store.get_action_result(&instance, &action)).await?;
        let mut bytes = match stored {
            Some(stored) if size.is_some() && stored.size.is_some() && stored.size != size => {
                return Ok(Err(format!(
                    "no action result for {action}: one is stored for size {}",
                    stored.size.unwrap_or_default()
                )));
            }
            stored => stored.map(|s| s.result),
        };
        let from_remote = bytes.is_none() && shared.remote.is_some();
        if let (None, Some(remote)) = (&bytes, &shared.remote) {
            match remote.get_action_result(&request.instance_name, &action).await {
                Ok(found) => bytes = found,
                Err(e @ crate::remote::Error::Damaged(_)) => {
                    shared.metrics.tier_error(true);
                    tracing::warn!("deleted, to be written again: {e}");
                    let _ = remote.forget_action_result(&request.instance_name, &action).await;
                }
                Err(e) => tracing::warn!("GetActionResult answered from the local tier alone: {e}"),
            }
        }
        let Some(bytes) = bytes else {
            return Ok(Err(format!("no action result for {action}")));
        };
        // Counted before it is decoded: the object store holds anyone's
        // bytes. One over this node's limit is a miss (other nodes may
        // accept it); a local one was stored under another limit, and goes.
        if let Err(status) = crate::codec::check_entries::<ActionResult>(&bytes) {
            tracing::warn!("the action result of {action} is a miss here: {}", status.message());
            if !from_remote {
                let (store, instance) = (Arc::clone(&shared.store), request.instance_name.clone());
                blocking(move || store.delete_action_result(&instance, &action)).await?;
            }
            return Ok(Err(format!("no action result for {action} within max_call_entries")));
        }
        let decoded = ActionResult::decode(bytes.clone()).map_err(|e| Status::data_loss(e.to_string()));
        let result = match decoded {
            Ok(result) => result,
            // A result that does not decode is a miss, and is deleted so
            // that the client stores it again.
            Err(e) if from_remote => {
                let remote = shared.remote.as_ref().expect("from the object store");
                shared.metrics.tier_error(true);
                let e = e.message();
                tracing::warn!(
                    "deleted, to be written again: the action result of {action} in the object store: {e}"
                );
                let _ = remote.forget_action_result(&request.instance_name, &action).await;
                return Ok(Err(format!("no action result for {action}")));
            }
            Err(e) => {
                let e = e.message();
                return Err(Status::from(store::Error::Corrupt(format!("action result of {action}: {e}"))));
            }
        };
        let mut rounds = 0;
        loop {
            let (store, checked, limit) = (Arc::clone(&shared.store), result.clone(), shared.directories);
            let missing =
                tokio::task::spawn_blocking(move || missing_blobs(&store, &checked, function, limit))
                    .await
                    .map_err(|e| Status::internal(format!("a storage worker failed: {e}")))??;
            let Some(&first) = missing.first() else {
                break;
            };
            // Each round brings in one level: outputs, then what their
            // trees name, and so on, all of a level in one parallel fetch.
            rounds += 1;
            if shared.remote.is_some() && rounds <= FETCH_ROUNDS && shared.fetch(&missing).await.is_ok() {
                let store = Arc::clone(&shared.store);
                if blocking(move || store.contains(&missing)).await?.contains(&true) {
                    continue;
                }
            }
            if shared.remote.is_none() {
                // Its outputs were evicted: the entry can never be a hit again.
                let (store, instance) = (Arc::clone(&shared.store), request.instance_name.clone());
                blocking(move || store.delete_action_result(&instance, &action)).await?;
            }
            return Ok(Err(format!(
                "the action result of {action} refers to blob {first}, which is not in the CAS"
            )));
        }
        let store = Arc::clone(&shared.store);
        let limit = shared.max_message_size;
        let _held = shared.budget.hold(inlined_bytes(&result, &request, function).min(limit as u64)).await?;
        let result = blocking(move || {
            if from_remote {
                store.copy_action_result(&request.instance_name, &action, size, &bytes)?;
            } else {
                // A hit keeps the result from eviction, like its blobs.
                store.touch_action_result(&request.instance_name, &action);
            }
            let mut result = result;
            inline(&store, &mut result, &request, function, limit)?;
            Ok(result)
        })
        .await?;
        Ok(Ok(result))
    }
}

/// The blobs an action result names directly (outputs, stdout, stderr, and
/// the Tree or root Directory of each output directory).
fn referenced_blobs(result: &ActionResult, function: FunctionHint) -> Result<Vec<Digest>, Status> {
    let mut digests = Vec::new();
    let mut add = |d: Option<&crate::proto::reapi::Digest>, what: &str| -> Result<(), Status> {
        if let Some(d) = d {
            let d = Digest::from_proto(d, function)
                .map_err(|e| Status::invalid_argument(format!("{what}: {e}")))?;
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
/// are present). Every blob found counts as used.
fn missing_blobs(
    store: &Store,
    result: &ActionResult,
    function: FunctionHint,
    limit: DirectoryLimit,
) -> Result<Vec<Digest>, Status> {
    let Ok(direct) = referenced_blobs(result, function) else {
        return Err(store::Error::Corrupt("a stored action result has a malformed digest".into()).into());
    };
    let missing = absent(store, &direct)?;
    if !missing.is_empty() {
        return Ok(missing);
    }
    let mut missing_directories = Vec::new();
    let mut inner = Vec::new();
    let mut seen = HashSet::new();
    let parse = |d: &Option<crate::proto::reapi::Digest>| {
        d.as_ref().and_then(|d| Digest::from_proto(d, function).ok())
    };
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
    Ok(missing_directories)
}

fn absent(store: &Store, digests: &[Digest]) -> Result<Vec<Digest>, Status> {
    let present = store.contains(digests)?;
    Ok(digests.iter().zip(present).filter(|(_, p)| !p).map(|(d, _)| *d).collect())
}

/// The bytes [`inline`] may add to a result: what the reply holds.
fn inlined_bytes(result: &ActionResult, request: &GetActionResultRequest, function: FunctionHint) -> u64 {
    let size = |d: &Option<crate::proto::reapi::Digest>| {
        d.as_ref().and_then(|d| Digest::from_proto(d, function).ok()).map_or(0, |d| d.size)
    };
    let wanted: HashSet<&str> = request.inline_output_files.iter().map(String::as_str).collect();
    let files =
        result.output_files.iter().filter(|f| wanted.contains(f.path.as_str())).map(|f| size(&f.digest));
    let stdout = if request.inline_stdout { size(&result.stdout_digest) } else { 0 };
    let stderr = if request.inline_stderr { size(&result.stderr_digest) } else { 0 };
    files.fold(stdout.saturating_add(stderr), u64::saturating_add)
}

/// Inlines stdout, stderr and the requested output files, as far as they fit
/// in a response message.
fn inline(
    store: &Store,
    result: &mut ActionResult,
    request: &GetActionResultRequest,
    function: FunctionHint,
    limit: usize,
) -> Result<(), store::Error> {
    // Headroom for the response framing.
    let mut budget = limit.saturating_sub(result.encoded_len() + (64 << 10));
    let mut fetch = |d: &Option<crate::proto::reapi::Digest>| -> Result<Option<bytes::Bytes>, store::Error> {
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
    if request.inline_stdout
        && result.stdout_raw.is_empty()
        && let Some(data) = fetch(&result.stdout_digest)?
    {
        result.stdout_raw = data;
    }
    if request.inline_stderr
        && result.stderr_raw.is_empty()
        && let Some(data) = fetch(&result.stderr_digest)?
    {
        result.stderr_raw = data;
    }
    let wanted: HashSet<&str> = request.inline_output_files.iter().map(String::as_str).collect();
    for file in
        result.output_files.iter_mut().filter(|f| wanted.contains(f.path.as_str()) && f.contents.is_empty())
    {
        if let Some(data) = fetch(&file.digest)? {
            file.contents = data;
        }
    }
    Ok(())
}
