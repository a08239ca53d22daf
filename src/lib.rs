//! larder: a single-binary REAPI v2 remote build cache on RocksDB.
//!
//! Data flows one way: the faces, [`service`] (gRPC) and [`http`] (REST and
//! Bazel's HTTP cache), validate what clients send and call the [`cache`],
//! which owns the two tiers' policy (read-through, write-through or
//! write-back, the replicator) and calls the [`store`] (the local tier: the
//! only code that knows RocksDB) and the [`objstore`] client (the shared
//! S3 tier). [`server`] wires the faces to listeners and owns the
//! background tasks; [`config`] layers defaults, file, environment and
//! flags. docs/architecture.md has the module map and the path of a call.

pub mod auth;
pub mod budget;
pub mod cache;
pub mod cdc;
pub mod codec;
pub mod compression;
pub mod config;
pub mod crc;
pub mod digest;
pub mod download;
#[cfg(test)]
mod hostile;
pub mod http;
pub mod idle;
pub mod metrics;
pub mod objstore;
pub mod proto;
pub mod server;
pub mod service;
pub mod status;
pub mod store;
/// The bench tool's data generator, for the unit tests (shared as source,
/// not library API).
#[cfg(test)]
#[path = "bench/data.rs"]
#[allow(dead_code)]
mod testdata;
pub mod tls;
