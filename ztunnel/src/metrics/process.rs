//! The process's own figures in Prometheus' standard names (`process_*`), read from
//! `/proc/self` at each scrape: open and allowed file descriptors (as Istio's ztunnel
//! reports them), CPU time, resident and virtual memory, start time.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Registered once on the root registry (no prefix).
#[derive(Debug, Default)]
pub struct ProcessMetrics;

/// One reading of `/proc/self`; a figure that cannot be read is left out of the scrape.
#[derive(Debug, Default, PartialEq)]
pub struct Reading {
    pub open_fds: Option<i64>,
    pub max_fds: Option<i64>,
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<i64>,
    pub virtual_bytes: Option<i64>,
    pub start_time_seconds: Option<f64>,
}

impl Reading {
    pub fn now() -> Reading {
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let fields = stat.as_deref().and_then(stat_fields);
        // SAFETY: sysconf has no preconditions.
        let (tick, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK) as f64,
                libc::sysconf(libc::_SC_PAGESIZE) as i64,
            )
        };
        let field = |i: usize| fields.as_ref()?.get(i)?.parse::<f64>().ok();
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())
        });
        Reading {
            // The directory's own descriptor, open while it is read, is not counted.
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as i64 - 1),
            max_fds: nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .ok()
                .map(|(soft, _)| soft as i64),
            cpu_seconds: field(11)
                .zip(field(12))
                .filter(|_| tick > 0.0)
                .map(|(user, system)| (user + system) / tick),
            resident_bytes: field(21).map(|pages| pages as i64 * page),
            virtual_bytes: field(20).map(|b| b as i64),
            start_time_seconds: boot.zip(field(19)).map(|(b, t)| b + t / tick),
        }
    }
}

/// The fields of `/proc/self/stat` after the command name (which may hold spaces and
/// parentheses: everything up to the last `)` is skipped). Index 0 is the state (field 3
/// of proc(5)), so proc(5)'s field n is index n - 3.
fn stat_fields(stat: &str) -> Option<Vec<String>> {
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: Option<i64>) -> std::fmt::Result {
    let Some(v) = v else { return Ok(()) };
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

fn gauge_f64(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: Option<f64>,
) -> std::fmt::Result {
    let Some(v) = v else { return Ok(()) };
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for ProcessMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let r = Reading::now();
        gauge(
            &mut enc,
            "process_open_fds",
            "Number of open file descriptors",
            r.open_fds,
        )?;
        gauge(
            &mut enc,
            "process_max_fds",
            "Maximum number of file descriptors",
            r.max_fds,
        )?;
        if let Some(cpu) = r.cpu_seconds {
            // The counter's `_total` suffix is added by the encoder.
            let c = ConstCounter::new(cpu);
            c.encode(enc.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                None,
                c.metric_type(),
            )?)?;
        }
        gauge(
            &mut enc,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            r.resident_bytes,
        )?;
        gauge(
            &mut enc,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            r.virtual_bytes,
        )?;
        gauge_f64(
            &mut enc,
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds",
            r.start_time_seconds,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_name_with_spaces_and_parentheses_is_skipped() {
        let f = stat_fields("42 (a (b) c) S 1 2 3").unwrap();
        assert_eq!(f, ["S", "1", "2", "3"]);
    }

    #[test]
    fn this_process_reads_back() {
        let r = Reading::now();
        assert!(r.open_fds.unwrap() >= 3, "{r:?}");
        assert!(r.max_fds.unwrap() >= r.open_fds.unwrap());
        assert!(r.cpu_seconds.unwrap() >= 0.0);
        assert!(r.resident_bytes.unwrap() > 1 << 20, "{r:?}");
        assert!(r.virtual_bytes.unwrap() >= r.resident_bytes.unwrap());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = r.start_time_seconds.unwrap();
        assert!(
            started <= now + 1.0 && started > now - 86_400.0 * 365.0,
            "{r:?}"
        );
    }
}
