//! The daemon's Prometheus metrics: runs by environment, kind and result; plan, apply and
//! drift check durations; drift per environment; the queue; fetch errors and the time since
//! the last good fetch. The daemon counts, `/metrics` encodes.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::engine::state::{DriftStatus, RunKind, RunResult};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    pub env: String,
    pub kind: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EnvLabels {
    pub env: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriftLabels {
    pub env: String,
    pub status: String,
}

/// The daemon's Prometheus metrics.
pub struct Metrics {
    /// 1 for each environment's current drift status, 0 for the others.
    pub drift_status: Family<DriftLabels, Gauge>,
    /// Resources the last drift check found drifted, per environment.
    pub drifted_resources: Family<EnvLabels, Gauge>,
    pub drift_check_seconds: Histogram,
    pub runs: Family<RunLabels, Counter>,
    pub plan_seconds: Histogram,
    pub apply_seconds: Histogram,
    pub fetch_errors: Counter,
    /// Commits waiting for a worker.
    pub queue_depth: Gauge,
    /// Seconds since the last successful fetch, set when scraped.
    pub since_fetch: Gauge<f64, AtomicU64>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let runs = Family::<RunLabels, Counter>::default();
        let drift_status = Family::<DriftLabels, Gauge>::default();
        let drifted_resources = Family::<EnvLabels, Gauge>::default();
        let drift_check_seconds = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        let plan_seconds = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        let apply_seconds = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        let fetch_errors = Counter::default();
        let since_fetch = Gauge::<f64, AtomicU64>::default();
        let queue_depth = Gauge::default();
        let mut registry = Registry::with_prefix("karrots");
        registry.register("runs", "Runs by environment, kind and result", runs.clone());
        registry.register(
            "queue_depth",
            "Commits waiting for a worker",
            queue_depth.clone(),
        );
        registry.register(
            "plan_duration_seconds",
            "Duration of terraform plans",
            plan_seconds.clone(),
        );
        registry.register(
            "apply_duration_seconds",
            "Duration of terraform applies",
            apply_seconds.clone(),
        );
        registry.register(
            "drift_status",
            "Drift status per environment: 1 for the current one (in_sync, drifted, error)",
            drift_status.clone(),
        );
        registry.register(
            "drifted_resources",
            "Resources found drifted by the last drift check",
            drifted_resources.clone(),
        );
        registry.register(
            "drift_check_duration_seconds",
            "Duration of drift checks, from staging to the plan's summary",
            drift_check_seconds.clone(),
        );
        registry.register(
            "fetch_errors",
            "Failed fetches of the config repository",
            fetch_errors.clone(),
        );
        registry.register(
            "seconds_since_last_fetch",
            "Seconds since the config repository was last fetched successfully",
            since_fetch.clone(),
        );
        Metrics {
            drift_status,
            drifted_resources,
            drift_check_seconds,
            runs,
            plan_seconds,
            apply_seconds,
            fetch_errors,
            queue_depth,
            since_fetch,
            registry,
        }
    }
}

impl Metrics {
    /// Records an environment's drift status and how many resources drifted.
    pub fn drift(&self, env: &str, status: DriftStatus, drifted: usize) {
        for each in [
            DriftStatus::InSync,
            DriftStatus::Drifted,
            DriftStatus::Error,
        ] {
            self.drift_status
                .get_or_create(&DriftLabels {
                    env: env.to_string(),
                    status: each.as_str().to_string(),
                })
                .set(i64::from(each == status));
        }
        self.drifted_resources
            .get_or_create(&EnvLabels {
                env: env.to_string(),
            })
            .set(drifted as i64);
    }

    /// The metrics as OpenMetrics text, with the seconds since the last successful fetch
    /// (`None`: never) as they are now.
    pub fn encode(&self, since_fetch: Option<f64>) -> Option<String> {
        self.since_fetch.set(since_fetch.unwrap_or(f64::NAN));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).ok()?;
        Some(text)
    }

    pub fn run(&self, env: &str, kind: RunKind, result: RunResult) {
        self.runs
            .get_or_create(&RunLabels {
                env: env.to_string(),
                kind: kind.as_str().to_string(),
                result: result.as_str().to_string(),
            })
            .inc();
    }
}
