#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dynamicrafter::fuzzing::submission(data));
