//! What a run measures besides its own calls: the machine's ceilings, and a
//! process's CPU time, disk writes and peak memory (from /proc).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::data::{Content, Data, Rng};
use larder::digest::Digest;

/// Single-core speeds measured on this machine, in this run: every
/// throughput is also given as a fraction of these.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Ceilings {
    pub sha256_mbps: f64,
    /// zstd level 1, per kind of data benchmarked.
    pub zstd1_mbps: BTreeMap<&'static str, f64>,
    /// Sequential writes to the disk the store is on (`--dir`, or a
    /// server's `--server-dir`), ended by an fsync: the bound on ingest of
    /// a store that writes each byte once.
    pub disk_write_mbps: Option<f64>,
}

/// How long each ceiling is measured for.
const CEILING_TIME: Duration = Duration::from_millis(600);

impl Ceilings {
    pub fn measure(data: &[Data], disk: Option<&Path>) -> Result<Ceilings, std::io::Error> {
        let sample = super::data::random_bytes(8 << 20, 99);
        let sha256_mbps = rate(sample.len(), || {
            std::hint::black_box(Digest::of(&sample));
        });
        let zstd1_mbps = data
            .iter()
            .map(|&d| {
                let sample = data_sample(d, 8 << 20);
                let mbps = rate(sample.len(), || {
                    std::hint::black_box(zstd::bulk::compress(&sample, 1).expect("zstd compresses"));
                });
                (d.name(), mbps)
            })
            .collect();
        let disk_write_mbps = disk.map(disk_write_mbps).transpose()?;
        Ok(Ceilings { sha256_mbps, zstd1_mbps, disk_write_mbps })
    }
}

/// How much the disk probe writes: enough to get past what the page cache
/// absorbs quickly, small enough to take about a second.
const DISK_PROBE: usize = 256 << 20;

/// MB/s of writing [`DISK_PROBE`] bytes to a new file in `dir`, 1 MiB at a
/// time, and syncing it; the file is removed.
fn disk_write_mbps(dir: &Path) -> Result<f64, std::io::Error> {
    use std::io::Write;
    // A store's --dir is created if need be: measured before it is.
    std::fs::create_dir_all(dir)?;
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    let block = super::data::random_bytes(1 << 20, 98);
    let start = Instant::now();
    for _ in 0..DISK_PROBE / block.len() {
        file.write_all(&block)?;
    }
    file.as_file().sync_all()?;
    Ok(DISK_PROBE as f64 / start.elapsed().as_secs_f64() / 1e6)
}

/// `len` bytes of `data`, made of 256 KiB blobs of the kinds it mixes.
fn data_sample(data: Data, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(7);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let content = Content::new(data.pick(&mut rng), rng.next_u64(), 256 << 10);
        content.push(0, 256 << 10, &mut out);
    }
    out
}

/// MB/s of running `f` over `len` bytes, repeated for [`CEILING_TIME`].
fn rate(len: usize, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut done = 0;
    while start.elapsed() < CEILING_TIME {
        f();
        done += len;
    }
    done as f64 / start.elapsed().as_secs_f64() / 1e6
}

/// CPU time the bench spends as a client (making data, checking reads), so
/// that an embedded store's share of the process's CPU can be told apart.
#[derive(Clone, Default)]
pub struct ClientCpu(Arc<AtomicU64>);

impl ClientCpu {
    /// Runs `f`, counting the CPU time this thread spends in it.
    pub fn count<T>(&self, f: impl FnOnce() -> T) -> T {
        let start = thread_cpu();
        let out = f();
        self.0.fetch_add((thread_cpu() - start).as_nanos() as u64, Ordering::Relaxed);
        out
    }

    pub fn seconds(&self) -> f64 {
        self.0.load(Ordering::Relaxed) as f64 / 1e9
    }
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A process whose resources a run accounts for: the bench itself (with an
/// embedded store) or a server on this machine.
#[derive(Clone, Copy, Debug)]
pub enum Process {
    Own,
    Pid(u32),
}

/// A process's counters at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub cpu_seconds: f64,
    /// Bytes the process caused to be written to storage.
    pub write_bytes: u64,
}

impl Process {
    fn proc_path(self, file: &str) -> String {
        match self {
            Process::Own => format!("/proc/self/{file}"),
            Process::Pid(pid) => format!("/proc/{pid}/{file}"),
        }
    }

    /// `None` if /proc cannot tell (another user's process, not Linux).
    pub fn sample(self) -> Option<Sample> {
        let stat = std::fs::read_to_string(self.proc_path("stat")).ok()?;
        let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
        // utime and stime: fields 14 and 15 of stat, 12 and 13 after the name.
        let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let io = std::fs::read_to_string(self.proc_path("io")).ok()?;
        let write_bytes = io.lines().find_map(|l| l.strip_prefix("write_bytes: "))?.trim().parse().ok()?;
        Some(Sample { cpu_seconds: ticks as f64 / hz, write_bytes })
    }

    /// Restarts the process's peak RSS from its current RSS; false if the
    /// kernel refused (then the peak counts from the process's start).
    pub fn reset_peak_rss(self) -> bool {
        std::fs::write(self.proc_path("clear_refs"), "5").is_ok()
    }

    /// Peak resident memory, in bytes.
    pub fn peak_rss(self) -> Option<u64> {
        let status = std::fs::read_to_string(self.proc_path("status")).ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib << 10)
    }
}

/// The process listening on a local TCP port, found through /proc (so that
/// a server on this machine is measured without being told its pid).
pub fn listener_pid(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEXADDR:HEXPORT; state 0A is LISTEN.
            let listening = f.get(3) == Some(&"0A");
            let on_port =
                f.get(1).and_then(|a| a.rsplit(':').next()).and_then(|p| u16::from_str_radix(p, 16).ok())
                    == Some(port);
            if listening && on_port {
                inodes.extend(f.get(9).map(|i| format!("socket:[{i}]")));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && inodes.iter().any(|i| target.as_os_str() == i.as_str())
            {
                return Some(pid);
            }
        }
    }
    None
}

/// Bytes the files under `dir` take on disk: their allocated blocks, as
/// `du` counts them. Files that vanish meanwhile are skipped.
fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .filter_map(|e| Some((e.path(), e.metadata().ok()?)))
        .map(|(path, meta)| if meta.is_dir() { allocated_bytes(&path) } else { meta.blocks() * 512 })
        .sum()
}

/// The most a directory takes on disk while it is written, sampled ten
/// times a second on a thread of its own.
pub struct PeakDisk {
    peak: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl PeakDisk {
    pub fn start(dir: std::path::PathBuf) -> PeakDisk {
        let (peak, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(std::sync::atomic::AtomicBool::new(false)));
        let thread = {
            let (peak, stop) = (Arc::clone(&peak), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(allocated_bytes(&dir), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        PeakDisk { peak, stop, thread }
    }

    /// Stops sampling; the peak in bytes.
    pub fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.peak.load(Ordering::Relaxed)
    }
}

/// Bytes the files under `dir` take (apparent sizes, as the store counts them).
pub fn dir_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = match entry.metadata() {
            Ok(m) => m,
            // Files vanish under us as a database compacts.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if meta.is_dir() {
            total += dir_bytes(&entry.path())?;
        } else {
            total += meta.len();
        }
    }
    Ok(total)
}

/// Whether `dir` is on a memory-backed filesystem, where disk figures mean
/// nothing.
pub fn on_tmpfs(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return false };
    // SAFETY: statfs fills in the struct it is given.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::statfs(path.as_ptr(), &mut fs) } == 0;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    ok && fs.f_type as i64 == TMPFS_MAGIC
}

/// Latencies of one kind of call, in microseconds.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Latency {
    pub calls: usize,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
}

impl Latency {
    pub fn of(mut micros: Vec<u64>) -> Latency {
        micros.sort_unstable();
        let at = |q: f64| {
            if micros.is_empty() {
                0
            } else {
                micros[((micros.len() as f64 * q).ceil() as usize).clamp(1, micros.len()) - 1]
            }
        };
        Latency { calls: micros.len(), p50_us: at(0.5), p99_us: at(0.99), p999_us: at(0.999) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_ranks() {
        let l = Latency::of((1..=1000).rev().collect());
        assert_eq!((l.calls, l.p50_us, l.p99_us, l.p999_us), (1000, 500, 990, 999));
        let one = Latency::of(vec![7]);
        assert_eq!((one.p50_us, one.p999_us), (7, 7));
        assert_eq!(Latency::of(Vec::new()).calls, 0);
    }

    #[test]
    fn own_process_is_measured() {
        let sample = Process::Own.sample().expect("/proc/self is readable");
        assert!(sample.cpu_seconds >= 0.0);
        assert!(Process::Own.peak_rss().unwrap() > 1 << 20);
    }

    #[test]
    fn a_listening_socket_leads_to_its_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(listener_pid(port), Some(std::process::id()));
        drop(listener);
        assert_eq!(listener_pid(port), None);
    }
}
