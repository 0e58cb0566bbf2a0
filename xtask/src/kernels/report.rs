//! One suite's result in one guest, read from what suite.sh left: NAME.status ("EXIT-CODE
//! SECONDS") and NAME.log (the test harness's output).

use std::path::Path;

use super::fetch::Kernel;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    /// The harness finished and reported failed tests.
    Failed,
    /// `timeout` in the guest stopped the suite (exit 124, or 137 when it had to kill).
    TimedOut,
    /// Exited without the harness's summary: a crash, an abort, a missing executable.
    Crashed(i32),
    /// No status at all: the guest died or was stopped first.
    NoResult(String),
}

impl Outcome {
    /// The word of a result line: `passed`, `FAILED`, `TIMED OUT`, ….
    pub fn verdict(&self) -> String {
        match self {
            Outcome::Passed => "passed".to_string(),
            Outcome::Failed => "FAILED".to_string(),
            Outcome::TimedOut => "TIMED OUT".to_string(),
            Outcome::Crashed(rc) => format!("CRASHED (exit {rc})"),
            Outcome::NoResult(why) => format!("NO RESULT ({why})"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct SuiteResult {
    pub kernel: String,
    pub version: String,
    pub mode: &'static str,
    pub suite: String,
    pub outcome: Outcome,
    pub counts: Counts,
    pub secs: u64,
    /// (test, first line of its panic message)
    pub failures: Vec<(String, String)>,
    /// The test that was running when the suite stopped, if it did not finish.
    pub running: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub passed: u32,
    pub failed: u32,
    pub ignored: u32,
}

impl SuiteResult {
    /// The result once suite.sh has written NAME.status; None before.
    pub fn read(k: &Kernel, mode: &'static str, suite: &str, dir: &Path) -> Option<SuiteResult> {
        let status = std::fs::read_to_string(dir.join(format!("{suite}.status"))).ok()?;
        let mut words = status.split_whitespace().map(|w| w.parse::<i64>().ok());
        let (Some(Some(rc)), Some(Some(secs))) = (words.next(), words.next()) else {
            // written but not yet complete: read again on the next tick
            return None;
        };
        let log = std::fs::read_to_string(dir.join(format!("{suite}.log"))).unwrap_or_default();
        let parsed = parse_log(&log);
        Some(SuiteResult {
            outcome: outcome(rc as i32, parsed.summary),
            counts: parsed.summary.unwrap_or(parsed.counted),
            secs: secs.max(0) as u64,
            failures: parsed.failures,
            running: parsed.running,
            ..SuiteResult::missing(k, mode, suite, Outcome::Passed)
        })
    }

    pub fn missing(k: &Kernel, mode: &'static str, suite: &str, outcome: Outcome) -> SuiteResult {
        SuiteResult {
            kernel: k.series.name.to_string(),
            version: k.version.clone(),
            mode,
            suite: suite.to_string(),
            outcome,
            counts: Counts::default(),
            secs: 0,
            failures: Vec::new(),
            running: None,
        }
    }

    pub fn passed(&self) -> bool {
        self.outcome == Outcome::Passed
    }

    /// "6.1  6.1.158-1  legacy  capture  passed  6 passed, 0 failed, 0 ignored  66 s", then
    /// one indented line per failed test.
    pub fn line(&self) -> String {
        let verdict = self.outcome.verdict();
        let c = self.counts;
        let mut s = format!(
            "{:<5} {:<16} {:<6} {:<11} {:<10} {} passed, {} failed, {} ignored  {} s",
            self.kernel,
            self.version,
            self.mode,
            self.suite,
            verdict,
            c.passed,
            c.failed,
            c.ignored,
            self.secs
        );
        for (test, msg) in &self.failures {
            s.push_str(&format!("\n      failed {test}: {msg}"));
        }
        if let Some(t) = &self.running {
            if !self.passed() {
                s.push_str(&format!("\n      was running {t}"));
            }
        }
        s
    }
}

/// The verdict from the exit code and the harness's summary line, if it printed one.
pub fn outcome(rc: i32, summary: Option<Counts>) -> Outcome {
    match (rc, summary) {
        (124 | 137, _) => Outcome::TimedOut,
        (0, Some(c)) if c.failed == 0 => Outcome::Passed,
        (_, Some(c)) if c.failed > 0 => Outcome::Failed,
        (rc, _) => Outcome::Crashed(rc),
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// From "test result: ok. 6 passed; 0 failed; 0 ignored; ...", once the harness is done.
    pub summary: Option<Counts>,
    /// From the per-test lines, for a run that did not get as far as the summary.
    pub counted: Counts,
    pub failures: Vec<(String, String)>,
    pub running: Option<String>,
}

pub fn parse_log(log: &str) -> Parsed {
    let mut p = Parsed::default();
    let lines: Vec<&str> = log.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if let Some(rest) = line.strip_prefix("test result: ") {
            p.summary = Some(summary_counts(rest));
        } else if let Some(rest) = line.strip_prefix("test ") {
            // "test name ... ok"; a test's children may write between "..." and the verdict
            let Some((name, verdict)) = rest.split_once(" ... ") else {
                continue;
            };
            match verdict.trim() {
                "ok" => p.counted.passed += 1,
                "FAILED" => p.counted.failed += 1,
                v if v.starts_with("ignored") => p.counted.ignored += 1,
                _ => {}
            }
            p.running = Some(name.to_string());
        } else if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|l| l.strip_suffix(" stdout ----"))
        {
            let msg = lines[i + 1..]
                .iter()
                .take_while(|l| !l.starts_with("---- "))
                .skip_while(|l| !l.contains("panicked at"))
                .nth(1)
                .map(|m| m.chars().take(300).collect())
                .unwrap_or_else(|| "(no panic message; see the suite's log)".into());
            p.failures.push((name.to_string(), msg));
        }
    }
    // the last test started is the one that was running only if it has no verdict
    if let Some(name) = &p.running {
        let finished = lines.iter().rev().any(|l| {
            l.strip_prefix("test ")
                .and_then(|r| r.split_once(" ... "))
                .is_some_and(|(n, v)| n == name && !v.trim().is_empty())
        });
        if finished || p.summary.is_some() {
            p.running = None;
        }
    }
    p
}

fn summary_counts(rest: &str) -> Counts {
    let mut c = Counts::default();
    for part in rest.split(';') {
        let mut w = part.split_whitespace().rev();
        let (Some(what), Some(n)) = (w.next(), w.next()) else {
            continue;
        };
        let Ok(n) = n.parse() else { continue };
        match what {
            "passed" => c.passed = n,
            "failed" => c.failed = n,
            "ignored" => c.ignored = n,
            _ => {}
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSED: &str = "\nrunning 2 tests\ntest a ... ok\ntest b ... ignored, needs sockmap\n\n\
        test result: ok. 1 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 9.1s\n";
    const FAILED: &str = "\nrunning 2 tests\ntest a ... ok\ntest b ... FAILED\n\nfailures:\n\n\
        ---- b stdout ----\nsetting up\n\nthread 'b' panicked at tests/tests/capture.rs:10:5:\n\
        ztunnel on node-a exited; log:\nerror: verifier\n\n\nfailures:\n    b\n\n\
        test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 3.0s\n";
    const STOPPED: &str = "\nrunning 3 tests\ntest a ... ok\ntest b ... ";

    #[test]
    fn reads_the_harness_output() {
        let p = parse_log(PASSED);
        let c = |passed, failed, ignored| Counts {
            passed,
            failed,
            ignored,
        };
        assert_eq!(p.summary, Some(c(1, 0, 1)));
        assert_eq!(p.counted, c(1, 0, 1));
        assert_eq!(p.running, None);

        let p = parse_log(FAILED);
        assert_eq!(p.summary, Some(c(1, 1, 0)));
        assert_eq!(
            p.failures,
            [(
                "b".to_string(),
                "ztunnel on node-a exited; log:".to_string()
            )]
        );

        let p = parse_log(STOPPED);
        assert_eq!(p.summary, None);
        assert_eq!(p.counted, c(1, 0, 0));
        assert_eq!(p.running.as_deref(), Some("b"));
    }

    #[test]
    fn decides_the_verdict() {
        let ok = Some(Counts {
            passed: 3,
            ..Counts::default()
        });
        let bad = Some(Counts {
            passed: 2,
            failed: 1,
            ignored: 0,
        });
        let cases = [
            (0, ok, Outcome::Passed),
            (101, bad, Outcome::Failed),
            (124, None, Outcome::TimedOut),
            (137, ok, Outcome::TimedOut),
            (101, None, Outcome::Crashed(101)),
            (0, None, Outcome::Crashed(0)),
            (101, ok, Outcome::Crashed(101)),
        ];
        for (rc, summary, want) in cases {
            assert_eq!(outcome(rc, summary), want, "rc {rc} {summary:?}");
        }
    }
}
