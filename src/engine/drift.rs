//! What a drift check's finding means for an environment: its drift status, which alert (if
//! any) goes out, whether to remediate, and when the next check runs. Pure, like the rest of
//! the engine: the worker gathers the finding and the memory of the last check.

use std::time::Duration;

use sha2::{Digest, Sha256};

pub use super::state::DriftStatus;

/// A drifted resource: its address and what applying the last applied commit would do to it
/// (`["update"]` for a changed tag, `["create"]` for a resource deleted by hand).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Drifted {
    pub address: String,
    pub actions: Vec<String>,
}

/// What the daemon remembers of the previous checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriftMemory {
    pub status: Option<DriftStatus>,
    /// The drift last alerted (kept through a failed check, so that drift that is still
    /// there after an error is not alerted again, and drift gone after one is cleared).
    pub drifted: Vec<Drifted>,
}

/// What one drift check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// The plan of the last applied commit changes nothing.
    Clean,
    /// The plan would change these resources to bring them back.
    Drift(Vec<Drifted>),
    /// The check did not finish (credentials, provider error, timeout): nothing is known.
    Failed,
}

/// The alert a finding raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriftAlert {
    Detected,
    Cleared,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriftDecision {
    pub status: DriftStatus,
    /// The drift to remember (and show) from now on.
    pub drifted: Vec<Drifted>,
    pub alert: Option<DriftAlert>,
    /// Re-apply the last applied commit (`drift.remediate`), from this check's plan.
    pub remediate: bool,
}

/// Decides what a finding means, given the memory of the previous checks. Drift is alerted
/// when it appears or its set of resources (or their actions) changes — not again on every
/// check while it stays the same; a failed check is alerted once, and is never drift.
pub fn decide_drift(previous: &DriftMemory, finding: &Finding, remediate: bool) -> DriftDecision {
    match finding {
        Finding::Clean => DriftDecision {
            status: DriftStatus::InSync,
            drifted: Vec::new(),
            alert: (!previous.drifted.is_empty()).then_some(DriftAlert::Cleared),
            remediate: false,
        },
        Finding::Drift(found) => {
            let mut found = found.clone();
            found.sort();
            found.dedup();
            let mut known = previous.drifted.clone();
            known.sort();
            DriftDecision {
                status: DriftStatus::Drifted,
                alert: (found != known).then_some(DriftAlert::Detected),
                drifted: found,
                remediate,
            }
        }
        Finding::Failed => DriftDecision {
            status: DriftStatus::Error,
            drifted: previous.drifted.clone(),
            alert: (previous.status != Some(DriftStatus::Error)).then_some(DriftAlert::Error),
            remediate: false,
        },
    }
}

/// The wait before retrying after `failures` failed checks in a row: the shared backoff
/// ([`super::retry::Backoff::DRIFT`]), never longer than the interval itself.
pub fn retry_after(interval: Duration, failures: u32, jitter: f64) -> Duration {
    super::retry::Backoff::DRIFT
        .after(failures, jitter)
        .min(interval)
}

/// How long after the daemon starts an environment that was never checked gets its first
/// check: a fixed share of the interval (at most a minute), taken from a hash of its name, so
/// environments with the same interval do not all plan at the same moment, then or after.
pub fn first_check_delay(env: &str, interval: Duration) -> Duration {
    let digest = Sha256::digest(env.as_bytes());
    let share = u16::from_be_bytes([digest[0], digest[1]]) as u32;
    interval
        .min(Duration::from_secs(60))
        .mul_f64(share as f64 / 65536.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drifted(address: &str, actions: &[&str]) -> Drifted {
        Drifted {
            address: address.into(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
        }
    }

    #[test]
    fn findings_in_one_table() {
        let tag = drifted("aws_vpc.main", &["update"]);
        let gone = drifted("aws_vpc.extra", &["create"]);
        let memory = |status, drifted: Vec<Drifted>| DriftMemory {
            status: Some(status),
            drifted,
        };
        let never = DriftMemory::default();
        type Row<'a> = (
            &'a str,
            DriftMemory,
            Finding,
            DriftStatus,
            Option<DriftAlert>,
        );
        let rows: Vec<Row> = vec![
            (
                "first check, clean",
                never.clone(),
                Finding::Clean,
                DriftStatus::InSync,
                None,
            ),
            (
                "drift appears",
                memory(DriftStatus::InSync, vec![]),
                Finding::Drift(vec![tag.clone()]),
                DriftStatus::Drifted,
                Some(DriftAlert::Detected),
            ),
            (
                "the same drift again",
                memory(DriftStatus::Drifted, vec![tag.clone()]),
                Finding::Drift(vec![tag.clone()]),
                DriftStatus::Drifted,
                None,
            ),
            (
                "the same drift, found in another order",
                memory(DriftStatus::Drifted, vec![tag.clone(), gone.clone()]),
                Finding::Drift(vec![gone.clone(), tag.clone()]),
                DriftStatus::Drifted,
                None,
            ),
            (
                "another resource drifts too",
                memory(DriftStatus::Drifted, vec![tag.clone()]),
                Finding::Drift(vec![tag.clone(), gone.clone()]),
                DriftStatus::Drifted,
                Some(DriftAlert::Detected),
            ),
            (
                "the same address, another action",
                memory(DriftStatus::Drifted, vec![tag.clone()]),
                Finding::Drift(vec![drifted("aws_vpc.main", &["delete", "create"])]),
                DriftStatus::Drifted,
                Some(DriftAlert::Detected),
            ),
            (
                "drift reverted",
                memory(DriftStatus::Drifted, vec![tag.clone()]),
                Finding::Clean,
                DriftStatus::InSync,
                Some(DriftAlert::Cleared),
            ),
            (
                "a check fails",
                memory(DriftStatus::InSync, vec![]),
                Finding::Failed,
                DriftStatus::Error,
                Some(DriftAlert::Error),
            ),
            (
                "it fails again: alerted once",
                memory(DriftStatus::Error, vec![]),
                Finding::Failed,
                DriftStatus::Error,
                None,
            ),
            (
                "drift still there after an error is not news",
                memory(DriftStatus::Error, vec![tag.clone()]),
                Finding::Drift(vec![tag.clone()]),
                DriftStatus::Drifted,
                None,
            ),
            (
                "drift gone after an error is cleared",
                memory(DriftStatus::Error, vec![tag.clone()]),
                Finding::Clean,
                DriftStatus::InSync,
                Some(DriftAlert::Cleared),
            ),
        ];
        for (what, previous, finding, status, alert) in rows {
            let decision = decide_drift(&previous, &finding, false);
            assert_eq!((decision.status, decision.alert), (status, alert), "{what}");
            assert!(!decision.remediate, "{what}: remediation is off");
        }
    }

    #[test]
    fn only_drift_is_remediated_and_a_failure_keeps_what_was_known() {
        let tag = drifted("aws_vpc.main", &["update"]);
        let previous = DriftMemory {
            status: Some(DriftStatus::Drifted),
            drifted: vec![tag.clone()],
        };
        assert!(decide_drift(&previous, &Finding::Drift(vec![tag.clone()]), true).remediate);
        assert!(!decide_drift(&previous, &Finding::Clean, true).remediate);
        let failed = decide_drift(&previous, &Finding::Failed, true);
        assert!(!failed.remediate, "a failed check is never remediated");
        assert_eq!(failed.drifted, vec![tag]);
    }

    #[test]
    fn retries_back_off_up_to_the_interval_and_first_checks_spread() {
        let hour = Duration::from_secs(3600);
        assert_eq!(retry_after(hour, 1, 0.0), Duration::from_secs(15));
        assert_eq!(retry_after(hour, 3, 0.0), Duration::from_secs(60));
        assert_eq!(retry_after(hour, 40, 0.0), hour);
        assert_eq!(
            retry_after(Duration::from_secs(2), 1, 0.0),
            Duration::from_secs(2)
        );
        let delays: std::collections::BTreeSet<Duration> = (0..20)
            .map(|i| first_check_delay(&format!("env-{i}"), hour))
            .collect();
        assert!(delays.len() > 15, "spread: {delays:?}");
        assert!(delays.iter().all(|d| *d < Duration::from_secs(60)));
        assert_eq!(
            first_check_delay("prod", hour),
            first_check_delay("prod", hour)
        );
    }
}
