//! Everything the daemon remembers, in SQLite under `state_dir` (WAL mode): environments with
//! their last applied commit, runs, the audit log of every decision, and the alert outbox.
//!
//! The daemon talks to it through [`StateStore`], a narrow trait, so a PostgreSQL store for
//! several daemons can take its place. An outcome is one [`Journal`] entry, written in one
//! transaction (run, status, last applied commit, drift, audit entry and outbox rows), so a
//! kill at any moment leaves all of it or none; an apply is recorded as started before
//! terraform runs, which is how a restart finds one that was cut off.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::aws::cloudtrail::ChangedBy;
pub mod postgres;

use crate::config::RepoPath;
pub use crate::engine::state::{DriftStatus, EnvStatus, RunKind, RunResult};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database {path}: {source}")]
    Sqlite {
        path: String,
        source: rusqlite::Error,
    },
    /// A store call's blocking task failed (it panicked, or the runtime is shutting down).
    #[error("a store task failed: {0}")]
    Task(String),
    #[error("state database {url}: {}", with_causes(source))]
    Postgres {
        url: String,
        source: ::postgres::Error,
    },
    #[error("the state database's password file {file}: {message}")]
    Password { file: String, message: String },
    #[error("the state database's CA file {file}: {message}")]
    CaFile { file: String, message: String },
    /// A write for an environment whose lease this daemon no longer holds at its epoch
    /// (another daemon took it over): refused by the database.
    #[error(
        "{}: this daemon does not hold its lease (any more); the write is refused",
        lease_name(env)
    )]
    NotOwner { env: String },
    #[error("state database column {column}: {message}")]
    Column { column: String, message: String },
    /// A downgrade: an older binary must not write a schema it does not know.
    #[error(
        "state database {path} has schema version {found}, and this karrots knows versions up to {known}: a newer karrots wrote it. Run that version again, or restore the state_dir backup taken before the upgrade"
    )]
    Newer {
        path: String,
        found: usize,
        known: usize,
    },
}

/// An error and the errors beneath it, on one line: the client's own message alone ("error
/// performing TLS handshake") does not say what to fix.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let said = inner.to_string();
        if !text.contains(&said) {
            text = format!("{text}: {said}");
        }
        cause = inner.source();
    }
    text
}

/// How a lease is named to a reader: its environment's, or the repository's own.
fn lease_name(env: &str) -> String {
    if env == postgres::REPOSITORY {
        "the repository's duties".to_string()
    } else {
        format!("environment {env}")
    }
}

impl StoreError {
    /// A deadlock's victim or a serialization failure: the same work may simply be tried
    /// again.
    pub fn is_transient(&self) -> bool {
        use ::postgres::error::SqlState;
        matches!(self, StoreError::Postgres { source, .. }
        if source.code().is_some_and(|code| {
            *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
        }))
    }

    /// Refused by the fencing of a lease this daemon lost, or never held.
    pub fn is_fenced(&self) -> bool {
        matches!(self, StoreError::NotOwner { .. })
    }
}

/// One environment as the API shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EnvironmentRow {
    pub name: String,
    pub branch: String,
    pub head: Option<String>,
    pub last_applied: Option<String>,
    pub status: EnvStatus,
    /// The input fingerprint of `last_applied`.
    #[serde(skip)]
    pub applied_fingerprint: Option<String>,
    /// The input closure of `last_applied`, when it was recorded with it: a head that changes
    /// no path inside it has the same fingerprint. (Kept in the database rather than one
    /// daemon's memory, so a restart does not stage every environment again.)
    #[serde(skip)]
    pub applied_inputs: Option<BTreeSet<RepoPath>>,
}

/// Where an environment now is, written with the commit it is at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The commit's input fingerprint.
    pub fingerprint: String,
    /// The commit's input closure.
    pub inputs: BTreeSet<RepoPath>,
}

/// A new head of an environment's branch, for [`StateStore::record_heads`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadRow {
    pub env: String,
    pub branch: String,
    pub head: String,
}

/// One run as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunRow {
    pub id: i64,
    pub env: String,
    pub commit: String,
    pub kind: RunKind,
    /// `None` while it runs.
    pub result: Option<RunResult>,
    pub summary: Summary,
    /// Addresses and actions of the planned changes (never values).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<serde_json::Value>,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub message: String,
    /// The SHA-256 of the plan file a plan run saved: what an approval names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan_sha256: Option<String>,
    /// The approvals an apply run applied its plan on.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub approved_by: Vec<crate::approval::Approval>,
}

/// What the drift checks of an environment found last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DriftRow {
    /// Never `off`: that is the API's, from the configuration.
    pub status: DriftStatus,
    /// When the last check finished (RFC 3339).
    pub checked_at: Option<String>,
    /// The last moment the environment was known to match its last applied commit (a clean
    /// check or an apply): where the search for who changed it starts.
    pub in_sync_at: Option<String>,
    pub resources: Vec<DriftedResource>,
    /// Why the last check failed, when it did.
    pub message: String,
}

/// A drifted resource as the store keeps it and the API and the alerts show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DriftedResource {
    pub address: String,
    /// What applying the last applied commit would do to it.
    pub actions: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Names of the attributes that differ (never their values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed_attributes: Vec<String>,
    /// Who changed it, from CloudTrail.
    #[serde(default)]
    pub changed_by: Vec<ChangedBy>,
}

impl Default for DriftRow {
    fn default() -> DriftRow {
        DriftRow {
            status: DriftStatus::Unchecked,
            checked_at: None,
            in_sync_at: None,
            resources: Vec::new(),
            message: String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub add: usize,
    pub change: usize,
    pub destroy: usize,
}

/// What an outbox row is delivered as, each kind by its deliverer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxKind {
    /// A JSON alert POSTed to a webhook sink.
    Alert,
    /// A commit status for the forge. Its destination is the commit and context: a newer
    /// status for the same one supersedes any not yet delivered, so the forge never gets an
    /// older state after a newer one.
    Status,
    /// The pull request comment of a previewed commit, written again from the commit's
    /// preview runs when delivered; one waiting per commit is enough.
    Comment,
}

impl OutboxKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxKind::Alert => "alert",
            OutboxKind::Status => "status",
            OutboxKind::Comment => "comment",
        }
    }

    /// Whether a newer delivery to the same destination makes an older one pointless.
    fn superseding(self) -> bool {
        matches!(self, OutboxKind::Status | OutboxKind::Comment)
    }
}

/// One delivery an outcome causes: its kind, where it goes, and what is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub kind: OutboxKind,
    /// A sink's URL, for an alert.
    pub destination: String,
    pub body: String,
}

/// A delivery waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub id: i64,
    pub destination: String,
    pub body: String,
    pub attempts: u32,
    /// The run whose outcome (or start) caused it, if any.
    pub run: Option<i64>,
}

/// How a journal entry records its run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunRecord {
    /// Ends a run begun with [`StateStore::start_run`].
    Finish {
        id: i64,
        result: RunResult,
        summary: Summary,
        resources: Vec<serde_json::Value>,
        message: String,
    },
    /// A run decided without terraform (refused, superseded): begun and ended at once.
    Decided {
        kind: RunKind,
        result: RunResult,
        message: String,
    },
}

/// One outcome for one environment and commit, written by [`StateStore::journal`] in one
/// transaction: all of it is recorded, or none of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Journal {
    pub env: String,
    pub commit: String,
    pub run: Option<RunRecord>,
    pub status: Option<EnvStatus>,
    /// The input fingerprint and closure of `commit`, when the environment is now at `commit`.
    pub last_applied: Option<Applied>,
    pub drift: Option<DriftRow>,
    /// The audit entry: decision and detail.
    pub audit: Option<(String, String)>,
    pub outbox: Vec<Delivery>,
    /// The SHA-256 of the plan file the run saved.
    pub plan_sha256: Option<String>,
    /// The approvals the run's plan was applied on.
    pub approved_by: Vec<crate::approval::Approval>,
}

/// What the daemon needs from its state store.
pub trait StateStore: Send + Sync {
    fn environments(&self) -> Result<Vec<EnvironmentRow>, StoreError>;
    fn environment(&self, name: &str) -> Result<Option<EnvironmentRow>, StoreError>;
    /// Records new heads of environments' branches, all in one transaction. An environment
    /// seen for the first time is `planning`: its head is queued, and nothing has shown it in
    /// sync yet.
    fn record_heads(&self, heads: &[HeadRow]) -> Result<(), StoreError>;
    /// Records one outcome in one transaction: the run, the environment's status, where it
    /// now is, its drift, the audit entry and every delivery the outcome causes. Returns the
    /// run's id, when there is a run. When the database refuses (a full disk), nothing of it
    /// is written, but the status is still what the store reports for the environment, from
    /// memory, until [`StateStore::record_pending`] writes it.
    fn journal(&self, entry: &Journal) -> Result<Option<i64>, StoreError>;
    /// Records new heads and several outcomes in one transaction (a commit that many
    /// environments pass over is one write, not one per environment): all of it, or none.
    fn journal_all(
        &self,
        heads: &[HeadRow],
        entries: &[Journal],
    ) -> Result<Vec<Option<i64>>, StoreError>;
    /// Writes the statuses the database refused before; called on every poll.
    fn record_pending(&self) {}
    /// Tells the other daemons sharing the store to fetch now (a hook reached this one).
    fn announce(&self) {}
    fn drift(&self, name: &str) -> Result<DriftRow, StoreError>;
    /// Begins a run (before terraform starts, so a restart finds one cut off), and sets the
    /// environment's status with it when there is one to set.
    fn start_run(
        &self,
        env: &str,
        commit: &str,
        kind: RunKind,
        status: Option<EnvStatus>,
        outbox: &[Delivery],
    ) -> Result<i64, StoreError>;
    /// The newest `limit` runs, of one environment or of all.
    fn runs(&self, env: Option<&str>, limit: usize) -> Result<Vec<RunRow>, StoreError>;
    fn run(&self, id: i64) -> Result<Option<RunRow>, StoreError>;
    /// The runs of `kind` on `commit`, every environment's, oldest first.
    fn commit_runs(&self, commit: &str, kind: RunKind) -> Result<Vec<RunRow>, StoreError>;
    /// The runs still open (cut off by a kill, when the daemon starts): each is ended as
    /// `interrupted` by a journal entry, with what it causes.
    fn open_runs(&self) -> Result<Vec<RunRow>, StoreError>;
    /// The deliveries of `kind` due at `now_unix`, oldest first.
    fn due(&self, kind: OutboxKind, now_unix: i64) -> Result<Vec<OutboxEntry>, StoreError>;
    fn delivered(&self, id: i64) -> Result<(), StoreError>;
    fn delivery_failed(
        &self,
        id: i64,
        next_attempt_unix: i64,
        error: &str,
    ) -> Result<(), StoreError>;
}

/// Statuses the database refused (a full disk, a lost connection), by environment: what the
/// daemon knows, shown instead of the recorded one until a write of it succeeds.
#[derive(Default)]
pub(crate) struct Unrecorded(Mutex<BTreeMap<String, EnvStatus>>);

impl Unrecorded {
    /// `row` with the status the database refused to take, when there is one.
    pub(crate) fn shown(&self, mut row: EnvironmentRow) -> EnvironmentRow {
        if let Ok(unrecorded) = self.0.lock()
            && let Some(status) = unrecorded.get(&row.name)
        {
            row.status = *status;
        }
        row
    }

    /// Keeps a status the database refused in memory (shown, and written on the next
    /// [`StateStore::record_pending`]); forgets it once one is written.
    pub(crate) fn remember(&self, name: &str, status: EnvStatus, written: bool) {
        if let Ok(mut unrecorded) = self.0.lock() {
            if written {
                unrecorded.remove(name);
            } else {
                tracing::error!(
                    env = name,
                    %status,
                    "the status could not be recorded; it is shown from memory and written again on the next poll"
                );
                unrecorded.insert(name.to_string(), status);
            }
        }
    }

    /// Writes each held status with `write`; forgets those written (unless a newer one came).
    pub(crate) fn write_again(&self, write: impl Fn(&str, EnvStatus) -> Result<(), StoreError>) {
        let pending: Vec<(String, EnvStatus)> = match self.0.lock() {
            Ok(unrecorded) => unrecorded.clone().into_iter().collect(),
            Err(_) => return,
        };
        for (name, status) in pending {
            if write(&name, status).is_ok()
                && let Ok(mut unrecorded) = self.0.lock()
                && unrecorded.get(&name) == Some(&status)
            {
                unrecorded.remove(&name);
            }
        }
    }
}

/// The SQLite store.
pub struct SqliteStore {
    path: String,
    /// Every write goes through this connection.
    connection: Mutex<Connection>,
    /// Reads, on a connection of their own: in WAL mode they see every committed write and
    /// never wait behind one (the outcomes of a thousand environments passed over at once
    /// must not hold up the one environment that plans).
    reader: Mutex<Connection>,
    /// Statuses the database refused, by environment: what the daemon knows, shown until
    /// they are written.
    unrecorded: Unrecorded,
}

const MIGRATIONS: [&str; 6] = [
    "
CREATE TABLE environments (
    name TEXT PRIMARY KEY,
    branch TEXT NOT NULL,
    head TEXT,
    last_applied TEXT,
    applied_fingerprint TEXT,
    status TEXT NOT NULL DEFAULT 'in_sync'
);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    env TEXT NOT NULL,
    commit_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    result TEXT,
    add_count INTEGER NOT NULL DEFAULT 0,
    change_count INTEGER NOT NULL DEFAULT 0,
    destroy_count INTEGER NOT NULL DEFAULT 0,
    resources TEXT NOT NULL DEFAULT '[]',
    started_at TEXT NOT NULL,
    finished_at TEXT,
    message TEXT NOT NULL DEFAULT ''
);
CREATE INDEX runs_by_env ON runs (env, id);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    env TEXT NOT NULL,
    commit_id TEXT NOT NULL,
    decision TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sink TEXT NOT NULL,
    body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL DEFAULT 0,
    delivered_at TEXT,
    last_error TEXT
);
",
    "
ALTER TABLE environments ADD COLUMN drift_status TEXT NOT NULL DEFAULT 'unchecked';
ALTER TABLE environments ADD COLUMN drift_checked_at TEXT;
ALTER TABLE environments ADD COLUMN drift_in_sync_at TEXT;
ALTER TABLE environments ADD COLUMN drift_resources TEXT NOT NULL DEFAULT '[]';
ALTER TABLE environments ADD COLUMN drift_message TEXT NOT NULL DEFAULT '';
",
    "
ALTER TABLE outbox RENAME COLUMN sink TO destination;
ALTER TABLE outbox ADD COLUMN kind TEXT NOT NULL DEFAULT 'alert';
CREATE INDEX outbox_due ON outbox (kind, delivered_at, next_attempt_at);
",
    "
ALTER TABLE environments ADD COLUMN applied_inputs TEXT;
",
    "
ALTER TABLE outbox ADD COLUMN run_id INTEGER;
CREATE INDEX outbox_by_destination ON outbox (kind, destination, delivered_at);
CREATE INDEX runs_by_commit ON runs (commit_id, kind);
",
    "
ALTER TABLE runs ADD COLUMN plan_sha256 TEXT;
ALTER TABLE runs ADD COLUMN approved_by TEXT NOT NULL DEFAULT '[]';
",
];

/// The recorded states go into the database as their names, and come out only as one of
/// them: a name this karrots does not know is an error naming it, never a default.
macro_rules! stored_as_name {
    ($($ty:ty),*) => {$(
        impl rusqlite::ToSql for $ty {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(self.as_str().into())
            }
        }

        impl rusqlite::types::FromSql for $ty {
            fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
                let text = value.as_str()?;
                text.parse().map_err(|_| {
                    rusqlite::types::FromSqlError::Other(
                        format!("{text:?} is not a known {}", stringify!($ty)).into(),
                    )
                })
            }
        }
    )*};
}

stored_as_name!(EnvStatus, RunKind, RunResult, DriftStatus);

/// A JSON column as `T`; one that does not parse is an error, never taken as empty.
fn json_column<T: serde::de::DeserializeOwned>(
    row: &rusqlite::Row<'_>,
    index: usize,
) -> rusqlite::Result<T> {
    let text: String = row.get(index)?;
    serde_json::from_str(&text).map_err(|error| {
        let column = row.as_ref().column_name(index).unwrap_or("?");
        let error = format!("column {column} holds {text:?}, which does not parse: {error}");
        rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, error.into())
    })
}

/// Runs a store call on a blocking thread: a store call never holds a runtime thread, whether
/// it waits for SQLite's fsync or PostgreSQL's round trip (whose blocking client must not run
/// on one at all).
pub async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(call).await {
        Ok(result) => result,
        Err(error) => Err(StoreError::Task(error.to_string())),
    }
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl SqliteStore {
    /// Opens (creating) the database and brings its schema up to date.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let name = path.display().to_string();
        let error = |source| StoreError::Sqlite {
            path: name.clone(),
            source,
        };
        let mut connection = Connection::open(path).map_err(error)?;
        connection
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(error)?;
        connection
            .pragma_update(None, "synchronous", "FULL")
            .map_err(error)?;
        connection
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(error)?;
        let version: usize = connection
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(error)?;
        if version > MIGRATIONS.len() {
            return Err(StoreError::Newer {
                path: name,
                found: version,
                known: MIGRATIONS.len(),
            });
        }
        let transaction = connection.transaction().map_err(error)?;
        for (index, migration) in MIGRATIONS.iter().enumerate().skip(version) {
            transaction.execute_batch(migration).map_err(error)?;
            transaction
                .pragma_update(None, "user_version", index + 1)
                .map_err(error)?;
        }
        transaction.commit().map_err(error)?;
        let reader = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(error)?;
        reader
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(error)?;
        // 512 KiB of pages each: what a poll and the API read again is in the system's page
        // cache anyway, and the idle daemon keeps every page SQLite caches.
        for connection in [&connection, &reader] {
            connection
                .pragma_update(None, "cache_size", -512)
                .map_err(error)?;
        }
        Ok(SqliteStore {
            path: name,
            connection: Mutex::new(connection),
            reader: Mutex::new(reader),
            unrecorded: Unrecorded::default(),
        })
    }

    fn write_status(&self, name: &str, status: EnvStatus) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE environments SET status = ?2 WHERE name = ?1",
                params![name, status],
            )
            .map(drop)
        })
    }

    /// Runs `work` on the writing connection.
    fn with<T>(
        &self,
        work: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        self.on(&self.connection, work)
    }

    /// Runs `work`, which only reads, on the reading connection.
    fn read<T>(
        &self,
        work: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        self.on(&self.reader, work)
    }

    fn on<T>(
        &self,
        connection: &Mutex<Connection>,
        work: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let connection = connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        work(&connection).map_err(|source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }
}

const RUN_COLUMNS: &str = "id, env, commit_id, kind, result, add_count, change_count, destroy_count, resources, started_at, finished_at, message, plan_sha256, approved_by";

fn run_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
    Ok(RunRow {
        id: row.get(0)?,
        env: row.get(1)?,
        commit: row.get(2)?,
        kind: row.get(3)?,
        result: row.get(4)?,
        summary: Summary {
            add: row.get::<_, i64>(5)? as usize,
            change: row.get::<_, i64>(6)? as usize,
            destroy: row.get::<_, i64>(7)? as usize,
        },
        resources: json_column(row, 8)?,
        started_at: row.get(9)?,
        finished_at: row.get(10)?,
        message: row.get(11)?,
        plan_sha256: row.get(12)?,
        approved_by: json_column(row, 13)?,
    })
}

fn environment_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<EnvironmentRow> {
    Ok(EnvironmentRow {
        name: row.get(0)?,
        branch: row.get(1)?,
        head: row.get(2)?,
        last_applied: row.get(3)?,
        applied_fingerprint: row.get(4)?,
        status: row.get(5)?,
        applied_inputs: row
            .get::<_, Option<String>>(6)?
            .map(|text| parse_inputs(&text))
            .transpose()
            .map_err(|error| {
                rusqlite::Error::FromSqlConversionFailure(
                    6,
                    rusqlite::types::Type::Text,
                    error.into(),
                )
            })?,
    })
}

/// An input closure as stored: a JSON array of repository paths. A row that does not parse
/// is an error, never taken as "unknown".
fn parse_inputs(text: &str) -> Result<BTreeSet<RepoPath>, String> {
    let paths: Vec<String> = serde_json::from_str(text).map_err(|error| {
        format!("the applied input closure {text:?} is not a JSON array of paths: {error}")
    })?;
    paths.iter().map(|path| RepoPath::parse(path)).collect()
}

/// Writes new heads inside `transaction`; an environment seen for the first time is
/// `planning`.
fn write_heads(transaction: &rusqlite::Transaction<'_>, heads: &[HeadRow]) -> rusqlite::Result<()> {
    let mut upsert = transaction.prepare_cached(
        "INSERT INTO environments (name, branch, head, status) VALUES (?1, ?2, ?3, 'planning')
         ON CONFLICT (name) DO UPDATE SET branch = ?2, head = ?3",
    )?;
    for head in heads {
        upsert.execute(params![head.env, head.branch, head.head])?;
    }
    Ok(())
}

/// Writes one journal entry inside `transaction`; returns its run's id, when it has a run.
fn write_journal(
    transaction: &rusqlite::Transaction<'_>,
    entry: &Journal,
    now: &str,
) -> rusqlite::Result<Option<i64>> {
    let env = entry.env.as_str();
    let run = match &entry.run {
        Some(RunRecord::Finish {
            id,
            result,
            summary,
            resources,
            message,
        }) => {
            let resources = serde_json::to_string(resources).unwrap_or_else(|_| "[]".into());
            transaction
                .prepare_cached(
                    "UPDATE runs SET result = ?2, add_count = ?3, change_count = ?4,
                     destroy_count = ?5, resources = ?6, finished_at = ?7, message = ?8
                     WHERE id = ?1",
                )?
                .execute(params![
                    id,
                    result,
                    summary.add as i64,
                    summary.change as i64,
                    summary.destroy as i64,
                    resources,
                    now,
                    message
                ])?;
            Some(*id)
        }
        Some(RunRecord::Decided {
            kind,
            result,
            message,
        }) => {
            transaction
                .prepare_cached(
                    "INSERT INTO runs (env, commit_id, kind, result, started_at, finished_at,
                     message) VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6)",
                )?
                .execute(params![env, entry.commit, kind, result, now, message])?;
            Some(transaction.last_insert_rowid())
        }
        None => None,
    };
    if let Some(id) = run {
        if let Some(sha256) = &entry.plan_sha256 {
            transaction
                .prepare_cached("UPDATE runs SET plan_sha256 = ?2 WHERE id = ?1")?
                .execute(params![id, sha256])?;
        }
        if !entry.approved_by.is_empty() {
            let approvals =
                serde_json::to_string(&entry.approved_by).unwrap_or_else(|_| "[]".into());
            transaction
                .prepare_cached("UPDATE runs SET approved_by = ?2 WHERE id = ?1")?
                .execute(params![id, approvals])?;
        }
    }
    if let Some(status) = &entry.status {
        transaction
            .prepare_cached("UPDATE environments SET status = ?2 WHERE name = ?1")?
            .execute(params![env, status])?;
    }
    if let Some(applied) = &entry.last_applied {
        let inputs: Vec<&str> = applied.inputs.iter().map(RepoPath::as_str).collect();
        let inputs = serde_json::to_string(&inputs).unwrap_or_else(|_| "[]".into());
        transaction
            .prepare_cached(
                "UPDATE environments SET last_applied = ?2, applied_fingerprint = ?3,
                 applied_inputs = ?4 WHERE name = ?1",
            )?
            .execute(params![env, entry.commit, applied.fingerprint, inputs])?;
    }
    if let Some(drift) = &entry.drift {
        let resources = serde_json::to_string(&drift.resources).unwrap_or_else(|_| "[]".into());
        transaction
            .prepare_cached(
                "UPDATE environments SET drift_status = ?2, drift_checked_at = ?3,
                 drift_in_sync_at = ?4, drift_resources = ?5, drift_message = ?6
                 WHERE name = ?1",
            )?
            .execute(params![
                env,
                drift.status,
                drift.checked_at,
                drift.in_sync_at,
                resources,
                drift.message
            ])?;
    }
    if let Some((decision, detail)) = &entry.audit {
        transaction
            .prepare_cached(
                "INSERT INTO audit (at, env, commit_id, decision, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![now, env, entry.commit, decision, detail])?;
    }
    write_outbox(transaction, &entry.outbox, run, now)?;
    Ok(run)
}

/// The deliveries of one outcome (or run start), linked to its run; each supersedes the
/// undelivered ones of its kind and destination when its kind says so.
fn write_outbox(
    transaction: &rusqlite::Transaction<'_>,
    outbox: &[Delivery],
    run: Option<i64>,
    now: &str,
) -> rusqlite::Result<()> {
    for delivery in outbox {
        if delivery.kind.superseding() {
            transaction
                .prepare_cached(
                    "UPDATE outbox SET delivered_at = ?3, last_error = 'superseded'
                     WHERE kind = ?1 AND destination = ?2 AND delivered_at IS NULL",
                )?
                .execute(params![delivery.kind.as_str(), delivery.destination, now])?;
        }
        transaction
            .prepare_cached(
                "INSERT INTO outbox (kind, destination, body, run_id) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![
                delivery.kind.as_str(),
                delivery.destination,
                delivery.body,
                run
            ])?;
    }
    Ok(())
}

const ENVIRONMENT_COLUMNS: &str =
    "name, branch, head, last_applied, applied_fingerprint, status, applied_inputs";

impl StateStore for SqliteStore {
    fn environments(&self) -> Result<Vec<EnvironmentRow>, StoreError> {
        self.read(|c| {
            c.prepare(&format!(
                "SELECT {ENVIRONMENT_COLUMNS} FROM environments ORDER BY name"
            ))?
            .query_map([], environment_row)?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map(|rows| {
            rows.into_iter()
                .map(|row| self.unrecorded.shown(row))
                .collect()
        })
    }

    fn environment(&self, name: &str) -> Result<Option<EnvironmentRow>, StoreError> {
        self.read(|c| {
            c.query_row(
                &format!("SELECT {ENVIRONMENT_COLUMNS} FROM environments WHERE name = ?1"),
                [name],
                environment_row,
            )
            .optional()
        })
        .map(|row| row.map(|row| self.unrecorded.shown(row)))
    }

    fn record_heads(&self, heads: &[HeadRow]) -> Result<(), StoreError> {
        self.with(|c| {
            let transaction = c.unchecked_transaction()?;
            write_heads(&transaction, heads)?;
            transaction.commit()
        })
    }

    fn record_pending(&self) {
        self.unrecorded
            .write_again(|name, status| self.write_status(name, status));
    }

    fn drift(&self, name: &str) -> Result<DriftRow, StoreError> {
        self.read(|c| {
            c.query_row(
                "SELECT drift_status, drift_checked_at, drift_in_sync_at, drift_resources, drift_message
                 FROM environments WHERE name = ?1",
                [name],
                |row| {
                    Ok(DriftRow {
                        status: row.get(0)?,
                        checked_at: row.get(1)?,
                        in_sync_at: row.get(2)?,
                        resources: json_column(row, 3)?,
                        message: row.get(4)?,
                    })
                },
            )
            .optional()
            .map(Option::unwrap_or_default)
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
        let started = self.with(|c| {
            let transaction = c.unchecked_transaction()?;
            let now = now_rfc3339();
            transaction.execute(
                "INSERT INTO runs (env, commit_id, kind, started_at) VALUES (?1, ?2, ?3, ?4)",
                params![env, commit, kind, now],
            )?;
            let id = transaction.last_insert_rowid();
            if let Some(status) = status {
                transaction.execute(
                    "UPDATE environments SET status = ?2 WHERE name = ?1",
                    params![env, status],
                )?;
            }
            write_outbox(&transaction, outbox, Some(id), &now)?;
            transaction.commit()?;
            Ok(id)
        });
        if let Some(status) = status {
            self.unrecorded.remember(env, status, started.is_ok());
        }
        started
    }

    fn journal(&self, entry: &Journal) -> Result<Option<i64>, StoreError> {
        let written = self.with(|c| {
            let transaction = c.unchecked_transaction()?;
            let run = write_journal(&transaction, entry, &now_rfc3339())?;
            transaction.commit()?;
            Ok(run)
        });
        if let Some(status) = entry.status {
            self.unrecorded
                .remember(&entry.env, status, written.is_ok());
        }
        written
    }

    fn journal_all(
        &self,
        heads: &[HeadRow],
        entries: &[Journal],
    ) -> Result<Vec<Option<i64>>, StoreError> {
        let written = self.with(|c| {
            let transaction = c.unchecked_transaction()?;
            write_heads(&transaction, heads)?;
            let now = now_rfc3339();
            let runs = entries
                .iter()
                .map(|entry| write_journal(&transaction, entry, &now))
                .collect::<rusqlite::Result<Vec<_>>>()?;
            transaction.commit()?;
            Ok(runs)
        });
        for entry in entries {
            if let Some(status) = entry.status {
                self.unrecorded
                    .remember(&entry.env, status, written.is_ok());
            }
        }
        written
    }

    fn commit_runs(&self, commit: &str, kind: RunKind) -> Result<Vec<RunRow>, StoreError> {
        self.read(|c| {
            c.prepare(&format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE commit_id = ?1 AND kind = ?2 ORDER BY id"
            ))?
            .query_map(params![commit, kind], run_row)?
            .collect()
        })
    }

    fn runs(&self, env: Option<&str>, limit: usize) -> Result<Vec<RunRow>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|c| match env {
            Some(env) => c
                .prepare(&format!(
                    "SELECT {RUN_COLUMNS} FROM runs WHERE env = ?1 ORDER BY id DESC LIMIT ?2"
                ))?
                .query_map(params![env, limit], run_row)?
                .collect(),
            None => c
                .prepare(&format!(
                    "SELECT {RUN_COLUMNS} FROM runs ORDER BY id DESC LIMIT ?1"
                ))?
                .query_map([limit], run_row)?
                .collect(),
        })
    }

    fn run(&self, id: i64) -> Result<Option<RunRow>, StoreError> {
        self.read(|c| {
            c.query_row(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"),
                [id],
                run_row,
            )
            .optional()
        })
    }

    fn open_runs(&self) -> Result<Vec<RunRow>, StoreError> {
        self.read(|c| {
            c.prepare(&format!(
                "SELECT {RUN_COLUMNS} FROM runs WHERE finished_at IS NULL ORDER BY id"
            ))?
            .query_map([], run_row)?
            .collect()
        })
    }

    fn due(&self, kind: OutboxKind, now_unix: i64) -> Result<Vec<OutboxEntry>, StoreError> {
        self.read(|c| {
            c.prepare(
                "SELECT id, destination, body, attempts, run_id FROM outbox
                 WHERE kind = ?1 AND delivered_at IS NULL AND next_attempt_at <= ?2
                 ORDER BY id LIMIT 100",
            )?
            .query_map(params![kind.as_str(), now_unix], |row| {
                Ok(OutboxEntry {
                    id: row.get(0)?,
                    destination: row.get(1)?,
                    body: row.get(2)?,
                    attempts: row.get::<_, i64>(3)? as u32,
                    run: row.get(4)?,
                })
            })?
            .collect()
        })
    }

    fn delivered(&self, id: i64) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE outbox SET delivered_at = ?2, attempts = attempts + 1 WHERE id = ?1",
                params![id, now_rfc3339()],
            )
            .map(drop)
        })
    }

    fn delivery_failed(
        &self,
        id: i64,
        next_attempt_unix: i64,
        error: &str,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?2, last_error = ?3 WHERE id = ?1",
                params![id, next_attempt_unix, error],
            )
            .map(drop)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_head(
        store: &SqliteStore,
        env: &str,
        branch: &str,
        head: &str,
    ) -> Result<(), StoreError> {
        store.record_heads(&[HeadRow {
            env: env.into(),
            branch: branch.into(),
            head: head.into(),
        }])
    }

    /// At a commit with `fingerprint`, whose closure is prod's folder and one module.
    fn applied(fingerprint: &str) -> Applied {
        Applied {
            fingerprint: fingerprint.into(),
            inputs: ["environments/prod", "modules/app"]
                .into_iter()
                .map(|path| RepoPath::parse(path).unwrap())
                .collect(),
        }
    }

    fn status_only(env: &str, status: EnvStatus) -> Journal {
        Journal {
            env: env.into(),
            commit: "abc".into(),
            status: Some(status),
            ..Journal::default()
        }
    }

    /// Run `id` ended with `result`, having planned one resource to add.
    fn added_one(id: i64, result: RunResult) -> RunRecord {
        RunRecord::Finish {
            id,
            result,
            summary: Summary {
                add: 1,
                change: 0,
                destroy: 0,
            },
            resources: Vec::new(),
            message: String::new(),
        }
    }

    fn alert_to(sink: &str) -> Delivery {
        Delivery {
            kind: OutboxKind::Alert,
            destination: sink.into(),
            body: "{}".into(),
        }
    }

    /// Makes the database at `path` refuse every `statement` on `table`, as a full disk does,
    /// until the trigger is dropped on the connection returned.
    fn fill_disk(path: &Path, statement: &str, table: &str) -> Connection {
        let disk = Connection::open(path).unwrap();
        disk.execute_batch(&format!(
            "CREATE TRIGGER full_disk BEFORE {statement} ON {table}
             BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END;"
        ))
        .unwrap();
        disk
    }

    #[test]
    fn a_status_the_database_refuses_is_shown_from_memory_and_written_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("karrots.db");
        let store = SqliteStore::open(&path).unwrap();
        record_head(&store, "prod", "main", "abc").unwrap();
        store
            .journal(&status_only("prod", EnvStatus::Applying))
            .unwrap();
        let disk = fill_disk(&path, "UPDATE", "environments");
        assert!(
            store
                .journal(&status_only("prod", EnvStatus::InSync))
                .is_err()
        );
        assert_eq!(
            store.environment("prod").unwrap().unwrap().status,
            EnvStatus::InSync
        );
        assert_eq!(store.environments().unwrap()[0].status, EnvStatus::InSync);
        store.record_pending();
        let on_disk = |c: &Connection| -> String {
            c.query_row(
                "SELECT status FROM environments WHERE name = 'prod'",
                [],
                |r| r.get(0),
            )
            .unwrap()
        };
        assert_eq!(on_disk(&disk), "applying", "still refused");

        disk.execute_batch("DROP TRIGGER full_disk;").unwrap();
        store.record_pending();
        assert_eq!(on_disk(&disk), "in_sync");
        assert_eq!(
            store.environment("prod").unwrap().unwrap().status,
            EnvStatus::InSync
        );
    }

    #[test]
    fn outcomes_recorded_together_are_all_written_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("karrots.db");
        let store = SqliteStore::open(&path).unwrap();
        let heads: Vec<HeadRow> = ["a", "b", "c"]
            .into_iter()
            .map(|env| HeadRow {
                env: env.into(),
                branch: "main".into(),
                head: "abc".into(),
            })
            .collect();
        store.record_heads(&heads).unwrap();
        let passed_over = |env: &str| Journal {
            last_applied: Some(applied("fingerprint")),
            audit: Some(("unaffected".into(), "no input changed".into())),
            ..status_only(env, EnvStatus::InSync)
        };
        let entries: Vec<Journal> = ["a", "b", "c"].into_iter().map(passed_over).collect();
        // The last environment's audit entry is refused: none of the three is written.
        let disk = Connection::open(&path).unwrap();
        disk.execute_batch(
            "CREATE TRIGGER full_disk BEFORE INSERT ON audit WHEN NEW.env = 'c'
             BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END;",
        )
        .unwrap();
        assert!(store.journal_all(&heads, &entries).is_err());
        drop(store);
        let store = SqliteStore::open(&path).unwrap();
        for row in store.environments().unwrap() {
            assert_eq!(
                (row.status.as_str(), row.last_applied.as_deref()),
                ("planning", None),
                "{}",
                row.name
            );
        }
        disk.execute_batch("DROP TRIGGER full_disk;").unwrap();
        assert_eq!(store.journal_all(&heads, &entries).unwrap(), vec![None; 3]);
        for row in store.environments().unwrap() {
            assert_eq!(
                (row.status.as_str(), row.last_applied.as_deref()),
                ("in_sync", Some("abc")),
                "{}",
                row.name
            );
        }
        let audited: i64 = disk
            .query_row("SELECT count(*) FROM audit", [], |r| r.get(0))
            .unwrap();
        assert_eq!(audited, 3);
    }

    #[test]
    fn the_applied_closure_is_kept_and_a_broken_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("karrots.db");
        let store = SqliteStore::open(&path).unwrap();
        record_head(&store, "prod", "main", "abc").unwrap();
        assert_eq!(
            store.environment("prod").unwrap().unwrap().applied_inputs,
            None
        );
        store
            .journal(&Journal {
                last_applied: Some(applied("fingerprint")),
                ..status_only("prod", EnvStatus::InSync)
            })
            .unwrap();
        drop(store);
        let store = SqliteStore::open(&path).unwrap();
        let row = store.environment("prod").unwrap().unwrap();
        assert_eq!(row.applied_fingerprint.as_deref(), Some("fingerprint"));
        assert_eq!(row.applied_inputs, Some(applied("fingerprint").inputs));

        let disk = Connection::open(&path).unwrap();
        disk.execute_batch("UPDATE environments SET applied_inputs = '[\"../outside\"]'")
            .unwrap();
        let error = store.environment("prod").unwrap_err().to_string();
        assert!(error.contains("leaves the repository"), "{error}");
    }

    #[test]
    fn an_outcome_is_recorded_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("karrots.db");
        let store = SqliteStore::open(&path).unwrap();
        record_head(&store, "prod", "main", "abc").unwrap();
        let run = store
            .start_run(
                "prod",
                "abc",
                RunKind::Apply,
                Some(EnvStatus::Applying),
                &[],
            )
            .unwrap();
        let applied = Journal {
            env: "prod".into(),
            commit: "abc".into(),
            run: Some(added_one(run, RunResult::Applied)),
            status: Some(EnvStatus::InSync),
            last_applied: Some(applied("fingerprint")),
            drift: Some(DriftRow {
                status: DriftStatus::InSync,
                ..DriftRow::default()
            }),
            audit: Some(("applied".into(), format!("run {run}"))),
            outbox: vec![alert_to("http://a.invalid/"), alert_to("http://b.invalid/")],
            plan_sha256: Some("ab12".into()),
            approved_by: vec![crate::approval::Approval {
                fingerprint: "SHA256:key".into(),
                email: "alice@example.com".into(),
                tag: "karrots/approve/prod/abc/alice".into(),
                signed_at: "2026-12-07T10:00:00Z".into(),
            }],
        };
        // The last write of the outcome, the second alert, is refused.
        let disk = Connection::open(&path).unwrap();
        disk.execute_batch(
            "CREATE TRIGGER full_disk BEFORE INSERT ON outbox
             WHEN NEW.destination = 'http://b.invalid/'
             BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END;",
        )
        .unwrap();
        assert!(store.journal(&applied).is_err());
        drop(store);

        // What a restart finds: none of it.
        let store = SqliteStore::open(&path).unwrap();
        let row = store.environment("prod").unwrap().unwrap();
        assert_eq!(row.status, EnvStatus::Applying);
        assert_eq!(row.last_applied, None);
        assert_eq!(store.drift("prod").unwrap().status, DriftStatus::Unchecked);
        let cut = store.run(run).unwrap().unwrap();
        assert_eq!((cut.result, cut.plan_sha256), (None, None));
        assert!(cut.approved_by.is_empty());
        assert!(store.due(OutboxKind::Alert, i64::MAX).unwrap().is_empty());
        let audited: i64 = disk
            .query_row("SELECT count(*) FROM audit", [], |r| r.get(0))
            .unwrap();
        assert_eq!(audited, 0);

        disk.execute_batch("DROP TRIGGER full_disk;").unwrap();
        assert_eq!(store.journal(&applied).unwrap(), Some(run));
        let row = store.environment("prod").unwrap().unwrap();
        assert_eq!(
            (row.status.as_str(), row.last_applied.as_deref()),
            ("in_sync", Some("abc"))
        );
        assert_eq!(store.drift("prod").unwrap().status, DriftStatus::InSync);
        let ended = store.run(run).unwrap().unwrap();
        assert_eq!(ended.result, Some(RunResult::Applied));
        assert_eq!(ended.plan_sha256.as_deref(), Some("ab12"));
        assert_eq!(ended.approved_by, applied.approved_by);
        assert_eq!(store.due(OutboxKind::Alert, i64::MAX).unwrap().len(), 2);
    }

    #[test]
    fn a_database_from_a_newer_karrots_is_not_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("karrots.db");
        drop(SqliteStore::open(&path).unwrap());
        let newer = Connection::open(&path).unwrap();
        newer
            .pragma_update(None, "user_version", MIGRATIONS.len() + 1)
            .unwrap();
        drop(newer);
        let Err(error) = SqliteStore::open(&path) else {
            panic!("a newer schema was opened");
        };
        assert!(matches!(error, StoreError::Newer { found, .. } if found == MIGRATIONS.len() + 1));
        assert!(error.to_string().contains("restore the state_dir backup"));
    }

    #[test]
    fn a_row_that_does_not_parse_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("karrots.db");
        let store = SqliteStore::open(&path).unwrap();
        record_head(&store, "prod", "main", "abc").unwrap();
        let run = store
            .start_run("prod", "abc", RunKind::Plan, None, &[])
            .unwrap();
        let hand = Connection::open(&path).unwrap();
        let broken = [
            (
                "UPDATE environments SET status = 'sideways'",
                "\"sideways\" is not a known EnvStatus",
            ),
            (
                "UPDATE runs SET result = 'maybe'",
                "\"maybe\" is not a known RunResult",
            ),
            (
                "UPDATE environments SET drift_status = 'gone'",
                "\"gone\" is not a known DriftStatus",
            ),
            (
                "UPDATE environments SET drift_resources = '{'",
                "column drift_resources holds \"{\", which does not parse",
            ),
            (
                "UPDATE runs SET resources = 'null'",
                "column resources holds \"null\", which does not parse",
            ),
        ];
        for (statement, expected) in broken {
            hand.execute_batch(statement).unwrap();
            let read = [
                store.environments().map(drop),
                store.runs(None, 10).map(drop),
                store.run(run).map(drop),
                store.drift("prod").map(drop),
            ];
            let errors: Vec<String> = read
                .into_iter()
                .filter_map(|read| read.err().map(|error| error.to_string()))
                .collect();
            assert!(
                errors.iter().any(|error| error.contains(expected)),
                "{statement}: {errors:?}"
            );
            // Put it back, so that the next row breaks alone.
            hand.execute_batch(
                "UPDATE environments SET status = 'planning', drift_status = 'unchecked',
                 drift_resources = '[]'; UPDATE runs SET result = NULL, resources = '[]';",
            )
            .unwrap();
        }
    }

    #[test]
    fn alerts_waiting_in_an_older_outbox_survive_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("karrots.db");
        {
            let older = Connection::open(&path).unwrap();
            older.execute_batch(MIGRATIONS[0]).unwrap();
            older.execute_batch(MIGRATIONS[1]).unwrap();
            older.pragma_update(None, "user_version", 2).unwrap();
            older
                .execute(
                    "INSERT INTO outbox (sink, body) VALUES ('http://a.invalid/', '{\"n\":1}')",
                    [],
                )
                .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let due = store.due(OutboxKind::Alert, i64::MAX).unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].destination, "http://a.invalid/");
        assert_eq!(due[0].body, "{\"n\":1}");
    }

    #[test]
    fn runs_survive_a_reopen_and_open_ones_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("karrots.db");
        {
            let store = SqliteStore::open(&path).unwrap();
            record_head(&store, "prod", "main", "abc").unwrap();
            let plan = store
                .start_run("prod", "abc", RunKind::Plan, Some(EnvStatus::Planning), &[])
                .unwrap();
            store
                .journal(&Journal {
                    env: "prod".into(),
                    commit: "abc".into(),
                    run: Some(added_one(plan, RunResult::Changes)),
                    ..Journal::default()
                })
                .unwrap();
            store
                .start_run(
                    "prod",
                    "abc",
                    RunKind::Apply,
                    Some(EnvStatus::Applying),
                    &[],
                )
                .unwrap();
            // The daemon dies here, mid-apply.
        }
        let store = SqliteStore::open(&path).unwrap();
        let open = store.open_runs().unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].kind, RunKind::Apply);
        assert_eq!(
            store.environment("prod").unwrap().unwrap().status,
            EnvStatus::Applying
        );
        let runs = store.runs(Some("prod"), 200).unwrap();
        assert_eq!(runs[0].result, None);
        assert_eq!(runs[1].result, Some(RunResult::Changes));
        assert_eq!(runs[1].summary.add, 1);
    }

    #[test]
    fn drift_findings_are_kept_per_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("karrots.db");
        let found = DriftRow {
            status: DriftStatus::Drifted,
            checked_at: Some("2026-11-23T10:00:00Z".into()),
            in_sync_at: Some("2026-11-23T09:00:00Z".into()),
            resources: vec![DriftedResource {
                address: "aws_vpc.main".into(),
                actions: vec!["update".into()],
                id: None,
                changed_attributes: Vec::new(),
                changed_by: Vec::new(),
            }],
            message: String::new(),
        };
        {
            let store = SqliteStore::open(&path).unwrap();
            record_head(&store, "prod", "main", "abc").unwrap();
            record_head(&store, "dev", "dev", "abc").unwrap();
            assert_eq!(store.drift("prod").unwrap(), DriftRow::default());
            store
                .journal(&Journal {
                    env: "prod".into(),
                    drift: Some(found.clone()),
                    ..Journal::default()
                })
                .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.drift("prod").unwrap(), found);
        assert_eq!(store.drift("dev").unwrap().status, DriftStatus::Unchecked);
        assert_eq!(store.drift("nowhere").unwrap(), DriftRow::default());
    }

    #[test]
    fn alerts_wait_in_the_outbox_until_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("karrots.db")).unwrap();
        store
            .journal(&Journal {
                outbox: vec![alert_to("http://a.invalid/"), alert_to("http://b.invalid/")],
                ..Journal::default()
            })
            .unwrap();
        let due = store.due(OutboxKind::Alert, 0).unwrap();
        assert_eq!(due.len(), 2);
        store.delivered(due[0].id).unwrap();
        store.delivery_failed(due[1].id, 100, "refused").unwrap();
        assert!(store.due(OutboxKind::Alert, 99).unwrap().is_empty());
        let retry = store.due(OutboxKind::Alert, 100).unwrap();
        assert_eq!(retry.len(), 1);
        assert_eq!(retry[0].attempts, 1);
    }
}
