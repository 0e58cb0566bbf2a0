//! Helpers for reading YAML so that a bad value is reported at its own line and column.
//!
//! serde_yaml pins an error to the node being deserialized when the error is raised. A
//! check done after `String::deserialize` returns (e.g. `deserialize_with`) is pinned to
//! the enclosing map, not the offending scalar; a check inside the scalar's visitor is
//! pinned to the scalar itself. So every validated scalar goes through [`parse_str`].

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, Visitor};

/// Deserialize a string scalar and convert it with `parse`, raising `parse`'s error
/// message at the scalar's position. Numbers are accepted as their text (YAML reads an
/// unquoted `10` as an integer even where a string is meant).
pub(crate) fn parse_str<'de, D, T, F>(
    d: D,
    expecting: &'static str,
    parse: F,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    F: FnOnce(&str) -> Result<T, String>,
{
    struct StrVisitor<T, F> {
        expecting: &'static str,
        parse: F,
        out: PhantomData<T>,
    }
    impl<'de, T, F: FnOnce(&str) -> Result<T, String>> Visitor<'de> for StrVisitor<T, F> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            (self.parse)(v).map_err(E::custom)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
            self.visit_str(&v.to_string())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
            self.visit_str(&v.to_string())
        }
    }
    d.deserialize_str(StrVisitor {
        expecting,
        parse,
        out: PhantomData,
    })
}

/// Implements `Deserialize` for a type through [`parse_str`] with the given parser.
macro_rules! deserialize_via_str {
    ($ty:ty, $expecting:literal, $parse:expr) => {
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                $crate::xds::yaml::parse_str(d, $expecting, $parse)
            }
        }
    };
}
pub(crate) use deserialize_via_str;

/// Best-effort position of a resource (and optionally a field in it) in block-style YAML,
/// for errors found only after parsing (duplicates across resources), when serde's
/// positions are gone. `section` is the top-level key (`None`: the file is a bare list).
/// Returns 1-based (line, column).
pub(crate) fn locate(
    src: &str,
    section: Option<&str>,
    index: usize,
    needle: Option<&str>,
) -> Option<(usize, usize)> {
    let lines: Vec<&str> = src.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut i = match section {
        None => 0,
        Some(key) => {
            let header = format!("{key}:");
            lines.iter().position(|l| l.starts_with(&header))? + 1
        }
    };
    // Items of the list are the `- ` lines at the indentation of the first one; the list
    // ends at the first non-blank, non-comment line indented less (or equal, if not `-`).
    let mut item_indent = None;
    let mut seen = 0usize;
    let mut start = None;
    while i < lines.len() {
        let line = lines[i];
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') {
            i += 1;
            continue;
        }
        let ind = indent(line);
        let is_item = t.starts_with("- ") || t == "-";
        match item_indent {
            None if is_item => item_indent = Some(ind),
            None => return None, // flow style or empty: no block list to walk
            Some(ii) if ind < ii || (ind == ii && !is_item) => break,
            _ => {}
        }
        if is_item && Some(ind) == item_indent {
            if start.is_some() {
                break; // reached the next item
            }
            if seen == index {
                start = Some(i);
            }
            seen += 1;
        }
        if let Some(s) = start {
            match needle {
                None => return Some((s + 1, ind + 1)),
                Some(n) => {
                    if let Some(col) = line.find(n) {
                        return Some((i + 1, col + 1));
                    }
                }
            }
        }
        i += 1;
    }
    start.map(|s| (s + 1, indent(lines[s]) + 1))
}

#[cfg(test)]
mod tests {
    use super::locate;

    const SRC: &str = "\
workloads:
# a comment
- name: a
  workloadIps: [10.0.0.1]
- name: b
  workloadIps:
  - 10.0.0.2
services:
  - name: s
";

    #[test]
    fn finds_items_and_fields() {
        assert_eq!(locate(SRC, Some("workloads"), 0, None), Some((3, 1)));
        assert_eq!(locate(SRC, Some("workloads"), 1, None), Some((5, 1)));
        assert_eq!(
            locate(SRC, Some("workloads"), 1, Some("10.0.0.2")),
            Some((7, 5))
        );
        // Needle absent in the item: the item's own line.
        assert_eq!(
            locate(SRC, Some("workloads"), 0, Some("nope")),
            Some((3, 1))
        );
        assert_eq!(locate(SRC, Some("services"), 0, None), Some((9, 3)));
        assert_eq!(locate(SRC, Some("workloads"), 2, None), None);
        assert_eq!(locate("- a\n- b\n", None, 1, None), Some((2, 1)));
        assert_eq!(locate("workloads: []\n", Some("workloads"), 0, None), None);
    }
}
