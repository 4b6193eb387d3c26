//! Shared support for the test binaries (`integration`, `restart`) and the
//! benchmarks: `mod common;` at each one's root, then `common::app` (a server per test, on
//! either store, and the dual-store template), `common::pg` (a real
//! PostgreSQL, one database per test), `common::tokens` (JWT keys, tokens,
//! a JWKS server), `common::ws` (a WebSocket client), `common::metrics`
//! (reading `/metrics`), `common::proxy` (a database outage on demand) and
//! `common::process` (the binary as a child process).
#![allow(dead_code, unused_macros)]

pub mod app;
pub mod metrics;
pub mod pg;
pub mod process;
pub mod proxy;
pub mod tokens;
pub mod ws;

/// A loopback port nothing listens on (for a server process to bind).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .unwrap()
        .port()
}

/// A runtime of two workers, as many as the machine has cores: the
/// benchmarks' `main` runs in one.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}
