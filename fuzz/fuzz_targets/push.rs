//! Any bytes as a push body: parsed and validated as `POST /sync/{appId}`
//! does (see `checks::push`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)] // each target uses its own checks
#[path = "../checks.rs"]
mod checks;

fuzz_target!(|body: &[u8]| {
    checks::push(body);
});
