//! What both proxies are given: two nodes, a client pod on one and a server pod on the
//! other, one workload file naming both (plus a service and a policy, so every part of
//! `/config_dump` has content), and the same connections from client to server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ztunnel_tests::side_by_side::{workload_file, SERVER_PORT, SERVICE_PORT, VIP};
use ztunnel_tests::traffic::{connect, echo_round_trip, EchoServer};
use ztunnel_tests::{Node, Pod, Testbed};

pub struct Scenario {
    pub tb: Testbed,
    pub a: Node,
    pub b: Node,
    pub client: Pod,
    pub server: Pod,
    pub config: PathBuf,
    _echo: EchoServer,
}

impl Scenario {
    pub fn new() -> anyhow::Result<Scenario> {
        let mut tb = Testbed::new()?;
        let a = tb.add_node("node-a")?;
        let b = tb.add_node("node-b")?;
        let client = tb.add_pod(&a, "client")?;
        let server = tb.add_pod(&b, "server")?;
        let echo = EchoServer::start(&server.netns, SERVER_PORT)?;
        let config = tb.write_config("workloads.yaml", &workload_file(&client, &server))?;
        Ok(Scenario {
            tb,
            a,
            b,
            client,
            server,
            config,
            _echo: echo,
        })
    }

    /// One echoed connection from the client to the server's own address and one to the
    /// service's VIP: outbound on the client's side, inbound on the server's, each a
    /// "connection opened" and a "connection complete".
    pub fn traffic(&self) -> anyhow::Result<()> {
        let t = Duration::from_secs(5);
        for dst in [
            SocketAddr::new(self.server.ip.into(), SERVER_PORT),
            SocketAddr::new(VIP.parse()?, SERVICE_PORT),
        ] {
            let mut s = connect(&self.client.netns, dst, t)
                .map_err(|e| anyhow::anyhow!("connecting to {dst}: {e}"))?;
            let back = echo_round_trip(&mut s, b"side by side")?;
            anyhow::ensure!(back == b"side by side", "echo via {dst} altered: {back:?}");
        }
        Ok(())
    }
}
