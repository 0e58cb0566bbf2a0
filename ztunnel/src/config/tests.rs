//! Parsing `ztunnel` command lines.

use super::*;

#[test]
fn parses_marks_and_env_defaults() {
    let cli = Cli::try_parse_from([
        "ztunnel",
        "run",
        "--node-name",
        "n1",
        "--capture-mark",
        "0x100",
    ])
    .unwrap();
    let Command::Run(args) = cli.command else {
        panic!("not run")
    };
    assert_eq!(args.capture_mark, 0x100);
    assert_eq!(args.proxy_mark, 0x539);
    assert_eq!(args.outbound_port, 15001);
    assert_eq!(args.instance(), "n1");
    assert!(parse_u32("0xzz").is_err());
    // Memory handed back as before unless asked otherwise.
    assert!(args.release_startup_pages);
    assert_eq!(args.malloc_trim_interval, Duration::from_secs(10));
}

#[test]
fn memory_options_turn_off() {
    let cli = Cli::try_parse_from([
        "ztunnel",
        "run",
        "--node-name",
        "n1",
        "--release-startup-pages",
        "false",
        "--malloc-trim-interval",
        "0",
    ])
    .unwrap();
    let Command::Run(args) = cli.command else {
        panic!("not run")
    };
    assert!(!args.release_startup_pages);
    assert_eq!(args.malloc_trim_interval, Duration::ZERO);
    // Each also read from the environment (the DaemonSet's way).
    use clap::CommandFactory;
    let cmd = Cli::command();
    let run = cmd.find_subcommand("run").unwrap();
    let env = |id: &str| {
        run.get_arguments()
            .find(|a| a.get_id() == id)
            .and_then(|a| a.get_env())
            .map(|e| e.to_string_lossy().to_string())
    };
    assert_eq!(
        env("release_startup_pages").as_deref(),
        Some("RELEASE_STARTUP_PAGES")
    );
    assert_eq!(
        env("malloc_trim_interval").as_deref(),
        Some("MALLOC_TRIM_INTERVAL")
    );
}

#[test]
fn parses_xds_args() {
    let cli = Cli::try_parse_from([
        "ztunnel",
        "run",
        "--node-name",
        "n1",
        "--xds-address",
        "https://istiod.istio-system.svc:15012",
        "--xds-root-cert",
        "/r.pem",
    ])
    .unwrap();
    let Command::Run(args) = cli.command else {
        panic!("not run")
    };
    assert_eq!(
        args.xds_address.as_deref(),
        Some("https://istiod.istio-system.svc:15012")
    );
    assert_eq!(args.xds_root_cert, Some(PathBuf::from("/r.pem")));
    let both = [
        "ztunnel",
        "run",
        "--node-name",
        "n1",
        "--xds-address",
        "https://x:1",
        "--local-xds-path",
        "f",
    ];
    assert!(Cli::try_parse_from(both).is_err(), "one source of state");
}

#[test]
fn control_plane_addresses_are_urls_with_ports() {
    assert!(parse_url("https://istiod.istio-system.svc:15012").is_ok());
    assert!(parse_url("http://127.0.0.1:15010").is_ok());
    assert!(parse_url("istiod:15012").unwrap_err().contains("https://"));
    assert!(parse_url("https://istiod").unwrap_err().contains("port"));
    assert!(parse_url("ftp://x:1").is_err());
    let bad = [
        "ztunnel",
        "run",
        "--node-name",
        "n",
        "--ca-address",
        "istiod:15012",
    ];
    let e = Cli::try_parse_from(bad).unwrap_err().to_string();
    assert!(e.contains("--ca-address"), "{e}");
}

/// `--cluster-id` and the pod facts reach the xDS node, not only Kubernetes names.
#[test]
fn xds_node_comes_from_the_parsed_config() {
    let cli = Cli::try_parse_from([
        "ztunnel",
        "run",
        "--node-name",
        "n1",
        "--cluster-id",
        "east",
        "--pod-name",
        "ztunnel-abc",
        "--pod-namespace",
        "istio-system",
        "--instance-ip",
        "10.0.0.7,fd00::7",
    ])
    .unwrap();
    let Command::Run(args) = cli.command else {
        panic!("not run")
    };
    let x = crate::xds::client::XdsConfig::for_run("https://istiod:15012", &args);
    assert_eq!(x.cluster_id, "east");
    assert_eq!(x.pod_name, "ztunnel-abc");
    assert_eq!(x.instance_ips.len(), 2);
    assert_eq!(
        x.node().id,
        "ztunnel~10.0.0.7~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
    );
}

#[test]
fn parses_controlplane_args() {
    let cli = Cli::try_parse_from([
        "ztunnel",
        "controlplane",
        "--config",
        "w.yaml",
        "--ca-dir",
        "/ca",
        "--tokens-file",
        "t",
        "--max-cert-ttl",
        "2h",
    ])
    .unwrap();
    let Command::Controlplane(args) = cli.command else {
        panic!("not controlplane")
    };
    assert_eq!(args.listen, "0.0.0.0:15012".parse().unwrap());
    assert_eq!(args.trust_domain, "cluster.local");
    assert_eq!(args.max_cert_ttl, Duration::from_secs(7200));
    assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
    assert!(parse_duration("5y").is_err());
    assert!(parse_duration("h").is_err());
}

#[test]
fn k8s_enrollment_flags_and_defaults() {
    let cli = Cli::try_parse_from([
        "ztunnel",
        "run",
        "--node-name",
        "n1",
        "--enrollment-source",
        "kubernetes",
    ])
    .unwrap();
    let Command::Run(mut args) = cli.command else {
        panic!("not run")
    };
    assert!(args.kubernetes_enrollment());
    assert_eq!(args.cluster_id, "Kubernetes");
    args.apply_kubernetes_defaults();
    assert_eq!(
        args.ca_address.as_deref(),
        Some("https://istiod.istio-system.svc:15012")
    );
    assert_eq!(
        args.xds_address.as_deref(),
        Some("https://istiod.istio-system.svc:15012")
    );
    assert_eq!(
        args.ca_token_file,
        Some(PathBuf::from("/var/run/secrets/tokens/istio-token"))
    );
    assert_eq!(
        args.ca_root_cert,
        Some(PathBuf::from("/var/run/secrets/istio/root-cert.pem"))
    );
    let cli = Cli::try_parse_from([
        "ztunnel",
        "run",
        "--node-name",
        "n1",
        "--enrollment-source",
        "state",
    ])
    .unwrap();
    let Command::Run(args) = cli.command else {
        panic!("not run")
    };
    assert!(!args.kubernetes_enrollment());
}

#[test]
fn help_is_consistent() {
    use clap::CommandFactory;
    Cli::command().debug_assert();
}

#[test]
fn sockmap_is_off_unless_asked_for() {
    let run = |extra: &[&str]| {
        let mut argv = vec!["ztunnel", "run", "--node-name", "n1"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(args) => args,
            _ => panic!("not run"),
        }
    };
    let default = run(&[]);
    assert!(!default.sockmap);
    assert!(default.sockmap_cgroup.is_none() && default.sockmap_exclude_ports.is_empty());
    let on = run(&[
        "--sockmap=true",
        "--sockmap-exclude-ports",
        "8080,9000",
        "--sockmap-cgroup",
        "/sys/fs/cgroup/kubepods",
    ]);
    assert!(on.sockmap);
    assert_eq!(on.sockmap_exclude_ports, vec![8080, 9000]);
    assert_eq!(
        on.sockmap_cgroup.as_deref(),
        Some(std::path::Path::new("/sys/fs/cgroup/kubepods"))
    );
    assert!(!run(&["--sockmap", "false"]).sockmap);
}

/// The limits are flags of their commands, with the documented defaults.
#[test]
fn limits_are_flags_with_defaults() {
    let cli = Cli::try_parse_from([
        "ztunnel",
        "controlplane",
        "--config",
        "w.yaml",
        "--ca-dir",
        "/ca",
        "--tokens-file",
        "t",
        "--max-connections",
        "10",
        "--max-xds-streams-per-token",
        "2",
        "--request-timeout",
        "5s",
    ])
    .unwrap();
    let Command::Controlplane(args) = cli.command else {
        panic!("not controlplane")
    };
    assert_eq!(args.limits.max_connections, 10);
    assert_eq!(args.limits.max_xds_streams_per_token, 2);
    assert_eq!(args.limits.request_timeout, Duration::from_secs(5));
    assert_eq!(args.limits.max_csr_bytes, 64 * 1024);
    assert_eq!(args.metrics_addr, None);

    let cli = Cli::try_parse_from([
        "ztunnel",
        "run",
        "--node-name",
        "n",
        "--http-max-connections",
        "3",
        "--hbone-keepalive-interval",
        "0",
        "--hbone-max-pending-handshakes-per-source",
        "4",
    ])
    .unwrap();
    let Command::Run(args) = cli.command else {
        panic!("not run")
    };
    assert_eq!(args.http_limits.http_max_connections, 3);
    assert_eq!(
        args.http_limits.http_header_timeout,
        Duration::from_secs(10)
    );
    assert_eq!(args.hbone_limits.hbone_keepalive_interval, Duration::ZERO);
    assert_eq!(
        args.hbone_limits.hbone_keepalive_timeout,
        Duration::from_secs(20)
    );
    assert_eq!(args.hbone_limits.hbone_max_pending_handshakes_per_source, 4);
    assert_eq!(
        args.hbone_limits.hbone_tcp_keepalive,
        Duration::from_secs(180)
    );
}

/// Istio's spellings: `LOG_FORMAT=plain`, the pool's settings; `ISTIO_META_ISTIO_VERSION`
/// is the version istiod sees, ours only when it is not given.
#[test]
fn istio_spellings_and_settings() {
    let run = |extra: &[&str]| {
        let mut argv = vec!["ztunnel", "run", "--node-name", "n1"];
        argv.extend_from_slice(extra);
        let Command::Run(args) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not run")
        };
        args
    };
    assert_eq!(run(&["--log-format", "plain"]).log_format, LogFormat::Text);
    let d = run(&[]);
    assert_eq!(d.pool_max_streams_per_connection, 100);
    assert_eq!(d.pool_unused_release_timeout, Duration::from_secs(60));
    let p = run(&[
        "--pool-max-streams-per-connection",
        "20",
        "--pool-unused-release-timeout",
        "5m",
    ]);
    assert_eq!(p.pool_max_streams_per_connection, 20);
    assert_eq!(p.pool_unused_release_timeout, Duration::from_secs(300));
    assert!(Cli::try_parse_from([
        "ztunnel",
        "run",
        "--node-name",
        "n1",
        "--pool-max-streams-per-connection",
        "0"
    ])
    .is_err());

    let version = |meta: Option<&str>| {
        let mut x = crate::xds::client::XdsConfig::for_run("https://istiod:15012", &d);
        if let Some(v) = meta {
            x.metadata.insert("ISTIO_VERSION".into(), v.into());
        }
        let node = x.node();
        let fields = node.metadata.unwrap().fields;
        match fields["ISTIO_VERSION"].kind.clone() {
            Some(prost_types::value::Kind::StringValue(s)) => s,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(version(Some("1.27.1")), "1.27.1");
    assert_eq!(version(None), env!("CARGO_PKG_VERSION"));
}
