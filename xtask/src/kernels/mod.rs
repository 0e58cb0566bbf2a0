//! `cargo xtask kernels`: the end-to-end suites on the kernels nodes run, not just this
//! machine's.
//!
//! Each kernel is one of Debian's own packages (5.10 from bullseye, 6.1 from bookworm,
//! 6.12 from trixie), booted under QEMU with this machine's root filesystem read-only over
//! virtio-9p (under a tmpfs overlay), so the test binaries built here run inside as they
//! are. One guest per kernel and attachment mode runs the chosen suites one after another
//! and leaves each suite's output in the log directory; this side prints one line per
//! kernel and suite and fails if any suite did.

mod fetch;
mod guest;
pub(crate) mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::run;
use report::SuiteResult;

/// The kernel series this command knows: where Debian keeps each, and whether it has TCX
/// links (6.6 and later).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Series {
    pub name: &'static str,
    pub codename: &'static str,
    pub tcx: bool,
}

pub const SERIES: &[Series] = &[
    Series {
        name: "5.10",
        codename: "bullseye",
        tcx: false,
    },
    Series {
        name: "6.1",
        codename: "bookworm",
        tcx: false,
    },
    Series {
        name: "6.12",
        codename: "trixie",
        tcx: true,
    },
];

const DEFAULT_SUITES: &str = "capture,mesh,cni,faults,node_proxy,bypass,dns";
/// What CI runs on every submission: the kernels most nodes run that lack TCX.
const SMOKE_KERNELS: &str = "5.10,6.1";
const SMOKE_SUITES: &str = "capture,mesh,dns";

#[derive(clap::Args)]
pub struct KernelsArgs {
    /// Kernels to boot: 5.10, 6.1, 6.12 or all (comma-separated list allowed).
    #[arg(long, env = "ZT_KERNELS", default_value = "all")]
    kernel: String,
    /// End-to-end suites (tests/tests/*.rs) to run in each guest, comma-separated.
    #[arg(long, env = "ZT_KERNELS_SUITES", default_value = DEFAULT_SUITES)]
    suite: String,
    /// tc attachment: legacy (clsact + cls_bpf) on every kernel, tcx where the kernel has it
    /// (6.6+), or both (legacy everywhere, plus tcx where it exists).
    #[arg(long, env = "ZT_KERNELS_ATTACH", value_enum, default_value = "both")]
    attach: Attach,
    /// The CI smoke: capture, mesh and dns on 5.10 and 6.1, legacy; overrides the three above.
    #[arg(long)]
    smoke: bool,
    /// QEMU accelerator. Default tcg: nested KVM on the machines this was built on hangs
    /// right after the kernel decompresses; pass kvm where it works (several times faster).
    #[arg(long, env = "ZT_KERNELS_ACCEL", value_enum, default_value = "tcg")]
    accel: Accel,
    /// Multiplies the tests' waits and timeouts (ZT_TEST_TIME_SCALE inside the guest):
    /// TCG runs 10-35x slower than native. Default: 10 under tcg, 1 under kvm.
    #[arg(long, env = "ZT_TEST_TIME_SCALE", value_parser = clap::value_parser!(u32).range(1..=1000))]
    time_scale: Option<u32>,
    /// Longest one suite may run inside the guest, in seconds.
    #[arg(long, env = "ZT_KERNELS_SUITE_TIMEOUT", default_value_t = 1200)]
    suite_timeout: u64,
    /// Guest memory in MiB.
    #[arg(long, env = "ZT_KERNELS_MEM", default_value_t = 3072)]
    mem: u32,
    /// Where the kernel packages, their apt state and the unpacked kernels are kept.
    #[arg(
        long,
        env = "ZT_KERNELS_CACHE",
        default_value = "/var/cache/zt-kernels"
    )]
    cache: PathBuf,
    /// Where console logs and each suite's output go (default: <target dir>/kernels).
    #[arg(long, env = "ZT_KERNELS_LOGS")]
    logs: Option<PathBuf>,
    /// Instead of running suites: an interactive shell in the (first) kernel's guest on
    /// this terminal (Ctrl-A x quits).
    #[arg(long)]
    shell: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Attach {
    Legacy,
    Tcx,
    Both,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    Tcg,
    Kvm,
}

impl Accel {
    /// QEMU's name for it (`-accel`).
    pub fn name(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

/// One guest boot: a kernel, an attachment mode, the suites it runs.
#[derive(Debug, PartialEq, Eq)]
pub struct Boot {
    pub series: Series,
    pub mode: &'static str,
}

pub fn kernels(args: &KernelsArgs) -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!("booting kernels needs root (apt, and the guest reads every file of this root over 9p): run `sudo -E cargo xtask kernels`");
    }
    let (kernel, suite, attach) = if args.smoke {
        (SMOKE_KERNELS, SMOKE_SUITES, Attach::Legacy)
    } else {
        (args.kernel.as_str(), args.suite.as_str(), args.attach)
    };
    let series = parse_kernels(kernel)?;
    let suites = parse_suites(suite)?;
    let boots = plan(&series, attach);
    if boots.is_empty() {
        bail!("--attach tcx: none of {kernel} has TCX links (6.6 and later)");
    }
    let time_scale = args.time_scale.unwrap_or(match args.accel {
        Accel::Tcg => 10,
        Accel::Kvm => 1,
    });

    crate::setup::setup()?;
    fetch::install_host_packages()?;
    let target = target_dir();
    let logs = args.logs.clone().unwrap_or_else(|| target.join("kernels"));
    let mut kernels = BTreeMap::new();
    for s in &series {
        kernels.insert(s.name, fetch::kernel(&args.cache, s)?);
    }
    let vm = guest::Vm {
        accel: args.accel,
        mem: args.mem,
    };
    if args.shell {
        let k = &kernels[series[0].name];
        return vm.shell(k, &logs.join("shell"));
    }

    let exes = build_tests(&suites)?;
    let ztunnel = target.join("debug/ztunnel");
    let started = std::time::Instant::now();
    let mut results: Vec<SuiteResult> = Vec::new();
    for b in &boots {
        let k = &kernels[b.series.name];
        let dir = logs.join(format!("{}-{}", b.series.name, b.mode));
        let run = guest::Run {
            kernel: k,
            mode: b.mode,
            suites: suites
                .iter()
                .map(|s| (s.clone(), exes[s].clone()))
                .collect(),
            ztunnel: ztunnel.clone(),
            time_scale,
            suite_timeout: args.suite_timeout,
        };
        results.extend(vm.run(&run, &dir)?);
    }
    println!(
        "\n== kernels: {} suite runs in {} s ({}, time scale {time_scale}); logs in {} ==",
        results.len(),
        started.elapsed().as_secs(),
        args.accel.name(),
        logs.display()
    );
    for r in &results {
        println!("{}", r.line());
    }
    let failed = results.iter().filter(|r| !r.passed()).count();
    if failed > 0 {
        bail!("{failed} of {} kernel suite runs failed", results.len());
    }
    Ok(())
}

/// Which guests to boot: legacy on every kernel, TCX only where the kernel has it.
pub fn plan(series: &[Series], attach: Attach) -> Vec<Boot> {
    let mut boots = Vec::new();
    for &s in series {
        if attach != Attach::Tcx {
            boots.push(Boot {
                series: s,
                mode: "legacy",
            });
        }
        if attach != Attach::Legacy && s.tcx {
            boots.push(Boot {
                series: s,
                mode: "tcx",
            });
        }
    }
    boots
}

pub fn parse_kernels(arg: &str) -> anyhow::Result<Vec<Series>> {
    if arg.trim() == "all" {
        return Ok(SERIES.to_vec());
    }
    let mut out = Vec::new();
    for name in arg.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let Some(s) = SERIES.iter().find(|s| s.name == name) else {
            let known: Vec<&str> = SERIES.iter().map(|s| s.name).collect();
            bail!(
                "unknown kernel {name:?}: expected all or any of {}",
                known.join(", ")
            );
        };
        if !out.contains(s) {
            out.push(*s);
        }
    }
    if out.is_empty() {
        bail!("--kernel names no kernel");
    }
    Ok(out)
}

pub(crate) fn parse_suites(arg: &str) -> anyhow::Result<Vec<String>> {
    let suites: Vec<String> = arg
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if suites.is_empty() {
        bail!("--suite names no suite");
    }
    Ok(suites)
}

/// Builds ztunnel and the end-to-end test executables here; returns each suite's executable.
/// The whole workspace, as `cargo xtask test` builds it: with `-p` the features of shared
/// dependencies differ, and CI, which runs the smoke right after the tests, would build
/// ztunnel and much of its dependencies a second time.
pub(crate) fn build_tests(suites: &[String]) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    run(Command::new("cargo").args(["build", "--workspace", "--bins"]))?;
    let out = Command::new("cargo")
        .args(["test", "--workspace", "--no-run", "--message-format=json"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the end-to-end tests failed");
    }
    let all = test_executables(&String::from_utf8_lossy(&out.stdout));
    suites
        .iter()
        .map(|s| match all.get(s) {
            Some(p) => Ok((s.clone(), p.clone())),
            None => bail!(
                "no suite {s:?}: the end-to-end suites are {}",
                all.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        })
        .collect()
}

/// The end-to-end suites' executables (ztunnel-tests' `--test` targets), by name, from
/// cargo's JSON messages.
fn test_executables(cargo_json: &str) -> BTreeMap<String, PathBuf> {
    cargo_json
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter(|m| {
            m["package_id"]
                .as_str()
                .is_some_and(|p| p.contains("#ztunnel-tests@"))
        })
        .filter(|m| {
            m["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"))
        })
        .filter_map(|m| {
            let name = m["target"]["name"].as_str()?.to_string();
            let exe = m["executable"].as_str()?;
            Some((name, PathBuf::from(exe)))
        })
        .collect()
}

/// The target directory, honouring CARGO_TARGET_DIR as cargo does.
pub(crate) fn target_dir() -> PathBuf {
    let root = crate::workspace_root();
    std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| root.join(d))
        .unwrap_or_else(|| root.join("target"))
}

/// This workspace's guest-side scripts (xtask/guest/).
fn guest_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("guest")
        .join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(boots: &[Boot]) -> Vec<String> {
        boots
            .iter()
            .map(|b| format!("{}-{}", b.series.name, b.mode))
            .collect()
    }

    #[test]
    fn plans_tcx_only_where_the_kernel_has_it() {
        let all = SERIES.to_vec();
        let cases: &[(Attach, &[&str])] = &[
            (
                Attach::Legacy,
                &["5.10-legacy", "6.1-legacy", "6.12-legacy"],
            ),
            (Attach::Tcx, &["6.12-tcx"]),
            (
                Attach::Both,
                &["5.10-legacy", "6.1-legacy", "6.12-legacy", "6.12-tcx"],
            ),
        ];
        for (attach, want) in cases {
            assert_eq!(names(&plan(&all, *attach)), *want, "{attach:?}");
        }
        assert!(plan(&all[..2], Attach::Tcx).is_empty());
    }

    #[test]
    fn parses_kernel_lists() {
        let n = |a: &str| {
            parse_kernels(a).map(|v| v.iter().map(|s| s.name).collect::<Vec<_>>().join(","))
        };
        assert_eq!(n("all").unwrap(), "5.10,6.1,6.12");
        assert_eq!(n("6.1").unwrap(), "6.1");
        assert_eq!(n("6.12, 5.10,6.12").unwrap(), "6.12,5.10");
        assert!(n("5.15")
            .unwrap_err()
            .to_string()
            .contains("unknown kernel"));
        assert!(n("6").is_err());
        assert!(n(",").is_err());
    }

    #[test]
    fn finds_test_executables_in_cargo_messages() {
        let json = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#ztunnel-tests@0.1.0","target":{"kind":["lib"],"name":"ztunnel_tests"},"executable":null}
{"reason":"compiler-artifact","package_id":"path+file:///w/tests#ztunnel-tests@0.1.0","target":{"kind":["test"],"name":"capture"},"executable":"/t/debug/deps/capture-abc"}
{"reason":"compiler-artifact","package_id":"path+file:///w/other#other@0.1.0","target":{"kind":["test"],"name":"mesh"},"executable":"/t/debug/deps/mesh-abc"}
{"reason":"compiler-artifact","package_id":"path+file:///w/tests#ztunnel-tests@0.1.0","target":{"kind":["bin"],"name":"demo"},"executable":"/t/debug/demo"}
not json
{"reason":"build-finished","success":true}"#;
        let got = test_executables(json);
        assert_eq!(got.len(), 1);
        assert_eq!(got["capture"], PathBuf::from("/t/debug/deps/capture-abc"));
    }
}
