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
use tracing::{error, info, warn};

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

/// The shortest token not warned about: 16 bytes of a random token are 128 bits when
/// each byte is random, fewer when it is text; `openssl rand -hex 32` makes 64.
pub const MIN_TOKEN_LEN: usize = 16;

/// A token's SHA-256. Only digests are kept and compared: every comparison is between
/// 32-byte values, in constant time, so neither a guessed token's length nor how much of it
/// was right shows in the answer's timing.
pub type Digest = [u8; 32];

pub fn digest(token: &str) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// Token → caller.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Tokens {
    entries: Vec<(Digest, Caller)>,
    /// Callers whose token is shorter than [`MIN_TOKEN_LEN`] (warned about at load).
    short: Vec<String>,
}

// Never print the secrets themselves (nor their digests).
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
        let mut tokens = Tokens::default();
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
            let d = digest(token);
            if let Some((_, other)) = tokens.entries.iter().find(|(t, _)| *t == d) {
                return Err(err(format!(
                    "the token of {caller} is already given to {other}: tokens must be unique"
                )));
            }
            if token.len() < MIN_TOKEN_LEN {
                tokens.short.push(format!("line {} ({caller})", i + 1));
            }
            tokens.entries.push((d, caller));
        }
        Ok(tokens)
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

    /// Who holds a token. Every entry is compared, each in constant time.
    pub fn caller_of(&self, token: &str) -> Option<&Caller> {
        self.caller_of_digest(&digest(token))
    }

    pub fn caller_of_digest(&self, d: &Digest) -> Option<&Caller> {
        let mut found = None;
        for (t, caller) in &self.entries {
            if constant_time_eq(t, d) {
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

    /// Where tokens shorter than [`MIN_TOKEN_LEN`] are: `line N (caller)`.
    pub fn short_tokens(&self) -> &[String] {
        &self.short
    }

    /// What of these tokens a file that does not parse still grants: an entry stays only
    /// if `src` has exactly one line starting with its token and that line, on its own,
    /// gives it to the same caller. So an edit that removes a token and also breaks
    /// another line revokes the removed token at once; nothing is added or changed until
    /// the file parses again.
    pub fn still_in(&self, src: &str, trust_domain: &str) -> Tokens {
        let mut lines: std::collections::HashMap<Digest, Vec<Option<Caller>>> = Default::default();
        for line in src.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let caller = match fields.as_slice() {
                [_, who] => parse_caller(who, trust_domain).ok(),
                _ => None,
            };
            lines.entry(digest(fields[0])).or_default().push(caller);
        }
        let entries = self
            .entries
            .iter()
            .filter(|(d, caller)| {
                matches!(lines.get(d).map(Vec::as_slice), Some([Some(c)]) if c == caller)
            })
            .cloned()
            .collect();
        Tokens {
            entries,
            short: Vec::new(),
        }
    }
}

/// What a reload of the tokens file publishes.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    /// The file parsed: exactly its tokens.
    Valid(Tokens),
    /// It did not: the tokens it still grants ([`Tokens::still_in`]), and how many of the
    /// current ones that revokes.
    Invalid {
        kept: Tokens,
        revoked: usize,
        error: TokensError,
    },
    /// It cannot be read (missing, permissions, not UTF-8 is Invalid): no tokens at all,
    /// every caller refused until it can be.
    Unreadable(String),
}

impl Reload {
    /// The decision, from the current tokens and what reading the file gave.
    pub fn decide(current: &Tokens, read: Result<String, String>, trust_domain: &str) -> Reload {
        let src = match read {
            Ok(src) => src,
            Err(e) => return Reload::Unreadable(e),
        };
        match Tokens::parse(&src, trust_domain) {
            Ok(t) => Reload::Valid(t),
            Err(error) => {
                let kept = current.still_in(&src, trust_domain);
                Reload::Invalid {
                    revoked: current.len() - kept.len(),
                    kept,
                    error,
                }
            }
        }
    }

    /// The tokens to publish.
    pub fn tokens(&self) -> Tokens {
        match self {
            Reload::Valid(t) | Reload::Invalid { kept: t, .. } => t.clone(),
            Reload::Unreadable(_) => Tokens::default(),
        }
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

/// Equal-length digests only, so no length to leak; every byte is looked at.
fn constant_time_eq(a: &Digest, b: &Digest) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What is wrong with how the file is kept, worth a warning: readable by everyone (the
/// tokens are secrets), tokens shorter than [`MIN_TOKEN_LEN`].
pub fn warnings(path: &Path, tokens: &Tokens) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut w = Vec::new();
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o004 != 0 {
            w.push(format!(
                "{} is readable by every user (mode {:o}): the tokens in it are secrets; chmod o-r",
                path.display(),
                meta.permissions().mode() & 0o7777
            ));
        }
    }
    if !tokens.short_tokens().is_empty() {
        w.push(format!(
            "tokens shorter than {MIN_TOKEN_LEN} characters, easier to guess: {} (e.g. `openssl rand -hex 32` makes a good one)",
            tokens.short_tokens().join(", ")
        ));
    }
    w
}

/// How often an unreadable tokens file is complained about again (beside each change).
const UNREADABLE_REPEAT: Duration = Duration::from_secs(60);

/// Loads `path` (which must be valid now) and checks it every `interval`, publishing what
/// [`Reload::decide`] decides whenever its contents change:
/// - valid: exactly its tokens;
/// - invalid (a typo): only the current tokens it still grants, line for line, so a token
///   removed in the same edit is refused at the next check; nothing new until it parses;
/// - unreadable or missing: no tokens, every caller refused, logged as an error at once and
///   every minute while it lasts.
///
/// So a revoked token is refused within `interval` of the write that removed it,
/// whatever else the write did. Polls, like `xds::watch`, so ConfigMap/Secret symlink
/// swaps are seen.
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
    for w in warnings(&path, &initial) {
        warn!("tokens file: {w}");
    }
    let (tx, rx) = watch::channel(Arc::new(initial));
    tokio::spawn(async move {
        let mut unreadable_since_log: Option<std::time::Instant> = None;
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let read = match tokio::fs::read(&path).await {
                Ok(bytes) => {
                    if last.as_deref() == Some(bytes.as_slice()) {
                        continue;
                    }
                    last = Some(bytes.clone());
                    unreadable_since_log = None;
                    // Not UTF-8 is a bad edit, not a missing file: lines still decide.
                    Ok(String::from_utf8(bytes)
                        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
                }
                Err(e) => {
                    // Seen again once readable, even with the same bytes as before.
                    last = None;
                    Err(e.to_string())
                }
            };
            let current = tx.borrow().clone();
            let decision = Reload::decide(&current, read, &trust_domain);
            match &decision {
                Reload::Valid(tokens) => {
                    info!(path = %path.display(), tokens = tokens.len(), "tokens reloaded");
                    for w in warnings(&path, tokens) {
                        warn!("tokens file: {w}");
                    }
                }
                Reload::Invalid {
                    kept,
                    revoked,
                    error,
                } => error!(
                    kept = kept.len(),
                    revoked,
                    "{error}; keeping only the tokens the file still grants line for line, \
                     adding nothing until it parses"
                ),
                Reload::Unreadable(e) => {
                    let due = unreadable_since_log.is_none_or(|t| t.elapsed() >= UNREADABLE_REPEAT);
                    if due {
                        error!(
                            path = %path.display(),
                            "tokens file cannot be read ({e}): refusing every caller until it can"
                        );
                        unreadable_since_log = Some(std::time::Instant::now());
                    }
                }
            }
            let next = decision.tokens();
            if *current != next {
                tx.send_replace(Arc::new(next));
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
#[path = "tokens_tests.rs"]
mod tests;
