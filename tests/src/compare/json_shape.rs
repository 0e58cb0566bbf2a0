//! The shape of a JSON document: every key path it has, with the JSON types seen there.
//! Two documents with equal shapes can be read by the same tool, whatever their data.
//!
//! Paths join keys with `.`; `[]` stands for every element of an array (so an array's
//! element shape is the union of its elements'), and `*` for every key of a map keyed by
//! data (workload UIDs, addresses, ports), whose keys differ between runs and proxies
//! while the shape of their values must not.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum JsonType {
    Null,
    Bool,
    Number,
    String,
    Array,
    Object,
}

impl fmt::Display for JsonType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JsonType::Null => "null",
            JsonType::Bool => "bool",
            JsonType::Number => "number",
            JsonType::String => "string",
            JsonType::Array => "array",
            JsonType::Object => "object",
        })
    }
}

fn type_of(v: &Value) -> JsonType {
    match v {
        Value::Null => JsonType::Null,
        Value::Bool(_) => JsonType::Bool,
        Value::Number(_) => JsonType::Number,
        Value::String(_) => JsonType::String,
        Value::Array(_) => JsonType::Array,
        Value::Object(_) => JsonType::Object,
    }
}

/// Path → the types seen at it.
pub type Shape = BTreeMap<String, BTreeSet<JsonType>>;

/// The shape of `v`. `data_keyed` names the paths of maps whose keys are data (glob
/// patterns, see [`glob`]): their keys collapse to `*`.
pub fn shape(v: &Value, data_keyed: &[&str]) -> Shape {
    let mut out = Shape::new();
    walk(v, "", data_keyed, &mut out);
    out
}

fn walk(v: &Value, path: &str, data_keyed: &[&str], out: &mut Shape) {
    if !path.is_empty() {
        out.entry(path.to_string()).or_default().insert(type_of(v));
    }
    match v {
        Value::Array(items) => {
            let p = format!("{path}[]");
            for item in items {
                walk(item, &p, data_keyed, out);
            }
        }
        Value::Object(map) => {
            let by_data = data_keyed.iter().any(|pat| glob(pat, path));
            for (k, item) in map {
                let key = if by_data { "*" } else { k.as_str() };
                let p = if path.is_empty() {
                    key.to_string()
                } else {
                    format!("{path}.{key}")
                };
                walk(item, &p, data_keyed, out);
            }
        }
        _ => {}
    }
}

/// `*` in `pattern` matches any run of characters (also none, also `.`); the rest
/// matches itself.
pub fn glob(pattern: &str, s: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == s,
        Some((head, tail)) => {
            let Some(rest) = s.strip_prefix(head) else {
                return false;
            };
            (0..=rest.len())
                .filter(|i| rest.is_char_boundary(*i))
                .any(|i| glob(tail, &rest[i..]))
        }
    }
}

/// One line per path, `path<TAB>type|type`: a shape kept as a file (a fixture of
/// upstream's key paths, so CI checks ours against it without upstream's binary).
pub fn to_text(s: &Shape) -> String {
    s.iter()
        .map(|(path, types)| format!("{path}\t{}\n", names(types)))
        .collect()
}

/// The inverse of [`to_text`]; blank lines and `#` comments are skipped.
pub fn from_text(text: &str) -> Result<Shape, String> {
    let mut out = Shape::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (path, types) = line
            .split_once('\t')
            .ok_or_else(|| format!("line {}: no tab: {line:?}", i + 1))?;
        let types = types
            .split('|')
            .map(|t| match t {
                "null" => Ok(JsonType::Null),
                "bool" => Ok(JsonType::Bool),
                "number" => Ok(JsonType::Number),
                "string" => Ok(JsonType::String),
                "array" => Ok(JsonType::Array),
                "object" => Ok(JsonType::Object),
                other => Err(format!("line {}: no such type {other:?}", i + 1)),
            })
            .collect::<Result<_, _>>()?;
        out.insert(path.to_string(), types);
    }
    Ok(out)
}

/// How `ours` differs from `theirs` (upstream's).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ShapeDiff {
    /// Paths upstream has and we lack; a path under one already listed is left out.
    pub missing: Vec<String>,
    /// Paths we have and upstream lacks, likewise.
    pub extra: Vec<String>,
    /// Paths both have with different types: (path, upstream's, ours).
    pub types: Vec<(String, String, String)>,
}

/// Compares two shapes. `null` matches every type: both proxies write an unset optional
/// field as `null` and a set one as its value, so a `null` on one side says nothing about
/// the field's type; what such a value holds still shows, as the keys beneath it.
pub fn diff(theirs: &Shape, ours: &Shape) -> ShapeDiff {
    let only = |a: &Shape, b: &Shape| -> Vec<String> {
        let mut top: Vec<String> = vec![];
        for path in a.keys().filter(|p| !b.contains_key(*p)) {
            if !top.iter().any(|t| is_under(path, t)) {
                top.push(path.clone());
            }
        }
        top
    };
    let types = theirs
        .iter()
        .filter_map(|(path, t)| {
            let o = ours.get(path)?;
            let strip = |s: &BTreeSet<JsonType>| -> BTreeSet<JsonType> {
                s.iter().copied().filter(|t| *t != JsonType::Null).collect()
            };
            let (t, o) = (strip(t), strip(o));
            (!t.is_empty() && !o.is_empty() && t != o).then(|| (path.clone(), names(&t), names(&o)))
        })
        .collect();
    ShapeDiff {
        missing: only(theirs, ours),
        extra: only(ours, theirs),
        types,
    }
}

fn names(s: &BTreeSet<JsonType>) -> String {
    s.iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join("|")
}

/// Whether `path` is `parent` or lies beneath it.
fn is_under(path: &str, parent: &str) -> bool {
    path == parent
        || path
            .strip_prefix(parent)
            .is_some_and(|rest| rest.starts_with('.') || rest.starts_with("[]"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arrays_take_the_union_of_their_elements_and_data_keys_collapse() {
        let v = json!({
            "workloads": [{"uid": "a", "node": "n"}, {"uid": "b", "waypoint": {"x": 1}}],
            "byUid": {"cluster1//Pod/a": {"state": "Up"}, "cluster1//Pod/b": {"state": "Up", "n": 2}},
        });
        let s = shape(&v, &["byUid"]);
        let paths: Vec<&str> = s.keys().map(String::as_str).collect();
        assert_eq!(
            paths,
            [
                "byUid",
                "byUid.*",
                "byUid.*.n",
                "byUid.*.state",
                "workloads",
                "workloads[]",
                "workloads[].node",
                "workloads[].uid",
                "workloads[].waypoint",
                "workloads[].waypoint.x",
            ]
        );
        assert_eq!(s["byUid.*.n"], BTreeSet::from([JsonType::Number]));
    }

    #[test]
    fn reports_the_topmost_missing_and_extra_paths_and_type_changes() {
        let theirs = shape(
            &json!({"a": {"b": 1, "c": {"d": true}}, "t": "x", "n": null, "arr": [{"k": 1}]}),
            &[],
        );
        let ours = shape(
            &json!({"a": {"b": 1, "e": [1]}, "t": 5, "n": {"z": 1}, "arr": [{"k": 1, "m": 2}]}),
            &[],
        );
        let d = diff(&theirs, &ours);
        assert_eq!(d.missing, ["a.c"]);
        assert_eq!(d.extra, ["a.e", "arr[].m", "n.z"]);
        assert_eq!(d.types, [("t".into(), "string".into(), "number".into())]);
    }

    #[test]
    fn shapes_read_back_from_text() {
        let s = shape(&json!({"a": [{"b": 1}, {"b": "x"}], "n": null}), &[]);
        let text = to_text(&s);
        assert!(text.contains("a[].b\tnumber|string\n"), "{text}");
        assert_eq!(from_text(&format!("# upstream\n{text}")).unwrap(), s);
        assert!(from_text("a\tstrange").is_err());
    }

    #[test]
    fn globs() {
        assert!(glob("services[].ports", "services[].ports"));
        assert!(glob("config.*", "config.proxyMetadata"));
        assert!(glob("*.endpoints", "services[].endpoints"));
        assert!(!glob("config.*", "version.x"));
        assert!(glob("ztunnel_*", "ztunnel_connections_total"));
    }
}
