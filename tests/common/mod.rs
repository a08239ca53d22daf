//! Test harness: runs the real `larder serve` binary on an ephemeral port and
//! talks to it with tonic clients.

#![allow(dead_code, unused_imports)] // each test binary uses its own subset

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The bench tool's data generator, shared as source (it is not library
/// API): the same seeds give the tests and `larder bench` the same bytes.
#[path = "../../src/bench/data.rs"]
pub mod data;
pub use data::{random_bytes, text_bytes};
use larder::digest::Digest;
use larder::proto::bytestream::byte_stream_client::ByteStreamClient;
use larder::proto::bytestream::{QueryWriteStatusRequest, ReadRequest, WriteRequest};
use larder::proto::reapi;
use larder::proto::reapi::action_cache_client::ActionCacheClient;
use larder::proto::reapi::capabilities_client::CapabilitiesClient;
use larder::proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

pub struct TestServer {
    child: Child,
    pub addr: String,
    pub dir: PathBuf,
    lines: mpsc::Receiver<String>,
    /// The line that says the store is open, with the other addresses.
    serving: String,
    /// Where larder's log goes: shown if the test fails, else removed
    /// (unless the test asked for it).
    log: PathBuf,
    own_log: bool,
}

/// A log file of its own for each server a test starts.
fn new_log_path() -> PathBuf {
    static SERVERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SERVERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("larder-test-{}-{n}.log", std::process::id()))
}

impl TestServer {
    /// Starts `larder serve` on `dir` with extra flags, and waits until it
    /// serves (its store is open).
    pub fn start(dir: &Path, extra: &[&str]) -> TestServer {
        let mut server = TestServer::spawn(dir, extra);
        server.wait_until_serving();
        server
    }

    /// Starts `larder serve` and returns once it listens, maybe before its
    /// store is open.
    pub fn spawn(dir: &Path, extra: &[&str]) -> TestServer {
        TestServer::spawn_logging(dir, extra, "warn", None, &[], None)
    }

    /// Like [`TestServer::start`], with extra environment variables.
    pub fn start_with_env(dir: &Path, extra: &[&str], env: &[(String, String)]) -> TestServer {
        let mut server = TestServer::spawn_logging(dir, extra, "warn", None, env, None);
        server.wait_until_serving();
        server
    }

    /// Like [`TestServer::start`], with logs at `level` written to `log`.
    pub fn start_logging(dir: &Path, extra: &[&str], level: &str, log: &Path) -> TestServer {
        let mut server = TestServer::spawn_logging(dir, extra, level, Some(log), &[], None);
        server.wait_until_serving();
        server
    }

    /// Like [`TestServer::start_logging`], under a limit on open files (soft
    /// and hard, as `ulimit -n` sets them).
    pub fn start_with_open_files(dir: &Path, extra: &[&str], log: &Path, open_files: u64) -> TestServer {
        let mut server = TestServer::spawn_logging(dir, extra, "info", Some(log), &[], Some(open_files));
        server.wait_until_serving();
        server
    }

    fn spawn_logging(
        dir: &Path,
        extra: &[&str],
        level: &str,
        log: Option<&Path>,
        env: &[(String, String)],
        open_files: Option<u64>,
    ) -> TestServer {
        let mut command = Command::new(env!("CARGO_BIN_EXE_larder"));
        if let Some(limit) = open_files {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
            // SAFETY: setrlimit is async-signal-safe and touches no memory
            // of the parent.
            unsafe {
                command.pre_exec(move || match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                });
            }
        }
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--dir"])
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", level)
            .env_remove("XDG_CACHE_HOME")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped());
        // Not on the terminal: some tests log thousands of refused writes.
        let (log, own_log) = match log {
            Some(log) => (log.to_path_buf(), false),
            None => (new_log_path(), true),
        };
        command.stderr(std::fs::File::create(&log).expect("create the log file"));
        let mut child = command.spawn().expect("spawn larder");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            // Keeps draining, so the server never writes into a closed pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut server = TestServer {
            child,
            addr: String::new(),
            dir: dir.to_path_buf(),
            lines,
            serving: String::new(),
            log,
            own_log,
        };
        let line = server.next_line();
        server.addr = line
            .split(" listening on ")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .unwrap_or_else(|| panic!("unexpected first line: {line}"))
            .to_string();
        server
    }

    fn next_line(&mut self) -> String {
        self.lines.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
            let _ = self.child.kill();
            panic!("larder printed nothing more: {:?}", self.child.wait())
        })
    }

    /// Waits for the line that says the store is open.
    pub fn wait_until_serving(&mut self) {
        let line = self.next_line();
        assert!(line.contains(&format!("serving REAPI on {}", self.addr)), "unexpected line: {line}");
        self.serving = line;
    }

    /// The address larder says it serves `what` on ("HTTP also",
    /// "metrics"): ports picked by larder, never taken by another socket.
    pub fn address(&self, what: &str) -> String {
        let rest = self.serving.split(&format!("{what} on ")).nth(1);
        let address = rest.and_then(|r| r.split([',', ')']).next());
        address.unwrap_or_else(|| panic!("no {what} address in: {}", self.serving)).to_string()
    }

    /// Whether the server process is still alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// What larder has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// kill -9: no chance to flush or close anything.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&self) {
        unsafe_sigterm(self.child.id());
    }

    /// The exit status, if the process exits within `timeout`.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGTERM, then waits for the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        unsafe_sigterm(self.child.id());
        self.child.wait().expect("wait for larder")
    }

    pub async fn clients(&self) -> Clients {
        Clients::connect(&self.addr).await
    }

    /// Peak resident memory of the server so far, from /proc.
    pub fn peak_rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }
}

fn unsafe_sigterm(pid: u32) {
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!("--- the last {} lines of larder's log ({}) ---", tail.len(), self.log.display());
            eprintln!("{}", tail.join("\n"));
        } else if self.own_log {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

pub struct Clients {
    pub cas: ContentAddressableStorageClient<Channel>,
    pub bs: ByteStreamClient<Channel>,
    pub ac: ActionCacheClient<Channel>,
    pub caps: CapabilitiesClient<Channel>,
}

const LIMIT: usize = 256 << 20;

impl Clients {
    pub async fn connect(addr: &str) -> Clients {
        let channel =
            Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("connect");
        Clients {
            cas: ContentAddressableStorageClient::new(channel.clone())
                .max_decoding_message_size(LIMIT)
                .max_encoding_message_size(LIMIT),
            bs: ByteStreamClient::new(channel.clone()).max_decoding_message_size(LIMIT),
            ac: ActionCacheClient::new(channel.clone()).max_decoding_message_size(LIMIT),
            caps: CapabilitiesClient::new(channel),
        }
    }

    /// Uploads `data` with ByteStream.Write in `chunk`-byte messages.
    pub async fn write(&mut self, name: &str, data: &[u8], chunk: usize) -> Result<i64, Status> {
        let messages = write_messages(name, data, 0, chunk, true);
        Ok(self.bs.write(tokio_stream::iter(messages)).await?.into_inner().committed_size)
    }

    /// Reads a whole resource with ByteStream.Read.
    pub async fn read(&mut self, name: &str, offset: i64, limit: i64) -> Result<Vec<u8>, Status> {
        let request = ReadRequest { resource_name: name.to_string(), read_offset: offset, read_limit: limit };
        let mut stream = self.bs.read(request).await?.into_inner();
        let mut out = Vec::new();
        while let Some(message) = stream.message().await? {
            out.extend_from_slice(&message.data);
        }
        Ok(out)
    }

    /// Stores `result` for `action` (no instance name), which must succeed.
    pub async fn put_action_result(&mut self, action: &reapi::Digest, result: reapi::ActionResult) {
        let request = reapi::UpdateActionResultRequest {
            action_digest: Some(action.clone()),
            action_result: Some(result),
            ..Default::default()
        };
        self.ac.update_action_result(request).await.expect("UpdateActionResult");
    }

    /// Waits until the server has stored `bytes` of the upload `name`: a
    /// call with that much sent is then in flight there, not on its way.
    pub async fn until_committed(&mut self, name: &str, bytes: i64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while self.upload_status(name).await.map_or(0, |(committed, _)| committed) < bytes {
            assert!(std::time::Instant::now() < deadline, "the server never stored {bytes} bytes of {name}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// QueryWriteStatus of an upload the server knows (or a stored blob).
    pub async fn query(&mut self, name: &str) -> (i64, bool) {
        self.upload_status(name).await.unwrap_or_else(|| panic!("QueryWriteStatus: no upload {name}"))
    }

    /// QueryWriteStatus: `None` for an upload the server does not know
    /// (NOT_FOUND: never started, finished with an error, or expired).
    pub async fn upload_status(&mut self, name: &str) -> Option<(i64, bool)> {
        let request = QueryWriteStatusRequest { resource_name: name.to_string() };
        match self.bs.query_write_status(request).await {
            Ok(r) => Some((r.get_ref().committed_size, r.get_ref().complete)),
            Err(status) if status.code() == Code::NotFound => None,
            Err(status) => panic!("QueryWriteStatus: {status:?}"),
        }
    }

    pub async fn find_missing(&mut self, digests: &[reapi::Digest]) -> Vec<reapi::Digest> {
        self.cas
            .find_missing_blobs(reapi::FindMissingBlobsRequest {
                blob_digests: digests.to_vec(),
                ..Default::default()
            })
            .await
            .expect("FindMissingBlobs")
            .into_inner()
            .missing_blob_digests
    }

    pub async fn batch_update(&mut self, blobs: &[&[u8]]) -> Vec<i32> {
        let requests = blobs
            .iter()
            .map(|b| reapi::batch_update_blobs_request::Request {
                digest: Some(digest(b)),
                data: bytes::Bytes::copy_from_slice(b),
                compressor: 0,
            })
            .collect();
        self.cas
            .batch_update_blobs(reapi::BatchUpdateBlobsRequest { requests, ..Default::default() })
            .await
            .expect("BatchUpdateBlobs")
            .into_inner()
            .responses
            .iter()
            .map(|r| r.status.as_ref().unwrap().code)
            .collect()
    }
}

/// The messages of a ByteStream.Write of `data` starting at `offset`.
pub fn write_messages(
    name: &str,
    data: &[u8],
    offset: usize,
    chunk: usize,
    finish: bool,
) -> Vec<WriteRequest> {
    let mut messages = Vec::new();
    let mut at = offset;
    loop {
        let end = (at + chunk).min(data.len());
        messages.push(WriteRequest {
            resource_name: if messages.is_empty() { name.to_string() } else { String::new() },
            write_offset: at as i64,
            finish_write: finish && end == data.len(),
            data: bytes::Bytes::copy_from_slice(&data[at..end]),
        });
        at = end;
        if at == data.len() {
            break;
        }
    }
    messages
}

/// What the files under `dir` take on disk, as `du` counts them (allocated
/// blocks). Files that vanish meanwhile (compaction, eviction) are skipped.
pub fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .filter_map(|e| Some((e.path(), e.metadata().ok()?)))
        .map(|(path, meta)| if meta.is_dir() { allocated(&path) } else { meta.blocks() * 512 })
        .sum()
}

/// A tmpfs of `bytes`, mounted under `parent` for as long as it lives
/// (unmounted lazily when dropped): a small disk for a test to fill.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// `None` (and a line saying the test is skipped) unless running as
    /// root, which mounting needs (CI runs as root).
    pub fn mount(parent: &Path, bytes: u64) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting a small tmpfs needs root (CI runs as root)");
            return None;
        }
        let path = parent.join("small");
        std::fs::create_dir(&path).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(mounted.success(), "mount a tmpfs of {bytes} bytes on {}", path.display());
        Some(Tmpfs { path })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

pub fn digest(data: &[u8]) -> reapi::Digest {
    Digest::of(data).to_proto()
}

pub fn upload_name(instance: &str, uuid: &str, data: &[u8]) -> String {
    let d = digest(data);
    let prefix = if instance.is_empty() { String::new() } else { format!("{instance}/") };
    format!("{prefix}uploads/{uuid}/blobs/{}/{}", d.hash, d.size_bytes)
}

pub fn read_name(instance: &str, data: &[u8]) -> String {
    let d = digest(data);
    let prefix = if instance.is_empty() { String::new() } else { format!("{instance}/") };
    format!("{prefix}blobs/{}/{}", d.hash, d.size_bytes)
}

pub fn assert_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code) -> Status {
    match result {
        Err(status) if status.code() == code => status,
        other => panic!("expected {code:?}, got {other:?}"),
    }
}
