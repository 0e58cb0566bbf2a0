//! Teardown that always happens: on drop (including panics), on Ctrl-C, and for
//! namespaces left by an earlier run that was killed outright.
//!
//! Every namespace name starts with `zt<pid>-`, so a later run can tell its own
//! leftovers (the pid is dead) from namespaces of a run still going or of anyone else.

use std::sync::{Mutex, Once};

static NETNS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static INIT: Once = Once::new();

pub const PREFIX: &str = "zt";

pub(crate) fn init() {
    INIT.call_once(|| {
        remove_stale();
        let _ = ctrlc::set_handler(|| {
            eprintln!("testbed: interrupted, tearing down");
            for pid in CHILDREN.lock().map(|c| c.clone()).unwrap_or_default() {
                // SAFETY: plain kill(2) on a pid we spawned.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            for ns in NETNS.lock().map(|n| n.clone()).unwrap_or_default() {
                let _ = crate::netns::run_ip(&["netns", "del", &ns]);
                let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/ztunnel/{ns}"));
            }
            std::process::exit(130);
        });
    });
}

pub(crate) fn register_netns(name: &str) {
    NETNS.lock().unwrap().push(name.to_string());
}

pub(crate) fn unregister_netns(name: &str) {
    NETNS.lock().unwrap().retain(|n| n != name);
}

pub(crate) fn register_child(pid: u32) {
    CHILDREN.lock().unwrap().push(pid);
}

pub(crate) fn unregister_child(pid: u32) {
    CHILDREN.lock().unwrap().retain(|p| *p != pid);
}

/// Deletes namespaces (and their bpffs pins) created by testbed processes that no
/// longer exist.
pub fn remove_stale() {
    let Ok(rd) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = crate::netns::run_ip(&["netns", "del", &name]);
        let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/ztunnel/{name}"));
    }
}

fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    if digits.is_empty() || !rest[digits.len()..].starts_with('-') {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn owner() {
        assert_eq!(super::owner_pid("zt123-4-node-a"), Some(123));
        assert_eq!(super::owner_pid("ztx-4"), None);
        assert_eq!(super::owner_pid("other"), None);
        assert_eq!(super::owner_pid("zt12"), None);
    }
}
