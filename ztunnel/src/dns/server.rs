//! The DNS proxy's listeners (15053, UDP and TCP): each question is answered from the mesh
//! for the pod that asked (known by its source address), or relayed to the node's
//! resolvers. Bounded: questions in flight, TCP connections, and an idle TCP connection's
//! life.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tracing::debug;

use super::answer::{self, Reply};
use super::forward::{Upstreams, MAX_MESSAGE};
use super::metrics::{DnsLabels, DNS};
use super::transparent::{self, arrival, Arrival};
use crate::admin::http::{accept_with_backoff, ACCEPT_BACKOFF};
use crate::limits::{Cap, KeyPermit, PerKey};
use crate::state::StateStore;

/// How long a TCP client may stay silent between questions.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Forwarded questions in flight at once (each holds its question and a 64 KiB reply
/// buffer: ~64 MiB at worst; mesh names are answered at once, outside this bound) and TCP
/// connections at once (each up to two 64 KiB messages: ~32 MiB).
const MAX_INFLIGHT: usize = 1024;
const MAX_TCP_CONNECTIONS: usize = 256;
/// TCP connections one source address may hold at once: a resolver uses one or two, and
/// no single pod can take the whole [`MAX_TCP_CONNECTIONS`] from the others.
pub(super) const MAX_TCP_PER_SOURCE: usize = 16;
/// A question over UDP longer than this is not one a resolver sends (EDNS payloads are
/// 1232-4096 bytes, and that is the answer's size, not the question's): dropped.
const MAX_UDP_QUESTION: usize = 4096;

/// What a UDP socket of the proxy is.
#[derive(Clone, Copy, Debug)]
pub enum UdpRole {
    /// Bound to the proxy's address: answers go back from it.
    Plain,
    /// Bound to the wildcard on the proxy's port, transparent: captured questions, and
    /// questions to `proxy_addr`, are answered from the address they were going to, with
    /// ztunnel's `SO_MARK`; anything else is dropped.
    Capture { proxy_addr: SocketAddr, mark: u32 },
}

pub struct DnsProxy {
    pub store: Arc<StateStore>,
    pub upstreams: Upstreams,
    pub cluster_domain: String,
    inflight: Cap,
    tcp_connections: Cap,
    tcp_per_source: PerKey<std::net::IpAddr>,
}

impl DnsProxy {
    pub fn new(store: Arc<StateStore>, upstreams: Upstreams, cluster_domain: &str) -> Arc<Self> {
        Arc::new(DnsProxy {
            store,
            upstreams,
            cluster_domain: cluster_domain.to_string(),
            inflight: Cap::new("dns_inflight", MAX_INFLIGHT),
            tcp_connections: Cap::new("dns_tcp_connections", MAX_TCP_CONNECTIONS),
            tcp_per_source: PerKey::new("dns_tcp_connections_per_source", MAX_TCP_PER_SOURCE),
        })
    }

    /// What needs no upstream, at once: `Ok` with the reply (`None`: nothing to send), or
    /// `Err` when the question must be forwarded.
    fn answer_here(
        &self,
        query: &[u8],
        src: SocketAddr,
        tcp: bool,
    ) -> Result<Option<Vec<u8>>, Box<(DnsLabels, answer::Asked)>> {
        let state = self.store.snapshot();
        let client = state.workload_by_ip(src.ip());
        let max_udp = (!tcp).then_some(MAX_MESSAGE);
        let (reply, asked) = answer::decide(
            query,
            &state,
            client.as_deref(),
            &self.cluster_domain,
            max_udp,
        );
        let labels = DnsLabels::new(&asked.qtype, tcp, client.as_deref());
        if !matches!(reply, Reply::Drop) {
            DNS.requests.get_or_create(&labels).inc();
        }
        match reply {
            Reply::Answer(bytes) => {
                debug!(%src, name = %asked.name, qtype = %asked.qtype, "dns: answered from the mesh");
                Ok(Some(bytes))
            }
            Reply::Drop => {
                debug!(%src, "dns: not a DNS question, dropped");
                Ok(None)
            }
            Reply::Forward => Err(Box::new((labels, asked))),
        }
    }

    async fn forward(
        &self,
        query: &[u8],
        src: SocketAddr,
        tcp: bool,
        forward: Box<(DnsLabels, answer::Asked)>,
    ) -> Option<Vec<u8>> {
        let (labels, asked) = *forward;
        DNS.upstream_requests.get_or_create(&labels).inc();
        let start = Instant::now();
        let r = self.upstreams.forward(query, tcp).await;
        DNS.upstream_duration
            .get_or_create(&labels)
            .observe(start.elapsed().as_secs_f64());
        match r {
            Ok(bytes) => {
                debug!(%src, name = %asked.name, qtype = %asked.qtype, "dns: forwarded");
                Some(if tcp {
                    bytes
                } else {
                    answer::fit_udp(query, bytes, MAX_MESSAGE)
                })
            }
            Err(e) => {
                DNS.upstream_failures.get_or_create(&labels).inc();
                debug!(%src, name = %asked.name, error = %e, "dns: forwarding failed");
                // SERVFAIL, so the pod's resolver moves on at once.
                servfail(query)
            }
        }
    }

    /// Serves one UDP socket: the proxy's own ([`UdpRole::Plain`]), or a capture socket
    /// that enrolled pods' questions to port 53 are assigned to ([`UdpRole::Capture`]),
    /// answered from the address each was going to.
    pub async fn serve_udp(self: Arc<Self>, sock: UdpSocket, role: UdpRole) {
        let sock = Arc::new(sock);
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let (n, src, dst) = match transparent::recv_with_dst(&sock, &mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    // Rare (ENOMEM, ENOBUFS): pause rather than spin the runtime.
                    debug!(error = %e, "dns: udp receive");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let reply_from = match role {
                UdpRole::Plain => ReplyFrom::Socket,
                UdpRole::Capture { proxy_addr, mark } => match arrival(dst, proxy_addr) {
                    Arrival::Captured(addr) => ReplyFrom::Asked { addr, mark },
                    Arrival::Direct(addr) => ReplyFrom::Via(addr),
                    Arrival::Stray => {
                        debug!(%src, ?dst, "dns: datagram neither captured nor for the proxy's address, dropped");
                        continue;
                    }
                },
            };
            if n > MAX_UDP_QUESTION {
                debug!(%src, bytes = n, "dns: oversized udp question dropped");
                continue;
            }
            // Mesh names (and FORMERR) are answered at once, whatever is in flight: only
            // what is forwarded waits, so only that takes a place within the bound.
            let forward = match self.answer_here(&buf[..n], src, false) {
                Ok(Some(reply)) => {
                    send_reply(&sock, reply_from, src, &reply).await;
                    continue;
                }
                Ok(None) => continue,
                Err(forward) => forward,
            };
            // A flood beyond the bound is dropped (and counted), as a busy server would.
            let Some(permit) = self.inflight.admit() else {
                continue;
            };
            let query = buf[..n].to_vec();
            let (me, sock) = (self.clone(), sock.clone());
            tokio::spawn(async move {
                let _permit = permit;
                if let Some(reply) = me.forward(&query, src, false, forward).await {
                    send_reply(&sock, reply_from, src, &reply).await;
                }
            });
        }
    }

    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (conn, src) = accept_with_backoff("DNS proxy (tcp)", || listener.accept()).await;
            let Some(permit) = self.admit_tcp(src) else {
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = me.tcp_session(conn, src).await {
                    debug!(%src, error = %e, "dns: tcp session ended");
                }
            });
        }
    }

    /// A pod's TCP connection to port 53 of any address, captured: served here as if
    /// this were the server it dialled.
    pub async fn serve_captured_tcp(&self, conn: TcpStream, src: SocketAddr) {
        let Some(_permit) = self.admit_tcp(src) else {
            return;
        };
        if let Err(e) = self.tcp_session(conn, src).await {
            debug!(%src, error = %e, "dns: captured tcp session ended");
        }
    }

    /// A place for one TCP connection from `src`: within its own share first, then within
    /// the proxy's bound. `None`: the connection is closed at once.
    fn admit_tcp(
        &self,
        src: SocketAddr,
    ) -> Option<(
        KeyPermit<std::net::IpAddr>,
        tokio::sync::OwnedSemaphorePermit,
    )> {
        let mine = self.tcp_per_source.admit(src.ip(), &src.ip())?;
        Some((mine, self.tcp_connections.admit()?))
    }

    /// Questions one after another on one connection, each framed by its length.
    async fn tcp_session(&self, mut conn: TcpStream, src: SocketAddr) -> std::io::Result<()> {
        loop {
            let len = match tokio::time::timeout(TCP_IDLE, conn.read_u16()).await {
                Ok(Ok(len)) => usize::from(len),
                // Closed, or idle too long: the end.
                _ => return Ok(()),
            };
            let mut query = vec![0u8; len];
            tokio::time::timeout(TCP_IDLE, conn.read_exact(&mut query))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "slow question")
                })??;
            // One question at a time per connection; a forwarded one within the same
            // bound as UDP's.
            let reply = match self.answer_here(&query, src, true) {
                Ok(reply) => reply,
                Err(forward) => {
                    let Some(_permit) = self.inflight.admit() else {
                        return Ok(());
                    };
                    self.forward(&query, src, true, forward).await
                }
            };
            let Some(reply) = reply else {
                return Ok(());
            };
            let len = u16::try_from(reply.len()).unwrap_or(u16::MAX);
            let mut framed = Vec::with_capacity(reply.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(&reply[..usize::from(len)]);
            conn.write_all(&framed).await?;
        }
    }
}

/// How a reply leaves: from the socket, from the address the question was going to
/// through the socket (a question to the proxy's own address on a wildcard socket), or
/// from that address and port through a socket of its own (a captured question).
#[derive(Clone, Copy, Debug)]
enum ReplyFrom {
    Socket,
    Via(SocketAddr),
    Asked { addr: SocketAddr, mark: u32 },
}

/// Sends `reply` to `src` as `from` says.
async fn send_reply(sock: &UdpSocket, from: ReplyFrom, src: SocketAddr, reply: &[u8]) {
    let sent = match from {
        ReplyFrom::Socket => sock.send_to(reply, src).await.map(drop),
        ReplyFrom::Via(addr) => transparent::send_via(sock, addr, src, reply).await,
        ReplyFrom::Asked { addr, mark } => transparent::send_from(addr, src, reply, mark),
    };
    if let Err(e) = sent {
        debug!(%src, ?from, error = %e, "dns: reply not sent");
    }
}

/// SERVFAIL for `query`, when its header can be read.
fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    use hickory_proto::op::{Message, OpCode, ResponseCode};
    let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
    let mut m = Message::error_msg(id, OpCode::Query, ResponseCode::ServFail);
    if let Ok(q) = Message::from_vec(query) {
        m.queries = q.queries;
        m.metadata.recursion_desired = q.metadata.recursion_desired;
    }
    m.to_vec().ok()
}
