//! ActionCache: GetActionResult and UpdateActionResult. Results are served
//! only when complete (the cache checks their outputs).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{Shared, request_function, required_digest};
use crate::cache::{Inline, Lookup};
use crate::proto::reapi::{
    ActionResult, GetActionResultRequest, UpdateActionResultRequest, action_cache_server::ActionCache,
};

pub struct ActionCacheService {
    shared: Arc<Shared>,
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
        let request = request.into_inner();
        let function = request_function(&request.instance_name, request.digest_function)?;
        let action = required_digest(request.action_digest.as_ref(), "action_digest", function)?;
        let inline = Inline {
            stdout: request.inline_stdout,
            stderr: request.inline_stderr,
            files: request.inline_output_files,
        };
        let lookup =
            self.shared.cache.get_action_result(request.instance_name, action, Some(action.size), inline);
        match lookup.await? {
            Lookup::Hit(result) => Ok(Response::new(*result)),
            Lookup::Miss(why) => Err(Status::not_found(why)),
        }
    }

    async fn update_action_result(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let request = request.into_inner();
        let function = request_function(&request.instance_name, request.digest_function)?;
        let action = required_digest(request.action_digest.as_ref(), "action_digest", function)?;
        let result =
            request.action_result.ok_or_else(|| Status::invalid_argument("action_result is required"))?;
        self.shared
            .cache
            .put_action_result(request.instance_name, action, Some(action.size), &result)
            .await?;
        Ok(Response::new(result))
    }
}
