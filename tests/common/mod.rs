//! Shared support for the integration tests: `mod common;` in each test
//! binary, then `common::pg` (a real PostgreSQL, one database per test) and
//! `common::tokens` (JWT keys, tokens, a JWKS server).
#![allow(dead_code)]

pub mod app;
pub mod metrics;
pub mod pg;
pub mod tokens;
pub mod ws;
