//! Workloads: a seed fixes every blob and every call, planned up front; the
//! plan then runs against a client with some number of concurrent workers.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;

use super::Error;
use super::client::{Blob, Client};
use super::data::{Content, Data, Kind, Rng};
use super::measure::ClientCpu;
use larder::digest::{Digest, Function};
use larder::proto::reapi;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// A Bazel-like build, cold then warm: FindMissingBlobs of inputs,
    /// GetActionResult, outputs uploaded on a miss and downloaded on a hit.
    Build,
    /// ByteStream writes, then reads, of large blobs.
    Large,
    /// BatchUpdateBlobs, then BatchReadBlobs, of 100 B to 64 KiB blobs.
    Small,
    /// Small blobs stored, then FindMissingBlobs of them and as many absent.
    FindMissing,
    /// Successive versions of one large file (--large-size), each with 1 %
    /// of its bytes overwritten or inserted in 10 places, written through
    /// ByteStream, then read: what deduplication saves.
    Versions,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Build => "build",
            Workload::Large => "large",
            Workload::Small => "small",
            Workload::FindMissing => "find-missing",
            Workload::Versions => "versions",
        }
    }
}

/// What to plan.
#[derive(Clone, Debug)]
pub struct Shape {
    pub workload: Workload,
    pub data: Data,
    pub seed: u64,
    /// Logical bytes the write phase stores, about.
    pub bytes: u64,
    /// Warm build: the fraction of actions that miss (changed inputs).
    pub miss_rate: f64,
    /// Size of each blob of the `large` workload.
    pub large_size: u64,
    /// Largest sum of blob sizes in one batch call.
    pub max_batch: u64,
}

/// One unit of a worker's work. Numbers index [`Plan::blobs`].
#[derive(Clone, Debug, PartialEq)]
pub enum Task {
    /// Store the blobs: small ones in batches, others streamed.
    Upload(Vec<u32>),
    /// Read the blobs back and check them.
    Download(Vec<u32>),
    /// Ask which of these are missing: exactly the absent ones must be.
    FindMissing { present: Vec<u32>, absent: Vec<Digest> },
    /// One action of a build. A miss finds and uploads missing inputs, then
    /// uploads its outputs and result; a hit downloads its outputs.
    Action { key: Digest, inputs: Vec<u32>, outputs: Vec<u32>, hit: bool },
}

pub struct Plan {
    pub blobs: Vec<Blob>,
    pub write: Vec<Task>,
    pub read: Vec<Task>,
    max_batch: u64,
}

/// Sizes of build outputs: many small files, some medium, a few large.
pub fn output_size(rng: &mut Rng) -> u64 {
    let r = rng.unit();
    if r < 0.60 {
        rng.log_uniform(100, 16 << 10)
    } else if r < 0.95 {
        rng.log_uniform(16 << 10, 1 << 20)
    } else {
        rng.log_uniform(1 << 20, 32 << 20)
    }
}

/// Sizes of source files and of the `small` workload's blobs.
pub fn small_size(rng: &mut Rng) -> u64 {
    rng.log_uniform(100, 64 << 10)
}

/// Digests looked up per FindMissingBlobs call, half of them present.
const FIND_BATCH: usize = 1000;
/// Each stored blob is looked up this many times by `find-missing`. At
/// four, the lookups of 256 MiB of blobs took a seventh of a second, a
/// window that mostly measured what else the server was doing then (the
/// flush of the writes just made): the yardstick's own figure moved by half
/// from one round to the next.
const FIND_ROUNDS: usize = 16;

struct Planner {
    rng: Rng,
    data: Data,
    contents: Vec<Content>,
}

impl Planner {
    fn blob(&mut self, size: u64) -> u32 {
        let kind = self.data.pick(&mut self.rng);
        let seed = self.rng.next_u64();
        self.contents.push(Content::new(kind, seed, size));
        (self.contents.len() - 1) as u32
    }

    fn size_of(&self, ids: &[u32]) -> u64 {
        ids.iter().map(|&i| self.contents[i as usize].size).sum()
    }

    /// Small blobs up to `bytes`, grouped into batches of at most `max_batch`.
    fn small_batches(&mut self, bytes: u64, max_batch: u64) -> Vec<Vec<u32>> {
        let mut ids = Vec::new();
        let mut total = 0;
        while total < bytes {
            let size = small_size(&mut self.rng);
            ids.push(self.blob(size));
            total += size;
        }
        self.group(ids, max_batch)
    }

    fn group(&self, ids: Vec<u32>, max_batch: u64) -> Vec<Vec<u32>> {
        batches(ids, |&i| self.contents[i as usize].size, max_batch)
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.rng.below(i as u64 + 1) as usize);
        }
    }
}

/// `items` in order, in groups whose sizes sum to at most `max` (an item
/// larger than that alone).
fn batches<T>(items: Vec<T>, size: impl Fn(&T) -> u64, max: u64) -> Vec<Vec<T>> {
    let mut groups: Vec<Vec<T>> = Vec::new();
    let mut sum = 0;
    for item in items {
        let n = size(&item);
        match groups.last_mut() {
            Some(group) if sum + n <= max => group.push(item),
            _ => {
                groups.push(vec![item]);
                sum = 0;
            }
        }
        sum += n;
    }
    groups
}

fn action_key(seed: u64, action: usize, changed: bool) -> Digest {
    Digest::of(
        format!("larder bench {seed} action {action}{}", if changed { " changed" } else { "" }).as_bytes(),
    )
}

impl Plan {
    /// Plans the workload and computes every blob's digest (in parallel).
    pub fn new(shape: &Shape) -> Plan {
        // Each workload and kind of data has blobs of its own under one seed.
        let salt = Digest::of(format!("{} {}", shape.workload.name(), shape.data.name()).as_bytes());
        let seed = shape.seed ^ u64::from_le_bytes(salt.hash()[..8].try_into().expect("8 bytes"));
        let mut p = Planner { rng: Rng::new(seed), data: shape.data, contents: Vec::new() };
        let max_batch = shape.max_batch.max(1);
        let (write, read) = match shape.workload {
            Workload::Large => {
                let count = (shape.bytes / shape.large_size.max(1)).max(1);
                let ids: Vec<u32> = (0..count).map(|_| p.blob(shape.large_size)).collect();
                let mut order = ids.clone();
                p.shuffle(&mut order);
                (
                    ids.into_iter().map(|i| Task::Upload(vec![i])).collect(),
                    order.into_iter().map(|i| Task::Download(vec![i])).collect(),
                )
            }
            Workload::Small => {
                let batches = p.small_batches(shape.bytes, max_batch);
                let mut all: Vec<u32> = batches.iter().flatten().copied().collect();
                p.shuffle(&mut all);
                let reads = p.group(all, max_batch);
                (
                    batches.into_iter().map(Task::Upload).collect(),
                    reads.into_iter().map(Task::Download).collect(),
                )
            }
            Workload::FindMissing => {
                let batches = p.small_batches(shape.bytes, max_batch);
                let stored: Vec<u32> = batches.iter().flatten().copied().collect();
                let lookups = (stored.len() * FIND_ROUNDS).div_ceil(FIND_BATCH / 2).max(4);
                let reads = (0..lookups)
                    .map(|_| Task::FindMissing {
                        present: (0..FIND_BATCH / 2)
                            .map(|_| stored[p.rng.below(stored.len() as u64) as usize])
                            .collect(),
                        absent: (0..FIND_BATCH / 2)
                            .map(|_| {
                                let hash: Vec<u8> =
                                    (0..4).flat_map(|_| p.rng.next_u64().to_le_bytes()).collect();
                                let size = small_size(&mut p.rng);
                                Digest::new(Function::Sha256, &hash, size).expect("a 32-byte hash")
                            })
                            .collect(),
                    })
                    .collect();
                (batches.into_iter().map(Task::Upload).collect(), reads)
            }
            Workload::Versions => {
                let count = (shape.bytes / shape.large_size.max(1)).max(2);
                // One file of mixed content, not one kind per version.
                let kind = match shape.data {
                    Data::Mixed => Kind::Mixed,
                    data => data.pick(&mut p.rng),
                };
                let mut version = Content::new(kind, p.rng.next_u64(), shape.large_size);
                let mut ids = Vec::new();
                for _ in 0..count {
                    p.contents.push(version);
                    ids.push((p.contents.len() - 1) as u32);
                    version = version.next_version();
                }
                (
                    ids.iter().map(|&i| Task::Upload(vec![i])).collect(),
                    ids.into_iter().map(|i| Task::Download(vec![i])).collect(),
                )
            }
            Workload::Build => plan_build(&mut p, shape, seed),
        };
        let digests = digest_all(&p.contents);
        let blobs =
            p.contents.iter().zip(digests).map(|(&content, digest)| Blob { content, digest }).collect();
        Plan { blobs, write, read, max_batch }
    }

    /// Unique logical bytes the plan stores.
    pub fn logical_bytes(&self) -> u64 {
        self.blobs.iter().map(|b| b.digest.size).sum()
    }
}

/// A cold build: every action misses. Then a warm one: the same actions,
/// hits except for `miss_rate` of them, whose inputs changed.
fn plan_build(p: &mut Planner, shape: &Shape, seed: u64) -> (Vec<Task>, Vec<Task>) {
    let mut sources: Vec<u32> = Vec::new();
    let mut cold: Vec<(Vec<u32>, Vec<u32>)> = Vec::new();
    let mut total = 0;
    while total < shape.bytes {
        let mut inputs = Vec::new();
        for _ in 0..3 + p.rng.below(10) {
            // Outputs of actions well before this one, sources new and old.
            let earlier = cold.len().saturating_sub(64);
            if earlier > 0 && p.rng.unit() < 0.2 {
                let outputs = &cold[p.rng.below(earlier as u64) as usize].1;
                inputs.push(outputs[p.rng.below(outputs.len() as u64) as usize]);
            } else if sources.is_empty() || p.rng.unit() < 0.3 {
                let size = small_size(&mut p.rng);
                sources.push(p.blob(size));
                inputs.push(*sources.last().expect("just pushed"));
                total += size;
            } else {
                inputs.push(sources[p.rng.below(sources.len() as u64) as usize]);
            }
        }
        inputs.sort_unstable();
        inputs.dedup();
        let outputs: Vec<u32> = (0..1 + p.rng.below(3))
            .map(|_| {
                let size = output_size(&mut p.rng);
                p.blob(size)
            })
            .collect();
        total += p.size_of(&outputs);
        cold.push((inputs, outputs));
    }
    let mut write = Vec::new();
    let mut read = Vec::new();
    for (i, (inputs, outputs)) in cold.into_iter().enumerate() {
        if p.rng.unit() < shape.miss_rate {
            let changed: Vec<u32> = outputs
                .iter()
                .map(|&o| {
                    let size = p.contents[o as usize].size;
                    p.blob(size)
                })
                .collect();
            let key = action_key(seed, i, true);
            read.push(Task::Action { key, inputs: inputs.clone(), outputs: changed, hit: false });
        } else {
            let key = action_key(seed, i, false);
            read.push(Task::Action { key, inputs: inputs.clone(), outputs: outputs.clone(), hit: true });
        }
        write.push(Task::Action { key: action_key(seed, i, false), inputs, outputs, hit: false });
    }
    (write, read)
}

fn digest_all(contents: &[Content]) -> Vec<Digest> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = contents.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let parts: Vec<_> = contents
            .chunks(per)
            .map(|part| s.spawn(move || part.iter().map(|c| Digest::of(&c.bytes())).collect::<Vec<_>>()))
            .collect();
        parts.into_iter().flat_map(|h| h.join().expect("digesting does not panic")).collect()
    })
}

/// The kinds of call a run times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Call {
    FindMissingBlobs,
    BatchUpdateBlobs,
    BatchReadBlobs,
    Write,
    Read,
    GetActionResult,
    UpdateActionResult,
}

impl Call {
    pub fn name(self) -> &'static str {
        match self {
            Call::FindMissingBlobs => "FindMissingBlobs",
            Call::BatchUpdateBlobs => "BatchUpdateBlobs",
            Call::BatchReadBlobs => "BatchReadBlobs",
            Call::Write => "ByteStream.Write",
            Call::Read => "ByteStream.Read",
            Call::GetActionResult => "GetActionResult",
            Call::UpdateActionResult => "UpdateActionResult",
        }
    }
}

/// What one phase did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub seconds: f64,
    /// Logical bytes sent and received (received bytes all checked).
    pub sent: u64,
    pub received: u64,
    /// Blob-level operations: blobs written or read, digests looked up,
    /// action results fetched or stored.
    pub ops: u64,
    /// Each call and its latency in microseconds.
    pub calls: Vec<(Call, u64)>,
}

impl Outcome {
    fn merge(&mut self, other: Outcome) {
        self.sent += other.sent;
        self.received += other.received;
        self.ops += other.ops;
        self.calls.extend(other.calls);
    }
}

/// Runs tasks with `concurrency` workers; the first error stops them all.
pub async fn run(
    client: &Client,
    plan: &Arc<Plan>,
    write_phase: bool,
    concurrency: usize,
    cpu: &ClientCpu,
    progress: &indicatif::ProgressBar,
) -> Result<Outcome, Error> {
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let mut worker = Worker {
                client: client.clone(),
                plan: Arc::clone(plan),
                cpu: cpu.clone(),
                outcome: Outcome::default(),
            };
            let (next, failed, progress) = (Arc::clone(&next), Arc::clone(&failed), progress.clone());
            tokio::spawn(async move {
                let tasks = if write_phase { &worker.plan.write } else { &worker.plan.read };
                let count = tasks.len();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count || failed.load(Ordering::Relaxed) {
                        return Ok(worker.outcome);
                    }
                    let plan = Arc::clone(&worker.plan);
                    let task = if write_phase { &plan.write[i] } else { &plan.read[i] };
                    if let Err(e) = worker.task(task).await {
                        failed.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                    progress.inc(1);
                }
            })
        })
        .collect();
    let mut total = Outcome::default();
    let mut first_error = None;
    for w in workers {
        match w.await {
            Ok(Ok(outcome)) => total.merge(outcome),
            Ok(Err(e)) => first_error = first_error.or(Some(e)),
            Err(e) => first_error = first_error.or(Some(Error::Call(format!("a bench worker failed: {e}")))),
        }
    }
    total.seconds = start.elapsed().as_secs_f64();
    first_error.map_or(Ok(total), Err)
}

struct Worker {
    client: Client,
    plan: Arc<Plan>,
    cpu: ClientCpu,
    outcome: Outcome,
}

impl Worker {
    async fn timed<T>(&mut self, call: Call, f: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
        let start = Instant::now();
        let out = f.await?;
        self.outcome.calls.push((call, start.elapsed().as_micros() as u64));
        Ok(out)
    }

    fn blobs(&self, ids: &[u32]) -> Vec<Blob> {
        ids.iter().map(|&i| self.plan.blobs[i as usize]).collect()
    }

    /// Whether a blob goes in batches (as clients send those that fit).
    fn batched(&self, blob: &Blob) -> bool {
        blob.digest.size + 1024 <= self.plan.max_batch
    }

    async fn task(&mut self, task: &Task) -> Result<(), Error> {
        match task {
            Task::Upload(ids) => self.upload(self.blobs(ids)).await,
            Task::Download(ids) => self.download(self.blobs(ids)).await,
            Task::FindMissing { present, absent } => {
                let mut digests: Vec<Digest> =
                    present.iter().map(|&i| self.plan.blobs[i as usize].digest).collect();
                digests.extend(absent);
                let n = digests.len() as u64;
                let client = self.client.clone();
                let missing = self.timed(Call::FindMissingBlobs, client.find_missing(digests)).await?;
                self.outcome.ops += n;
                let (got, want): (HashSet<Digest>, HashSet<Digest>) =
                    (missing.into_iter().collect(), absent.iter().copied().collect());
                if got != want {
                    let wrong = got.symmetric_difference(&want).next().expect("the sets differ");
                    let what = if want.contains(wrong) { "present" } else { "missing" };
                    return Err(Error::Verify(format!("FindMissingBlobs called {wrong} {what}")));
                }
                Ok(())
            }
            Task::Action { key, inputs, outputs, hit } => self.action(*key, inputs, outputs, *hit).await,
        }
    }

    /// The blobs clients send in batches, grouped as they would be, and
    /// those they stream.
    fn split(&self, blobs: Vec<Blob>) -> (Vec<Vec<Blob>>, Vec<Blob>) {
        let (small, large): (Vec<Blob>, Vec<Blob>) = blobs.into_iter().partition(|b| self.batched(b));
        (batches(small, |b| b.digest.size, self.plan.max_batch), large)
    }

    async fn upload(&mut self, blobs: Vec<Blob>) -> Result<(), Error> {
        let (batches, large) = self.split(blobs);
        for batch in batches {
            self.batch_update(batch).await?;
        }
        for blob in large {
            let client = self.client.clone();
            let cpu = self.cpu.clone();
            self.timed(Call::Write, client.write(blob, &cpu)).await?;
            self.outcome.sent += blob.digest.size;
            self.outcome.ops += 1;
        }
        Ok(())
    }

    async fn batch_update(&mut self, blobs: Vec<Blob>) -> Result<(), Error> {
        let data: Vec<Bytes> =
            self.cpu.count(|| blobs.iter().map(|b| Bytes::from(b.content.bytes())).collect());
        self.outcome.sent += blobs.iter().map(|b| b.digest.size).sum::<u64>();
        self.outcome.ops += blobs.len() as u64;
        let (client, cpu) = (self.client.clone(), self.cpu.clone());
        self.timed(Call::BatchUpdateBlobs, client.batch_update(blobs, data, &cpu)).await
    }

    async fn download(&mut self, blobs: Vec<Blob>) -> Result<(), Error> {
        let (batches, large) = self.split(blobs);
        for batch in batches {
            self.batch_read(batch).await?;
        }
        for blob in large {
            let (client, cpu) = (self.client.clone(), self.cpu.clone());
            self.outcome.received += self.timed(Call::Read, client.read(blob, &cpu)).await?;
            self.outcome.ops += 1;
        }
        Ok(())
    }

    async fn batch_read(&mut self, blobs: Vec<Blob>) -> Result<(), Error> {
        let n = blobs.len() as u64;
        let (client, cpu) = (self.client.clone(), self.cpu.clone());
        self.outcome.received += self.timed(Call::BatchReadBlobs, client.batch_read(blobs, &cpu)).await?;
        self.outcome.ops += n;
        Ok(())
    }

    async fn find_missing(&mut self, ids: &[u32]) -> Result<Vec<Blob>, Error> {
        let blobs = self.blobs(ids);
        let client = self.client.clone();
        let digests = blobs.iter().map(|b| b.digest).collect();
        let missing: HashSet<Digest> =
            self.timed(Call::FindMissingBlobs, client.find_missing(digests)).await?.into_iter().collect();
        self.outcome.ops += blobs.len() as u64;
        Ok(blobs.into_iter().filter(|b| missing.contains(&b.digest)).collect())
    }

    async fn action(&mut self, key: Digest, inputs: &[u32], outputs: &[u32], hit: bool) -> Result<(), Error> {
        let expected = action_result(&self.blobs(outputs));
        if !hit {
            let missing = self.find_missing(inputs).await?;
            self.upload(missing).await?;
        }
        let client = self.client.clone();
        let found = self.timed(Call::GetActionResult, client.get_action_result(key)).await?;
        self.outcome.ops += 1;
        match (hit, found) {
            (true, Some(result)) if result == expected => self.download(self.blobs(outputs)).await,
            (true, Some(_)) => {
                Err(Error::Verify(format!("the action result of {key} differs from the one stored")))
            }
            (true, None) => Err(Error::Verify(format!("the action result of {key} is missing"))),
            (false, Some(_)) => Err(Error::Setup(format!(
                "action {key} is already cached: the target holds this workload's data from an earlier run; use another --seed, or a fresh target"
            ))),
            (false, None) => {
                let missing = self.find_missing(outputs).await?;
                self.upload(missing).await?;
                let client = self.client.clone();
                self.timed(Call::UpdateActionResult, client.update_action_result(key, expected)).await?;
                self.outcome.ops += 1;
                Ok(())
            }
        }
    }
}

/// The result a build action stores: its outputs, exit code 0.
fn action_result(outputs: &[Blob]) -> reapi::ActionResult {
    reapi::ActionResult {
        output_files: outputs
            .iter()
            .enumerate()
            .map(|(i, b)| reapi::OutputFile {
                path: format!("out/{i}"),
                digest: Some(b.digest.to_proto()),
                ..Default::default()
            })
            .collect(),
        exit_code: 0,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(workload: Workload, seed: u64) -> Shape {
        Shape {
            workload,
            data: Data::Mixed,
            seed,
            bytes: 8 << 20,
            miss_rate: 0.1,
            large_size: 1 << 20,
            max_batch: 4 << 20,
        }
    }

    #[test]
    fn a_seed_fixes_the_whole_plan() {
        for w in [Workload::Build, Workload::Large, Workload::Small, Workload::FindMissing] {
            let (a, b, c) = (Plan::new(&shape(w, 1)), Plan::new(&shape(w, 1)), Plan::new(&shape(w, 2)));
            let digests = |p: &Plan| p.blobs.iter().map(|b| b.digest).collect::<Vec<_>>();
            assert_eq!(digests(&a), digests(&b), "{w:?}");
            assert_eq!((&a.write, &a.read), (&b.write, &b.read), "{w:?}");
            assert_ne!(digests(&a), digests(&c), "{w:?} with another seed");
            assert!(a.logical_bytes() >= 8 << 20, "{w:?} stores what it was asked to");
        }
    }

    #[test]
    fn build_output_sizes_are_mostly_small_with_a_few_large() {
        let mut rng = Rng::new(4);
        let sizes: Vec<u64> = (0..100_000).map(|_| output_size(&mut rng)).collect();
        let share = |f: &dyn Fn(u64) -> bool| sizes.iter().filter(|&&s| f(s)).count() as f64 / 1e5;
        assert!((0.59..0.61).contains(&share(&|s| s <= 16 << 10)));
        assert!((0.045..0.055).contains(&share(&|s| s > 1 << 20)));
        assert!(sizes.iter().all(|&s| (100..=32 << 20).contains(&s)));
    }

    #[test]
    fn workloads_have_their_shapes() {
        let large = Plan::new(&shape(Workload::Large, 3));
        assert_eq!(large.blobs.len(), 8);
        assert!(large.blobs.iter().all(|b| b.digest.size == 1 << 20));

        let small = Plan::new(&shape(Workload::Small, 3));
        assert!(small.blobs.iter().all(|b| (100..=64 << 10).contains(&b.digest.size)));
        for tasks in [&small.write, &small.read] {
            let mut seen: Vec<u32> = tasks
                .iter()
                .flat_map(|t| match t {
                    Task::Upload(ids) | Task::Download(ids) => {
                        let sum: u64 = ids.iter().map(|&i| small.blobs[i as usize].digest.size).sum();
                        assert!(sum <= 4 << 20, "a batch of {sum} bytes");
                        ids.clone()
                    }
                    other => panic!("unexpected {other:?}"),
                })
                .collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..small.blobs.len() as u32).collect::<Vec<_>>(), "each blob once");
        }

        let find = Plan::new(&shape(Workload::FindMissing, 3));
        let looked_up: usize = find
            .read
            .iter()
            .map(|t| match t {
                Task::FindMissing { present, absent } => {
                    assert_eq!((present.len(), absent.len()), (FIND_BATCH / 2, FIND_BATCH / 2));
                    present.len()
                }
                other => panic!("unexpected {other:?}"),
            })
            .sum();
        assert!(looked_up >= find.blobs.len() * FIND_ROUNDS);
    }

    #[test]
    fn a_warm_build_misses_at_its_rate() {
        let plan = Plan::new(&Shape { bytes: 256 << 20, miss_rate: 0.25, ..shape(Workload::Build, 5) });
        assert!(plan.write.iter().all(|t| matches!(t, Task::Action { hit: false, .. })));
        let misses = plan.read.iter().filter(|t| matches!(t, Task::Action { hit: false, .. })).count();
        let rate = misses as f64 / plan.read.len() as f64;
        assert!(plan.read.len() > 200, "{} actions", plan.read.len());
        assert!((0.18..0.32).contains(&rate), "miss rate {rate}");
        // A hit is the cold action itself; a miss has a new key and outputs.
        for (cold, warm) in plan.write.iter().zip(&plan.read) {
            let (Task::Action { key: k1, outputs: o1, .. }, Task::Action { key: k2, outputs: o2, hit, .. }) =
                (cold, warm)
            else {
                panic!("build tasks are actions");
            };
            assert_eq!(*hit, k1 == k2);
            assert_eq!(*hit, o1 == o2);
        }
    }
}
