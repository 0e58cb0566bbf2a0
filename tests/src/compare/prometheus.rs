//! Metric names and label names from a Prometheus / OpenMetrics text exposition:
//! dashboards and alerts select by these, so they must match; values and label values
//! are data.

use std::collections::{BTreeMap, BTreeSet};

/// Sample name → the union of the label names its samples carry.
pub fn families(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = out.entry(line[..name_end].to_string()).or_default();
        if line[name_end..].starts_with('{') {
            labels.extend(label_names(&line[name_end + 1..]));
        }
    }
    out
}

/// Names of `name="value",…}`; values may hold escaped quotes, commas and braces.
fn label_names(mut s: &str) -> Vec<String> {
    let mut names = vec![];
    loop {
        s = s.trim_start_matches([',', ' ']);
        if s.is_empty() || s.starts_with('}') {
            return names;
        }
        let Some((name, rest)) = s.split_once("=\"") else {
            return names;
        };
        names.push(name.trim().to_string());
        let mut escaped = false;
        let mut end = rest.len();
        for (i, c) in rest.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = i + 1;
                    break;
                }
                _ => escaped = false,
            }
        }
        s = &rest[end..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_label_names() {
        let text = "# HELP istio_build Istio component build info.\n\
                    # TYPE istio_build gauge\n\
                    istio_build{component=\"ztunnel\",tag=\"1.2\"} 1\n\
                    istio_tcp_sent_bytes_total{reporter=\"source\",x=\"a\\\",}b\"} 5\n\
                    istio_tcp_sent_bytes_total{reporter=\"destination\",y=\"c\"} 7\n\
                    process_open_fds 12\n\
                    # EOF\n";
        let f = families(text);
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(f["istio_build"], set(&["component", "tag"]));
        assert_eq!(
            f["istio_tcp_sent_bytes_total"],
            set(&["reporter", "x", "y"])
        );
        assert_eq!(f["process_open_fds"], set(&[]));
        assert_eq!(f.len(), 3);
    }
}
