//! Generated protobuf and gRPC code for the wire formats larder serves. The
//! module tree mirrors the protobuf packages, as the generated paths expect.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod build {
    pub mod bazel {
        pub mod remote {
            pub mod execution {
                pub mod v2 {
                    tonic::include_proto!("build.bazel.remote.execution.v2");
                }
            }
        }
        pub mod semver {
            tonic::include_proto!("build.bazel.semver");
        }
    }
}

pub mod google {
    pub mod bytestream {
        tonic::include_proto!("google.bytestream");
    }
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub use build::bazel::remote::execution::v2 as reapi;
pub use build::bazel::semver;
pub use google::{bytestream, rpc};
