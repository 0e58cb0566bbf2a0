//! The command line: one typed clap struct per subcommand, every flag also read from an
//! environment variable (named as upstream Istio ztunnel names it where it has one).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "ztunnel",
    version,
    about = "eBPF-native per-node service-mesh proxy: captures enrolled pods' TCP with eBPF and \
             carries it between nodes in HBONE (HTTP/2 CONNECT over mutual TLS 1.3)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the node proxy (needs root: loads eBPF programs, installs policy routing).
    Run(Box<RunArgs>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Name of this node: the workloads whose `node` is this name are served here.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Standalone configuration: workloads, services and policies in upstream ztunnel's
    /// local YAML format; reloaded when the file changes.
    #[arg(long, env = "LOCAL_XDS_PATH")]
    pub local_xds_path: Option<PathBuf>,

    /// Names this ztunnel's pinned eBPF state (`<bpffs>/ztunnel/<instance>`); a restart
    /// with the same instance adopts it. Defaults to the node name.
    #[arg(long, env = "ZTUNNEL_INSTANCE")]
    pub instance: Option<String>,

    /// Where bpffs is (mounted there if it is not).
    #[arg(long, env = "BPFFS_ROOT", default_value = "/sys/fs/bpf")]
    pub bpffs_root: PathBuf,

    /// Packet mark the capture program sets on packets it hands to ztunnel.
    #[arg(long, env = "CAPTURE_MARK", default_value = "0x4000", value_parser = parse_u32)]
    pub capture_mark: u32,

    /// SO_MARK of ztunnel's own sockets (upstream's 1337); must not overlap the capture mark.
    #[arg(long, env = "PROXY_MARK", default_value = "0x539", value_parser = parse_u32)]
    pub proxy_mark: u32,

    /// Routing table whose `local default dev lo` route delivers captured packets.
    #[arg(long, env = "CAPTURE_ROUTE_TABLE", default_value_t = 15010)]
    pub route_table: u32,

    /// Priority of the `fwmark` rule pointing at that table.
    #[arg(long, env = "CAPTURE_RULE_PRIORITY", default_value_t = 100)]
    pub rule_priority: u32,

    /// Destination ports never captured (comma separated).
    #[arg(long, env = "EXCLUDE_PORTS", value_delimiter = ',')]
    pub exclude_ports: Vec<u16>,

    /// Outbound capture listener (pods' outgoing connections).
    #[arg(long, env = "OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,

    /// Inbound plaintext capture listener.
    #[arg(long, env = "INBOUND_PLAINTEXT_PORT", default_value_t = 15006)]
    pub inbound_plaintext_port: u16,

    /// Inbound HBONE listener (mTLS, on the destination pod's address).
    #[arg(long, env = "INBOUND_HBONE_PORT", default_value_t = 15008)]
    pub inbound_hbone_port: u16,

    /// On exit, leave the eBPF programs attached (enrolled pods stay fail-closed) for the
    /// next ztunnel to adopt: use for upgrades. Otherwise everything is removed.
    #[arg(long, env = "RETAIN_CAPTURE_ON_EXIT")]
    pub retain_capture_on_exit: bool,

    /// How often to look for new interfaces and retry pods whose interface is missing.
    #[arg(long, env = "RESCAN_INTERVAL_MS", default_value_t = 1000)]
    pub rescan_interval_ms: u64,

    /// Log format (levels come from RUST_LOG, default `info`).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl RunArgs {
    pub fn instance(&self) -> String {
        self.instance.clone().unwrap_or_else(|| self.node_name.clone())
    }

    pub fn listen_addrs(&self, port: u16) -> [SocketAddr; 2] {
        [SocketAddr::from(([0, 0, 0, 0], port)), SocketAddr::from(([0u16; 8], port))]
    }
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s:?} is not a number: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_marks_and_env_defaults() {
        let cli = Cli::try_parse_from(["ztunnel", "run", "--node-name", "n1", "--capture-mark", "0x100"]).unwrap();
        let Command::Run(args) = cli.command;
        assert_eq!(args.capture_mark, 0x100);
        assert_eq!(args.proxy_mark, 0x539);
        assert_eq!(args.outbound_port, 15001);
        assert_eq!(args.instance(), "n1");
        assert!(parse_u32("0xzz").is_err());
    }

    #[test]
    fn help_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
