//! The `Store` contract, run against every backend: SQLite, and Redis when `redis-server` is
//! installed (a real one per test, see `common::redis`). What a store publishes is recorded in
//! order: SQLite's through a started in-memory broker whose handler records what reaches it,
//! Redis's by a plain pub/sub subscription, decoded as a receiving node would.
//!
//! - `support`: the backends under test, the recording of what they publish, append helpers;
//! - `contract`: what every backend does;
//! - `on_redis` and `on_sqlite`: what only one backend does.

#[path = "../common/mod.rs"]
mod common;
mod contract;
mod on_redis;
mod on_sqlite;
mod support;
