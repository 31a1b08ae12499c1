//! The state of several daemons in one PostgreSQL database (`store: postgres://…`): the same
//! tables as SQLite's, the same one-transaction journal, plus the leases that say which
//! daemon runs which environment.
//!
//! **Fencing.** Every write a daemon makes for an environment (a run started, an outcome
//! journaled, a new head) first updates that environment's lease row where the owner is this
//! daemon and the epoch is the one it took the lease with, in the same transaction. That
//! conditional update locks the row until the transaction ends: a takeover (which raises the
//! epoch) waits for it, and a write after a takeover matches no row and is refused
//! ([`StoreError::NotOwner`]) — a database decision, never a read followed by a write.

use std::collections::{BTreeSet, HashMap};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fallible_iterator::FallibleIterator;
use postgres::{Client, Row, Transaction};

use super::{
    Delivery, DriftRow, EnvironmentRow, HeadRow, Journal, OutboxEntry, OutboxKind, RunRecord,
    RunRow, StateStore, StoreError, Summary, Unrecorded, now_rfc3339, parse_inputs,
};
use crate::config::RepoPath;
use crate::engine::state::{EnvStatus, RunKind};

/// The schema, one migration per version; `karrots_schema` holds the version applied.
const MIGRATIONS: [&str; 1] = ["
CREATE TABLE environments (
    name TEXT PRIMARY KEY,
    branch TEXT NOT NULL,
    head TEXT,
    last_applied TEXT,
    applied_fingerprint TEXT,
    applied_inputs TEXT,
    status TEXT NOT NULL DEFAULT 'in_sync',
    drift_status TEXT NOT NULL DEFAULT 'unchecked',
    drift_checked_at TEXT,
    drift_in_sync_at TEXT,
    drift_resources TEXT NOT NULL DEFAULT '[]',
    drift_message TEXT NOT NULL DEFAULT ''
);
CREATE TABLE runs (
    id BIGSERIAL PRIMARY KEY,
    env TEXT NOT NULL,
    commit_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    result TEXT,
    add_count BIGINT NOT NULL DEFAULT 0,
    change_count BIGINT NOT NULL DEFAULT 0,
    destroy_count BIGINT NOT NULL DEFAULT 0,
    resources TEXT NOT NULL DEFAULT '[]',
    started_at TEXT NOT NULL,
    finished_at TEXT,
    message TEXT NOT NULL DEFAULT '',
    plan_sha256 TEXT,
    approved_by TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX runs_by_env ON runs (env, id);
CREATE INDEX runs_by_commit ON runs (commit_id, kind);
CREATE INDEX runs_open ON runs (env) WHERE finished_at IS NULL;
CREATE TABLE audit (
    id BIGSERIAL PRIMARY KEY,
    at TEXT NOT NULL,
    env TEXT NOT NULL,
    commit_id TEXT NOT NULL,
    decision TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE outbox (
    id BIGSERIAL PRIMARY KEY,
    kind TEXT NOT NULL,
    destination TEXT NOT NULL,
    body TEXT NOT NULL,
    run_id BIGINT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL DEFAULT 0,
    delivered_at TEXT,
    last_error TEXT,
    claimed_by TEXT,
    claimed_until TIMESTAMPTZ
);
CREATE INDEX outbox_due ON outbox (kind, id) WHERE delivered_at IS NULL;
CREATE INDEX outbox_by_destination ON outbox (kind, destination) WHERE delivered_at IS NULL;
CREATE TABLE leases (
    env TEXT PRIMARY KEY,
    owner TEXT,
    epoch BIGINT NOT NULL DEFAULT 0,
    expires_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE daemons (
    id TEXT PRIMARY KEY,
    seen_at TIMESTAMPTZ NOT NULL
);
"];

/// The lease of the repository's own duties, named by no environment (environment names are
/// never empty): alerts of no environment (a fetch that fails), a trust-branch karrots.yaml
/// that does not load, the checks of environments the trust branch does not define. It is
/// kept outside the share of environments, taken by whichever daemon finds it free, so
/// exactly one daemon raises each of these.
pub const REPOSITORY: &str = "";

/// The channel on which a daemon that got a hook tells the others to fetch; the payload is
/// its id.
pub const WAKE_CHANNEL: &str = "karrots_wake";

/// Listens on [`WAKE_CHANNEL`] until `stop` says so, calling `woken` for each notification of
/// another daemon; reconnects after a lost connection (every few seconds).
pub fn listen(target: &PgTarget, owner: &str, woken: &dyn Fn(), stop: &dyn Fn() -> bool) {
    while !stop() {
        let listened = target.connect().and_then(|mut client| {
            client
                .batch_execute(&format!("LISTEN {WAKE_CHANNEL}"))
                .map_err(|e| target.error(e))?;
            while !stop() {
                let mut notifications = client.notifications();
                let mut waiting = notifications.timeout_iter(Duration::from_secs(1));
                while let Some(notification) = waiting.next().map_err(|e| target.error(e))? {
                    if notification.payload() != owner {
                        woken();
                    }
                }
            }
            Ok(())
        });
        if let Err(error) = listened {
            tracing::debug!(%error, "listening for the other daemons' wakes; connecting again");
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}

/// How to reach the database: the URL (no password in it) and where the password comes from.
#[derive(Debug, Clone)]
pub struct PgTarget {
    /// `postgres://user@host:port/db?sslmode=…`, as written (it holds no password).
    pub url: String,
    /// Read at each connection, so a rotated password needs no restart.
    pub password_file: Option<std::path::PathBuf>,
    /// A CA (PEM) trusted besides the system's, read at each connection.
    pub ca_file: Option<std::path::PathBuf>,
    /// The lease length, which bounds how long a connection may go silent: see
    /// [`PgTarget::connect`].
    pub lease: Duration,
}

impl PgTarget {
    /// A new connection: the password from the file, else `PGPASSWORD`; TLS as `sslmode`
    /// says, trusting the system's CAs.
    ///
    /// A daemon cut off from the database in the middle of a transaction must not keep the
    /// rows it locked — its lease row among them, which a takeover waits for — until the
    /// server notices the connection is dead, hours later with the usual keepalive settings:
    /// the server ends a session of ours idle in a transaction for half a lease. Our own side
    /// gives up on a connection whose data goes unacknowledged for a lease, and probes an
    /// idle one every third of a lease.
    pub fn connect(&self) -> Result<Client, StoreError> {
        let mut config =
            postgres::Config::from_str(&self.url).map_err(|source| self.error(source))?;
        let password = match &self.password_file {
            Some(file) => Some(
                std::fs::read_to_string(file)
                    .map_err(|error| StoreError::Password {
                        file: file.display().to_string(),
                        message: error.to_string(),
                    })?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
            ),
            None => std::env::var("PGPASSWORD").ok(),
        };
        if let Some(password) = password {
            config.password(password);
        }
        config.connect_timeout(Duration::from_secs(10));
        config.application_name("karrots");
        let idle_ms = (self.lease / 2).as_millis();
        let options = match config.get_options() {
            Some(given) => format!("{given} -c idle_in_transaction_session_timeout={idle_ms}"),
            None => format!("-c idle_in_transaction_session_timeout={idle_ms}"),
        };
        config.options(&options);
        config.tcp_user_timeout(self.lease);
        config.keepalives(true);
        config.keepalives_idle(self.lease / 3);
        config.keepalives_interval(Duration::from_secs(1));
        let tls = tls(self.ca_file.as_deref())?;
        config.connect(tls).map_err(|source| self.error(source))
    }

    pub(crate) fn error(&self, source: postgres::Error) -> StoreError {
        StoreError::Postgres {
            url: self.url.clone(),
            source,
        }
    }
}

/// rustls on aws-lc-rs with the system's CAs and `ca_file`'s: `sslmode=require` (and
/// `prefer`, when the server offers it) verify the server's certificate and name.
fn tls(
    ca_file: Option<&std::path::Path>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for certificate in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(certificate);
    }
    if let Some(file) = ca_file {
        let problem = |message: String| StoreError::CaFile {
            file: file.display().to_string(),
            message,
        };
        let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(file)
            .and_then(|certificates| certificates.collect::<Result<_, _>>())
            .map_err(|e| problem(e.to_string()))?;
        if certificates.is_empty() {
            return Err(problem("holds no PEM certificate".into()));
        }
        for certificate in certificates {
            roots
                .add(certificate)
                .map_err(|e| problem(format!("a certificate rustls refuses: {e}")))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|builder| builder.with_root_certificates(roots).with_no_client_auth())
        .unwrap_or_else(|_| unreachable!("aws-lc-rs supports the default protocol versions"));
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// The environments this daemon holds: the epoch of each lease (what its writes are fenced
/// with) and until when, by this machine's clock, it may start terraform for it. Shared by
/// the store, the lease keeper and the workers.
#[derive(Debug, Default)]
pub struct Held(Mutex<HashMap<String, (i64, Instant)>>);

impl Held {
    pub fn epoch(&self, env: &str) -> Option<i64> {
        Some(self.0.lock().ok()?.get(env)?.0)
    }

    /// Whether terraform may start for `env` now: its lease was renewed recently enough that
    /// it cannot expire before the margin the keeper keeps.
    pub fn may_run(&self, env: &str) -> bool {
        self.0
            .lock()
            .ok()
            .and_then(|held| held.get(env).map(|(_, until)| Instant::now() < *until))
            .unwrap_or(false)
    }

    pub fn environments(&self) -> Vec<String> {
        let mut held: Vec<String> = self
            .0
            .lock()
            .map(|held| held.keys().cloned().collect())
            .unwrap_or_default();
        held.sort();
        held
    }

    /// Replaces what is held with `leases` (env → epoch), valid until `until`; returns the
    /// environments gained and lost.
    fn replace(&self, leases: &HashMap<String, i64>, until: Instant) -> (Vec<String>, Vec<String>) {
        let Ok(mut held) = self.0.lock() else {
            return (Vec::new(), Vec::new());
        };
        let mut gained: Vec<String> = leases
            .iter()
            .filter(|(env, epoch)| held.get(*env).map(|(e, _)| e) != Some(*epoch))
            .map(|(env, _)| env.clone())
            .collect();
        let mut lost: Vec<String> = held
            .keys()
            .filter(|env| !leases.contains_key(*env))
            .cloned()
            .collect();
        *held = leases
            .iter()
            .map(|(env, epoch)| (env.clone(), (*epoch, until)))
            .collect();
        gained.sort();
        lost.sort();
        (gained, lost)
    }

    /// Lets nothing start any more for what is held, until the next renewal (the database
    /// cannot be reached, or does not answer, to renew). The epochs stay: a late write
    /// still carries them, for the database to judge.
    pub fn expire(&self) {
        if let Ok(mut held) = self.0.lock() {
            let now = Instant::now();
            for (_, until) in held.values_mut() {
                *until = (*until).min(now);
            }
        }
    }
}

/// What one round of the lease keeper changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LeaseRound {
    /// Environments this daemon now holds that it did not (a new lease or a takeover).
    pub gained: Vec<String>,
    /// Environments it held and no longer does.
    pub lost: Vec<String>,
    /// Daemons seen alive, this one included.
    pub daemons: usize,
}

/// Takes, renews, balances and releases this daemon's leases, on a connection of its own.
pub struct Leases {
    target: PgTarget,
    owner: String,
    held: Arc<Held>,
    lease: Duration,
    client: Option<Client>,
}

impl Leases {
    pub fn new(target: PgTarget, owner: &str, held: Arc<Held>, lease: Duration) -> Leases {
        Leases {
            target,
            owner: owner.to_string(),
            held,
            lease,
            client: None,
        }
    }

    /// How often [`Leases::round`] runs: three times per lease.
    pub fn interval(&self) -> Duration {
        self.lease / 3
    }

    /// One round, for the environments of the trust branch: says this daemon is alive,
    /// renews what it holds, releases what is over its share (of those `busy` says are
    /// idle), and takes free or expired leases up to its share (`ceil(environments /
    /// daemons alive)`); the [`REPOSITORY`] lease, outside the share, whenever it is free. Terraform may start for a held environment until a third of the
    /// lease before it could expire, counted from the start of the round. When the database
    /// cannot be reached, nothing may start any more.
    pub fn round(
        &mut self,
        environments: &[String],
        busy: &dyn Fn(&str) -> bool,
    ) -> Result<LeaseRound, StoreError> {
        let started = Instant::now();
        let mut done = self.round_at(environments, busy);
        // Chosen as a deadlock's victim, or a serialization failure: the round is tried
        // again at once rather than counted as a database out of reach.
        if done.as_ref().is_err_and(StoreError::is_transient) {
            done = self.round_at(environments, busy);
        }
        match done {
            Ok((leases, daemons)) => {
                let until = started + self.lease - self.lease / 3;
                let (gained, lost) = self.held.replace(&leases, until);
                Ok(LeaseRound {
                    gained,
                    lost,
                    daemons,
                })
            }
            Err(error) => {
                self.client = None;
                self.held.expire();
                Err(error)
            }
        }
    }

    fn round_at(
        &mut self,
        environments: &[String],
        busy: &dyn Fn(&str) -> bool,
    ) -> Result<(HashMap<String, i64>, usize), StoreError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = Some(self.target.connect()?);
        }
        let client = self.client.as_mut().expect("connected above");
        let target = &self.target;
        let pg = |e| target.error(e);
        let seconds = self.lease.as_secs_f64();
        let owner = &self.owner;
        client
            .execute(
                "INSERT INTO daemons (id, seen_at) VALUES ($1, now())
                 ON CONFLICT (id) DO UPDATE SET seen_at = now()",
                &[owner],
            )
            .map_err(pg)?;
        let daemons: i64 = client
            .query_one(
                "SELECT count(*) FROM daemons WHERE seen_at > now() - make_interval(secs => $1)",
                &[&seconds],
            )
            .map_err(pg)?
            .get(0);
        let daemons = usize::try_from(daemons).unwrap_or(1).max(1);
        client
            .execute(
                "INSERT INTO leases (env) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
                &[&environments],
            )
            .map_err(pg)?;
        // Rows are locked in the order of their names, here and in every write that fences
        // several environments ([`PgStore::fence_all`]): the keeper's renewal and the same
        // daemon's writes, on two connections, never wait for each other in a cycle.
        let mut leases: HashMap<String, i64> = client
            .query(
                "UPDATE leases SET expires_at = now() + make_interval(secs => $2)
                 WHERE env IN (
                    SELECT env FROM leases WHERE owner = $1 AND env = ANY($3)
                    ORDER BY env FOR UPDATE)
                 RETURNING env, epoch",
                &[owner, &seconds, &environments],
            )
            .map_err(pg)?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        // The repository lease is taken by whoever finds it free, outside the share.
        if !leases.contains_key(REPOSITORY) {
            let taken = client
                .query(
                    "UPDATE leases SET owner = $1, epoch = epoch + 1,
                        expires_at = now() + make_interval(secs => $2)
                     WHERE env = $3 AND (owner IS NULL OR expires_at < now())
                     RETURNING env, epoch",
                    &[owner, &seconds, &REPOSITORY],
                )
                .map_err(pg)?;
            leases.extend(taken.iter().map(|row| (row.get(0), row.get(1))));
        }
        let counted = |env: &&String| env.as_str() != REPOSITORY;
        let share = environments
            .iter()
            .filter(counted)
            .count()
            .div_ceil(daemons);
        let held = leases.keys().filter(counted).count();
        if held > share {
            let mut idle: Vec<&String> = leases
                .keys()
                .filter(counted)
                .filter(|env| !busy(env))
                .collect();
            idle.sort();
            let excess: Vec<String> = idle.into_iter().take(held - share).cloned().collect();
            client
                .execute(
                    "UPDATE leases SET owner = NULL, expires_at = now()
                     WHERE env IN (
                        SELECT env FROM leases WHERE owner = $1 AND env = ANY($2)
                        ORDER BY env FOR UPDATE)",
                    &[owner, &excess],
                )
                .map_err(pg)?;
            for env in &excess {
                leases.remove(env);
            }
        } else if held < share {
            let wanted = i64::try_from(share - held).unwrap_or(0);
            let taken = client
                .query(
                    "UPDATE leases SET owner = $1, epoch = epoch + 1,
                        expires_at = now() + make_interval(secs => $2)
                     WHERE env IN (
                        SELECT env FROM leases
                        WHERE env = ANY($3) AND env <> $5 AND (owner IS NULL OR expires_at < now())
                        ORDER BY env LIMIT $4
                        FOR UPDATE SKIP LOCKED)
                     RETURNING env, epoch",
                    &[owner, &seconds, &environments, &wanted, &REPOSITORY],
                )
                .map_err(pg)?;
            leases.extend(taken.iter().map(|row| (row.get(0), row.get(1))));
        }
        Ok((leases, daemons))
    }

    /// Gives every lease up (a clean stop): the others take them without waiting for expiry.
    pub fn release_all(&mut self) {
        if let Some(client) = self.client.as_mut() {
            let _ = client.execute(
                "UPDATE leases SET owner = NULL, expires_at = now() WHERE owner = $1",
                &[&self.owner],
            );
            let _ = client.execute("DELETE FROM daemons WHERE id = $1", &[&self.owner]);
        }
        self.held.replace(&HashMap::new(), Instant::now());
    }
}

/// The PostgreSQL store of one daemon (`owner`).
pub struct PgStore {
    target: PgTarget,
    owner: String,
    held: Arc<Held>,
    /// One connection, opened again after it breaks.
    client: Mutex<Option<Client>>,
    unrecorded: Unrecorded,
}

impl PgStore {
    /// Connects, and brings the schema up to date (one daemon at a time, under an advisory
    /// lock); a schema newer than this binary is refused.
    pub fn open(target: PgTarget, owner: &str, held: Arc<Held>) -> Result<PgStore, StoreError> {
        let mut client = target.connect()?;
        migrate(&mut client, &target)?;
        Ok(PgStore {
            target,
            owner: owner.to_string(),
            held,
            client: Mutex::new(Some(client)),
            unrecorded: Unrecorded::default(),
        })
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    pub fn held(&self) -> &Arc<Held> {
        &self.held
    }

    /// Runs `work` on the connection, connecting first when there is none (or it broke).
    fn with<T>(
        &self,
        work: impl FnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut slot = self
            .client
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = Some(self.target.connect()?);
        }
        let client = slot.as_mut().expect("connected above");
        let done = work(client);
        if client.is_closed() {
            *slot = None;
        }
        done
    }

    /// Runs `work` in one transaction, committed when it succeeds.
    fn transaction<T>(
        &self,
        work: impl FnOnce(&mut Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let target = &self.target;
        self.with(|client| {
            let mut transaction = client.transaction().map_err(|e| target.error(e))?;
            let done = work(&mut transaction)?;
            transaction.commit().map_err(|e| target.error(e))?;
            Ok(done)
        })
    }

    /// Inside a write for `env`: holds its lease row at this daemon's epoch until the
    /// transaction ends, or refuses the write. A write for an environment no daemon holds
    /// (one the trust branch does not define, or whose karrots.yaml does not load) is the
    /// holder of the [`REPOSITORY`] lease's, while that stays so: the environment's row, if
    /// any, is locked, so a daemon taking it over waits for this write to commit.
    fn fence(&self, transaction: &mut Transaction<'_>, env: &str) -> Result<(), StoreError> {
        let not_owner = || StoreError::NotOwner {
            env: env.to_string(),
        };
        let pg = |e| self.target.error(e);
        let (lease, epoch) = match self.held.epoch(env) {
            Some(epoch) => (env, epoch),
            None => {
                let epoch = self.held.epoch(REPOSITORY).ok_or_else(not_owner)?;
                let rows = transaction
                    .query(
                        "SELECT owner IS NOT NULL AND expires_at >= now() FROM leases WHERE env = $1 FOR SHARE",
                        &[&env],
                    )
                    .map_err(pg)?;
                if rows.iter().any(|row| row.get::<_, bool>(0)) {
                    return Err(not_owner());
                }
                (REPOSITORY, epoch)
            }
        };
        let held = transaction
            .execute(
                "UPDATE leases SET epoch = epoch WHERE env = $1 AND owner = $2 AND epoch = $3",
                &[&lease, &self.owner, &epoch],
            )
            .map_err(pg)?;
        if held == 1 { Ok(()) } else { Err(not_owner()) }
    }

    /// Fences each of `envs` in the order of their names, before a write that touches
    /// several: two transactions that lock the same lease rows lock them in one order. The
    /// writes after it in the transaction need no fence of their own.
    fn fence_all<'a>(
        &self,
        transaction: &mut Transaction<'_>,
        envs: impl Iterator<Item = &'a str>,
    ) -> Result<(), StoreError> {
        let envs: BTreeSet<&str> = envs.collect();
        envs.into_iter()
            .try_for_each(|env| self.fence(transaction, env))
    }

    /// Writes one outcome; the caller has fenced its environment (an alert of no
    /// environment, such as a fetch that fails, by the repository lease: the empty name).
    fn write_journal(
        &self,
        transaction: &mut Transaction<'_>,
        entry: &Journal,
        now: &str,
    ) -> Result<Option<i64>, StoreError> {
        let pg = |e| self.target.error(e);
        let env = entry.env.as_str();
        let run =
            match &entry.run {
                Some(RunRecord::Finish {
                    id,
                    result,
                    summary,
                    resources,
                    message,
                }) => {
                    let resources =
                        serde_json::to_string(resources).unwrap_or_else(|_| "[]".into());
                    transaction
                        .execute(
                            "UPDATE runs SET result = $2, add_count = $3, change_count = $4,
                         destroy_count = $5, resources = $6, finished_at = $7, message = $8
                         WHERE id = $1",
                            &[
                                id,
                                &result.as_str(),
                                &(summary.add as i64),
                                &(summary.change as i64),
                                &(summary.destroy as i64),
                                &resources,
                                &now,
                                message,
                            ],
                        )
                        .map_err(pg)?;
                    Some(*id)
                }
                Some(RunRecord::Decided {
                    kind,
                    result,
                    message,
                }) => {
                    let row = transaction
                    .query_one(
                        "INSERT INTO runs (env, commit_id, kind, result, started_at, finished_at,
                         message) VALUES ($1, $2, $3, $4, $5, $5, $6) RETURNING id",
                        &[&env, &entry.commit, &kind.as_str(), &result.as_str(), &now, message],
                    )
                    .map_err(pg)?;
                    Some(row.get(0))
                }
                None => None,
            };
        if let Some(id) = run {
            if let Some(sha256) = &entry.plan_sha256 {
                transaction
                    .execute(
                        "UPDATE runs SET plan_sha256 = $2 WHERE id = $1",
                        &[&id, sha256],
                    )
                    .map_err(pg)?;
            }
            if !entry.approved_by.is_empty() {
                let approvals =
                    serde_json::to_string(&entry.approved_by).unwrap_or_else(|_| "[]".into());
                transaction
                    .execute(
                        "UPDATE runs SET approved_by = $2 WHERE id = $1",
                        &[&id, &approvals],
                    )
                    .map_err(pg)?;
            }
        }
        if let Some(status) = entry.status {
            transaction
                .execute(
                    "UPDATE environments SET status = $2 WHERE name = $1",
                    &[&env, &status.as_str()],
                )
                .map_err(pg)?;
        }
        if let Some(applied) = &entry.last_applied {
            let inputs: Vec<&str> = applied.inputs.iter().map(RepoPath::as_str).collect();
            let inputs = serde_json::to_string(&inputs).unwrap_or_else(|_| "[]".into());
            transaction
                .execute(
                    "UPDATE environments SET last_applied = $2, applied_fingerprint = $3,
                     applied_inputs = $4 WHERE name = $1",
                    &[&env, &entry.commit, &applied.fingerprint, &inputs],
                )
                .map_err(pg)?;
        }
        if let Some(drift) = &entry.drift {
            let resources = serde_json::to_string(&drift.resources).unwrap_or_else(|_| "[]".into());
            transaction
                .execute(
                    "UPDATE environments SET drift_status = $2, drift_checked_at = $3,
                     drift_in_sync_at = $4, drift_resources = $5, drift_message = $6
                     WHERE name = $1",
                    &[
                        &env,
                        &drift.status.as_str(),
                        &drift.checked_at,
                        &drift.in_sync_at,
                        &resources,
                        &drift.message,
                    ],
                )
                .map_err(pg)?;
        }
        if let Some((decision, detail)) = &entry.audit {
            transaction
                .execute(
                    "INSERT INTO audit (at, env, commit_id, decision, detail)
                     VALUES ($1, $2, $3, $4, $5)",
                    &[&now, &env, &entry.commit, decision, detail],
                )
                .map_err(pg)?;
        }
        self.write_outbox(transaction, &entry.outbox, run, now)?;
        Ok(run)
    }

    fn write_outbox(
        &self,
        transaction: &mut Transaction<'_>,
        outbox: &[Delivery],
        run: Option<i64>,
        now: &str,
    ) -> Result<(), StoreError> {
        let pg = |e| self.target.error(e);
        for delivery in outbox {
            let kind = delivery.kind.as_str();
            if delivery.kind.superseding() {
                transaction
                    .execute(
                        "UPDATE outbox SET delivered_at = $3, last_error = 'superseded'
                         WHERE kind = $1 AND destination = $2 AND delivered_at IS NULL",
                        &[&kind, &delivery.destination, &now],
                    )
                    .map_err(pg)?;
            }
            transaction
                .execute(
                    "INSERT INTO outbox (kind, destination, body, run_id) VALUES ($1, $2, $3, $4)",
                    &[&kind, &delivery.destination, &delivery.body, &run],
                )
                .map_err(pg)?;
        }
        Ok(())
    }

    /// Writes new heads; the caller has fenced their environments.
    fn write_heads(
        &self,
        transaction: &mut Transaction<'_>,
        heads: &[HeadRow],
    ) -> Result<(), StoreError> {
        for head in heads {
            transaction
                .execute(
                    "INSERT INTO environments (name, branch, head, status) VALUES ($1, $2, $3, 'planning')
                     ON CONFLICT (name) DO UPDATE SET branch = $2, head = $3",
                    &[&head.env, &head.branch, &head.head],
                )
                .map_err(|e| self.target.error(e))?;
        }
        Ok(())
    }

    /// Holds a status the database refused in memory — unless it was refused because another
    /// daemon holds the environment now: that status is not this daemon's to show.
    fn remember<T>(&self, env: &str, status: EnvStatus, written: &Result<T, StoreError>) {
        let forget = match written {
            Ok(_) => true,
            Err(error) => error.is_fenced(),
        };
        self.unrecorded.remember(env, status, forget);
    }

    fn write_status(&self, name: &str, status: EnvStatus) -> Result<(), StoreError> {
        self.transaction(|transaction| {
            self.fence(transaction, name)?;
            transaction
                .execute(
                    "UPDATE environments SET status = $2 WHERE name = $1",
                    &[&name, &status.as_str()],
                )
                .map(drop)
                .map_err(|e| self.target.error(e))
        })
    }

    fn runs_where(
        &self,
        condition: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Vec<RunRow>, StoreError> {
        self.with(|client| {
            let rows = client
                .query(
                    &format!("SELECT {RUN_COLUMNS} FROM runs {condition}"),
                    params,
                )
                .map_err(|e| self.target.error(e))?;
            rows.iter().map(run_row).collect()
        })
    }
}

/// Applies the migrations this database lacks, under an advisory lock so that daemons
/// starting together migrate once.
fn migrate(client: &mut Client, target: &PgTarget) -> Result<(), StoreError> {
    let pg = |e| target.error(e);
    let mut transaction = client.transaction().map_err(pg)?;
    transaction
        .batch_execute(
            "SELECT pg_advisory_xact_lock(7242);
             CREATE TABLE IF NOT EXISTS karrots_schema (version INTEGER NOT NULL);",
        )
        .map_err(pg)?;
    let version: i32 = transaction
        .query_opt("SELECT version FROM karrots_schema", &[])
        .map_err(pg)?
        .map_or(0, |row| row.get(0));
    let version = usize::try_from(version).unwrap_or_default();
    if version > MIGRATIONS.len() {
        return Err(StoreError::Newer {
            path: target.url.clone(),
            found: version,
            known: MIGRATIONS.len(),
        });
    }
    for migration in MIGRATIONS.iter().skip(version) {
        transaction.batch_execute(migration).map_err(pg)?;
    }
    let now = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
    transaction
        .execute("DELETE FROM karrots_schema", &[])
        .and_then(|_| {
            transaction.execute("INSERT INTO karrots_schema (version) VALUES ($1)", &[&now])
        })
        .map_err(pg)?;
    transaction.commit().map_err(pg)
}

const RUN_COLUMNS: &str = "id, env, commit_id, kind, result, add_count, change_count, destroy_count, resources, started_at, finished_at, message, plan_sha256, approved_by";

const ENVIRONMENT_COLUMNS: &str =
    "name, branch, head, last_applied, applied_fingerprint, status, applied_inputs";

/// A column that names a state (`in_sync`, `plan`): one this binary does not know is an error.
fn named<T: FromStr>(row: &Row, index: usize) -> Result<T, StoreError> {
    let text: String = row.get(index);
    text.parse().map_err(|_| StoreError::Column {
        column: row.columns()[index].name().to_string(),
        message: format!("{text:?} is no value this karrots knows"),
    })
}

fn json<T: serde::de::DeserializeOwned>(row: &Row, index: usize) -> Result<T, StoreError> {
    let text: String = row.get(index);
    serde_json::from_str(&text).map_err(|error| StoreError::Column {
        column: row.columns()[index].name().to_string(),
        message: format!("{text:?} does not parse: {error}"),
    })
}

fn run_row(row: &Row) -> Result<RunRow, StoreError> {
    let count = |index: usize| usize::try_from(row.get::<_, i64>(index)).unwrap_or_default();
    Ok(RunRow {
        id: row.get(0),
        env: row.get(1),
        commit: row.get(2),
        kind: named(row, 3)?,
        result: match row.get::<_, Option<String>>(4) {
            Some(_) => Some(named(row, 4)?),
            None => None,
        },
        summary: Summary {
            add: count(5),
            change: count(6),
            destroy: count(7),
        },
        resources: json(row, 8)?,
        started_at: row.get(9),
        finished_at: row.get(10),
        message: row.get(11),
        plan_sha256: row.get(12),
        approved_by: json(row, 13)?,
    })
}

fn environment_row(row: &Row) -> Result<EnvironmentRow, StoreError> {
    Ok(EnvironmentRow {
        name: row.get(0),
        branch: row.get(1),
        head: row.get(2),
        last_applied: row.get(3),
        applied_fingerprint: row.get(4),
        status: named(row, 5)?,
        applied_inputs: row
            .get::<_, Option<String>>(6)
            .map(|text| parse_inputs(&text))
            .transpose()
            .map_err(|message| StoreError::Column {
                column: "applied_inputs".into(),
                message,
            })?,
    })
}

impl StateStore for PgStore {
    fn environments(&self) -> Result<Vec<EnvironmentRow>, StoreError> {
        let rows = self.with(|client| {
            let rows = client
                .query(
                    &format!("SELECT {ENVIRONMENT_COLUMNS} FROM environments ORDER BY name"),
                    &[],
                )
                .map_err(|e| self.target.error(e))?;
            rows.iter()
                .map(environment_row)
                .collect::<Result<Vec<_>, _>>()
        })?;
        Ok(rows
            .into_iter()
            .map(|row| self.unrecorded.shown(row))
            .collect())
    }

    fn environment(&self, name: &str) -> Result<Option<EnvironmentRow>, StoreError> {
        let row = self.with(|client| {
            let row = client
                .query_opt(
                    &format!("SELECT {ENVIRONMENT_COLUMNS} FROM environments WHERE name = $1"),
                    &[&name],
                )
                .map_err(|e| self.target.error(e))?;
            row.as_ref().map(environment_row).transpose()
        })?;
        Ok(row.map(|row| self.unrecorded.shown(row)))
    }

    fn record_heads(&self, heads: &[HeadRow]) -> Result<(), StoreError> {
        self.transaction(|transaction| {
            self.fence_all(transaction, heads.iter().map(|head| head.env.as_str()))?;
            self.write_heads(transaction, heads)
        })
    }

    fn journal(&self, entry: &Journal) -> Result<Option<i64>, StoreError> {
        let written = self.transaction(|transaction| {
            self.fence(transaction, &entry.env)?;
            self.write_journal(transaction, entry, &now_rfc3339())
        });
        if let Some(status) = entry.status {
            self.remember(&entry.env, status, &written);
        }
        written
    }

    fn journal_all(
        &self,
        heads: &[HeadRow],
        entries: &[Journal],
    ) -> Result<Vec<Option<i64>>, StoreError> {
        let written = self.transaction(|transaction| {
            let envs = heads.iter().map(|head| head.env.as_str());
            self.fence_all(
                transaction,
                envs.chain(entries.iter().map(|e| e.env.as_str())),
            )?;
            self.write_heads(transaction, heads)?;
            let now = now_rfc3339();
            entries
                .iter()
                .map(|entry| self.write_journal(transaction, entry, &now))
                .collect()
        });
        for entry in entries {
            if let Some(status) = entry.status {
                self.remember(&entry.env, status, &written);
            }
        }
        written
    }

    fn announce(&self) {
        let sent = self.with(|client| {
            client
                .execute("SELECT pg_notify($1, $2)", &[&WAKE_CHANNEL, &self.owner])
                .map(drop)
                .map_err(|e| self.target.error(e))
        });
        if let Err(error) = sent {
            tracing::warn!(%error, "telling the other daemons to fetch");
        }
    }

    fn record_pending(&self) {
        self.unrecorded
            .write_again(|name, status| self.write_status(name, status));
    }

    fn drift(&self, name: &str) -> Result<DriftRow, StoreError> {
        self.with(|client| {
            let row = client
                .query_opt(
                    "SELECT drift_status, drift_checked_at, drift_in_sync_at, drift_resources, drift_message
                     FROM environments WHERE name = $1",
                    &[&name],
                )
                .map_err(|e| self.target.error(e))?;
            let Some(row) = row else {
                return Ok(DriftRow::default());
            };
            Ok(DriftRow {
                status: named(&row, 0)?,
                checked_at: row.get(1),
                in_sync_at: row.get(2),
                resources: json(&row, 3)?,
                message: row.get(4),
            })
        })
    }

    fn start_run(
        &self,
        env: &str,
        commit: &str,
        kind: RunKind,
        status: Option<EnvStatus>,
        outbox: &[Delivery],
    ) -> Result<i64, StoreError> {
        let started = self.transaction(|transaction| {
            self.fence(transaction, env)?;
            let now = now_rfc3339();
            let pg = |e| self.target.error(e);
            let id: i64 = transaction
                .query_one(
                    "INSERT INTO runs (env, commit_id, kind, started_at) VALUES ($1, $2, $3, $4)
                     RETURNING id",
                    &[&env, &commit, &kind.as_str(), &now],
                )
                .map_err(pg)?
                .get(0);
            if let Some(status) = status {
                transaction
                    .execute(
                        "UPDATE environments SET status = $2 WHERE name = $1",
                        &[&env, &status.as_str()],
                    )
                    .map_err(pg)?;
            }
            self.write_outbox(transaction, outbox, Some(id), &now)?;
            Ok(id)
        });
        if let Some(status) = status {
            self.remember(env, status, &started);
        }
        started
    }

    fn runs(&self, env: Option<&str>, limit: usize) -> Result<Vec<RunRow>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        match env {
            Some(env) => {
                self.runs_where("WHERE env = $1 ORDER BY id DESC LIMIT $2", &[&env, &limit])
            }
            None => self.runs_where("ORDER BY id DESC LIMIT $1", &[&limit]),
        }
    }

    fn run(&self, id: i64) -> Result<Option<RunRow>, StoreError> {
        Ok(self.runs_where("WHERE id = $1", &[&id])?.into_iter().next())
    }

    fn commit_runs(&self, commit: &str, kind: RunKind) -> Result<Vec<RunRow>, StoreError> {
        self.runs_where(
            "WHERE commit_id = $1 AND kind = $2 ORDER BY id",
            &[&commit, &kind.as_str()],
        )
    }

    /// Only the runs of environments this daemon holds: another live daemon's runs are its
    /// own to end.
    fn open_runs(&self) -> Result<Vec<RunRow>, StoreError> {
        let held = self.held.environments();
        self.runs_where(
            "WHERE finished_at IS NULL AND env = ANY($1) ORDER BY id",
            &[&held],
        )
    }

    /// Claims the due deliveries of `kind` for a minute (`FOR UPDATE SKIP LOCKED`): another
    /// daemon takes the rows this one does not, and a row a dead daemon claimed is taken
    /// again once its claim lapses. A row waits while an older one of its destination is
    /// claimed by another daemon, so each destination gets its deliveries in order.
    fn due(&self, kind: OutboxKind, now_unix: i64) -> Result<Vec<OutboxEntry>, StoreError> {
        self.with(|client| {
            let rows = client
                .query(
                    "UPDATE outbox SET claimed_by = $3, claimed_until = now() + interval '60 seconds'
                     WHERE id IN (
                        SELECT id FROM outbox o
                        WHERE kind = $1 AND delivered_at IS NULL AND next_attempt_at <= $2
                          AND (claimed_until IS NULL OR claimed_until < now() OR claimed_by = $3)
                          AND NOT EXISTS (
                              SELECT 1 FROM outbox older
                              WHERE older.kind = o.kind AND older.destination = o.destination
                                AND older.delivered_at IS NULL AND older.id < o.id
                                AND older.claimed_until >= now() AND older.claimed_by <> $3)
                        ORDER BY id LIMIT 100
                        FOR UPDATE SKIP LOCKED)
                     RETURNING id, destination, body, attempts, run_id",
                    &[&kind.as_str(), &now_unix, &self.owner],
                )
                .map_err(|e| self.target.error(e))?;
            let mut due: Vec<OutboxEntry> = rows
                .iter()
                .map(|row| OutboxEntry {
                    id: row.get(0),
                    destination: row.get(1),
                    body: row.get(2),
                    attempts: u32::try_from(row.get::<_, i32>(3)).unwrap_or_default(),
                    run: row.get(4),
                })
                .collect();
            due.sort_by_key(|entry| entry.id);
            Ok(due)
        })
    }

    fn delivered(&self, id: i64) -> Result<(), StoreError> {
        self.with(|client| {
            client
                .execute(
                    "UPDATE outbox SET delivered_at = $2, attempts = attempts + 1,
                     claimed_until = NULL WHERE id = $1",
                    &[&id, &now_rfc3339()],
                )
                .map(drop)
                .map_err(|e| self.target.error(e))
        })
    }

    fn delivery_failed(
        &self,
        id: i64,
        next_attempt_unix: i64,
        error: &str,
    ) -> Result<(), StoreError> {
        self.with(|client| {
            client
                .execute(
                    "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = $2,
                     last_error = $3, claimed_until = NULL WHERE id = $1",
                    &[&id, &next_attempt_unix, &error],
                )
                .map(drop)
                .map_err(|e| self.target.error(e))
        })
    }
}
