//! The built capture object against the names user space uses: the maps it defines are
//! exactly `maps::ALL` (plus aya-log's), and its TC programs are `CAPTURE_PROGRAM` and `LAST_HOP_PROGRAM`.

use std::collections::BTreeSet;

use aya_obj::{EbpfSectionKind, Object, ProgramSection};
use ztunnel_ebpf_common::{maps, CAPTURE_PROGRAM, LAST_HOP_PROGRAM};

use super::CAPTURE_OBJECT;

/// The ring buffer aya-log's macros write the program's log records to
/// (`aya_log_ebpf::macro_support::AYA_LOGS`; `aya_log::EbpfLogger` opens it by this name).
const AYA_LOG_MAP: &str = "AYA_LOGS";

fn object() -> Object {
    Object::parse(CAPTURE_OBJECT).expect("the capture object parses")
}

#[test]
fn defines_exactly_the_shared_maps() {
    let obj = object();
    let defined: BTreeSet<&str> = obj
        .maps
        .iter()
        .filter(|(_, m)| {
            matches!(
                m.section_kind(),
                EbpfSectionKind::Maps | EbpfSectionKind::BtfMaps
            )
        })
        .map(|(name, _)| name.as_str())
        .collect();
    let mut expected: BTreeSet<&str> = maps::ALL.iter().copied().collect();
    assert_eq!(expected.len(), maps::ALL.len(), "a name twice in maps::ALL");
    expected.insert(AYA_LOG_MAP);
    assert_eq!(defined, expected);
}

#[test]
fn other_maps_are_only_data_sections() {
    // Globals (aya-log's level, string constants) become maps named after their sections;
    // anything else would be a map user space does not know.
    for (name, m) in &object().maps {
        match m.section_kind() {
            EbpfSectionKind::Maps | EbpfSectionKind::BtfMaps => {}
            EbpfSectionKind::Data | EbpfSectionKind::Rodata | EbpfSectionKind::Bss => {
                assert!(name.starts_with('.'), "data map {name}");
            }
            other => panic!("map {name} in a {other:?} section"),
        }
    }
}

#[test]
fn has_the_tc_programs() {
    let obj = object();
    let names: Vec<&String> = obj.programs.keys().collect();
    for name in [CAPTURE_PROGRAM, LAST_HOP_PROGRAM] {
        let prog = obj
            .programs
            .get(name)
            .unwrap_or_else(|| panic!("{name} not among {names:?}"));
        assert!(
            matches!(prog.section, ProgramSection::SchedClassifier),
            "{name} is a {:?}",
            prog.section
        );
    }
}

#[test]
fn has_the_sockmap_programs() {
    let obj = object();
    let ops = obj
        .programs
        .get(ztunnel_ebpf_common::SOCKOPS_PROGRAM)
        .expect("the sock_ops program");
    assert!(
        matches!(ops.section, ProgramSection::SockOps),
        "{:?}",
        ops.section
    );
    let msg = obj
        .programs
        .get(ztunnel_ebpf_common::SKMSG_PROGRAM)
        .expect("the sk_msg program");
    assert!(
        matches!(msg.section, ProgramSection::SkMsg),
        "{:?}",
        msg.section
    );
}
