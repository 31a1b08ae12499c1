//! One store test suite, run against both stores: SQLite under a state dir, and PostgreSQL
//! on a throwaway server — the same calls, the same answers. Then what only a shared store
//! has: leases, their balance, and the fencing of a daemon that lost its lease.

use std::sync::Arc;
use std::time::Duration;

use karrots::store::postgres::{Held, Leases, PgStore, PgTarget, REPOSITORY};
use karrots::store::{
    Delivery, EnvStatus, HeadRow, Journal, OutboxKind, RunKind, RunRecord, RunResult, SqliteStore,
    StateStore, StoreError, Summary,
};

use crate::support::postgres::Postgres;

fn head(env: &str, commit: &str) -> HeadRow {
    HeadRow {
        env: env.into(),
        branch: "main".into(),
        head: commit.into(),
    }
}

fn status(env: &str, commit: &str, to: &str) -> Delivery {
    Delivery {
        kind: OutboxKind::Status,
        destination: format!("{commit} karrots/{env}"),
        body: to.into(),
    }
}

/// What every store must do, the same way.
fn suite(store: &dyn StateStore) {
    store
        .record_heads(&[head("prod", "c1"), head("dev", "c1")])
        .unwrap();
    let envs = store.environments().unwrap();
    let names: Vec<&str> = envs.iter().map(|env| env.name.as_str()).collect();
    assert_eq!(names, ["dev", "prod"]);
    assert_eq!(envs[1].status, EnvStatus::Planning, "a new environment");

    let plan = store
        .start_run(
            "prod",
            "c1",
            RunKind::Plan,
            Some(EnvStatus::Planning),
            &[status("prod", "c1", "pending")],
        )
        .unwrap();
    assert_eq!(store.open_runs().unwrap().len(), 1);
    let planned = Journal {
        env: "prod".into(),
        commit: "c1".into(),
        run: Some(RunRecord::Finish {
            id: plan,
            result: RunResult::Changes,
            summary: Summary {
                add: 1,
                change: 0,
                destroy: 0,
            },
            resources: vec![serde_json::json!({"address": "aws_vpc.main", "actions": ["create"]})],
            message: "approve with: git tag -s …".into(),
        }),
        status: Some(EnvStatus::AwaitingApproval),
        audit: Some(("awaiting_approval".into(), format!("run {plan}"))),
        outbox: vec![status("prod", "c1", "waiting")],
        plan_sha256: Some("ab12".into()),
        ..Journal::default()
    };
    assert_eq!(store.journal(&planned).unwrap(), Some(plan));
    let run = store.run(plan).unwrap().unwrap();
    assert_eq!(
        (run.result, run.summary.add, run.plan_sha256.as_deref()),
        (Some(RunResult::Changes), 1, Some("ab12"))
    );
    assert_eq!(run.resources[0]["address"], "aws_vpc.main");
    assert!(store.open_runs().unwrap().is_empty());
    let prod = store.environment("prod").unwrap().unwrap();
    assert_eq!(prod.status, EnvStatus::AwaitingApproval);

    // The newer status of the same commit and context superseded the pending one.
    let due = store.due(OutboxKind::Status, i64::MAX).unwrap();
    let bodies: Vec<&str> = due.iter().map(|entry| entry.body.as_str()).collect();
    assert_eq!(bodies, ["waiting"]);
    assert_eq!(due[0].run, Some(plan));
    store.delivery_failed(due[0].id, i64::MAX, "503").unwrap();
    assert!(
        store.due(OutboxKind::Status, 0).unwrap().is_empty(),
        "not due yet"
    );
    store.delivered(due[0].id).unwrap();
    assert!(store.due(OutboxKind::Status, i64::MAX).unwrap().is_empty());

    // A decided run, and several outcomes in one transaction.
    let superseded = Journal {
        env: "dev".into(),
        commit: "c0".into(),
        run: Some(RunRecord::Decided {
            kind: RunKind::Plan,
            result: RunResult::Superseded,
            message: "c1 arrived first".into(),
        }),
        ..Journal::default()
    };
    let ids = store
        .journal_all(&[head("dev", "c2")], &[superseded])
        .unwrap();
    let decided = store.run(ids[0].unwrap()).unwrap().unwrap();
    assert_eq!(decided.result, Some(RunResult::Superseded));
    assert_eq!(
        store.environment("dev").unwrap().unwrap().head.as_deref(),
        Some("c2")
    );
    let newest: Vec<i64> = store.runs(None, 10).unwrap().iter().map(|r| r.id).collect();
    assert_eq!(newest, [decided.id, plan], "newest first");
    assert_eq!(store.runs(Some("prod"), 10).unwrap().len(), 1);
    assert_eq!(store.commit_runs("c1", RunKind::Plan).unwrap().len(), 1);
}

#[test]
fn both_stores_answer_the_suite_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    suite(&SqliteStore::open(&dir.path().join("karrots.db")).unwrap());

    let server = Postgres::start();
    let (store, mut leases) = shared_store(&server, "daemon-a", Duration::from_secs(30));
    let round = leases.round(&names(&["dev", "prod"]), &|_| false).unwrap();
    assert_eq!(round.gained, ["dev", "prod"]);
    suite(&store);
    // The schema is not migrated twice, and a newer one is refused.
    drop(store);
    let (again, _) = shared_store(&server, "daemon-b", Duration::from_secs(30));
    assert_eq!(again.environments().unwrap().len(), 2);
    let mut client = postgres_client(&server);
    client
        .execute("UPDATE karrots_schema SET version = version + 1", &[])
        .unwrap();
    let newer = PgStore::open(target(&server), "daemon-c", Arc::default());
    assert!(
        matches!(newer, Err(StoreError::Newer { .. })),
        "{:?}",
        newer.err()
    );
}

fn names(envs: &[&str]) -> Vec<String> {
    envs.iter().map(|env| env.to_string()).collect()
}

fn target(server: &Postgres) -> PgTarget {
    PgTarget {
        url: server.url(),
        password_file: None,
        ca_file: None,
        lease: Duration::from_secs(30),
    }
}

fn postgres_client(server: &Postgres) -> postgres::Client {
    target(server).connect().unwrap()
}

/// A daemon's store and lease keeper on `server`.
fn shared_store(server: &Postgres, owner: &str, lease: Duration) -> (PgStore, Leases) {
    let held = Arc::new(Held::default());
    let store = PgStore::open(target(server), owner, held.clone()).unwrap();
    let leases = Leases::new(target(server), owner, held, lease);
    (store, leases)
}

#[test]
fn leases_spread_over_the_daemons_and_a_lost_lease_fences_its_writes() {
    let server = Postgres::start();
    let lease = Duration::from_secs(3);
    let (a, mut a_leases) = shared_store(&server, "a", lease);
    let (b, mut b_leases) = shared_store(&server, "b", lease);
    let envs = names(&["e1", "e2", "e3", "e4"]);
    let idle = |_: &str| false;

    // Alone, a takes all four; once b is alive, a gives up its excess and b takes it.
    assert_eq!(a_leases.round(&envs, &idle).unwrap().gained.len(), 4);
    let first = b_leases.round(&envs, &idle).unwrap();
    assert_eq!((first.gained.len(), first.daemons), (0, 2), "{first:?}");
    let shed = a_leases.round(&envs, &idle).unwrap();
    assert_eq!(shed.lost.len(), 2, "{shed:?}");
    let taken = b_leases.round(&envs, &idle).unwrap();
    assert_eq!(taken.gained, shed.lost, "b takes what a gave up");
    let (mine, theirs) = (a.held().environments(), b.held().environments());
    assert_eq!((mine.len(), theirs.len()), (2, 2));
    assert!(mine.iter().all(|env| !theirs.contains(env)));

    a.record_heads(&[head(&mine[0], "c1")]).unwrap();
    let refused = b.record_heads(&[head(&mine[0], "c1")]);
    assert!(
        matches!(refused, Err(StoreError::NotOwner { .. })),
        "{refused:?}"
    );

    // a stops renewing (paused, cut off): after the lease, b takes a's environments over,
    // with a new epoch. a still believes it holds them, and starts nothing only because its
    // own clock says the lease may have lapsed; its late writes are refused by the database.
    let run = a
        .start_run(
            &mine[0],
            "c1",
            RunKind::Apply,
            Some(EnvStatus::Applying),
            &[],
        )
        .unwrap();
    std::thread::sleep(lease + Duration::from_millis(500));
    assert!(!a.held().may_run(&mine[0]), "a's clock stops it first");
    let takeover = b_leases.round(&envs, &idle).unwrap();
    assert_eq!(takeover.gained, mine, "{takeover:?}");
    let late = Journal {
        env: mine[0].clone(),
        commit: "c1".into(),
        run: Some(RunRecord::Finish {
            id: run,
            result: RunResult::Applied,
            summary: Summary::default(),
            resources: Vec::new(),
            message: String::new(),
        }),
        status: Some(EnvStatus::InSync),
        ..Journal::default()
    };
    let refused = a.journal(&late);
    assert!(
        matches!(refused, Err(StoreError::NotOwner { .. })),
        "{refused:?}"
    );
    assert_eq!(
        b.environment(&mine[0]).unwrap().unwrap().status,
        EnvStatus::Applying,
        "nothing of the late write landed, nor is it shown from a's memory"
    );
    // The new owner finds the cut-off run open, and ends it.
    let open = b.open_runs().unwrap();
    assert_eq!(open.iter().map(|r| r.id).collect::<Vec<_>>(), [run]);
    let interrupted = Journal {
        run: Some(RunRecord::Finish {
            id: run,
            result: RunResult::Interrupted,
            summary: Summary::default(),
            resources: Vec::new(),
            message: "cut off".into(),
        }),
        status: Some(EnvStatus::Failed),
        ..late
    };
    b.journal(&interrupted).unwrap();
    // a learns it lost them at its next round.
    let lost = a_leases.round(&envs, &idle).unwrap();
    assert_eq!(lost.lost, mine);
}

/// An alert of no environment, or a record of an environment nobody holds (the trust
/// branch does not define it, or its karrots.yaml does not load), is written by the holder
/// of the repository lease alone; never over an environment another daemon holds.
#[test]
fn the_repository_lease_fences_what_no_environment_lease_does() {
    let server = Postgres::start();
    let lease = Duration::from_secs(30);
    let (a, mut a_leases) = shared_store(&server, "a", lease);
    let (b, mut b_leases) = shared_store(&server, "b", lease);
    let envs = names(&[REPOSITORY, "dev", "prod"]);
    let idle = |_: &str| false;
    let all = a_leases.round(&envs, &idle).unwrap();
    assert_eq!(all.gained.len(), 3, "{all:?}");
    b_leases.round(&envs, &idle).unwrap();
    // a gives up one environment to b; the repository lease is outside the share.
    a_leases.round(&envs, &idle).unwrap();
    let taken = b_leases.round(&envs, &idle).unwrap();
    assert_eq!(taken.gained, ["dev"], "{taken:?}");
    assert_eq!(a.held().environments(), [REPOSITORY, "prod"]);

    let alert = |env: &str| Journal {
        env: env.into(),
        commit: "c1".into(),
        outbox: vec![Delivery {
            kind: OutboxKind::Alert,
            destination: "http://sink.invalid/".into(),
            body: format!("about {env:?}"),
        }],
        ..Journal::default()
    };
    let fenced = |written: Result<Option<i64>, StoreError>| {
        assert!(
            matches!(written, Err(StoreError::NotOwner { .. })),
            "{written:?}"
        )
    };
    a.journal(&alert(REPOSITORY)).unwrap();
    fenced(b.journal(&alert(REPOSITORY)));
    a.journal(&alert("ghost")).unwrap();
    fenced(b.journal(&alert("ghost")));
    // dev is b's while b renews it; once its lease lapses (dev's karrots.yaml stopped
    // loading, so nobody renews it), its records are the repository's.
    fenced(a.journal(&alert("dev")));
    b.journal(&alert("dev")).unwrap();
    postgres_client(&server)
        .execute(
            "UPDATE leases SET expires_at = now() - interval '1 second' WHERE env = 'dev'",
            &[],
        )
        .unwrap();
    a.journal(&alert("dev")).unwrap();
    let sent = a.due(OutboxKind::Alert, i64::MAX).unwrap();
    let bodies: Vec<&str> = sent.iter().map(|entry| entry.body.as_str()).collect();
    assert_eq!(
        bodies,
        [
            r#"about """#,
            r#"about "ghost""#,
            r#"about "dev""#,
            r#"about "dev""#
        ]
    );
}

/// A daemon cut off from the database in the middle of a transaction leaves its lease row
/// locked, and the server, which sees a connection still open, would keep it so for hours:
/// our sessions ask the server to end a transaction idle for half a lease, and the other
/// daemon takes the environment over.
#[test]
fn a_transaction_left_open_by_a_silent_daemon_does_not_hold_a_takeover() {
    use crate::support::proxy::Proxy;
    let server = Postgres::start();
    let lease = Duration::from_secs(3);
    let proxy = Proxy::start(server.port);
    let through_proxy = PgTarget {
        url: server
            .url()
            .replace(&format!(":{}/", server.port), &format!(":{}/", proxy.port)),
        password_file: None,
        ca_file: None,
        lease,
    };
    let held = Arc::new(Held::default());
    let _a = PgStore::open(through_proxy.clone(), "a", held.clone()).unwrap();
    let mut a_leases = Leases::new(through_proxy.clone(), "a", held, lease);
    let (_b, mut b_leases) = shared_store(&server, "b", lease);
    let envs = names(&["prod"]);
    let idle = |_: &str| false;
    assert_eq!(a_leases.round(&envs, &idle).unwrap().gained, ["prod"]);
    // a locks its lease row in a transaction, as every write of a does, and goes silent.
    let mut client = through_proxy.connect().unwrap();
    let mut transaction = client.transaction().unwrap();
    transaction
        .execute("SELECT 1 FROM leases WHERE env = 'prod' FOR UPDATE", &[])
        .unwrap();
    proxy.freeze();
    let cut = std::time::Instant::now();
    let mut taken = Vec::new();
    while taken.is_empty() && cut.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(250));
        taken = b_leases.round(&envs, &idle).unwrap().gained;
    }
    let waited = cut.elapsed();
    // Thawed first: a failed assertion must not hang on the rollback of a's transaction.
    proxy.thaw();
    assert_eq!(taken, ["prod"], "b took prod over after {waited:?}");
    assert!(
        waited < lease * 3,
        "within the lease and half a lease more: {waited:?}"
    );
    let late = transaction.commit();
    assert!(late.is_err(), "the server ended a's transaction: {late:?}");
}

/// `sslmode=require`: the server's certificate is verified, against the system's CAs and
/// `store_ca_file`'s; without the CA that signed it, the connection is refused and says why.
#[test]
fn a_tls_server_is_verified_against_the_ca_file() {
    let server = Postgres::start_tls();
    let with_ca = PgTarget {
        url: server.url().replace("sslmode=disable", "sslmode=require"),
        password_file: None,
        ca_file: Some(server.ca_file()),
        lease: Duration::from_secs(30),
    };
    let mut client = with_ca.connect().unwrap();
    let encrypted: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(encrypted);
    let store = PgStore::open(with_ca.clone(), "a", Arc::default()).unwrap();
    store.record_heads(&[]).unwrap();
    assert!(store.environments().unwrap().is_empty());

    let without_ca = PgTarget {
        ca_file: None,
        ..with_ca.clone()
    };
    let refused = without_ca
        .connect()
        .err()
        .expect("an unknown CA is refused");
    assert!(refused.to_string().contains("UnknownIssuer"), "{refused}");
    let not_a_ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(not_a_ca.path(), "not a certificate\n").unwrap();
    let broken = PgTarget {
        ca_file: Some(not_a_ca.path().to_path_buf()),
        ..with_ca
    };
    let refused = broken
        .connect()
        .err()
        .expect("a CA file without a certificate");
    let expected = format!(
        "the state database's CA file {}: holds no PEM certificate",
        not_a_ca.path().display()
    );
    assert_eq!(refused.to_string(), expected);
}

/// The keeper renews a daemon's leases on one connection while the daemon's writes fence
/// the same rows on another: both lock them in the order of their names, so neither is
/// ever a deadlock's victim (a renewal that was made the keeper stop starting terraform for
/// a third of a lease, seen in the benchmark).
#[test]
fn renewals_and_writes_of_many_environments_never_deadlock() {
    let server = Postgres::start();
    let (a, mut a_leases) = shared_store(&server, "a", Duration::from_secs(30));
    let envs: Vec<String> = (0..40).map(|n| format!("e{n:02}")).collect();
    assert_eq!(a_leases.round(&envs, &|_| false).unwrap().gained.len(), 40);
    let heads: Vec<HeadRow> = envs.iter().rev().map(|env| head(env, "c1")).collect();
    let writer = std::thread::spawn(move || {
        (0..150)
            .map(|_| a.record_heads(&heads))
            .filter_map(Result::err)
            .map(|error| error.to_string())
            .collect::<Vec<_>>()
    });
    let renewals: Vec<String> = (0..150)
        .filter_map(|_| a_leases.round(&envs, &|_| false).err())
        .map(|error| error.to_string())
        .collect();
    let writes = writer.join().unwrap();
    assert!(renewals.is_empty(), "{renewals:?}");
    assert!(writes.is_empty(), "{writes:?}");
}

#[test]
fn each_delivery_is_claimed_by_one_daemon_in_order_per_destination() {
    let server = Postgres::start();
    let lease = Duration::from_secs(30);
    let (a, mut a_leases) = shared_store(&server, "a", lease);
    let (b, _) = shared_store(&server, "b", lease);
    a_leases.round(&names(&["prod"]), &|_| false).unwrap();
    for n in 0..3 {
        let alert = Delivery {
            kind: OutboxKind::Alert,
            destination: "http://sink.invalid/".into(),
            body: format!("alert {n}"),
        };
        a.journal(&Journal {
            env: "prod".into(),
            commit: "c1".into(),
            outbox: vec![alert],
            ..Journal::default()
        })
        .unwrap();
    }
    let claimed = a.due(OutboxKind::Alert, i64::MAX).unwrap();
    assert_eq!(claimed.len(), 3);
    assert!(
        b.due(OutboxKind::Alert, i64::MAX).unwrap().is_empty(),
        "claimed by a"
    );
    // a delivers the first and dies; b takes the rest once a's claim lapses, in order.
    a.delivered(claimed[0].id).unwrap();
    let mut client = postgres_client(&server);
    client
        .execute(
            "UPDATE outbox SET claimed_until = now() - interval '1 second'",
            &[],
        )
        .unwrap();
    let rest: Vec<String> = b
        .due(OutboxKind::Alert, i64::MAX)
        .unwrap()
        .into_iter()
        .map(|entry| entry.body)
        .collect();
    assert_eq!(rest, ["alert 1", "alert 2"]);
}
