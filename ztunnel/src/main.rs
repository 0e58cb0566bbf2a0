use clap::Parser;
use ztunnel::config::{Cli, Command, LogFormat};

/// Runs `fut` on a tokio runtime: one on this thread (`ztunnel run`, whose data path has
/// threads of its own), or a multi-threaded one with a thread per core.
fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(
    multi_threaded: bool,
    fut: F,
) -> anyhow::Result<()> {
    let mut b = match multi_threaded {
        true => tokio::runtime::Builder::new_multi_thread(),
        false => tokio::runtime::Builder::new_current_thread(),
    };
    b.enable_all().build()?.block_on(fut)
}

fn main() -> std::process::ExitCode {
    // Istio's ztunnel's setting names, read as ours (before the command line is parsed).
    let istio = ztunnel::config::istio_names::istio_overrides(|k| std::env::var(k).ok());
    if !istio.errors.is_empty() {
        for e in &istio.errors {
            eprintln!("ztunnel: error: {e}");
        }
        return std::process::ExitCode::FAILURE;
    }
    for (k, v) in &istio.set {
        std::env::set_var(k, v);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => {
            ztunnel::logging::init(args.log_format);
            for (k, v) in &istio.set {
                tracing::info!("{k}={v} (from Istio's setting name)");
            }
            for w in &istio.warnings {
                tracing::warn!("{w}");
            }
            // Process tuning is the deployment's (Dockerfile, DaemonSet): say what it is.
            if let Some(t) = std::env::var_os("GLIBC_TUNABLES") {
                tracing::debug!(tunables = ?t, "GLIBC_TUNABLES");
            }
            raise_fd_limit();
            block_on(false, ztunnel::app::run(*args))
        }
        Command::Controlplane(args) => {
            ztunnel::logging::init(LogFormat::Text);
            block_on(true, ztunnel::controlplane::run(*args))
        }
        Command::Debug(args) => ztunnel::debug_cli::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztunnel: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Every proxied connection holds two descriptors and the usual soft limit is 1024: raise it
/// to the hard limit the node allows.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open files limit"),
            Err(e) => tracing::warn!("cannot raise the open files limit ({soft}): {e}"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot read the open files limit: {e}"),
    }
}
