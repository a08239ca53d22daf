//! Who may call: credentials checked against the htpasswd file (bcrypt,
//! throttled, bounded in time), anonymous readers where allowed, and
//! refusals written in the caller's protocol.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::{Request, Response, StatusCode};
use tonic::Status;
use tonic::body::Body;

use super::methods;
use crate::auth::{Access, Auth, Caller};
use crate::http::HttpError;

/// How long a login may wait for a bcrypt check.
const BCRYPT_WAIT: Duration = Duration::from_secs(5);

/// Lets through callers with good credentials, and anonymous readers
/// when allowed; refuses the rest. Says what the caller may do.
pub async fn authorize<B>(
    auth: Option<&Arc<Auth>>,
    peer: Option<IpAddr>,
    request: &Request<B>,
    grpc: bool,
) -> Result<Access, Refusal> {
    let Some(auth) = auth else {
        return Ok(Access::ALL);
    };
    let header = request.headers().get(AUTHORIZATION).map(|v| v.as_bytes().to_vec());
    let caller = match auth.users.check_quickly(header.as_deref()) {
        Some(caller) => caller,
        None => check_password(auth, peer, header).await?,
    };
    let write = methods::is_write(grpc, request.method(), request.uri().path());
    match caller {
        Caller::User(_) => Ok(Access { write: true, anonymous: false }),
        Caller::Anonymous if auth.anonymous_reads && !write => Ok(Access { write: false, anonymous: true }),
        Caller::Anonymous if auth.anonymous_reads => Err(Refusal::Status(Status::permission_denied(
            "anonymous clients may only read here: send credentials (authorization: Basic) to write",
        ))),
        Caller::Anonymous => Err(Refusal::Status(Status::unauthenticated(
            "credentials required: send authorization: Basic with a user's password",
        ))),
        Caller::Refused => {
            Err(Refusal::Status(Status::unauthenticated("wrong credentials: check the user and password")))
        }
    }
}

/// bcrypt's verdict on a password it has not seen. bcrypt is slow on
/// purpose: at most two checks run at once, and callers with too many
/// recent failures, or a password checked meanwhile, get no check
/// (looked at before and after waiting their turn, so that a queue of
/// them drains at once).
async fn check_password(
    auth: &Arc<Auth>,
    peer: Option<IpAddr>,
    header: Option<Vec<u8>>,
) -> Result<Caller, Refusal> {
    let user = header.as_deref().and_then(crate::auth::user_of).unwrap_or_default();
    let throttled = || auth.throttle.wait(peer, &user).map(Refusal::Throttled);
    if let Some(refusal) = throttled() {
        return Err(refusal);
    }
    // The queue for bcrypt is bounded in time: a flood from many
    // addresses gets UNAVAILABLE, which clients retry, not a hang.
    let _permit = match tokio::time::timeout(BCRYPT_WAIT, auth.bcrypt.acquire()).await {
        Ok(Ok(permit)) => permit,
        Ok(Err(_)) => return Err(Refusal::Status(Status::unavailable("shutting down"))),
        Err(_) => {
            let status = Status::unavailable("too many logins to check at once: retry shortly");
            return Err(Refusal::Status(status));
        }
    };
    if let Some(refusal) = throttled() {
        return Err(refusal);
    }
    // The password may have been checked while this call waited (the
    // same wrong one, sent by 40 clients at once, is checked once).
    if let Some(caller) = auth.users.check_quickly(header.as_deref()) {
        return Ok(caller);
    }
    let checker = Arc::clone(auth);
    let caller = tokio::task::spawn_blocking(move || checker.users.check(header.as_deref()))
        .await
        .unwrap_or(Caller::Refused);
    if caller == Caller::Refused {
        auth.throttle.failed(peer, &user, auth.users.knows(&user));
    }
    Ok(caller)
}

/// Why a call is not let in.
pub enum Refusal {
    Status(Status),
    /// Too many failed logins: try again after this long.
    Throttled(Duration),
}

impl Refusal {
    pub fn code(&self) -> tonic::Code {
        match self {
            Refusal::Status(status) => status.code(),
            Refusal::Throttled(_) => tonic::Code::Unauthenticated,
        }
    }
}

/// A refusal in the caller's protocol: a gRPC status, or Google's JSON error
/// (429 with Retry-After for a throttled login).
pub fn refuse(grpc: bool, refusal: Refusal) -> Response<Body> {
    let (status, retry_after) = match refusal {
        Refusal::Status(status) => (status, None),
        Refusal::Throttled(wait) => {
            let seconds = wait.as_secs().max(1);
            let message = format!(
                "too many failed logins from this address or for this user: retry in {seconds}s, with the right password"
            );
            (Status::unauthenticated(message), Some(seconds))
        }
    };
    match (grpc, retry_after) {
        (true, _) => status.into_http(),
        (false, None) => HttpError::Status(status).into_response(),
        (false, Some(seconds)) => {
            let code = StatusCode::TOO_MANY_REQUESTS;
            let mut response =
                HttpError::Http { code, message: status.message().to_string(), allow: None }.into_response();
            response.headers_mut().insert(http::header::RETRY_AFTER, seconds.into());
            response
        }
    }
}
