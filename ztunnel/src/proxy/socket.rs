//! Socket options of the data path: transparent listeners (a captured connection's
//! local address is its original destination) and original-source upstream sockets
//! (the destination sees the real client address), all marked so capture never takes
//! ztunnel's own packets a second time.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

use bytes::Bytes;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Linux: bind to an address without picking a port until connect(), so original-source
/// sockets share ephemeral ports per destination instead of exhausting them.
const IP_BIND_ADDRESS_NO_PORT: libc::c_int = 24;

pub(crate) fn setsockopt_int(
    fd: &impl AsRawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub(crate) fn set_transparent(s: &Socket, v6: bool) -> io::Result<()> {
    if v6 {
        setsockopt_int(s, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1)
    } else {
        setsockopt_int(s, libc::SOL_IP, libc::IP_TRANSPARENT, 1)
    }
}

/// A listener that accepts connections for any destination address the capture program
/// assigns to it. IPv6 listeners are v6-only; IPv4 has its own.
pub fn transparent_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let l = transparent_std_listener(addr)?;
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

/// [`transparent_listener`] as a blocking std listener.
pub fn transparent_std_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let v6 = addr.is_ipv6();
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if v6 {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    set_transparent(&s, v6)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

/// How ztunnel's upstream sockets are made.
#[derive(Clone, Copy, Debug)]
pub struct Dialer {
    pub mark: u32,
}

impl Dialer {
    /// Connects to `dst`, from `src` (an address that is not ours: the client pod's)
    /// when given, else from the node.
    ///
    /// With the client's port too, the connection takes the client's own 4-tuple: no
    /// search of the node's ephemeral range, in which the TIME_WAITs of a client making
    /// many short connections to one pod would pile up until no port is left. Should that
    /// 4-tuple still be taken here (a TIME_WAIT of an earlier connection the client's
    /// kernel has already reused, a listener on that port), an ephemeral port is used.
    pub async fn connect(&self, src: Option<SocketAddr>, dst: SocketAddr) -> io::Result<TcpStream> {
        if let Some(src) = src.filter(|s| s.port() != 0) {
            match self.connect_from(Some(src), dst).await {
                Err(e) if is_taken(&e) => {
                    tracing::debug!(%src, %dst, "client's port taken on this node, using another: {e}")
                }
                done => return done,
            }
        }
        let any_port = src.map(|s| SocketAddr::new(s.ip(), 0));
        self.connect_from(any_port, dst).await
    }

    async fn connect_from(
        &self,
        src: Option<SocketAddr>,
        dst: SocketAddr,
    ) -> io::Result<TcpStream> {
        let s = Socket::new(
            Domain::for_address(dst),
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )?;
        s.set_mark(self.mark)?;
        s.set_nodelay(true)?;
        if let Some(src) = src {
            let ip = match (src.ip(), dst) {
                (IpAddr::V4(v4), SocketAddr::V6(_)) => IpAddr::V6(v4.to_ipv6_mapped()),
                (ip, _) => ip,
            };
            set_transparent(&s, dst.is_ipv6())?;
            // Also lets a later connection from this address and port bind over this
            // one's TIME_WAIT (connect still refuses the same 4-tuple).
            s.set_reuse_address(true)?;
            if src.port() == 0 {
                setsockopt_int(&s, libc::SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)?;
            }
            s.bind(&SocketAddr::new(ip, src.port()).into())?;
        }
        let std: std::net::TcpStream = s.into();
        TcpSocket::from_std_stream(std).connect(dst).await
    }
}

/// The address or the 4-tuple is in use (bind: `EADDRINUSE`; connect: `EADDRNOTAVAIL`).
fn is_taken(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EADDRINUSE) | Some(libc::EADDRNOTAVAIL)
    )
}

/// The original destination of a captured connection: its local address.
pub fn original_dst(s: &TcpStream) -> io::Result<SocketAddr> {
    s.local_addr().map(canonical)
}

/// Whether `dst` is an address of this node (binding to it succeeds only then, without
/// `IP_TRANSPARENT`).
pub fn is_local(dst: SocketAddr) -> bool {
    std::net::TcpListener::bind(SocketAddr::new(dst.ip(), 0)).is_ok()
}

/// Whether `ip` is one of this node's own addresses (loopback included): binding to it
/// succeeds only then (without `IP_TRANSPARENT`; no port is taken). A node that allows
/// binding any address (`ip_nonlocal_bind`) answers yes for all: claims are then refused,
/// which fails closed.
pub fn is_node_address(ip: IpAddr) -> bool {
    let addr = SocketAddr::new(ip, 0);
    let Ok(s) = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)) else {
        return true; // cannot tell: do not believe it
    };
    if setsockopt_int(&s, libc::SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1).is_err() {
        return true;
    }
    s.bind(&addr.into()).is_ok()
}

/// IPv4-mapped IPv6 addresses as plain IPv4.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// The most [`take_arrived`] takes.
pub const ARRIVED_MAX: usize = 32 * 1024;

/// What the client has already sent, up to [`ARRIVED_MAX`] bytes, taken without waiting
/// (empty when nothing has arrived yet, or at EOF — which the next read sees again). Asks
/// the kernel directly: tokio's readiness cache knows nothing yet about a socket just
/// accepted. Read on the stack and copied to its exact size: a 32 KiB buffer kept for the
/// few bytes a request usually is cost ~4 KiB of RSS per open connection (42 MiB more at
/// 10,000 connections in `cargo xtask soak`).
pub fn take_arrived(s: &TcpStream) -> io::Result<Bytes> {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); ARRIVED_MAX];
    match SockRef::from(s).recv(&mut buf) {
        Ok(n) => {
            // SAFETY: recv initialized the first n bytes.
            let got = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
            Ok(Bytes::copy_from_slice(got))
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Bytes::new()),
        Err(e) => Err(e),
    }
}

pub fn set_nodelay(s: &TcpStream) {
    let _ = SockRef::from(s).set_nodelay(true);
}

#[async_trait::async_trait]
impl crate::pool::Dialer for Dialer {
    /// Tunnels to other nodes leave from the node's own address, marked.
    async fn dial(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        self.connect(None, dst).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port free on `ip` right now.
    fn free_port(ip: IpAddr) -> u16 {
        std::net::TcpListener::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// The address the server sees for a connection dialed from `src`.
    async fn seen_from(dialer: &Dialer, server: &TcpListener, src: SocketAddr) -> TcpStream {
        let up = dialer.connect(Some(src), server.local_addr().unwrap());
        let (up, accepted) = tokio::join!(up, server.accept());
        let (_, peer) = accepted.unwrap();
        let up = up.unwrap();
        assert_eq!(up.local_addr().unwrap(), peer);
        up
    }

    #[tokio::test]
    async fn dials_from_the_clients_port_and_falls_back_when_it_is_taken() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: IP_TRANSPARENT and SO_MARK need root (CAP_NET_ADMIN)");
            return;
        }
        // 127.0.0.2 is local (all of 127/8 is), so this needs no transparent routing; the
        // options set on the way (mark, IP_TRANSPARENT) need root, as ztunnel does.
        let dialer = Dialer { mark: 0 };
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ip: IpAddr = "127.0.0.2".parse().unwrap();

        let src = SocketAddr::new(ip, free_port(ip));
        let first = seen_from(&dialer, &server, src).await;
        assert_eq!(first.local_addr().unwrap(), src, "the client's own port");

        // The same 4-tuple is still in use: another port, not an error.
        let second = seen_from(&dialer, &server, src).await;
        assert_eq!(second.local_addr().unwrap().ip(), ip);
        assert_ne!(second.local_addr().unwrap().port(), src.port());

        // A listener holds the port: likewise.
        let held = std::net::TcpListener::bind((ip, 0)).unwrap();
        let src = held.local_addr().unwrap();
        let third = seen_from(&dialer, &server, src).await;
        assert_ne!(third.local_addr().unwrap().port(), src.port());

        // No port given: an ephemeral one, as before.
        let fourth = seen_from(&dialer, &server, SocketAddr::new(ip, 0)).await;
        assert_ne!(fourth.local_addr().unwrap().port(), 0);
    }
}
