//! mana-sync: a sync server for local-first apps.
//!
//! Devices push field-level changes; every change is appended to an
//! immutable log (`change_log`), folded by field-level last-write-wins
//! (`fold`) into a projection (`projection`), and served back as deltas
//! since a gap-free `cursor`.

pub mod api;
pub mod auth;
pub mod change_log;
pub mod config;
pub mod cursor;
pub mod error;
pub mod fanout;
pub mod fold;
pub mod hub;
pub mod idempotency;
pub mod listener;
pub mod local_auth;
pub mod metrics;
pub mod projection;
pub mod protocol;
pub mod realtime;
pub mod startup;
pub mod store;
pub mod stream;
pub mod sync;
pub mod telemetry;
pub mod timestamp;
pub mod validate;
