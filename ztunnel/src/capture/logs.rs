//! The capture program's log records (aya-log), forwarded to ztunnel's log.

use tracing::warn;
use ztunnel_ebpf_common::SETTINGS_LOG_FLOWS;

use super::PROGRAM_LOG_TARGET;

/// `SETTINGS_LOG_FLOWS` if the log filter shows the program's debug records.
pub(super) fn flow_log_flag() -> u16 {
    if crate::logging::shows(PROGRAM_LOG_TARGET, log::Level::Debug) {
        SETTINGS_LOG_FLOWS
    } else {
        0
    }
}

/// Forwards aya-log records from the programs to `log`, which `tracing` picks up.
pub(super) fn spawn_log_forwarder(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    use tokio::io::unix::AsyncFd;
    // SAFETY: the logger owns its ring-buffer fd and keeps it open while registered.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!("eBPF logs unavailable: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
