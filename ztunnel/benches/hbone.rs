//! Micro-benchmarks of the tunnel's hot paths over loopback mTLS: opening an HBONE stream
//! on a pooled connection, setting up a whole new tunnel (TCP + TLS 1.3 + HTTP/2 +
//! CONNECT), bulk data through a stream and through the proxy's relay on both ends, and
//! the copy loop that splices sockets.
//!
//! `cargo bench -p ztunnel --bench hbone`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

use ztunnel::hbone::{self, ConnectRequest, InboundRequest};
use ztunnel::identity::ca::{CaOptions, CertificateAuthority};
use ztunnel::identity::{Identity, WorkloadCertificate};
use ztunnel::pool::{CertSource, Pool, PoolKey, PoolOptions, TcpDialer};
use ztunnel::tls;

/// CONNECT targets the bench server handles itself, so only the tunnel is measured. Any
/// other port is a real upstream on loopback, dialed and relayed as the proxy does.
const ECHO: u16 = 1;
const SINK: u16 = 2;
/// Bytes per iteration of the bulk benchmarks.
const BULK: usize = 16 * 1024 * 1024;

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "bench", sa)
}

struct Certs(Arc<CertificateAuthority>);

#[async_trait]
impl CertSource for Certs {
    async fn cert(&self, identity: &Identity) -> Result<Arc<WorkloadCertificate>, String> {
        self.0
            .issue_workload_cert(identity, Duration::from_secs(3600))
            .map(Arc::new)
            .map_err(|e| e.to_string())
    }
}

/// Runtime shaped like the proxy's (multi-threaded), with an HBONE server on loopback
/// presenting identity `server`.
struct Fixture {
    rt: Runtime,
    ca: Arc<CertificateAuthority>,
    addr: SocketAddr,
}

fn fixture() -> Fixture {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ca = Arc::new(CertificateAuthority::new(CaOptions::new("cluster.local")).unwrap());
    let server_cert = ca
        .issue_workload_cert(&id("server"), Duration::from_secs(3600))
        .unwrap();
    let config = tls::server_config(&server_cert).unwrap();
    let addr = rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let config = config.clone();
                tokio::spawn(async move {
                    let Ok((tls, peer)) = tls::accept(config, tcp).await else {
                        return;
                    };
                    let _ = hbone::serve_connection(tls, peer, handle).await;
                });
            }
        });
        addr
    });
    Fixture { rt, ca, addr }
}

async fn handle(req: InboundRequest) {
    let port = req.target.port();
    if port != ECHO && port != SINK {
        let Ok(upstream) = TcpStream::connect(req.target).await else {
            return;
        };
        let _ = upstream.set_nodelay(true);
        if let Ok(s) = req.accept() {
            let _ = hbone::relay_tunnel(upstream, s).await;
        }
        return;
    }
    let Ok(mut s) = req.accept() else { return };
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                total += n as u64;
                if port == ECHO && s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    // SINK reports what it received, so the client knows when all of it arrived.
    if port == SINK {
        let _ = s.write_all(&total.to_be_bytes()).await;
    }
    let _ = s.shutdown().await;
}

impl Fixture {
    fn pool(&self) -> (Pool, PoolKey) {
        let _guard = self.rt.enter();
        let pool = Pool::new(
            Arc::new(TcpDialer),
            Arc::new(Certs(self.ca.clone())),
            PoolOptions::default(),
        );
        (
            pool,
            PoolKey::new(id("client"), vec![id("server")], self.addr),
        )
    }
}

fn target(port: u16) -> ConnectRequest {
    ConnectRequest::new(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// One byte there and back on a stream: proves the stream is open end to end.
async fn ping<S: AsyncReadExt + AsyncWriteExt + Unpin>(s: &mut S) {
    s.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
}

/// A new CONNECT stream on an already established (pooled) mTLS connection.
fn stream_setup(c: &mut Criterion) {
    let f = fixture();
    let (pool, key) = f.pool();
    let req = target(ECHO);
    c.bench_function("hbone/stream_setup_pooled", |b| {
        b.iter(|| {
            f.rt.block_on(async {
                let mut s = pool.connect(&key, &req).await.unwrap();
                ping(&mut s).await;
            })
        })
    });
}

/// A whole new tunnel: TCP connect, mTLS 1.3 handshake with SPIFFE checks both ways,
/// HTTP/2 handshake, CONNECT, one byte round trip — what a cold pool pays.
fn connection_setup(c: &mut Criterion) {
    let f = fixture();
    let cert =
        f.ca.issue_workload_cert(&id("client"), Duration::from_secs(3600))
            .unwrap();
    let req = target(ECHO);
    c.bench_function("hbone/connection_setup", |b| {
        b.iter(|| {
            f.rt.block_on(async {
                let config = tls::client_config(&cert, &[id("server")]).unwrap();
                let tcp = TcpStream::connect(f.addr).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                let tls = tls::connect(config, f.addr, tcp).await.unwrap();
                let (send, _driver) = hbone::handshake(tls).await.unwrap();
                let mut s = hbone::connect_stream(&send, &req).await.unwrap();
                ping(&mut s).await;
            })
        })
    });
}

/// Bulk data through one HBONE stream (TLS records + HTTP/2 DATA frames + flow control).
fn stream_throughput(c: &mut Criterion) {
    let f = fixture();
    let (pool, key) = f.pool();
    let req = target(SINK);
    let data = vec![0x5au8; 256 * 1024];
    bulk(c, "stream_throughput_16MiB", || {
        f.rt.block_on(async {
            let mut s = pool.connect(&key, &req).await.unwrap();
            for _ in 0..BULK / data.len() {
                s.write_all(&data).await.unwrap();
            }
            s.shutdown().await.unwrap();
            let mut count = [0u8; 8];
            s.read_exact(&mut count).await.unwrap();
            assert_eq!(u64::from_be_bytes(count), BULK as u64);
        })
    });
}

/// The proxy's data path on both ends: a client socket relayed into an HBONE stream
/// (`hbone::relay_tunnel`, as outbound does), and on the server the stream relayed to a
/// real upstream socket (as inbound does). Unlike `stream_throughput`, no copy between the
/// sockets and HTTP/2: what is left are TLS's and the kernel's.
fn tunnel_relay(c: &mut Criterion) {
    let f = fixture();
    let (pool, key) = f.pool();
    let (mut client, mut sink) = f.rt.block_on(async {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (front_addr, back_addr) = (front.local_addr().unwrap(), back.local_addr().unwrap());
        let tunnel = pool
            .connect(&key, &ConnectRequest::new(back_addr))
            .await
            .unwrap();
        tokio::spawn(async move {
            let (a, _) = front.accept().await.unwrap();
            let _ = a.set_nodelay(true);
            let _ = hbone::relay_tunnel(a, tunnel).await;
        });
        let client = TcpStream::connect(front_addr).await.unwrap();
        let (sink, _) = back.accept().await.unwrap();
        (client, sink)
    });
    let data = vec![0x5au8; 256 * 1024];
    bulk(c, "tunnel_relay_16MiB", || {
        f.rt.block_on(pump(&mut client, &mut sink, &data))
    });
}

/// Writes `BULK` bytes into `client` in `data`-sized writes while reading them all from
/// `sink` at the other end of whatever relays them.
async fn pump(client: &mut TcpStream, sink: &mut TcpStream, data: &[u8]) {
    let reader = async {
        let mut buf = vec![0u8; 256 * 1024];
        let mut left = BULK;
        while left > 0 {
            left -= sink.read(&mut buf).await.unwrap();
        }
    };
    let writer = async {
        for _ in 0..BULK / data.len() {
            client.write_all(data).await.unwrap();
        }
    };
    tokio::join!(reader, writer);
}

/// A bulk benchmark on both clocks: wall time (group `hbone`: what a user waits) and the
/// process's CPU time, all threads, user and system (group `hbone_cpu`: what it costs).
/// On a busy machine the second is the steadier: waiting for a core does not count.
fn bulk(c: &mut Criterion, name: &str, mut run: impl FnMut()) {
    let mut g = c.benchmark_group("hbone");
    g.throughput(Throughput::Bytes(BULK as u64));
    g.bench_function(name, |b| b.iter(&mut run));
    g.finish();
    let mut g = c.benchmark_group("hbone_cpu");
    g.throughput(Throughput::Bytes(BULK as u64));
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let start = cpu_time();
            for _ in 0..iters {
                run();
            }
            cpu_time() - start
        })
    });
    g.finish();
}

/// CPU time of the whole process so far.
fn cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The copy loop alone: a relay splicing two loopback TCP connections with
/// `hbone::copy_bidirectional`, as the proxy splices a pod's socket to its upstream.
fn copy_loop(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (mut client, mut sink) = rt.block_on(async {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (front_addr, back_addr) = (front.local_addr().unwrap(), back.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut a, _) = front.accept().await.unwrap();
            let mut b = TcpStream::connect(back_addr).await.unwrap();
            let _ = hbone::copy_bidirectional(&mut a, &mut b).await;
        });
        let client = TcpStream::connect(front_addr).await.unwrap();
        let (sink, _) = back.accept().await.unwrap();
        (client, sink)
    });
    let data = vec![0x5au8; 256 * 1024];
    let mut g = c.benchmark_group("copy");
    g.throughput(Throughput::Bytes(BULK as u64));
    g.bench_function("relay_loopback_16MiB", |b| {
        b.iter(|| rt.block_on(pump(&mut client, &mut sink, &data)))
    });
    g.finish();
}

fn config() -> Criterion {
    // Short runs: the suite is a tuning aid, not a regression gate.
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = stream_setup, connection_setup, stream_throughput, tunnel_relay, copy_loop
}
criterion_main!(benches);
