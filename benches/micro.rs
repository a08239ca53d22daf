//! Criterion benchmarks of the steps every blob goes through: digesting,
//! chunk compression, the store's put and get of small and large blobs, and
//! its batch reads.
//!
//!     cargo bench --bench micro

use std::sync::Arc;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use data::{Content, Kind};
use larder::digest::{Digest, Function, FunctionHint};
use larder::store::{NewBlob, Store, StoreOptions, chunk};

/// The bench tool's data generator, shared as source (it is not library API).
#[path = "../src/bench/data.rs"]
#[allow(dead_code)] // a part of it is used here
mod data;

const MIB: usize = 1 << 20;

fn content(kind: Kind, seed: u64, size: usize) -> Vec<u8> {
    Content::new(kind, seed, size as u64).bytes()
}

fn digesting(c: &mut Criterion) {
    let data = content(Kind::Random, 1, MIB);
    let mut group = c.benchmark_group("digest 1 MiB");
    group.throughput(Throughput::Bytes(MIB as u64));
    for function in [Function::Sha256, Function::Blake3, Function::Sha512] {
        group.bench_function(format!("{function:?}"), |b| b.iter(|| function.digest(&data)));
    }
    group.finish();
}

/// Parsing the digests of a FindMissingBlobs call of 1,000 blobs: every
/// digest a client names goes through it.
fn digest_parsing(c: &mut Criterion) {
    let digests: Vec<(String, i64)> =
        (0..1000u32).map(|i| (Digest::of(&i.to_le_bytes()).hex(), i64::from(i))).collect();
    let mut group = c.benchmark_group("parse 1,000 digests");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("sha256", |b| {
        b.iter(|| {
            digests
                .iter()
                .map(|(hash, size)| {
                    Digest::parse(hash, *size, FunctionHint::Given(Function::Sha256)).unwrap()
                })
                .fold(0u64, |n, d| n ^ d.size)
        })
    });
    group.finish();
}

fn chunk_compression(c: &mut Criterion) {
    let mut group = c.benchmark_group("chunk 1 MiB");
    group.throughput(Throughput::Bytes(MIB as u64));
    for kind in [Kind::Binary, Kind::Text, Kind::Random] {
        let data = content(kind, 2, MIB);
        for level in [1, 3] {
            group.bench_function(format!("encode {} zstd {level}", kind.name()), |b| {
                b.iter(|| chunk::encode(&data, level))
            });
        }
        let encoded = chunk::encode(&data, 1);
        group.bench_function(format!("decode {}", kind.name()), |b| b.iter(|| chunk::decode(&encoded)));
    }
    group.finish();
}

fn open_store(dir: &std::path::Path) -> Arc<Store> {
    Arc::new(Store::open(dir, StoreOptions::default()).unwrap())
}

fn store_small(c: &mut Criterion) {
    const BLOB: usize = 4096;
    const BATCH: usize = 100;
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(tmp.path());
    let mut group = c.benchmark_group("store 4 KiB blobs");
    group.throughput(Throughput::Bytes((BLOB * BATCH) as u64));
    let mut seed = 0u64;
    group.bench_function("put_blobs, 100 per batch", |b| {
        b.iter_batched(
            || {
                (0..BATCH)
                    .map(|_| {
                        seed += 1;
                        let data = Bytes::from(content(Kind::Binary, seed, BLOB));
                        NewBlob::new(Digest::of(&data), data)
                    })
                    .collect::<Vec<_>>()
            },
            |blobs| store.put_blobs(&blobs),
            BatchSize::SmallInput,
        )
    });
    let stored: Vec<Digest> =
        (1..=BATCH as u64).map(|s| Digest::of(&content(Kind::Binary, s, BLOB))).collect();
    group.bench_function("read_all, 100 blobs", |b| {
        b.iter(|| stored.iter().map(|d| store.read_all(d).unwrap().unwrap().len()).sum::<usize>())
    });
    group.finish();
}

/// BatchReadBlobs' store step: 400 blobs of 100 B to 64 KiB (the `small`
/// workload's sizes, about 4 MiB a call) read whole from a store of 40,000,
/// flushed to files as a store that has run a while holds them.
fn store_batch_read(c: &mut Criterion) {
    const BLOBS: u64 = 40_000;
    const BATCH: usize = 400;
    let mut group = c.benchmark_group("store batch read");
    group.throughput(Throughput::Elements(BATCH as u64));
    for zstd_level in [0, 1] {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), StoreOptions { zstd_level, ..StoreOptions::default() }).unwrap();
        let mut rng = data::Rng::new(7);
        let mut digests = Vec::new();
        for seeds in (0..BLOBS).collect::<Vec<_>>().chunks(200) {
            let blobs: Vec<NewBlob> = seeds
                .iter()
                .map(|&seed| {
                    let size = rng.log_uniform(100, 64 << 10) as usize;
                    let data = Bytes::from(content(Kind::Binary, seed, size));
                    NewBlob::new(Digest::of(&data), data)
                })
                .collect();
            digests.extend(blobs.iter().map(|b| b.digest));
            for written in store.put_blobs(&blobs) {
                written.unwrap();
            }
        }
        store.flush().unwrap();
        let mut at = 0;
        group.bench_function(
            format!("read_batch, 400 blobs of 100 B-64 KiB, zstd level {zstd_level}"),
            |b| {
                b.iter(|| {
                    at = (at + BATCH * 7) % (digests.len() - BATCH);
                    let read = store.read_batch(&digests[at..at + BATCH], false);
                    read.iter().map(|r| r.as_ref().unwrap().as_ref().unwrap().0.len()).sum::<usize>()
                })
            },
        );
    }
    group.finish();
}

fn store_large(c: &mut Criterion) {
    const SIZE: usize = 16 * MIB;
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(tmp.path());
    let mut group = c.benchmark_group("store 16 MiB blobs");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(SIZE as u64));
    let mut seed = 0u64;
    let chunk_size = store.options().chunk_size;
    group.bench_function("upload in 1 MiB chunks", |b| {
        b.iter_batched(
            || {
                seed += 1;
                let data = content(Kind::Binary, seed, SIZE);
                (Digest::of(&data), data)
            },
            |(digest, data)| {
                let name = format!("uploads/bench/blobs/{}/{}", digest.hex(), digest.size);
                let mut upload = store.begin_upload(&name, digest, 0).unwrap();
                for part in data.chunks(chunk_size) {
                    upload.append(part, None).unwrap();
                }
                upload.finish().unwrap()
            },
            BatchSize::PerIteration,
        )
    });
    let first = Digest::of(&content(Kind::Binary, 1, SIZE));
    group.bench_function("read in chunks", |b| {
        b.iter(|| {
            let blob = store.locate(&first).unwrap().unwrap();
            let mut at = 0;
            while at < SIZE as u64 {
                at += store.read_at(&blob, at).unwrap().len() as u64;
            }
            at
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    digesting,
    digest_parsing,
    chunk_compression,
    store_small,
    store_batch_read,
    store_large
);
criterion_main!(benches);
