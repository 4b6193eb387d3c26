//! `sqlx::migrate!` embeds `migrations/` at compile time, but cargo does
//! not know the macro reads that folder: without this, a migration added
//! to it leaves the binary with the old set until something else changes.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
