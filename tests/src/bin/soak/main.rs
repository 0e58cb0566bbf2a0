//! `cargo xtask soak`: the long reliability runs (issue 10), on the namespace testbed.
//!
//! Two nodes run ztunnel (release build); a client pod on node-a talks to an echo server
//! pod on node-b through the mesh. Three phases, each reporting what was lost:
//!
//! 1. **Concurrent**: SOAK_CONNS (10,000) connections opened and held at once, each
//!    exchanging bytes twice (all alive together), then closed; ztunnel file descriptors
//!    and memory at baseline, at the peak, and after they close.
//! 2. **Soak**: SOAK_SECS (300) of steady new-connection load (SOAK_WORKERS threads of
//!    connect, echo, close) with both ztunnels' RSS sampled every 5 s: flat or not.
//! 3. **Handover**: under the same load, a new ztunnel takes over on node-a, then on node-b;
//!    refused/reset/timed-out connections and SYNs dropped by capture are counted.
//!
//! Writes `target/soak/results.{json,md}` (SOAK_OUT to change) and exits non-zero if
//! anything was lost or leaked. A watchdog tears everything down past its budget.
//! ztunnel runs with the `GLIBC_TUNABLES` the Dockerfile and the DaemonSet deploy
//! (ZTUNNEL_GLIBC_TUNABLES overrides it; empty for glibc's defaults).

mod echo;
mod phases;

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ztunnel_tests::procstat;
use ztunnel_tests::traffic::{echoes, eventually};
use ztunnel_tests::ztunnel::{local_config, WorkloadSpec};
use ztunnel_tests::Testbed;

use phases::{Knobs, Mesh};

const ECHO_PORT: u16 = 8080;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--echo-server") {
        return echo::serve(ECHO_PORT);
    }
    if !ztunnel_tests::is_root() {
        bail!("the soak needs root (network namespaces, eBPF)");
    }
    let knobs = Knobs::from_env();
    ztunnel_tests::watchdog("soak", Duration::from_secs(knobs.secs + 900));
    procstat::raise_fd_limit();
    if std::env::var_os("ZTUNNEL_LOG").is_none() {
        std::env::set_var("ZTUNNEL_LOG", ztunnel_tests::ztunnel::PRODUCTION_LOG);
    }
    let started = Instant::now();

    let mut tb = Testbed::new()?;
    let a = tb.add_node("node-a")?;
    let b = tb.add_node("node-b")?;
    let client = tb.add_pod(&a, "client")?;
    // The steady load (about 2,000 connections/s to one echo port on this testbed) would
    // otherwise run the client pod out of its own ports, with or without the mesh.
    client.allow_fast_reconnects()?;
    let server = tb.add_pod(&b, "server")?;
    let config = tb.write_config(
        "workloads.yaml",
        &local_config(
            &[
                WorkloadSpec::mesh(&client, "soak", "client"),
                WorkloadSpec::mesh(&server, "soak", "server"),
            ],
            "",
        ),
    )?;
    let exe = std::env::current_exe().context("own path")?;
    let mut echo_cmd = server.netns.command(exe)?;
    echo_cmd.arg("--echo-server");
    tb.spawn(echo_cmd)?;
    let flags = ["--drain-timeout", "5s"];
    let za = tb.start_ztunnel(&a, &config, &flags)?;
    let zb = tb.start_ztunnel(&b, &config, &flags)?;
    let dst = std::net::SocketAddr::new(server.ip.into(), ECHO_PORT);
    eventually(
        "the mesh carries a first connection",
        Duration::from_secs(20),
        || echoes(&client.netns, dst),
    );
    eprintln!(
        "soak: ztunnel pids {} (node-a), {} (node-b), GLIBC_TUNABLES={:?}",
        za.pid,
        zb.pid,
        ztunnel_tests::ztunnel::glibc_tunables()
    );

    let mut mesh = Mesh {
        tb: &tb,
        config: &config,
        flags: &flags,
        nodes: [a, b],
        client,
        server,
        dst,
        ztunnels: [za, zb],
    };
    let concurrent = phases::concurrent(&mesh, knobs.conns)?;
    eprintln!("soak: concurrent phase done");
    let soak = phases::soak(&mesh, &knobs)?;
    eprintln!("soak: steady phase done");
    let handover = phases::handover(&mut mesh, &knobs)?;
    eprintln!("soak: handover phase done");

    let results = phases::Results {
        date: phases::now_utc(),
        elapsed_secs: started.elapsed().as_secs_f64(),
        concurrent,
        soak,
        handover,
    };
    let out = knobs.out.clone();
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results.json())?,
    )?;
    let md = results.markdown();
    std::fs::write(out.join("results.md"), &md)?;
    println!("{md}");
    eprintln!("soak: wrote {}", out.display());
    let problems = results.problems();
    drop(mesh);
    drop(tb);
    if !problems.is_empty() {
        bail!("soak failed:\n- {}", problems.join("\n- "));
    }
    Ok(())
}
