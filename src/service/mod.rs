//! Thin gRPC adapters over the store, one file per API. Each validates what
//! the client sent, runs store work on the blocking pool, and maps errors to
//! gRPC statuses here, in one place.

pub mod action_cache;
pub mod bytestream;
pub mod capabilities;
pub mod cas;
pub mod http;
mod http_cache;
mod rest;

use std::sync::Arc;

use tonic::{Code, Status};

use crate::proto::{reapi, rpc};
use crate::{compression, digest, store};

/// What every service shares: the store and the limits clients are told about.
pub struct Shared {
    pub store: Arc<store::Store>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Largest sum of blob sizes in one batch call (advertised).
    pub max_batch_size: u64,
    /// Largest gRPC message received or sent.
    pub max_message_size: usize,
}

/// Largest data payload in one ByteStream ReadResponse: well under the 4 MiB
/// that clients accept by default.
pub const READ_MESSAGE_SIZE: usize = 1 << 20;

/// Runs store work on the blocking pool, keeping the async runtime free.
pub async fn blocking<T, F>(f: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, store::Error> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("a storage worker failed: {e}")))?
        .map_err(Status::from)
}

impl From<store::Error> for Status {
    fn from(e: store::Error) -> Status {
        use store::Error::*;
        let code = match &e {
            DigestMismatch(_) | BadOffset { .. } => Code::InvalidArgument,
            UploadBusy(_) => Code::Aborted,
            Vanished(_) | Removed(_) => Code::NotFound,
            Corrupt(_) => Code::DataLoss,
            Full { .. } => Code::ResourceExhausted,
            // Eviction keeps writes off a full disk; should one slip through, say so.
            Db(e) if e.to_string().contains("No space left") => Code::ResourceExhausted,
            Open(_) | Locked(_) => Code::Unavailable,
            Batch(_) | Db(_) | Measure(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

impl From<compression::Error> for Status {
    fn from(e: compression::Error) -> Status {
        match e {
            compression::Error::Setup(_) => Status::internal(e.to_string()),
            _ => Status::invalid_argument(e.to_string()),
        }
    }
}

impl From<digest::Error> for Status {
    fn from(e: digest::Error) -> Status {
        Status::invalid_argument(e.to_string())
    }
}

/// A `google.rpc.Status` for per-item results in batch responses.
pub fn rpc_status(status: &Status) -> rpc::Status {
    rpc::Status { code: status.code() as i32, message: status.message().to_string(), details: vec![] }
}

pub fn ok_status() -> rpc::Status {
    rpc::Status::default()
}

/// Validates the instance name and digest function common to REAPI requests.
pub fn request_function(instance: &str, function: i32) -> Result<digest::FunctionHint, Status> {
    digest::check_instance(instance)?;
    Ok(digest::Function::from_request(function)?)
}

/// A required digest field.
pub fn required_digest(
    d: Option<&reapi::Digest>,
    field: &str,
    function: digest::FunctionHint,
) -> Result<digest::Digest, Status> {
    digest::Digest::from_optional(d, function)?
        .ok_or_else(|| Status::invalid_argument(format!("{field} is required")))
}
