#![no_main]
//! Arbitrary bytes as the body of a message, through `courier::event::parse` in every format
//! and from every transport; see `checks::check_parse` for what must hold.

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

fuzz_target!(|body: &[u8]| checks::check_parse(body));
