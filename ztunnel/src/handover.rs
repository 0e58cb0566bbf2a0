//! Upgrades without refusing a connection: a new ztunnel takes the listening sockets of
//! the running one instead of binding its own.
//!
//! Closing a listener resets every connection waiting in its accept queue, and between
//! one process closing and the next binding, capture has no listener to steer SYNs to.
//! So the sockets themselves move: the running process passes duplicates of its
//! listening sockets (data path and admin) over a Unix socket with `SCM_RIGHTS`; the
//! queue is shared, nothing is closed, and the old process then stops accepting and
//! drains the connections it already has. The eBPF side needs nothing: its links and
//! maps are pinned and the new process adopts them (`capture`).
//!
//! The Unix socket is `<dir>/<instance>/handover.sock` (`--handover-dir`, default
//! `/var/run/ztunnel`), in a root-only directory: it hands out the data path's listeners,
//! so it must not be reachable by whatever else runs on the host network (an abstract
//! socket would be). The server also checks the peer's uid (`SO_PEERCRED`) is its own.
//! On Kubernetes the directory is a hostPath only the ztunnel pods mount.
//!
//! Exchange (the old process serves, the new one asks):
//! new → `take\n`; old → JSON list of local addresses + one fd per address;
//! new → `ack\n`; old closes its Unix listener and removes the file, answers `bye\n`, and
//! stops accepting. Without the ack (the new process died) the old one keeps serving.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, sockopt::PeerCredentials, ControlMessage, ControlMessageOwned,
    MsgFlags,
};
use tracing::{info, warn};

/// How long either side waits for the other's next message.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_SOCKETS: usize = 32;

/// Where the running ztunnel of `instance` listens for its successor.
pub fn socket_path(dir: &Path, instance: &str) -> PathBuf {
    dir.join(instance).join("handover.sock")
}

/// The listening sockets this process serves, for handing to its successor.
#[derive(Clone, Default)]
pub struct Registry(Arc<Mutex<Vec<(SocketAddr, OwnedFd)>>>);

impl Registry {
    /// Records `l` (a duplicate of its fd: the listener itself stays with its owner).
    pub fn add(&self, l: &std::net::TcpListener) -> std::io::Result<()> {
        let addr = l.local_addr()?;
        let fd = l.try_clone()?.into();
        self.0.lock().expect("registry").push((addr, fd));
        Ok(())
    }

    /// Records a UDP socket (the DNS proxy's), as [`Registry::add`]. The successor tells
    /// it from a listener on the same address by its type.
    pub fn add_udp(&self, s: &std::net::UdpSocket) -> std::io::Result<()> {
        let addr = s.local_addr()?;
        let fd = s.try_clone()?.into();
        self.0.lock().expect("registry").push((addr, fd));
        Ok(())
    }

    fn entries(&self) -> Vec<(SocketAddr, RawFd)> {
        let g = self.0.lock().expect("registry");
        g.iter().map(|(a, fd)| (*a, fd.as_raw_fd())).collect()
    }

    /// Closes this process's duplicates (after a handover they are the successor's).
    pub fn clear(&self) {
        self.0.lock().expect("registry").clear();
    }
}

/// Sockets received from the previous ztunnel, by local address and kind: TCP listeners
/// (`udp` false) and the DNS proxy's UDP sockets.
#[derive(Default)]
pub struct Inherited(HashMap<(SocketAddr, bool), OwnedFd>);

impl Inherited {
    /// The inherited listener for `addr`, else a new one from `bind`.
    pub fn take_or_bind(
        &mut self,
        addr: SocketAddr,
        bind: impl FnOnce(SocketAddr) -> std::io::Result<std::net::TcpListener>,
    ) -> std::io::Result<std::net::TcpListener> {
        match self.0.remove(&(addr, false)) {
            Some(fd) => Ok(fd.into()),
            None => bind(addr),
        }
    }

    /// The inherited UDP socket for `addr`, else a new one from `bind`.
    pub fn take_or_bind_udp(
        &mut self,
        addr: SocketAddr,
        bind: impl FnOnce(SocketAddr) -> std::io::Result<std::net::UdpSocket>,
    ) -> std::io::Result<std::net::UdpSocket> {
        match self.0.remove(&(addr, true)) {
            Some(fd) => Ok(fd.into()),
            None => bind(addr),
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Addresses received but not used (the new configuration dropped them).
    pub fn unused(&self) -> Vec<SocketAddr> {
        self.0.keys().map(|(a, _)| *a).collect()
    }
}

/// Whether a ztunnel answers on `path`.
pub fn is_running(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// A running ztunnel of this instance that answered.
pub struct Predecessor(UnixStream);

impl Predecessor {
    /// Connects to the running ztunnel serving `path`, if there is one.
    pub fn find(path: &Path) -> Option<Predecessor> {
        let s = UnixStream::connect(path).ok()?;
        s.set_read_timeout(Some(EXCHANGE_TIMEOUT)).ok()?;
        Some(Predecessor(s))
    }

    /// Takes its listening sockets. When this returns, the predecessor has stopped
    /// accepting and its socket path is free for ours.
    pub fn take_listeners(mut self) -> anyhow::Result<Inherited> {
        self.0
            .write_all(b"take\n")
            .context("asking for the listeners")?;
        let (addrs, fds) = receive(&self.0)?;
        if addrs.len() != fds.len() {
            anyhow::bail!(
                "predecessor sent {} addresses but {} sockets",
                addrs.len(),
                fds.len()
            );
        }
        let mut inherited = Inherited::default();
        for (addr, fd) in addrs.into_iter().zip(fds) {
            let sock = socket2::SockRef::from(&fd);
            let actual = sock
                .local_addr()
                .context("inherited socket")?
                .as_socket()
                .context("inherited socket is not an IP socket")?;
            if actual != addr {
                anyhow::bail!("inherited socket for {addr} is bound to {actual}");
            }
            let udp = sock.r#type().context("inherited socket's type")? == socket2::Type::DGRAM;
            inherited.0.insert((addr, udp), fd);
        }
        self.0.write_all(b"ack\n").context("acknowledging")?;
        let mut bye = String::new();
        BufReader::new(&self.0)
            .read_line(&mut bye)
            .context("waiting for the predecessor to let go")?;
        if bye.trim() != "bye" {
            anyhow::bail!("unexpected answer from the predecessor: {bye:?}");
        }
        Ok(inherited)
    }
}

fn receive(s: &UnixStream) -> anyhow::Result<(Vec<SocketAddr>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; MAX_SOCKETS]);
    let msg = recvmsg::<()>(
        s.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .context("receiving the listeners")?;
    let mut fds = vec![];
    for c in msg.cmsgs().context("control messages")? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: SCM_RIGHTS installed these fds in this process; nothing else owns them.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let len = msg.bytes;
    let addrs: Vec<SocketAddr> =
        serde_json::from_slice(&buf[..len]).context("listener list from the predecessor")?;
    Ok((addrs, fds))
}

/// Serves `path` until a successor has taken the listeners; then `handed` fires. Runs on
/// its own thread (blocking I/O, rare). Fails if another process answers there.
pub fn serve(
    path: &Path,
    registry: Registry,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<()>> {
    let listener =
        bind(path).with_context(|| format!("binding the handover socket {}", path.display()))?;
    let path = path.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("handover".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let conn = match conn {
                    Ok(conn) => conn,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning this thread.
                        warn!("handover socket: accept failed: {e}");
                        std::thread::sleep(crate::admin::http::ACCEPT_BACKOFF);
                        continue;
                    }
                };
                match hand_over(&conn, &registry) {
                    Ok(false) => {}
                    Ok(true) => {
                        // Free the path for the successor's own server before it asks.
                        drop(listener);
                        let _ = std::fs::remove_file(&path);
                        let _ = (&conn).write_all(b"bye\n");
                        info!("listeners handed to a new ztunnel");
                        let _ = tx.send(());
                        return;
                    }
                    Err(e) => warn!("handover to a new ztunnel failed, still serving: {e:#}"),
                }
            }
        })?;
    Ok(rx)
}

/// Binds `path` in a root-only directory. A file nobody answers on is a dead process's
/// and is replaced; one that answers is a live ztunnel's (our predecessor may still be
/// letting go of it: retry briefly).
fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    let dir = path
        .parent()
        .context("handover socket path has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    for _ in 0..20 {
        if path.exists() {
            if is_running(path) {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let _ = std::fs::remove_file(path);
        }
        match UnixListener::bind(path) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("another ztunnel answers on {}", path.display())
}

/// One successor's request; `Ok(true)` once it holds the listeners.
fn hand_over(conn: &UnixStream, registry: &Registry) -> anyhow::Result<bool> {
    // Only a process of our own user gets the data path's sockets.
    let peer = getsockopt(conn, PeerCredentials).context("peer credentials")?;
    let me = nix::unistd::geteuid().as_raw();
    if peer.uid() != me {
        anyhow::bail!(
            "refused: peer pid {} runs as uid {}, not {me}",
            peer.pid(),
            peer.uid()
        );
    }
    conn.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(false); // closed without asking: an `is_running` probe
    }
    if line.trim() != "take" {
        anyhow::bail!("unknown request {line:?}");
    }
    let entries = registry.entries();
    let addrs: Vec<SocketAddr> = entries.iter().map(|(a, _)| *a).collect();
    let fds: Vec<RawFd> = entries.iter().map(|(_, fd)| *fd).collect();
    let payload = serde_json::to_vec(&addrs)?;
    // A draining ztunnel has closed its listeners: an empty list, and no control message.
    let rights = [ControlMessage::ScmRights(&fds)];
    let cmsg: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        conn.as_raw_fd(),
        &[IoSlice::new(&payload)],
        cmsg,
        MsgFlags::empty(),
        None,
    )
    .context("sending the listeners")?;
    let mut ack = [0u8; 4];
    reader
        .read_exact(&mut ack)
        .context("no acknowledgement from the new ztunnel")?;
    if &ack != b"ack\n" {
        anyhow::bail!("unexpected acknowledgement {ack:?}");
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("ztunnel-handover-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn listeners_move_with_their_queue() {
        let dir = temp_dir("move");
        let path = socket_path(&dir, "node");
        let registry = Registry::default();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        registry.add(&l).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let handed = serve(&path, registry.clone()).unwrap();
        assert!(is_running(&path));
        let mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "the socket's directory is root-only");

        // A connection queued before the handover is accepted by the successor.
        let mut early = std::net::TcpStream::connect(addr).unwrap();
        let inherited = Predecessor::find(&path)
            .expect("predecessor answers")
            .take_listeners()
            .unwrap();
        rt.block_on(handed).expect("old side told");
        drop(l);
        registry.clear();
        let mut inherited = inherited;
        let l2 = inherited
            .take_or_bind(addr, |_| panic!("must be inherited"))
            .unwrap();
        early.write_all(b"x").unwrap();
        let (mut s, _) = l2.accept().unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        // And the path is free for the successor's own server.
        assert!(!is_running(&path));
        let _again = serve(&path, Registry::default()).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_udp_socket_on_a_listeners_address_moves_as_itself() {
        let dir = temp_dir("udp");
        let path = socket_path(&dir, "node");
        let registry = Registry::default();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let u = std::net::UdpSocket::bind(addr).unwrap();
        registry.add_udp(&u).unwrap();
        registry.add(&l).unwrap();
        let _handed = serve(&path, registry.clone()).unwrap();
        // A datagram queued before the handover is read by the successor.
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"q", addr).unwrap();
        let mut inherited = Predecessor::find(&path)
            .expect("predecessor answers")
            .take_listeners()
            .unwrap();
        assert_eq!(inherited.len(), 2);
        let u2 = inherited
            .take_or_bind_udp(addr, |_| panic!("must be inherited"))
            .unwrap();
        let l2 = inherited
            .take_or_bind(addr, |_| panic!("must be inherited"))
            .unwrap();
        assert!(inherited.is_empty());
        drop((u, l));
        registry.clear();
        let mut b = [0u8; 1];
        let (n, from) = u2.recv_from(&mut b).unwrap();
        assert_eq!((&b[..n], from), (&b"q"[..], client.local_addr().unwrap()));
        assert_eq!(l2.local_addr().unwrap(), addr);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_draining_predecessor_hands_over_nothing() {
        let dir = temp_dir("empty");
        let path = socket_path(&dir, "node");
        let _handed = serve(&path, Registry::default()).unwrap();
        let inherited = Predecessor::find(&path)
            .expect("predecessor answers")
            .take_listeners()
            .unwrap();
        assert!(inherited.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_dead_process_socket_file_is_replaced_and_no_predecessor_is_none() {
        let dir = temp_dir("stale");
        let path = socket_path(&dir, "node");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        drop(UnixListener::bind(&path).unwrap()); // the file stays, nobody answers
        assert!(!is_running(&path));
        assert!(Predecessor::find(&path).is_none());
        let _server = serve(&path, Registry::default()).unwrap();
        assert!(is_running(&path));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
