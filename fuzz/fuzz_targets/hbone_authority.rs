//! The fields of an HBONE request the server parses itself: `:authority`
//! (`hbone::parse_authority`), `forwarded: for=` (`hbone::forwarded_for`) and
//! `ztunnel-source-port` (`hbone::source_port`).
//!
//! Oracle: no panic; an accepted authority prints back (`hbone::authority`) to text that
//! parses to the same address, as the client side sends it. Replayed by the unit test
//! `hbone::bad_input_tests::fuzz_corpus_replays` — keep the two in step.
#![no_main]

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use ztunnel::hbone::{
    authority, forwarded_for, parse_authority, source_port, HEADER_FORWARDED, HEADER_SOURCE_PORT,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(addr) = parse_authority(text) {
            let again = parse_authority(&authority(addr)).expect("printed authority parses");
            assert_eq!(again, addr);
        }
    }
    // Any bytes h2 would accept as a header value.
    if let Ok(value) = HeaderValue::from_bytes(data) {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_FORWARDED, value.clone());
        headers.insert(HEADER_SOURCE_PORT, value);
        let _ = forwarded_for(&headers);
        let _ = source_port(&headers);
    }
});
