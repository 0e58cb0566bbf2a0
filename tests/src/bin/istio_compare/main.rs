//! `cargo xtask istio-compare`: our ztunnel and Istio's side by side on the same workload
//! file and the same traffic, comparing what tools read from each — `/config_dump`'s keys
//! and value types, the access log's field names, metric and label names — and judging
//! every difference against the exceptions table (`ztunnel_tests::compare::exceptions`).
//!
//! Istio's ztunnel is not part of this repository: `ISTIO_ZTUNNEL` names a binary built
//! by hand. Without it this prints one line and succeeds. Needs root (namespaces, eBPF).
//! Exits 1 when a difference is not explained by the table.

mod istio;
mod observe;
mod scenario;

use std::path::PathBuf;
use std::process::ExitCode;

use ztunnel_tests::compare::{self, exceptions, json_shape, report};

fn main() -> ExitCode {
    let Some(bin) = std::env::var_os("ISTIO_ZTUNNEL")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
    else {
        println!("istio-compare: skipped: no Istio ztunnel binary (set ISTIO_ZTUNNEL)");
        return ExitCode::SUCCESS;
    };
    if !ztunnel_tests::is_root() {
        eprintln!("istio-compare: needs root (network namespaces, eBPF)");
        return ExitCode::FAILURE;
    }
    // Our "connection opened" is a debug line too, as upstream's is.
    std::env::set_var("ZTUNNEL_LOG", "info,access=debug");
    match run(&bin) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("istio-compare: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs both, prints the report; returns how many differences are unexplained.
fn run(bin: &std::path::Path) -> anyhow::Result<usize> {
    let s = scenario::Scenario::new()?;
    let ours = observe::ours(&s)?;
    let theirs = observe::istio(&s, bin)?;
    let dir = s.tb.dir();
    for (who, o) in [("ours", &ours), ("istio", &theirs)] {
        std::fs::write(
            dir.join(format!("{who}-config_dump.json")),
            serde_json::to_string_pretty(&o.config_dump)?,
        )?;
        std::fs::write(dir.join(format!("{who}-metrics.txt")), &o.metrics)?;
    }
    // Upstream's shape, for tests/fixtures/ (CI checks ours against it).
    std::fs::write(
        dir.join("istio-config_dump.shape"),
        json_shape::to_text(&json_shape::shape(&theirs.config_dump, compare::DATA_KEYED)),
    )?;
    let mut findings = compare::config_dump(&theirs.config_dump, &ours.config_dump);
    for message in ["connection opened", "connection complete"] {
        findings.extend(compare::access_log(
            message,
            false,
            &theirs.text_log,
            &ours.text_log,
        ));
        findings.extend(compare::access_log(
            message,
            true,
            &theirs.json_log,
            &ours.json_log,
        ));
    }
    findings.extend(compare::metrics(&theirs.metrics, &ours.metrics));
    let (text, unexplained) = report::render(&findings, exceptions::TABLE);
    println!("{text}");
    println!("(both proxies' dumps and metrics: {})", dir.display());
    Ok(unexplained)
}
