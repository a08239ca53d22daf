//! The cache layer's one error type, and the one place where larder's errors
//! become gRPC statuses (the HTTP faces map those codes to HTTP codes, in
//! `http`). Every error below the faces arrives here as a typed value: no
//! code recognises an error by its message.

use tonic::{Code, Status};

use crate::{budget, codec, compression, digest, download, objstore, store};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    ObjStore(#[from] objstore::Error),
    #[error(transparent)]
    Digest(#[from] digest::Error),
    #[error(transparent)]
    Compression(#[from] compression::Error),
    #[error(transparent)]
    Budget(#[from] budget::Refused),
    #[error(transparent)]
    Entries(#[from] codec::TooManyEntries),
    #[error(transparent)]
    Download(#[from] download::Error),
    /// What the call asks for is in neither tier.
    #[error("{0}")]
    NotFound(String),
    /// The client sent something that breaks a rule of the protocol.
    #[error("{0}")]
    Invalid(String),
    /// Stored data the call needs exceeds this server's limits.
    #[error("{0}")]
    Precondition(String),
    /// Stored data the call needs is damaged beyond what the store repairs.
    #[error("stored data is corrupt: {0}")]
    DataLoss(String),
    /// A blocking-pool task failed (it panicked, or the runtime stopped).
    #[error("a storage worker failed: {0}")]
    Worker(String),
}

impl Error {
    pub fn code(&self) -> Code {
        use store::Error as S;
        match self {
            Error::Store(e) => match e {
                S::DigestMismatch(_) | S::BadOffset { .. } => Code::InvalidArgument,
                S::UploadBusy(_) => Code::Aborted,
                S::Vanished(_) | S::Removed(_) => Code::NotFound,
                S::Corrupt(_) => Code::DataLoss,
                S::Full { .. } | S::QueueFull { .. } | S::TooLarge { .. } | S::DiskFull(_) => {
                    Code::ResourceExhausted
                }
                S::Open(_) | S::Locked(_) => Code::Unavailable,
                S::Batch(_) | S::Db(_) | S::Measure(_) | S::File(_) => Code::Internal,
            },
            Error::ObjStore(e) => match e {
                objstore::Error::Unavailable(_) => Code::Unavailable,
                objstore::Error::Damaged(_) => Code::NotFound,
                objstore::Error::Config(_) => Code::FailedPrecondition,
            },
            Error::Download(e) => match e {
                download::Error::Setup(_) => Code::FailedPrecondition,
                download::Error::NotAllowed(_) | download::Error::Refused(_) => Code::PermissionDenied,
                download::Error::NotFound(_) => Code::NotFound,
                download::Error::TimedOut(_) => Code::DeadlineExceeded,
                download::Error::TooLarge(_) => Code::ResourceExhausted,
                download::Error::Mismatch(_) => Code::Aborted,
                download::Error::Failed(_) => Code::Unavailable,
                download::Error::Local(_) => Code::Internal,
            },
            Error::Digest(_) | Error::Entries(_) | Error::Invalid(_) => Code::InvalidArgument,
            Error::Compression(compression::Error::Setup(_)) => Code::Internal,
            Error::Compression(_) => Code::InvalidArgument,
            Error::Budget(budget::Refused::Exhausted { .. }) => Code::ResourceExhausted,
            Error::Budget(budget::Refused::ShuttingDown) => Code::Unavailable,
            Error::NotFound(_) => Code::NotFound,
            Error::Precondition(_) => Code::FailedPrecondition,
            Error::DataLoss(_) => Code::DataLoss,
            Error::Worker(_) => Code::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let message = match &e {
            Error::ObjStore(objstore::Error::Unavailable(_)) => format!("{e}; retry when it is back"),
            _ => e.to_string(),
        };
        Status::new(e.code(), message)
    }
}
