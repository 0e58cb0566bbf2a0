//! The differences from Istio's ztunnel that stay, each with its reason. README.md's
//! "Side by side with Istio's ztunnel" gives the same reasons (a test checks it), so no
//! difference is excepted here that the README does not explain.

use super::report::Side;

/// One difference that is meant to be there. `area` and `item` are glob patterns (`*`
/// matches anything) over a finding's area and item.
#[derive(Debug)]
pub struct Exception {
    pub area: &'static str,
    pub side: Side,
    pub item: &'static str,
    pub reason: &'static str,
}

const fn ex(area: &'static str, side: Side, item: &'static str, reason: &'static str) -> Exception {
    Exception {
        area,
        side,
        item,
        reason,
    }
}

pub const TABLE: &[Exception] = &[];

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reason is in the README's subsection, word for word.
    #[test]
    fn the_readme_explains_every_exception() {
        let readme = include_str!("../../../README.md");
        let start = readme
            .find("## Side by side with Istio's ztunnel")
            .or_else(|| readme.find("### Side by side with Istio's ztunnel"))
            .expect("README has a \"Side by side with Istio's ztunnel\" section");
        let section = &readme[start..];
        let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
        let flat = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        let section = flat(section);
        for e in TABLE {
            assert!(
                section.contains(&flat(e.reason)),
                "README's side-by-side section does not give this reason ({:?} {} in {}): {}",
                e.side,
                e.item,
                e.area,
                e.reason
            );
        }
    }
}
