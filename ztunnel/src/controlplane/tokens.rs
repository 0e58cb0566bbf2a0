//! Who is calling: the control plane's bearer tokens, one `<token> <node-name>` pair per line.
//!
//! In a real cluster istiod validates Kubernetes service-account JWTs; standalone we have no
//! API server, so the operator hands each node proxy a secret token and lists it here.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info};

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

/// Token → node name.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Tokens {
    entries: Vec<(String, String)>,
}

// Never print the secrets themselves.
impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("nodes", &self.nodes().collect::<Vec<_>>())
            .finish()
    }
}

impl Tokens {
    /// Parses the file format: `<token> <node-name>` separated by whitespace; blank lines and
    /// lines starting with `#` are ignored. A token may appear only once.
    pub fn parse(src: &str) -> Result<Tokens, TokensError> {
        let mut entries: Vec<(String, String)> = Vec::new();
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
            let [token, node] = fields.as_slice() else {
                return Err(err(format!(
                    "expected `<token> <node-name>`, found {} field(s)",
                    fields.len()
                )));
            };
            if let Some((_, other)) = entries.iter().find(|(t, _)| t == token) {
                return Err(err(format!(
                    "the token of node {node} is already given to node {other}: tokens must be unique"
                )));
            }
            entries.push((token.to_string(), node.to_string()));
        }
        Ok(Tokens { entries })
    }

    pub fn load(path: &Path) -> Result<Tokens, TokensError> {
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
        Tokens::parse(&src).map_err(with_file)
    }

    /// The node a token belongs to. Every entry is compared in constant time so the answer's
    /// timing does not reveal how much of a guessed token was right.
    pub fn node_of(&self, token: &str) -> Option<&str> {
        let mut found = None;
        for (t, node) in &self.entries {
            if constant_time_eq(t.as_bytes(), token.as_bytes()) {
                found = Some(node.as_str());
            }
        }
        found
    }

    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(_, n)| n.as_str())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
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
    interval: Duration,
) -> Result<watch::Receiver<Arc<Tokens>>, TokensError> {
    let path = path.to_path_buf();
    let mut last = std::fs::read(&path).ok();
    let initial = Tokens::load(&path)?;
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
            match Tokens::load(&path) {
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

    #[test]
    fn parses_pairs_comments_and_blank_lines() {
        let t = Tokens::parse("# node tokens\n\nsecret-a node-a\n  secret-b\tnode-b  # no\n")
            .unwrap_err();
        assert_eq!(t.line, Some(4), "{t}");
        let t = Tokens::parse("# node tokens\n\nsecret-a node-a\n  secret-b\tnode-b\n").unwrap();
        assert_eq!(t.node_of("secret-a"), Some("node-a"));
        assert_eq!(t.node_of("secret-b"), Some("node-b"));
        assert_eq!(t.node_of("secret-c"), None);
        assert_eq!(t.node_of("secret-"), None);
        assert!(
            !format!("{t:?}").contains("secret"),
            "Debug must not leak tokens"
        );
    }

    #[test]
    fn reports_bad_lines_with_their_number() {
        let e = Tokens::parse("a node-a\nlonely\n").unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(e.to_string().contains("found 1 field"), "{e}");
        let e = Tokens::parse("a node-a\n\na node-b\n").unwrap_err();
        assert_eq!(e.line, Some(3));
        assert!(e.to_string().contains("unique"), "{e}");
    }

    #[test]
    fn load_names_the_file() {
        let e = Tokens::load(Path::new("/nonexistent/tokens")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/tokens"), "{e}");
    }
}
