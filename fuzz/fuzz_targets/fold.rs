//! Any bytes as a history of field changes to a few records, folded in
//! several orders (see `checks::history` for the encoding and
//! `checks::fold_history` for what is checked).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)] // each target uses its own checks
#[path = "../checks.rs"]
mod checks;

fuzz_target!(|history: &[u8]| {
    checks::fold_history(history);
});
