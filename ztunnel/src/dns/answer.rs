//! One DNS message in, the decision out: answered from the mesh (the reply's bytes), left
//! to the node's resolvers, or dropped.

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};

use super::table::{self, Lookup};
use crate::state::{ProxyState, Workload};

/// The TTL of mesh answers: short, so a changed VIP is seen soon (Istio's proxy: 30 s).
pub const MESH_TTL: u32 = 30;

/// What to do with a message.
#[derive(Debug)]
pub enum Reply {
    /// Send these bytes back (answered here).
    Answer(Vec<u8>),
    /// Ask the node's resolvers and relay what they say.
    Forward,
    /// Not a DNS message at all: nothing to answer.
    Drop,
}

/// What was asked, for logs and metrics.
#[derive(Debug, Default, Clone)]
pub struct Asked {
    pub name: String,
    /// `a`, `aaaa`, ... (lowercase, as Istio's metrics label it); empty when unparsed.
    pub qtype: String,
}

/// The largest reply the sender of `msg` takes over UDP: its EDNS payload size (at least
/// 512 bytes), else 512 (RFC 1035), never more than `max`.
fn udp_limit(msg: &Message, max: usize) -> usize {
    msg.edns
        .as_ref()
        .map_or(512, |e| usize::from(e.max_payload()).max(512))
        .min(max)
}

/// `reply`, the node's resolvers' answer to `query`, as a client that asked over UDP may
/// take it: unchanged when it fits the size the client said it takes, else only its header
/// and question with TC set, so the client asks again over TCP (which is captured too).
/// The proxy fetched the whole answer (over TCP if the resolver truncated it), and that
/// may be more than this client takes: a reply longer than its buffer would reach it cut,
/// or in IP fragments.
pub fn fit_udp(query: &[u8], reply: Vec<u8>, max: usize) -> Vec<u8> {
    let limit = Message::from_vec(query).map_or(512, |q| udp_limit(&q, max));
    if reply.len() <= limit {
        return reply;
    }
    let Ok(mut m) = Message::from_vec(&reply) else {
        // Not readable: its header alone, flagged truncated, sections emptied.
        let mut header = reply[..reply.len().min(12)].to_vec();
        if header.len() == 12 {
            header[2] |= 0x02;
            header[6..12].fill(0);
        }
        return header;
    };
    m.answers.clear();
    m.authorities.clear();
    m.additionals.clear();
    m.signature = None;
    m.metadata.truncation = true;
    m.to_vec().unwrap_or_else(|_| reply[..12].to_vec())
}

/// Decides what to do with `query` from `client`. `max_udp`: the largest reply the
/// client takes over UDP (`None` over TCP).
pub fn decide(
    query: &[u8],
    state: &ProxyState,
    client: Option<&Workload>,
    cluster_domain: &str,
    max_udp: Option<usize>,
) -> (Reply, Asked) {
    let msg = match Message::from_vec(query) {
        Ok(m) => m,
        // A header we can read gets FORMERR with its id; anything shorter is noise.
        Err(_) if query.len() >= 12 => {
            let id = u16::from_be_bytes([query[0], query[1]]);
            let reply = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
            return (encode(reply), Asked::default());
        }
        Err(_) => return (Reply::Drop, Asked::default()),
    };
    if msg.metadata.message_type != MessageType::Query {
        return (Reply::Drop, Asked::default());
    }
    let Some(q) = msg.queries.first().filter(|_| msg.queries.len() == 1) else {
        return (Reply::Forward, Asked::default());
    };
    let asked = Asked {
        name: q
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase(),
        qtype: q.query_type().to_string().to_ascii_lowercase(),
    };
    let v6 = match q.query_type() {
        RecordType::A => false,
        RecordType::AAAA => true,
        _ => return (Reply::Forward, asked),
    };
    if msg.metadata.op_code != OpCode::Query || q.query_class() != DNSClass::IN {
        return (Reply::Forward, asked);
    }
    let Lookup::Found { ips, .. } = table::lookup(state, client, &asked.name, v6, cluster_domain)
    else {
        return (Reply::Forward, asked);
    };
    let mut reply = Message::response(msg.metadata.id, OpCode::Query);
    reply.metadata.recursion_desired = msg.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.authoritative = true;
    reply.metadata.response_code = ResponseCode::NoError;
    reply.add_query(q.clone());
    for ip in ips {
        let rdata = match ip {
            std::net::IpAddr::V4(v4) => RData::A(A(v4)),
            std::net::IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        reply.add_answer(Record::from_rdata(q.name().clone(), MESH_TTL, rdata));
    }
    if let Some(edns) = &msg.edns {
        let mut ours = Edns::new();
        ours.set_max_payload(edns.max_payload().max(512));
        reply.edns = Some(ours);
    }
    let Reply::Answer(mut bytes) = encode(reply.clone()) else {
        return (Reply::Forward, asked);
    };
    // Too long for the client's UDP: the header and question, truncated, so it asks again
    // over TCP.
    if let Some(max) = max_udp {
        if bytes.len() > udp_limit(&msg, max) {
            reply.answers.clear();
            reply.metadata.truncation = true;
            if let Reply::Answer(b) = encode(reply) {
                bytes = b;
            }
        }
    }
    (Reply::Answer(bytes), asked)
}

fn encode(m: Message) -> Reply {
    match m.to_vec() {
        Ok(bytes) => Reply::Answer(bytes),
        Err(e) => {
            tracing::debug!(error = %e, "cannot encode a DNS reply");
            Reply::Drop
        }
    }
}
