//! Questions the mesh does not answer go to the node's resolvers: over UDP, each server in
//! turn until one answers, again over TCP when the answer comes back truncated; over TCP
//! when the pod asked over TCP. The reply is relayed as it came (nothing is cached).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// The largest DNS message (TCP's two-byte length).
pub const MAX_MESSAGE: usize = 65535;

#[derive(Debug, Clone)]
pub struct Upstreams {
    pub servers: Vec<SocketAddr>,
    /// Per attempt.
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no DNS server to forward to")]
    NoServers,
    #[error("no answer from {0}")]
    NoAnswer(String),
}

impl Upstreams {
    /// The `nameserver` lines of a `resolv.conf`. Loopback servers (a node-local cache on
    /// 127.0.0.53, say) are kept: ztunnel runs in the node's network namespace.
    pub fn from_resolv_conf(path: &Path) -> anyhow::Result<Upstreams> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let servers: Vec<SocketAddr> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|rest| rest.trim().split('%').next()?.parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, 53))
            .collect();
        if servers.is_empty() {
            anyhow::bail!("{} names no nameserver", path.display());
        }
        Ok(Upstreams {
            servers,
            timeout: Duration::from_secs(2),
        })
    }

    /// Asks each server in turn; the first reply wins.
    pub async fn forward(&self, query: &[u8], tcp: bool) -> Result<Vec<u8>, ForwardError> {
        if self.servers.is_empty() {
            return Err(ForwardError::NoServers);
        }
        let mut why = Vec::new();
        for server in &self.servers {
            let r = if tcp {
                self.over_tcp(*server, query).await
            } else {
                match self.over_udp(*server, query).await {
                    // Truncated: the whole answer is there over TCP.
                    Ok(reply) if truncated(&reply) => self.over_tcp(*server, query).await,
                    r => r,
                }
            };
            match r {
                Ok(reply) => return Ok(reply),
                Err(e) => why.push(format!("{server}: {e}")),
            }
        }
        Err(ForwardError::NoAnswer(why.join("; ")))
    }

    async fn over_udp(&self, server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
        let bind: SocketAddr = match server {
            SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
            SocketAddr::V6(_) => "[::]:0".parse().expect("literal"),
        };
        let sock = UdpSocket::bind(bind).await?;
        sock.connect(server).await?;
        sock.send(query).await?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))??;
            // Only the reply to this question (a late one to an earlier try is skipped).
            if n >= 12 && buf[..2] == query[..2] && buf[2] & 0x80 != 0 {
                buf.truncate(n);
                return Ok(buf);
            }
        }
    }

    async fn over_tcp(&self, server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
        let exchange = async {
            let mut s = TcpStream::connect(server).await?;
            let len = u16::try_from(query.len())
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "too long"))?;
            let mut framed = Vec::with_capacity(query.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(query);
            s.write_all(&framed).await?;
            let n = usize::from(s.read_u16().await?);
            let mut buf = vec![0u8; n];
            s.read_exact(&mut buf).await?;
            Ok(buf)
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))?
    }
}

/// The TC bit of a reply.
pub fn truncated(reply: &[u8]) -> bool {
    reply.len() >= 3 && reply[2] & 0x02 != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let dir = std::env::temp_dir().join(format!("zt-resolv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("resolv.conf");
        std::fs::write(
            &p,
            "# generated\nsearch default.svc.cluster.local\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\noptions ndots:5\n",
        )
        .unwrap();
        let u = Upstreams::from_resolv_conf(&p).unwrap();
        assert_eq!(
            u.servers,
            [
                "10.96.0.10:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
        std::fs::write(&p, "search x\n").unwrap();
        let e = Upstreams::from_resolv_conf(&p).unwrap_err().to_string();
        assert!(e.contains("names no nameserver"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
