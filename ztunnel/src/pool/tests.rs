use std::os::fd::AsRawFd;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::*;
use crate::hbone::tests::{start_drainable_server, start_server, Report, ECHO, FORBIDDEN};
use crate::identity::ca::CertificateAuthority;
use crate::tls::tests::{cert, id, test_ca};

/// Counts dials and remembers the sockets' fds so a test can cut connections.
#[derive(Default)]
struct TestDialer {
    count: AtomicUsize,
    fds: Mutex<Vec<i32>>,
}

#[async_trait]
impl Dialer for TestDialer {
    async fn dial(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        self.count.fetch_add(1, Ordering::SeqCst);
        let tcp = TcpDialer.dial(dst).await?;
        self.fds.lock().unwrap().push(tcp.as_raw_fd());
        Ok(tcp)
    }
}

/// Hands out certificates from the test CA (and counts how often it is asked).
struct TestCerts(CertificateAuthority);

#[async_trait]
impl CertSource for TestCerts {
    async fn cert(&self, identity: &Identity) -> Result<Arc<WorkloadCertificate>, String> {
        Ok(Arc::new(cert(&self.0, &identity.service_account)))
    }
}

struct Fixture {
    pool: Pool,
    dialer: Arc<TestDialer>,
    key: PoolKey,
    reports: mpsc::UnboundedReceiver<Report>,
}

async fn fixture(opts: PoolOptions) -> Fixture {
    let ca = test_ca();
    let (addr, reports) = start_server(&ca).await;
    let dialer = Arc::new(TestDialer::default());
    let pool = Pool::new(dialer.clone(), Arc::new(TestCerts(ca)), opts);
    let key = PoolKey::new(id("sleep"), vec![id("httpbin")], addr);
    Fixture {
        pool,
        dialer,
        key,
        reports,
    }
}

fn echo() -> ConnectRequest {
    ConnectRequest::new(SocketAddr::from(([127, 0, 0, 1], ECHO)))
}

async fn round_trip(pool: &Pool, key: &PoolKey, data: &[u8]) {
    round_trip_with_early(pool, key, &bytes::Bytes::new(), data).await
}

/// A stream opened with `early` sent along with its CONNECT, then `data`: the echo must
/// return both, in order.
async fn round_trip_with_early(pool: &Pool, key: &PoolKey, early: &bytes::Bytes, data: &[u8]) {
    let mut s = pool.connect_with_data(key, &echo(), early).await.unwrap();
    s.write_all(data).await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, [early.as_ref(), data].concat());
}

async fn eventually<F: FnMut() -> bool>(what: &str, mut f: F) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn reuses_one_connection() {
    let f = fixture(PoolOptions::default()).await;
    for _ in 0..5 {
        round_trip(&f.pool, &f.key, b"hello").await;
    }
    assert_eq!(f.dialer.count.load(Ordering::SeqCst), 1);
    assert_eq!(f.pool.connection_count(&f.key), 1);
    // Identity order doesn't make a different key.
    let same = PoolKey::new(id("sleep"), vec![id("httpbin"), id("httpbin")], f.key.dst);
    round_trip(&f.pool, &same, b"again").await;
    assert_eq!(f.pool.dials(), 1);
}

#[tokio::test]
async fn concurrent_first_uses_share_one_dial() {
    let f = fixture(PoolOptions::default()).await;
    let tasks = (0..30).map(|i| {
        let (pool, key) = (f.pool.clone(), f.key.clone());
        tokio::spawn(async move { round_trip(&pool, &key, format!("msg {i}").as_bytes()).await })
    });
    for t in futures::future::join_all(tasks).await {
        t.unwrap();
    }
    assert_eq!(f.dialer.count.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn full_connection_opens_another() {
    let opts = PoolOptions {
        max_streams_per_conn: 2,
        ..Default::default()
    };
    let f = fixture(opts).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(f.pool.connect(&f.key, &echo()).await.unwrap());
    }
    assert_eq!(f.dialer.count.load(Ordering::SeqCst), 2);
    assert_eq!(f.pool.connection_count(&f.key), 2);
    held.clear();
    // Slots freed: no third connection.
    for _ in 0..4 {
        round_trip(&f.pool, &f.key, b"x").await;
    }
    assert_eq!(f.dialer.count.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn idle_connections_expire() {
    let opts = PoolOptions {
        idle_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let mut f = fixture(opts).await;
    round_trip(&f.pool, &f.key, b"hello").await;
    assert_eq!(f.pool.connection_count(&f.key), 1);
    let pool = f.pool.clone();
    let key = f.key.clone();
    eventually("idle expiry", || pool.connection_count(&key) == 0).await;
    // The server sees the connection go away.
    loop {
        match tokio::time::timeout(Duration::from_secs(10), f.reports.recv())
            .await
            .unwrap()
        {
            Some(Report::ConnectionClosed) => break,
            Some(_) => continue,
            None => panic!("server gone"),
        }
    }
    round_trip(&f.pool, &f.key, b"again").await;
    assert_eq!(f.dialer.count.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn busy_connection_is_not_reaped() {
    let opts = PoolOptions {
        idle_timeout: Duration::from_millis(100),
        ..Default::default()
    };
    let f = fixture(opts).await;
    let mut s = f.pool.connect(&f.key, &echo()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(f.pool.connection_count(&f.key), 1);
    s.write_all(b"still here").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"still here");
}

#[tokio::test]
async fn dead_connection_is_replaced() {
    let f = fixture(PoolOptions::default()).await;
    round_trip(&f.pool, &f.key, b"hello").await;
    // Cut the TCP connection under the pool's feet.
    let fd = f.dialer.fds.lock().unwrap()[0];
    // SAFETY: shutdown() on a socket fd the pool still owns; it does not close the fd.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    let pool = f.pool.clone();
    let key = f.key.clone();
    eventually("dead connection evicted", || {
        pool.connection_count(&key) == 0
    })
    .await;
    round_trip(&f.pool, &f.key, b"after").await;
    assert_eq!(f.dialer.count.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn stream_errors_do_not_poison_the_connection() {
    let f = fixture(PoolOptions::default()).await;
    let forbidden = ConnectRequest::new(SocketAddr::from(([127, 0, 0, 1], FORBIDDEN)));
    let err = f.pool.connect(&f.key, &forbidden).await.err().unwrap();
    assert!(
        matches!(err, PoolError::Stream(HboneError::Status(s)) if s.as_u16() == 403),
        "{err}"
    );
    round_trip(&f.pool, &f.key, b"ok").await;
    assert_eq!(f.dialer.count.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn wrong_destination_identity_fails_every_waiter() {
    let f = fixture(PoolOptions::default()).await;
    let key = PoolKey::new(id("sleep"), vec![id("not-httpbin")], f.key.dst);
    let tasks = (0..5).map(|_| {
        let (pool, key) = (f.pool.clone(), key.clone());
        tokio::spawn(async move { pool.connect(&key, &echo()).await.err().unwrap() })
    });
    for t in futures::future::join_all(tasks).await {
        let err = t.unwrap();
        assert!(
            matches!(&err, PoolError::Connect { err, .. } if matches!(**err, ConnectError::Tls(_))),
            "{err}"
        );
    }
    assert_eq!(f.dialer.count.load(Ordering::SeqCst), 1);
    assert_eq!(f.pool.connection_count(&key), 0);
    // Failures are not cached: the next attempt dials again.
    assert!(f.pool.connect(&key, &echo()).await.is_err());
    assert_eq!(f.dialer.count.load(Ordering::SeqCst), 2);
}

/// A peer ztunnel handing over to a new process drains its HTTP/2 connections with
/// GOAWAY: streams already open finish on it, new ones go over a fresh connection.
#[tokio::test]
async fn draining_peer_keeps_open_streams_and_new_ones_redial() {
    let ca = test_ca();
    let (addr, mut reports, drain) = start_drainable_server(&ca).await;
    let dialer = Arc::new(TestDialer::default());
    let pool = Pool::new(
        dialer.clone(),
        Arc::new(TestCerts(ca)),
        PoolOptions::default(),
    );
    let key = PoolKey::new(id("sleep"), vec![id("httpbin")], addr);
    let mut open = pool.connect(&key, &echo()).await.unwrap();
    open.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).await.unwrap();

    drain.send(()).unwrap();
    // The GOAWAY reaches the client; every new stream must still succeed — with the bytes
    // sent along with its CONNECT delivered even when the draining peer refused the
    // stream and the pool redialed.
    for i in 0..20u8 {
        round_trip_with_early(&pool, &key, &bytes::Bytes::from(vec![i; 2]), &[i; 3]).await;
    }
    assert_eq!(
        dialer.count.load(Ordering::SeqCst),
        2,
        "one redial, then reuse"
    );
    // The stream opened before the drain still works, then its connection closes.
    open.write_all(b"after!").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"after!");
    open.shutdown().await.unwrap();
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).await.unwrap();
    drop(open);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), reports.recv()).await {
            Ok(Some(Report::ConnectionClosed)) => break,
            Ok(Some(_)) => continue,
            other => panic!("drained connection never closed: {other:?}"),
        }
    }
}

/// `ztunnel_pool_connections_opened` counts established connections (not failed dials),
/// `..._active` the ones the pool holds, down again once the pool lets them go.
#[tokio::test]
async fn connections_are_counted_in_the_metrics() {
    let metrics = PoolMetrics::default();
    let opts = PoolOptions {
        max_streams_per_conn: 1,
        idle_timeout: Duration::from_millis(200),
        metrics: metrics.clone(),
        ..Default::default()
    };
    let f = fixture(opts).await;
    let counts = || (metrics.opened.get(), metrics.active.get());
    assert_eq!(counts(), (0, 0));
    let first = f.pool.connect(&f.key, &echo()).await.unwrap();
    let second = f.pool.connect(&f.key, &echo()).await.unwrap();
    assert_eq!(counts(), (2, 2), "one stream each: two connections");
    // Busy connections stay past the idle timeout, and stay counted.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(counts(), (2, 2));
    drop((first, second));
    eventually("idle connections no longer counted", || counts() == (2, 0)).await;
    // A dial that fails (wrong peer identity) opens nothing.
    let wrong = PoolKey::new(id("sleep"), vec![id("not-httpbin")], f.key.dst);
    assert!(f.pool.connect(&wrong, &echo()).await.is_err());
    assert_eq!(counts(), (2, 0));
    round_trip(&f.pool, &f.key, b"again").await;
    assert_eq!(counts(), (3, 1));
    // Dropping the pool lets go of everything.
    drop(f.pool);
    eventually("connections of a dropped pool", || counts() == (3, 0)).await;
}

/// A peer that stops answering (its node died, its path did): the pooled connection's
/// PING goes unanswered, the connection is closed and the pool no longer holds it.
#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_evicted() {
    let ca = test_ca();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_cert = cert(&ca, "httpbin");
    tokio::spawn(async move {
        let mut frozen = Vec::new();
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let config = tls::server_config(&server_cert).unwrap();
            let (tls, _) = tls::accept(config, tcp).await.unwrap();
            // Handshake, then never poll the connection again: no PONG, no answer.
            let conn = h2::server::handshake(tls).await.unwrap();
            frozen.push(conn);
        }
    });
    let opts = PoolOptions {
        keepalive: Some(hbone::Keepalive {
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(100),
        }),
        ..Default::default()
    };
    let pool = Pool::new(
        Arc::new(TestDialer::default()),
        Arc::new(TestCerts(ca)),
        opts,
    );
    let key = PoolKey::new(id("sleep"), vec![id("httpbin")], addr);
    let before = crate::limits::hits("hbone_keepalive_timeout");
    let (p, k) = (pool.clone(), key.clone());
    let stuck = tokio::spawn(async move { p.connect(&k, &echo()).await.map(|_| ()) });
    eventually("the connection is up", || pool.connection_count(&key) == 1).await;
    eventually("the silent connection is evicted", || {
        pool.connection_count(&key) == 0
    })
    .await;
    assert!(crate::limits::hits("hbone_keepalive_timeout") > before);
    assert!(stuck.await.unwrap().is_err(), "its stream failed, not hung");
}
