//! libFuzzer entry of [`fuzz_targets::Target::Envelope`]; the body is shared with the smoke tests.
#![no_main]

fuzz_targets::limit_memory!();

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::Target::Envelope.run(data));
