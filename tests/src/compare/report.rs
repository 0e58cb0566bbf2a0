//! Findings of a side-by-side run, judged against the exceptions table, as a report.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::exceptions::Exception;
use super::json_shape::{glob, ShapeDiff};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Side {
    /// Upstream has it, ours does not.
    Missing,
    /// Ours has it, upstream does not.
    Extra,
    /// Both have it, with different JSON types.
    Type,
}

impl Side {
    fn title(self) -> &'static str {
        match self {
            Side::Missing => "missing in ours",
            Side::Extra => "extra in ours",
            Side::Type => "type differences (upstream → ours)",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finding {
    /// What was compared: `config_dump`, `access log: connection opened (text)`, `metrics`.
    pub area: String,
    pub side: Side,
    /// A key path, a field name, a metric name or `metric{label}`.
    pub item: String,
    /// For type differences: `string → number`.
    pub detail: String,
}

/// Findings of one comparison area.
pub fn from_shape_diff(area: &str, d: &ShapeDiff) -> Vec<Finding> {
    let f = |side, item: &String, detail: String| Finding {
        area: area.to_string(),
        side,
        item: item.clone(),
        detail,
    };
    let mut out: Vec<Finding> = d
        .missing
        .iter()
        .map(|p| f(Side::Missing, p, String::new()))
        .collect();
    out.extend(d.extra.iter().map(|p| f(Side::Extra, p, String::new())));
    out.extend(
        d.types
            .iter()
            .map(|(p, t, o)| f(Side::Type, p, format!("{t} → {o}"))),
    );
    out
}

/// Findings between two sets of names (log fields).
pub fn from_sets(area: &str, theirs: &BTreeSet<String>, ours: &BTreeSet<String>) -> Vec<Finding> {
    let f = |side, item: &String| Finding {
        area: area.to_string(),
        side,
        item: item.clone(),
        detail: String::new(),
    };
    let mut out: Vec<Finding> = theirs
        .difference(ours)
        .map(|i| f(Side::Missing, i))
        .collect();
    out.extend(ours.difference(theirs).map(|i| f(Side::Extra, i)));
    out
}

/// Findings between two metric expositions (name → label names): whole metrics, then the
/// labels of the metrics both have, as `name{label}`.
pub fn from_metrics(
    theirs: &BTreeMap<String, BTreeSet<String>>,
    ours: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<Finding> {
    let names = |m: &BTreeMap<String, BTreeSet<String>>| m.keys().cloned().collect::<BTreeSet<_>>();
    let mut out = from_sets("metrics", &names(theirs), &names(ours));
    for (name, t) in theirs {
        let Some(o) = ours.get(name) else { continue };
        let label = |l: &String| format!("{name}{{{l}}}");
        let t: BTreeSet<String> = t.iter().map(label).collect();
        let o: BTreeSet<String> = o.iter().map(label).collect();
        out.extend(from_sets("metrics", &t, &o));
    }
    out
}

/// The first exception that explains `f`, if any.
pub fn explain<'a>(f: &Finding, table: &'a [Exception]) -> Option<&'a Exception> {
    table
        .iter()
        .find(|e| e.side == f.side && glob(e.area, &f.area) && glob(e.item, &f.item))
}

/// The report's text and how many findings no exception explains.
pub fn render(findings: &[Finding], table: &[Exception]) -> (String, usize) {
    let mut out = String::new();
    let mut unexplained = 0;
    let mut used = vec![false; table.len()];
    let mut by_area: BTreeMap<&str, Vec<&Finding>> = BTreeMap::new();
    for f in findings {
        by_area.entry(&f.area).or_default().push(f);
    }
    for (area, fs) in &by_area {
        let _ = writeln!(out, "== {area}");
        for side in [Side::Missing, Side::Extra, Side::Type] {
            let of_side: Vec<&&Finding> = fs.iter().filter(|f| f.side == side).collect();
            if of_side.is_empty() {
                continue;
            }
            let _ = writeln!(out, "  {}:", side.title());
            for f in of_side {
                let item = match f.detail.as_str() {
                    "" => f.item.clone(),
                    d => format!("{} ({d})", f.item),
                };
                match explain(f, table) {
                    Some(e) => {
                        let i = table.iter().position(|x| std::ptr::eq(x, e)).unwrap_or(0);
                        used[i] = true;
                        let _ = writeln!(out, "    {item}  [excepted: E{}]", i + 1);
                    }
                    None => {
                        unexplained += 1;
                        let _ = writeln!(out, "    {item}  [UNEXPLAINED]");
                    }
                }
            }
        }
    }
    if used.iter().any(|u| *u) {
        let _ = writeln!(
            out,
            "== exceptions applied (tests/src/compare/exceptions.rs, README)"
        );
        for (i, e) in table.iter().enumerate().filter(|(i, _)| used[*i]) {
            // Several entries may share one reason: give it once, under the first.
            let first = table.iter().position(|x| x.reason == e.reason) == Some(i);
            let said = table[..i]
                .iter()
                .enumerate()
                .any(|(j, x)| used[j] && x.reason == e.reason);
            let reason = if first || !said {
                e.reason
            } else {
                "(as above)"
            };
            let _ = writeln!(out, "  E{} {} {}: {reason}", i + 1, e.area, e.item);
        }
    }
    let stale: Vec<&Exception> = table
        .iter()
        .zip(&used)
        .filter(|(_, u)| !**u)
        .map(|(e, _)| e)
        .collect();
    if !stale.is_empty() {
        let _ = writeln!(out, "== exceptions that matched nothing this run");
        for e in stale {
            let _ = writeln!(out, "  {:?} {} in {}", e.side, e.item, e.area);
        }
    }
    let _ = writeln!(
        out,
        "== {} differences: {} excepted, {unexplained} unexplained",
        findings.len(),
        findings.len() - unexplained
    );
    (out, unexplained)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(area: &str, side: Side, item: &str) -> Finding {
        Finding {
            area: area.into(),
            side,
            item: item.into(),
            detail: String::new(),
        }
    }

    #[test]
    fn exceptions_explain_by_area_side_and_item() {
        let table = [
            Exception {
                area: "config_dump",
                side: Side::Extra,
                item: "enrolled",
                reason: "ours",
            },
            Exception {
                area: "access log: *",
                side: Side::Extra,
                item: "outcome",
                reason: "ours too",
            },
            Exception {
                area: "metrics",
                side: Side::Missing,
                item: "never_seen",
                reason: "stale",
            },
        ];
        let findings = [
            finding("config_dump", Side::Extra, "enrolled"),
            finding("config_dump", Side::Missing, "enrolled"),
            finding(
                "access log: connection complete (json)",
                Side::Extra,
                "outcome",
            ),
        ];
        assert!(explain(&findings[0], &table).is_some());
        assert!(explain(&findings[1], &table).is_none(), "the side counts");
        let (text, unexplained) = render(&findings, &table);
        assert_eq!(unexplained, 1);
        assert!(text.contains("outcome  [excepted: E2]"), "{text}");
        assert!(
            text.contains("E2 access log: * outcome: ours too"),
            "{text}"
        );
        assert!(text.contains("Missing never_seen in metrics"), "{text}");
        assert!(
            text.contains("3 differences: 2 excepted, 1 unexplained"),
            "{text}"
        );
    }

    #[test]
    fn metric_labels_are_compared_for_shared_names() {
        let m = |v: &[(&str, &[&str])]| -> BTreeMap<String, BTreeSet<String>> {
            v.iter()
                .map(|(n, l)| (n.to_string(), l.iter().map(|s| s.to_string()).collect()))
                .collect()
        };
        let theirs = m(&[("a_total", &["reporter", "x"]), ("b", &[])]);
        let ours = m(&[("a_total", &["reporter", "y"]), ("c", &[])]);
        let items: Vec<(Side, String)> = from_metrics(&theirs, &ours)
            .into_iter()
            .map(|f| (f.side, f.item))
            .collect();
        assert_eq!(
            items,
            [
                (Side::Missing, "b".to_string()),
                (Side::Extra, "c".to_string()),
                (Side::Missing, "a_total{x}".to_string()),
                (Side::Extra, "a_total{y}".to_string()),
            ]
        );
    }
}
