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
    let t = Tokens::parse("# node tokens\n\nsecret-a node-a\n  secret-b\tnode-b\n", TD).unwrap();
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

const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaa";
const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbb";
const C: &str = "cccccccccccccccccccccccc";

fn two() -> Tokens {
    Tokens::parse(&format!("{A} node-a\n{B} node-b\n"), TD).unwrap()
}

/// Reload decisions: (what the file now says, tokens granted after it).
#[test]
fn a_bad_edit_revokes_what_it_removed_and_adds_nothing() {
    let cases: &[(&str, String, &[&str])] = &[
        (
            "valid: exactly its tokens",
            format!("{A} node-a\n{C} node-c\n"),
            &[A, C],
        ),
        (
            "typo elsewhere, token removed: removed one refused",
            format!("{A} node-a\nthis line is broken\n"),
            &[A],
        ),
        (
            "typo on the token's own line: that token refused",
            format!("{A} node-a\n{B} Node-B\n"),
            &[A],
        ),
        (
            "a new token in a bad file is not added",
            format!("{A} node-a\n{B} node-b\n{C} node-c\nbroken\n"),
            &[A, B],
        ),
        (
            "a token given to another caller in a bad file is revoked",
            format!("{A} node-z\n{B} node-b\nbroken\n"),
            &[B],
        ),
        (
            "a token on two lines of a bad file is revoked",
            format!("{A} node-a\n{A} node-a\n{B} node-b\n"),
            &[B],
        ),
        (
            "extra fields on its line: revoked",
            format!("{A} node-a extra\n{B} node-b\n"),
            &[B],
        ),
        ("empty file: nothing", String::new(), &[]),
    ];
    let current = two();
    for (what, src, granted) in cases {
        let next = Reload::decide(&current, Ok(src.clone()), TD).tokens();
        for t in [A, B, C] {
            assert_eq!(
                next.caller_of(t).is_some(),
                granted.contains(&t),
                "{what}: token {}",
                &t[..1]
            );
        }
    }
    match Reload::decide(&current, Ok(format!("{A} node-a\nbroken\n")), TD) {
        Reload::Invalid { revoked, error, .. } => {
            assert_eq!(revoked, 1);
            assert_eq!(error.line, Some(2));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_unreadable_file_refuses_everyone() {
    let r = Reload::decide(&two(), Err("No such file or directory".into()), TD);
    assert!(matches!(r, Reload::Unreadable(_)));
    assert!(r.tokens().is_empty());
    assert_eq!(r.tokens().caller_of(A), None);
}

#[test]
fn tokens_are_compared_as_equal_length_digests() {
    let t = two();
    assert_eq!(t.caller_of(A), Some(&node("node-a")));
    // A prefix, an extension, one byte off: all refused, all compared as 32 bytes.
    for guess in [
        A[..10].to_string(),
        format!("{A}a"),
        format!("{}b", &A[1..]),
    ] {
        assert_eq!(t.caller_of(&guess), None, "{guess}");
    }
    assert_eq!(digest("x").len(), digest(&"x".repeat(1000)).len());
    assert!(!format!("{t:?}").contains(&A[..8]));
}

#[test]
fn warns_on_short_tokens_and_world_readable_files() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("zt-tokens-warn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokens");
    std::fs::write(&path, format!("{A} node-a\nshort node-b\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let t = Tokens::load(&path, TD).unwrap();
    let w = warnings(&path, &t);
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(w[0].contains("readable by every user"), "{w:?}");
    assert!(w[1].contains("line 2 (node node-b)"), "{w:?}");
    assert!(
        !w.iter().any(|l| l.contains("short ")),
        "never the token: {w:?}"
    );
    std::fs::write(&path, format!("{A} node-a\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let t = Tokens::load(&path, TD).unwrap();
    assert!(warnings(&path, &t).is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

async fn next(rx: &mut watch::Receiver<Arc<Tokens>>) -> Arc<Tokens> {
    tokio::time::timeout(Duration::from_secs(30), rx.changed())
        .await
        .expect("the watcher publishes")
        .unwrap();
    rx.borrow_and_update().clone()
}

/// The watcher end to end: a write that deletes a token and breaks a line revokes it at
/// the next check; deleting the file refuses everyone; a good file restores them.
#[tokio::test]
async fn the_watcher_applies_bad_edits_and_missing_files() {
    let dir = std::env::temp_dir().join(format!("zt-tokens-watch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokens");
    std::fs::write(&path, format!("{A} node-a\n{B} node-b\n")).unwrap();
    let mut rx = watch_tokens(&path, TD, Duration::from_millis(10)).unwrap();
    std::fs::write(&path, format!("{A} node-a\n{C} node-c extra\n")).unwrap();
    let t = next(&mut rx).await;
    assert_eq!(t.caller_of(A), Some(&node("node-a")));
    assert_eq!(t.caller_of(B), None, "removed in a bad edit: revoked");
    assert_eq!(t.caller_of(C), None, "added in a bad edit: not granted");
    std::fs::remove_file(&path).unwrap();
    let t = next(&mut rx).await;
    assert!(t.is_empty(), "a missing file refuses everyone");
    std::fs::write(&path, format!("{A} node-a\n{B} node-b\n")).unwrap();
    let t = next(&mut rx).await;
    assert_eq!(t.len(), 2);
    std::fs::remove_dir_all(&dir).unwrap();
}
