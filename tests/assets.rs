//! The Remote Asset API against `larder serve`: FetchBlob downloads from an
//! origin the test runs (and counts requests to), verifies and records;
//! Push records; Fetch answers from records, within their expiry and age,
//! with the origin gone.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use common::{TestServer, assert_code, digest, read_name};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use larder::proto::asset::fetch_client::FetchClient;
use larder::proto::asset::push_client::PushClient;
use larder::proto::asset::{
    FetchBlobRequest, FetchBlobResponse, FetchDirectoryRequest, PushBlobRequest, PushDirectoryRequest,
    Qualifier,
};
use larder::proto::reapi;
use prost::Message;
use sha2::Digest as _;
use tonic::Code;
use tonic::transport::Channel;

/// What the origin answers at a path.
#[derive(Clone)]
enum Reply {
    Body(Bytes),
    /// The body, after a pause.
    Slow(Duration, Bytes),
    /// A redirect to this URL.
    Redirect(String),
    Status(u16),
    /// The body, to requests carrying this Authorization header only.
    Private(String, Bytes),
}

/// An HTTP origin on a free port that counts the requests to each path.
struct Origin {
    addr: SocketAddr,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Origin {
    async fn start(routes: Vec<(&str, Reply)>) -> Origin {
        Origin::start_tls(routes, None).await
    }

    /// An origin over HTTPS when `tls` is given.
    async fn start_tls(routes: Vec<(&str, Reply)>, tls: Option<tokio_rustls::TlsAcceptor>) -> Origin {
        let routes: Arc<HashMap<String, Reply>> =
            Arc::new(routes.into_iter().map(|(p, r)| (p.to_string(), r)).collect());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(Mutex::new(HashMap::new()));
        let counted = Arc::clone(&hits);
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            // Connections end with the origin: a stopped origin answers
            // nothing, not even on a connection kept alive from before.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = &mut stopped => break,
                };
                let Ok((stream, _)) = accepted else { continue };
                let (routes, hits, tls) = (Arc::clone(&routes), Arc::clone(&counted), tls.clone());
                connections.spawn(async move {
                    let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                        let (routes, hits) = (Arc::clone(&routes), Arc::clone(&hits));
                        async move { Ok::<_, std::convert::Infallible>(answer(&request, &routes, &hits).await) }
                    });
                    // HTTP/1.1 or, as TLS may negotiate, HTTP/2.
                    let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = match tls {
                        None => http.serve_connection(TokioIo::new(stream), service).await,
                        Some(tls) => match tls.accept(stream).await {
                            Ok(stream) => http.serve_connection(TokioIo::new(stream), service).await,
                            Err(_) => return,
                        },
                    };
                });
            }
            connections.shutdown().await;
        });
        Origin { addr, hits, stop: Some(stop), task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// Returns once the listener and every connection are closed.
    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
            (&mut self.task).await.unwrap();
        }
    }
}

async fn answer(
    request: &hyper::Request<hyper::body::Incoming>,
    routes: &HashMap<String, Reply>,
    hits: &Mutex<HashMap<String, usize>>,
) -> hyper::Response<Full<Bytes>> {
    let path = request.uri().path().to_string();
    *hits.lock().unwrap().entry(path.clone()).or_default() += 1;
    let respond =
        |status: u16, body: Bytes| hyper::Response::builder().status(status).body(Full::new(body)).unwrap();
    match routes.get(&path) {
        None => respond(404, Bytes::new()),
        Some(Reply::Body(body)) => respond(200, body.clone()),
        Some(Reply::Slow(pause, body)) => {
            tokio::time::sleep(*pause).await;
            respond(200, body.clone())
        }
        Some(Reply::Redirect(to)) => hyper::Response::builder()
            .status(302)
            .header("location", to)
            .body(Full::new(Bytes::new()))
            .unwrap(),
        Some(Reply::Status(status)) => respond(*status, Bytes::new()),
        Some(Reply::Private(token, body)) => {
            let sent = request.headers().get("authorization").and_then(|v| v.to_str().ok());
            if sent == Some(token.as_str()) { respond(200, body.clone()) } else { respond(401, Bytes::new()) }
        }
    }
}

fn sri(data: &[u8]) -> String {
    format!("sha256-{}", base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(data)))
}

fn q(name: &str, value: &str) -> Qualifier {
    Qualifier { name: name.into(), value: value.into() }
}

fn fetch_request<S: AsRef<str>>(uris: &[S], qualifiers: Vec<Qualifier>) -> FetchBlobRequest {
    let uris = uris.iter().map(|u| u.as_ref().to_string()).collect();
    FetchBlobRequest { uris, qualifiers, ..Default::default() }
}

async fn clients(server: &TestServer) -> (FetchClient<Channel>, PushClient<Channel>) {
    let channel = Channel::from_shared(format!("http://{}", server.addr)).unwrap().connect().await.unwrap();
    (FetchClient::new(channel.clone()), PushClient::new(channel))
}

/// The response's status code.
fn code(response: &FetchBlobResponse) -> Code {
    Code::from(response.status.as_ref().map_or(0, |s| s.code))
}

fn timestamp_in(seconds: i64) -> pbjson_types::Timestamp {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    pbjson_types::Timestamp { seconds: now + seconds, nanos: 0 }
}

fn metric(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |v| v.parse::<f64>().unwrap() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_downloads_verifies_and_records_and_the_record_outlives_the_origin() {
    let content = Bytes::from(common::random_bytes(3 << 20, 7));
    let other = Bytes::from(common::random_bytes(1000, 8));
    let mut origin = Origin::start(vec![
        ("/dep-1.0.tar.gz", Reply::Body(content.clone())),
        ("/other.txt", Reply::Body(other.clone())),
        ("/missing", Reply::Status(404)),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), &["--download-allow", "127.0.0.1"]);
    let (mut fetch, _) = clients(&server).await;
    let uri = origin.url("/dep-1.0.tar.gz");

    let first = fetch.fetch_blob(fetch_request(&[&uri], vec![q("checksum.sri", &sri(&content))])).await;
    let first = first.unwrap().into_inner();
    assert_eq!(code(&first), Code::Ok, "{first:?}");
    assert_eq!(first.uri, uri);
    assert_eq!(first.blob_digest, Some(digest(&content)));
    assert_eq!(first.digest_function, reapi::digest_function::Value::Sha256 as i32);
    assert_eq!(origin.hits("/dep-1.0.tar.gz"), 1);
    // The content is in the CAS, as the client will read it.
    let mut cas = server.clients().await;
    assert_eq!(cas.read(&read_name("", &content), 0, 0).await.unwrap(), content);

    origin.stop().await;
    // Without the checksum, from the record; with it, too.
    for qualifiers in [vec![], vec![q("checksum.sri", &sri(&content))]] {
        let again = fetch.fetch_blob(fetch_request(&[&uri], qualifiers)).await.unwrap().into_inner();
        assert_eq!(code(&again), Code::Ok, "{again:?}");
        assert_eq!(again.blob_digest, Some(digest(&content)));
    }
    // Another URI of the same content: the checksum names what the CAS holds.
    let mirror = "https://mirror.invalid/dep-1.0.tar.gz".to_string();
    let by_checksum =
        fetch.fetch_blob(fetch_request(&[mirror], vec![q("checksum.sri", &sri(&content))])).await;
    assert_eq!(by_checksum.unwrap().into_inner().blob_digest, Some(digest(&content)));
    // A checksum the record's content does not match is not answered from it.
    let wrong = fetch.fetch_blob(fetch_request(&[&uri], vec![q("checksum.sri", &sri(b"other"))])).await;
    assert_ne!(code(&wrong.unwrap().into_inner()), Code::Ok);
    assert_eq!(origin.hits("/dep-1.0.tar.gz"), 1, "nothing went to the origin after the first fetch");
    // A qualifier this server cannot honour when downloading is refused, by name.
    let unknown =
        fetch.fetch_blob(fetch_request(&[origin.url("/other.txt")], vec![q("vcs.branch", "main")])).await;
    let refused = assert_code(unknown, Code::InvalidArgument);
    assert!(refused.message().contains("\"vcs.branch\""), "{refused:?}");

    let metrics =
        reqwest::get(format!("http://{}/metrics", server.addr)).await.unwrap().text().await.unwrap();
    assert_eq!(metric(&metrics, "larder_asset_fetches_total{outcome=\"downloaded\"}"), 1, "{metrics}");
    assert_eq!(metric(&metrics, "larder_asset_fetches_total{outcome=\"record\"}"), 2, "{metrics}");
    assert_eq!(metric(&metrics, "larder_asset_fetches_total{outcome=\"checksum\"}"), 1, "{metrics}");
    assert_eq!(metric(&metrics, "larder_asset_downloaded_bytes_total"), content.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_checksum_is_refused_and_nothing_is_recorded_or_stored() {
    let content = Bytes::from(common::random_bytes(100_000, 9));
    let mut origin =
        Origin::start(vec![("/a.jar", Reply::Body(content.clone())), ("/gone", Reply::Status(404))]).await;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), &["--download-allow", "127.0.0.1"]);
    let (mut fetch, _) = clients(&server).await;
    let uri = origin.url("/a.jar");
    let wrong = fetch.fetch_blob(fetch_request(&[&uri], vec![q("checksum.sri", &sri(b"not it"))])).await;
    let wrong = wrong.unwrap().into_inner();
    assert_eq!(code(&wrong), Code::Aborted, "{wrong:?}");
    assert!(wrong.status.unwrap().message.contains("checksum.sri"));
    let mut cas = server.clients().await;
    assert_eq!(cas.find_missing(&[digest(&content)]).await, [digest(&content)], "nothing stored");
    origin.stop().await;
    let after = fetch.fetch_blob(fetch_request(&[&uri], vec![])).await.unwrap().into_inner();
    assert_ne!(code(&after), Code::Ok, "nothing recorded: {after:?}");

    // The origin's own answers: a 404 is NOT_FOUND, in the status.
    let origin = Origin::start(vec![
        ("/gone", Reply::Status(404)),
        ("/boom", Reply::Status(503)),
        ("/part", Reply::Status(206)),
    ])
    .await;
    // Only a 200's body is content to record.
    let part = fetch.fetch_blob(fetch_request(&[origin.url("/part")], vec![])).await.unwrap().into_inner();
    assert_eq!(code(&part), Code::Unavailable, "{part:?}");
    // Headers that would change what the origin sends are refused.
    let ranged = fetch_request(&[origin.url("/gone")], vec![q("http_header:Range", "bytes=0-9")]);
    assert_code(fetch.fetch_blob(ranged).await, Code::InvalidArgument);
    let gone = fetch.fetch_blob(fetch_request(&[origin.url("/gone")], vec![])).await.unwrap().into_inner();
    assert_eq!(code(&gone), Code::NotFound, "{gone:?}");
    // Every URI is tried in order; the answer names the last failure.
    let uris = [origin.url("/gone"), origin.url("/boom")];
    let both = fetch.fetch_blob(fetch_request(&uris, vec![])).await.unwrap().into_inner();
    assert_eq!((code(&both), both.uri.as_str()), (Code::Unavailable, uris[1].as_str()), "{both:?}");
    assert_eq!(origin.hits("/gone"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_then_fetch_needs_no_origin_and_respects_expiry_and_age() {
    let dir = tempfile::tempdir().unwrap();
    // Downloads are off: Fetch answers only what was pushed.
    let server = TestServer::start(dir.path(), &[]);
    let (mut fetch, mut push) = clients(&server).await;
    let mut cas = server.clients().await;
    let content = b"pushed content".to_vec();
    assert_eq!(cas.batch_update(&[&content]).await, [0]);
    let uri = "urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6".to_string();
    let pushed = |uri: &str, expire_at, qualifiers: Vec<Qualifier>| PushBlobRequest {
        uris: vec![uri.to_string(), format!("{uri}#mirror")],
        qualifiers,
        expire_at,
        blob_digest: Some(digest(&content)),
        ..Default::default()
    };
    push.push_blob(pushed(&uri, None, vec![q("vcs.commit", "abc")])).await.unwrap();
    // Found by either URI, with the qualifiers it was pushed with.
    for u in [uri.clone(), format!("{uri}#mirror")] {
        let found =
            fetch.fetch_blob(fetch_request(&[u], vec![q("vcs.commit", "abc")])).await.unwrap().into_inner();
        assert_eq!((code(&found), found.blob_digest), (Code::Ok, Some(digest(&content))));
    }
    // Other qualifiers name other content.
    let other = fetch.fetch_blob(fetch_request(&[&uri], vec![q("vcs.commit", "def")])).await;
    assert_eq!(code(&other.unwrap().into_inner()), Code::NotFound);
    let bare = fetch.fetch_blob(fetch_request(&[&uri], vec![])).await.unwrap().into_inner();
    assert_eq!(code(&bare), Code::NotFound, "{bare:?}");

    // Content recorded before oldest_content_accepted is not accepted.
    let mut recent = fetch_request(&[&uri], vec![q("vcs.commit", "abc")]);
    recent.oldest_content_accepted = Some(timestamp_in(-60));
    assert_eq!(code(&fetch.fetch_blob(recent.clone()).await.unwrap().into_inner()), Code::Ok);
    recent.oldest_content_accepted = Some(timestamp_in(60));
    assert_eq!(code(&fetch.fetch_blob(recent).await.unwrap().into_inner()), Code::NotFound);

    // A record with an expiry says it, and is not served after it.
    push.push_blob(pushed("urn:later", Some(timestamp_in(3600)), vec![])).await.unwrap();
    let later = fetch.fetch_blob(fetch_request(&["urn:later"], vec![])).await.unwrap().into_inner();
    assert_eq!(later.expires_at.map(|t| t.seconds), Some(timestamp_in(3600).seconds));
    push.push_blob(pushed("urn:later", Some(timestamp_in(-1)), vec![])).await.unwrap();
    let expired = fetch.fetch_blob(fetch_request(&["urn:later"], vec![])).await.unwrap().into_inner();
    assert_eq!(code(&expired), Code::NotFound, "{expired:?}");

    // Content must be in the CAS before it is pushed.
    let mut absent = pushed("urn:absent", None, vec![]);
    absent.blob_digest = Some(digest(b"never uploaded"));
    assert_code(push.push_blob(absent).await, Code::FailedPrecondition);
    let mut no_uri = pushed("urn:x", None, vec![]);
    no_uri.uris.clear();
    assert_code(push.push_blob(no_uri).await, Code::InvalidArgument);

    // A record whose references are missing is a miss, not a dangling digest.
    let mut referencing = pushed("urn:refs", None, vec![]);
    referencing.references_blobs = vec![digest(b"a reference never uploaded")];
    push.push_blob(referencing).await.unwrap();
    let dangling = fetch.fetch_blob(fetch_request(&["urn:refs"], vec![])).await.unwrap().into_inner();
    assert_eq!(code(&dangling), Code::NotFound, "a reference is missing: {dangling:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_directory_answers_a_pushed_directory_while_it_is_whole() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), &["--download-allow", "127.0.0.1"]);
    let (mut fetch, mut push) = clients(&server).await;
    let mut cas = server.clients().await;
    let file = b"int main() {}".to_vec();
    let root = reapi::Directory {
        files: vec![reapi::FileNode {
            name: "main.c".into(),
            digest: Some(digest(&file)),
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec();
    assert_eq!(cas.batch_update(&[&root]).await, [0]);
    let request = PushDirectoryRequest {
        uris: vec!["https://github.com/example/repo.git".into()],
        qualifiers: vec![q("vcs.commit", "b5123b1")],
        root_directory_digest: Some(digest(&root)),
        ..Default::default()
    };
    push.push_directory(request.clone()).await.unwrap();
    let wanted = FetchDirectoryRequest {
        uris: vec!["https://github.com/example/repo.git".into()],
        qualifiers: vec![q("vcs.commit", "b5123b1")],
        ..Default::default()
    };
    // The file inside is not in the CAS: the tree is not whole, and its
    // record goes.
    let partial = fetch.fetch_directory(wanted.clone()).await.unwrap().into_inner();
    assert_eq!(partial.status.unwrap().code, Code::NotFound as i32);
    assert_eq!(cas.batch_update(&[&file]).await, [0]);
    let partial = fetch.fetch_directory(wanted.clone()).await.unwrap().into_inner();
    assert_eq!(partial.status.unwrap().code, Code::NotFound as i32, "pushed again, it would be found");
    push.push_directory(request).await.unwrap();
    let whole = fetch.fetch_directory(wanted).await.unwrap().into_inner();
    assert_eq!(whole.status.unwrap().code, 0);
    assert_eq!(whole.root_directory_digest, Some(digest(&root)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_hosts_and_addresses_are_downloaded_from() {
    let content = Bytes::from_static(b"an archive");
    let origin = Origin::start(vec![("/a", Reply::Body(content.clone()))]).await;
    let port = origin.addr.port();
    let redirect = format!("http://localhost:{port}/a");
    let origin2 = Origin::start(vec![
        ("/to-localhost", Reply::Redirect(redirect)),
        ("/to-allowed", Reply::Redirect(origin.url("/a"))),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), &["--download-allow", "127.0.0.1"]);
    let (mut fetch, _) = clients(&server).await;
    let denied = |r: FetchBlobResponse| {
        assert_eq!(code(&r), Code::PermissionDenied, "{r:?}");
    };
    // A host off the list, and a redirect to one.
    denied(
        fetch
            .fetch_blob(fetch_request(&[format!("http://localhost:{port}/a")], vec![]))
            .await
            .unwrap()
            .into_inner(),
    );
    denied(
        fetch.fetch_blob(fetch_request(&[origin2.url("/to-localhost")], vec![])).await.unwrap().into_inner(),
    );
    for scheme in ["file:///etc/passwd", "ftp://127.0.0.1/a", "urn:x", "not a uri"] {
        let other = fetch.fetch_blob(fetch_request(&[scheme], vec![])).await.unwrap().into_inner();
        assert_eq!(code(&other), Code::NotFound, "{other:?}");
    }
    assert_eq!(origin.hits("/a"), 0);
    // A request carrying headers is not redirected to another host, even
    // an allowed one: its headers stay with the host they were meant for.
    let with_header =
        fetch_request(&[origin2.url("/to-allowed")], vec![q("http_header:Authorization", "Bearer x")]);
    denied(fetch.fetch_blob(with_header).await.unwrap().into_inner());
    // Without, a redirect within the list is followed.
    let followed =
        fetch.fetch_blob(fetch_request(&[origin2.url("/to-allowed")], vec![])).await.unwrap().into_inner();
    assert_eq!((code(&followed), followed.blob_digest), (Code::Ok, Some(digest(&content))));
    drop(server);

    // `*` admits public addresses only: loopback must be named.
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), &["--download-allow", "*"]);
    let (mut fetch, _) = clients(&server).await;
    denied(fetch.fetch_blob(fetch_request(&[origin.url("/a")], vec![])).await.unwrap().into_inner());
    denied(
        fetch
            .fetch_blob(fetch_request(&[format!("http://localhost:{port}/a")], vec![]))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(origin.hits("/a"), 1, "only the allowed redirect reached it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_fetching_one_uri_at_once_cause_one_download() {
    let content = Bytes::from(common::random_bytes(1 << 20, 11));
    let origin =
        Origin::start(vec![("/slow.tar.gz", Reply::Slow(Duration::from_millis(800), content.clone()))]).await;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), &["--download-allow", "127.0.0.1"]);
    let (fetch, _) = clients(&server).await;
    let uri = origin.url("/slow.tar.gz");
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let (mut fetch, uri) = (fetch.clone(), uri.clone());
            tokio::spawn(async move {
                fetch.fetch_blob(fetch_request(&[uri], vec![])).await.unwrap().into_inner()
            })
        })
        .collect();
    for call in calls {
        let answer = call.await.unwrap();
        assert_eq!((code(&answer), answer.blob_digest), (Code::Ok, Some(digest(&content))));
    }
    assert_eq!(origin.hits("/slow.tar.gz"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_keep_to_their_size_time_and_credentials() {
    let big = Bytes::from(common::random_bytes(3 << 20, 12));
    let secret = "Bearer s3cr3t-t0ken";
    let origin = Origin::start(vec![
        ("/big", Reply::Body(big)),
        ("/stuck", Reply::Slow(Duration::from_secs(30), Bytes::from_static(b"late"))),
        ("/private", Reply::Private(secret.into(), Bytes::from_static(b"private"))),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials");
    std::fs::write(&credentials, format!("# a mirror's token\n127.0.0.1 Authorization: {secret}\n")).unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("larder.log");
    let flags = [
        "--download-allow",
        "127.0.0.1",
        "--download-max-size",
        "1MiB",
        "--download-credentials",
        credentials.to_str().unwrap(),
    ];
    let server = TestServer::start_logging(&data, &flags, "debug", &log);
    let (mut fetch, _) = clients(&server).await;
    let big = fetch.fetch_blob(fetch_request(&[origin.url("/big")], vec![])).await.unwrap().into_inner();
    assert_eq!(code(&big), Code::ResourceExhausted, "{big:?}");
    let mut stuck = fetch_request(&[origin.url("/stuck")], vec![]);
    stuck.timeout = Some(pbjson_types::Duration { seconds: 1, nanos: 0 });
    let started = std::time::Instant::now();
    let stuck = fetch.fetch_blob(stuck).await.unwrap().into_inner();
    assert_eq!(code(&stuck), Code::DeadlineExceeded, "{stuck:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
    let private =
        fetch.fetch_blob(fetch_request(&[origin.url("/private")], vec![])).await.unwrap().into_inner();
    assert_eq!((code(&private), private.blob_digest), (Code::Ok, Some(digest(b"private"))));
    assert!(!server.log().contains("s3cr3t"), "the token is never logged");
    assert!(!std::fs::read_to_string(&log).unwrap().contains("s3cr3t"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_routes_fetch_and_push() {
    let content = Bytes::from_static(b"over REST");
    let origin = Origin::start(vec![("/r", Reply::Body(content.clone()))]).await;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), &["--download-allow", "127.0.0.1"]);
    let http = reqwest::Client::new();
    let url = |verb: &str| format!("http://{}/v1/main/assets:{verb}", server.addr);
    let body = serde_json::json!({"uris": [origin.url("/r")], "qualifiers": [{"name": "checksum.sri", "value": sri(&content)}]});
    let reply = http.post(url("fetchBlob")).json(&body).send().await.unwrap();
    assert_eq!(reply.status(), 200);
    let reply: serde_json::Value = reply.json().await.unwrap();
    assert_eq!(reply["blobDigest"]["hash"], digest(&content).hash, "{reply}");
    assert_eq!(reply["uri"], origin.url("/r"));
    let push = serde_json::json!({"uris": ["urn:rest"], "blobDigest": {"hash": digest(&content).hash, "sizeBytes": content.len().to_string()}});
    assert_eq!(http.post(url("pushBlob")).json(&push).send().await.unwrap().status(), 200);
    let fetched: serde_json::Value = http
        .post(url("fetchBlob"))
        .json(&serde_json::json!({"uris": ["urn:rest"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fetched["blobDigest"]["hash"], digest(&content).hash, "{fetched}");
    // Instances are apart: the default instance has no such record.
    let other: serde_json::Value = http
        .post(format!("http://{}/v1/assets:fetchBlob", server.addr))
        .json(&serde_json::json!({"uris": ["urn:rest"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(other["status"]["code"], Code::NotFound as i32, "{other}");
    assert_eq!(http.get(url("fetchBlob")).send().await.unwrap().status(), 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_origins_are_trusted_through_the_system_roots_or_download_ca_file() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&key, &ca).unwrap();
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (cert, key, ca) = (
        write("origin.pem", cert.pem()),
        write("origin.key", key.serialize_pem()),
        write("ca.pem", ca.pem()),
    );
    let tls = larder::tls::acceptor(&cert, &key, None).unwrap();
    let content = Bytes::from_static(b"served over https");
    let origin = Origin::start_tls(vec![("/s", Reply::Body(content.clone()))], Some(tls)).await;
    let url = format!("https://localhost:{}/s", origin.addr.port());

    // The origin's CA is not among the system's: the handshake fails.
    let untrusted = TestServer::start(&dir.path().join("a"), &["--download-allow", "localhost"]);
    let (mut fetch, _) = clients(&untrusted).await;
    let refused = fetch.fetch_blob(fetch_request(&[&url], vec![])).await.unwrap().into_inner();
    assert_eq!(code(&refused), Code::Unavailable, "{refused:?}");
    assert_eq!(origin.hits("/s"), 0);

    let flags = ["--download-allow", "localhost", "--download-ca-file", ca.to_str().unwrap()];
    let trusted = TestServer::start(&dir.path().join("b"), &flags);
    let (mut fetch, _) = clients(&trusted).await;
    let fetched = fetch.fetch_blob(fetch_request(&[&url], vec![])).await.unwrap().into_inner();
    assert_eq!(
        (code(&fetched), fetched.blob_digest.clone()),
        (Code::Ok, Some(digest(&content))),
        "{fetched:?}"
    );
    assert_eq!(origin.hits("/s"), 1);
}
