#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| drl_fuzz::check_body(data));
