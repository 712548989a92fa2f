#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vstor_fuzz::dtl_codec::check(data));
