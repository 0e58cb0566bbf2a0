//! Who is calling: the control plane's bearer tokens, one `<token> <caller>` pair per line,
//! where the caller is either a node name or a SPIFFE URI.
//!
//! In a real cluster istiod validates Kubernetes service-account JWTs; standalone we have no
//! API server, so the operator hands each caller a secret token and lists it here. Two kinds
//! of callers ask for certificates, and they ask differently:
//! - a node proxy (ztunnel) asks on behalf of the workloads of its node, naming each one as
//!   `ImpersonatedIdentity`: its line names the node;
//! - a proxy that is itself a workload (a waypoint, a gateway, a sidecar, a dedicated-mode
//!   ztunnel) asks for its own identity, with no `ImpersonatedIdentity`: its line names that
//!   identity, which is then the only one the token can obtain.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info};

use crate::identity::Identity;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct TokensError {
    pub file: Option<PathBuf>,
    /// 1-based line, when the problem is on one line.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for TokensError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tokens file")?;
        if let Some(file) = &self.file {
            write!(f, " {}", file.display())?;
        }
        if let Some(line) = self.line {
            write!(f, " line {line}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Who holds a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A node proxy: may obtain, by impersonation, the identities of its node's workloads.
    Node(String),
    /// A workload proxy: may obtain exactly this identity, for itself.
    Identity(Identity),
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Node(node) => write!(f, "node {node}"),
            Caller::Identity(id) => write!(f, "{id}"),
        }
    }
}

/// Token → caller.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Tokens {
    entries: Vec<(String, Caller)>,
}

// Never print the secrets themselves.
impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let callers: Vec<String> = self.entries.iter().map(|(_, c)| c.to_string()).collect();
        f.debug_struct("Tokens").field("callers", &callers).finish()
    }
}

impl Tokens {
    /// Parses the file format: `<token> <node-name>` or `<token> spiffe://<trust-domain>/ns/
    /// <ns>/sa/<sa>` separated by whitespace; blank lines and lines starting with `#` are
    /// ignored. A token may appear only once; an identity must be in `trust_domain` (this
    /// CA could not sign it otherwise, so the line is a mistake).
    pub fn parse(src: &str, trust_domain: &str) -> Result<Tokens, TokensError> {
        let mut entries: Vec<(String, Caller)> = Vec::new();
        for (i, line) in src.lines().enumerate() {
            let err = |message: String| TokensError {
                file: None,
                line: Some(i + 1),
                message,
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [token, who] = fields.as_slice() else {
                return Err(err(format!(
                    "expected `<token> <node-name>` or `<token> spiffe://{trust_domain}/ns/<namespace>/sa/<service-account>`, found {} field(s)",
                    fields.len()
                )));
            };
            let caller = parse_caller(who, trust_domain).map_err(err)?;
            if let Some((_, other)) = entries.iter().find(|(t, _)| t == token) {
                return Err(err(format!(
                    "the token of {caller} is already given to {other}: tokens must be unique"
                )));
            }
            entries.push((token.to_string(), caller));
        }
        Ok(Tokens { entries })
    }

    pub fn load(path: &Path, trust_domain: &str) -> Result<Tokens, TokensError> {
        let with_file = |e: TokensError| TokensError {
            file: Some(path.to_path_buf()),
            ..e
        };
        let src = std::fs::read_to_string(path).map_err(|e| {
            with_file(TokensError {
                file: None,
                line: None,
                message: format!("cannot read: {e}"),
            })
        })?;
        Tokens::parse(&src, trust_domain).map_err(with_file)
    }

    /// Who holds a token. Every entry is compared in constant time so the answer's timing
    /// does not reveal how much of a guessed token was right.
    pub fn caller_of(&self, token: &str) -> Option<&Caller> {
        let mut found = None;
        for (t, caller) in &self.entries {
            if constant_time_eq(t.as_bytes(), token.as_bytes()) {
                found = Some(caller);
            }
        }
        found
    }

    pub fn callers(&self) -> impl Iterator<Item = &Caller> {
        self.entries.iter().map(|(_, c)| c)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The second field of a line: a SPIFFE URI, or else a Kubernetes node name (a DNS-1123
/// subdomain), so that a mistyped URI is refused rather than taken for a node no workload is on.
fn parse_caller(who: &str, trust_domain: &str) -> Result<Caller, String> {
    if who.to_ascii_lowercase().starts_with("spiffe:") {
        let id: Identity = who.parse().map_err(|e| format!("{e}"))?;
        if id.trust_domain != trust_domain {
            return Err(format!(
                "{id} is not in this CA's trust domain {trust_domain}: it could never be issued"
            ));
        }
        return Ok(Caller::Identity(id));
    }
    if !is_node_name(who) {
        return Err(format!(
            "{who:?} is neither a node name (lowercase letters, digits, `-` and `.`) nor a \
             SPIFFE URI (spiffe://{trust_domain}/ns/<namespace>/sa/<service-account>)"
        ));
    }
    Ok(Caller::Node(who.to_string()))
}

/// A Kubernetes node name: a DNS-1123 subdomain.
fn is_node_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Loads `path` (which must be valid now) and republishes it whenever its contents change
/// to another valid version; an invalid edit is logged and the last good tokens kept.
/// Polls, like `xds::watch`, so ConfigMap/Secret symlink swaps are seen.
pub fn watch_tokens(
    path: &Path,
    trust_domain: &str,
    interval: Duration,
) -> Result<watch::Receiver<Arc<Tokens>>, TokensError> {
    let path = path.to_path_buf();
    let trust_domain = trust_domain.to_string();
    let mut last = std::fs::read(&path).ok();
    let initial = Tokens::load(&path, &trust_domain)?;
    info!(path = %path.display(), tokens = initial.len(), "tokens loaded");
    let (tx, rx) = watch::channel(Arc::new(initial));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let Ok(bytes) = tokio::fs::read(&path).await else {
                continue;
            };
            if last.as_deref() == Some(bytes.as_slice()) {
                continue;
            }
            last = Some(bytes);
            match Tokens::load(&path, &trust_domain) {
                Ok(tokens) => {
                    info!(path = %path.display(), tokens = tokens.len(), "tokens reloaded");
                    tx.send_replace(Arc::new(tokens));
                }
                Err(e) => error!("{e}; keeping the previous tokens"),
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "cluster.local";

    fn node(n: &str) -> Caller {
        Caller::Node(n.to_string())
    }

    #[test]
    fn parses_pairs_comments_and_blank_lines() {
        let t = Tokens::parse(
            "# node tokens\n\nsecret-a node-a\n  secret-b\tnode-b  # no\n",
            TD,
        )
        .unwrap_err();
        assert_eq!(t.line, Some(4), "{t}");
        let t =
            Tokens::parse("# node tokens\n\nsecret-a node-a\n  secret-b\tnode-b\n", TD).unwrap();
        assert_eq!(t.caller_of("secret-a"), Some(&node("node-a")));
        assert_eq!(t.caller_of("secret-b"), Some(&node("node-b")));
        assert_eq!(t.caller_of("secret-c"), None);
        assert_eq!(t.caller_of("secret-"), None);
        assert!(
            !format!("{t:?}").contains("secret"),
            "Debug must not leak tokens"
        );
    }

    #[test]
    fn parses_identity_tokens() {
        let t = Tokens::parse(
            "w1 spiffe://cluster.local/ns/default/sa/waypoint\n\
             w2 spiffe://cluster.local/ns/default/sa/waypoint\n\
             n ip-10-0-0-1.ec2.internal\n",
            TD,
        )
        .unwrap();
        let waypoint = Caller::Identity(Identity::new(TD, "default", "waypoint"));
        // Replicas of one waypoint may each have their own token.
        assert_eq!(t.caller_of("w1"), Some(&waypoint));
        assert_eq!(t.caller_of("w2"), Some(&waypoint));
        assert_eq!(t.caller_of("n"), Some(&node("ip-10-0-0-1.ec2.internal")));
        assert_eq!(
            waypoint.to_string(),
            "spiffe://cluster.local/ns/default/sa/waypoint"
        );
        assert!(format!("{t:?}").contains("sa/waypoint"), "{t:?}");
    }

    #[test]
    fn refuses_bad_identities_and_node_names_naming_the_line() {
        let cases = [
            (
                "t spiffe://example.org/ns/a/sa/b",
                "trust domain cluster.local",
            ),
            ("t spiffe://cluster.local/ns/a", "invalid SPIFFE identity"),
            (
                "t spiffe:cluster.local/ns/a/sa/b",
                "invalid SPIFFE identity",
            ),
            ("t https://cluster.local/ns/a/sa/b", "neither a node name"),
            ("t Node-A", "neither a node name"),
            ("t node..a", "neither a node name"),
            ("t -node", "neither a node name"),
        ];
        for (line, want) in cases {
            let e = Tokens::parse(&format!("ok node-a\n{line}\n"), TD).unwrap_err();
            assert_eq!(e.line, Some(2), "{line}: {e}");
            assert!(e.to_string().contains(want), "{line}: {e}");
            assert!(e.to_string().contains("line 2"), "{line}: {e}");
        }
    }

    #[test]
    fn reports_bad_lines_with_their_number() {
        let e = Tokens::parse("a node-a\nlonely\n", TD).unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(e.to_string().contains("found 1 field"), "{e}");
        assert!(e.to_string().contains("spiffe://cluster.local/ns/"), "{e}");
        let e = Tokens::parse("a node-a\n\na node-b\n", TD).unwrap_err();
        assert_eq!(e.line, Some(3));
        assert!(e.to_string().contains("unique"), "{e}");
        let e = Tokens::parse("a node-a\na spiffe://cluster.local/ns/x/sa/y\n", TD).unwrap_err();
        assert!(
            e.to_string()
                .contains("spiffe://cluster.local/ns/x/sa/y is already given to node node-a"),
            "{e}"
        );
    }

    #[test]
    fn load_names_the_file() {
        let e = Tokens::load(Path::new("/nonexistent/tokens"), TD).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/tokens"), "{e}");
    }
}
