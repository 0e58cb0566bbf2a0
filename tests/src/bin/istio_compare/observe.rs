//! What one kind of proxy shows after the scenario's traffic: its `/config_dump` (the
//! client side's), its metrics (both sides', together) and its access logs (both sides',
//! once in text and once in JSON).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ztunnel_tests::http::{self, ADMIN};
use ztunnel_tests::Netns;

use super::istio;
use super::scenario::Scenario;

pub struct Observed {
    pub config_dump: serde_json::Value,
    pub metrics: String,
    pub text_log: String,
    pub json_log: String,
}

const STOP_GRACE: Duration = Duration::from_secs(5);

/// Our ztunnel on both nodes, eBPF capture, the testbed's own CA.
pub fn ours(s: &Scenario) -> anyhow::Result<Observed> {
    let mut out = Observed {
        config_dump: serde_json::Value::Null,
        metrics: String::new(),
        text_log: String::new(),
        json_log: String::new(),
    };
    for json in [false, true] {
        let flags: &[&str] = if json { &["--log-format", "json"] } else { &[] };
        let mut running = vec![];
        let mut logs = vec![];
        for node in [&s.a, &s.b] {
            // Only what this run writes: the log files are appended to.
            let log = s.tb.dir().join(format!("ztunnel-{}.log", node.name));
            let from = std::fs::metadata(&log)
                .map(|m| m.len() as usize)
                .unwrap_or(0);
            let z = s.tb.start_ztunnel(node, &s.config, flags)?;
            z.wait_ready(Duration::from_secs(30))?;
            logs.push((log, from));
            running.push(z);
        }
        s.traffic()?;
        let read = |logs: &[(std::path::PathBuf, usize)]| -> String {
            logs.iter()
                .map(|(p, from)| {
                    let t = std::fs::read_to_string(p).unwrap_or_default();
                    t.get(*from..).unwrap_or_default().to_string()
                })
                .collect()
        };
        wait_for_complete(|| read(&logs))?;
        if !json {
            out.config_dump = config_dump(&s.a.netns)?;
            out.metrics = metrics(&[&s.a.netns, &s.b.netns])?;
        }
        for z in &running {
            s.tb.stop(z.pid, STOP_GRACE);
        }
        *if json {
            &mut out.json_log
        } else {
            &mut out.text_log
        } = read(&logs);
    }
    Ok(out)
}

/// Istio's ztunnel as a dedicated proxy in the client's and in the server's pod.
pub fn istio(s: &Scenario, bin: &Path) -> anyhow::Result<Observed> {
    istio::redirect_outbound(&s.tb, &s.client)?;
    let mut out = Observed {
        config_dump: serde_json::Value::Null,
        metrics: String::new(),
        text_log: String::new(),
        json_log: String::new(),
    };
    for json in [false, true] {
        let client = istio::start(&s.tb, bin, &s.client, "client", &s.config, json)?;
        let server = istio::start(&s.tb, bin, &s.server, "server", &s.config, json)?;
        let read = || client.log_text() + &server.log_text();
        let run = (|| {
            s.traffic()?;
            wait_for_complete(read)?;
            if !json {
                out.config_dump = config_dump(&s.client.netns)?;
                out.metrics = metrics(&[&s.client.netns, &s.server.netns])?;
            }
            Ok::<_, anyhow::Error>(())
        })();
        for p in [&client, &server] {
            s.tb.stop(p.pid, STOP_GRACE);
        }
        run.with_context(|| format!("Istio's ztunnel; its logs:\n{}", read()))?;
        *if json {
            &mut out.json_log
        } else {
            &mut out.text_log
        } = read();
    }
    Ok(out)
}

/// Waits until both connections have been logged complete on both sides (four lines).
fn wait_for_complete(log: impl Fn() -> String) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = log();
        if text.matches("connection complete").count() >= 4 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("fewer than 4 \"connection complete\" lines after 10 s; logs:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn config_dump(ns: &Netns) -> anyhow::Result<serde_json::Value> {
    let (status, body) = http::get(ns, ADMIN, "/config_dump")?;
    anyhow::ensure!(status == 200, "/config_dump: {status} {body}");
    serde_json::from_str(&body).context("/config_dump is not JSON")
}

/// `/metrics` of each namespace's proxy, one after the other.
fn metrics(namespaces: &[&Netns]) -> anyhow::Result<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], 15020));
    let mut all = String::new();
    for ns in namespaces {
        let (status, body) = http::get(ns, addr, "/metrics")?;
        anyhow::ensure!(status == 200, "/metrics: {status} {body}");
        all.push_str(&body);
    }
    Ok(all)
}
