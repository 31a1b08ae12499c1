//! Everything the daemon remembers, in SQLite under `state_dir` (WAL mode): environments with
//! their last applied commit, runs, the audit log of every decision, and the alert outbox.
//!
//! The daemon talks to it through [`StateStore`], a narrow trait, so a PostgreSQL store for
//! several daemons can take its place. Every write is one statement or one transaction, so a
//! kill at any moment leaves a consistent database; an apply is recorded as started before
//! terraform runs, which is how a restart finds one that was cut off.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database {path}: {source}")]
    Sqlite {
        path: String,
        source: rusqlite::Error,
    },
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

/// One environment as the API shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EnvironmentRow {
    pub name: String,
    pub branch: String,
    pub head: Option<String>,
    pub last_applied: Option<String>,
    /// `in_sync`, `planning`, `applying`, `drifted`, `refused`, `failed`, `error`.
    pub status: String,
    /// The input fingerprint of `last_applied`.
    #[serde(skip)]
    pub applied_fingerprint: Option<String>,
}

/// One run as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunRow {
    pub id: i64,
    pub env: String,
    pub commit: String,
    /// `plan`, `apply`, `drift`, `preview`.
    pub kind: String,
    /// `no_changes`, `changes`, `applied`, `failed`, `refused`, `superseded`, `interrupted`;
    /// `None` while it runs.
    pub result: Option<String>,
    pub summary: Summary,
    /// Addresses and actions of the planned changes (never values).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<serde_json::Value>,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub message: String,
}

/// What the drift checks of an environment found last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DriftRow {
    /// `unchecked`, `in_sync`, `drifted`, `error` (`off` is the API's, from the config).
    pub status: String,
    /// When the last check finished (RFC 3339).
    pub checked_at: Option<String>,
    /// The last moment the environment was known to match its last applied commit (a clean
    /// check or an apply): where the search for who changed it starts.
    pub in_sync_at: Option<String>,
    /// The drifted resources: address, actions, id, changed attributes, `changed_by`.
    pub resources: Vec<serde_json::Value>,
    /// Why the last check failed, when it did.
    pub message: String,
}

impl Default for DriftRow {
    fn default() -> DriftRow {
        DriftRow {
            status: "unchecked".into(),
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

/// An alert waiting in the outbox for one sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub id: i64,
    pub sink: String,
    pub body: String,
    pub attempts: u32,
}

/// What the daemon needs from its state store.
pub trait StateStore: Send + Sync {
    fn environments(&self) -> Result<Vec<EnvironmentRow>, StoreError>;
    fn environment(&self, name: &str) -> Result<Option<EnvironmentRow>, StoreError>;
    /// Records a new head of the environment's branch. An environment seen for the first time
    /// is `planning`: its head is queued, and nothing has shown it in sync yet.
    fn upsert_environment(&self, name: &str, branch: &str, head: &str) -> Result<(), StoreError>;
    /// Sets an environment's status. When the database refuses (a full disk), the status is
    /// still what the store reports for it, from memory, until [`StateStore::record_pending`]
    /// writes it.
    fn set_status(&self, name: &str, status: &str) -> Result<(), StoreError>;
    /// Writes the statuses the database refused before; called on every poll.
    fn record_pending(&self) {}
    /// Records where the environment now is: the commit and its input fingerprint.
    fn set_last_applied(
        &self,
        name: &str,
        commit: &str,
        fingerprint: &str,
    ) -> Result<(), StoreError>;
    fn drift(&self, name: &str) -> Result<DriftRow, StoreError>;
    fn set_drift(&self, name: &str, drift: &DriftRow) -> Result<(), StoreError>;
    fn start_run(&self, env: &str, commit: &str, kind: &str) -> Result<i64, StoreError>;
    fn finish_run(
        &self,
        id: i64,
        result: &str,
        summary: Summary,
        resources: &[serde_json::Value],
        message: &str,
    ) -> Result<(), StoreError>;
    /// A run that was decided but never started (superseded, refused before terraform).
    fn record_run(
        &self,
        env: &str,
        commit: &str,
        kind: &str,
        result: &str,
        message: &str,
    ) -> Result<i64, StoreError>;
    /// The newest `limit` runs, of one environment or of all.
    fn runs(&self, env: Option<&str>, limit: usize) -> Result<Vec<RunRow>, StoreError>;
    fn run(&self, id: i64) -> Result<Option<RunRow>, StoreError>;
    fn audit(
        &self,
        env: &str,
        commit: &str,
        decision: &str,
        detail: &str,
    ) -> Result<(), StoreError>;
    /// Marks every run still open as `interrupted` and returns them (a restart after a kill).
    fn interrupt_open_runs(&self) -> Result<Vec<RunRow>, StoreError>;
    fn enqueue_alert(&self, sinks: &[String], body: &str) -> Result<(), StoreError>;
    fn due_alerts(&self, now_unix: i64) -> Result<Vec<OutboxEntry>, StoreError>;
    fn alert_delivered(&self, id: i64) -> Result<(), StoreError>;
    fn alert_failed(&self, id: i64, next_attempt_unix: i64, error: &str) -> Result<(), StoreError>;
}

/// The SQLite store.
pub struct SqliteStore {
    path: String,
    connection: Mutex<Connection>,
    /// Statuses the database refused, by environment: what the daemon knows, shown until
    /// they are written.
    unrecorded: Mutex<BTreeMap<String, String>>,
}

const MIGRATIONS: [&str; 2] = [
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
];

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
        Ok(SqliteStore {
            path: name,
            connection: Mutex::new(connection),
            unrecorded: Mutex::new(BTreeMap::new()),
        })
    }

    /// `row` with the status the database refused to take, when there is one.
    fn known(&self, mut row: EnvironmentRow) -> EnvironmentRow {
        if let Ok(unrecorded) = self.unrecorded.lock()
            && let Some(status) = unrecorded.get(&row.name)
        {
            row.status = status.clone();
        }
        row
    }

    fn write_status(&self, name: &str, status: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE environments SET status = ?2 WHERE name = ?1",
                params![name, status],
            )
            .map(drop)
        })
    }

    fn with<T>(
        &self,
        work: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let connection = self
            .connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        work(&connection).map_err(|source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }
}

const RUN_COLUMNS: &str = "id, env, commit_id, kind, result, add_count, change_count, destroy_count, resources, started_at, finished_at, message";

fn run_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
    let resources: String = row.get(8)?;
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
        resources: serde_json::from_str(&resources).unwrap_or_default(),
        started_at: row.get(9)?,
        finished_at: row.get(10)?,
        message: row.get(11)?,
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
    })
}

const ENVIRONMENT_COLUMNS: &str = "name, branch, head, last_applied, applied_fingerprint, status";

impl StateStore for SqliteStore {
    fn environments(&self) -> Result<Vec<EnvironmentRow>, StoreError> {
        self.with(|c| {
            c.prepare(&format!(
                "SELECT {ENVIRONMENT_COLUMNS} FROM environments ORDER BY name"
            ))?
            .query_map([], environment_row)?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map(|rows| rows.into_iter().map(|row| self.known(row)).collect())
    }

    fn environment(&self, name: &str) -> Result<Option<EnvironmentRow>, StoreError> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {ENVIRONMENT_COLUMNS} FROM environments WHERE name = ?1"),
                [name],
                environment_row,
            )
            .optional()
        })
        .map(|row| row.map(|row| self.known(row)))
    }

    fn upsert_environment(&self, name: &str, branch: &str, head: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO environments (name, branch, head, status) VALUES (?1, ?2, ?3, 'planning')
                 ON CONFLICT (name) DO UPDATE SET branch = ?2, head = ?3",
                params![name, branch, head],
            )
            .map(drop)
        })
    }

    fn set_status(&self, name: &str, status: &str) -> Result<(), StoreError> {
        let written = self.write_status(name, status);
        if let Ok(mut unrecorded) = self.unrecorded.lock() {
            match &written {
                Ok(()) => unrecorded.remove(name),
                Err(error) => {
                    tracing::error!(env = name, status, %error, "the status could not be recorded; it is shown from memory and written again on the next poll");
                    unrecorded.insert(name.to_string(), status.to_string())
                }
            };
        }
        written
    }

    fn record_pending(&self) {
        let pending: Vec<(String, String)> = match self.unrecorded.lock() {
            Ok(unrecorded) => unrecorded.clone().into_iter().collect(),
            Err(_) => return,
        };
        for (name, status) in pending {
            if self.write_status(&name, &status).is_ok()
                && let Ok(mut unrecorded) = self.unrecorded.lock()
                && unrecorded.get(&name) == Some(&status)
            {
                unrecorded.remove(&name);
            }
        }
    }

    fn set_last_applied(
        &self,
        name: &str,
        commit: &str,
        fingerprint: &str,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE environments SET last_applied = ?2, applied_fingerprint = ?3 WHERE name = ?1",
                params![name, commit, fingerprint],
            )
            .map(drop)
        })
    }

    fn drift(&self, name: &str) -> Result<DriftRow, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT drift_status, drift_checked_at, drift_in_sync_at, drift_resources, drift_message
                 FROM environments WHERE name = ?1",
                [name],
                |row| {
                    let resources: String = row.get(3)?;
                    Ok(DriftRow {
                        status: row.get(0)?,
                        checked_at: row.get(1)?,
                        in_sync_at: row.get(2)?,
                        resources: serde_json::from_str(&resources).unwrap_or_default(),
                        message: row.get(4)?,
                    })
                },
            )
            .optional()
            .map(Option::unwrap_or_default)
        })
    }

    fn set_drift(&self, name: &str, drift: &DriftRow) -> Result<(), StoreError> {
        let resources = serde_json::to_string(&drift.resources).unwrap_or_else(|_| "[]".into());
        self.with(|c| {
            c.execute(
                "UPDATE environments SET drift_status = ?2, drift_checked_at = ?3,
                 drift_in_sync_at = ?4, drift_resources = ?5, drift_message = ?6 WHERE name = ?1",
                params![
                    name,
                    drift.status,
                    drift.checked_at,
                    drift.in_sync_at,
                    resources,
                    drift.message
                ],
            )
            .map(drop)
        })
    }

    fn start_run(&self, env: &str, commit: &str, kind: &str) -> Result<i64, StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO runs (env, commit_id, kind, started_at) VALUES (?1, ?2, ?3, ?4)",
                params![env, commit, kind, now_rfc3339()],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    fn finish_run(
        &self,
        id: i64,
        result: &str,
        summary: Summary,
        resources: &[serde_json::Value],
        message: &str,
    ) -> Result<(), StoreError> {
        let resources = serde_json::to_string(resources).unwrap_or_else(|_| "[]".into());
        self.with(|c| {
            c.execute(
                "UPDATE runs SET result = ?2, add_count = ?3, change_count = ?4, destroy_count = ?5,
                 resources = ?6, finished_at = ?7, message = ?8 WHERE id = ?1",
                params![
                    id,
                    result,
                    summary.add as i64,
                    summary.change as i64,
                    summary.destroy as i64,
                    resources,
                    now_rfc3339(),
                    message
                ],
            )
            .map(drop)
        })
    }

    fn record_run(
        &self,
        env: &str,
        commit: &str,
        kind: &str,
        result: &str,
        message: &str,
    ) -> Result<i64, StoreError> {
        self.with(|c| {
            let now = now_rfc3339();
            c.execute(
                "INSERT INTO runs (env, commit_id, kind, result, started_at, finished_at, message)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6)",
                params![env, commit, kind, result, now, message],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    fn runs(&self, env: Option<&str>, limit: usize) -> Result<Vec<RunRow>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(|c| match env {
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
        self.with(|c| {
            c.query_row(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"),
                [id],
                run_row,
            )
            .optional()
        })
    }

    fn audit(
        &self,
        env: &str,
        commit: &str,
        decision: &str,
        detail: &str,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO audit (at, env, commit_id, decision, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![now_rfc3339(), env, commit, decision, detail],
            )
            .map(drop)
        })
    }

    fn interrupt_open_runs(&self) -> Result<Vec<RunRow>, StoreError> {
        self.with(|c| {
            let open: Vec<RunRow> = c
                .prepare(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE finished_at IS NULL ORDER BY id"))?
                .query_map([], run_row)?
                .collect::<rusqlite::Result<_>>()?;
            c.execute(
                "UPDATE runs SET result = 'interrupted', finished_at = ?1,
                 message = 'the daemon stopped while this run was in progress' WHERE finished_at IS NULL",
                [now_rfc3339()],
            )?;
            Ok(open)
        })
    }

    fn enqueue_alert(&self, sinks: &[String], body: &str) -> Result<(), StoreError> {
        self.with(|c| {
            let transaction = c.unchecked_transaction()?;
            for sink in sinks {
                transaction.execute(
                    "INSERT INTO outbox (sink, body) VALUES (?1, ?2)",
                    params![sink, body],
                )?;
            }
            transaction.commit()
        })
    }

    fn due_alerts(&self, now_unix: i64) -> Result<Vec<OutboxEntry>, StoreError> {
        self.with(|c| {
            c.prepare(
                "SELECT id, sink, body, attempts FROM outbox
                 WHERE delivered_at IS NULL AND next_attempt_at <= ?1 ORDER BY id LIMIT 100",
            )?
            .query_map([now_unix], |row| {
                Ok(OutboxEntry {
                    id: row.get(0)?,
                    sink: row.get(1)?,
                    body: row.get(2)?,
                    attempts: row.get::<_, i64>(3)? as u32,
                })
            })?
            .collect()
        })
    }

    fn alert_delivered(&self, id: i64) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE outbox SET delivered_at = ?2, attempts = attempts + 1 WHERE id = ?1",
                params![id, now_rfc3339()],
            )
            .map(drop)
        })
    }

    fn alert_failed(&self, id: i64, next_attempt_unix: i64, error: &str) -> Result<(), StoreError> {
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

    #[test]
    fn a_status_the_database_refuses_is_shown_from_memory_and_written_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("karrots.db");
        let store = SqliteStore::open(&path).unwrap();
        store.upsert_environment("prod", "main", "abc").unwrap();
        store.set_status("prod", "applying").unwrap();
        let disk = Connection::open(&path).unwrap();
        disk.execute_batch(
            "CREATE TRIGGER full_disk BEFORE UPDATE ON environments
             BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END;",
        )
        .unwrap();
        assert!(store.set_status("prod", "in_sync").is_err());
        assert_eq!(
            store.environment("prod").unwrap().unwrap().status,
            "in_sync"
        );
        assert_eq!(store.environments().unwrap()[0].status, "in_sync");
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
            "in_sync"
        );
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
    fn runs_survive_a_reopen_and_open_ones_become_interrupted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("karrots.db");
        {
            let store = SqliteStore::open(&path).unwrap();
            store.upsert_environment("prod", "main", "abc").unwrap();
            let plan = store.start_run("prod", "abc", "plan").unwrap();
            store
                .finish_run(
                    plan,
                    "changes",
                    Summary {
                        add: 1,
                        change: 0,
                        destroy: 0,
                    },
                    &[],
                    "",
                )
                .unwrap();
            store.start_run("prod", "abc", "apply").unwrap();
            // The daemon dies here, mid-apply.
        }
        let store = SqliteStore::open(&path).unwrap();
        let interrupted = store.interrupt_open_runs().unwrap();
        assert_eq!(interrupted.len(), 1);
        assert_eq!(interrupted[0].kind, "apply");
        let runs = store.runs(Some("prod"), 200).unwrap();
        assert_eq!(runs[0].result.as_deref(), Some("interrupted"));
        assert_eq!(runs[1].result.as_deref(), Some("changes"));
        assert_eq!(runs[1].summary.add, 1);
        assert!(
            store.interrupt_open_runs().unwrap().is_empty(),
            "reported once"
        );
    }

    #[test]
    fn drift_findings_are_kept_per_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("karrots.db");
        let found = DriftRow {
            status: "drifted".into(),
            checked_at: Some("2026-11-23T10:00:00Z".into()),
            in_sync_at: Some("2026-11-23T09:00:00Z".into()),
            resources: vec![serde_json::json!({"address": "aws_vpc.main", "actions": ["update"]})],
            message: String::new(),
        };
        {
            let store = SqliteStore::open(&path).unwrap();
            store.upsert_environment("prod", "main", "abc").unwrap();
            store.upsert_environment("dev", "dev", "abc").unwrap();
            assert_eq!(store.drift("prod").unwrap(), DriftRow::default());
            store.set_drift("prod", &found).unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.drift("prod").unwrap(), found);
        assert_eq!(store.drift("dev").unwrap().status, "unchecked");
        assert_eq!(store.drift("nowhere").unwrap(), DriftRow::default());
    }

    #[test]
    fn alerts_wait_in_the_outbox_until_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("karrots.db")).unwrap();
        store
            .enqueue_alert(
                &["http://a.invalid/".into(), "http://b.invalid/".into()],
                "{}",
            )
            .unwrap();
        let due = store.due_alerts(0).unwrap();
        assert_eq!(due.len(), 2);
        store.alert_delivered(due[0].id).unwrap();
        store.alert_failed(due[1].id, 100, "refused").unwrap();
        assert!(store.due_alerts(99).unwrap().is_empty());
        let retry = store.due_alerts(100).unwrap();
        assert_eq!(retry.len(), 1);
        assert_eq!(retry[0].attempts, 1);
    }
}
