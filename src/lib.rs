//! larder: a single-binary REAPI v2 remote build cache on RocksDB.
//!
//! Data flows one way: [`service`] (thin gRPC adapters) → [`store`] (the
//! RocksDB layout) → RocksDB. [`server`] wires the services to a listener;
//! [`config`] layers defaults, file, environment and flags; [`eviction`]
//! keeps the data directory under its size budget.

pub mod auth;
pub mod budget;
pub mod cache;
pub mod codec;
pub mod compression;
pub mod config;
pub mod digest;
pub mod eviction;
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
