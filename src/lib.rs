//! mana-sync: a sync server for local-first apps.
//!
//! Devices push field-level changes; every change is appended to an
//! immutable log (`change_log`), folded by field-level last-write-wins
//! (`fold`) into a projection (`projection`), and served back as deltas
//! since a gap-free `cursor`.
//!
//! The modules, from the ground up (each imports only from those before it):
//! - leaves: `config`, `metrics`, `telemetry`, `lifecycle` (the stages of
//!   a shutdown, and the signals that start one);
//! - the pure core: `timestamp`, `clock` (the time replicas share), `cursor`, `provenance` (what a change says of itself), `fold`, `protocol` (limits,
//!   wire types and `ErrorCode`, every error code; these derive
//!   poem-openapi's schema traits, so their docs are the OpenAPI schema),
//!   `error` (the domain error), `change_log`, `projection`, `validate`,
//!   `idempotency`, `quota`;
//! - `store`: the PostgreSQL and SQLite dialects behind one contract;
//! - services: `auth` (tokens), `throttle` (per-user rate limits),
//!   `hub` (this replica's subscribers),
//!   `fanout` (NOTIFY/LISTEN between replicas, over the PostgreSQL store),
//!   `sync` (push, pull, rebuild; it announces through `fanout`);
//! - `state`: what every handler shares;
//! - `api`: everything HTTP;
//! - `startup`: runs it all.

pub mod api;
pub mod auth;
pub mod change_log;
pub mod clock;
pub mod config;
pub mod cursor;
pub mod error;
pub mod fanout;
pub mod fold;
pub mod hub;
pub mod idempotency;
pub mod lifecycle;
pub mod metrics;
pub mod projection;
pub mod protocol;
pub mod provenance;
pub mod quota;
pub mod startup;
pub mod state;
pub mod store;
pub mod sync;
pub mod telemetry;
pub mod throttle;
pub mod timestamp;
pub mod validate;
