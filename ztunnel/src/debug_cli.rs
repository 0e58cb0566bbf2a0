//! `ztunnel debug …`: the admin endpoint's JSON as tables a person can read at 3 a.m.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

use crate::config::{DebugArgs, DebugOutput, DebugView};

pub fn run(args: DebugArgs) -> anyhow::Result<()> {
    let path = match args.what {
        DebugView::Workloads | DebugView::Services | DebugView::Config | DebugView::Dns => {
            "/config_dump"
        }
        DebugView::Certs => "/certs",
        DebugView::Capture => "/debug/capture",
        DebugView::Connections => "/debug/connections",
    };
    let body = get(args.admin_addr, path)?;
    let v: Value =
        serde_json::from_str(&body).with_context(|| format!("{path} did not return JSON"))?;
    let out = match (args.output, args.what) {
        (DebugOutput::Json, DebugView::Workloads) => serde_json::to_string_pretty(&v["workloads"])?,
        (DebugOutput::Json, DebugView::Services) => serde_json::to_string_pretty(&v["services"])?,
        (DebugOutput::Json, DebugView::Dns) => serde_json::to_string_pretty(&v["dns"])?,
        (DebugOutput::Json, _) | (DebugOutput::Table, DebugView::Config) => {
            serde_json::to_string_pretty(&v)?
        }
        (DebugOutput::Table, DebugView::Workloads) => workloads(&v),
        (DebugOutput::Table, DebugView::Services) => services(&v),
        (DebugOutput::Table, DebugView::Dns) => dns(&v),
        (DebugOutput::Table, DebugView::Certs) => certs(&v),
        (DebugOutput::Table, DebugView::Capture) => capture(&v),
        (DebugOutput::Table, DebugView::Connections) => connections(&v),
    };
    println!("{out}");
    Ok(())
}

fn get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).with_context(|| {
        format!("cannot reach the admin endpoint at {addr}: is ztunnel running on this node?")
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("{path}: {}", head.lines().next().unwrap_or(head));
    }
    Ok(body.to_string())
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Renders rows as aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(header.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.iter().map(|r| line(r.clone())));
    out.join("\n")
}

fn workloads(v: &Value) -> String {
    let enrolled = &v["enrolled"];
    let rows: Vec<Vec<String>> = v["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            let uid = s(&w["uid"]);
            let ips: Vec<String> = w["workloadIps"]
                .as_array()
                .into_iter()
                .flatten()
                .map(s)
                .collect();
            let state = if enrolled.get(&uid).is_some() {
                "enrolled"
            } else if v["pendingEnrollment"].get(&uid).is_some() {
                "pending"
            } else {
                "-"
            };
            vec![
                format!("{}/{}", s(&w["namespace"]), s(&w["name"])),
                ips.join(","),
                s(&w["node"]),
                s(&w["protocol"]),
                format!(
                    "spiffe://{}/ns/{}/sa/{}",
                    s(&w["trustDomain"]),
                    s(&w["namespace"]),
                    s(&w["serviceAccount"])
                ),
                waypoint(&w["waypoint"]),
                state.into(),
            ]
        })
        .collect();
    table(
        &[
            "WORKLOAD", "IPS", "NODE", "PROTOCOL", "IDENTITY", "WAYPOINT", "CAPTURE",
        ],
        &rows,
    )
}

fn services(v: &Value) -> String {
    let list = |v: &Value| -> String {
        let items: Vec<String> = v.as_array().into_iter().flatten().map(s).collect();
        if items.is_empty() {
            "-".into()
        } else {
            items.join(",")
        }
    };
    let rows: Vec<Vec<String>> = v["services"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|svc| {
            let ports: Vec<String> = svc["ports"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(p, t)| format!("{p}->{}", s(t)))
                .collect();
            vec![
                format!("{}/{}", s(&svc["namespace"]), s(&svc["hostname"])),
                list(&svc["vips"]),
                if ports.is_empty() {
                    "-".into()
                } else {
                    ports.join(",")
                },
                waypoint(&svc["waypoint"]),
            ]
        })
        .collect();
    table(&["SERVICE", "VIPS", "PORTS", "WAYPOINT"], &rows)
}

fn dns(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v["dns"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let addrs: Vec<String> = e["addresses"]
                .as_array()
                .into_iter()
                .flatten()
                .map(s)
                .collect();
            vec![
                s(&e["hostname"]),
                s(&e["namespace"]),
                if addrs.is_empty() {
                    "-".into()
                } else {
                    addrs.join(",")
                },
                s(&e["visibility"]),
            ]
        })
        .collect();
    table(&["NAME", "NAMESPACE", "ADDRESSES", "VISIBILITY"], &rows)
}

/// A waypoint as `destination:port`, or `-`.
fn waypoint(w: &Value) -> String {
    match w {
        Value::Null => "-".into(),
        w => format!("{}:{}", s(&w["destination"]), s(&w["hboneMtlsPort"])),
    }
}

fn certs(v: &Value) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let rel = |t: &Value| {
        t.as_u64()
            .map(|t| format!("{}s", t as i64 - now as i64))
            .unwrap_or("-".into())
    };
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            vec![
                s(&c["identity"]),
                s(&c["state"]),
                rel(&c["not_after_unix"]),
                rel(&c["next_rotation_unix"]),
                s(&c["last_error"]),
            ]
        })
        .collect();
    table(
        &[
            "IDENTITY",
            "STATE",
            "EXPIRES IN",
            "ROTATES IN",
            "LAST ERROR",
        ],
        &rows,
    )
}

fn capture(v: &Value) -> String {
    let enrolled: Vec<String> = v["enrolled"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| s(&p["address"]))
        .collect();
    let attach = &v["attach"];
    let how = match attach["mode"].as_str() {
        Some("legacy") => format!(
            "legacy tc filter, priority {} handle {}",
            s(&attach["priority"]),
            s(&attach["handle"])
        ),
        Some(mode) => format!("{mode}, {}", s(&attach["position"])),
        None => s(attach),
    };
    let mut out = format!(
        "program {} ({how}; asked: {}), kernel {}, pinned at {}\nenrolled: {}\n",
        s(&v["program"]),
        s(&v["requestedAttach"]),
        s(&v["kernel"]["kernel"]),
        s(&v["pinDir"]),
        enrolled.join(", ")
    );
    for (uid, why) in v["pendingPods"].as_object().into_iter().flatten() {
        out.push_str(&format!(
            "not enrolled (held, its traffic dropped): {uid}: {}\n",
            s(why)
        ));
    }
    for (ip, c) in v["addressConflicts"].as_object().into_iter().flatten() {
        let refused: Vec<String> = c["refused"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        let owner = match c["owner"].as_str() {
            Some(o) => format!("kept on {o}"),
            None => "no owner known, held".to_string(),
        };
        out.push_str(&format!(
            "address conflict: {ip} of {}: {owner}; refused: {}\n",
            s(&c["workload"]),
            refused.join(", ")
        ));
    }
    out.push_str(&sockmap_line(&v["sockmap"]));
    out.push('\n');
    let ifs: Vec<Vec<String>> = v["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            vec![
                s(&i["name"]),
                s(&i["ifindex"]),
                s(&i["kind"]),
                s(&i["role"]),
                if i["attached"] == true { "yes" } else { "no" }.to_string(),
                s(&i["bridge"]),
            ]
        })
        .collect();
    out.push_str(&table(
        &["INTERFACE", "INDEX", "KIND", "ROLE", "ATTACHED", "BRIDGE"],
        &ifs,
    ));
    out.push('\n');
    let rows: Vec<Vec<String>> = v["counters"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(ip, c)| {
            vec![
                ip.clone(),
                s(&c["outbound_flows"]),
                s(&c["inbound_flows"]),
                s(&c["packets"]),
                s(&c["bytes"]),
                s(&c["dropped_no_proxy"]),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "POD ADDRESS",
            "OUT FLOWS",
            "IN FLOWS",
            "PACKETS",
            "BYTES",
            "DROPPED",
        ],
        &rows,
    ));
    out
}

/// One line: whether the pod-ztunnel hops are accelerated, and how many were.
fn sockmap_line(v: &Value) -> String {
    if v.is_null() {
        return String::new();
    }
    let c = &v["counters"];
    if v["enabled"] == true {
        format!(
            "sockmap: on (cgroup {}): {} accelerated connections, {} sockets redirected, {} fell back to TCP\n",
            s(&v["cgroup"]),
            s(&c["acceleratedConnections"]),
            s(&c["redirectedSockets"]),
            s(&c["fallbackSockets"])
        )
    } else {
        format!("sockmap: off: {}\n", s(&v["offBecause"]))
    }
}

fn connections(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            vec![
                s(&c["direction"]),
                s(&c["src"]),
                s(&c["target"]),
                s(&c["src_identity"]),
                s(&c["dst_identity"]),
                s(&c["protocol"]),
                s(&c["bytes_sent"]),
                s(&c["bytes_received"]),
                format!("{}ms", s(&c["age_ms"])),
            ]
        })
        .collect();
    table(
        &[
            "DIR",
            "SOURCE",
            "DESTINATION",
            "SRC IDENTITY",
            "DST IDENTITY",
            "PROTO",
            "SENT",
            "RECEIVED",
            "AGE",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn says_whether_sockmap_is_on() {
        let on = serde_json::json!({"enabled": true, "cgroup": "/sys/fs/cgroup",
            "counters": {"acceleratedConnections": 3, "redirectedSockets": 6, "fallbackSockets": 0}});
        let line = super::sockmap_line(&on);
        assert!(
            line.starts_with("sockmap: on") && line.contains("3 accelerated"),
            "{line}"
        );
        let off = serde_json::json!({"enabled": false, "offBecause": "not asked for"});
        assert_eq!(super::sockmap_line(&off), "sockmap: off: not asked for\n");
    }

    #[test]
    fn aligns_columns() {
        let t = super::table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y");
    }

    #[test]
    fn the_dns_table_is_a_table() {
        let v = serde_json::json!({"dns": [
            {"hostname": "echo.d.svc.cluster.local", "namespace": "d",
             "addresses": ["10.96.0.10", "fd00::10"], "visibility": "PUBLIC"},
            {"hostname": "db.d.svc.cluster.local", "namespace": "d", "addresses": [],
             "visibility": "NAMESPACE"}
        ]});
        let out = super::dns(&v);
        assert!(out.contains("10.96.0.10,fd00::10"), "{out}");
        assert!(
            out.lines()
                .any(|l| l.contains("db.d.svc.cluster.local") && l.contains(" - ")),
            "{out}"
        );
    }

    #[test]
    fn services_show_their_waypoint() {
        let dump = serde_json::json!({"services": [
            {"namespace": "d", "hostname": "echo.d", "vips": ["/10.96.0.10"], "ports": {"80": 8080},
             "waypoint": {"destination": "d/wp.d", "hboneMtlsPort": 15008}},
            {"namespace": "d", "hostname": "wp.d", "vips": [], "ports": {}},
        ]});
        let t = super::services(&dump);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[1].starts_with("d/echo.d"), "{t}");
        assert!(
            lines[1].contains("/10.96.0.10") && lines[1].contains("80->8080"),
            "{t}"
        );
        assert!(lines[1].ends_with("d/wp.d:15008"), "{t}");
        assert!(lines[2].ends_with('-'), "{t}");
    }
}
