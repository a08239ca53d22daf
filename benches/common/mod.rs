//! Shared by the benchmarks that run the real `larder serve` binary in its
//! own process, so that its CPU time can be read apart from the client's.

#![allow(dead_code)] // each benchmark uses its own subset

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

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
