//! Answers the last hop's questions (`capture::last_hop`): may this forwarded connection
//! reach this enrolled pod? Connections that arrive at a pod after the node's NAT
//! (through a Service VIP, a NodePort, a hostPort) from a source outside the mesh meet the
//! same checks as plaintext at 15006 (`inbound::authorize_plaintext`), with the source as
//! the pod sees it. The answer is cached in the kernel for (source address, pod, port)
//! until the state changes; the connection itself goes on directly, not through ztunnel.
//!
//! A refusal is one access-log line and one count in the connection metrics per question
//! (the first SYN of that source to that pod and port); the SYNs dropped by the cached
//! refusal after it are counted by the program (`ztunnel_last_hop_syns`).

use std::sync::Arc;

use tracing::{info, warn};

use super::inbound::{authorize_plaintext, plaintext_record};
use super::ProxyContext;
use crate::capture::last_hop::{Answers, Question, Questions};
use crate::connections::{Direction, Outcome, Reason};

/// Answers questions until the program's ring buffer fails; forgets every answer when
/// what they were decided from changes (the policies, this node's workloads), so each is
/// asked again. Other changes of the state (a remote endpoint, a service) keep them: every
/// forgotten answer costs the next connection of its key a retransmitted SYN.
pub async fn answer(ctx: Arc<ProxyContext>, mut questions: Questions, answers: Answers) {
    let mut changes = ctx.store.subscribe();
    let mut decided_from = fingerprint(&ctx);
    loop {
        tokio::select! {
            batch = questions.next() => match batch {
                Ok(batch) => {
                    for q in batch {
                        let (ctx, answers) = (ctx.clone(), answers.clone());
                        // Each on its own: a pod's record may still be on its way
                        // (bounded by the workload wait), and must not hold up the rest.
                        tokio::spawn(async move { answer_one(&ctx, &answers, q).await });
                    }
                }
                Err(e) => {
                    warn!("last hop: reading its questions failed, forwarded connections into enrolled pods stay refused: {e}");
                    return;
                }
            },
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = fingerprint(&ctx);
                if now != decided_from {
                    decided_from = now;
                    answers.clear();
                }
            }
        }
    }
}

async fn answer_one(ctx: &ProxyContext, answers: &Answers, q: Question) {
    // Read before judging: a clear after this point voids the verdict.
    let generation = answers.generation();
    let allowed = match judge(ctx, q).await {
        Ok(()) => {
            info!(src = %q.src.ip(), dst = %q.dst, "last hop: forwarded connections allowed by policy");
            true
        }
        Err(()) => false,
    };
    if let Err(e) = answers.answer(&q, allowed, generation) {
        warn!(src = %q.src.ip(), dst = %q.dst, "last hop: {e:#}");
    }
}

/// Ok if `q.src` may connect to `q.dst`; a refusal is recorded here.
async fn judge(ctx: &ProxyContext, q: Question) -> Result<(), ()> {
    let Some((_, workload)) = ctx.local_workload(q.dst.ip(), |_| true).await else {
        let conn = ctx
            .connections
            .accept(Direction::Inbound, q.src, Some(q.dst));
        conn.finish(Outcome::Denied(Reason::NotLocalWorkload(
            q.dst.ip().to_string(),
        )));
        return Err(());
    };
    match authorize_plaintext(ctx, q.src, q.dst, &workload) {
        Ok(_) => Ok(()),
        Err(denied) => {
            let mut conn = ctx
                .connections
                .accept(Direction::Inbound, q.src, Some(q.dst));
            let state = ctx.store.snapshot();
            let source = state.workload_by_ip(q.src.ip());
            let service = state.guess_inbound_service(&workload, q.dst.port());
            let dst_id = workload.identity();
            let record = plaintext_record(q.src, q.dst, source.as_deref(), &workload, &dst_id)
                .through(service.as_deref());
            conn.identify(record.info(), record.labels(), None);
            conn.finish(Outcome::Denied(denied));
            Err(())
        }
    }
}

/// A digest of what the answers depend on: the policies and the workloads of this node
/// (the only possible destinations: their waypoints, namespaces, addresses).
fn fingerprint(ctx: &ProxyContext) -> u64 {
    use std::hash::{Hash, Hasher};
    let state = ctx.store.snapshot();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    format!("{:?}", state.policies).hash(&mut h);
    for w in state.workloads_on_node(&ctx.node) {
        format!("{w:?}").hash(&mut h);
    }
    h.finish()
}
