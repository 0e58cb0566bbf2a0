//! Replays the fuzz seed corpora of the config parsers (`fuzz/corpus/local_config`,
//! `fuzz/corpus/xds_decode`) through the same entry points and checks as the fuzz targets,
//! so plain `cargo test` covers them; also writes the `xds_decode` seeds.

use std::path::PathBuf;

use prost_types::Any;

use super::convert::{
    address_to_any, authorization_to_any, decode_address, decode_authorization, AddressResource,
};
use super::LocalConfig;
use crate::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use crate::state::StateStore;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}

/// As `fuzz/fuzz_targets/local_config.rs`.
#[test]
fn local_config_corpus_replays() {
    let mut parsed = 0;
    for (path, data) in corpus("local_config") {
        let Ok(src) = std::str::from_utf8(&data) else {
            continue;
        };
        match LocalConfig::from_yaml(src) {
            Ok(config) => {
                config.apply_to(&StateStore::default());
                parsed += 1;
            }
            Err(e) => eprintln!("{}: {e}", path.display()),
        }
    }
    // The seeds are real configs: most must parse, or the fuzzer starts from nothing.
    assert!(parsed >= 3, "only {parsed} seeds parse");
}

/// As `fuzz/fuzz_targets/xds_decode.rs`.
#[test]
fn xds_decode_corpus_replays() {
    let mut decoded = 0;
    for (_, data) in corpus("xds_decode") {
        let any = |type_url: &str| Any {
            type_url: type_url.to_string(),
            value: data.clone(),
        };
        if let Ok(address) = decode_address(&any(ADDRESS_TYPE_URL)) {
            assert_eq!(decode_address(&address_to_any(&address)).unwrap(), address);
            decoded += 1;
        }
        if let Ok(policy) = decode_authorization(&any(AUTHORIZATION_TYPE_URL)) {
            assert_eq!(
                decode_authorization(&authorization_to_any(&policy)).unwrap(),
                policy
            );
            decoded += 1;
        }
    }
    assert!(decoded >= 3, "only {decoded} seeds decode");
}

/// Encodes every resource of the `all-fields.yaml` config seed as the protobuf bytes of
/// an xDS `Any`. Run: `cargo test -p ztunnel --lib write_xds_seeds -- --ignored`.
#[test]
#[ignore = "rewrites fuzz/corpus/xds_decode"]
fn write_xds_seeds() {
    let src = std::fs::read_to_string(corpus_dir("local_config").join("all-fields.yaml")).unwrap();
    let config = LocalConfig::from_yaml(&src).unwrap();
    let dir = corpus_dir("xds_decode");
    std::fs::create_dir_all(&dir).unwrap();
    let mut seeds: Vec<(String, Any)> = Vec::new();
    for w in &config.workloads {
        let any = address_to_any(&AddressResource::Workload(w.clone()));
        seeds.push((format!("workload-{}", w.name), any));
    }
    for s in &config.services {
        let any = address_to_any(&AddressResource::Service(s.clone()));
        seeds.push((format!("service-{}", s.name), any));
    }
    for p in &config.policies {
        seeds.push((format!("authorization-{}", p.name), authorization_to_any(p)));
    }
    for (name, any) in seeds {
        std::fs::write(dir.join(name), any.value).unwrap();
    }
}
