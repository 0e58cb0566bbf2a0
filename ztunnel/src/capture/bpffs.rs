//! The BPF filesystem, where pinned maps and links outlive the ztunnel process.

use std::path::Path;

use anyhow::Context;
use nix::mount::{mount, MsFlags};
use nix::sys::statfs::{statfs, BPF_FS_MAGIC};

/// Mounts bpffs at `root` unless a bpffs is already there. On a fresh machine nothing
/// is mounted at /sys/fs/bpf; in a Kubernetes pod the host's is usually bind-mounted.
pub fn ensure_mounted(root: &Path) -> anyhow::Result<()> {
    if let Ok(st) = statfs(root) {
        if st.filesystem_type() == BPF_FS_MAGIC {
            return Ok(());
        }
    }
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    mount(
        Some("bpffs"),
        root,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| {
        format!(
            "mounting bpffs at {} (needs root / CAP_SYS_ADMIN)",
            root.display()
        )
    })
}
