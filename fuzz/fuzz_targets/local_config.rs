//! The standalone config parser (`xds::local::LocalConfig::from_yaml`) on arbitrary text,
//! then the parsed config applied to a state store, as the file watcher does.
//!
//! Oracle: no panic, no hang, bounded memory (YAML aliases can expand exponentially).
//! Replayed by the unit test `xds::corpus_tests` — keep the two in step.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztunnel::state::StateStore;
use ztunnel::xds::LocalConfig;

fuzz_target!(|data: &[u8]| {
    // The file is read with `read_to_string`: non-UTF-8 never reaches the parser.
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    match LocalConfig::from_yaml(src) {
        Ok(config) => config.apply_to(&StateStore::default()),
        Err(e) => drop(e.to_string()),
    }
});
