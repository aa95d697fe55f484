//! Prometheus metrics under Triton's names, so dashboards and alerts written for Triton work unchanged.
//! Durations are cumulative microsecond counters as in Triton (rate(duration)/rate(count) = mean).
//! A handful of atomics rendered by hand: no registry crate is needed for a fixed set of series.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a request failed, as Triton's `nv_inference_request_failure{reason}` labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureReason {
    /// Refused by the scheduler: queue full or queue timeout.
    Rejected,
    /// The client went away before the request ran.
    Canceled,
    /// The engine failed while executing.
    Backend,
    /// Anything else, bad input included.
    Other,
}

impl FailureReason {
    const ALL: [FailureReason; 4] =
        [FailureReason::Rejected, FailureReason::Canceled, FailureReason::Backend, FailureReason::Other];
    fn label(self) -> &'static str {
        match self {
            FailureReason::Rejected => "REJECTED",
            FailureReason::Canceled => "CANCELED",
            FailureReason::Backend => "BACKEND",
            FailureReason::Other => "OTHER",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Default)]
pub struct Metrics {
    pub request_success: AtomicU64,
    failure: [AtomicU64; 4],
    /// Images inferred (batch items), Triton's `nv_inference_count`.
    pub inference_count: AtomicU64,
    /// Batches executed, Triton's `nv_inference_exec_count`.
    pub exec_count: AtomicU64,
    pub request_duration_us: AtomicU64,
    pub queue_duration_us: AtomicU64,
    pub compute_input_duration_us: AtomicU64,
    pub compute_infer_duration_us: AtomicU64,
    pub compute_output_duration_us: AtomicU64,
    /// Requests admitted and not yet executing (decoding or queued).
    pub pending: AtomicU64,
}

impl Metrics {
    pub fn fail(&self, reason: FailureReason) {
        self.failure[reason.index()].fetch_add(1, Relaxed);
    }

    pub fn failures(&self, reason: FailureReason) -> u64 {
        self.failure[reason.index()].load(Relaxed)
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self, model: &str) -> String {
        let labels = format!("model=\"{}\",version=\"1\"", escape(model));
        let mut s = String::new();
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {v}");
        };
        one(
            "nv_inference_request_success",
            "counter",
            "Number of successful inference requests, all batch sizes",
            self.request_success.load(Relaxed),
        );
        one(
            "nv_inference_count",
            "counter",
            "Number of inferences performed (batch items)",
            self.inference_count.load(Relaxed),
        );
        one(
            "nv_inference_exec_count",
            "counter",
            "Number of model executions performed (batches)",
            self.exec_count.load(Relaxed),
        );
        one(
            "nv_inference_request_duration_us",
            "counter",
            "Cumulative inference request duration in microseconds",
            self.request_duration_us.load(Relaxed),
        );
        one(
            "nv_inference_queue_duration_us",
            "counter",
            "Cumulative inference queuing duration in microseconds",
            self.queue_duration_us.load(Relaxed),
        );
        one(
            "nv_inference_compute_input_duration_us",
            "counter",
            "Cumulative compute input duration in microseconds",
            self.compute_input_duration_us.load(Relaxed),
        );
        one(
            "nv_inference_compute_infer_duration_us",
            "counter",
            "Cumulative compute inference duration in microseconds",
            self.compute_infer_duration_us.load(Relaxed),
        );
        one(
            "nv_inference_compute_output_duration_us",
            "counter",
            "Cumulative inference compute output duration in microseconds",
            self.compute_output_duration_us.load(Relaxed),
        );
        one(
            "nv_inference_pending_request_count",
            "gauge",
            "Instantaneous number of pending requests awaiting execution per-model",
            self.pending.load(Relaxed),
        );
        let name = "nv_inference_request_failure";
        let _ =
            writeln!(s, "# HELP {name} Number of failed inference requests, all batch sizes\n# TYPE {name} counter");
        for r in FailureReason::ALL {
            let _ = writeln!(s, "{name}{{{labels},reason=\"{}\"}} {}", r.label(), self.failures(r));
        }
        s
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
