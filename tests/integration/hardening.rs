//! Attacks on the daemon: hostile ref names, hostile files, hostile processes. Each test
//! shows the hole closed with the real binary, git, terraform and moto.

use crate::daemon::Fixture;

/// A branch named `refs/remotes/origin/main` is an ordinary, untrusted branch: its commit is
/// only previewed, never planned or applied to prod as if it were `main`.
#[test]
fn a_branch_named_like_a_remote_ref_never_stands_in_for_main() {
    let fixture = Fixture::new("");
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("prod applied", |f| f.applied("prod", &first));

    fixture.clone.git(&["checkout", "-q", "-b", "attack"]);
    fixture
        .clone
        .replace("modules/prod-app/main.tf", "\"v1\"", "\"unreviewed\"");
    let attack = fixture.clone.commit_all("not reviewed");
    fixture.push("HEAD:refs/heads/refs/remotes/origin/main");
    fixture.wait_for("the branch previewed for prod", |f| {
        f.runs("prod")
            .iter()
            .any(|run| run["commit"] == attack.as_str() && run["kind"] == "preview")
    });
    // Two more polls: a merged run of the commit would have started by now.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let merged: Vec<_> = fixture
        .runs("prod")
        .into_iter()
        .filter(|run| run["commit"] == attack.as_str() && run["kind"] != "preview")
        .collect();
    assert!(merged.is_empty(), "merged runs of the branch: {merged:#?}");
    assert_eq!(fixture.environment("prod")["last_applied"], first.as_str());
    assert_eq!(fixture.environment("prod")["head"], first.as_str());

    // The mirror's heads match the remote's again, so a quiet poll fetches nothing.
    let logs = fixture.logs();
    let last_poll = logs
        .lines()
        .rev()
        .find(|line| line.contains("polled the config repository"))
        .expect("a poll logged");
    assert!(last_poll.contains("fetched=false"), "{last_poll}");
}
