//! Looking up the hostname of an endpoint known by name only (`state::Unresolved`) when a
//! connection to it is made, with the node's resolvers: the resolv.conf `--dns-upstream`
//! names, as the DNS proxy forwards to. Answers are cached for their TTL, so a busy
//! destination costs one lookup per TTL, not one per connection.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use hickory_resolver::config::{LookupIpStrategy, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;

/// Bound on one connection's lookup (every server and retry included): past it the
/// connection is refused rather than left hanging.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The node's resolvers as the resolv.conf names them, read once at start. Each data-path
/// thread builds its own resolver from them ([`ResolverSettings::build`]), as it has its
/// own connection pool: the resolver's sockets belong to the runtime that opened them.
#[derive(Clone, Debug)]
pub struct ResolverSettings(Result<(ResolverConfig, ResolverOpts), String>);

impl ResolverSettings {
    /// The resolv.conf at `path`, its options (search, ndots, timeout, attempts) included.
    /// One that cannot be used does not stop start-up (most meshes have no endpoint known
    /// by hostname only): it is logged, and each lookup reports it.
    pub fn from_resolv_conf(path: &Path) -> ResolverSettings {
        let conf = std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|text| {
                hickory_resolver::system_conf::parse_resolv_conf(text).map_err(|e| e.to_string())
            })
            .map_err(|e| format!("no resolver from {}: {e}", path.display()));
        if let Err(e) = &conf {
            tracing::warn!("{e}; endpoints known by hostname only cannot be reached");
        }
        ResolverSettings(conf)
    }

    pub fn from_parts(config: ResolverConfig, opts: ResolverOpts) -> ResolverSettings {
        ResolverSettings(Ok((config, opts)))
    }

    /// No resolver at all: every lookup fails with `why`.
    pub fn unavailable(why: &str) -> ResolverSettings {
        ResolverSettings(Err(why.to_string()))
    }

    /// A resolver whose every lookup ends within `timeout`.
    pub fn build(&self, timeout: Duration) -> OnDemand {
        let resolver = self
            .0
            .clone()
            .and_then(|(config, opts)| build(config, opts));
        OnDemand { resolver, timeout }
    }
}

pub struct OnDemand {
    resolver: Result<TokioResolver, String>,
    timeout: Duration,
}

impl OnDemand {
    /// The addresses `hostname` has, of both families (the caller picks one); an error
    /// says why there are none to use.
    pub async fn lookup(&self, hostname: &str) -> Result<Vec<IpAddr>, String> {
        let resolver = self.resolver.as_ref().map_err(Clone::clone)?;
        match tokio::time::timeout(self.timeout, resolver.lookup_ip(hostname)).await {
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
            // The resolver's own words for these quote the whole query; the caller names
            // the host already.
            Ok(Err(e)) if e.is_nx_domain() => Err("no such name (NXDOMAIN)".to_string()),
            Ok(Err(e)) if e.is_no_records_found() => Err("no address records".to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(found)) => Ok(found.iter().collect()),
        }
    }
}

fn build(config: ResolverConfig, mut opts: ResolverOpts) -> Result<TokioResolver, String> {
    // Both families, in parallel: which one the connection can use is decided after
    // (`state::pick_address`), from the service and the address the client dialed.
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{RData, Record, RecordType};
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig};
    use tokio::net::UdpSocket;

    use super::*;

    /// A server on 127.0.0.1 that answers A questions for `known` with 192.0.2.7 and
    /// NXDOMAIN for the rest, or, with `silent`, never answers.
    async fn server(known: &'static str, silent: bool) -> SocketAddr {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                if silent {
                    continue;
                }
                let q = Message::from_vec(&buf[..n]).unwrap();
                let query = q.queries[0].clone();
                let mut m = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
                m.add_query(query.clone());
                if query.name().to_ascii().trim_end_matches('.') != known {
                    m.metadata.response_code = ResponseCode::NXDomain;
                } else if query.query_type() == RecordType::A {
                    let a = RData::A(A::new(192, 0, 2, 7));
                    m.add_answer(Record::from_rdata(query.name().clone(), 30, a));
                }
                udp.send_to(&m.to_vec().unwrap(), from).await.unwrap();
            }
        });
        addr
    }

    fn resolver(server: SocketAddr, timeout: Duration) -> OnDemand {
        let mut conn = ConnectionConfig::udp();
        conn.port = server.port();
        let mut ns = NameServerConfig::udp(server.ip());
        ns.connections = vec![conn];
        let config = ResolverConfig::from_parts(None, vec![], vec![ns]);
        let mut opts = ResolverOpts::default();
        opts.timeout = Duration::from_millis(200);
        ResolverSettings::from_parts(config, opts).build(timeout)
    }

    #[tokio::test]
    async fn found_unknown_and_silent() {
        let r = resolver(server("ext.example.com", false).await, LOOKUP_TIMEOUT);
        let found = r.lookup("ext.example.com.").await.unwrap();
        assert_eq!(found, [IpAddr::from([192, 0, 2, 7])]);
        let e = r.lookup("gone.example.com.").await.unwrap_err();
        assert_eq!(e, "no such name (NXDOMAIN)");

        // A server that never answers: the bound, not the resolver's retries, ends it.
        let quiet = resolver(server("", true).await, Duration::from_millis(300));
        let started = std::time::Instant::now();
        let e = quiet.lookup("ext.example.com.").await.unwrap_err();
        assert!(e.contains("no answer within"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2), "{e}");
    }

    #[test]
    fn an_unusable_resolv_conf_fails_lookups_not_start_up() {
        let r = ResolverSettings::from_resolv_conf(Path::new("/nonexistent/resolv.conf"))
            .build(LOOKUP_TIMEOUT);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let e = rt.block_on(r.lookup("ext.example.com")).unwrap_err();
        assert!(e.contains("/nonexistent/resolv.conf"), "{e}");
    }
}
