//! Capabilities, ContentAddressableStorage and ActionCache through a real
//! tonic client against `larder serve`.

mod common;

use bytes::Bytes;
use common::*;
use larder::proto::reapi::{self, digest_function};
use prost::Message;
use tonic::Code;

fn server() -> (tempfile::TempDir, TestServer) {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tmp.path().join("data"), &[]);
    (tmp, server)
}

#[tokio::test]
async fn capabilities_describe_a_cache_only_server() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    let caps = c.caps.get_capabilities(reapi::GetCapabilitiesRequest::default()).await.unwrap().into_inner();
    assert!(caps.execution_capabilities.is_none());
    let cache = caps.cache_capabilities.unwrap();
    assert!(cache.digest_functions.contains(&(digest_function::Value::Sha256 as i32)));
    assert!(cache.action_cache_update_capabilities.unwrap().update_enabled);
    assert_eq!(cache.max_batch_total_size_bytes, 4 << 20);
    let (low, high) = (caps.low_api_version.unwrap(), caps.high_api_version.unwrap());
    assert_eq!((low.major, low.minor), (2, 0));
    assert!(high.major == 2 && high.minor >= low.minor);
}

#[tokio::test]
async fn find_missing_reports_only_absent_blobs() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    let present = b"present blob".as_slice();
    assert_eq!(c.batch_update(&[present]).await, vec![0]);
    let absent = digest(b"never uploaded");
    let missing = c.find_missing(&[digest(present), absent.clone(), digest(b"")]).await;
    assert_eq!(missing, vec![absent], "the empty blob always exists");

    let bad = reapi::Digest { hash: "xyz".into(), size_bytes: 1 };
    let err = c
        .cas
        .find_missing_blobs(reapi::FindMissingBlobsRequest { blob_digests: vec![bad], ..Default::default() })
        .await;
    assert_code(err, Code::InvalidArgument);
    let err = c
        .cas
        .find_missing_blobs(reapi::FindMissingBlobsRequest {
            digest_function: digest_function::Value::Md5 as i32,
            ..Default::default()
        })
        .await;
    assert!(assert_code(err, Code::InvalidArgument).message().contains("md5"));
    let err = c
        .cas
        .find_missing_blobs(reapi::FindMissingBlobsRequest {
            instance_name: "team/blobs".into(),
            ..Default::default()
        })
        .await;
    assert_code(err, Code::InvalidArgument);
}

#[tokio::test]
async fn batch_update_and_read_have_per_blob_statuses() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    let big = text_bytes(3 << 20, 1); // several chunks, compressible
    let good: &[u8] = b"hello larder";
    let mut wrong_hash = reapi::batch_update_blobs_request::Request {
        digest: Some(digest(b"something else")),
        data: Bytes::from_static(b"something elsf"),
        compressor: 0,
    };
    let mut wrong_size = wrong_hash.clone();
    wrong_size.digest = Some(digest(b"12345"));
    wrong_size.data = Bytes::from_static(b"1234");
    wrong_hash.digest.as_mut().unwrap().size_bytes = 14;
    let ok = |data: &[u8]| reapi::batch_update_blobs_request::Request {
        digest: Some(digest(data)),
        data: Bytes::copy_from_slice(data),
        compressor: 0,
    };
    let requests = vec![ok(good), wrong_hash, ok(b""), wrong_size, ok(&big), ok(good)];
    let responses = c
        .cas
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest { requests, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .responses;
    let codes: Vec<i32> = responses.iter().map(|r| r.status.as_ref().unwrap().code).collect();
    let invalid = Code::InvalidArgument as i32;
    assert_eq!(codes, vec![0, invalid, 0, invalid, 0, 0]);
    assert_eq!(responses[0].digest, Some(digest(good)));
    assert_eq!(c.find_missing(&[digest(b"something elsf"), digest(b"1234")]).await.len(), 2);

    let wanted = vec![digest(good), digest(b"absent"), digest(b""), digest(&big)];
    let read = c
        .cas
        .batch_read_blobs(reapi::BatchReadBlobsRequest { digests: wanted.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .responses;
    let codes: Vec<i32> = read.iter().map(|r| r.status.as_ref().unwrap().code).collect();
    assert_eq!(codes, vec![0, Code::NotFound as i32, 0, 0]);
    assert_eq!(read[0].data, good);
    assert!(read[2].data.is_empty());
    assert_eq!(read[3].data, big);
    assert_eq!(read.iter().map(|r| r.digest.clone().unwrap()).collect::<Vec<_>>(), wanted);

    // Over the advertised batch limit: the whole call is refused.
    let huge = vec![0u8; (4 << 20) + 1];
    let err = c
        .cas
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            requests: vec![ok(&huge)],
            ..Default::default()
        })
        .await;
    assert_code(err, Code::InvalidArgument);
    let too_many = reapi::Digest { hash: digest(b"x").hash, size_bytes: 5 << 20 };
    let err = c
        .cas
        .batch_read_blobs(reapi::BatchReadBlobsRequest { digests: vec![too_many], ..Default::default() })
        .await;
    assert_code(err, Code::InvalidArgument);
}

fn directory(files: &[(&str, &[u8])], dirs: &[(&str, &reapi::Directory)]) -> reapi::Directory {
    reapi::Directory {
        files: files
            .iter()
            .map(|(name, data)| reapi::FileNode {
                name: name.to_string(),
                digest: Some(digest(data)),
                ..Default::default()
            })
            .collect(),
        directories: dirs
            .iter()
            .map(|(name, d)| reapi::DirectoryNode {
                name: name.to_string(),
                digest: Some(digest(&d.encode_to_vec())),
            })
            .collect(),
        ..Default::default()
    }
}

async fn get_tree(
    c: &mut Clients,
    root: &reapi::Directory,
    page_size: i32,
    token: &str,
) -> (Vec<reapi::Directory>, String) {
    let mut stream = c
        .cas
        .get_tree(reapi::GetTreeRequest {
            root_digest: Some(digest(&root.encode_to_vec())),
            page_size,
            page_token: token.to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (mut dirs, mut token) = (Vec::new(), String::new());
    while let Some(page) = stream.message().await.unwrap() {
        dirs.extend(page.directories);
        token = page.next_page_token;
    }
    (dirs, token)
}

#[tokio::test]
async fn get_tree_walks_breadth_first_in_pages() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    let leaf = directory(&[("f", b"file")], &[]);
    let a = directory(&[], &[("leaf", &leaf)]);
    let b = directory(&[("g", b"g")], &[("leaf", &leaf)]);
    let root = directory(&[], &[("a", &a), ("b", &b)]);
    let blobs: Vec<Vec<u8>> = [&root, &a, &b, &leaf].iter().map(|d| d.encode_to_vec()).collect();
    let refs: Vec<&[u8]> = blobs.iter().map(Vec::as_slice).collect();
    assert_eq!(c.batch_update(&refs).await, vec![0; 4]);

    let (all, token) = get_tree(&mut c, &root, 0, "").await;
    assert_eq!(all, vec![root.clone(), a.clone(), b.clone(), leaf.clone()], "breadth-first, each once");
    assert_eq!(token, "");

    let (first, token) = get_tree(&mut c, &root, 2, "").await;
    assert_eq!(first, vec![root.clone(), a.clone()]);
    assert!(!token.is_empty());
    let (second, token) = get_tree(&mut c, &root, 2, &token).await;
    assert_eq!(second, vec![b.clone(), leaf.clone()]);
    assert_eq!(token, "");

    // A missing subtree is left out; a missing root is NOT_FOUND.
    let absent = directory(&[("x", b"x")], &[]);
    let partial = directory(&[], &[("gone", &absent), ("a", &a)]);
    assert_eq!(c.batch_update(&[&partial.encode_to_vec()]).await, vec![0]);
    let (dirs, _) = get_tree(&mut c, &partial, 0, "").await;
    assert_eq!(dirs, vec![partial, a, leaf]);
    let err = c
        .cas
        .get_tree(reapi::GetTreeRequest {
            root_digest: Some(digest(&absent.encode_to_vec())),
            ..Default::default()
        })
        .await;
    assert_code(err, Code::NotFound);
    let err = c
        .cas
        .get_tree(reapi::GetTreeRequest {
            root_digest: Some(digest(&root.encode_to_vec())),
            page_token: "bogus".into(),
            ..Default::default()
        })
        .await;
    assert_code(err, Code::InvalidArgument);
}

fn get_request(instance: &str, action: &reapi::Digest) -> reapi::GetActionResultRequest {
    reapi::GetActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(action.clone()),
        ..Default::default()
    }
}

async fn update(c: &mut Clients, instance: &str, action: &reapi::Digest, result: reapi::ActionResult) {
    c.ac.update_action_result(reapi::UpdateActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(action.clone()),
        action_result: Some(result),
        ..Default::default()
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn action_cache_is_per_instance_and_checks_completeness() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    let action = digest(b"action 1");
    let output: &[u8] = b"compiled output";
    let stdout: &[u8] = b"warning: unused variable";
    let result = reapi::ActionResult {
        output_files: vec![reapi::OutputFile {
            path: "out/a.o".into(),
            digest: Some(digest(output)),
            is_executable: true,
            ..Default::default()
        }],
        exit_code: 0,
        stdout_digest: Some(digest(stdout)),
        ..Default::default()
    };
    update(&mut c, "team", &action, result.clone()).await;
    // Outputs not uploaded yet: a hit would break builds without the bytes,
    // so the entry answers NOT_FOUND and is removed.
    assert_code(c.ac.get_action_result(get_request("team", &action)).await, Code::NotFound);
    assert_eq!(c.batch_update(&[output, stdout]).await, vec![0, 0]);
    assert_code(c.ac.get_action_result(get_request("team", &action)).await, Code::NotFound);
    update(&mut c, "team", &action, result.clone()).await;
    let hit = c.ac.get_action_result(get_request("team", &action)).await.unwrap().into_inner();
    assert_eq!(hit, result);
    // Namespaced by instance.
    assert_code(c.ac.get_action_result(get_request("other", &action)).await, Code::NotFound);
    assert_code(c.ac.get_action_result(get_request("", &action)).await, Code::NotFound);

    // Inlining on request.
    let mut request = get_request("team", &action);
    request.inline_stdout = true;
    request.inline_output_files = vec!["out/a.o".into()];
    let inlined = c.ac.get_action_result(request).await.unwrap().into_inner();
    assert_eq!(inlined.stdout_raw, stdout);
    assert_eq!(inlined.output_files[0].contents, output);

    // An all-default result is a hit, not an absence.
    let empty_action = digest(b"action 2");
    update(&mut c, "", &empty_action, reapi::ActionResult::default()).await;
    let hit = c.ac.get_action_result(get_request("", &empty_action)).await.unwrap().into_inner();
    assert_eq!(hit, reapi::ActionResult::default());

    // Malformed requests.
    let err = c.ac.get_action_result(reapi::GetActionResultRequest::default()).await;
    assert_code(err, Code::InvalidArgument);
    let err =
        c.ac.update_action_result(reapi::UpdateActionResultRequest {
            action_digest: Some(action.clone()),
            ..Default::default()
        })
        .await;
    assert_code(err, Code::InvalidArgument);
}

#[tokio::test]
async fn action_results_need_every_file_of_their_output_trees() {
    let (_tmp, server) = server();
    let mut c = server.clients().await;
    let inner_file: &[u8] = b"generated header";
    let sub = directory(&[("gen.h", inner_file)], &[]);
    let tree = reapi::Tree { root: Some(directory(&[], &[("sub", &sub)])), children: vec![sub.clone()] };
    let tree_bytes = tree.encode_to_vec();
    let action = digest(b"action with tree");
    let result = reapi::ActionResult {
        output_directories: vec![reapi::OutputDirectory {
            path: "gen".into(),
            tree_digest: Some(digest(&tree_bytes)),
            ..Default::default()
        }],
        ..Default::default()
    };
    update(&mut c, "", &action, result.clone()).await;
    assert_eq!(c.batch_update(&[&tree_bytes]).await, vec![0]);
    let miss = assert_code(c.ac.get_action_result(get_request("", &action)).await, Code::NotFound);
    assert!(miss.message().contains(&digest(inner_file).hash), "{}", miss.message());
    assert_eq!(c.batch_update(&[inner_file]).await, vec![0]);
    update(&mut c, "", &action, result).await;
    c.ac.get_action_result(get_request("", &action)).await.unwrap();
}
