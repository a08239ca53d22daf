//! Every digest function clients send: SHA-256, SHA-1, SHA-384, SHA-512 and
//! BLAKE3, named by the request's `digest_function` field or resource name
//! segment, or inferred from the hash length.

mod common;

use bytes::Bytes;
use common::*;
use larder::digest::Function;
use larder::proto::reapi::{self, digest_function::Value as Wire};
use prost::Message;
use tonic::Code;

fn server() -> (tempfile::TempDir, TestServer) {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("data"), &[]);
    (tmp, server)
}

fn of(f: Function, data: &[u8]) -> reapi::Digest {
    f.digest(data).to_proto()
}

async fn batch_update(c: &mut Clients, f: Wire, blobs: &[(reapi::Digest, &[u8])]) -> Vec<i32> {
    let requests = blobs
        .iter()
        .map(|(d, data)| reapi::batch_update_blobs_request::Request {
            digest: Some(d.clone()),
            data: Bytes::copy_from_slice(data),
            compressor: 0,
        })
        .collect();
    let request =
        reapi::BatchUpdateBlobsRequest { requests, digest_function: f as i32, ..Default::default() };
    let response = c.cas.batch_update_blobs(request).await.unwrap().into_inner();
    response.responses.iter().map(|r| r.status.as_ref().unwrap().code).collect()
}

async fn find_missing(c: &mut Clients, f: Wire, digests: Vec<reapi::Digest>) -> Vec<reapi::Digest> {
    let request = reapi::FindMissingBlobsRequest {
        blob_digests: digests,
        digest_function: f as i32,
        ..Default::default()
    };
    c.cas.find_missing_blobs(request).await.unwrap().into_inner().missing_blob_digests
}

async fn batch_read(c: &mut Clients, f: Wire, digests: Vec<reapi::Digest>) -> Vec<(i32, Bytes)> {
    let request = reapi::BatchReadBlobsRequest {
        digests: digests.to_vec(),
        digest_function: f as i32,
        ..Default::default()
    };
    let response = c.cas.batch_read_blobs(request).await.unwrap().into_inner();
    response.responses.into_iter().map(|r| (r.status.unwrap().code, r.data)).collect()
}

#[tokio::test]
async fn capabilities_advertise_every_function_served() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    let caps = c.caps.get_capabilities(reapi::GetCapabilitiesRequest::default()).await.unwrap().into_inner();
    let functions = caps.cache_capabilities.unwrap().digest_functions;
    for f in [Wire::Sha256, Wire::Sha1, Wire::Sha384, Wire::Sha512, Wire::Blake3] {
        assert!(functions.contains(&(f as i32)), "{f:?} is advertised");
    }
    assert_eq!(functions.len(), 5, "nothing unserved is advertised: {functions:?}");
}

#[tokio::test]
async fn the_same_bytes_under_sha256_and_blake3_are_separate_blobs() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    let data = text_bytes(300_000, 1);
    let (sha, blake) = (of(Function::Sha256, &data), of(Function::Blake3, &data));
    // Same length of hash: only the named function tells them apart.
    assert_eq!(sha.hash.len(), blake.hash.len());

    let name = format!("uploads/u1/blobs/blake3/{}/{}", blake.hash, blake.size_bytes);
    assert_eq!(c.write(&name, &data, 64 << 10).await.unwrap(), data.len() as i64);
    assert_eq!(find_missing(&mut c, Wire::Blake3, vec![blake.clone()]).await, vec![]);
    assert_eq!(find_missing(&mut c, Wire::Sha256, vec![sha.clone()]).await, vec![sha.clone()]);
    // A BLAKE3 hash read as SHA-256 (no function segment) is another blob.
    let as_sha256 = format!("blobs/{}/{}", blake.hash, blake.size_bytes);
    assert_code(c.read(&as_sha256, 0, 0).await, Code::NotFound);
    let read = c.read(&format!("blobs/blake3/{}/{}", blake.hash, blake.size_bytes), 0, 0).await.unwrap();
    assert!(read == data);

    // Store it under SHA-256 too; both read back, and a BLAKE3 digest sent as
    // SHA-256 data is a mismatch.
    assert_eq!(batch_update(&mut c, Wire::Sha256, &[(sha.clone(), &data)]).await, vec![0]);
    assert_eq!(batch_read(&mut c, Wire::Sha256, vec![sha.clone()]).await[0], (0, Bytes::from(data.clone())));
    assert_eq!(
        batch_read(&mut c, Wire::Blake3, vec![blake.clone()]).await[0],
        (0, Bytes::from(data.clone()))
    );
    let wrong = of(Function::Blake3, b"other bytes");
    assert_eq!(
        batch_update(&mut c, Wire::Blake3, &[(wrong, b"different bytes")]).await,
        vec![Code::InvalidArgument as i32]
    );
}

#[tokio::test]
async fn every_function_stores_and_serves_blobs() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    let data = random_bytes(5000, 7);
    let cases = [
        (Function::Sha256, Wire::Sha256),
        (Function::Sha1, Wire::Sha1),
        (Function::Sha384, Wire::Sha384),
        (Function::Sha512, Wire::Sha512),
        (Function::Blake3, Wire::Blake3),
    ];
    for (f, wire) in cases {
        let d = of(f, &data);
        assert_eq!(d.hash.len(), f.hash_len() * 2);
        assert_eq!(find_missing(&mut c, wire, vec![d.clone()]).await, vec![d.clone()], "{f:?}");
        assert_eq!(batch_update(&mut c, wire, &[(d.clone(), &data)]).await, vec![0], "{f:?}");
        assert_eq!(batch_read(&mut c, wire, vec![d.clone()]).await, vec![(0, Bytes::from(data.clone()))]);
        // ByteStream names the function in the resource name.
        let read = c.read(&format!("blobs/{}/{}/{}", f.name(), d.hash, d.size_bytes), 0, 0).await.unwrap();
        assert!(read == data, "{f:?}");
        // The empty blob exists under every function.
        let empty = of(f, b"");
        assert_eq!(find_missing(&mut c, wire, vec![empty.clone()]).await, vec![], "{f:?}");
        assert_eq!(batch_read(&mut c, wire, vec![empty.clone()]).await, vec![(0, Bytes::new())]);
        let read = c.read(&format!("blobs/{}/{}/0", f.name(), empty.hash), 0, 0).await.unwrap();
        assert!(read.is_empty());
    }
}

#[tokio::test]
async fn legacy_requests_infer_the_function_from_the_hash_length() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    let data = b"hashed by a client that predates REAPI 2.3".as_slice();
    for f in [Function::Sha1, Function::Sha384, Function::Sha512] {
        let d = of(f, data);
        assert_eq!(batch_update(&mut c, Wire::Unknown, &[(d.clone(), data)]).await, vec![0], "{f:?}");
        // It was stored under the inferred function, not under SHA-256.
        assert_eq!(find_missing(&mut c, f.to_wire(), vec![d.clone()]).await, vec![], "{f:?}");
        let read = c.read(&format!("blobs/{}/{}", d.hash, d.size_bytes), 0, 0).await.unwrap();
        assert_eq!(read, data, "{f:?} inferred in a resource name");
    }
    // No function has 62 hex digits.
    let odd = reapi::Digest { hash: "ab".repeat(31), size_bytes: 1 };
    let err = c
        .cas
        .find_missing_blobs(reapi::FindMissingBlobsRequest { blob_digests: vec![odd], ..Default::default() })
        .await;
    assert_code(err, Code::InvalidArgument);
}

#[tokio::test]
async fn unknown_unserved_and_mismatched_functions_are_invalid_arguments() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    let sha1 = of(Function::Sha1, b"x");
    for (function, digest, why) in [
        (Wire::Md5 as i32, of(Function::Sha256, b"x"), "md5"),
        (Wire::Murmur3 as i32, of(Function::Sha256, b"x"), "murmur3"),
        (77, of(Function::Sha256, b"x"), "77"),
        (Wire::Sha256 as i32, sha1.clone(), "64 hex digits"),
        (Wire::Blake3 as i32, sha1.clone(), "64 hex digits"),
    ] {
        let request = reapi::FindMissingBlobsRequest {
            blob_digests: vec![digest],
            digest_function: function,
            ..Default::default()
        };
        let status = assert_code(c.cas.find_missing_blobs(request).await, Code::InvalidArgument);
        assert!(status.message().contains(why), "{why}: {}", status.message());
    }
    let md5 = "d41d8cd98f00b204e9800998ecf8427e";
    let status = assert_code(c.read(&format!("blobs/md5/{md5}/0"), 0, 0).await, Code::InvalidArgument);
    assert!(status.message().contains("md5"), "{}", status.message());
    let get = reapi::GetActionResultRequest {
        action_digest: Some(of(Function::Sha256, b"a")),
        digest_function: Wire::Vso as i32,
        ..Default::default()
    };
    assert_code(c.ac.get_action_result(get).await, Code::InvalidArgument);
}

#[tokio::test]
async fn action_results_and_trees_under_blake3() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    let f = Function::Blake3;
    let output = b"object code".as_slice();
    let leaf = reapi::Directory {
        files: vec![reapi::FileNode { name: "o".into(), digest: Some(of(f, output)), ..Default::default() }],
        ..Default::default()
    };
    let root = reapi::Directory {
        directories: vec![reapi::DirectoryNode {
            name: "sub".into(),
            digest: Some(of(f, &leaf.encode_to_vec())),
        }],
        ..Default::default()
    };
    let (leaf_bytes, root_bytes) = (leaf.encode_to_vec(), root.encode_to_vec());
    let blobs =
        [(of(f, output), output), (of(f, &leaf_bytes), &leaf_bytes), (of(f, &root_bytes), &root_bytes)];
    assert_eq!(batch_update(&mut c, Wire::Blake3, &blobs).await, vec![0, 0, 0]);

    let tree = reapi::GetTreeRequest {
        root_digest: Some(of(f, &root_bytes)),
        digest_function: Wire::Blake3 as i32,
        ..Default::default()
    };
    let mut stream = c.cas.get_tree(tree).await.unwrap().into_inner();
    let mut dirs = Vec::new();
    while let Some(page) = stream.message().await.unwrap() {
        dirs.extend(page.directories);
    }
    assert_eq!(dirs, vec![root.clone(), leaf.clone()], "children are followed as BLAKE3 digests");

    let action = of(f, b"action");
    let result = reapi::ActionResult {
        output_files: vec![reapi::OutputFile {
            path: "o".into(),
            digest: Some(of(f, output)),
            ..Default::default()
        }],
        ..Default::default()
    };
    let update = reapi::UpdateActionResultRequest {
        action_digest: Some(action.clone()),
        action_result: Some(result.clone()),
        digest_function: Wire::Blake3 as i32,
        ..Default::default()
    };
    c.ac.update_action_result(update).await.unwrap();
    let get = |function: Wire| reapi::GetActionResultRequest {
        action_digest: Some(action.clone()),
        digest_function: function as i32,
        inline_output_files: vec!["o".into()],
        ..Default::default()
    };
    let hit = c.ac.get_action_result(get(Wire::Blake3)).await.unwrap().into_inner();
    assert_eq!(hit.output_files[0].contents, output, "outputs are looked up as BLAKE3 blobs");
    // The same hash as a SHA-256 action is another action.
    assert_code(c.ac.get_action_result(get(Wire::Sha256)).await, Code::NotFound);
}
