//! One QEMU guest: boots a kernel with this machine's root, runs suites, reports each.
//!
//! The guest's side is three scripts in xtask/guest/: `init` (initramfs: 9p root under a
//! tmpfs overlay), `stage2.sh` (PID 1: mounts, modules, then /mnt/run.sh, then power off)
//! and `suite.sh` (one suite, its output and its exit status into /mnt). /mnt in the guest
//! is the run's log directory here, so each suite's result is read as soon as it lands.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::fetch::Kernel;
use super::report::{Outcome, SuiteResult};
use super::Accel;

pub struct Vm {
    pub accel: Accel,
    pub mem: u32,
}

/// What one guest runs.
pub struct Run<'a> {
    pub kernel: &'a Kernel,
    pub mode: &'static str,
    /// (suite name, test executable built here)
    pub suites: Vec<(String, PathBuf)>,
    pub ztunnel: PathBuf,
    pub time_scale: u32,
    pub suite_timeout: u64,
}

/// Booting and reaching the command takes seconds under TCG; the margin is generous so a
/// slow machine does not lose a run that was about to finish.
const BOOT_MARGIN: Duration = Duration::from_secs(180);

impl Vm {
    pub fn run(&self, run: &Run, dir: &Path) -> anyhow::Result<Vec<SuiteResult>> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("run.sh"), run_script(run))?;
        let console = dir.join("console.log");
        let k = run.kernel;
        eprintln!(
            "kernels: booting {} ({}) under {}, {}: {}; console in {}",
            k.release,
            k.version,
            self.accel.name(),
            run.mode,
            run.suites
                .iter()
                .map(|(s, _)| s.as_str())
                .collect::<Vec<_>>()
                .join(" "),
            console.display()
        );
        let started = Instant::now();
        let mut qemu = self
            .qemu(k, dir)
            .arg("-display")
            .arg("none")
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.stderr"))?)
            .spawn()
            .context("starting qemu-system-x86_64")?;
        let limit =
            BOOT_MARGIN + Duration::from_secs((run.suite_timeout + 15) * run.suites.len() as u64);
        let mut results: Vec<Option<SuiteResult>> = vec![None; run.suites.len()];
        // Suites are timed by this machine's clock, from NAME.started to NAME.status (to
        // the second): the guest's own clock is only as good as its emulated timer.
        let mut began: Vec<Option<Instant>> = vec![None; run.suites.len()];
        let timed_out = wait(&mut qemu, started + limit, || {
            for (i, (name, _)) in run.suites.iter().enumerate() {
                if began[i].is_none() && dir.join(format!("{name}.started")).exists() {
                    began[i] = Some(Instant::now());
                    if i == 0 {
                        eprintln!("kernels: guest up after {} s", started.elapsed().as_secs());
                    }
                }
                if results[i].is_none() {
                    if let Some(mut r) = SuiteResult::read(k, run.mode, name, dir) {
                        if let Some(b) = began[i] {
                            r.secs = b.elapsed().as_secs();
                        }
                        eprintln!("{}", r.line());
                        results[i] = Some(r);
                    }
                }
            }
        })?;
        eprintln!(
            "kernels: guest done after {} s",
            started.elapsed().as_secs()
        );
        let console_text = std::fs::read_to_string(&console).unwrap_or_default();
        let why = if timed_out {
            format!("guest stopped after {} s", limit.as_secs())
        } else {
            guest_end(&console_text)
        };
        Ok(run
            .suites
            .iter()
            .zip(results)
            .map(|((name, _), r)| {
                r.unwrap_or_else(|| {
                    SuiteResult::missing(k, run.mode, name, Outcome::NoResult(why.clone()))
                })
            })
            .collect())
    }

    /// An interactive shell on this terminal: no run.sh in `dir`, so stage2 starts one.
    pub fn shell(&self, k: &Kernel, dir: &Path) -> anyhow::Result<()> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        eprintln!(
            "kernels: {} ({}); {} is /mnt inside; Ctrl-A x quits",
            k.release,
            k.version,
            dir.display()
        );
        crate::run(
            self.qemu(k, dir)
                .args(["-display", "none", "-serial", "mon:stdio"]),
        )
    }

    fn qemu(&self, k: &Kernel, out: &Path) -> Command {
        let accel = self.accel.name();
        let append = format!(
            "console=ttyS0 panic=-1 quiet loglevel=4 mitigations=off zstage2={}",
            super::guest_file("stage2.sh").display()
        );
        let share = |id: &str, path: &Path, tag: &str, extra: &str| {
            [
                "-fsdev".to_string(),
                format!(
                    "local,id={id},path={},security_model=none{extra}",
                    path.display()
                ),
                "-device".to_string(),
                format!("virtio-9p-pci,fsdev={id},mount_tag={tag}"),
            ]
        };
        let mut c = Command::new("qemu-system-x86_64");
        // No 5-level paging: under TCG with Debian 12's QEMU (7.2) and `max`, 6.12 took a
        // double fault in its first seconds (once); with la57 off it has booted every time.
        c.args(["-accel", accel, "-cpu", "max,la57=off", "-smp", "1"])
            .args(["-m", &self.mem.to_string()])
            .args(["-nodefaults", "-no-reboot"])
            .arg("-kernel")
            .arg(k.vmlinuz())
            .arg("-initrd")
            .arg(&k.initrd)
            .args(["-append", &append])
            .args(share(
                "r",
                Path::new("/"),
                "hostroot",
                ",readonly=on,multidevs=remap",
            ))
            .args(share("m", &k.modules(), "modules", ",readonly=on"))
            .args(share("o", out, "out", ""));
        c
    }
}

/// Waits for `child` to exit, calling `tick` every second; kills it at `deadline`.
/// Returns whether it had to be killed.
fn wait(child: &mut Child, deadline: Instant, mut tick: impl FnMut()) -> anyhow::Result<bool> {
    loop {
        tick();
        if child.try_wait()?.is_some() {
            tick();
            return Ok(false);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            child.wait()?;
            tick();
            return Ok(true);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Why a guest that exited on its own left a suite without a result.
pub fn guest_end(console: &str) -> String {
    if let Some(l) = console.lines().find(|l| l.contains("Kernel panic")) {
        return format!("guest kernel panic: {}", l.trim());
    }
    if console.contains("9p root mount failed") {
        return "guest could not mount the host's root over 9p".into();
    }
    if !console.contains("[stage2]") {
        return "guest never reached stage2 (see console.log)".into();
    }
    if console.contains("ZGUEST-EXIT") {
        return "the suite wrote no status (see console.log)".into();
    }
    "guest stopped during the suite (see console.log)".into()
}

/// /mnt/run.sh for one guest: the environment every suite shares, then one line per suite.
fn run_script(run: &Run) -> String {
    let root = crate::workspace_root();
    let mut s = format!(
        "# written by `cargo xtask kernels`: {} ({}), {}\n\
         cd {}\n\
         export ZTUNNEL_BIN={} TC_ATTACH={} ZT_TEST_TIME_SCALE={} RUST_BACKTRACE=1\n",
        run.kernel.package,
        run.kernel.version,
        run.mode,
        quote(&root.join("tests")),
        quote(&run.ztunnel),
        run.mode,
        run.time_scale,
    );
    let suite_sh = quote(&super::guest_file("suite.sh"));
    for (name, exe) in &run.suites {
        s.push_str(&format!(
            "{suite_sh} {name} {} {}\n",
            quote(exe),
            run.suite_timeout
        ));
    }
    s
}

fn quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_why_a_guest_left_no_result() {
        let cases = [
            ("", "never reached stage2"),
            ("[init] 9p root mount failed", "could not mount"),
            (
                "[stage2] kernel 6.1.0 ready\nKernel panic - not syncing: Out of memory",
                "kernel panic",
            ),
            ("[stage2] kernel 6.1.0 ready\n", "stopped during the suite"),
            ("[stage2] ready\nZGUEST-EXIT rc=0", "wrote no status"),
        ];
        for (console, want) in cases {
            assert!(guest_end(console).contains(want), "{console:?}");
        }
    }

    #[test]
    fn quotes_paths_for_the_shell() {
        assert_eq!(quote(Path::new("/a b/c")), "'/a b/c'");
        assert_eq!(quote(Path::new("/it's")), r"'/it'\''s'");
    }
}
