//! Approvals and signed commits against the real daemon: keys made by `ssh-keygen`, tags
//! made by `git tag -s` and commits by `git commit -S` (SSH format), pushed to the remote the
//! daemon fetches; real terraform plans and applies.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::support::daemon::Fixture;
use crate::support::require_tool;

/// A key made by `ssh-keygen`, and who holds it.
struct Key {
    path: PathBuf,
    email: String,
    public: String,
}

impl Key {
    fn new(dir: &Path, name: &str, email: &str) -> Key {
        require_tool("ssh-keygen", "apt-get install openssh-client");
        let path = dir.join(name);
        let made = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", email, "-f"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(made.status.success(), "{made:?}");
        let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
        Key {
            path,
            email: email.to_string(),
            public: public.trim().to_string(),
        }
    }

    /// Its entry of `apply.approval.approvers` or `verify.signers`.
    fn entry(&self) -> String {
        format!(
            "      - {{ email: {}, key: \"{}\" }}\n",
            self.email, self.public
        )
    }

    /// `-c` settings that make git sign with this key, in SSH format.
    fn signing(&self) -> [String; 4] {
        [
            "-c".into(),
            "gpg.format=ssh".into(),
            "-c".into(),
            format!("user.signingkey={}", self.path.display()),
        ]
    }
}

/// Makes the tag `name` on `target` in the fixture's clone: signed by `key` (`git tag -s`),
/// or annotated and unsigned.
fn tag(fixture: &Fixture, name: &str, key: Option<&Key>, message: &str, target: &str) {
    let mut args: Vec<String> = key.map(|key| key.signing().to_vec()).unwrap_or_default();
    let kind = if key.is_some() { "-s" } else { "-a" };
    args.extend(["tag", kind, "-m", message, name, target].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fixture.clone.git(&args);
}

fn push_tags(fixture: &Fixture) {
    fixture.clone.git(&[
        "push",
        "-q",
        "origin",
        "refs/tags/karrots/*:refs/tags/karrots/*",
    ]);
}

/// The newest plan run of `env` for `commit` with changes, as `/api/v1/runs/{id}` gives it.
fn plan_run(fixture: &Fixture, env: &str, commit: &str) -> Option<Value> {
    let run = fixture.runs(env).into_iter().find(|run| {
        run["kind"] == "plan" && run["commit"] == commit && run["result"] == "changes"
    })?;
    Some(fixture.get(&format!("/api/v1/runs/{}", run["id"])))
}

fn awaiting(fixture: &Fixture, commit: &str) -> String {
    fixture.wait_for("prod awaiting approval", |f| {
        f.environment("prod")["status"] == "awaiting_approval"
            && plan_run(f, "prod", commit).is_some()
    });
    let run = plan_run(fixture, "prod", commit).unwrap();
    let sha256 = run["plan_sha256"].as_str().unwrap_or_default().to_string();
    assert_eq!(sha256.len(), 64, "{run:#}");
    sha256
}

fn applies(fixture: &Fixture) -> Vec<Value> {
    fixture
        .runs("prod")
        .into_iter()
        .filter(|run| run["kind"] == "apply")
        .collect()
}

#[test]
fn a_plan_is_applied_on_enough_valid_approvals_of_exactly_that_plan() {
    let keys = tempfile::tempdir().unwrap();
    let alice = Key::new(keys.path(), "alice", "alice@example.com");
    let bob = Key::new(keys.path(), "bob", "bob@example.com");
    // Carol's email is the one the test commits are written with: four eyes do not count her.
    let carol = Key::new(keys.path(), "carol", "test@karrots.invalid");
    let mallory = Key::new(keys.path(), "mallory", "mallory@example.com");
    let extra = format!(
        "apply:\n  approval:\n    required: 2\n    four_eyes: true\n    approvers:\n{}{}{}",
        alice.entry(),
        bob.entry(),
        carol.entry()
    );
    let fixture = Fixture::new(&extra);
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    let planned = awaiting(&fixture, &first);

    fixture.wait_for("the approval_needed alert", |f| {
        f.sink.find("prod", "approval_needed").is_some()
    });
    let needed = fixture.sink.all("prod", "approval_needed");
    assert_eq!(needed.len(), 1, "{needed:#?}");
    let command = format!(
        "git tag -s -m \"plan: sha256:{planned}\" karrots/approve/prod/{first}/$USER {first}"
    );
    assert!(
        needed[0]["message"].as_str().unwrap().contains(&command),
        "{needed:#?}"
    );
    let run = plan_run(&fixture, "prod", &first).unwrap();
    assert!(
        run["message"].as_str().unwrap().contains(&command),
        "{run:#}"
    );

    // None of these counts, and one approval of two is not enough.
    let good = format!("approve\n\nplan: sha256:{planned}");
    let on = |name: &str| format!("karrots/approve/prod/{first}/{name}");
    tag(&fixture, &on("unsigned"), None, &good, &first);
    tag(&fixture, &on("mallory"), Some(&mallory), &good, &first);
    tag(
        &fixture,
        &on("old-plan"),
        Some(&alice),
        "plan: sha256:0000000000000000000000000000000000000000000000000000000000000000",
        &first,
    );
    tag(&fixture, &on("carol"), Some(&carol), &good, &first);
    tag(
        &fixture,
        &format!("karrots/approve/dev/{first}/bob"),
        Some(&bob),
        &good,
        &first,
    );
    tag(&fixture, &on("alice"), Some(&alice), &good, &first);
    push_tags(&fixture);
    let reasons = [
        "it carries no SSH signature",
        "which is no allowed signer",
        "not the plan made now",
        "four_eyes is on",
    ];
    fixture.wait_for("each tag that does not count reported", |f| {
        let logs = f.logs();
        reasons.iter().all(|reason| logs.contains(reason))
    });
    fixture.wait_for_polls(3);
    assert_eq!(fixture.environment("prod")["status"], "awaiting_approval");
    assert!(applies(&fixture).is_empty(), "{:#?}", applies(&fixture));

    // A newer commit supersedes the plan: approvals of the old one count for nothing.
    fixture.clone.replace(
        "modules/prod-app/main.tf",
        "default = \"v1\"",
        "default = \"v2\"",
    );
    let second = fixture.clone.commit_all("label v2");
    fixture.push("main");
    let replanned = awaiting(&fixture, &second);
    assert_ne!(replanned, planned);
    tag(&fixture, &on("bob"), Some(&bob), &good, &first);
    push_tags(&fixture);
    fixture.wait_for_polls(3);
    assert!(applies(&fixture).is_empty(), "{:#?}", applies(&fixture));

    let good = format!("plan: sha256:{replanned}");
    for key in [&alice, &bob] {
        let name = format!("karrots/approve/prod/{second}/{}", &key.email[..3]);
        tag(&fixture, &name, Some(key), &good, &second);
    }
    push_tags(&fixture);
    fixture.wait_for("prod applied once approved", |f| f.applied("prod", &second));

    let applied = applies(&fixture);
    assert_eq!(applied.len(), 1, "{applied:#?}");
    let run = fixture.get(&format!("/api/v1/runs/{}", applied[0]["id"]));
    let approved_by = run["approved_by"].as_array().cloned().unwrap_or_default();
    let emails: Vec<&str> = approved_by
        .iter()
        .map(|approval| approval["email"].as_str().unwrap())
        .collect();
    assert_eq!(emails.len(), 2, "{run:#}");
    assert!(
        emails.contains(&"alice@example.com") && emails.contains(&"bob@example.com"),
        "{run:#}"
    );
    assert!(approved_by.iter().all(|approval| {
        approval["fingerprint"]
            .as_str()
            .unwrap()
            .starts_with("SHA256:")
            && approval["tag"]
                .as_str()
                .unwrap()
                .starts_with(&format!("karrots/approve/prod/{second}/"))
            && approval["signed_at"].as_str().unwrap().starts_with("20")
    }));
    fixture.wait_for("the applied alert", |f| {
        f.sink.find("prod", "applied").is_some()
    });
    let alert = fixture.sink.find("prod", "applied").unwrap();
    assert_eq!(
        alert["approved_by"].as_array().map(Vec::len),
        Some(2),
        "{alert:#}"
    );
    fixture.wait_for("a second approval_needed alert, for the second plan", |f| {
        f.sink.all("prod", "approval_needed").len() == 2
    });
    let page = crate::support::daemon::http(
        &fixture.address,
        "GET",
        &format!("/runs/{}", applied[0]["id"]),
        &[],
        b"",
    )
    .1;
    assert!(page.contains("Approved by") && page.contains("alice@example.com"));

    // Tags that come late apply nothing again.
    fixture.wait_for_polls(3);
    assert_eq!(applies(&fixture).len(), 1);

    // A branch cannot name its own approver: dev's karrots.yaml on dev adding mallory is a
    // change of an identity field, refused before any plan.
    fixture
        .clone
        .git(&["checkout", "-q", "-b", "dev-work", &first]);
    fixture.clone.append(
        "environments/dev/karrots.yaml",
        &format!(
            "apply:\n  approval:\n    required: 1\n    approvers:\n{}",
            mallory.entry()
        ),
    );
    let own = fixture.clone.commit_all("dev names its own approver");
    fixture.push("dev-work:dev");
    fixture.wait_for("dev's own approver refused", |f| {
        f.runs("dev").iter().any(|run| {
            run["commit"] == own
                && run["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("apply.approval")
        })
    });
    assert_ne!(fixture.environment("dev")["last_applied"], own);
}

#[test]
fn with_signed_commits_only_a_chain_signed_by_signers_is_applied() {
    let keys = tempfile::tempdir().unwrap();
    let bob = Key::new(keys.path(), "bob", "bob@example.com");
    let eve = Key::new(keys.path(), "eve", "eve@example.com");
    let extra = format!(
        "verify:\n  signed_commits: true\n  signers:\n{}",
        bob.entry()
    );
    let fixture = Fixture::new(&extra);
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    let refused_for = |f: &Fixture, commit: &str, named: &str, why: &str| {
        f.runs("prod").iter().any(|run| {
            let message = run["message"].as_str().unwrap_or("");
            run["commit"] == commit
                && run["result"] == "refused"
                && message.contains(&format!("commit {}", &named[..7]))
                && message.contains(why)
        })
    };
    fixture.wait_for("the unsigned first commit refused", |f| {
        refused_for(f, &first, &first, "carries no SSH signature")
    });
    assert_eq!(fixture.environment("prod")["status"], "refused");

    let commit_signed = |key: &Key, label: &str| {
        fixture.clone.append(
            "modules/prod-app/main.tf",
            &format!("resource \"terraform_data\" \"{label}\" {{\n  input = \"{label}\"\n}}\n"),
        );
        fixture.clone.git(&["add", "-A"]);
        let mut args: Vec<String> = key.signing().to_vec();
        args.extend(["commit", "-q", "-S", "-m", label].map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fixture.clone.git(&args);
        fixture.push("main");
        fixture.clone.git(&["rev-parse", "HEAD"])
    };
    // Nothing applied yet: the head alone is checked.
    let signed = commit_signed(&bob, "bob");
    fixture.wait_for("bob's commit applied", |f| f.applied("prod", &signed));

    let eves = commit_signed(&eve, "eve");
    fixture.wait_for("eve's commit refused", |f| {
        refused_for(f, &eves, &eves, "no allowed signer")
    });
    // A signed commit after it does not let it through: it stands between.
    let after = commit_signed(&bob, "bob2");
    fixture.wait_for("the chain through eve's commit refused", |f| {
        refused_for(f, &after, &eves, "no allowed signer")
    });
    assert_eq!(fixture.environment("prod")["last_applied"], signed.as_str());
    let applied: Vec<Value> = fixture
        .runs("prod")
        .into_iter()
        .filter(|run| run["kind"] != "drift" && run["result"] == "applied")
        .collect();
    assert_eq!(applied.len(), 1, "{applied:#?}");
}

/// A restart does not void approvals: the plan that waited waits again (not planned anew,
/// which would change its hash), and the approval that comes after applies it.
#[test]
fn a_plan_waiting_for_approval_survives_a_restart() {
    let keys = tempfile::tempdir().unwrap();
    let alice = Key::new(keys.path(), "alice", "alice@example.com");
    let extra = format!(
        "apply:\n  approval:\n    required: 1\n    approvers:\n{}",
        alice.entry()
    );
    let mut fixture = Fixture::new(&extra);
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    let planned = awaiting(&fixture, &first);
    fixture.stop("-TERM");
    fixture.start();
    fixture.wait_for_polls(3);
    let plans = |f: &Fixture| {
        f.runs("prod")
            .iter()
            .filter(|run| run["kind"] == "plan")
            .count()
    };
    assert_eq!(plans(&fixture), 1, "{:#?}", fixture.runs("prod"));
    assert_eq!(fixture.environment("prod")["status"], "awaiting_approval");
    assert!(
        fixture
            .logs()
            .contains("the plan still waits for approvals")
    );

    let name = format!("karrots/approve/prod/{first}");
    tag(
        &fixture,
        &name,
        Some(&alice),
        &format!("plan: sha256:{planned}"),
        &first,
    );
    push_tags(&fixture);
    fixture.wait_for("prod applied", |f| f.applied("prod", &first));
    assert_eq!(plans(&fixture), 1);
    assert_eq!(applies(&fixture).len(), 1);
}
