//! The DNS proxy (node-a's, on node-a's address, port 15053) under hostile load, from the
//! `attacker` pod outside the mesh, with the node's resolver dead (`DeadDns`: every
//! forwarded question waits out the proxy's 2 s upstream timeout, so questions pile up).
//! Beside each attack the client pod asks good questions (`DnsProber`): a mesh name over
//! UDP to the proxy, and over TCP to port 53 of the cluster DNS's address (captured to the
//! proxy).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use ztunnel_tests::dns::{answers, question, resolve_tcp, resolve_udp_a};
use ztunnel_tests::Netns;

use crate::clients::{fates, hold_many, runtime};
use crate::measure::Report;

/// Where the good questions go and what they must get.
#[derive(Clone)]
pub struct DnsTarget {
    /// The proxy's listener (UDP and TCP).
    pub proxy: SocketAddr,
    /// Port 53 of an address nothing serves: an enrolled pod's TCP to it is the proxy's.
    pub captured_tcp: SocketAddr,
    pub mesh_name: &'static str,
    pub vip: IpAddr,
}

/// A mesh name asked every 200 ms, over UDP and over TCP, counted ok / tried.
pub struct DnsProber {
    stop: Arc<AtomicBool>,
    counts: Arc<[AtomicU64; 4]>,
    handle: std::thread::JoinHandle<()>,
}

impl DnsProber {
    pub fn start(client: &Arc<Netns>, t: &DnsTarget) -> DnsProber {
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
        let (s, c, ns, t) = (stop.clone(), counts.clone(), client.clone(), t.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let udp = resolve_udp_a(&ns, t.proxy, t.mesh_name, Duration::from_secs(1));
                c[0].fetch_add(
                    udp.is_ok_and(|ips| ips == [t.vip]) as u64,
                    Ordering::Relaxed,
                );
                c[1].fetch_add(1, Ordering::Relaxed);
                let tcp = resolve_tcp(&ns, t.captured_tcp, t.mesh_name);
                c[2].fetch_add(
                    tcp.is_ok_and(|ips| ips == [t.vip]) as u64,
                    Ordering::Relaxed,
                );
                c[3].fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        DnsProber {
            stop,
            counts,
            handle,
        }
    }

    /// (udp ok, udp tried, tcp ok, tcp tried).
    pub fn finish(self) -> [u64; 4] {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
        std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed))
    }
}

/// Runs `attack` with the prober beside it; adds what the good questions got. `need_tcp`:
/// whether the TCP questions must pass too (not while an attack holds every TCP slot).
pub fn with_good_questions(
    client: &Arc<Netns>,
    t: &DnsTarget,
    need_tcp: bool,
    attack: impl FnOnce() -> Report,
) -> Report {
    let prober = DnsProber::start(client, t);
    let mut r = attack();
    let [uo, ut, to, tt] = prober.finish();
    r.notes.push(format!(
        "good questions beside it (a mesh name, every 200 ms): over UDP {uo} / {ut} answered, \
         over TCP (captured) {to} / {tt}"
    ));
    // And afterwards, once the attack is over.
    let after_udp = resolve_udp_a(client, t.proxy, t.mesh_name, Duration::from_secs(2))
        .is_ok_and(|ips| ips == [t.vip]);
    let after_tcp =
        resolve_tcp(client, t.captured_tcp, t.mesh_name).is_ok_and(|ips| ips == [t.vip]);
    r.notes.push(format!(
        "after it: UDP {}, TCP {}",
        if after_udp {
            "answered"
        } else {
            "NOT answered"
        },
        if after_tcp {
            "answered"
        } else {
            "NOT answered"
        }
    ));
    // Over UDP a flood shares the proxy's socket: the kernel drops what does not fit its
    // receive buffer, good questions too, so half is asked for; TCP's are all answered
    // unless the attack holds every TCP place (`need_tcp` false).
    r.passed &= after_udp && after_tcp && uo * 2 >= ut && (!need_tcp || to == tt);
    r
}

/// Questions for names nobody knows (forwarded to the dead resolver), as fast as
/// `senders` sockets can send, `n` in all or for `dur`; replies counted until 3 s after.
pub fn udp_flood(
    node: &Arc<Netns>,
    ns: &Arc<Netns>,
    proxy: SocketAddr,
    n: usize,
    dur: Duration,
    senders: usize,
) -> Report {
    let socks: Vec<UdpSocket> = match ns.run(move || -> std::io::Result<Vec<UdpSocket>> {
        (0..senders)
            .map(|_| {
                let s = UdpSocket::bind(("0.0.0.0", 0))?;
                s.connect(proxy)?;
                s.set_read_timeout(Some(Duration::from_millis(200)))?;
                Ok(s)
            })
            .collect()
    }) {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    let drops_before = rcvbuf_errors(node);
    let start = Instant::now();
    let stop_rx = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for (i, s) in socks.into_iter().enumerate() {
        let s = Arc::new(s);
        let (rx, stop) = (s.clone(), stop_rx.clone());
        let receiver = std::thread::spawn(move || read_codes(&rx, &stop));
        let sent = sent.clone();
        let per = n.div_ceil(senders);
        let sender = std::thread::spawn(move || {
            for k in 0..per {
                if start.elapsed() > dur {
                    break;
                }
                let Ok(mut q) = question(
                    &format!("q{i}-{k}.flood.example."),
                    hickory_proto::rr::RecordType::A,
                ) else {
                    continue;
                };
                q[..2].copy_from_slice(&(k as u16).to_be_bytes());
                if s.send(&q).is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        threads.push((sender, receiver));
    }
    let mut receivers = Vec::new();
    for (s, r) in threads {
        let _ = s.join();
        receivers.push(r);
    }
    let sending = start.elapsed();
    // Forwarded questions wait out the upstream timeout (2 s) before their SERVFAIL.
    std::thread::sleep(Duration::from_secs(3));
    stop_rx.store(true, Ordering::Relaxed);
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    for r in receivers {
        for (k, v) in r.join().unwrap_or_default() {
            *codes.entry(k).or_default() += v;
        }
    }
    let sent = sent.load(Ordering::Relaxed);
    let answered: u64 = codes.values().sum();
    let kernel_drops = rcvbuf_errors(node).saturating_sub(drops_before);
    Report {
        notes: vec![format!(
            "{sent} questions sent in {:.1} s ({:.0}/s) from {senders} sockets; {answered} answered \
             ({}), {} never answered (dropped: beyond the in-flight bound, or by the kernel)",
            sending.as_secs_f64(),
            sent as f64 / sending.as_secs_f64(),
            codes
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            sent.saturating_sub(answered)
        ), format!("node-a's kernel dropped {kernel_drops} datagrams for full receive buffers (UDP RcvbufErrors)")],
        passed: true,
    }
}

/// `RcvbufErrors` of the UDP line of `/proc/net/snmp` in `ns`.
fn rcvbuf_errors(ns: &Arc<Netns>) -> u64 {
    let text = ns.run(|| std::fs::read_to_string("/proc/self/net/snmp").unwrap_or_default());
    let mut udp = text.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Malformed datagrams of several kinds, `per_kind` of each; what came back for each.
pub fn malformed(ns: &Arc<Netns>, proxy: SocketAddr, per_kind: usize) -> Report {
    let mut notes = Vec::new();
    let mut threads = Vec::new();
    for (kind, make) in KINDS {
        let s = match ns.run(move || -> std::io::Result<UdpSocket> {
            let s = UdpSocket::bind(("0.0.0.0", 0))?;
            s.connect(proxy)?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            Ok(s)
        }) {
            Ok(s) => s,
            Err(e) => return failed(e),
        };
        threads.push(std::thread::spawn(move || {
            // Replies are read while the rest is sent (a full receive buffer would drop them).
            let stop = Arc::new(AtomicBool::new(false));
            let reader = match s.try_clone() {
                Ok(r) => {
                    let stop = stop.clone();
                    Some(std::thread::spawn(move || read_codes(&r, &stop)))
                }
                Err(_) => None,
            };
            let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ kind.len() as u64;
            for i in 0..per_kind {
                let _ = s.send(&make(i, &mut seed));
                if i % 64 == 63 {
                    // Paced (about 6,000 a second per kind): malformed, not a flood.
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            // A message that parses is forwarded: its SERVFAIL comes after 2 s.
            std::thread::sleep(Duration::from_secs(3));
            stop.store(true, Ordering::Relaxed);
            let codes = reader.and_then(|r| r.join().ok()).unwrap_or_default();
            (kind, codes)
        }));
    }
    for t in threads {
        let Ok((kind, codes)) = t.join() else {
            continue;
        };
        let got: u64 = codes.values().sum();
        notes.push(format!(
            "{kind}: {per_kind} sent, {}",
            if got == 0 {
                "no reply".to_string()
            } else {
                codes
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ));
    }
    Report {
        notes,
        passed: true,
    }
}

/// Response codes of what arrives on `s` until `stop`.
fn read_codes(s: &UdpSocket, stop: &AtomicBool) -> BTreeMap<String, u64> {
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        if let Ok(n) = s.recv(&mut buf) {
            let code = answers(&buf[..n]).map_or_else(
                |_| match buf.get(3) {
                    Some(b) if n >= 4 => ResponseCode::from_low(b & 0x0f).to_string(),
                    _ => "short".into(),
                },
                |(c, _)| c.to_string(),
            );
            *codes.entry(code).or_default() += 1;
        }
    }
    codes
}

type Maker = fn(usize, &mut u64) -> Vec<u8>;

/// A header: id, flags (a standard query, RD), and the four counts.
fn header(id: u16, qd: u16, an: u16) -> Vec<u8> {
    let mut h = id.to_be_bytes().to_vec();
    h.extend_from_slice(&[0x01, 0x00]);
    for c in [qd, an, 0, 0] {
        h.extend_from_slice(&c.to_be_bytes());
    }
    h
}

fn xorshift(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

const KINDS: [(&str, Maker); 8] = [
    ("random bytes (1-512)", |_, seed| {
        let len = 1 + (xorshift(seed) % 512) as usize;
        (0..len).map(|_| xorshift(seed) as u8).collect()
    }),
    ("truncated headers (1-11 bytes)", |i, _| {
        header(i as u16, 1, 0)[..1 + i % 11].to_vec()
    }),
    (
        "a header announcing a question that is not there",
        |i, _| header(i as u16, 1, 0),
    ),
    ("compression loop (a name pointing at itself)", |i, _| {
        let mut m = header(i as u16, 1, 0);
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        m
    }),
    ("compression loop (two pointers at each other)", |i, _| {
        let mut m = header(i as u16, 1, 0);
        // Offset 12: label "a" then a pointer to 17; offset 17: a pointer to 12.
        m.extend_from_slice(&[1, b'a', 0xc0, 17, 0, 0xc0, 12, 0, 1, 0, 1]);
        m
    }),
    ("label longer than the message", |i, _| {
        let mut m = header(i as u16, 1, 0);
        m.extend_from_slice(&[63, b'x', b'y']);
        m
    }),
    ("65,535 questions announced, one there", |i, _| {
        let mut m = header(i as u16, u16::MAX, 0);
        m.extend_from_slice(&[1, b'a', 0, 0, 1, 0, 1]);
        m
    }),
    ("a response (QR set) with an answer pointer loop", |i, _| {
        let mut m = header(i as u16, 1, 1);
        m[2] |= 0x80;
        m.extend_from_slice(&[1, b'a', 0, 0, 1, 0, 1, 0xc0, 19, 0, 1, 0, 1]);
        m
    }),
];

/// `n` TCP connections to the proxy that send `first` (then a byte every 2 s with
/// `drip`), held `hold`; what became of them, and how many the proxy's side still held
/// 2 s before the end (a connection the client counts open may never have been accepted:
/// when the listen queue overflows, the kernel drops the handshake's last ACK and the
/// client, which sends nothing more, never learns).
pub fn tcp_hold(
    node: &Arc<Netns>,
    ns: &Arc<Netns>,
    proxy: SocketAddr,
    n: usize,
    (first, drip): (&'static [u8], bool),
    hold: Duration,
) -> Report {
    let drip = drip.then_some(Duration::from_secs(2));
    let (node, port) = (node.clone(), proxy.port());
    let late = hold.saturating_sub(Duration::from_secs(2));
    let server_side = std::thread::spawn(move || {
        std::thread::sleep(late);
        node.run(move || established(port))
    });
    let counts = ns.run(move || runtime().block_on(hold_many(&[proxy], n, first, drip, hold)));
    let held = server_side.join().unwrap_or(usize::MAX);
    Report {
        notes: vec![format!(
            "{n} connections held {} s: {}; established on the proxy's side {} s in: {held}",
            hold.as_secs(),
            fates(&counts),
            late.as_secs()
        )],
        passed: held == 0,
    }
}

/// Established TCP sockets on local `port` (IPv4), from `/proc/net/tcp` of this namespace.
fn established(port: u16) -> usize {
    let text = std::fs::read_to_string("/proc/self/net/tcp").unwrap_or_default();
    let local = format!(":{port:04X}");
    text.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&local) && f[3] == "01"
        })
        .count()
}

fn failed(e: impl std::fmt::Display) -> Report {
    Report {
        notes: vec![format!("attack failed to run: {e}")],
        passed: false,
    }
}
