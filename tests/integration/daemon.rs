//! `karrots serve` end to end: the real binary watching a bare git remote that a working clone
//! pushes to, real terraform, moto for STS, and a local HTTP sink collecting the alerts (the
//! harness is `support::daemon`).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::daemon::{CANARY_SECRET, Fixture, http, no_file_contains, slow_resource};
use crate::support::{environment_yaml, karrots_binary};

#[test]
fn merges_apply_to_their_own_environment_and_branches_only_preview() {
    let mut fixture = Fixture::new("");
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("prod and dev applied", |f| {
        f.applied("prod", &first) && f.applied("dev", &first)
    });
    fixture.wait_for("the applied alert", |f| {
        f.sink.kinds("prod").contains(&"applied".to_string())
    });
    let applied = fixture.sink.find("prod", "applied").unwrap();
    assert_eq!(applied["commit"], first.as_str());
    assert_eq!(applied["resources"][0]["address"], "terraform_data.app");
    assert_eq!(applied["resources"][0]["actions"][0], "create");

    // A commit on dev changes dev only.
    fixture.clone.git(&["checkout", "-q", "-b", "dev"]);
    fixture
        .clone
        .replace("modules/dev-app/main.tf", "\"v1\"", "\"v2\"");
    let dev_commit = fixture.clone.commit_all("dev: v2");
    let prod_runs = fixture.runs("prod").len();
    fixture.push("dev");
    fixture.wait_for("dev applied", |f| f.applied("dev", &dev_commit));
    assert_eq!(
        fixture.runs("prod").len(),
        prod_runs,
        "prod did not run for a dev commit"
    );
    assert_eq!(fixture.environment("prod")["last_applied"], first.as_str());

    // A merge to main that changes prod's module applies to prod; dev does not re-plan.
    fixture.clone.git(&["checkout", "-q", "main"]);
    fixture
        .clone
        .replace("modules/prod-app/main.tf", "\"v1\"", "\"v2\"");
    let prod_commit = fixture.clone.commit_all("prod: v2");
    let dev_runs = fixture.runs("dev").len();
    fixture.push("main");
    fixture.wait_for("prod applied", |f| f.applied("prod", &prod_commit));
    let runs = fixture.runs("prod");
    assert_eq!(runs[0]["kind"], "apply");
    assert_eq!(runs[0]["result"], "applied");
    assert_eq!(runs[0]["summary"]["change"], 1);
    assert_eq!(runs[1]["kind"], "plan");
    assert_eq!(runs[1]["result"], "changes");
    // dev's branch did not move: no dev run.
    assert_eq!(fixture.runs("dev").len(), dev_runs);

    // A commit on main that touches nothing prod is built from: recorded, not planned.
    fixture
        .clone
        .write("README.md", "# the config repository\n");
    let readme = fixture.clone.commit_all("a README");
    let prod_runs = fixture.runs("prod").len();
    fixture.push("main");
    fixture.wait_for("prod at the README commit", |f| f.applied("prod", &readme));
    assert_eq!(
        fixture.runs("prod").len(),
        prod_runs,
        "no plan for an unaffected commit: {:#?}",
        fixture.runs("prod")
    );
    let prod_commit = readme;

    // A feature branch gets a preview and nothing is applied.
    fixture.clone.git(&["checkout", "-q", "-b", "feature"]);
    fixture
        .clone
        .replace("modules/prod-app/main.tf", "\"v2\"", "\"v3\"");
    let feature = fixture.clone.commit_all("feature: v3");
    fixture.push("feature");
    fixture.wait_for("a preview of the feature branch", |f| {
        f.runs("prod").iter().any(|run| {
            run["kind"] == "preview"
                && run["commit"] == feature.as_str()
                && run["result"] == "changes"
        })
    });
    assert_eq!(
        fixture.environment("prod")["last_applied"],
        prod_commit.as_str()
    );
    let preview_plans = fixture.state_dir().join("environments/prod/preview/plans");
    assert_eq!(
        std::fs::read_dir(preview_plans).unwrap().count(),
        0,
        "preview artifacts deleted"
    );

    // `karrots status` prints the table.
    let status = Command::new(karrots_binary())
        .args(["status", "--server", &format!("http://{}", fixture.address)])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        table.lines().any(|l| l.starts_with("prod")
            && l.contains(&prod_commit[..7])
            && l.contains("in_sync")),
        "{table}"
    );

    // SIGTERM: a clean shutdown, exit 0.
    let exit = fixture.stop("-TERM");
    assert!(exit.success(), "{exit:?}\n{}", fixture.logs());

    // No credential reached the state directory or the logs.
    if let Err(file) = no_file_contains(fixture.state.path(), CANARY_SECRET) {
        panic!("the AWS secret key was written to {file}");
    }
}

#[test]
fn force_pushes_destroys_and_bad_configuration_are_refused() {
    let fixture = Fixture::new("");
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("prod applied", |f| {
        f.applied("prod", &first) && f.applied("dev", &first)
    });

    // A replacement of prod's resource, with allow_destroy false: refused, alerted.
    fixture.clone.replace(
        "modules/prod-app/main.tf",
        "input = var.label",
        "input = var.label\n  triggers_replace = [\"2\"]",
    );
    let replacing = fixture.clone.commit_all("replace it");
    fixture.push("main");
    fixture.wait_for("the replacement refused", |f| {
        f.sink.find("prod", "refused").is_some()
    });
    let refused = fixture.sink.find("prod", "refused").unwrap();
    assert_eq!(refused["commit"], replacing.as_str());
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("terraform_data.app (delete, create)"),
        "{refused}"
    );
    assert_eq!(fixture.environment("prod")["status"], "refused");
    assert_eq!(fixture.environment("prod")["last_applied"], first.as_str());

    // A force-push of main to a commit that does not descend from the applied one.
    fixture.clone.git(&["reset", "-q", "--hard", &first]);
    fixture
        .clone
        .git(&["commit", "-q", "--amend", "-m", "amended root"]);
    let amended = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.push("main");
    fixture.wait_for("history_rewritten", |f| {
        f.sink.find("prod", "history_rewritten").is_some()
    });
    assert_eq!(
        fixture.sink.find("prod", "history_rewritten").unwrap()["commit"],
        amended.as_str()
    );
    assert_eq!(
        fixture.environment("prod")["last_applied"],
        first.as_str(),
        "nothing applied"
    );

    // History that descends from the applied commit again is planned and applied again.
    fixture.clone.git(&["reset", "-q", "--hard", &first]);
    let descends = fixture.merge_prod_label("v2", "back on track");
    assert_eq!(fixture.environment("prod")["status"], "in_sync");

    // A bad karrots.yaml on dev's branch: config_error naming the line; prod goes on.
    fixture.clone.git(&["checkout", "-q", "-b", "dev", &first]);
    fixture
        .clone
        .append("environments/dev/karrots.yaml", "aply:\n  auto: true\n");
    let broken = fixture.clone.commit_all("typo");
    fixture.push("dev");
    fixture.wait_for("config_error for dev", |f| {
        f.sink.find("dev", "config_error").is_some()
    });
    let error = fixture.sink.find("dev", "config_error").unwrap();
    assert_eq!(error["commit"], broken.as_str());
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("environments/dev/karrots.yaml:10: aply: unknown key `aply`"),
        "{error}"
    );
    assert_eq!(fixture.environment("dev")["status"], "error");
    assert_eq!(
        fixture.environment("prod")["last_applied"],
        descends.as_str(),
        "prod goes on"
    );
}

#[test]
fn webhooks_must_verify() {
    // No polling: every fetch after the first is a hook's.
    let fixture = Fixture::with_poll("", "1h");
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("the first poll's applies", |f| {
        f.applied("prod", &first) && f.applied("dev", &first)
    });
    let fetches = || fixture.polls();
    let before = fetches();
    let body =
        br#"{"ref": "refs/heads/main", "after": "0000000000000000000000000000000000000000"}"#;
    let hook = |path: &str, headers: &[(&str, &str)]| {
        http(&fixture.address, "POST", path, headers, body).0
    };
    // Unsigned, SHA-1 only, forged: 401.
    assert_eq!(hook("/hooks/github", &[]), 401);
    assert_eq!(
        hook(
            "/hooks/github",
            &[(
                "x-hub-signature",
                "sha1=0123456789abcdef0123456789abcdef01234567"
            )]
        ),
        401
    );
    assert_eq!(
        hook(
            "/hooks/github",
            &[("x-hub-signature-256", &format!("sha256={}", "0".repeat(64)))]
        ),
        401
    );
    assert_eq!(
        hook("/hooks/gitea", &[("x-gitea-signature", &"0".repeat(64))]),
        401
    );
    assert_eq!(
        hook("/hooks/gitlab", &[("x-gitlab-token", "hook-secre")]),
        401
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fetches(), before, "a refused hook fetched");
    // Signed with the secret: accepted.
    let signature = {
        use hmac::{KeyInit, Mac};
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"hook-secret").unwrap();
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    };
    assert_eq!(
        hook(
            "/hooks/github",
            &[("x-hub-signature-256", &format!("sha256={signature}"))]
        ),
        202
    );
    assert_eq!(
        hook("/hooks/gitea", &[("x-gitea-signature", &signature)]),
        202
    );
    assert_eq!(
        hook("/hooks/gitlab", &[("x-gitlab-token", "hook-secret")]),
        202
    );
    // Each verified hook wakes one fetch at most; a burst is coalesced.
    fixture.wait_for("a fetch for the verified hooks", |_| fetches() > before);
    let after_three = fetches();
    assert!(
        after_three - before <= 3,
        "{} fetches",
        after_three - before
    );
    let github = [("x-hub-signature-256", format!("sha256={signature}"))];
    let headers: Vec<(&str, &str)> = github.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let burst: Vec<_> = (0..10)
        .map(|_| {
            let address = fixture.address.clone();
            let headers: Vec<(String, String)> = headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            std::thread::spawn(move || {
                let headers: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                http(&address, "POST", "/hooks/github", &headers, body).0
            })
        })
        .collect();
    for request in burst {
        assert_eq!(request.join().unwrap(), 202);
    }
    std::thread::sleep(Duration::from_millis(1500));
    let burst_fetches = fetches() - after_three;
    assert!(
        (1..=2).contains(&burst_fetches),
        "10 hooks at once made {burst_fetches} fetches"
    );
    // Over 25 MiB: 413 for a signed hook; an unsigned one is refused before its body is read.
    let big = vec![b'x'; 25 * 1024 * 1024 + 1];
    let signed = [("x-hub-signature-256", "sha256=00")];
    let (status, _) = http(&fixture.address, "POST", "/hooks/github", &signed, &big);
    assert_eq!(status, 413);
    let (status, _) = http(&fixture.address, "POST", "/hooks/github", &[], &big);
    assert_eq!(status, 401);
    let logs = fixture.logs();
    assert_eq!(logs.matches("verified webhook").count(), 13, "{logs}");
    assert!(!logs.contains("hook-secret"), "the secret reached the logs");
}

#[test]
fn commits_that_arrive_while_busy_are_coalesced_to_the_newest() {
    let fixture = Fixture::new("allow: [local-exec]\n");
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("prod applied", |f| f.applied("prod", &first));

    fixture
        .clone
        .append("modules/prod-app/main.tf", &slow_resource("slow", 6));
    let slow = fixture.clone.commit_all("a slow apply");
    fixture.push("main");
    fixture.wait_for("the slow apply", |f| {
        f.environment("prod")["status"] == "applying"
    });

    // Two commits while prod is busy: the first waits, the second supersedes it.
    fixture
        .clone
        .replace("modules/prod-app/main.tf", "\"v1\"", "\"v2\"");
    let older = fixture.clone.commit_all("v2");
    fixture.push("main");
    fixture.wait_for("the older commit seen", |f| {
        f.environment("prod")["head"] == older.as_str()
    });
    fixture
        .clone
        .replace("modules/prod-app/main.tf", "\"v2\"", "\"v3\"");
    let newest = fixture.clone.commit_all("v3");
    fixture.push("main");
    fixture.wait_for("the newest applied", |f| f.applied("prod", &newest));

    let runs = fixture.runs("prod");
    let of = |commit: &str| -> Vec<(String, String)> {
        runs.iter()
            .filter(|run| run["commit"] == commit)
            .map(|run| {
                (
                    run["kind"].as_str().unwrap().to_string(),
                    run["result"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    assert!(
        of(&slow).contains(&("apply".into(), "applied".into())),
        "{runs:#?}"
    );
    assert_eq!(
        of(&older),
        vec![("plan".to_string(), "superseded".to_string())],
        "{runs:#?}"
    );
    assert!(
        of(&newest).contains(&("apply".into(), "applied".into())),
        "{runs:#?}"
    );
}

#[test]
fn a_kill_during_an_apply_is_found_interrupted_and_never_reapplied_from_its_plan() {
    // terraform gets SIGTERM when the daemon dies: an apply cut off in the provisioner leaves
    // the resource tainted, and the re-plan after the restart replaces it.
    let mut fixture = Fixture::prod_applied("allow: [local-exec]\napply:\n  allow_destroy: true\n");
    let slow = fixture.start_slow_apply(5);
    fixture.stop("-KILL");
    fixture.start();

    fixture.wait_for("apply_interrupted", |f| {
        f.sink.find("prod", "apply_interrupted").is_some()
    });
    assert_eq!(
        fixture.sink.find("prod", "apply_interrupted").unwrap()["commit"],
        slow.as_str()
    );
    let interrupted: Vec<Value> = fixture
        .runs("prod")
        .into_iter()
        .filter(|run| run["kind"] == "apply" && run["result"] == "interrupted")
        .collect();
    assert_eq!(interrupted.len(), 1, "{:#?}", fixture.runs("prod"));

    // The restart re-plans from the real state; the cut-off plan file is never applied.
    fixture.wait_for("prod at the slow commit", |f| f.applied("prod", &slow));
    let applied_again = fixture
        .runs("prod")
        .into_iter()
        .filter(|run| {
            run["commit"] == slow.as_str() && run["kind"] == "apply" && run["result"] == "applied"
        })
        .count();
    assert!(applied_again <= 1, "{:#?}", fixture.runs("prod"));
    let plans_after_restart = fixture
        .runs("prod")
        .into_iter()
        .filter(|run| run["commit"] == slow.as_str() && run["kind"] == "plan")
        .count();
    assert_eq!(
        plans_after_restart, 2,
        "planned before the kill and again after it"
    );
}

/// The terraform processes (terraform and its providers) working under `dir`.
fn terraform_working_in(dir: &Path) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.starts_with("terraform"))
                && std::fs::read_link(format!("/proc/{pid}/cwd"))
                    .is_ok_and(|cwd| cwd.starts_with(dir))
        })
        .collect()
}

/// A daemon killed with SIGKILL during an apply leaves no terraform running as an orphan:
/// terraform gets SIGTERM at once (the parent-death signal).
#[test]
fn terraform_does_not_outlive_a_killed_daemon() {
    let mut fixture = Fixture::prod_applied("allow: [local-exec]\n");
    fixture.start_slow_apply(300);
    fixture.wait_for("terraform running", |f| {
        !terraform_working_in(&f.state_dir()).is_empty()
    });
    fixture.stop("-KILL");
    // Without the signal terraform lived on until its next progress line met the closed
    // pipe (11 s here); with it, it stops at once.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !terraform_working_in(&fixture.state_dir()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "terraform still runs 5 s after the daemon was killed: {:?}",
            terraform_working_in(&fixture.state_dir())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // What a provisioner started is terraform's grandchild and not bound to the daemon
    // (under the systemd unit its cgroup ends it): the test cleans it up itself.
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if std::fs::read_link(format!("/proc/{pid}/cwd"))
            .is_ok_and(|cwd| cwd.starts_with(fixture.state_dir()))
        {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

#[test]
fn a_push_to_a_file_remote_is_seen_at_once_without_polling() {
    // Polling once an hour: only the watch of the remote's refs can wake the daemon.
    let fixture = Fixture::with_poll("", "1h");
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("the first poll's applies", |f| f.applied("prod", &first));
    fixture
        .clone
        .replace("modules/prod-app/main.tf", "\"v1\"", "\"v2\"");
    let second = fixture.clone.commit_all("v2");
    let pushed = Instant::now();
    fixture.push("main");
    fixture.wait_for("the push seen through the watch", |f| {
        f.applied("prod", &second)
    });
    assert!(
        pushed.elapsed() < Duration::from_secs(60),
        "{:?}",
        pushed.elapsed()
    );
    assert!(
        fixture.logs().contains("watching the remote's refs"),
        "{}",
        fixture.logs()
    );
}

#[test]
fn an_environment_not_on_the_trust_branch_is_checked_and_never_planned() {
    let fixture = Fixture::new("");
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("prod applied", |f| f.applied("prod", &first));
    fixture.clone.git(&["checkout", "-q", "-b", "feature"]);
    fixture.clone.write(
        "environments/qa/karrots.yaml",
        &environment_yaml("qa", "qa", "modules/prod-app", ""),
    );
    let feature = fixture.clone.commit_all("a new environment, qa");
    fixture.push("feature");
    fixture.wait_for("qa checked", |f| !f.runs("qa").is_empty());
    let runs = fixture.runs("qa");
    assert_eq!(runs.len(), 1, "{runs:#?}");
    assert_eq!(runs[0]["commit"], feature.as_str());
    assert_eq!(runs[0]["kind"], "preview");
    assert_eq!(runs[0]["result"], "refused");
    assert_eq!(
        runs[0]["message"],
        "passes karrots check; not planned: the environment is not on the trust branch main: merge its karrots.yaml there first"
    );
    let plans = fixture.state_dir().join("environments/qa/preview/plans");
    assert!(!plans.exists() || std::fs::read_dir(&plans).unwrap().count() == 0);

    // A broken one is a config_error naming the line.
    fixture
        .clone
        .append("environments/qa/karrots.yaml", "nme: qa\n");
    let broken = fixture.clone.commit_all("typo in qa");
    fixture.push("feature");
    fixture.wait_for("config_error for qa", |f| {
        f.sink.find("qa", "config_error").is_some()
    });
    let error = fixture.sink.find("qa", "config_error").unwrap();
    assert_eq!(error["commit"], broken.as_str());
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("environments/qa/karrots.yaml:10: nme: unknown key"),
        "{error}"
    );
}

#[test]
fn a_failed_apply_is_alerted_and_the_next_commit_replans() {
    // A resource whose provisioner failed is tainted, and tainted means replaced: prod allows it.
    let fixture = Fixture::new("allow: [local-exec]\napply:\n  allow_destroy: true\n");
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("prod applied", |f| f.applied("prod", &first));

    // An apply that fails part-way: one resource is created, the next one's provisioner fails.
    fixture.clone.append(
        "modules/prod-app/main.tf",
        "\nresource \"terraform_data\" \"ok\" {}\n\nresource \"terraform_data\" \"broken\" {\n  depends_on = [terraform_data.ok]\n  provisioner \"local-exec\" {\n    command = \"echo the provisioner failed >&2; exit 1\"\n  }\n}\n",
    );
    let broken = fixture.clone.commit_all("an apply that fails");
    fixture.push("main");
    fixture.wait_for("apply_failed", |f| {
        f.sink.find("prod", "apply_failed").is_some()
    });
    let alert = fixture.sink.find("prod", "apply_failed").unwrap();
    assert_eq!(alert["commit"], broken.as_str());
    assert!(
        alert["message"]
            .as_str()
            .unwrap()
            .contains("the provisioner failed"),
        "{alert}"
    );
    assert!(
        alert["message"].as_str().unwrap().len() < 6 * 1024,
        "bounded output"
    );
    assert_eq!(fixture.environment("prod")["status"], "failed");
    assert_eq!(fixture.environment("prod")["last_applied"], first.as_str());

    // The next commit re-plans from the state the failed apply left.
    fixture.clone.replace(
        "modules/prod-app/main.tf",
        "echo the provisioner failed >&2; exit 1",
        "true",
    );
    let fixed = fixture.clone.commit_all("fix the provisioner");
    fixture.push("main");
    fixture.wait_for("prod applied at the fix", |f| f.applied("prod", &fixed));
    let plan = fixture
        .runs("prod")
        .into_iter()
        .find(|run| run["commit"] == fixed.as_str() && run["kind"] == "plan")
        .unwrap();
    let changes: Vec<(String, String)> = plan["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["address"].as_str().unwrap().to_string(),
                r["actions"].to_string(),
            )
        })
        .collect();
    assert_eq!(
        changes,
        vec![(
            "terraform_data.broken".to_string(),
            "[\"delete\",\"create\"]".to_string()
        )],
        "only the tainted resource is replaced; terraform_data.ok survived the failed apply"
    );
    assert_eq!(fixture.environment("prod")["status"], "in_sync");
}
