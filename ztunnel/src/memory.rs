//! Giving memory back to the node: a per-node proxy should cost what it uses now, not what
//! it once used (a burst of connections, the start-up).

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

/// glibc keeps memory freed by closed connections in its arenas: after a burst of 10,000
/// connections RSS stayed at its peak (`cargo xtask soak`). Hand free pages back to the
/// kernel every `period` (`--malloc-trim-interval`); cheap when there is nothing to give
/// back. A zero period never does (returns at once).
pub async fn return_freed_memory(period: Duration) {
    if period.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        // SAFETY: malloc_trim only walks the allocator's own free lists.
        unsafe { libc::malloc_trim(0) };
    }
}

/// Once started (`--release-startup-pages`, on by default), asks the kernel to reclaim the
/// pages of ztunnel's own executable (`MADV_PAGEOUT`): argument parsing, eBPF loading and
/// the first configuration touched megabytes of code and read-only data that the running
/// proxy never touches again, yet they would stay resident for the life of the process.
/// Pages the proxy does use fault back in on their next use (from the page cache, else
/// from the file); the others stay out. Only clean, read-only mappings of the executable
/// are advised (its writable data is anonymous memory that has nowhere to go). Best
/// effort: the kernel skips pages other processes map too, and file pages of a file we may
/// not write. Returns the bytes advised.
///
/// A fault maps every neighbour the page cache holds (64 KiB around it), and the start
/// read whole windows of the file (the disk's `read_ahead_kb`, 8 MiB on some virtual
/// disks) into the cache: much of what was handed back would come back with the first
/// connection. So the file's cached pages nobody maps are dropped from the page cache too
/// (the node charges them to ztunnel's cgroup anyway), and the read-only data is marked
/// `MADV_RANDOM` (a fault there reads only its page). Code faults still read ahead:
/// kernels since 6.16 ignore `MADV_RANDOM` on executable mappings. The cost is a read the
/// first time a code path runs after start; the proxy's steady state does not fault.
pub fn release_startup_pages() -> io::Result<u64> {
    let file = std::fs::File::open("/proc/self/exe")?;
    let exe = file.metadata()?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut advised = 0;
    for (start, end) in executable_mappings(&maps, exe.dev(), exe.ino()) {
        for advice in [libc::MADV_RANDOM, libc::MADV_PAGEOUT] {
            // SAFETY: the range is a mapping of this process; MADV_RANDOM only changes how
            // its faults read ahead, MADV_PAGEOUT only drops clean pages (they are read back
            // on access). Neither changes the contents.
            let r = unsafe { libc::madvise(start as *mut libc::c_void, end - start, advice) };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        advised += (end - start) as u64;
    }
    // SAFETY: fadvise on an open file only drops clean, unmapped page-cache pages.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(advised)
}

/// The read-only mappings (`start`, `end`) of the file with device `dev` and inode `ino`
/// in a `/proc/<pid>/maps` listing.
fn executable_mappings(maps: &str, dev: u64, ino: u64) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (range, perms, _offset, device, inode) =
                (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
            if perms.contains('w') || inode.parse::<u64>().ok()? != ino {
                return None;
            }
            let (major, minor) = device.split_once(':')?;
            let (major, minor) = (
                u32::from_str_radix(major, 16).ok()?,
                u32::from_str_radix(minor, 16).ok()?,
            );
            if libc::makedev(major, minor) != dev {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some((
                usize::from_str_radix(start, 16).ok()?,
                usize::from_str_radix(end, 16).ok()?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_read_only_mappings_of_the_file() {
        let maps = "\
5581a0000000-5581a0100000 r--p 00000000 fe:01 1234 /usr/bin/ztunnel
5581a0100000-5581a0900000 r-xp 00100000 fe:01 1234 /usr/bin/ztunnel
5581a0900000-5581a0a00000 rw-p 00900000 fe:01 1234 /usr/bin/ztunnel
5581a0a00000-5581a0b00000 r--p 00000000 fe:02 1234 /other/device
7f0000000000-7f0000100000 r-xp 00000000 fe:01 99 /usr/lib/libc.so.6
7f0000200000-7f0000300000 rw-p 00000000 00:00 0
";
        let dev = libc::makedev(0xfe, 0x01);
        assert_eq!(
            executable_mappings(maps, dev, 1234),
            vec![
                (0x5581a0000000, 0x5581a0100000),
                (0x5581a0100000, 0x5581a0900000)
            ]
        );
    }

    #[tokio::test]
    async fn trimming_every_zero_seconds_is_off() {
        // `--malloc-trim-interval 0`: the task ends at once instead of spinning.
        tokio::time::timeout(Duration::from_secs(1), return_freed_memory(Duration::ZERO))
            .await
            .expect("returns at once");
    }

    #[test]
    fn release_runs_on_this_process() {
        // The test binary's own mappings: advising them must succeed and leave it running.
        assert!(release_startup_pages().unwrap() > 0);
        assert_eq!(executable_mappings("garbage\n\n", 0, 0), vec![]);
    }
}
