#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| drl_fuzz::resp_frame(data));
