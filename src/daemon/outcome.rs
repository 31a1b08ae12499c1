//! The one way the daemon records what happened: an [`Outcome`] gathers a run's result, the
//! environment's status, where it now is, its drift, the audit entry and the alerts it
//! raises, and [`Shared::record`] writes all of it in one store transaction
//! ([`crate::store::StateStore::journal`]), then counts it in the metrics. A kill at any
//! moment leaves either the whole outcome or none of it: never a finished run without its
//! alert, or a status without its audit entry.

use std::time::Duration;

use crate::alert::{Alert, AlertKind};
use crate::engine::state::{DriftStatus, EnvStatus, RunKind, RunResult};
use crate::forge::CommitStatus;
use crate::git::CommitId;
use std::collections::BTreeSet;

use crate::config::RepoPath;
use crate::store::{
    Applied, Delivery, DriftRow, HeadRow, Journal, OutboxKind, RunRecord, StoreError, Summary,
};

use super::Shared;

/// One outcome for one environment and commit, built up and then [`Shared::record`]ed.
#[must_use = "an outcome is recorded by Shared::record"]
pub(super) struct Outcome {
    journal: Journal,
    alerts: Vec<Alert>,
    /// The run's kind and result, counted in `karrots_runs_total`.
    counted: Option<(RunKind, RunResult)>,
    /// The drift status and count shown by the metrics.
    drift_metric: Option<(DriftStatus, usize)>,
}

impl Outcome {
    pub fn new(env: &str, commit: &CommitId) -> Outcome {
        Outcome::for_commit(env, commit.as_str())
    }

    pub fn for_commit(env: &str, commit: &str) -> Outcome {
        Outcome {
            journal: Journal {
                env: env.to_string(),
                commit: commit.to_string(),
                ..Journal::default()
            },
            alerts: Vec::new(),
            counted: None,
            drift_metric: None,
        }
    }

    /// Ends run `id` (of `kind`) with `result`.
    pub fn finish(
        mut self,
        id: i64,
        kind: RunKind,
        result: RunResult,
        summary: Summary,
        resources: Vec<serde_json::Value>,
        message: impl Into<String>,
    ) -> Outcome {
        self.journal.run = Some(RunRecord::Finish {
            id,
            result,
            summary,
            resources,
            message: message.into(),
        });
        self.counted = Some((kind, result));
        self
    }

    /// Replaces the message of the run [`Outcome::finish`] ends.
    pub fn message(mut self, text: impl Into<String>) -> Outcome {
        if let Some(RunRecord::Finish { message, .. }) = &mut self.journal.run {
            *message = text.into();
        }
        self
    }

    /// A run of `kind` decided without terraform: refused, superseded.
    pub fn decided(
        mut self,
        kind: RunKind,
        result: RunResult,
        message: impl Into<String>,
    ) -> Outcome {
        self.journal.run = Some(RunRecord::Decided {
            kind,
            result,
            message: message.into(),
        });
        self.counted = Some((kind, result));
        self
    }

    pub fn status(mut self, status: EnvStatus) -> Outcome {
        self.journal.status = Some(status);
        self
    }

    /// The environment is now at the commit, whose inputs are `inputs` with `fingerprint`.
    pub fn last_applied(mut self, fingerprint: &str, inputs: &BTreeSet<RepoPath>) -> Outcome {
        self.journal.last_applied = Some(Applied {
            fingerprint: fingerprint.to_string(),
            inputs: inputs.clone(),
        });
        self
    }

    /// What drift checks now know, and the status the metrics show for it.
    pub fn drift(mut self, row: DriftRow, shown: DriftStatus) -> Outcome {
        self.drift_metric = Some((shown, row.resources.len()));
        self.journal.drift = Some(row);
        self
    }

    pub fn audit(mut self, decision: &str, detail: impl Into<String>) -> Outcome {
        self.journal.audit = Some((decision.to_string(), detail.into()));
        self
    }

    /// The SHA-256 of the plan file the run saved (what an approval names).
    pub fn plan_sha256(mut self, sha256: &str) -> Outcome {
        self.journal.plan_sha256 = Some(sha256.to_string());
        self
    }

    /// The approvals the run's plan was applied on.
    pub fn approved_by(mut self, approvals: Vec<crate::approval::Approval>) -> Outcome {
        self.journal.approved_by = approvals;
        self
    }

    pub fn alert(mut self, alert: Alert) -> Outcome {
        self.alerts.push(alert);
        self
    }
}

/// What an outcome adds to the metrics once it is written.
struct Counted {
    env: String,
    run: Option<(RunKind, RunResult)>,
    drift: Option<(DriftStatus, usize)>,
}

impl Shared {
    /// Records `outcome` in one transaction, on a blocking thread, then counts it. Returns
    /// the run's id, when it has a run. When the database refuses, its alerts are held in
    /// memory and queued again on every poll, and its status is shown from memory (see
    /// [`crate::alert::Held`]).
    pub(super) async fn record(&self, outcome: Outcome) -> Result<Option<i64>, StoreError> {
        let commit = outcome.journal.commit.clone();
        let (write, counted) = self.prepare(outcome);
        let recorded = crate::store::blocking(write).await;
        match &recorded {
            Err(error) if error.is_fenced() => {
                tracing::warn!(env = %counted.env, %commit, %error, "not recorded: the lease is another daemon's");
            }
            Err(error) => {
                tracing::error!(env = %counted.env, %commit, %error, "recording an outcome")
            }
            Ok(_) => {}
        }
        self.count(counted);
        recorded
    }

    /// [`Shared::record`] for a caller already on a blocking thread.
    fn record_blocking(&self, outcome: Outcome) -> Result<Option<i64>, StoreError> {
        let (write, counted) = self.prepare(outcome);
        let recorded = write();
        self.count(counted);
        recorded
    }

    /// The write of one outcome — its journal entry with the deliveries of its alerts, held
    /// behind older alerts a full disk refused — for the caller to run where it may block,
    /// and what to count once it ran.
    fn prepare(
        &self,
        outcome: Outcome,
    ) -> (
        impl FnOnce() -> Result<Option<i64>, StoreError> + Send + 'static,
        Counted,
    ) {
        let Outcome {
            journal,
            alerts,
            counted,
            drift_metric,
        } = outcome;
        let mut deliveries: Vec<Vec<Delivery>> =
            alerts.iter().map(|alert| self.deliveries(alert)).collect();
        if let Some(status) = self.commit_status(&journal, counted, &alerts) {
            deliveries.push(vec![status.delivery()]);
        }
        // A preview's end writes the commit's pull request comment again.
        if self.config.forge.is_some()
            && matches!(counted, Some((RunKind::Preview, result)) if result != RunResult::Superseded)
        {
            deliveries.push(vec![crate::forge::comment_delivery(&journal.commit)]);
        }
        let counted = Counted {
            env: journal.env.clone(),
            run: counted,
            drift: drift_metric,
        };
        let (store, held) = (self.store.clone(), self.held_alerts.clone());
        (
            move || held.record(store.as_ref(), journal, deliveries),
            counted,
        )
    }

    /// The commit status an outcome posts, when there is a forge and the outcome ends a run
    /// that posts one.
    fn commit_status(
        &self,
        journal: &Journal,
        counted: Option<(RunKind, RunResult)>,
        alerts: &[Alert],
    ) -> Option<CommitStatus> {
        self.config.forge.as_ref()?;
        let Some((kind, result)) = counted else {
            // A trust-branch karrots.yaml that does not load ends no run, but its commit
            // broke the environment: a failure on it.
            let broken = alerts.iter().find(|alert| {
                alert.kind == AlertKind::ConfigError
                    && !alert.env.is_empty()
                    && !alert.commit.is_empty()
            })?;
            let (env, sha) = (&broken.env, &broken.commit);
            let refused = (RunKind::Plan, RunResult::Refused);
            return CommitStatus::ended(
                env,
                sha,
                refused.0,
                refused.1,
                &Summary::default(),
                &broken.message,
                journal.status,
            );
        };
        let (summary, message) = match journal.run.as_ref()? {
            RunRecord::Finish {
                summary, message, ..
            } => (*summary, message.as_str()),
            RunRecord::Decided { message, .. } => (Summary::default(), message.as_str()),
        };
        let (env, sha) = (&journal.env, &journal.commit);
        CommitStatus::ended(env, sha, kind, result, &summary, message, journal.status)
    }

    /// Begins a run of `kind` (the environment's status set with it, when there is one to
    /// set), with its `pending` commit status when there is a forge: one transaction, on a
    /// blocking thread. Returns the run's id.
    pub(super) async fn start_run(
        &self,
        env: &str,
        commit: &CommitId,
        kind: RunKind,
        status: Option<EnvStatus>,
    ) -> Result<i64, StoreError> {
        // The gate before every terraform run: a lease that may lapse starts nothing.
        if !self.renewed(env).await {
            return Err(StoreError::NotOwner {
                env: env.to_string(),
            });
        }
        let pending = self
            .config
            .forge
            .as_ref()
            .and_then(|_| CommitStatus::started(env, commit.as_str(), kind));
        let outbox: Vec<Delivery> = pending.iter().map(CommitStatus::delivery).collect();
        let (name, sha) = (env.to_string(), commit.to_string());
        let run = self
            .store(move |store| store.start_run(&name, &sha, kind, status, &outbox))
            .await?;
        // The write may have waited on a database that went silent (a partition) for longer
        // than the lease: its answer, arriving late, does not make the lease ours again.
        if !self.renewed(env).await {
            tracing::warn!(
                env,
                run,
                "the lease lapsed while the run was being recorded: nothing starts; whoever holds the lease next ends the run"
            );
            let ended = Outcome::for_commit(env, commit.as_str()).finish(
                run,
                kind,
                RunResult::Interrupted,
                Summary::default(),
                Vec::new(),
                "the lease lapsed before terraform started",
            );
            let _ = self.record(ended).await;
            return Err(StoreError::NotOwner {
                env: env.to_string(),
            });
        }
        Ok(run)
    }

    /// Whether terraform may start for `env`: at once when its lease is fresh; a lease still
    /// held but not renewed lately (a slow round, a database that answers late) is waited
    /// for, up to the lease's length, rather than dropping the run.
    async fn renewed(&self, env: &str) -> bool {
        let Some(ownership) = &self.ownership else {
            return true;
        };
        let deadline = tokio::time::Instant::now() + self.config.store.lease();
        loop {
            if ownership.may_run(env) {
                return true;
            }
            if !ownership.owns(env) || tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Reads (or, for `start_run`, writes) the store on a blocking thread.
    pub(super) async fn store<T: Send + 'static>(
        &self,
        call: impl FnOnce(&dyn crate::store::StateStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        crate::store::blocking(move || call(store.as_ref())).await
    }

    /// Records new heads and the outcomes of several environments in one transaction (all
    /// of it or none), then counts them: what one commit means for the many environments it
    /// passes over is one write. Outcomes that raise alerts are recorded one by one, after,
    /// through [`Shared::record`], which holds alerts a full disk refuses.
    pub(super) fn record_all(
        &self,
        heads: &[HeadRow],
        outcomes: Vec<Outcome>,
    ) -> Result<(), StoreError> {
        let (quiet, alerting): (Vec<Outcome>, Vec<Outcome>) = outcomes
            .into_iter()
            .partition(|outcome| outcome.alerts.is_empty());
        let journals: Vec<Journal> = quiet
            .iter()
            .map(|outcome| outcome.journal.clone())
            .collect();
        if let Err(error) = self.store.journal_all(heads, &journals) {
            tracing::error!(%error, outcomes = journals.len(), "recording outcomes");
            return Err(error);
        }
        for outcome in quiet {
            self.count(Counted {
                env: outcome.journal.env,
                run: outcome.counted,
                drift: outcome.drift_metric,
            });
        }
        for outcome in alerting {
            self.record_blocking(outcome)?;
        }
        Ok(())
    }

    fn count(&self, counted: Counted) {
        if let Some((kind, result)) = counted.run {
            self.metrics.run(&counted.env, kind, result);
        }
        if let Some((status, drifted)) = counted.drift {
            self.metrics.drift(&counted.env, status, drifted);
        }
    }

    /// Records an alert that ends no run (a source error, a rewritten history).
    pub async fn alert(&self, alert: Alert) {
        let outcome = Outcome::for_commit(&alert.env, &alert.commit).alert(alert);
        let _ = self.record(outcome).await;
    }

    /// The outbox rows of one alert: the daemon's sinks and the environment's own.
    fn deliveries(&self, alert: &Alert) -> Vec<Delivery> {
        let mut sinks: Vec<String> = self
            .config
            .alerts
            .iter()
            .map(|sink| sink.webhook.to_string())
            .collect();
        if let Some(spec) = self.trusted(&alert.env) {
            sinks.extend(spec.alerts.iter().map(|sink| sink.webhook.to_string()));
        }
        tracing::info!(kind = ?alert.kind, env = %alert.env, commit = %alert.commit, message = %alert.message, "alert");
        let body = serde_json::to_string(alert).unwrap_or_default();
        sinks
            .into_iter()
            .map(|destination| Delivery {
                kind: OutboxKind::Alert,
                destination,
                body: body.clone(),
            })
            .collect()
    }
}
