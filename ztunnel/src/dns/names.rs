//! Which mesh hostnames a DNS question may stand for.
//!
//! A pod's resolver appends the search domains Kubernetes writes in its `resolv.conf`
//! (`<ns>.svc.<domain>`, `svc.<domain>`, `<domain>`) to short names, so `echo` arrives as
//! `echo.<ns>.svc.cluster.local.`, but `echo.other` first arrives as
//! `echo.other.<ns>.svc.cluster.local.` and `api.example.com` as
//! `api.example.com.<ns>.svc.cluster.local.`. Answering those at once, as Istio's proxy
//! does, saves the pod a round trip per search domain; the name as asked is tried first.

/// The hostnames to look up for `qname` (lowercase, without the final dot) from a client in
/// namespace `ns`, most specific first: the name itself, then, when it ends in one of the
/// client's search domains, what the pod typed, as a Kubernetes short form and as a
/// hostname of its own.
pub fn candidates(qname: &str, ns: Option<&str>, cluster_domain: &str) -> Vec<String> {
    let mut out = vec![qname.to_string()];
    let Some(ns) = ns else { return out };
    let searches = [
        format!("{ns}.svc.{cluster_domain}"),
        format!("svc.{cluster_domain}"),
        cluster_domain.to_string(),
    ];
    for search in &searches {
        let Some(typed) = qname
            .strip_suffix(search.as_str())
            .and_then(|t| t.strip_suffix('.'))
            .filter(|t| !t.is_empty())
        else {
            continue;
        };
        let labels = typed.split('.').count();
        let short = match labels {
            1 => Some(format!("{typed}.{ns}.svc.{cluster_domain}")),
            2 => Some(format!("{typed}.svc.{cluster_domain}")),
            3 if typed.ends_with(".svc") => Some(format!("{typed}.{cluster_domain}")),
            _ => None,
        };
        for name in short.into_iter().chain([typed.to_string()]) {
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    out
}

/// The wildcard hostnames (`*.example.com`) that would cover `name`, nearest first.
pub fn wildcards(name: &str) -> impl Iterator<Item = String> + '_ {
    name.match_indices('.')
        .map(|(i, _)| &name[i + 1..])
        // A wildcard over a single label (`*.com`) is not a service's name.
        .filter(|rest| rest.contains('.'))
        .map(|rest| format!("*.{rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_domains_are_undone() {
        let cd = "cluster.local";
        let cases: &[(&str, &[&str])] = &[
            (
                "echo.default.svc.cluster.local",
                &[
                    "echo.default.svc.cluster.local",
                    // typed "echo" + "default.svc.cluster.local"
                    "echo",
                    // typed "echo.default" + "svc.cluster.local"
                    "echo.default",
                    // typed "echo.default.svc" + "cluster.local"
                    "echo.default.svc",
                ],
            ),
            (
                "echo.other.default.svc.cluster.local",
                &[
                    "echo.other.default.svc.cluster.local",
                    "echo.other.svc.cluster.local",
                    "echo.other",
                    "echo.other.default",
                    "echo.other.default.svc",
                ],
            ),
            (
                "api.example.com.default.svc.cluster.local",
                &[
                    "api.example.com.default.svc.cluster.local",
                    "api.example.com",
                    "api.example.com.default",
                    "api.example.com.default.svc",
                ],
            ),
            ("api.example.com", &["api.example.com"]),
        ];
        for (q, want) in cases {
            assert_eq!(candidates(q, Some("default"), cd), *want, "{q}");
        }
        assert_eq!(candidates("x.y", None, cd), ["x.y"]);
    }

    #[test]
    fn wildcards_walk_up() {
        let got: Vec<_> = wildcards("a.b.example.com").collect();
        assert_eq!(got, ["*.b.example.com", "*.example.com"]);
        assert_eq!(wildcards("example.com").count(), 0);
    }
}
