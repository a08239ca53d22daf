//! The gRPC face: one tonic service per API. Each validates what the client
//! sent, calls the [`crate::cache`], and builds the response; errors become
//! statuses in `cache::Error`'s one mapping.

pub mod action_cache;
pub mod asset;
pub mod bytestream;
pub mod capabilities;
pub mod cas;

use std::sync::Arc;

use tonic::Status;

use crate::cache::{self, Cache};
use crate::digest;
use crate::proto::{reapi, rpc};

/// What every service shares: the cache and the limits clients are told about.
pub struct Shared {
    pub cache: Arc<Cache>,
    /// Largest sum of blob sizes in one batch call (advertised).
    pub max_batch_size: u64,
    /// Largest gRPC message received or sent.
    pub max_message_size: usize,
    /// Most entries in one request (`max_call_entries`).
    pub max_entries: usize,
}

impl Shared {
    /// Refuses a call with more entries than `max_call_entries`, before any
    /// work per entry (the REST face decodes its JSON before this).
    pub fn check_entries(&self, entries: usize, what: &str) -> Result<(), Status> {
        if entries > self.max_entries {
            return Err(Status::invalid_argument(format!(
                "{what} lists {entries} entries, more than max_call_entries ({}): split it into smaller calls",
                self.max_entries
            )));
        }
        Ok(())
    }
}

/// Largest data payload in one ByteStream ReadResponse: well under the 4 MiB
/// that clients accept by default.
pub const READ_MESSAGE_SIZE: usize = cache::MAX_PIECE;

/// A `google.rpc.Status` for per-item results in batch responses.
pub fn rpc_status(status: &Status) -> rpc::Status {
    rpc::Status { code: status.code() as i32, message: status.message().to_string(), details: vec![] }
}

pub fn ok_status() -> rpc::Status {
    rpc::Status::default()
}

/// Validates the instance name and digest function common to REAPI requests.
pub fn request_function(instance: &str, function: i32) -> Result<digest::FunctionHint, Status> {
    digest::check_instance(instance).map_err(invalid)?;
    digest::Function::from_request(function).map_err(invalid)
}

/// A client's malformed digest, resource name or function, as a status.
pub fn invalid(e: digest::Error) -> Status {
    cache::Error::from(e).into()
}

/// A required digest field.
pub fn required_digest(
    d: Option<&reapi::Digest>,
    field: &str,
    function: digest::FunctionHint,
) -> Result<digest::Digest, Status> {
    digest::Digest::from_optional(d, function)
        .map_err(invalid)?
        .ok_or_else(|| Status::invalid_argument(format!("{field} is required")))
}
