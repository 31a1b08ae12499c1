//! Several daemons on one PostgreSQL store (`store: postgres://…`), against real terraform
//! with its state in moto's S3 and locks in its DynamoDB: the environments spread over the
//! daemons, each commit is planned and applied once, a dead owner is taken over.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::cluster::Cluster;
use crate::support::daemon::APP;

fn applied_everywhere(cluster: &Cluster, daemon: usize, commit: &str, count: usize) -> bool {
    let envs = cluster.environments(daemon);
    envs.len() == count && envs.iter().all(|env| env["last_applied"] == commit)
}

#[test]
fn three_daemons_share_thirty_environments_and_apply_each_commit_once() {
    let mut cluster = Cluster::new(APP);
    cluster.start_registered(3);
    let first = cluster.add_environments(30, "");
    cluster.wait_for("every environment applied", Duration::from_secs(240), |c| {
        applied_everywhere(c, 0, &first, 30)
    });

    // Each daemon's API answers for every environment, with the same runs.
    for daemon in 1..3 {
        assert!(applied_everywhere(&cluster, daemon, &first, 30));
    }
    let runs = |daemon: usize| cluster.get(daemon, "/api/v1/runs?env=e07");
    assert_eq!(runs(0), runs(2));

    // Each environment applied exactly once, by whichever daemon held it; every daemon did
    // some of the work.
    let applies = cluster.applies();
    let mut per_env: BTreeMap<&str, usize> = BTreeMap::new();
    let mut per_daemon = [0usize; 3];
    for (env, daemon) in &applies {
        *per_env.entry(env).or_default() += 1;
        per_daemon[*daemon] += 1;
    }
    assert_eq!(per_env.len(), 30, "{applies:?}");
    assert!(per_env.values().all(|n| *n == 1), "{per_env:?}");
    assert!(
        per_daemon.iter().all(|n| *n > 0),
        "the work spread: {per_daemon:?}"
    );

    // Each applied alert reached the sink once.
    cluster.wait_for("the applied alerts", Duration::from_secs(30), |c| {
        (0..30).all(|n| !c.sink.all(&format!("e{n:02}"), "applied").is_empty())
    });
    for n in 0..30 {
        let env = format!("e{n:02}");
        assert_eq!(cluster.sink.all(&env, "applied").len(), 1, "{env}");
    }

    // A second commit: planned once and applied once per environment.
    let second = cluster.push_label_change();
    cluster.wait_for("the second commit applied", Duration::from_secs(240), |c| {
        applied_everywhere(c, 1, &second, 30)
    });
    let plans: usize = (0..30)
        .map(|n| {
            let runs = cluster.get(2, &format!("/api/v1/runs?env=e{n:02}"));
            runs.as_array()
                .unwrap()
                .iter()
                .filter(|run| run["kind"] == "plan" && run["commit"] == second.as_str())
                .count()
        })
        .sum();
    assert_eq!(plans, 30, "one plan per environment for the commit");
    assert_eq!(cluster.applies().len(), 60);
}

/// A root module whose first apply (and each label change) takes `seconds`.
fn slow_module(seconds: u32) -> String {
    format!(
        "{APP}\nresource \"terraform_data\" \"slow\" {{\n  triggers_replace = var.label\n  provisioner \"local-exec\" {{\n    command = \"sleep {seconds}\"\n  }}\n}}\n"
    )
}

/// Two daemons, two slow environments: one each. Returns the cluster, the commit, and the
/// daemon (index) that holds e00, once e00's apply runs there.
fn applying_on_its_owner() -> (Cluster, String, usize) {
    let mut cluster = Cluster::new(&slow_module(12));
    cluster.start_registered(2);
    // A kill during the provisioner leaves its resource tainted: the new owner's plan
    // replaces it, which these environments allow.
    let commit =
        cluster.add_environments(2, "allow: [local-exec]\napply:\n  allow_destroy: true\n");
    cluster.wait_for("e00 applying", Duration::from_secs(60), |c| {
        c.environments(0)
            .iter()
            .any(|env| env["name"] == "e00" && env["status"] == "applying")
    });
    let owner = cluster.owner("e00").expect("e00 is held");
    let index = cluster
        .daemons
        .iter()
        .position(|daemon| {
            let pid = daemon.child.as_ref().unwrap().id();
            owner.contains(&format!("-{pid}-"))
        })
        .expect("a daemon of the cluster holds e00");
    (cluster, commit, index)
}

fn e00_runs(cluster: &Cluster, daemon: usize) -> Vec<serde_json::Value> {
    cluster
        .get(daemon, "/api/v1/runs?env=e00")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The cut-off apply run of e00 stays `interrupted`, and the only apply runs that may be
/// `applied` are later ones: the new owner's, from a plan of its own. (Cut off before its
/// terraform started, the old owner left nothing applied; cut off during it, terraform may
/// have finished its work before it stopped, and the new plan then has no changes.)
fn only_the_new_owner_applied(runs: &[serde_json::Value]) {
    let cut = runs
        .iter()
        .find(|run| run["kind"] == "apply" && run["result"] == "interrupted")
        .unwrap_or_else(|| panic!("the new owner ended the cut-off run: {runs:#?}"));
    let cut_id = cut["id"].as_i64().unwrap();
    assert!(
        runs.iter().all(|run| run["kind"] != "apply"
            || run["result"] != "applied"
            || run["id"].as_i64().unwrap() > cut_id),
        "only the new owner's own apply may be applied: {runs:#?}"
    );
    let plans_after = runs
        .iter()
        .filter(|run| run["kind"] == "plan" && run["id"].as_i64().unwrap() > cut_id)
        .count();
    assert_eq!(plans_after, 1, "the commit was planned again: {runs:#?}");
}

#[test]
fn a_killed_owner_is_taken_over_and_its_cut_off_apply_is_not_applied_again() {
    let (mut cluster, commit, owner) = applying_on_its_owner();
    let other = 1 - owner;
    let killed = std::time::Instant::now();
    cluster.signal(owner, "-KILL");
    cluster.wait_for("e00 taken over", Duration::from_secs(60), |c| {
        c.logs(other).contains("leases taken")
            && c.owner("e00").is_some_and(|o| !o.is_empty())
            && e00_runs(c, other)
                .iter()
                .any(|run| run["result"] == "interrupted")
    });
    let failover = killed.elapsed();
    cluster.wait_for(
        "e00 applied by the new owner",
        Duration::from_secs(120),
        |c| {
            c.environments(other)
                .iter()
                .any(|env| env["name"] == "e00" && env["last_applied"] == commit.as_str())
        },
    );
    let runs = e00_runs(&cluster, other);
    only_the_new_owner_applied(&runs);
    let plans = runs.iter().filter(|run| run["kind"] == "plan").count();
    assert_eq!(plans, 2, "{runs:#?}");
    cluster.wait_for(
        "the interrupted apply alerted",
        Duration::from_secs(30),
        |c| !c.sink.all("e00", "apply_interrupted").is_empty(),
    );
    assert_eq!(cluster.sink.all("e00", "apply_interrupted").len(), 1);
    eprintln!("failover after kill -9: {failover:?} (lease 6s)");
    assert!(
        failover < Duration::from_secs(12),
        "within twice the lease: {failover:?}"
    );
}

#[test]
fn a_paused_owner_past_its_lease_starts_nothing_and_its_late_writes_are_refused() {
    let (mut cluster, commit, owner) = applying_on_its_owner();
    let other = 1 - owner;
    cluster.signal(owner, "-STOP");
    cluster.wait_for(
        "e00 taken over and back in sync",
        Duration::from_secs(120),
        |c| {
            c.environments(other).iter().any(|env| {
                env["name"] == "e00"
                    && env["last_applied"] == commit.as_str()
                    && env["status"] == "in_sync"
            })
        },
    );
    let applies_before = cluster.applies().len();
    cluster.signal(owner, "-CONT");
    // The paused daemon's terraform finished meanwhile; its record of that apply is refused,
    // and it starts nothing for e00 again.
    cluster.wait_for("the late write refused", Duration::from_secs(60), |c| {
        c.logs(owner).contains("does not hold its lease")
    });
    std::thread::sleep(Duration::from_secs(8));
    let runs = e00_runs(&cluster, other);
    // The paused daemon's late "applied" did not land.
    only_the_new_owner_applied(&runs);
    let late: Vec<(String, usize)> = cluster.applies()[applies_before..]
        .iter()
        .filter(|(env, daemon)| env == "e00" && *daemon == owner)
        .cloned()
        .collect();
    assert!(late.is_empty(), "{late:?}");
}

#[test]
fn daemons_ride_out_a_database_restart_without_a_double_apply() {
    let mut cluster = Cluster::new(APP);
    cluster.start_registered(2);
    let first = cluster.add_environments(4, "");
    cluster.wait_for("applied", Duration::from_secs(120), |c| {
        applied_everywhere(c, 0, &first, 4)
    });
    // State on one host's disk is refused under a shared store, whichever daemon holds it.
    cluster.clone.write(
        "environments/local/karrots.yaml",
        "apiVersion: karrots/v1\nname: local\nbranch: main\naws:\n  account_id: \"123456789012\"\n  region: us-east-1\nterraform:\n  root: modules/app\n",
    );
    let with_local = cluster.clone.commit_all("an environment with local state");
    cluster.clone.git(&["push", "-q", "origin", "main"]);
    cluster.wait_for("the local backend refused", Duration::from_secs(60), |c| {
        c.environments(0)
            .iter()
            .any(|env| env["name"] == "local" && env["status"] == "error")
            && !c.sink.all("local", "config_error").is_empty()
    });
    let refused = cluster.sink.all("local", "config_error");
    assert_eq!(refused.len(), 1, "{refused:#?}");
    assert!(
        refused[0]["message"]
            .as_str()
            .unwrap()
            .contains("use the s3 backend"),
        "{refused:#?}"
    );
    assert!(!cluster.applies().iter().any(|(env, _)| env == "local"));
    cluster.wait_for(
        "the others at the new commit",
        Duration::from_secs(60),
        |c| {
            c.environments(0)
                .iter()
                .filter(|env| env["name"] != "local")
                .all(|env| env["last_applied"] == with_local.as_str())
        },
    );
    cluster.postgres.stop();
    cluster.wait_for("healthz says why", Duration::from_secs(30), |c| {
        let (status, body) =
            crate::support::daemon::http(&c.daemons[1].address, "GET", "/healthz", &[], b"");
        status == 503 && body.contains("state database")
    });
    cluster.postgres.start_again();
    cluster.wait_for("healthy again", Duration::from_secs(60), |c| {
        (0..2).all(|daemon| {
            crate::support::daemon::http(&c.daemons[daemon].address, "GET", "/healthz", &[], b"").0
                == 200
        })
    });
    let second = cluster.push_label_change();
    cluster.wait_for("the second commit applied", Duration::from_secs(120), |c| {
        c.environments(1)
            .iter()
            .filter(|env| env["name"] != "local")
            .all(|env| env["last_applied"] == second.as_str())
    });
    let applies = cluster.applies();
    assert_eq!(
        applies.len(),
        8,
        "each commit applied once per environment: {applies:?}"
    );
}

/// A hook reaches one daemon; the daemon that holds the environment fetches too (`NOTIFY`),
/// though it polls once an hour and does not watch the remote.
#[test]
fn a_hook_to_any_daemon_wakes_the_owner() {
    let mut cluster = Cluster::new(APP);
    cluster.poll = "1h";
    cluster.watch = false;
    cluster.start_registered(2);
    let first = cluster.add_environments(2, "");
    assert_eq!(cluster.hook(0), 202);
    cluster.wait_for(
        "both applied, after one hook to daemon 0",
        Duration::from_secs(60),
        |c| applied_everywhere(c, 0, &first, 2),
    );
    let by: Vec<usize> = cluster
        .applies()
        .iter()
        .map(|(_, daemon)| *daemon)
        .collect();
    assert!(
        by.contains(&0) && by.contains(&1),
        "each daemon applied one: {by:?}"
    );

    let second = cluster.push_label_change();
    assert_eq!(cluster.hook(0), 202);
    cluster.wait_for(
        "both applied the second commit",
        Duration::from_secs(60),
        |c| applied_everywhere(c, 0, &second, 2),
    );
    let second_by: Vec<usize> = cluster.applies()[2..].iter().map(|(_, d)| *d).collect();
    assert!(
        second_by.contains(&1),
        "daemon 1 got no hook and applied: {second_by:?}"
    );
}

/// What belongs to no environment's lease is raised by one daemon, the holder of the
/// repository lease: a remote that cannot be fetched, a trust-branch karrots.yaml that does
/// not load, an environment a branch defines and the trust branch does not.
#[test]
fn the_repository_s_alerts_are_raised_once() {
    let mut cluster = Cluster::new(APP);
    cluster.start_registered(2);
    let first = cluster.add_environments(2, "");
    cluster.wait_for("applied", Duration::from_secs(120), |c| {
        applied_everywhere(c, 0, &first, 2)
    });
    assert_eq!(
        cluster.owner("").map(|owner| owner.is_empty()),
        Some(false),
        "a daemon holds the repository lease"
    );

    // A branch defining an environment the trust branch does not: checked once.
    cluster.clone.git(&["checkout", "-q", "-b", "feature"]);
    cluster.clone.write(
        "environments/newenv/karrots.yaml",
        &crate::support::cluster::s3_environment("newenv", ""),
    );
    cluster.clone.commit_all("a new environment, on a branch");
    cluster.clone.git(&["push", "-q", "origin", "feature"]);
    cluster.clone.git(&["checkout", "-q", "main"]);
    let newenv_runs = |c: &Cluster, daemon: usize| {
        c.get(daemon, "/api/v1/runs?env=newenv")
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    cluster.wait_for("newenv checked", Duration::from_secs(60), |c| {
        !newenv_runs(c, 0).is_empty()
    });

    // e01's karrots.yaml stops loading on the trust branch: one config_error.
    cluster.clone.write(
        "environments/e01/karrots.yaml",
        "apiVersion: karrots/v1\nname: e01\n",
    );
    cluster.clone.commit_all("e01 broken");
    cluster.clone.git(&["push", "-q", "origin", "main"]);
    cluster.wait_for("e01's config_error", Duration::from_secs(60), |c| {
        !c.sink.all("e01", "config_error").is_empty()
    });

    // The remote goes away: both daemons fail to fetch, one alert.
    let moved = cluster.remote.with_extension("away");
    std::fs::rename(&cluster.remote, &moved).unwrap();
    cluster.wait_for("both daemons failing", Duration::from_secs(60), |c| {
        (0..2).all(|daemon| c.logs(daemon).contains("fetch failed"))
            && !c.sink.all("", "source_error").is_empty()
    });
    // A few more failed polls on each.
    std::thread::sleep(Duration::from_secs(5));
    std::fs::rename(&moved, &cluster.remote).unwrap();

    let runs = newenv_runs(&cluster, 1);
    assert_eq!(runs.len(), 1, "{runs:#?}");
    assert_eq!(runs[0]["result"], "refused", "{runs:#?}");
    let broken = cluster.sink.all("e01", "config_error");
    let said = |daemon: usize| -> String {
        cluster
            .logs(daemon)
            .lines()
            .filter(|line| line.contains("e01") || line.contains("lease"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(broken.len(), 1, "{broken:#?}\n{}\n\n{}", said(0), said(1));
    let unreachable = cluster.sink.all("", "source_error");
    assert_eq!(unreachable.len(), 1, "{unreachable:#?}");
}

/// A daemon cut off from the database — the server goes silent, as in a partition, rather
/// than closing the connection — stops starting terraform by its own clock and says why on
/// `/healthz`; the other daemon takes its environments over once its leases lapse (the
/// server ends a transaction it left open, so no row lock holds the takeover), and applies
/// the next commit everywhere. When the network heals, the cut-off daemon's late writes are
/// refused, it takes its share back, and each commit is applied once per environment.
#[test]
fn a_daemon_cut_off_from_the_database_is_taken_over_and_rejoins() {
    use crate::support::daemon::http;
    use crate::support::proxy::Proxy;
    let mut cluster = Cluster::new(APP);
    let proxy = Proxy::start(cluster.postgres.port);
    let through_proxy = cluster.postgres.url().replace(
        &format!(":{}/", cluster.postgres.port),
        &format!(":{}/", proxy.port),
    );
    cluster.start_with_store(through_proxy);
    cluster.start();
    cluster.wait_for("the daemons registered", Duration::from_secs(30), |c| {
        c.registered() == 2
    });
    let first = cluster.add_environments(4, "");
    cluster.wait_for("applied", Duration::from_secs(120), |c| {
        applied_everywhere(c, 1, &first, 4)
    });
    let pid = cluster.daemons[0].child.as_ref().unwrap().id();
    let mark = format!("-{pid}-");
    let held_by_0 = |c: &Cluster| {
        (0..4)
            .filter(|n| {
                c.owner(&format!("e{n:02}"))
                    .is_some_and(|o| o.contains(&mark))
            })
            .count()
    };
    cluster.wait_for("two environments each", Duration::from_secs(30), |c| {
        held_by_0(c) == 2
    });
    let healthz = |c: &Cluster| http(&c.daemons[0].address, "GET", "/healthz", &[], b"");

    proxy.freeze();
    let frozen_at = cluster.applies().len();
    let second = cluster.push_label_change();
    cluster.wait_for("daemon 0 says why", Duration::from_secs(30), |c| {
        let (status, body) = healthz(c);
        status == 503 && body.contains("state database")
    });
    cluster.wait_for(
        "daemon 1 applied the commit everywhere",
        Duration::from_secs(120),
        |c| applied_everywhere(c, 1, &second, 4),
    );
    assert_eq!(held_by_0(&cluster), 0);
    let during: Vec<(String, usize)> = cluster.applies()[frozen_at..].to_vec();
    assert_eq!(during.len(), 4, "{during:?}");
    assert!(
        during.iter().all(|(_, daemon)| *daemon == 1),
        "the cut-off daemon started no terraform: {during:?}"
    );

    proxy.thaw();
    cluster.wait_for("daemon 0 healthy again", Duration::from_secs(60), |c| {
        healthz(c).0 == 200
    });
    cluster.wait_for(
        "daemon 0 holds its share again",
        Duration::from_secs(60),
        |c| held_by_0(c) == 2,
    );
    let third = cluster.push_label("v2", "v3");
    cluster.wait_for("the third commit applied", Duration::from_secs(120), |c| {
        applied_everywhere(c, 0, &third, 4)
    });
    let applies = cluster.applies();
    assert_eq!(
        applies.len(),
        12,
        "once per environment and commit: {applies:?}"
    );
    assert!(
        applies[frozen_at + 4..]
            .iter()
            .any(|(_, daemon)| *daemon == 0),
        "daemon 0 works again: {applies:?}"
    );
    // Nothing daemon 0 tried while cut off landed over daemon 1's records.
    for n in 0..4 {
        let runs = cluster.get(1, &format!("/api/v1/runs?env=e{n:02}"));
        let second_runs: Vec<&serde_json::Value> = runs
            .as_array()
            .unwrap()
            .iter()
            .filter(|run| run["commit"] == second.as_str())
            .collect();
        assert!(
            second_runs
                .iter()
                .filter(|run| run["kind"] == "apply")
                .all(|run| run["result"] == "applied"),
            "e{n:02}: {second_runs:#?}"
        );
    }
}

/// Terraform finds its own state lock held — a DynamoDB `PutItem` the AWS SDK sent again
/// after its answer was lost (seen under load against moto) — and would wait for it until it
/// gave up, and every retry after it. The daemon recognizes the lock as the run's own (its
/// operation, this user and host, taken after the run's terraform started), releases it and
/// applies. Here the wrapper plants such a lock just before the first apply.
#[test]
fn a_run_s_own_orphaned_state_lock_is_released_and_the_apply_goes_on() {
    let mut cluster = Cluster::new(APP);
    let aws = crate::support::tool_path("aws").expect("the aws CLI is installed");
    let marker = cluster.dir.path().join("planted");
    let wrapper = format!(
        r#"#!/bin/sh
case " $* " in *" apply "*)
  echo "$PWD" >> {applies}
  if [ ! -e {marker} ]; then
    touch {marker}
    created=$(date -u +%Y-%m-%dT%H:%M:%S.%NZ)
    info="{{\"ID\":\"0b9f7c8e-0000-4000-8000-000000000001\",\"Operation\":\"OperationTypeApply\",\"Info\":\"\",\"Who\":\"$(id -un)@$(hostname)\",\"Version\":\"1.11.4\",\"Created\":\"$created\",\"Path\":\"{bucket}/e00.tfstate\"}}"
    item=$(printf '{{"LockID":{{"S":"{bucket}/e00.tfstate"}},"Info":{{"S":"%s"}}}}' "$(printf '%s' "$info" | sed 's/"/\\"/g')")
    AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing {aws} --region us-east-1 --endpoint-url {moto} dynamodb put-item --table-name {locks} --item "$item" >/dev/null
  fi ;;
esac
exec terraform "$@"
"#,
        applies = cluster.applies.display(),
        marker = marker.display(),
        bucket = crate::support::cluster::BUCKET,
        locks = crate::support::cluster::LOCKS,
        aws = aws.display(),
        moto = cluster.moto.url,
    );
    std::fs::write(cluster.dir.path().join("terraform"), wrapper).unwrap();
    cluster.start_registered(1);
    let commit = cluster.add_environments(1, "");
    cluster.wait_for("e00 applied", Duration::from_secs(120), |c| {
        applied_everywhere(c, 0, &commit, 1)
    });
    assert!(marker.exists(), "the lock was planted");
    let logs = cluster.logs(0);
    assert!(
        logs.contains("terraform found its own state lock held")
            && logs.contains("0b9f7c8e-0000-4000-8000-000000000001"),
        "{logs}"
    );
    let applies = cluster.applies();
    assert_eq!(
        applies.len(),
        2,
        "one apply that found the lock, one after: {applies:?}"
    );
    let runs = cluster.get(0, "/api/v1/runs?env=e00");
    let applied: Vec<&serde_json::Value> = runs
        .as_array()
        .unwrap()
        .iter()
        .filter(|run| run["kind"] == "apply")
        .collect();
    assert_eq!(applied.len(), 1, "{runs:#?}");
    assert_eq!(applied[0]["result"], "applied");
}
