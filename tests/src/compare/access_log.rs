//! Field names of access-log lines, in both proxies' text and JSON formats. Log pipelines
//! parse these lines by field name, so the names (not the values) are what must match.

use std::collections::BTreeSet;

use serde_json::Value;

use super::json_shape::{self, Shape};

/// The union of the field names of the text lines that carry `message` on the `access`
/// target (`key=value` pairs after the message; values may be quoted).
pub fn text_fields(log: &str, message: &str) -> Option<BTreeSet<String>> {
    let mut out: Option<BTreeSet<String>> = None;
    for line in log.lines().filter(|l| l.contains("access")) {
        let Some(at) = line.find(message) else {
            continue;
        };
        out.get_or_insert_with(BTreeSet::new)
            .extend(pairs(&line[at + message.len()..]));
    }
    out
}

/// How a text line is laid out before its fields, e.g.
/// `time<TAB>level<TAB>target<TAB>message<TAB>fields`: the first line that carries
/// `message` on the `access` target, its words named by what they are (the level's case
/// kept: `level` or `LEVEL`), runs of blanks shown as one space or `<TAB>`.
pub fn text_layout(log: &str, message: &str) -> Option<String> {
    let line = log
        .lines()
        .find(|l| l.contains("access") && l.contains(message))?;
    let at = line.find(message)?;
    let mut out = String::new();
    let blank = |s: &str| if s.contains('\t') { "<TAB>" } else { " " };
    let mut first = true;
    for (i, piece) in split_blanks(&line[..at]).into_iter().enumerate() {
        if i % 2 == 1 {
            out.push_str(blank(piece));
            continue;
        }
        let bare = piece.trim_end_matches(':');
        let colon = if piece.ends_with(':') { ":" } else { "" };
        let name = if first {
            "time"
        } else if LEVELS.contains(&bare) {
            "level"
        } else if LEVELS.contains(&bare.to_ascii_lowercase().as_str()) {
            "LEVEL"
        } else if bare == "access" {
            "target"
        } else {
            bare
        };
        first = false;
        out.push_str(name);
        out.push_str(colon);
    }
    out.push_str("message");
    let rest = &line[at + message.len()..];
    if let Some(sep) = split_blanks(rest).get(1) {
        out.push_str(blank(sep));
        out.push_str("fields");
    }
    Some(out)
}

const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error"];

/// Alternating words and runs of blanks, starting with a word (maybe empty).
fn split_blanks(s: &str) -> Vec<&str> {
    let mut out = vec![];
    let mut start = 0;
    let mut in_blank = false;
    for (i, c) in s.char_indices() {
        if c.is_whitespace() != in_blank {
            out.push(&s[start..i]);
            start = i;
            in_blank = !in_blank;
        }
    }
    out.push(&s[start..]);
    out
}

/// Keys of `key=value` tokens; a value is a quoted string (with `\"` escapes) or runs to
/// the next space.
fn pairs(s: &str) -> Vec<String> {
    let mut keys = vec![];
    let mut rest = s;
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            return keys;
        }
        let end = rest.find([' ', '=']).unwrap_or(rest.len());
        let (word, after) = rest.split_at(end);
        let Some(value) = after.strip_prefix('=') else {
            rest = after;
            continue;
        };
        keys.push(word.to_string());
        rest = match value.strip_prefix('"') {
            Some(quoted) => skip_quoted(quoted),
            None => &value[value.find(' ').unwrap_or(value.len())..],
        };
    }
}

/// What follows the closing quote of a string whose opening quote is already consumed.
fn skip_quoted(s: &str) -> &str {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            '\\' if !escaped => escaped = true,
            '"' if !escaped => return &s[i + 1..],
            _ => escaped = false,
        }
    }
    ""
}

/// The union of the shapes of the JSON lines that carry `message` (anywhere in the
/// object: upstream writes it at the top, tracing's JSON under `fields`).
pub fn json_fields(log: &str, message: &str) -> Option<Shape> {
    let mut out: Option<Shape> = None;
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line.trim()) else {
            continue;
        };
        if !has_message(&v, message) {
            continue;
        }
        let all = out.get_or_insert_with(Shape::new);
        for (path, types) in json_shape::shape(&v, &[]) {
            all.entry(path).or_default().extend(types);
        }
    }
    out
}

fn has_message(v: &Value, message: &str) -> bool {
    match v {
        Value::Object(m) => {
            m.get("message").and_then(Value::as_str) == Some(message)
                || m.values().any(|v| v.is_object() && has_message(v, message))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_field_names_with_quoted_values() {
        let log = "2026-12-07T10:00:00Z\tinfo\taccess\tconnection complete src.addr=10.1.0.2:4000 \
                   src.workload=\"client x\" dst.service=\"a \\\"b\\\" c\" bytes_sent=4 duration=\"3ms\"\n\
                   2026-12-07T10:00:00Z\tinfo\txds\tconnection complete ignored=1\n";
        let got = text_fields(log, "connection complete").unwrap();
        // The xds line carries the message too, but not on the access target.
        let want = [
            "bytes_sent",
            "dst.service",
            "duration",
            "src.addr",
            "src.workload",
        ];
        assert_eq!(got, want.iter().map(|k| k.to_string()).collect());
        assert!(text_fields(log, "connection opened").is_none());
    }

    #[test]
    fn text_layouts() {
        let upstream =
            "2026-12-07T14:59:38.139175Z\tinfo\taccess\tconnection complete\tsrc.addr=1 x=2\n";
        let ours = "2026-12-07T14:59:36.444321Z  INFO access: connection complete direction=\"outbound\"\n";
        assert_eq!(
            text_layout(upstream, "connection complete").unwrap(),
            "time<TAB>level<TAB>target<TAB>message<TAB>fields"
        );
        assert_eq!(
            text_layout(ours, "connection complete").unwrap(),
            "time LEVEL target: message fields"
        );
        assert!(text_layout(ours, "connection opened").is_none());
    }

    #[test]
    fn json_fields_wherever_the_message_is() {
        let log = "{\"level\":\"info\",\"scope\":\"access\",\"message\":\"connection opened\",\"src.addr\":\"a\"}\n\
                   {\"timestamp\":\"t\",\"fields\":{\"message\":\"connection opened\",\"dst.addr\":\"b\"},\"target\":\"access\"}\n\
                   not json\n";
        let got = json_fields(log, "connection opened").unwrap();
        let keys: Vec<&str> = got.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "fields",
                "fields.dst.addr",
                "fields.message",
                "level",
                "message",
                "scope",
                "src.addr",
                "target",
                "timestamp"
            ]
        );
    }
}
