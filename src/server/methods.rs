//! The one table of gRPC methods served: each path once, with whether it
//! writes (what anonymous readers may not call) and how its request body is
//! held in the budget. Health checks, metric labels and access rules all
//! read it.

use crate::budget::Keep;

pub struct Method {
    /// `/package.Service/Method`: also its metric label.
    pub path: &'static str,
    /// Whether it stores something.
    pub write: bool,
    /// What its request body holds in the budget while the call runs.
    pub body: Keep,
}

const fn read(path: &'static str) -> Method {
    Method { path, write: false, body: Keep::Everything }
}

const fn write(path: &'static str, body: Keep) -> Method {
    Method { path, write: true, body }
}

/// A unary call's message is decoded whole: its body is held until the call
/// ends. An upload's stream is held a message at a time: the upload holds
/// its own buffers.
const METHODS: [Method; 17] = [
    read("/build.bazel.remote.execution.v2.Capabilities/GetCapabilities"),
    read("/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs"),
    write("/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs", Keep::Everything),
    read("/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs"),
    read("/build.bazel.remote.execution.v2.ContentAddressableStorage/GetTree"),
    // It stores chunks, but only of what is stored: a reader may split.
    read("/build.bazel.remote.execution.v2.ContentAddressableStorage/SplitBlob"),
    write("/build.bazel.remote.execution.v2.ContentAddressableStorage/SpliceBlob", Keep::Everything),
    read("/build.bazel.remote.execution.v2.ActionCache/GetActionResult"),
    write("/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult", Keep::Everything),
    read("/google.bytestream.ByteStream/Read"),
    write("/google.bytestream.ByteStream/Write", Keep::Messages),
    read("/google.bytestream.ByteStream/QueryWriteStatus"),
    // A fetch may download, but only from hosts the operator allows.
    read("/build.bazel.remote.asset.v1.Fetch/FetchBlob"),
    read("/build.bazel.remote.asset.v1.Fetch/FetchDirectory"),
    write("/build.bazel.remote.asset.v1.Push/PushBlob", Keep::Everything),
    write("/build.bazel.remote.asset.v1.Push/PushDirectory", Keep::Everything),
    read(HEALTH_CHECK),
];

const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// The method at `path`, if it is one served.
pub fn find(path: &str) -> Option<&'static Method> {
    METHODS.iter().find(|m| m.path == path)
}

/// A metric label for a gRPC call: its path if it is a method served, else
/// "other", so that clients cannot grow the label set.
pub fn label(path: &str) -> String {
    find(path).map_or("other", |m| m.path).to_string()
}

/// The fully qualified names of the services whose methods are in the
/// table (for health checks, which report each), health itself aside.
pub fn services() -> Vec<&'static str> {
    let mut services: Vec<&str> = METHODS
        .iter()
        .filter(|m| m.path != HEALTH_CHECK)
        .filter_map(|m| m.path.strip_prefix('/')?.split_once('/').map(|(service, _)| service))
        .collect();
    services.dedup();
    services
}

/// Whether a call stores something: a write method over gRPC; over HTTP,
/// anything but a GET, a HEAD or a POST of a query.
pub fn is_write(grpc: bool, method: &http::Method, path: &str) -> bool {
    match grpc {
        true => find(path).is_some_and(|m| m.write),
        // Over HTTP, anything but a GET, a HEAD or a POST of a query is a
        // write: a route added later is closed to anonymous callers until
        // it is listed here as a read.
        false => {
            let read = matches!(*method, http::Method::GET | http::Method::HEAD)
                || (*method == http::Method::POST
                    && [":findMissing", ":batchRead", ":fetchBlob", ":fetchDirectory"]
                        .iter()
                        .any(|verb| path.ends_with(verb)));
            !read
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_services_are_those_of_the_methods() {
        assert_eq!(
            super::services(),
            [
                "build.bazel.remote.execution.v2.Capabilities",
                "build.bazel.remote.execution.v2.ContentAddressableStorage",
                "build.bazel.remote.execution.v2.ActionCache",
                "google.bytestream.ByteStream",
                "build.bazel.remote.asset.v1.Fetch",
                "build.bazel.remote.asset.v1.Push",
            ]
        );
        assert_eq!(
            super::label("/google.bytestream.ByteStream/Write"),
            "/google.bytestream.ByteStream/Write"
        );
        assert_eq!(super::label("/google.bytestream.ByteStream/Nope"), "other");
    }
}
