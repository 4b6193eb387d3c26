//! Restarts of the test PostgreSQL. A restart cuts every connection of the
//! process, so these tests have a binary of their own, apart from the
//! integration tests, and take turns ([`one_at_a_time`]).

#[path = "../common/mod.rs"]
mod common;

mod harness;
mod ready;
mod sockets;

/// Held for the whole of a test that restarts the server: another test's
/// restart would cut its connections at a moment it does not expect.
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    TURN.lock().await
}
