//! Istio ztunnel's `tokio_*` family: the data path's runtimes, read at scrape time.
//!
//! Upstream serves connections on one multi-threaded runtime and reports its workers.
//! Here each data-path thread runs a single-threaded runtime of its own
//! (`proxy::workers`), so each of those is one "worker": `tokio_num_workers` is the number
//! of data-path threads, the queue depth and task count are their sums, and the
//! per-worker counters carry the thread's index as `worker` (`ztunnel-dp-<worker>`). The
//! main runtime (control plane, admin) is not included, as upstream leaves out its own.

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use tokio::runtime::RuntimeMetrics;

/// The data-path runtimes, in the order their threads registered them.
#[derive(Clone, Debug, Default)]
pub struct Runtimes(Arc<Mutex<Vec<RuntimeMetrics>>>);

impl Runtimes {
    /// Called by each data-path thread on its own runtime.
    pub fn add(&self, m: RuntimeMetrics) {
        self.0.lock().unwrap().push(m);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    worker: usize,
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

/// One counter per worker (each runtime has exactly one).
fn per_worker<T>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    runtimes: &[RuntimeMetrics],
    value: impl Fn(&RuntimeMetrics) -> T,
) -> std::fmt::Result
where
    ConstCounter<T>: EncodeMetric,
{
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (worker, rt) in runtimes.iter().enumerate() {
        let c = ConstCounter::new(value(rt));
        c.encode(family.encode_family(&WorkerLabels { worker })?)?;
    }
    Ok(())
}

impl Collector for Runtimes {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let rts = self.0.lock().unwrap().clone();
        let sum = |f: fn(&RuntimeMetrics) -> usize| rts.iter().map(f).sum::<usize>() as i64;
        gauge(
            &mut enc,
            "num_workers",
            "Worker threads of the data path",
            sum(RuntimeMetrics::num_workers),
        )?;
        gauge(
            &mut enc,
            "global_queue_depth",
            "Tasks waiting in the data-path runtimes' shared queues",
            sum(RuntimeMetrics::global_queue_depth),
        )?;
        gauge(
            &mut enc,
            "num_alive_tasks",
            "Tasks alive on the data-path runtimes",
            sum(RuntimeMetrics::num_alive_tasks),
        )?;
        per_worker(
            &mut enc,
            "worker_total_busy_duration_seconds",
            "Time each data-path thread spent running tasks, in seconds",
            &rts,
            |rt| rt.worker_total_busy_duration(0).as_secs_f64(),
        )?;
        per_worker(
            &mut enc,
            "worker_park_count",
            "Times each data-path thread parked (went idle)",
            &rts,
            |rt| rt.worker_park_count(0),
        )?;
        per_worker(
            &mut enc,
            "worker_park_unpark_count",
            "Times each data-path thread parked or unparked",
            &rts,
            |rt| rt.worker_park_unpark_count(0),
        )
    }
}
