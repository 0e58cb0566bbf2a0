//! Network namespaces the testbed creates, and ways to run code inside them.
//!
//! Namespaces are entered with `setns(CLONE_NEWNET)` only — never `ip netns exec`,
//! which also remounts `/sys` and would hide bpffs (`/sys/fs/bpf`) from ztunnel.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use nix::sched::{setns, CloneFlags};

/// A named network namespace under `/run/netns`, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub(crate) fn create(name: &str) -> anyhow::Result<Netns> {
        run_ip(&["netns", "add", name]).with_context(|| format!("creating netns {name}"))?;
        crate::cleanup::register_netns(name);
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run_ip(&full)
    }

    /// Writes a sysctl inside the namespace (`/proc/sys/net` is per network namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_string();
        self.run(move || std::fs::write(&path, value).with_context(|| format!("writing {path}")))
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it creates live here
    /// and may be used from any thread afterwards.
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        self.spawn(f)
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// Starts `f` on a new thread inside this namespace (for long-running loads).
    pub fn spawn<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> std::thread::JoinHandle<R> {
        let path = self.path();
        std::thread::spawn(move || {
            let file = File::open(&path).expect("open netns");
            setns(file, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }

    /// A command that runs inside this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
        let file =
            File::open(self.path()).with_context(|| format!("opening netns {}", self.name))?;
        let mut cmd = Command::new(program);
        // SAFETY: setns is async-signal-safe; the fd stays open until the child execs.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run_ip(&["netns", "del", &self.name]);
        crate::cleanup::unregister_netns(&self.name);
    }
}

pub(crate) fn run_ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
