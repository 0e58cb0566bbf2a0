//! Socket options of the data path: transparent listeners (a captured connection's
//! local address is its original destination) and original-source upstream sockets
//! (the destination sees the real client address), all marked so capture never takes
//! ztunnel's own packets a second time.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

use bytes::{Bytes, BytesMut};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Linux: bind to an address without picking a port until connect(), so original-source
/// sockets share ephemeral ports per destination instead of exhausting them.
const IP_BIND_ADDRESS_NO_PORT: libc::c_int = 24;

fn setsockopt_int(
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

fn set_transparent(s: &Socket, v6: bool) -> io::Result<()> {
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
    pub async fn connect(&self, src: Option<IpAddr>, dst: SocketAddr) -> io::Result<TcpStream> {
        let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
        s.set_mark(self.mark)?;
        s.set_nodelay(true)?;
        s.set_nonblocking(true)?;
        if let Some(src) = src {
            let src = match (src, dst) {
                (IpAddr::V4(v4), SocketAddr::V6(_)) => IpAddr::V6(v4.to_ipv6_mapped()),
                (s, _) => s,
            };
            set_transparent(&s, dst.is_ipv6())?;
            setsockopt_int(&s, libc::SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)?;
            s.bind(&SocketAddr::new(src, 0).into())?;
        }
        let std: std::net::TcpStream = s.into();
        TcpSocket::from_std_stream(std).connect(dst).await
    }
}

/// The original destination of a captured connection: its local address.
pub fn original_dst(s: &TcpStream) -> io::Result<SocketAddr> {
    s.local_addr().map(canonical)
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

/// What the client has already sent, taken without waiting (empty when nothing has arrived
/// yet, or at EOF — which the next read sees again). Asks the kernel directly: tokio's
/// readiness cache knows nothing yet about a socket just accepted.
pub fn take_arrived(s: &TcpStream, max: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(max);
    match SockRef::from(s).recv(buf.spare_capacity_mut()) {
        Ok(n) => {
            // SAFETY: recv initialized the first n bytes of the spare capacity.
            unsafe { buf.set_len(n) };
            Ok(buf.freeze())
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
