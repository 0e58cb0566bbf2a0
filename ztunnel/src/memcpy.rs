//! glibc's `memcpy` copies blocks of a few KiB and up with `rep movsb` on CPUs that
//! advertise fast string moves. AMD's Zen cores run that slowly when source and destination
//! are aligned differently — which is every copy TLS makes on receive: rustls moves each
//! decrypted record out of its read buffer, where records start at arbitrary offsets. On
//! the testbed's EPYC the server-side ztunnel spent 23 % of its samples in `memmove` (four
//! times the AES decryption of the same bytes) and used about 30 % less CPU per GB carried
//! once glibc copied with its vector loop instead (README, Performance).
//!
//! The switch is a glibc tunable, read only when a process starts. So `ztunnel run` on an
//! AMD CPU starts itself again, once, with it set — unless `GLIBC_TUNABLES` is set already:
//! an operator's tunables are left alone (add this one to them to keep the effect).

/// The setting: copies up to 4 MiB use the vector loop (above it, glibc's non-temporal path
/// takes over anyway).
pub const TUNABLES: &str = "glibc.cpu.x86_rep_movsb_threshold=4194304";

/// Replaces this process with itself under [`TUNABLES`] when that helps (an AMD CPU, no
/// tunables set). Returns only when it does not, or if the exec failed (then the process
/// simply goes on with glibc's defaults). Call first thing, while single-threaded.
pub fn restart_with_vector_copies() -> Option<std::io::Error> {
    if std::env::var_os("GLIBC_TUNABLES").is_some() || !is_amd() {
        return None;
    }
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let argv0 = args.next()?;
    // /proc/self/exe: this very binary, even if its file was replaced or removed since.
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(argv0)
        .args(args)
        .env("GLIBC_TUNABLES", TUNABLES)
        .exec();
    Some(err)
}

/// Whether this process runs with [`TUNABLES`] (for the start-up log).
pub fn vector_copies() -> bool {
    std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("x86_rep_movsb_threshold"))
}

#[cfg(target_arch = "x86_64")]
fn is_amd() -> bool {
    // CPUID leaf 0: the vendor string in EBX, EDX, ECX.
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86_64 CPU; leaf 0 is always valid.
    let r = unsafe { std::arch::x86_64::__cpuid(0) };
    let mut vendor = [0u8; 12];
    vendor[..4].copy_from_slice(&r.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&r.edx.to_le_bytes());
    vendor[8..].copy_from_slice(&r.ecx.to_le_bytes());
    &vendor == b"AuthenticAMD"
}

#[cfg(not(target_arch = "x86_64"))]
fn is_amd() -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_vendor_matches_what_the_kernel_reports() {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let kernel_says_amd = cpuinfo
            .lines()
            .any(|l| l.starts_with("vendor_id") && l.ends_with("AuthenticAMD"));
        assert_eq!(super::is_amd(), kernel_says_amd);
    }
}
