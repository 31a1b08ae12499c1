//! `karrots serve`: the reconciler.
//!
//! The main loop fetches the config repository into a bare mirror (on a timer, or at once when
//! a verified webhook wakes it), reads the environments from the trust branch, and hands each
//! new head to the worker of that environment and lane. Workers carry out what
//! [`crate::engine`] decides: stage the commit's input closure, plan it, apply a merged plan,
//! refuse, record and alert. Never two runs at once for one environment and lane; at most
//! `concurrency` terraform runs overall, merged runs ahead of previews.
//!
//! Shutdown is a parameter of [`run`]: no new work is taken, plans are cancelled (SIGINT,
//! grace, kill), an apply in flight finishes, and the store is left consistent.

mod credentials;
mod drift;
mod lease;
mod memory;
pub(crate) use memory::limit_arenas;
mod merged;
mod outcome;
mod preview;
mod scheduler;
mod shared;
mod steps;
mod systemd;
#[cfg(test)]
mod tests;
mod worker;
mod world;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::alert::{Alert, AlertKind};
use crate::config::PreviewNetwork;
use crate::config::RepoPath;
use crate::config::{DaemonConfig, EnvironmentSpec, SandboxMode, StoreSettings, parse_environment};
use crate::engine::Lane;
use crate::engine::reconcile::touches_inputs;
use crate::engine::retry::Backoff;
use crate::engine::state::{EnvStatus, RunKind, RunResult};
use crate::git::mirror::{Heads, Listing, Mirror, Tags};
use crate::git::remote::Transport;
use crate::git::{self, CommitId};
use crate::store::postgres::{Held, Leases, PgStore, PgTarget};
use crate::store::{EnvironmentRow, HeadRow, SqliteStore, StateStore};
use scheduler::{InProcess, Key};
use world::World;

use outcome::Outcome;
use shared::ChangedPaths;
pub(crate) use shared::Shared;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Git(#[from] crate::git::GitError),
    #[error(transparent)]
    Terraform(#[from] crate::terraform::TerraformError),
    #[error("{0}")]
    Setup(String),
}

/// Blocking git tasks of the workers at once ([`Shared::git_work`]).
const GIT_WORK_AT_ONCE: usize = 4;

/// How often the outbox is read for commit statuses to send: a run's end reaches the forge
/// within this (and the request's own time).
const STATUS_TICK: Duration = Duration::from_millis(100);

/// How long a wake waits for the rest of its burst before fetching.
const WAKE_DEBOUNCE: Duration = Duration::from_millis(20);

/// Runs the daemon until `shutdown` completes, serving HTTP on `listener` (bound by the
/// caller: `karrots serve` binds `listen:`; a test binds port 0 and reads the port back).
pub async fn run(
    config: DaemonConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    preflight(&config).await?;
    let secret = crate::http::load_webhook_secret(&config).map_err(DaemonError::Setup)?;
    let api_token = crate::http::load_api_token(&config).map_err(DaemonError::Setup)?;
    let stop = CancellationToken::new();
    let world = World::real(&config)?;
    let (shared, keeping) = open(config, world, &stop)?;
    interrupt_open_runs(&shared, None).await?;
    let keeper = keeping.map(|keeping| {
        lease::listen(&shared, keeping.target, keeping.owner, stop.clone());
        tokio::spawn(lease::keep(shared.clone(), keeping.leases, stop.clone()))
    });

    let http = serve_http(&shared, listener, secret, api_token, &stop)?;
    let alerts = tokio::spawn(crate::alert::deliver(
        shared.store.clone(),
        reqwest::Client::new(),
        Duration::from_millis(500),
        stop.clone(),
    ));
    let credentials = serve_git_credentials(&shared, &stop)?;
    let statuses = shared.config.forge.clone().map(|settings| {
        tokio::spawn(crate::forge::deliver(
            shared.store.clone(),
            crate::forge::Forge::new(settings, shared.app_tokens.clone()),
            STATUS_TICK,
            stop.clone(),
        ))
    });
    // READY=1 before the first ping; the pings have their own token so that they end, and are
    // seen to end, before STOPPING=1 is sent.
    systemd::ready(&shared);
    let watchdog_stop = stop.child_token();
    let watchdog = tokio::spawn(systemd::watchdog(shared.clone(), watchdog_stop.clone()));
    let trim = tokio::spawn(memory::trim_periodically(stop.clone()));

    main_loop(&shared, shutdown).await;

    tracing::info!("shutting down: no new work; plans are cancelled, an apply in flight finishes");
    watchdog_stop.cancel();
    let _ = watchdog.await;
    systemd::stopping();
    stop.cancel();
    shared.scheduler.drain().await;
    if let Some(keeper) = keeper
        && let Ok(Some(leases)) = keeper.await
    {
        lease::give_up(leases).await;
    }
    let _ = http.await;
    let _ = alerts.await;
    if let Some(statuses) = statuses {
        let _ = statuses.await;
    }
    if let Some(credentials) = credentials {
        let _ = credentials.await;
    }
    let _ = trim.await;
    let client = reqwest::Client::new();
    shared
        .held_alerts
        .send_at_stop(shared.store.clone(), &client)
        .await;
    tracing::info!("stopped");
    Ok(())
}

/// Serves the HTTP routes on `listener` until `stop`, with a narrow view of the daemon.
fn serve_http(
    shared: &Arc<Shared>,
    listener: tokio::net::TcpListener,
    secret: Option<Vec<u8>>,
    api_token: Option<Vec<u8>>,
    stop: &CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, DaemonError> {
    let listen = listener
        .local_addr()
        .map_err(|e| DaemonError::Setup(format!("the listening socket: {e}")))?;
    tracing::info!(%listen, repo = %shared.config.repo, "karrots serve is up");
    let backend = crate::http::Backend {
        store: shared.store.clone(),
        wake: shared.wake.clone(),
        metrics: shared.metrics.clone(),
        last_fetch: shared.last_fetch.clone(),
        drift_checks: shared.clone(),
        health: shared.clone(),
    };
    let router = crate::http::router(backend, shared.config.metrics_public, secret, api_token);
    let cap = crate::http::serve::connection_cap();
    Ok(tokio::spawn(crate::http::serve::serve(
        listener,
        router,
        cap,
        stop.clone(),
    )))
}

/// The credential socket that hands a GitHub App's installation token to the daemon's own
/// `git`, when the App serves an https fetch.
fn serve_git_credentials(
    shared: &Arc<Shared>,
    stop: &CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<()>>, DaemonError> {
    let (Some(tokens), Some(socket)) = (&shared.app_tokens, shared.transport.credential_socket())
    else {
        return Ok(None);
    };
    let host = shared.config.repo.host().unwrap_or_default().to_string();
    credentials::serve(socket, tokens.clone(), host, stop.clone())
        .map(Some)
        .map_err(|e| DaemonError::Setup(format!("the git credential socket: {e}")))
}

/// What the machine must allow before anything starts: the Landlock sandbox, and a private
/// network for previews.
async fn preflight(config: &DaemonConfig) -> Result<(), DaemonError> {
    if config.sandbox == SandboxMode::Landlock {
        crate::sandbox::probe()?;
    } else {
        tracing::warn!("sandbox: off — terraform runs without the Landlock sandbox");
    }
    match (config.preview, config.preview_network) {
        (true, PreviewNetwork::Isolated) => crate::egress::probe().await.map_err(|reason| {
            DaemonError::Setup(format!(
                "previews run in a private network namespace, and this machine refuses one ({reason}); allow user namespaces (sysctl kernel.unprivileged_userns_clone=1, or `RestrictNamespaces=user net` in the unit), or set `preview_network: open` (a preview's provider code can then reach any host) or `preview: false` in the daemon configuration"
            ))
        })?,
        (true, PreviewNetwork::Open) => tracing::warn!(
            "preview_network: open — provider code of unmerged commits can reach any host"
        ),
        (false, _) => {}
    }
    Ok(())
}

/// Opens what the daemon keeps under `state_dir` (the store, the mirror, the workdirs) and
/// puts it together; `stop` ends the workers.
fn open(
    config: DaemonConfig,
    world: World,
    stop: &CancellationToken,
) -> Result<(Arc<Shared>, Option<lease::Keeping>), DaemonError> {
    crate::terraform::create_private_dir(&config.state_dir)
        .map_err(|e| DaemonError::Setup(format!("creating {}: {e}", config.state_dir.display())))?;
    let OpenedStore {
        store,
        ownership,
        keeping,
    } = open_store(&config)?;
    let mirror =
        Mirror::open_or_create(&config.state_dir.join("mirror.git"), config.repo.as_str())?;
    let app_tokens = config
        .github_app
        .clone()
        .map(|app| Arc::new(crate::forge::app::AppTokens::new(app)));
    // A GitHub App's token serves an https fetch through the credential socket.
    let socket = (app_tokens.is_some() && config.repo.scheme() == crate::config::Scheme::Https)
        .then(|| config.state_dir.join(credentials::SOCKET));
    let transport = Transport::new(&config.repo, &config.git, &config.state_dir, socket)
        .map_err(|error| DaemonError::Setup(error.to_string()))?;
    let shared = Arc::new(Shared {
        scheduler: Box::new(InProcess::new(config.concurrency.get(), stop.clone())),
        git_work: Semaphore::new(GIT_WORK_AT_ONCE),
        config,
        store,
        runner: world.runner,
        identities: world.identities,
        mirror,
        transport: Arc::new(transport),
        app_tokens,
        wake: Arc::new(Notify::new()),
        trusted: tokio::sync::watch::Sender::new(Arc::default()),
        metrics: Arc::default(),
        last_fetch: Arc::default(),
        cloudtrail_limiter: crate::aws::cloudtrail::account_limiter(),
        applied_drift: Mutex::new(HashMap::new()),
        changes: Mutex::new(HashMap::new()),
        held_alerts: Arc::default(),
        ownership,
    });
    Ok((shared, keeping))
}

/// The store, and with a shared one this daemon's leases and how to keep them.
struct OpenedStore {
    store: Arc<dyn StateStore>,
    ownership: Option<Arc<lease::Ownership>>,
    keeping: Option<lease::Keeping>,
}

/// The store `store:` names: SQLite under `state_dir` (this daemon runs everything), or the
/// shared PostgreSQL database, with this daemon's leases and the keeper that takes them.
fn open_store(config: &DaemonConfig) -> Result<OpenedStore, DaemonError> {
    let StoreSettings::Postgres {
        url,
        password_file,
        ca_file,
        lease,
    } = &config.store
    else {
        let store = SqliteStore::open(&config.state_dir.join("karrots.db"))?;
        return Ok(OpenedStore {
            store: Arc::new(store),
            ownership: None,
            keeping: None,
        });
    };
    let target = PgTarget {
        url: url.clone(),
        password_file: password_file.clone(),
        ca_file: ca_file.clone(),
        lease: *lease,
    };
    let owner = daemon_id();
    let held = Arc::new(Held::default());
    // The blocking client runs a runtime of its own: opened off this one.
    let opening = (target.clone(), owner.clone(), held.clone());
    let store = std::thread::spawn(move || PgStore::open(opening.0, &opening.1, opening.2))
        .join()
        .map_err(|_| DaemonError::Setup("opening the state database panicked".into()))??;
    tracing::info!(daemon = %owner, lease = ?lease, "state in PostgreSQL, shared with any other daemon that names it");
    let leases = Leases::new(target.clone(), &owner, held.clone(), *lease);
    let ownership = Arc::new(lease::Ownership::new(held));
    Ok(OpenedStore {
        store: Arc::new(store),
        ownership: Some(ownership),
        keeping: Some(lease::Keeping {
            leases,
            target,
            owner,
        }),
    })
}

/// This process among the daemons: host, process id and a random part (a restarted daemon
/// is another owner, whose leases start anew).
fn daemon_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!("{host}-{}-{:08x}", std::process::id(), fastrand::u32(..))
}

/// Runs cut off by a kill: each is ended `interrupted`; an apply is alerted, never
/// re-applied from its old plan, and the next head re-plans. `only`: the runs of these
/// environments (taken over from another daemon); else every open run the store gives this
/// daemon (all of them with SQLite, those of the environments it holds with PostgreSQL).
async fn interrupt_open_runs(
    shared: &Shared,
    only: Option<&BTreeSet<String>>,
) -> Result<(), DaemonError> {
    let open = shared.store(|store| store.open_runs()).await?;
    let cut_off = open
        .into_iter()
        .filter(|run| only.is_none_or(|only| only.contains(&run.env)));
    for run in cut_off {
        tracing::warn!(env = %run.env, commit = %run.commit, kind = %run.kind, run = run.id, "found a run cut off by a restart");
        let mut interrupted = Outcome::for_commit(&run.env, &run.commit).finish(
            run.id,
            run.kind,
            RunResult::Interrupted,
            run.summary,
            run.resources,
            "the daemon stopped while this run was in progress",
        );
        if run.kind == RunKind::Apply {
            interrupted = interrupted.status(EnvStatus::Failed).alert(Alert::new(
                AlertKind::ApplyInterrupted,
                &run.env,
                &run.commit,
                format!("the apply of run {} was cut off when the daemon stopped; the next commit re-plans from the real state", run.id),
            ));
        }
        shared.record(interrupted).await?;
    }
    Ok(())
}

/// Polls on the interval, or at once when woken (a verified hook, a watched ref), until
/// `shutdown` completes.
async fn main_loop(shared: &Arc<Shared>, shutdown: impl Future<Output = ()>) {
    let _watcher = watch_file_remote(shared);
    let mut poller = Poller::default();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut woken = false;
    loop {
        // What a full disk refused before: held alerts and statuses, written again.
        let (store, held) = (shared.store.clone(), shared.held_alerts.clone());
        let _ = tokio::task::spawn_blocking(move || {
            held.flush(store.as_ref());
            store.record_pending();
        })
        .await;
        if woken || poller.fetch_due() {
            poller.poll(shared).await;
        }
        woken = false;
        tokio::select! {
            () = tokio::time::sleep(shared.config.poll_interval) => {}
            () = shared.wake.notified() => {
                woken = true;
                // A burst of hooks (or ref updates of one push) is one fetch: let it arrive,
                // then drop the wake it left. A wake during the fetch still fetches again.
                tokio::time::sleep(WAKE_DEBOUNCE).await;
                let _ = tokio::time::timeout(Duration::ZERO, shared.wake.notified()).await;
            }
            () = &mut shutdown => break,
        }
    }
}

/// The main loop's memory between polls.
#[derive(Default)]
struct Poller {
    /// The heads seen at the last successful poll.
    heads: Heads,
    /// Karrots' tags (approvals) seen at the last successful poll.
    tags: Tags,
    /// Failed fetches in a row, and when the poll timer tries again: later at each failure
    /// ([`Backoff`]); a wake tries at once.
    failures: u32,
    retry_at: Option<Instant>,
    /// Whether this failure streak's `source_error` was alerted: at its first failure, or,
    /// with a shared store, at the first this daemon sees holding the repository lease.
    source_alerted: bool,
    /// The trust branch's parsed environments, by blob.
    spec_cache: SpecCache,
    /// Whether the last poll found no trust branch (warned once per absence).
    trust_missing: bool,
}

/// The longest wait between fetches of a failing remote (unless `poll_interval` is longer).
const FETCH_BACKOFF_CAP: Duration = Duration::from_secs(300);

impl Poller {
    /// Whether the poll timer should fetch now: always, but after failed fetches.
    fn fetch_due(&self) -> bool {
        self.retry_at.is_none_or(|at| Instant::now() >= at)
    }

    async fn poll(&mut self, shared: &Arc<Shared>) {
        let Some(Listing { heads, tags }) = self.fetch(shared).await else {
            return;
        };
        if tags != self.tags {
            let previous = std::mem::replace(&mut self.tags, tags);
            self.approvals_changed(shared, &previous);
        }
        let queued = if heads == self.heads {
            BTreeSet::new()
        } else {
            self.heads_moved(shared, heads).await
        };
        self.taken_over(shared, &queued).await;
    }

    /// New heads: the trust branch read again, the moved branches of the environments this
    /// daemon runs queued or passed over, previews queued. Returns the environments whose
    /// heads were handled.
    async fn heads_moved(&mut self, shared: &Arc<Shared>, heads: Heads) -> BTreeSet<String> {
        // The heads are taken as seen only once the trust branch is read: a poll that cannot
        // read it leaves them, so the moved branches are queued by the next poll that can.
        let previous = self.heads.clone();
        let Some(specs) = self.trusted_specs(shared, &heads, &previous).await else {
            return BTreeSet::new();
        };
        self.heads = heads.clone();
        shared.publish_trusted(specs.clone());
        let moved: Vec<HeadRow> = specs
            .iter()
            .filter(|(name, _)| shared.owns(name))
            .filter_map(|(name, spec)| {
                let branch = spec.branch.as_str();
                let head = heads.get(branch)?;
                (previous.get(branch) != Some(head)).then(|| HeadRow {
                    env: name.clone(),
                    branch: branch.to_string(),
                    head: head.to_string(),
                })
            })
            .collect();
        let handled = moved.iter().map(|head| head.env.clone()).collect();
        self.merged_heads(shared, moved).await;
        if shared.config.preview {
            let claimed: HashSet<&str> = specs.values().map(|spec| spec.branch.as_str()).collect();
            for name in specs.keys().filter(|name| shared.owns(name)) {
                for (other, tip) in &heads {
                    if !claimed.contains(other.as_str()) && previous.get(other) != Some(tip) {
                        self.enqueue(shared, name, Lane::Preview, other, tip).await;
                    }
                }
            }
        }
        self.alert_identity_changes(shared, &heads, &previous, &specs)
            .await;
        self.check_untrusted(shared, &heads, &previous, &specs)
            .await;
        handled
    }

    /// Environments whose leases this daemon just took (from a daemon that stopped renewing,
    /// or given up): the runs their last owner left open are ended `interrupted` (an apply
    /// alerted, never applied again from its plan), and their heads are queued here (unless
    /// this poll queued them already).
    async fn taken_over(&mut self, shared: &Arc<Shared>, queued: &BTreeSet<String>) {
        let Some(ownership) = &shared.ownership else {
            return;
        };
        let gained = ownership.take_gained();
        if gained.is_empty() {
            return;
        }
        if let Err(error) = interrupt_open_runs(shared, Some(&gained)).await {
            tracing::error!(%error, "ending the runs left open by the last owner");
        }
        let specs = shared.trusted.borrow().clone();
        let heads: Vec<HeadRow> = gained
            .iter()
            .filter(|env| !queued.contains(*env))
            .filter_map(|env| {
                let branch = specs.get(env)?.branch.as_str();
                Some(HeadRow {
                    env: env.clone(),
                    branch: branch.to_string(),
                    head: self.heads.get(branch)?.to_string(),
                })
            })
            .collect();
        let rows = heads.clone();
        if let Err(error) = shared.store(move |store| store.record_heads(&rows)).await {
            tracing::error!(%error, "recording the heads of the environments taken over");
        }
        for head in heads {
            let commit = CommitId::from_hex(&head.head);
            self.enqueue(shared, &head.env, Lane::Merged, &head.branch, &commit)
                .await;
        }
    }

    /// Tells the merged worker of each environment whose approval tags differ from
    /// `previous` to count them again.
    fn approvals_changed(&self, shared: &Arc<Shared>, previous: &Tags) {
        let changed: BTreeSet<&str> = previous
            .iter()
            .filter(|(name, target)| self.tags.get(*name) != Some(*target))
            .chain(
                self.tags
                    .iter()
                    .filter(|(name, target)| previous.get(*name) != Some(*target)),
            )
            .filter_map(|(name, _)| name.strip_prefix("karrots/approve/")?.split('/').next())
            .collect();
        for env in changed {
            tracing::info!(env, "approval tags changed");
            shared.scheduler.approvals_changed(&Key::merged(env));
        }
    }

    /// Fetches the remote's branches and Karrots' tags into the mirror; `None` when that
    /// failed (a `source_error` is alerted once per failure streak, and the last good
    /// revision kept).
    async fn fetch(&mut self, shared: &Arc<Shared>) -> Option<Listing> {
        let started = Instant::now();
        let mirror_path = shared.mirror.path().to_path_buf();
        let transport = shared.transport.clone();
        let updated = tokio::task::spawn_blocking(move || {
            let url = transport.address().as_str();
            Mirror::open_or_create(&mirror_path, url).and_then(|mirror| mirror.update(&transport))
        })
        .await;
        let (listing, fetched) = match updated {
            Ok(Ok(update)) => update,
            Ok(Err(error)) => {
                shared.metrics.fetch_errors.inc();
                self.failures += 1;
                let interval = shared.config.poll_interval;
                let backoff = Backoff::new(interval, interval.max(FETCH_BACKOFF_CAP));
                let wait = backoff.after(self.failures, fastrand::f64());
                self.retry_at = Some(Instant::now() + wait);
                tracing::warn!(%error, retry_in = ?wait, "fetch failed; keeping the last good revision");
                if !self.source_alerted && shared.owns_repository() {
                    self.source_alerted = true;
                    let alert = Alert::new(AlertKind::SourceError, "", "", error.to_string());
                    shared.alert(alert).await;
                }
                return None;
            }
            Err(error) => {
                tracing::error!(%error, "the fetch task failed");
                return None;
            }
        };
        (self.failures, self.retry_at, self.source_alerted) = (0, None, false);
        if let Ok(mut last) = shared.last_fetch.lock() {
            *last = Some(Instant::now());
        }
        tracing::debug!(elapsed = ?started.elapsed(), fetched, "polled the config repository");
        Some(listing)
    }

    /// The environments of the trust branch at `heads`, those that load; one that does not
    /// is `error`, alerted once per trust-branch head. `None` when the trust branch is
    /// missing or cannot be read.
    async fn trusted_specs(
        &mut self,
        shared: &Arc<Shared>,
        heads: &Heads,
        previous: &Heads,
    ) -> Option<BTreeMap<String, EnvironmentSpec>> {
        let trust = shared.config.trust_branch.as_str();
        let Some(trust_tip) = heads.get(trust).cloned() else {
            if !self.trust_missing {
                self.trust_missing = true;
                tracing::warn!(branch = %trust, "the trust branch does not exist in the repository; nothing runs until it does");
            }
            return None;
        };
        self.trust_missing = false;
        let cache = std::mem::take(&mut self.spec_cache);
        let trusted = match read_trusted(shared, &trust_tip, cache).await {
            Ok((trusted, cache)) => {
                self.spec_cache = cache;
                trusted
            }
            Err(error) => {
                tracing::error!(%error, "reading the environments of the trust branch; the moved branches are queued once it can be read");
                return None;
            }
        };
        let moved = previous.get(trust) != Some(&trust_tip);
        let mut specs = BTreeMap::new();
        for (name, spec) in trusted {
            match spec.as_ref() {
                Ok(spec) => {
                    specs.insert(name, spec.clone());
                }
                // Alerted by the environment's holder, or by the repository's when none.
                Err(problems) if moved && (shared.owns(&name) || shared.owns_repository()) => {
                    let message =
                        format!("the trust branch's karrots.yaml does not load:\n{problems}");
                    let alert =
                        Alert::new(AlertKind::ConfigError, &name, trust_tip.as_str(), message);
                    let error = Outcome::new(&name, &trust_tip).status(EnvStatus::Error);
                    let _ = shared.record(error.alert(alert)).await;
                }
                Err(_) => {}
            }
        }
        Some(specs)
    }

    /// Environments a moved branch defines that the trust branch does not: checked only.
    async fn check_untrusted(
        &self,
        shared: &Arc<Shared>,
        heads: &Heads,
        previous: &Heads,
        specs: &BTreeMap<String, EnvironmentSpec>,
    ) {
        if !shared.owns_repository() {
            return;
        }
        for (branch, tip) in heads {
            if previous.get(branch) == Some(tip) || branch == shared.config.trust_branch.as_str() {
                continue;
            }
            let (mirror, at) = (shared.mirror.path().to_path_buf(), tip.clone());
            let names = tokio::task::spawn_blocking(move || {
                git::open(&mirror).and_then(|repo| git::mirror::environment_names(&repo, &at))
            })
            .await;
            for name in names.ok().and_then(Result::ok).unwrap_or_default() {
                if !specs.contains_key(&name) {
                    self.enqueue(shared, &name, Lane::Preview, branch, tip)
                        .await;
                }
            }
        }
    }

    /// New heads of environments' branches. A head that changes no path of its environment's
    /// last applied input closure is passed over here, and recorded with what that means for
    /// all such environments in one transaction, after the other heads are recorded and
    /// queued to their merged workers: the cost of a commit does not grow with the
    /// environments it does not touch.
    async fn merged_heads(&mut self, shared: &Arc<Shared>, moved: Vec<HeadRow>) {
        if moved.is_empty() {
            return;
        }
        let started = Instant::now();
        let (passed_over, _turns) = self.pass_over(shared, &moved).await;
        let names: HashSet<String> = passed_over.iter().map(|(env, _)| env.clone()).collect();
        let (quiet, queued): (Vec<HeadRow>, Vec<HeadRow>) = moved
            .into_iter()
            .partition(|head| names.contains(&head.env));
        // The touched environments first: their heads, then their workers, which plan while
        // the rest is written.
        let heads = queued.clone();
        let recorded = shared.store(move |store| store.record_heads(&heads)).await;
        if let Err(error) = recorded {
            tracing::error!(%error, "recording the new heads");
        }
        for head in &queued {
            let commit = CommitId::from_hex(&head.head);
            self.enqueue(shared, &head.env, Lane::Merged, &head.branch, &commit)
                .await;
        }
        let queued_at = started.elapsed();
        let outcomes: Vec<Outcome> = passed_over
            .into_iter()
            .filter_map(|(_, outcome)| outcome)
            .collect();
        // A thousand rows are a long write: on a blocking thread, so the runtime threads run
        // the queued workers meanwhile.
        let (writer, heads) = (shared.clone(), quiet.clone());
        let recorded =
            tokio::task::spawn_blocking(move || writer.record_all(&heads, outcomes)).await;
        if !matches!(recorded, Ok(Ok(()))) {
            // Their heads, then each of their workers decides and records its own.
            let heads = quiet.clone();
            let recorded = shared.store(move |store| store.record_heads(&heads)).await;
            if let Err(error) = recorded {
                tracing::error!(%error, "recording the new heads");
            }
            for head in &quiet {
                let commit = CommitId::from_hex(&head.head);
                self.enqueue(shared, &head.env, Lane::Merged, &head.branch, &commit)
                    .await;
            }
            return;
        }
        tracing::debug!(
            passed_over = quiet.len(),
            queued = queued.len(),
            ?queued_at,
            elapsed = ?started.elapsed(),
            "new heads of the environments' branches"
        );
    }

    /// The environments among `moved` whose new head changes no path of their last applied
    /// input closure (or is that commit), with what to record for each, and the turns of
    /// their workers, held until it is recorded. Only an idle worker's environment is passed
    /// over here: one that runs, waits or retries decides for itself.
    async fn pass_over(
        &self,
        shared: &Arc<Shared>,
        moved: &[HeadRow],
    ) -> (PassedOver, Vec<tokio::sync::OwnedMutexGuard<()>>) {
        let rows = shared.store(|store| store.environments()).await;
        let rows: HashMap<String, EnvironmentRow> = match rows {
            Ok(rows) => rows
                .into_iter()
                .map(|row| (row.name.clone(), row))
                .collect(),
            Err(_) => return Default::default(),
        };
        let (mut turns, candidates) = candidates(shared, moved, &rows);
        if candidates.is_empty() {
            return (Vec::new(), Vec::new());
        }
        let mirror = shared.mirror.path().to_path_buf();
        let untouched = tokio::task::spawn_blocking(move || untouched(&mirror, candidates)).await;
        let untouched = match untouched {
            Ok(Ok((untouched, changes))) => {
                shared.remember_changes(changes);
                untouched
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "comparing the new heads with the last applied commits; each environment's worker does it");
                return (Vec::new(), Vec::new());
            }
            Err(error) => {
                tracing::error!(%error, "the comparison of the new heads failed");
                return (Vec::new(), Vec::new());
            }
        };
        let mut passed_over = Vec::new();
        for (env, head, inputs) in untouched {
            let (row, Some(apply)) = (&rows[&env], shared.apply_policy(&env)) else {
                continue;
            };
            if let Some(outcome) = merged::pass_over(row, apply, &head, &inputs) {
                passed_over.push((env, outcome));
            }
        }
        // The turns of the environments their head touches go back at once: their workers
        // plan while the others are recorded.
        let kept = passed_over
            .iter()
            .filter_map(|(env, _)| turns.remove(env))
            .collect();
        (passed_over, kept)
    }

    /// A moved branch claimed by one environment is never previewed for the others, so a
    /// commit there that rewrites another environment's identity would go unseen: it is
    /// refused for that environment (a `config_error`; nothing runs, its status stays).
    async fn alert_identity_changes(
        &self,
        shared: &Arc<Shared>,
        heads: &Heads,
        previous: &Heads,
        specs: &BTreeMap<String, EnvironmentSpec>,
    ) {
        let trust = shared.config.trust_branch.as_str();
        let moved: Vec<MovedBranch> = heads
            .iter()
            .filter(|(branch, tip)| {
                branch.as_str() != trust
                    && previous.get(*branch) != Some(*tip)
                    && specs
                        .values()
                        .any(|spec| spec.branch.as_str() == branch.as_str())
            })
            .map(|(branch, tip)| (branch.clone(), tip.clone(), previous.get(branch).cloned()))
            .collect();
        if moved.is_empty() {
            return;
        }
        let (mirror, specs) = (shared.mirror.path().to_path_buf(), specs.clone());
        let found =
            tokio::task::spawn_blocking(move || identity_changes(&mirror, &moved, &specs)).await;
        let found = match found {
            Ok(Ok(found)) => found,
            Ok(Err(error)) => {
                tracing::error!(%error, "reading the environments of the moved branches");
                return;
            }
            Err(error) => {
                tracing::error!(%error, "the identity check failed");
                return;
            }
        };
        for (name, branch, tip, refusal) in found.into_iter().filter(|f| shared.owns(&f.0)) {
            let message = format!(
                "{} on branch {branch}: {}",
                tip.short(),
                refusal.reason(trust)
            );
            let alert = Alert::new(AlertKind::ConfigError, &name, tip.as_str(), message);
            let refused = steps::refuse(shared, &tip, RunKind::Preview, None, alert).await;
            if let Err(error) = refused {
                tracing::error!(%error, env = %name, "recording a refused identity change");
            }
        }
    }

    async fn enqueue(
        &self,
        shared: &Arc<Shared>,
        env: &str,
        lane: Lane,
        branch: &str,
        commit: &CommitId,
    ) {
        let key = Key {
            env: env.to_string(),
            lane,
        };
        if let Some(superseded) = shared.scheduler.enqueue(shared, &key, branch, commit) {
            let kind = match lane {
                Lane::Merged => RunKind::Plan,
                Lane::Preview => RunKind::Preview,
            };
            let recorded = shared
                .record(Outcome::for_commit(env, &superseded).decided(
                    kind,
                    RunResult::Superseded,
                    format!("{} arrived before this commit ran", commit.short()),
                ))
                .await;
            match recorded {
                Ok(run_id) => {
                    let run_id = run_id.unwrap_or_default();
                    let superseded = CommitId::from_hex(&superseded);
                    let span = steps::run_span(env, lane, &superseded, run_id);
                    let _enter = span.enter();
                    tracing::info!(by = %commit.short(), "superseded by a newer commit");
                }
                Err(error) => tracing::error!(%error, env, "recording a superseded commit"),
            }
        }
    }
}

/// The environments among `moved` that may be passed over — idle, with a last applied
/// commit whose closure is known — and their workers' turns, taken.
fn candidates(
    shared: &Shared,
    moved: &[HeadRow],
    rows: &HashMap<String, EnvironmentRow>,
) -> (
    HashMap<String, tokio::sync::OwnedMutexGuard<()>>,
    Vec<Candidate>,
) {
    let mut turns = HashMap::new();
    let mut candidates = Vec::new();
    for head in moved {
        let Some(row) = rows.get(&head.env) else {
            continue;
        };
        let (Some(last), Some(inputs)) = (&row.last_applied, row.applied_inputs.clone()) else {
            continue;
        };
        if row.applied_fingerprint.is_none() {
            continue;
        }
        let Some(turn) = shared.scheduler.idle_turn(&Key::merged(&head.env)) else {
            continue;
        };
        turns.insert(head.env.clone(), turn);
        candidates.push(Candidate {
            env: head.env.clone(),
            last_applied: CommitId::from_hex(last),
            head: CommitId::from_hex(&head.head),
            inputs,
        });
    }
    (turns, candidates)
}

/// A moved branch: its name, its new tip and the tip it moved from.
type MovedBranch = (String, CommitId, Option<CommitId>);

/// An environment's identity changed by a commit of another environment's branch: the
/// environment, the branch, the commit and why it is refused.
type IdentityChange = (String, String, CommitId, crate::engine::RunRefusal);

/// The identity changes the `moved` branches bring to environments whose branch they are
/// not (read from the mirror; call it on a blocking thread).
fn identity_changes(
    mirror: &std::path::Path,
    moved: &[MovedBranch],
    specs: &BTreeMap<String, EnvironmentSpec>,
) -> Result<Vec<IdentityChange>, git::GitError> {
    let repo = git::open(mirror)?;
    let mut found = Vec::new();
    for (branch, tip, before) in moved {
        for (name, trusted) in specs {
            if trusted.branch.as_str() == branch {
                continue;
            }
            let path = format!("environments/{name}/karrots.yaml");
            let Some(text) = git::read_file(&repo, tip, &path)? else {
                continue;
            };
            // Only the push that brings the change is refused: a branch that merely lags
            // behind a change of the trust branch is not an attempt.
            if let Some(before) = before
                && git::read_file(&repo, before, &path)?.as_deref() == Some(text.as_str())
            {
                continue;
            }
            let Ok(candidate) = parse_environment(&text, path.as_ref(), name) else {
                continue;
            };
            // The rule every other commit is judged by, for a commit of another
            // environment's branch: never on this one's branch, so never merged.
            if let Err(refusal) = crate::engine::decide_lane(Some(trusted), &candidate, false) {
                found.push((name.clone(), branch.clone(), tip.clone(), refusal));
            }
        }
    }
    Ok(found)
}

/// An environment whose new head may pass it over: what [`untouched`] compares.
struct Candidate {
    env: String,
    last_applied: CommitId,
    head: CommitId,
    /// The input closure of `last_applied`.
    inputs: BTreeSet<RepoPath>,
}

/// Environments their new head passes over, with the outcome to record for each (none when
/// the head is already the last applied commit).
type PassedOver = Vec<(String, Option<Outcome>)>;

/// The candidates whose head is their last applied commit, or descends from it without
/// touching their input closure, with that head and closure. Each pair of commits is
/// compared once, in one open of the mirror: a thousand environments applied at the same
/// commit cost one diff.
fn untouched(
    mirror: &std::path::Path,
    candidates: Vec<Candidate>,
) -> Result<(Untouched, ChangedPaths), git::GitError> {
    let repo = git::open(mirror)?;
    let mut changes = ChangedPaths::new();
    let mut untouched = Vec::new();
    for candidate in candidates {
        let key = (candidate.last_applied, candidate.head);
        if !changes.contains_key(&key) {
            let changed = git::mirror::changes_since(&repo, &key.0, &key.1)?;
            changes.insert(key.clone(), changed);
        }
        if let Some(changed) = &changes[&key]
            && !touches_inputs(changed, &candidate.inputs)
        {
            untouched.push((candidate.env, key.1, candidate.inputs));
        }
    }
    Ok((untouched, changes))
}

/// Environments their head passes over: name, head, the last applied input closure.
type Untouched = Vec<(String, CommitId, BTreeSet<RepoPath>)>;

/// A trust-branch `karrots.yaml`, parsed (shared between the cache and a poll's reading).
type ParsedSpec = Arc<Result<EnvironmentSpec, crate::problem::Problems>>;

type TrustedSpecs = Vec<(String, ParsedSpec)>;

/// What the trust branch's environments were at the last reading.
#[derive(Default)]
struct SpecCache {
    /// The `environments/` tree read last (none: the branch had no such folder), and the
    /// environments it held: a trust-branch head whose `environments/` tree is the same
    /// (a commit to a module) is not read again, however many environments there are.
    folder: Option<(Option<git2::Oid>, TrustedSpecs)>,
    /// Parsed files by environment and blob id: a file that did not change between two
    /// readings is not parsed again.
    files: HashMap<(String, git2::Oid), ParsedSpec>,
}

/// Every environment's `karrots.yaml` on the trust branch tip, and the cache to keep.
async fn read_trusted(
    shared: &Arc<Shared>,
    trust_tip: &CommitId,
    mut cache: SpecCache,
) -> Result<(TrustedSpecs, SpecCache), crate::git::GitError> {
    let mirror = shared.mirror.path().to_path_buf();
    let tip = trust_tip.clone();
    tokio::task::spawn_blocking(move || {
        let repo = git::open(&mirror)?;
        let folder = git::mirror::environments_folder(&repo, &tip)?;
        if let Some((last, specs)) = &cache.folder
            && *last == folder
        {
            let specs = specs.clone();
            return Ok((specs, cache));
        }
        let files = match folder {
            Some(folder) => git::mirror::environment_files(&repo, &tip, folder)?,
            None => Vec::new(),
        };
        let mut specs = Vec::new();
        let mut kept = HashMap::new();
        for (name, blob) in files {
            let key = (name.clone(), blob);
            let parsed = match cache.files.remove(&key) {
                Some(parsed) => parsed,
                None => {
                    let path = format!("environments/{name}/karrots.yaml");
                    let blob = repo
                        .find_blob(blob)
                        .map_err(|source| crate::git::read_error(&tip, source))?;
                    let text = String::from_utf8_lossy(blob.content());
                    Arc::new(parse_environment(&text, path.as_ref(), &name))
                }
            };
            kept.insert(key, parsed.clone());
            specs.push((name, parsed));
        }
        cache.files = kept;
        cache.folder = Some((folder, specs.clone()));
        Ok((specs, cache))
    })
    .await
    .map_err(|e| crate::git::GitError::Remote {
        url: "mirror".into(),
        message: e.to_string(),
    })?
}

/// For a `file://` remote, watches its refs so a push wakes the fetch at once rather than at
/// the next poll. `KARROTS_NO_WATCH=1` turns the watch off (a benchmark timing webhooks
/// alone needs that). The watcher lives as long as the returned value.
fn watch_file_remote(shared: &Arc<Shared>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    if std::env::var_os("KARROTS_NO_WATCH").is_some() {
        return None;
    }
    let path = shared.config.repo.file_path()?;
    // A bare repository holds refs/ itself; a working repository in .git/.
    let git_dir = if path.join("refs").is_dir() {
        path
    } else {
        path.join(".git")
    };
    let woken = shared.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|event| !event.kind.is_access()) {
            woken.wake.notify_one();
        }
    })
    .map_err(|error| tracing::warn!(%error, "cannot watch the remote; polling only"))
    .ok()?;
    // refs/ for pushed branches; the git dir itself for packed-refs, which is replaced whole.
    let watched = watcher
        .watch(&git_dir.join("refs"), notify::RecursiveMode::Recursive)
        .and_then(|()| watcher.watch(&git_dir, notify::RecursiveMode::NonRecursive));
    match watched {
        Ok(()) => {
            tracing::info!(remote = %git_dir.display(), "watching the remote's refs: a push is seen at once");
            Some(watcher)
        }
        Err(error) => {
            tracing::warn!(%error, remote = %git_dir.display(), "cannot watch the remote; polling only");
            None
        }
    }
}
