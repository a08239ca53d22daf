//! Capabilities: what this cache-only server offers.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{Shared, request_function};
use crate::auth::Access;
use crate::cdc::Chunking;
use crate::digest::Function;
use crate::proto::reapi::{
    ActionCacheUpdateCapabilities, CacheCapabilities, GetCapabilitiesRequest, ServerCapabilities,
    capabilities_server::Capabilities, compressor, symlink_absolute_path_strategy,
};
use crate::proto::semver::SemVer;

pub struct CapabilitiesService {
    shared: Arc<Shared>,
}

impl CapabilitiesService {
    pub fn new(shared: Arc<Shared>) -> Self {
        CapabilitiesService { shared }
    }
}

/// The REAPI versions whose cache features are served in full: up to 2.12,
/// which added SplitBlob and SpliceBlob (after BLAKE3 in 2.8, zstd
/// compression of ByteStream and batches, and the digest_function fields of
/// requests).
const LOW_API: SemVer = SemVer { major: 2, minor: 0, patch: 0, prerelease: String::new() };
const HIGH_API: SemVer = SemVer { major: 2, minor: 12, patch: 0, prerelease: String::new() };

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<ServerCapabilities>, Status> {
        request_function(&request.get_ref().instance_name, 0)?;
        // Each caller is told whether it may write (anonymous readers may not).
        let update_enabled = request.extensions().get::<Access>().is_none_or(|access| access.write);
        let (fast_cdc, rep_max) = Chunking::advertised();
        Ok(Response::new(ServerCapabilities {
            cache_capabilities: Some(CacheCapabilities {
                digest_functions: Function::ALL.iter().map(|f| f.to_wire() as i32).collect(),
                action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities { update_enabled }),
                max_batch_total_size_bytes: self.shared.max_batch_size as i64,
                // A cache stores what clients send; it never follows symlinks.
                symlink_absolute_path_strategy: symlink_absolute_path_strategy::Value::Allowed as i32,
                supported_compressors: vec![compressor::Value::Zstd as i32],
                supported_batch_update_compressors: vec![compressor::Value::Zstd as i32],
                max_cas_blob_size_bytes: self.shared.cache.max_blob_size() as i64,
                split_blob_support: true,
                splice_blob_support: true,
                fast_cdc_2020_params: Some(fast_cdc),
                rep_max_cdc_params: Some(rep_max),
                ..Default::default()
            }),
            execution_capabilities: None,
            low_api_version: Some(LOW_API),
            high_api_version: Some(HIGH_API),
            ..Default::default()
        }))
    }
}
