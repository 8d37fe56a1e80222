#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ringcast_fuzz::rbac_rules(data));
