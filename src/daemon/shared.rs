//! What the main loop, the workers and the HTTP routes share: the configuration, the store,
//! terraform and AWS, the mirror, the scheduler, the trusted environments and the metrics.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{Notify, Semaphore};

use crate::config::{DaemonConfig, EnvironmentSpec, parse_environment};
use crate::git::mirror::Mirror;
use crate::git::{self, CommitId};
use crate::store::StateStore;
use crate::terraform::Workdir;

use super::scheduler::Scheduler;
use super::world::{Identities, Runner};

/// What the main loop, the workers and the HTTP routes share.
pub(crate) struct Shared {
    pub config: DaemonConfig,
    pub store: Arc<dyn StateStore>,
    /// Terraform, for every plan and apply.
    pub(crate) runner: Arc<dyn Runner>,
    /// The AWS identity of each run.
    pub(crate) identities: Arc<dyn Identities>,
    pub mirror: Mirror,
    /// How the mirror reaches the config repository.
    pub(crate) transport: Arc<crate::git::remote::Transport>,
    /// A GitHub App's installation tokens, when `github_app:` is set.
    pub(crate) app_tokens: Option<Arc<crate::forge::app::AppTokens>>,
    /// Wakes the main loop for an immediate fetch; a burst of wakes is one fetch.
    pub wake: Arc<Notify>,
    /// The workers, the terraform permits and their order.
    pub(crate) scheduler: Box<dyn Scheduler>,
    /// Blocking git work of the workers at once (staging a commit, comparing it with the
    /// last applied one): each holds the mirror open and a commit's closure in memory, and a
    /// thousand environments staged at once took the daemon to 360 MB for good.
    pub(crate) git_work: Semaphore,
    /// The environments as the trust branch describes them, from the last fetch: a snapshot
    /// the main loop publishes whole once it is parsed; readers take the latest, and never
    /// wait for git or YAML.
    pub(super) trusted: tokio::sync::watch::Sender<Arc<BTreeMap<String, EnvironmentSpec>>>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// When the last fetch succeeded.
    pub last_fetch: Arc<Mutex<Option<Instant>>>,
    /// CloudTrail `LookupEvents` requests, two a second per account.
    pub cloudtrail_limiter: crate::aws::cloudtrail::AccountLimiter,
    /// The paths changed between the last applied commits and the new heads, as the main
    /// loop found them when it passed environments over: the worker of an environment the
    /// head touches needs the same comparison.
    pub(super) changes: Mutex<ChangedPaths>,
    /// The `drift:` settings of each environment's last applied commit, by that commit.
    pub(super) applied_drift: Mutex<HashMap<String, (String, crate::config::DriftPolicy)>>,
    /// Alerts the outbox could not take (a full disk): (sinks, body), oldest first, queued
    /// again before any newer alert and on every poll.
    pub(super) held_alerts: Arc<crate::alert::Held>,
    /// With a shared store: the environments this daemon holds the lease of. `None`: it
    /// runs every environment.
    pub(crate) ownership: Option<Arc<super::lease::Ownership>>,
}

impl Shared {
    /// Whether this daemon runs `env` (always, without a shared store).
    pub fn owns(&self, env: &str) -> bool {
        self.ownership
            .as_ref()
            .is_none_or(|ownership| ownership.owns(env))
    }

    /// Whether this daemon does the repository's own duties (always, without a shared store):
    /// alerts of no environment, trust-branch karrots.yaml files that do not load, and the
    /// checks of environments the trust branch does not define. Several daemons that all see
    /// a fetch fail raise one alert between them.
    pub fn owns_repository(&self) -> bool {
        self.owns(crate::store::postgres::REPOSITORY)
    }

    /// The `drift:` settings that apply to `env`: those of its last applied commit (drift is
    /// measured against that commit, and a commit of its branch may change them), else the
    /// trust branch's. Read from the mirror once per applied commit.
    pub fn drift_policy(&self, env: &str) -> Option<crate::config::DriftPolicy> {
        let row = self.store.environment(env).ok().flatten();
        self.drift_policy_at(env, row.and_then(|row| row.last_applied).as_deref())
    }

    /// [`Shared::drift_policy`] for a caller that has already read the last applied commit.
    pub fn drift_policy_at(
        &self,
        env: &str,
        last_applied: Option<&str>,
    ) -> Option<crate::config::DriftPolicy> {
        let trusted = self.trusted(env)?;
        let Some(applied) = last_applied.map(str::to_string) else {
            return Some(trusted.drift);
        };
        if let Some((commit, policy)) = self.applied_drift.lock().ok()?.get(env)
            && *commit == applied
        {
            return Some(*policy);
        }
        // Read without the lock held: nobody waits for this environment's read of git.
        let path = format!("environments/{env}/karrots.yaml");
        let policy = git::open(self.mirror.path())
            .and_then(|repo| git::read_file(&repo, &CommitId::from_hex(&applied), &path))
            .ok()
            .flatten()
            .and_then(|text| parse_environment(&text, path.as_ref(), env).ok())
            .map_or(trusted.drift, |spec| spec.drift);
        if let Ok(mut known) = self.applied_drift.lock() {
            known.insert(env.to_string(), (applied, policy));
        }
        Some(policy)
    }

    /// The workdir of `env`'s `lane` under the state directory.
    pub(super) fn workdir(
        &self,
        env: &crate::config::EnvName,
        lane: crate::engine::Lane,
    ) -> Workdir {
        Workdir::new(&self.config.state_dir, env, lane)
    }

    pub fn trusted(&self, env: &str) -> Option<EnvironmentSpec> {
        self.trusted.borrow().get(env).cloned()
    }

    /// An environment's apply policy as the trust branch has it, without copying the rest
    /// of its description (the main loop asks it for every environment a head passes over).
    pub(super) fn apply_policy(&self, env: &str) -> Option<crate::config::ApplyPolicy> {
        self.trusted.borrow().get(env).map(|spec| spec.apply)
    }

    /// Publishes the environments of a newly read trust-branch head.
    pub(super) fn publish_trusted(&self, specs: BTreeMap<String, EnvironmentSpec>) {
        self.trusted.send_replace(Arc::new(specs));
    }

    /// Keeps the comparisons of the latest new heads (those of earlier heads are dropped).
    pub(super) fn remember_changes(&self, changes: ChangedPaths) {
        if let Ok(mut known) = self.changes.lock() {
            *known = changes;
        }
    }

    /// The paths changed from `from` to `to`, when the main loop compared them and `to`
    /// descends from `from`.
    pub(crate) fn changed_paths(&self, from: &CommitId, to: &CommitId) -> Option<Vec<String>> {
        let known = self.changes.lock().ok()?;
        known.get(&(from.clone(), to.clone()))?.clone()
    }
}

impl crate::http::DriftChecks for Shared {
    fn on(&self, env: &str, last_applied: Option<&str>) -> bool {
        self.drift_policy_at(env, last_applied)
            .is_some_and(|policy| policy.interval.is_some())
    }
}

impl crate::http::Health for Shared {
    fn hooked(&self) {
        if self.ownership.is_some() {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.announce());
        }
    }

    fn trouble(&self) -> Option<String> {
        let trouble = self.ownership.as_ref()?.trouble()?;
        Some(format!(
            "the state database cannot be reached, so no terraform starts here: {trouble}"
        ))
    }
}

/// The paths changed between pairs of commits (from, to), `None` where `to` does not descend
/// from `from`.
pub(super) type ChangedPaths = HashMap<(CommitId, CommitId), Option<Vec<String>>>;
