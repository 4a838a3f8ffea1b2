//! See `entity_fabric::fuzzing::snapshot_file`.
#![no_main]

libfuzzer_sys::fuzz_target!(init: entity_fabric::fuzzing::init(), |data: &[u8]| entity_fabric::fuzzing::snapshot_file(data));
