use clap::Parser;
use ztunnel::config::{Cli, Command, LogFormat};

/// Runs `fut` on a multi-threaded runtime.
fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(fut: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(fut)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => {
            ztunnel::logging::init(args.log_format);
            block_on(ztunnel::app::run(*args))
        }
        Command::Controlplane(args) => {
            ztunnel::logging::init(LogFormat::Text);
            block_on(ztunnel::controlplane::run(args))
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
