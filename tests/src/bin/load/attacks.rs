//! The attacks, each bounded in count and duration, each against the testbed's own
//! addresses only. Each returns what it saw; `measure::measured` adds the RSS and the
//! mesh echo beside it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use ztunnel::identity::Identity;
use ztunnel::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ztunnel::proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use ztunnel_tests::Netns;

use crate::clients::{declares, fates, grpc, hold_many, runtime, Cp, CSR_PATH};
use crate::measure::Report;

/// Slow-header connections: a request line and one header byte every 2 s.
pub fn slow_headers(ns: &Arc<Netns>, targets: Vec<SocketAddr>, n: usize, hold: Duration) -> Report {
    let counts = ns.run(move || {
        runtime().block_on(hold_many(
            &targets,
            n,
            b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nX-Slow: ",
            Some(Duration::from_secs(2)),
            hold,
        ))
    });
    let open = counts.get("StillOpen").copied().unwrap_or(0);
    Report {
        notes: vec![format!(
            "{n} connections held {} s: {}",
            hold.as_secs(),
            fates(&counts)
        )],
        passed: open == 0,
    }
}

/// Connections that never start TLS.
pub fn idle(ns: &Arc<Netns>, target: SocketAddr, n: usize, hold: Duration) -> Report {
    let counts = ns.run(move || runtime().block_on(hold_many(&[target], n, b"", None, hold)));
    let open = counts.get("StillOpen").copied().unwrap_or(0);
    Report {
        notes: vec![format!(
            "{n} idle connections held {} s: {}",
            hold.as_secs(),
            fates(&counts)
        )],
        passed: open == 0,
    }
}

/// CreateCertificate calls without a token, each declaring a 4 MiB message that never
/// comes, `per_conn` on each of `conns` connections, all held open until the end.
pub fn unauthenticated_streams(
    ns: &Arc<Netns>,
    cp: &Cp,
    conns: usize,
    per_conn: usize,
    hold: Duration,
) -> Report {
    let cp = cp.clone();
    let (refused, other, failed) = ns.run(move || {
        runtime().block_on(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..conns {
                let cp = cp.clone();
                tasks.spawn(async move {
                    let (mut refused, mut other, mut failed) = (0usize, 0usize, 0usize);
                    let Ok(send) = cp.h2().await else {
                        return (0, 0, per_conn);
                    };
                    let mut held = Vec::new();
                    for _ in 0..per_conn {
                        let r = async {
                            let mut s = send.clone().ready().await?;
                            let (resp, mut body) = s.send_request(grpc(CSR_PATH, None), false)?;
                            body.send_data(declares(4 << 20), false)?;
                            held.push(body);
                            let resp = tokio::time::timeout(Duration::from_secs(10), resp)
                                .await
                                .context("no answer")??;
                            anyhow::Ok(
                                resp.headers()
                                    .get("grpc-status")
                                    .and_then(|v| v.to_str().ok())
                                    .map(str::to_string),
                            )
                        };
                        match r.await {
                            Ok(Some(s)) if s == "16" => refused += 1,
                            Ok(_) => other += 1,
                            Err(_) => failed += 1,
                        }
                    }
                    tokio::time::sleep(hold).await;
                    drop(held);
                    (refused, other, failed)
                });
            }
            let mut total = (0, 0, 0);
            while let Some(Ok((r, o, f))) = tasks.join_next().await {
                total = (total.0 + r, total.1 + o, total.2 + f);
            }
            total
        })
    });
    Report {
        notes: vec![format!(
            "{} calls on {conns} connections: {refused} refused UNAUTHENTICATED before their body, \
             {other} answered otherwise, {failed} failed",
            conns * per_conn
        )],
        passed: refused == conns * per_conn,
    }
}

/// xDS streams from a merely authenticated caller (a node token), each claiming `names`
/// resources in initial_resource_versions, never reading what comes back; one more with
/// more entries than allowed, one larger than the request size limit.
pub fn huge_initial_versions(
    ns: &Arc<Netns>,
    cp: &Cp,
    (token, other_token): (String, String),
    streams: usize,
    names: usize,
    (over_entries, over_bytes): (usize, usize),
    hold: Duration,
) -> Report {
    let cp = cp.clone();
    let notes = ns.run(move || {
        runtime().block_on(async move {
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&cp.root_pem));
            let channel = tonic::transport::Endpoint::from_shared(cp.url())?
                .tls_config(tls)?
                .connect()
                .await?;
            let request = |n: usize, token: &str| {
                let known: HashMap<String, String> = (0..n)
                    .map(|i| (format!("junk/not-a-resource-{i:09}"), format!("{i:016x}")))
                    .collect();
                let first = DeltaDiscoveryRequest {
                    type_url: ztunnel::proto::ADDRESS_TYPE_URL.into(),
                    initial_resource_versions: known,
                    ..Default::default()
                };
                // The request stream never ends.
                let reqs = futures::stream::iter([first]).chain(futures::stream::pending());
                let mut req = tonic::Request::new(reqs);
                req.metadata_mut().insert(
                    "authorization",
                    format!("Bearer {token}").parse().expect("token"),
                );
                req
            };
            let mut held = Vec::new();
            let (mut opened, mut refused) = (0, 0);
            for _ in 0..streams {
                let mut client = AggregatedDiscoveryServiceClient::new(channel.clone());
                match client
                    .delta_aggregated_resources(request(names, &token))
                    .await
                {
                    Ok(s) => {
                        opened += 1;
                        held.push(s.into_inner()); // never read
                    }
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => refused += 1,
                    Err(s) => anyhow::bail!("stream refused unexpectedly: {s}"),
                }
            }
            let mut notes = vec![format!(
                "{streams} streams of {names} unknown initial_resource_versions each: {opened} \
                 opened (answers never read), {refused} refused (streams per token)"
            )];
            // Past the entry limit, and past the size limit: with another node's token (this
            // one's streams are all taken, and stay so: a client that stops reading but
            // whose request stream is open keeps its stream).
            for (what, n) in [("entries", over_entries), ("bytes", over_bytes)] {
                let mut client = AggregatedDiscoveryServiceClient::new(channel.clone())
                    .max_encoding_message_size(usize::MAX);
                let r = async {
                    let mut s = client
                        .delta_aggregated_resources(request(n, &other_token))
                        .await?
                        .into_inner();
                    s.message().await.map(|_| ())
                };
                let code = match tokio::time::timeout(Duration::from_secs(90), r).await {
                    Ok(Err(s)) => format!("{:?} ({})", s.code(), s.message()),
                    Ok(Ok(())) => "accepted".to_string(),
                    Err(_) => "no answer".to_string(),
                };
                notes.push(format!("{n} entries (over the {what} limit): {code}"));
            }
            tokio::time::sleep(hold).await;
            drop(held);
            anyhow::Ok(notes)
        })
    });
    match notes {
        Ok(notes) => {
            let passed = notes.iter().skip(1).all(|n| !n.contains("accepted"));
            Report { notes, passed }
        }
        Err(e) => Report {
            notes: vec![format!("{e:#}")],
            passed: false,
        },
    }
}

/// Streams opened and at once reset, as fast as the connection allows, on `conns`
/// connections made by `connect`, `per_conn` each or until the server closes the
/// connection.
pub fn reset_flood<C, F, R>(
    ns: &Arc<Netns>,
    connect: C,
    request: R,
    conns: usize,
    per_conn: usize,
) -> Report
where
    C: Fn() -> F + Send + 'static,
    F: std::future::Future<Output = anyhow::Result<h2::client::SendRequest<Bytes>>> + 'static,
    R: Fn() -> http::Request<()> + Clone + Send + 'static,
{
    let (sent, closed, failed) = ns.run(move || {
        runtime().block_on(async move {
            let (mut sent, mut closed, mut failed) = (0usize, 0usize, 0usize);
            let mut all = Vec::new();
            for _ in 0..conns {
                match connect().await {
                    Ok(s) => all.push(s),
                    Err(_) => failed += 1,
                }
            }
            let mut tasks = tokio::task::JoinSet::new();
            for send in all {
                let request = request.clone();
                tasks.spawn(async move {
                    let mut n = 0;
                    for _ in 0..per_conn {
                        let Ok(mut s) = send.clone().ready().await else {
                            return (n, true);
                        };
                        match s.send_request(request(), false) {
                            // Dropping both halves resets the stream (RST_STREAM CANCEL).
                            Ok((resp, body)) => drop((resp, body)),
                            Err(_) => return (n, true),
                        }
                        n += 1;
                        if n % 64 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                    (n, false)
                });
            }
            while let Some(Ok((n, c))) = tasks.join_next().await {
                sent += n;
                closed += c as usize;
            }
            (sent, closed, failed)
        })
    });
    Report {
        notes: vec![format!(
            "{conns} connections ({failed} failed to open): {sent} streams opened and reset; \
             {closed} connections closed by the server"
        )],
        passed: true,
    }
}

/// The node token `removed` is deleted from the tokens file in the same write that breaks
/// another line; how long until the control plane refuses it, and whether `kept` still
/// works.
pub fn token_typo(
    ns: &Arc<Netns>,
    cp: &Cp,
    tokens_file: std::path::PathBuf,
    removed: (std::path::PathBuf, Identity, String),
    kept: (std::path::PathBuf, Identity),
) -> Report {
    let cp = cp.clone();
    ns.run(move || {
        runtime().block_on(async move {
            let (removed_file, removed_id, removed_token) = removed;
            if let Err(e) = crate::clients::sign_once(&cp, &removed_file, &removed_id).await {
                return Report {
                    notes: vec![format!("the token to remove did not work before: {e:#}")],
                    passed: false,
                };
            }
            let old = std::fs::read_to_string(&tokens_file).unwrap_or_default();
            let new: String = old
                .lines()
                .filter(|l| !l.starts_with(&format!("{removed_token} ")))
                .map(|l| format!("{l}\n"))
                .chain(["this line has a typo\n".to_string()])
                .collect();
            std::fs::write(&tokens_file, new).expect("tokens file");
            let edited = Instant::now();
            let refused_after = loop {
                let r = crate::clients::sign_once(&cp, &removed_file, &removed_id).await;
                if let Err(e) = r {
                    if format!("{e:#}").contains("Unauthenticated") {
                        break Some(edited.elapsed());
                    }
                }
                if edited.elapsed() > Duration::from_secs(10) {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            let kept_ok = crate::clients::sign_once(&cp, &kept.0, &kept.1).await;
            let mut notes = vec![match refused_after {
                Some(d) => format!("removed token refused {} ms after the edit", d.as_millis()),
                None => "removed token still accepted 10 s after the edit".to_string(),
            }];
            notes.push(match &kept_ok {
                Ok(()) => "the token still in the file still gets certificates".to_string(),
                Err(e) => format!("the token still in the file failed: {e:#}"),
            });
            std::fs::write(&tokens_file, old).expect("tokens file");
            Report {
                passed: refused_after.is_some_and(|d| d < Duration::from_millis(1500))
                    && kept_ok.is_ok(),
                notes,
            }
        })
    })
}
