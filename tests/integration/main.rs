//! The integration tests: one binary, a module per area. Each test starts
//! its own server (in this process, on either store, see `common::app`) or
//! the built binary as a child process; all of them share one throwaway
//! PostgreSQL (`common::pg`). Run one area with
//! `cargo test --test integration sync::`.

#[path = "../common/mod.rs"]
mod common;

mod auth;
mod balanced;
mod cli;
mod clients;
mod concurrency;
mod connections;
mod deploy;
mod early_answers;
mod fidelity;
mod fuzz_regressions;
mod harness;
mod http;
mod isolation;
mod k8s;
mod k8s_exposure;
mod later_clients;
mod local_mode;
mod measure_bounds;
mod metrics;
mod outage;
mod plans;
mod python_client;
mod quiet_pulls;
mod realtime;
mod rebuild;
mod resources;
mod schemathesis;
mod shares;
mod socket_bounds;
mod storage;
mod stream;
mod sync;
mod throttle;
mod tracing;
mod user_data;
mod validation;
mod zero_config;
