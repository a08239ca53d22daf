//! Shared by the benchmarks that run the real `larder serve` binary in its
//! own process, so that its CPU time can be read apart from the client's.

#![allow(dead_code)] // each benchmark uses its own subset

/// The bench tool's data generator, shared as source (it is not library API).
#[path = "../../src/bench/data.rs"]
pub mod data;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use bytes::Bytes;
use larder::digest::Digest;
use larder::proto::bytestream::WriteRequest;
use larder::proto::bytestream::byte_stream_client::ByteStreamClient;
use tonic::transport::Channel;

/// Bytes per write message.
const MESSAGE: usize = 1 << 20;

/// Writes back what earlier runs left dirty, so that each run starts from
/// the same disk state (random data is disk-bound here).
pub fn settle_disk() {
    let _ = Command::new("sync").status();
}

pub struct Server {
    pub child: Child,
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Server {
    pub fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_larder"))
            .args(["serve", "--listen", "127.0.0.1:0", "--max-size", "20GiB", "--dir"])
            .arg(dir.path().join("data"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // The second line says the store is open.
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = lines.nth(1).unwrap().unwrap();
        let addr =
            line.split("serving REAPI on ").nth(1).unwrap().split_whitespace().next().unwrap().to_string();
        Server { child, addr, _dir: dir }
    }

    /// User plus system CPU seconds the server has used.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        ticks as f64 / 100.0
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Uploads each blob as `wire` bytes, in 1 MiB messages; `zstd` follows the
/// compressed offset rule.
pub async fn upload(bs: &mut ByteStreamClient<Channel>, digest: Digest, wire: &[u8], zstd: bool, n: usize) {
    let kind = if zstd { "compressed-blobs/zstd" } else { "blobs" };
    let name = format!("uploads/bench-{n}/{kind}/{}/{}", digest.hex(), digest.size);
    let messages: Vec<WriteRequest> = wire
        .chunks(MESSAGE)
        .enumerate()
        .map(|(i, part)| WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: (i * MESSAGE) as i64,
            finish_write: (i + 1) * MESSAGE >= wire.len(),
            data: Bytes::copy_from_slice(part),
        })
        .collect();
    let r = bs.write(tokio_stream::iter(messages)).await.unwrap().into_inner();
    assert_eq!(r.committed_size as usize, wire.len());
}
