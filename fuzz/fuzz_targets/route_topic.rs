#![no_main]
//! Differential fuzzing of `Router::match_topic` against a naive matcher written from the
//! documented pattern rules; see `checks::check_route` for the input format.

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

fuzz_target!(|input: &[u8]| checks::check_route(input));
