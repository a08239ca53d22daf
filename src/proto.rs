//! Generated protobuf and gRPC code for the wire formats larder serves, with
//! the canonical proto3 JSON mapping of each message (serde, from pbjson).
//! The module tree mirrors the protobuf packages, as the generated paths expect.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod build {
    pub mod bazel {
        pub mod remote {
            pub mod asset {
                pub mod v1 {
                    tonic::include_proto!("build.bazel.remote.asset.v1");
                    include!(concat!(env!("OUT_DIR"), "/build.bazel.remote.asset.v1.serde.rs"));
                }
            }
            pub mod execution {
                pub mod v2 {
                    tonic::include_proto!("build.bazel.remote.execution.v2");
                    include!(concat!(env!("OUT_DIR"), "/build.bazel.remote.execution.v2.serde.rs"));
                }
            }
        }
        pub mod semver {
            tonic::include_proto!("build.bazel.semver");
            include!(concat!(env!("OUT_DIR"), "/build.bazel.semver.serde.rs"));
        }
    }
}

pub mod google {
    pub mod bytestream {
        tonic::include_proto!("google.bytestream");
        include!(concat!(env!("OUT_DIR"), "/google.bytestream.serde.rs"));
    }
    pub mod rpc {
        tonic::include_proto!("google.rpc");
        include!(concat!(env!("OUT_DIR"), "/google.rpc.serde.rs"));
    }
}

pub use build::bazel::remote::asset::v1 as asset;
pub use build::bazel::remote::execution::v2 as reapi;
pub use build::bazel::semver;
pub use google::{bytestream, rpc};
