//! `cargo xtask layouts`: the end-to-end suites on every testbed layout, not just the
//! default one.
//!
//! `Testbed::new()` builds the layout `TESTBED_LAYOUT` names (tests/src/layout.rs), so a
//! suite written against the default routed layout runs unchanged on ptp, bridged, VXLAN
//! and IPIP nodes. This command runs each chosen suite once per layout and attachment
//! mode, on this machine's kernel, keeps each run's output in
//! `<target>/layouts/<layout>-<mode>/<suite>.log`, and prints one line per run.
//! Suites that build their own layouts (cni, layouts, enrollment) are not parameterised
//! and gain nothing here.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};

use crate::kernels::report::{self, Outcome};

/// The layouts, as tests/src/layout.rs names them (`Layout::name`).
const LAYOUTS: &[&str] = &[
    "routed+direct",
    "ptp+direct",
    "ptp32+direct",
    "bridge+direct",
    "routed+vxlan",
    "bridge+vxlan",
    "routed+ipip",
];

const DEFAULT_SUITES: &str =
    "capture,mesh,faults,sockmap,waypoints,node_proxy,unparsed,bypass,xds,dns";

#[derive(clap::Args)]
pub struct LayoutsArgs {
    /// Layouts: all, or a comma-separated list of routed+direct, ptp+direct, ptp32+direct,
    /// bridge+direct, routed+vxlan, bridge+vxlan, routed+ipip.
    #[arg(long, env = "ZT_LAYOUTS", default_value = "all")]
    layout: String,
    /// End-to-end suites (tests/tests/*.rs) to run on each layout, comma-separated.
    #[arg(long, env = "ZT_LAYOUTS_SUITES", default_value = DEFAULT_SUITES)]
    suite: String,
    /// tc attachment: tcx, legacy, or both (each layout twice).
    #[arg(long, env = "ZT_LAYOUTS_ATTACH", value_enum, default_value = "both")]
    attach: crate::kernels::Attach,
    /// Where each run's output goes (default: <target dir>/layouts).
    #[arg(long, env = "ZT_LAYOUTS_LOGS")]
    logs: Option<PathBuf>,
}

pub fn layouts(args: &LayoutsArgs) -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!("the layout matrix needs root (network namespaces, eBPF): run `sudo -E cargo xtask layouts`");
    }
    let layouts = parse_layouts(&args.layout)?;
    let suites = crate::kernels::parse_suites(&args.suite)?;
    let modes: &[&str] = match args.attach {
        crate::kernels::Attach::Legacy => &["legacy"],
        crate::kernels::Attach::Tcx => &["tcx"],
        crate::kernels::Attach::Both => &["tcx", "legacy"],
    };
    crate::setup::setup()?;
    let exes = crate::kernels::build_tests(&suites)?;
    let target = crate::kernels::target_dir();
    let logs = args.logs.clone().unwrap_or_else(|| target.join("layouts"));
    let ztunnel = target.join("debug/ztunnel");

    let started = Instant::now();
    let mut lines = Vec::new();
    let mut failed = 0;
    for layout in &layouts {
        for mode in modes {
            let dir = logs.join(format!("{}-{mode}", layout.replace('+', "-")));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for suite in &suites {
                let log_path = dir.join(format!("{suite}.log"));
                let log = std::fs::File::create(&log_path)
                    .with_context(|| format!("creating {}", log_path.display()))?;
                let t = Instant::now();
                let status = Command::new(&exes[suite])
                    .env("ZTUNNEL_BIN", &ztunnel)
                    .env("TESTBED_LAYOUT", layout)
                    .env("TC_ATTACH", mode)
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .status()
                    .with_context(|| format!("running the {suite} suite"))?;
                let secs = t.elapsed().as_secs();
                let text = std::fs::read_to_string(&log_path).unwrap_or_default();
                let parsed = report::parse_log(&text);
                let outcome = report::outcome(status.code().unwrap_or(-1), parsed.summary);
                let line = line(layout, mode, suite, &outcome, &parsed, secs);
                println!("{line}");
                if outcome != Outcome::Passed {
                    failed += 1;
                }
                lines.push(line);
            }
        }
    }
    println!(
        "\n== layouts: {} suite runs in {} s; logs in {} ==",
        lines.len(),
        started.elapsed().as_secs(),
        logs.display()
    );
    for l in &lines {
        println!("{l}");
    }
    if failed > 0 {
        bail!("{failed} of {} layout suite runs failed", lines.len());
    }
    Ok(())
}

fn line(
    layout: &str,
    mode: &str,
    suite: &str,
    outcome: &Outcome,
    parsed: &report::Parsed,
    secs: u64,
) -> String {
    let c = parsed.summary.unwrap_or(parsed.counted);
    let mut s = format!(
        "{layout:<14} {mode:<6} {suite:<11} {:<10} {} passed, {} failed, {} ignored  {secs} s",
        outcome.verdict(),
        c.passed,
        c.failed,
        c.ignored
    );
    for (test, msg) in &parsed.failures {
        s.push_str(&format!("\n      failed {test}: {msg}"));
    }
    s
}

fn parse_layouts(arg: &str) -> anyhow::Result<Vec<&'static str>> {
    if arg.trim() == "all" {
        return Ok(LAYOUTS.to_vec());
    }
    arg.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|name| match LAYOUTS.iter().find(|l| **l == name) {
            Some(l) => Ok(*l),
            None => bail!(
                "unknown layout {name:?}: the layouts are {}",
                LAYOUTS.join(", ")
            ),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_by_name_or_all() {
        assert_eq!(parse_layouts("all").unwrap().len(), LAYOUTS.len());
        assert_eq!(
            parse_layouts("ptp+direct, routed+ipip").unwrap(),
            vec!["ptp+direct", "routed+ipip"]
        );
        let e = parse_layouts("ptp").unwrap_err().to_string();
        assert!(e.contains("ptp+direct"), "{e}");
    }
}
