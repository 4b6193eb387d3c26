//! Any string as an RFC 3339 timestamp (see `checks::timestamp`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)] // each target uses its own checks
#[path = "../checks.rs"]
mod checks;

fuzz_target!(|text: &[u8]| {
    checks::timestamp(text);
});
