//! The object store tier, against a real S3 server: a single-node Ceph
//! cluster with the RADOS Gateway, started for these tests by
//! tests/s3/ceph-rgw-local.sh. Without Ceph's packages the tests say so and
//! pass, unless REQUIRE_S3_TESTS=1 (as in CI) makes that a failure.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{Clients, TestServer, digest, random_bytes, read_name, text_bytes, upload_name};
use larder::crc::{crc32c, crc32c_append};
use larder::proto::bytestream::ReadRequest;
use larder::proto::reapi;
use tonic::Code;

/// A running RADOS Gateway, stopped when dropped.
struct Rgw {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    endpoint: String,
    bucket: String,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/s3/ceph-rgw-local.sh")
}

impl Rgw {
    fn start() -> Option<Rgw> {
        let installed =
            Command::new("sh").args(["-c", "command -v radosgw"]).output().unwrap().status.success();
        if !installed {
            assert!(
                std::env::var_os("REQUIRE_S3_TESTS").is_none(),
                "Ceph is not installed: apt-get install ceph-mon ceph-osd ceph-mgr radosgw"
            );
            eprintln!(
                "skipped: Ceph's RADOS Gateway is not installed (apt-get install ceph-mon ceph-osd ceph-mgr radosgw)"
            );
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let bucket = "larder-test".to_string();
        let out = Command::new("bash")
            .arg(script())
            .args(["start"])
            .arg(dir.path().join("ceph"))
            .arg(&bucket)
            .env("CEPH_RGW_NO_MGR", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "the gateway did not start: {}", String::from_utf8_lossy(&out.stderr));
        let env: Vec<(String, String)> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let endpoint = env.iter().find(|(k, _)| k == "AWS_ENDPOINT_URL").unwrap().1.clone();
        Some(Rgw { dir, env, endpoint, bucket })
    }

    /// A larder node with this bucket as its second tier (each test its own prefix).
    fn node(&self, dir: &std::path::Path, prefix: &str) -> TestServer {
        self.node_with(dir, prefix, &[])
    }

    fn node_with(&self, dir: &std::path::Path, prefix: &str, extra: &[&str]) -> TestServer {
        let mut flags =
            vec!["--s3-endpoint", &self.endpoint, "--s3-bucket", &self.bucket, "--s3-prefix", prefix];
        flags.extend_from_slice(extra);
        TestServer::start_with_env(dir, &flags, &self.env)
    }
}

impl Rgw {
    /// An S3 client of the bucket, to change objects behind larder's back.
    fn client(&self) -> object_store::aws::AmazonS3 {
        let key = |k: &str| self.env.iter().find(|(n, _)| n == k).unwrap().1.clone();
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_bucket_name(&self.bucket)
            .with_region("us-east-1")
            .with_access_key_id(key("AWS_ACCESS_KEY_ID"))
            .with_secret_access_key(key("AWS_SECRET_ACCESS_KEY"))
            .with_allow_http(true)
            .build()
            .unwrap()
    }

    /// The object of a SHA-256 blob.
    fn path(&self, prefix: &str, data: &[u8]) -> object_store::path::Path {
        object_store::path::Path::from(format!("{prefix}/larder/v1/cas/sha256/{}", digest(data).hash))
    }
}

impl Drop for Rgw {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(script()).arg("stop").arg(self.dir.path().join("ceph")).output();
    }
}

static PREFIX: AtomicUsize = AtomicUsize::new(0);

fn prefix() -> String {
    format!("t{}-{}", std::process::id(), PREFIX.fetch_add(1, Ordering::Relaxed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_written_through_one_node_reads_back_through_another() {
    let Some(rgw) = Rgw::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let prefix = prefix();
    let a = rgw.node(&tmp.path().join("a"), &prefix);
    let b = rgw.node(&tmp.path().join("b"), &prefix);
    let (mut ca, mut cb) = (Clients::connect(&a.addr).await, Clients::connect(&b.addr).await);

    // Small blobs in a batch; a large one streamed, past the multipart size.
    let small = text_bytes(50_000, 1);
    let tiny = b"tiny".to_vec();
    assert_eq!(ca.batch_update(&[&small, &tiny]).await, vec![0, 0]);
    let large = random_bytes((12 << 20) + 12_345, 2);
    let written =
        ca.write(&upload_name("", "0b4b6c2e-2a29-4f4e-9d1c-2f9a3a1b5c7d", &large), &large, 1 << 20).await;
    assert_eq!(written.unwrap(), large.len() as i64);

    // Node B's local tier is empty: it finds them in the object store...
    packs_listed().await;
    let absent = digest(b"never written");
    let missing = cb.find_missing(&[digest(&small), digest(&tiny), digest(&large), absent.clone()]).await;
    assert_eq!(missing, vec![absent]);
    // ...and reads them through, byte for byte, two readers of one blob at once.
    let mut other = Clients::connect(&b.addr).await;
    let name = read_name("", &large);
    let (first, second) = tokio::join!(cb.read(&name, 0, 0), other.read(&name, 0, 0));
    assert_eq!((first.unwrap(), second.unwrap()), (large.clone(), large.clone()));
    let read = cb
        .cas
        .batch_read_blobs(reapi::BatchReadBlobsRequest {
            digests: vec![digest(&small), digest(&tiny)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.responses[0].data, small);
    assert_eq!(read.responses[1].data, tiny);
    // Now they are in B's local tier too: a read at an offset is served there.
    assert_eq!(
        cb.read(&read_name("", &large), 5 << 20, 1000).await.unwrap(),
        &large[5 << 20..(5 << 20) + 1000]
    );
    // Each tier's hits are counted, on /metrics and on the status page.
    let metric = |text: &str, name: &str| -> u64 {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let metrics = reqwest::get(format!("http://{}/metrics", b.addr)).await.unwrap().text().await.unwrap();
    // Small, tiny and the large blob came from the object store. The
    // second reader of the large blob counts there too if it waited for
    // the first's copy, else locally (it came after the copy).
    let from_object_store = metric(&metrics, "larder_object_store_hits_total");
    assert!((3..=4).contains(&from_object_store), "{metrics}");
    assert!(metric(&metrics, "larder_local_tier_hits_total") > 4 - from_object_store, "{metrics}");
    let metrics = reqwest::get(format!("http://{}/metrics", a.addr)).await.unwrap().text().await.unwrap();
    assert_eq!(metric(&metrics, "larder_object_store_written_blobs_total"), 3, "{metrics}");
    let status = status(&b).await;
    assert_eq!(status["objectStore"]["objectStoreHits"], from_object_store);

    // An action result stored through A is a hit on B, with its outputs.
    let action = digest(b"an action");
    let result = reapi::ActionResult {
        output_files: vec![reapi::OutputFile {
            path: "out/large".into(),
            digest: Some(digest(&large)),
            ..Default::default()
        }],
        stdout_digest: Some(digest(&small)),
        ..Default::default()
    };
    ca.put_action_result(&action, result.clone()).await;
    let c = tempfile::tempdir().unwrap();
    let node_c = rgw.node(c.path(), &prefix);
    let mut cc = Clients::connect(&node_c.addr).await;
    let hit = hit(&mut cc, &action).await;
    assert_eq!(hit.output_files, result.output_files);
    // Bazel's HTTP cache names blobs by hash alone: read through as well.
    let d = tempfile::tempdir().unwrap();
    let node_d = rgw.node(d.path(), &prefix);
    let url = format!("http://{}/cas/{}", node_d.addr, digest(&small).hash);
    let got = reqwest::get(&url).await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap(), small);
    let absent = format!("http://{}/cas/{}", node_d.addr, digest(b"nowhere").hash);
    assert_eq!(reqwest::get(&absent).await.unwrap().status(), 404);
    // The hit brought its outputs into C's local tier.
    assert_eq!(cc.read(&read_name("", &large), 0, 0).await.unwrap(), large);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_object_is_treated_as_missing() {
    use object_store::ObjectStoreExt;
    let Some(rgw) = Rgw::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let prefix = prefix();
    let a = rgw.node(&tmp.path().join("a"), &prefix);
    let mut ca = Clients::connect(&a.addr).await;
    let (cut, flipped) = (random_bytes(300_000, 3), text_bytes(300_000, 4));
    assert_eq!(ca.batch_update(&[&cut, &flipped]).await, vec![0, 0]);

    // Truncate one object and flip a byte of the other, behind larder's back.
    let (s3, path) = (rgw.client(), |data: &[u8]| rgw.path(&prefix, data));
    let whole = s3.get(&path(&cut)).await.unwrap().bytes().await.unwrap();
    s3.put(&path(&cut), whole.slice(..whole.len() / 2).into()).await.unwrap();
    let mut bytes = s3.get(&path(&flipped)).await.unwrap().bytes().await.unwrap().to_vec();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    s3.put(&path(&flipped), bytes.into()).await.unwrap();

    // A node with an empty local tier finds neither usable.
    let b = rgw.node(&tmp.path().join("b"), &prefix);
    let mut cb = Clients::connect(&b.addr).await;
    for data in [&cut, &flipped] {
        let status = cb.read(&read_name("", data), 0, 0).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    // The damaged objects were deleted: clients are asked for the blobs again.
    assert_eq!(cb.find_missing(&[digest(&cut), digest(&flipped)]).await.len(), 2);
    // Node A still serves both from its local tier.
    assert_eq!(ca.read(&read_name("", &cut), 0, 0).await.unwrap(), cut);
}

/// A zstd frame of `data` whose header declares `declared` bytes of content.
fn frame_declaring(data: &[u8], declared: u64) -> Vec<u8> {
    let mut frame = zstd::bulk::compress(data, 1).unwrap();
    let descriptor = frame[4];
    let fcs = match descriptor >> 6 {
        0 => usize::from(descriptor & 0x20 != 0),
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let window = usize::from(descriptor & 0x20 == 0);
    let body = frame.split_off(5 + window + fcs);
    frame.truncate(5 + window);
    frame[4] = (descriptor & 0x3f) | 0xc0;
    frame.extend_from_slice(&declared.to_le_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// A blob object as larder writes it, of one zstd chunk (sealed with a good
/// CRC-32C and tag) that declares far more than any chunk holds.
fn hostile_blob_object(size: u64, frame: &[u8]) -> Vec<u8> {
    const ZSTD_SUMMED: u8 = 0x5a;
    let mut value = frame.to_vec();
    let crc = crc32c_append(crc32c(&value), &[ZSTD_SUMMED]);
    value.extend_from_slice(&crc.to_le_bytes());
    value.push(ZSTD_SUMMED);
    let mut object = b"LARDER1\n".to_vec();
    object.extend_from_slice(&size.to_le_bytes());
    object.extend_from_slice(&(value.len() as u32).to_le_bytes());
    object.extend_from_slice(&value);
    object
}

/// Case 1 of the hardening issue: objects crafted to make a reader allocate
/// what they declare. Each is answered NOT_FOUND, deleted, and the node lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_objects_are_missing_and_deleted_and_crash_nothing() {
    use object_store::ObjectStoreExt;
    let Some(rgw) = Rgw::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let prefix = prefix();
    let s3 = rgw.client();
    // A blob whose only chunk declares 2^62 bytes: the frame a node would
    // have allocated for whole before any check.
    let data = text_bytes(5000, 21);
    let bomb = hostile_blob_object(data.len() as u64, &frame_declaring(&data, 1 << 62));
    s3.put(&rgw.path(&prefix, &data), bomb.into()).await.unwrap();
    // A blob whose chunk is honest but holds more than the object declares.
    let short = text_bytes(3000, 22);
    let frame = zstd::bulk::compress(&text_bytes(9000, 23), 1).unwrap();
    s3.put(&rgw.path(&prefix, &short), hostile_blob_object(short.len() as u64, &frame).into()).await.unwrap();
    // Action results: garbage that passes no check, and bytes that pass the
    // checksum but do not decode.
    let ac_path = |action: &reapi::Digest| {
        object_store::path::Path::from(format!("{prefix}/larder/v1/ac/-/sha256/{}", action.hash))
    };
    let (garbage, undecodable) = (digest(b"action one"), digest(b"action two"));
    s3.put(&ac_path(&garbage), vec![7u8; 1000].into()).await.unwrap();
    let junk = [0xffu8; 64];
    let mut object = b"LARDERA\n".to_vec();
    object.extend_from_slice(&crc32c(&junk).to_le_bytes());
    object.extend_from_slice(&junk);
    s3.put(&ac_path(&undecodable), object.into()).await.unwrap();

    let mut node = rgw.node(&tmp.path().join("n"), &prefix);
    let mut client = Clients::connect(&node.addr).await;
    for blob in [&data, &short] {
        let status = client.read(&read_name("", blob), 0, 0).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        let batch = client
            .cas
            .batch_read_blobs(reapi::BatchReadBlobsRequest {
                digests: vec![digest(blob)],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(batch.responses[0].status.as_ref().unwrap().code, Code::NotFound as i32);
    }
    for action in [&garbage, &undecodable] {
        let request =
            reapi::GetActionResultRequest { action_digest: Some(action.clone()), ..Default::default() };
        let status = client.ac.get_action_result(request).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    assert!(node.is_running(), "the node survived every object");
    // Every hostile object was deleted: the next node is not hurt by them.
    for path in
        [rgw.path(&prefix, &data), rgw.path(&prefix, &short), ac_path(&garbage), ac_path(&undecodable)]
    {
        let head = s3.head(&path).await;
        assert!(matches!(head, Err(object_store::Error::NotFound { .. })), "{path} is still there: {head:?}");
    }
    let peak = node.peak_rss_bytes();
    eprintln!(
        "hostile objects: every one NOT_FOUND and deleted, the node alive, peak RSS {} MiB",
        peak >> 20
    );
    assert!(peak < 300 << 20, "peak RSS {} MiB", peak >> 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_stream_through_at_any_offset_in_either_encoding() {
    use object_store::ObjectStoreExt;
    let Some(rgw) = Rgw::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let prefix = prefix();
    let a = rgw.node(&tmp.path().join("a"), &prefix);
    let mut ca = Clients::connect(&a.addr).await;
    // Five 1 MiB chunks and a bit.
    let text = text_bytes((5 << 20) + 777, 21);
    let random = random_bytes(3 << 20, 22);
    for (data, uuid) in
        [(&text, "0e1d2c3b-4a59-4867-9786-a5b4c3d2e1f0"), (&random, "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a")]
    {
        assert_eq!(ca.write(&upload_name("", uuid, data), data, 1 << 20).await.unwrap(), data.len() as i64);
    }

    // A part from the middle, on a node with an empty local tier...
    let b = rgw.node(&tmp.path().join("b"), &prefix);
    let mut cb = Clients::connect(&b.addr).await;
    let (offset, limit) = ((3 << 19) + 5, 2 << 20);
    let part = cb.read(&read_name("", &text), offset as i64, limit as i64).await.unwrap();
    assert_eq!(part, &text[offset..offset + limit]);
    // ...which kept the whole blob.
    assert_eq!(status(&b).await["blobs"], blobs_of(&text));
    assert_eq!(cb.read(&read_name("", &text), 0, 0).await.unwrap(), text);

    // An object larger than one ranged GET (16 MiB) reads whole.
    let large = random_bytes((20 << 20) + 3, 23);
    let name = upload_name("", "3c4d5e6f-7a8b-49c0-8d1e-2f3a4b5c6d7e", &large);
    assert_eq!(ca.write(&name, &large, 1 << 20).await.unwrap(), large.len() as i64);
    assert!(cb.read(&read_name("", &large), 0, 0).await.unwrap() == large);

    // A reader slower than the object store does not hold up the copy: it
    // is left behind, and goes on from the local tier.
    let d = rgw.node(&tmp.path().join("d"), &prefix);
    let mut cd = Clients::connect(&d.addr).await;
    let request = ReadRequest { resource_name: read_name("", &large), read_offset: 0, read_limit: 0 };
    let mut stream = cd.bs.read(request).await.unwrap().into_inner();
    let mut got = stream.message().await.unwrap().unwrap().data.to_vec();
    // The copy waits 5 s for the reader, then goes on without it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while status(&d).await["blobs"] != blobs_of(&large) {
        assert!(std::time::Instant::now() < deadline, "the copy waited for the reader");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    while let Some(message) = stream.message().await.unwrap() {
        got.extend_from_slice(&message.data);
    }
    assert!(got == large);

    // zstd on the wire, streamed through from a chunk in the middle.
    let c = rgw.node(&tmp.path().join("c"), &prefix);
    let mut cc = Clients::connect(&c.addr).await;
    let d = digest(&text);
    let zstd_name = format!("compressed-blobs/zstd/{}/{}", d.hash, d.size_bytes);
    let compressed = cc.read(&zstd_name, 1 << 20, 0).await.unwrap();
    assert!(compressed.len() < text.len() / 2, "{} bytes", compressed.len());
    assert_eq!(zstd::stream::decode_all(&compressed[..]).unwrap(), &text[1 << 20..]);

    // A chunk damaged near the end: the read fails, after some bytes at
    // most; the client never gets the whole blob.
    let s3 = rgw.client();
    let mut object = s3.get(&rgw.path(&prefix, &random)).await.unwrap().bytes().await.unwrap().to_vec();
    let near_end = object.len() - 100;
    object[near_end] ^= 0x01;
    s3.put(&rgw.path(&prefix, &random), object.into()).await.unwrap();
    let status = cc.read(&read_name("", &random), 0, 0).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(cc.find_missing(&[digest(&random)]).await.len(), 1, "deleted, to be written again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trees_and_output_directories_read_through_a_level_at_a_time() {
    use prost::Message;
    let Some(rgw) = Rgw::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let prefix = prefix();
    // Not packed: a hit brings in the blobs it depends on, and no others.
    let a = rgw.node_with(&tmp.path().join("a"), &prefix, &["--s3-pack-index-entries", "0"]);
    let mut ca = Clients::connect(&a.addr).await;
    let (f1, f3) = (text_bytes(10_000, 31), text_bytes(20_000, 33));
    let file = |name: &str, data: &[u8]| reapi::FileNode {
        name: name.into(),
        digest: Some(digest(data)),
        ..Default::default()
    };
    let child = reapi::Directory { files: vec![file("f3", &f3)], ..Default::default() }.encode_to_vec();
    let root = reapi::Directory {
        files: vec![file("f1", &f1)],
        directories: vec![reapi::DirectoryNode { name: "sub".into(), digest: Some(digest(&child)) }],
        ..Default::default()
    };
    let tree = reapi::Tree {
        root: Some(root.clone()),
        children: vec![reapi::Directory::decode(&child[..]).unwrap()],
    }
    .encode_to_vec();
    let root = root.encode_to_vec();
    assert_eq!(ca.batch_update(&[&f1, &f3, &child, &root, &tree]).await, vec![0; 5]);
    // One result names its output directory by Tree, the other by its root Directory.
    let by_tree =
        reapi::OutputDirectory { path: "out".into(), tree_digest: Some(digest(&tree)), ..Default::default() };
    let by_root = reapi::OutputDirectory {
        path: "out".into(),
        root_directory_digest: Some(digest(&root)),
        ..Default::default()
    };
    for (action, output) in [(b"by tree", by_tree), (b"by root", by_root)] {
        let result = reapi::ActionResult { output_directories: vec![output], ..Default::default() };
        ca.put_action_result(&digest(action), result).await;
    }

    // GetTree on a node with an empty local tier: the whole tree.
    let b = rgw.node(&tmp.path().join("b"), &prefix);
    let mut cb = Clients::connect(&b.addr).await;
    let request = reapi::GetTreeRequest { root_digest: Some(digest(&root)), ..Default::default() };
    let mut pages = cb.cas.get_tree(request).await.unwrap().into_inner();
    let mut listed = Vec::new();
    while let Some(page) = pages.message().await.unwrap() {
        listed.extend(page.directories.into_iter().map(|d| d.encode_to_vec()));
    }
    assert_eq!(listed, vec![root.clone(), child.clone()]);

    // Each result is a hit on a fresh node, which brings in every blob it
    // depends on: the Tree and the files it names; or the Directories and files.
    for (action, blobs) in [(b"by tree", 3), (b"by root", 4)] {
        let dir = tempfile::tempdir().unwrap();
        let node = rgw.node(dir.path(), &prefix);
        let mut client = Clients::connect(&node.addr).await;
        hit(&mut client, &digest(action)).await;
        let status = status(&node).await;
        assert_eq!(status["blobs"], blobs, "{}", String::from_utf8_lossy(action));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_and_refused_keys_are_named_as_such() {
    let Some(rgw) = Rgw::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = text_bytes(1000, 41);
    let flags = |bucket: &'static str| {
        ["--s3-endpoint".to_string(), rgw.endpoint.clone(), "--s3-bucket".into(), bucket.into()]
    };
    let mut wrong_key = rgw.env.clone();
    wrong_key.iter_mut().filter(|(k, _)| k == "AWS_SECRET_ACCESS_KEY").for_each(|(_, v)| v.push('x'));
    for (name, bucket, env, says) in [
        ("nobucket", "no-such-bucket", &rgw.env, "the bucket does not exist"),
        ("wrongkey", "larder-test", &wrong_key, "check the credentials"),
    ] {
        let flags = flags(bucket);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let node = TestServer::start_with_env(&tmp.path().join(name), &flags, env);
        let mut client = Clients::connect(&node.addr).await;
        let name = upload_name("", "4d5e6f70-8192-4a3b-8c4d-5e6f70819203", &data);
        let status = client.write(&name, &data, 1 << 20).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains(says), "{}", status.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_from_before_the_tier_reach_it() {
    let Some(rgw) = Rgw::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let prefix = prefix();
    let dir = tmp.path().join("a");
    let before = text_bytes(30_000, 51);
    let output = |exit_code| reapi::ActionResult {
        output_files: vec![reapi::OutputFile {
            path: "out".into(),
            digest: Some(digest(&before)),
            ..Default::default()
        }],
        exit_code,
        ..Default::default()
    };
    let (early, contested) = (digest(b"early action"), digest(b"contested action"));
    {
        let alone = TestServer::start(&dir, &[]);
        let mut c = Clients::connect(&alone.addr).await;
        assert_eq!(c.batch_update(&[&before]).await, vec![0]);
        c.put_action_result(&early, output(0)).await;
        c.put_action_result(&contested, output(1)).await;
        alone.stop();
    }
    // Another node writes a newer result for the contested action first.
    let b = rgw.node(&tmp.path().join("b"), &prefix);
    let mut cb = Clients::connect(&b.addr).await;
    cb.put_action_result(&contested, output(2)).await;
    // With the tier configured, the node copies what it held already: a
    // node with an empty local tier gets the early result, with its output.
    let a = rgw.node(&dir, &prefix);
    let c = rgw.node(&tmp.path().join("c"), &prefix);
    let mut cc = Clients::connect(&c.addr).await;
    let request = reapi::GetActionResultRequest { action_digest: Some(early), ..Default::default() };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    loop {
        match cc.ac.get_action_result(request.clone()).await {
            Ok(result) => break assert_eq!(result.into_inner().exit_code, 0),
            Err(status) if status.code() == Code::NotFound => {
                assert!(std::time::Instant::now() < deadline, "never copied: {status:?}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    assert_eq!(cc.read(&read_name("", &before), 0, 0).await.unwrap(), before);
    // Both results were queued in one write, so an empty queue means both
    // were handled: the contested one stays the newer.
    drained(&a).await;
    assert_eq!(hit(&mut cc, &contested).await.exit_code, 2);
}

impl Rgw {
    /// Stops the gateway alone (the cluster behind it keeps running) and
    /// returns its command line, for [`Rgw::restart`].
    fn stop_gateway(&self) -> Vec<String> {
        let pid_file = self.dir.path().join("ceph/run/client.rgw.ci.pid");
        let pid = std::fs::read_to_string(&pid_file).unwrap().trim().to_string();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let argv: Vec<String> = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into())
            .collect();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        argv
    }

    /// Starts the gateway again and waits until it answers HTTP (an open
    /// port alone is not enough), for as long as its start script would.
    fn restart(&self, argv: &[String]) {
        use std::io::{Read, Write};
        assert!(Command::new(&argv[0]).args(&argv[1..]).status().unwrap().success());
        let address = self.endpoint.trim_start_matches("http://").to_string();
        let answers = || -> std::io::Result<bool> {
            let mut socket = std::net::TcpStream::connect(&address)?;
            socket.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
            socket.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut head = [0u8; 5];
            socket.read_exact(&mut head)?;
            Ok(&head == b"HTTP/")
        };
        for _ in 0..1200 {
            if answers().unwrap_or(false) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("the gateway did not come back on {address} in 120 s");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_object_store_going_away_and_coming_back() {
    let Some(rgw) = Rgw::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let prefix = prefix();
    let a = rgw.node(&tmp.path().join("a"), &prefix);
    let mut ca = Clients::connect(&a.addr).await;
    let before = random_bytes(200_000, 5);
    assert_eq!(ca.batch_update(&[&before]).await, vec![0]);

    let gateway = rgw.stop_gateway();
    // Reads of what the local tier holds go on.
    assert_eq!(ca.read(&read_name("", &before), 0, 0).await.unwrap(), before);
    assert!(ca.find_missing(&[digest(&before)]).await.is_empty());
    // Write-through writes fail, saying why.
    let during = text_bytes(100_000, 6);
    let response = ca
        .cas
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            requests: vec![reapi::batch_update_blobs_request::Request {
                digest: Some(digest(&during)),
                data: during.clone().into(),
                compressor: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let status = response.responses[0].status.clone().unwrap();
    assert_eq!(status.code, Code::Unavailable as i32);
    assert!(status.message.contains("object store is unavailable"), "{}", status.message);
    let streamed = random_bytes(3 << 20, 7);
    let name = upload_name("", "5d1e6c1e-7b1a-4d6e-8f0a-3c2b1a0f9e8d", &streamed);
    assert_eq!(ca.write(&name, &streamed, 1 << 20).await.unwrap_err().code(), Code::Unavailable);

    // A write whose client gives up: stored locally, its copy queued.
    let abandoned = text_bytes(70_000, 8);
    assert_eq!(ca.batch_update(&[&abandoned]).await, vec![Code::Unavailable as i32]);

    rgw.restart(&gateway);
    // The retried writes now reach both tiers, and another node reads them.
    assert_eq!(ca.batch_update(&[&during]).await, vec![0]);
    let name = upload_name("", "7c0f3b7e-9a51-4b43-9d38-0e3f6d2b1c4a", &streamed);
    assert_eq!(ca.write(&name, &streamed, 1 << 20).await.unwrap(), streamed.len() as i64);
    let b = rgw.node(&tmp.path().join("b"), &prefix);
    let mut cb = Clients::connect(&b.addr).await;
    for data in [&before, &during, &streamed] {
        assert_eq!(&cb.read(&read_name("", data), 0, 0).await.unwrap(), data);
    }
    // The abandoned write reaches the object store by itself, from the queue.
    drained(&a).await;
    assert_eq!(cb.read(&read_name("", &abandoned), 0, 0).await.unwrap(), abandoned);
}

/// The node's status page, as JSON.
async fn status(node: &TestServer) -> serde_json::Value {
    reqwest::get(format!("http://{}/status.json", node.addr)).await.unwrap().json().await.unwrap()
}

/// The blobs a node keeps for `data`: itself, and if it is large enough to
/// be deduplicated (dedup_min_size, 4 MiB), the chunks it is a list of.
fn blobs_of(data: &[u8]) -> u64 {
    match data.len() < 4 << 20 {
        true => 1,
        false => 1 + larder::store::Store::chunking().split(data).len() as u64,
    }
}

/// What waits for the object store on the node.
async fn queued(node: &TestServer) -> u64 {
    status(node).await["objectStore"]["queued"].as_u64().unwrap()
}

/// The action result of `action`, which must be a hit.
async fn hit(client: &mut Clients, action: &reapi::Digest) -> reapi::ActionResult {
    let request = reapi::GetActionResultRequest { action_digest: Some(action.clone()), ..Default::default() };
    client.ac.get_action_result(request).await.unwrap().into_inner()
}

/// Waits until nothing waits for the object store.
async fn drained(node: &TestServer) {
    // Generous: the replicator may be backing off (up to 10 s) from an outage.
    for _ in 0..1800 {
        if queued(node).await == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the queue for the object store did not drain in 180 s: {} left", queued(node).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_back_acknowledges_through_an_outage_and_a_kill() {
    let Some(rgw) = Rgw::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let prefix = prefix();
    let dir = tmp.path().join("a");
    let write_back = ["--s3-write-back", "--s3-queue-size", "4MiB"];
    let a = rgw.node_with(&dir, &prefix, &write_back);
    let mut ca = Clients::connect(&a.addr).await;

    // With the object store down, writes are acknowledged once local.
    let gateway = rgw.stop_gateway();
    let small = text_bytes(100_000, 11);
    assert_eq!(ca.batch_update(&[&small]).await, vec![0]);
    let streamed = random_bytes(3 << 20, 12);
    let name = upload_name("", "1f0e2d3c-4b5a-4968-8776-655443322110", &streamed);
    assert_eq!(ca.write(&name, &streamed, 1 << 20).await.unwrap(), streamed.len() as i64);
    let action = digest(b"a write-back action");
    let result = reapi::ActionResult {
        output_files: vec![reapi::OutputFile {
            path: "out/streamed".into(),
            digest: Some(digest(&streamed)),
            ..Default::default()
        }],
        stdout_digest: Some(digest(&small)),
        ..Default::default()
    };
    ca.put_action_result(&action, result.clone()).await;
    assert_eq!(queued(&a).await, 3);
    // The queue is bounded: past its 4 MiB, writes are refused, saying why.
    let refused = random_bytes(1 << 20, 13);
    let name = upload_name("", "2a1b0c9d-8e7f-4a6b-9c5d-4e3f2a1b0c9d", &refused);
    let status = ca.write(&name, &refused, 1 << 20).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("waiting to be copied to the object store"), "{}", status.message());

    // kill -9, then the object store comes back, then the node: its queue
    // survived, and drains by itself.
    a.kill();
    rgw.restart(&gateway);
    let a = rgw.node_with(&dir, &prefix, &write_back);
    drained(&a).await;
    let metrics = reqwest::get(format!("http://{}/metrics", a.addr)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("larder_object_store_queued 0"), "{metrics}");

    // Another node, with an empty local tier, has it all: blobs and the hit.
    let b = rgw.node(&tmp.path().join("b"), &prefix);
    let mut cb = Clients::connect(&b.addr).await;
    let hit = hit(&mut cb, &action).await;
    assert_eq!(hit.output_files, result.output_files);
    assert_eq!(cb.read(&read_name("", &streamed), 0, 0).await.unwrap(), streamed);
    assert_eq!(cb.read(&read_name("", &small), 0, 0).await.unwrap(), small);
    // With room in its queue again, the node takes the refused write.
    let mut ca = Clients::connect(&a.addr).await;
    assert_eq!(ca.write(&name, &refused, 1 << 20).await.unwrap(), refused.len() as i64);

    // A blob lost from the bucket (and so missing to every other node) is
    // checked when a client writes it again, though A's local tier held it.
    drained(&a).await;
    let s3 = rgw.client();
    object_store::ObjectStoreExt::delete(&s3, &rgw.path(&prefix, &small)).await.unwrap();
    let c = rgw.node(&tmp.path().join("c"), &prefix);
    let mut cc = Clients::connect(&c.addr).await;
    assert_eq!(cc.find_missing(&[digest(&small)]).await.len(), 1);
    assert_eq!(ca.batch_update(&[&small]).await, vec![0]);
    drained(&a).await;
    assert!(cc.find_missing(&[digest(&small)]).await.is_empty(), "copied again");
    assert_eq!(cc.read(&read_name("", &small), 0, 0).await.unwrap(), small);
}

/// Bytes of the objects under `prefix`, and how many there are.
async fn bucket_bytes(rgw: &Rgw, prefix: &str) -> (u64, usize) {
    use futures::TryStreamExt;
    use object_store::ObjectStore;
    let s3 = rgw.client();
    let path = object_store::path::Path::from(format!("{prefix}/larder/v1/cas"));
    let objects: Vec<_> = s3.list(Some(&path)).try_collect().await.unwrap();
    (objects.iter().map(|o| o.size).sum(), objects.len())
}

/// Two versions of a large file, kept as lists of chunks: the object store
/// gets each chunk once and a list per version, another node reads both
/// back whole, and a list whose chunk is gone from the bucket is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_go_to_the_object_store_with_each_chunk_once() {
    use object_store::ObjectStoreExt;
    let Some(rgw) = Rgw::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let prefix = prefix();
    let a = rgw.node(&tmp.path().join("a"), &prefix);
    let mut ca = Clients::connect(&a.addr).await;
    let v1 = random_bytes(12 << 20, 31);
    let mut v2 = v1.clone();
    v2[5 << 20..(5 << 20) + 1000].copy_from_slice(&random_bytes(1000, 32));
    ca.write(&upload_name("", "5f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a", &v1), &v1, 1 << 20).await.unwrap();
    let (one, objects) = bucket_bytes(&rgw, &prefix).await;
    assert_eq!(objects as u64, blobs_of(&v1), "a list object and one per chunk");
    ca.write(&upload_name("", "6f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a", &v2), &v2, 1 << 20).await.unwrap();
    let (two, _) = bucket_bytes(&rgw, &prefix).await;
    assert!(one > 12 << 20 && two - one < 3 << 20, "the second version sent {} bytes", two - one);

    let b = rgw.node(&tmp.path().join("b"), &prefix);
    let mut cb = Clients::connect(&b.addr).await;
    assert!(cb.read(&read_name("", &v2), 0, 0).await.unwrap() == v2);
    let (offset, limit) = ((7 << 20) + 3, 1 << 20);
    let part = cb.read(&read_name("", &v1), offset as i64, limit as i64).await.unwrap();
    assert!(part == v1[offset..offset + limit]);

    // A chunk deleted behind larder's back: the list is missing, and goes.
    let c = rgw.node(&tmp.path().join("c"), &prefix);
    let mut cc = Clients::connect(&c.addr).await;
    let s3 = rgw.client();
    let chunks = larder::store::Store::chunking().split(&v1);
    let first = &v1[..chunks[0]];
    s3.delete(&rgw.path(&prefix, first)).await.unwrap();
    let missing = cc.read(&read_name("", &v1), 0, 0).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    assert!(s3.head(&rgw.path(&prefix, &v1)).await.is_err(), "the damaged list was deleted");
}

/// The Remote Asset API's records are action results: pushed through one
/// node, a second answers them, its content brought in from the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_asset_pushed_through_one_node_is_fetched_through_another() {
    use larder::proto::asset::fetch_client::FetchClient;
    use larder::proto::asset::push_client::PushClient;
    use larder::proto::asset::{FetchBlobRequest, PushBlobRequest};
    let Some(rgw) = Rgw::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let prefix = prefix();
    let a = rgw.node(&tmp.path().join("a"), &prefix);
    let b = rgw.node(&tmp.path().join("b"), &prefix);
    let content = random_bytes(200_000, 41);
    let mut ca = Clients::connect(&a.addr).await;
    assert_eq!(ca.batch_update(&[&content]).await, [0]);
    let channel =
        |addr: &str| tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    let uri = "https://example.com/releases/tool-1.2.tar.gz".to_string();
    let push = PushBlobRequest {
        uris: vec![uri.clone()],
        blob_digest: Some(digest(&content)),
        ..Default::default()
    };
    PushClient::new(channel(&a.addr)).push_blob(push).await.unwrap();
    packs_listed().await;
    let fetched = FetchClient::new(channel(&b.addr))
        .fetch_blob(FetchBlobRequest { uris: vec![uri], ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.status.map(|s| s.code), Some(0));
    assert_eq!(fetched.blob_digest, Some(digest(&content)));
    let mut cb = Clients::connect(&b.addr).await;
    assert_eq!(cb.read(&read_name("", &content), 0, 0).await.unwrap(), content);
}

/// A proxy in front of the gateway that counts requests by method, and may
/// hold requests of one method back: what the object store is asked, seen
/// from outside.
struct CountingProxy {
    addr: std::net::SocketAddr,
    counts: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    async fn start(upstream: &str, delayed: http::Method, delay: std::time::Duration) -> CountingProxy {
        use http_body_util::BodyExt;
        use std::sync::{Arc, Mutex};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts: Arc<Mutex<std::collections::HashMap<String, usize>>> = Arc::default();
        let (counted, upstream) = (Arc::clone(&counts), upstream.to_string());
        let client = reqwest::Client::builder().http1_only().no_proxy().build().unwrap();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (counts, upstream, client) = (Arc::clone(&counted), upstream.clone(), client.clone());
                let delayed = delayed.clone();
                connections.spawn(async move {
                    let service =
                        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                            let (counts, upstream, client, delayed) =
                                (Arc::clone(&counts), upstream.clone(), client.clone(), delayed.clone());
                            async move {
                                let method = request.method().clone();
                                // By method, and GETs of objects apart from listings.
                                let listing = request.uri().query().is_some_and(|q| q.contains("list-type"));
                                let kind = format!("{method} {}", if listing { "list" } else { "object" });
                                {
                                    let mut counts = counts.lock().unwrap();
                                    for key in [method.to_string(), kind] {
                                        *counts.entry(key).or_default() += 1;
                                    }
                                }
                                if method == delayed {
                                    tokio::time::sleep(delay).await;
                                }
                                let target = format!("{upstream}{}", request.uri().path_and_query().unwrap());
                                let mut forwarded = client.request(method.clone(), target);
                                for (name, value) in request.headers() {
                                    if !matches!(
                                        name.as_str(),
                                        "content-length" | "transfer-encoding" | "connection"
                                    ) {
                                        forwarded = forwarded.header(name, value);
                                    }
                                }
                                let body = request.into_body().collect().await.unwrap().to_bytes();
                                if body.is_empty()
                                    && method != http::Method::GET
                                    && method != http::Method::HEAD
                                {
                                    // As the client sent it: S3 wants a length on a PUT.
                                    forwarded = forwarded.header("content-length", "0");
                                }
                                let answer = forwarded.body(body).send().await.unwrap();
                                let mut response = hyper::Response::builder().status(answer.status());
                                for (name, value) in answer.headers() {
                                    if !matches!(name.as_str(), "transfer-encoding" | "connection") {
                                        response = response.header(name, value);
                                    }
                                }
                                let body = answer.bytes().await.unwrap();
                                Ok::<_, std::convert::Infallible>(
                                    response.body(http_body_util::Full::new(body)).unwrap(),
                                )
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        CountingProxy { addr, counts, task }
    }

    fn count(&self, method: &str) -> usize {
        self.counts.lock().unwrap().get(method).copied().unwrap_or(0)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// FindMissingBlobs remembers what the object store holds: asked again
/// about the same blobs, a node sends no HEAD; and it answers within
/// s3_lookup_timeout, however slow the object store's answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_missing_remembers_what_the_object_store_holds() {
    let Some(rgw) = Rgw::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let prefix = prefix();
    let proxy = CountingProxy::start(&rgw.endpoint, http::Method::HEAD, std::time::Duration::ZERO).await;
    let endpoint = format!("http://{}", proxy.addr);
    let node = |dir: &str, extra: &[&str]| {
        let mut flags = vec!["--s3-endpoint", &endpoint, "--s3-bucket", &rgw.bucket, "--s3-prefix", &prefix];
        flags.extend_from_slice(extra);
        TestServer::start_with_env(&tmp.path().join(dir), &flags, &rgw.env)
    };
    let a = node("a", &[]);
    let mut ca = Clients::connect(&a.addr).await;
    // Fifty small blobs in one batch go up as one pack; five streamed, as
    // an object each.
    let blobs: Vec<Vec<u8>> = (0..55).map(|i| text_bytes(1000 + i, 300 + i as u64)).collect();
    let refs: Vec<&[u8]> = blobs[..50].iter().map(Vec::as_slice).collect();
    assert_eq!(ca.batch_update(&refs).await, vec![0; 50]);
    for (i, blob) in blobs[50..].iter().enumerate() {
        let name = upload_name("", &format!("4b0c2d9e-1f3a-4c5b-8d7e-6f5a4b3c2d1{i}"), blob);
        assert_eq!(ca.write(&name, blob, 1 << 20).await.unwrap(), blob.len() as i64);
    }
    let digests: Vec<reapi::Digest> = blobs.iter().map(|b| digest(b)).collect();

    // Node B's local tier is empty: the first call asks about the pack
    // once, and about each object...
    let b = node("b", &[]);
    let mut cb = Clients::connect(&b.addr).await;
    let before = proxy.count("HEAD");
    assert!(cb.find_missing(&digests).await.is_empty());
    let first = proxy.count("HEAD") - before;
    assert_eq!(first, 1 + 5, "one HEAD per pack and per object the first time");
    // ...the second asks about none of them.
    assert!(cb.find_missing(&digests).await.is_empty());
    assert_eq!(proxy.count("HEAD") - before, first, "no HEAD the second time");
    // Absence is not remembered: another node may write the blob any time.
    let absent = digest(b"never written anywhere");
    for _ in 0..2 {
        let missing = cb.find_missing(std::slice::from_ref(&absent)).await;
        assert_eq!(missing, std::slice::from_ref(&absent));
    }
    assert_eq!(proxy.count("HEAD") - before, first + 2);
    let metrics = reqwest::get(format!("http://{}/metrics", b.addr)).await.unwrap().text().await.unwrap();
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(value("larder_object_store_requests_total{kind=\"head\"}"), 6 + 2, "{metrics}");
    assert_eq!(value("larder_object_store_remembered_total"), 55, "{metrics}");
    drop((a, b));

    // An object store slow to answer: the call ends at the lookup timeout,
    // what was not answered counted missing.
    let slow =
        CountingProxy::start(&rgw.endpoint, http::Method::HEAD, std::time::Duration::from_secs(30)).await;
    let slow_endpoint = format!("http://{}", slow.addr);
    let flags = [
        "--s3-endpoint",
        &slow_endpoint,
        "--s3-bucket",
        &rgw.bucket,
        "--s3-prefix",
        &prefix,
        "--s3-lookup-timeout",
        "1s",
    ];
    let c = TestServer::start_with_env(&tmp.path().join("c"), &flags, &rgw.env);
    let mut cc = Clients::connect(&c.addr).await;
    let started = std::time::Instant::now();
    assert_eq!(cc.find_missing(&digests[..5]).await.len(), 5, "not answered in time: missing");
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(10), "answered after {took:?}");
}

/// Small blobs written in one batch go up as one pack: another node finds
/// them with one HEAD of the pack, and a read of one brings in the pack;
/// damaged packs are skipped or deleted, never served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_blobs_written_together_go_up_as_a_pack_and_come_back_together() {
    use futures::StreamExt;
    use larder::objstore::pack;
    use object_store::{ObjectStore, ObjectStoreExt};
    let Some(rgw) = Rgw::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let prefix = prefix();
    let proxy = CountingProxy::start(&rgw.endpoint, http::Method::HEAD, std::time::Duration::ZERO).await;
    let endpoint = format!("http://{}", proxy.addr);
    let flags = ["--s3-endpoint", &endpoint, "--s3-bucket", &rgw.bucket, "--s3-prefix", &prefix];
    let a = TestServer::start_with_env(&tmp.path().join("a"), &flags, &rgw.env);
    let mut ca = Clients::connect(&a.addr).await;
    // Two batches of 100 blobs of 2-8 KiB: about 500 KB each, a pack each.
    let batches: Vec<Vec<Vec<u8>>> = (0..2u64)
        .map(|b| {
            (0..100u64).map(|i| random_bytes(2048 + (i as usize * 61) % 6144, 500 + b * 1000 + i)).collect()
        })
        .collect();
    let puts = proxy.count("PUT");
    for batch in &batches {
        let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
        assert_eq!(ca.batch_update(&refs).await, vec![0; 100]);
    }
    assert_eq!(proxy.count("PUT") - puts, 2, "a PUT per batch");
    let s3 = rgw.client();
    let listed: Vec<String> = s3
        .list(Some(&object_store::path::Path::from(format!("{prefix}/larder/v1"))))
        .map(|m| m.unwrap().location.to_string())
        .collect()
        .await;
    let packs: Vec<&String> = listed.iter().filter(|k| k.contains("/larder/v1/pack/")).collect();
    assert_eq!((packs.len(), listed.len()), (2, 2), "{listed:?}");

    // A new node finds them all with one HEAD per pack, and says what is absent.
    let b = TestServer::start_with_env(&tmp.path().join("b"), &flags, &rgw.env);
    let mut cb = Clients::connect(&b.addr).await;
    let all: Vec<reapi::Digest> = batches.iter().flatten().map(|d| digest(d)).collect();
    let absent = digest(b"in no pack");
    let mut asked = all.clone();
    asked.push(absent.clone());
    let (heads, gets) = (proxy.count("HEAD"), proxy.count("GET object"));
    assert_eq!(cb.find_missing(&asked).await, vec![absent]);
    assert_eq!(proxy.count("HEAD") - heads, 2 + 1, "a HEAD per pack, and one for the absent blob");
    // A read of ten blobs of the first batch brings that whole pack in, in one GET.
    let read = cb
        .cas
        .batch_read_blobs(reapi::BatchReadBlobsRequest { digests: all[..10].to_vec(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    for (response, data) in read.responses.iter().zip(&batches[0]) {
        assert_eq!(&response.data, data);
    }
    assert_eq!(status(&b).await["blobs"], 100, "the first pack, whole");
    for batch in &batches {
        for data in batch.iter().step_by(7) {
            assert_eq!(&cb.read(&read_name("", data), 0, 0).await.unwrap(), data);
        }
    }
    assert_eq!(status(&b).await["blobs"], 200);
    // Two index reads when it listed them, and a read of each pack (S3's
    // listings, GETs too, aside).
    assert_eq!(proxy.count("GET object") - gets, 2 + 2, "GETs of objects");

    // Damaged packs: an index that fails its check is skipped; a record
    // whose bytes are not its blob's makes its pack deleted, and the blob
    // missing (to be written again).
    let pack_path = |name: String| object_store::path::Path::from(format!("{prefix}/larder/v1/{name}"));
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    s3.put(&pack_path(pack::name(now_ms, 1)), b"LARDERP\n\x10\0\0\0garbage".to_vec().into()).await.unwrap();
    let (claimed, held) = (text_bytes(3000, 61), text_bytes(3000, 62));
    let value = bytes::Bytes::from(larder::store::chunk::encode(&held, 1));
    let liar = larder::digest::Digest::of(&claimed);
    let other = text_bytes(1000, 63);
    let honest = bytes::Bytes::from(larder::store::chunk::encode(&other, 1));
    // A record whose one chunk declares 2^62 bytes: refused before it is decoded.
    let bombed = text_bytes(5000, 64);
    let bomb =
        bytes::Bytes::from(hostile_blob_object(5000, &frame_declaring(&bombed, 1 << 62))[20..].to_vec());
    let (parts, _) = pack::encode(&[
        (liar, vec![value]),
        (larder::digest::Digest::of(&bombed), vec![bomb]),
        (larder::digest::Digest::of(&other), vec![honest]),
    ]);
    let lying = pack_path(pack::name(now_ms, 2));
    s3.put(&lying, parts.concat().into()).await.unwrap();
    let c = TestServer::start_with_env(&tmp.path().join("c"), &flags, &rgw.env);
    let mut cc = Clients::connect(&c.addr).await;
    let status = cc.read(&read_name("", &claimed), 0, 0).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(s3.head(&lying).await.is_err(), "the lying pack is deleted");
    let status = cc.read(&read_name("", &bombed), 0, 0).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(cc.find_missing(&[digest(&claimed)]).await.len(), 1);
    // The garbage pack is skipped; the honest packs still serve.
    assert_eq!(&cc.read(&read_name("", &batches[1][3]), 0, 0).await.unwrap(), &batches[1][3]);
    // The lying pack's sound blob went up again before it went: a new node
    // reads it from there.
    let d = TestServer::start_with_env(&tmp.path().join("d"), &flags, &rgw.env);
    let mut cd = Clients::connect(&d.addr).await;
    assert_eq!(cd.read(&read_name("", &other), 0, 0).await.unwrap(), other);
    // A pack declaring a blob larger than this version packs is not read,
    // and is left alone (a later version may have written it).
    let large = larder::digest::Digest::new(larder::digest::Function::Sha256, &[7; 32], 300 << 10).unwrap();
    let (parts, _) = pack::encode(&[(large, vec![bytes::Bytes::from_static(b"unread")])]);
    let later = pack_path(pack::name(now_ms, 3));
    s3.put(&later, parts.concat().into()).await.unwrap();
    packs_listed().await;
    let request = reapi::BatchReadBlobsRequest {
        digests: vec![reapi::Digest { hash: hex::encode([7; 32]), size_bytes: 300 << 10 }],
        ..Default::default()
    };
    let read = cd.cas.batch_read_blobs(request).await.unwrap().into_inner();
    assert_eq!(read.responses[0].status.as_ref().map(|s| s.code), Some(Code::NotFound as i32));
    assert!(s3.head(&later).await.is_ok(), "a pack not read is left alone");
}

/// Blobs written in a batch through one node go up in a pack, which other
/// nodes learn by listing the bucket's new packs, at most once a second.
async fn packs_listed() {
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
}

/// Flags of a node that trims a bucket to 2 MiB, in test time: objects
/// unused for 2 s may go; a node silent for 6 s loses the lease.
const TRIM: [&str; 12] = [
    "--s3-max-size",
    "2MiB",
    "--s3-trim-interval",
    "300ms",
    "--s3-trim-min-age",
    "2s",
    "--s3-existence-ttl",
    "1s",
    "--s3-touch-interval",
    "1s",
    "--s3-trim-lease",
    "6s",
];
const BUDGET: u64 = 2 << 20;

/// Bytes of all larder's objects in the bucket (markers and lease included).
async fn bucket_size(rgw: &Rgw, prefix: &str) -> u64 {
    use futures::TryStreamExt;
    use object_store::ObjectStore;
    let path = object_store::path::Path::from(format!("{prefix}/larder/v1"));
    let objects: Vec<_> = rgw.client().list(Some(&path)).try_collect().await.unwrap();
    objects.iter().map(|o| o.size).sum()
}

/// A metric of `node`, 0 if it has none yet.
async fn node_metric(node: &TestServer, name: &str) -> u64 {
    let metrics = reqwest::get(format!("http://{}/metrics", node.addr)).await.unwrap().text().await.unwrap();
    metrics
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// An action result naming `outputs` as files.
fn result_naming(outputs: &[Vec<u8>]) -> reapi::ActionResult {
    let output_files = outputs
        .iter()
        .enumerate()
        .map(|(i, o)| reapi::OutputFile {
            path: format!("out/{i}"),
            digest: Some(digest(o)),
            ..Default::default()
        })
        .collect();
    reapi::ActionResult { output_files, ..Default::default() }
}

/// Asks `client` for each action's result: a hit must have every output
/// readable, with the bytes written; the counts of hits and misses.
async fn hits_are_complete(
    client: &mut Clients,
    actions: &[(reapi::Digest, Vec<Vec<u8>>)],
) -> (usize, usize) {
    let (mut hits, mut misses) = (0, 0);
    for (action, outputs) in actions {
        let request =
            reapi::GetActionResultRequest { action_digest: Some(action.clone()), ..Default::default() };
        match client.ac.get_action_result(request).await {
            Ok(result) => {
                assert_eq!(result.into_inner().output_files.len(), outputs.len());
                for output in outputs {
                    let read = client.read(&read_name("", output), 0, 0).await;
                    assert_eq!(read.expect("a hit's output reads back"), *output, "action {}", action.hash);
                }
                hits += 1;
            }
            Err(status) if status.code() == Code::NotFound => misses += 1,
            Err(status) => panic!("GetActionResult of {}: {status}", action.hash),
        }
    }
    (hits, misses)
}

/// Two nodes on one bucket with a size budget far below what they write:
/// the bucket stays within 1.1 times the budget, a hot set read throughout
/// (a list of chunks among it) survives, one node alone trims, and every
/// action result either node or a new one serves has all its outputs (or
/// is a miss).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_keep_the_bucket_within_its_size_budget() {
    let Some(rgw) = Rgw::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let prefix = prefix();
    // 8 MiB, and blobs from 3 MiB kept as lists of chunks.
    const BUDGET: u64 = 8 << 20;
    let mut flags = TRIM.to_vec();
    flags[1] = "8MiB";
    flags.extend_from_slice(&["--dedup-min-size", "3MiB"]);
    let a = rgw.node_with(&tmp.path().join("a"), &prefix, &flags);
    let b = rgw.node_with(&tmp.path().join("b"), &prefix, &flags);
    let (mut ca, mut cb) = (Clients::connect(&a.addr).await, Clients::connect(&b.addr).await);
    let mut hot: Vec<Vec<u8>> = (0..8).map(|i| random_bytes(16 << 10, 7000 + i)).collect();
    let hot_refs: Vec<&[u8]> = hot.iter().map(Vec::as_slice).collect();
    assert_eq!(ca.batch_update(&hot_refs).await, vec![0; 8]);
    let list = random_bytes(3_500_000, 7100);
    let name = upload_name("", "5d1c3b2a-0f9e-4d8c-b7a6-958473625140", &list);
    assert_eq!(ca.write(&name, &list, 1 << 20).await.unwrap(), list.len() as i64);
    hot.push(list);
    packs_listed().await;

    let (mut actions, mut written, mut peak) = (Vec::new(), 0u64, 0u64);
    for round in 0..80u64 {
        let client = if round % 2 == 0 { &mut ca } else { &mut cb };
        let blobs: Vec<Vec<u8>> = (0..4).map(|i| random_bytes(64 << 10, round * 10 + i + 1)).collect();
        let refs: Vec<&[u8]> = blobs.iter().map(Vec::as_slice).collect();
        assert_eq!(client.batch_update(&refs).await, vec![0; 4]);
        written += 4 * (64 << 10);
        let action = digest(format!("action {round}").as_bytes());
        client.put_action_result(&action, result_naming(&blobs)).await;
        actions.push((action, blobs));
        // The hot set is read through B all along.
        for h in &hot {
            assert_eq!(&cb.read(&read_name("", h), 0, 0).await.unwrap(), h);
        }
        peak = peak.max(bucket_size(&rgw, &prefix).await);
        // About 0.5 MB/s in all. Trimming starts at 90 % of the budget,
        // and a pass (two listings and deletes) may take a second or two on
        // a busy machine: the bucket grows by a MB or so past 90 % before
        // it lands, within the tenth over the budget allowed. (At 150 ms a
        // round, faster with packs, a busy CI machine once saw 1.12 times.)
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    assert!(written > 2 * BUDGET, "the nodes wrote {written} bytes");
    assert!(peak <= BUDGET + BUDGET / 10, "the bucket held {peak} bytes, budget {BUDGET}");

    // One node trims; the other never did.
    let trims_a = node_metric(&a, "larder_object_store_trims_total").await;
    let trims_b = node_metric(&b, "larder_object_store_trims_total").await;
    assert!((trims_a > 0) != (trims_b > 0), "trims: A {trims_a}, B {trims_b}");
    let trimmer = if trims_a > 0 { &a } else { &b };
    assert!(node_metric(trimmer, "larder_object_store_trimmed_bytes_total").await >= written - 2 * BUDGET);
    assert!(node_metric(trimmer, "larder_object_store_bytes").await > 0);

    // Every result served is complete, through B and through a new node;
    // the hot set survived in the bucket, the list's chunks too.
    let (hits, misses) = hits_are_complete(&mut cb, &actions).await;
    assert!(hits > 0 && misses > 0, "through B: {hits} hits, {misses} misses");
    let c = rgw.node_with(&tmp.path().join("c"), &prefix, &flags);
    let mut cc = Clients::connect(&c.addr).await;
    for h in &hot {
        assert_eq!(&cc.read(&read_name("", h), 0, 0).await.expect("a hot blob reads back"), h);
    }
    let (hits, misses) = hits_are_complete(&mut cc, &actions).await;
    assert!(hits > 0 && misses > 0, "through a new node: {hits} hits, {misses} misses");
}

/// A trimmer killed with SIGKILL mid-pass leaves the bucket consistent,
/// and another node takes the lease over and finishes the pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trimmer_killed_mid_pass_is_taken_over() {
    let Some(rgw) = Rgw::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let prefix = prefix();
    // Four thousand objects (not packed), four times the budget, through a
    // node that does not trim: four multi-object deletes to trim them.
    let w = rgw.node_with(&tmp.path().join("w"), &prefix, &["--s3-pack-index-entries", "0"]);
    let mut cw = Clients::connect(&w.addr).await;
    let mut actions = Vec::new();
    for round in 0..64u64 {
        let mut blobs: Vec<Vec<u8>> =
            (0..64).map(|i| random_bytes(2 << 10, 9000 + round * 100 + i)).collect();
        let refs: Vec<&[u8]> = blobs.iter().map(Vec::as_slice).collect();
        assert_eq!(cw.batch_update(&refs).await, vec![0; 64]);
        blobs.truncate(4);
        let action = digest(format!("killed trimmer {round}").as_bytes());
        cw.put_action_result(&action, result_naming(&blobs)).await;
        actions.push((action, blobs));
    }
    drop(w);
    let written = bucket_bytes(&rgw, &prefix).await.0;
    assert!(written > 3 * BUDGET, "{written} bytes written");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;

    // A trims through a proxy that holds each multi-object delete back.
    let proxy =
        CountingProxy::start(&rgw.endpoint, http::Method::POST, std::time::Duration::from_millis(1500)).await;
    let endpoint = format!("http://{}", proxy.addr);
    let trim = TRIM.to_vec();
    let mut flags = vec!["--s3-endpoint", &endpoint, "--s3-bucket", &rgw.bucket, "--s3-prefix", &prefix];
    flags.extend_from_slice(&trim);
    let mut env = rgw.env.clone();
    env.push(("RUST_LOG".into(), "info".into()));
    let a = TestServer::start_with_env(&tmp.path().join("a"), &flags, &env);
    // Killed once its first deletes are done (each is held 1.5 s).
    let started = std::time::Instant::now();
    while bucket_bytes(&rgw, &prefix).await.0 == written {
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "A never trimmed: {}", a.log());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let a_log = a.log();
    a.kill();
    let left = bucket_size(&rgw, &prefix).await;
    assert!(left > BUDGET, "A was killed mid-pass, yet the bucket holds {left} bytes");

    // Consistent: every result a new node serves is complete.
    let c = rgw.node(&tmp.path().join("c"), &prefix);
    let mut cc = Clients::connect(&c.addr).await;
    hits_are_complete(&mut cc, &actions).await;
    drop(c);

    // B measures only hourly: what it trims is A's pass, resumed.
    let mut flags = trim.clone();
    flags[3] = "1h";
    let mut env = rgw.env.clone();
    env.push(("RUST_LOG".into(), "info".into()));
    let mut all = vec!["--s3-endpoint", &rgw.endpoint, "--s3-bucket", &rgw.bucket, "--s3-prefix", &prefix];
    all.extend_from_slice(&flags);
    let b = TestServer::start_with_env(&tmp.path().join("b"), &all, &env);
    let started = std::time::Instant::now();
    while node_metric(&b, "larder_object_store_trims_total").await == 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "B never took the pass over: {}\n\nA: {a_log}",
            b.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let size = bucket_size(&rgw, &prefix).await;
    assert!(size <= BUDGET, "after the pass the bucket holds {size} bytes");
    let c = rgw.node(&tmp.path().join("c2"), &prefix);
    let mut cc = Clients::connect(&c.addr).await;
    let (hits, misses) = hits_are_complete(&mut cc, &actions).await;
    assert!(hits > 0 && misses > 0, "after the pass: {hits} hits, {misses} misses");
}
