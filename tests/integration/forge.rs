//! Commit statuses on a forge stand-in shaped like GitHub's and GitLab's APIs: `pending`
//! when a run starts, then its final state with the summary or the reason, linked to the run
//! page; a refusal's `failure`; a preview's own context; and a forge down for a while, across
//! a restart, that gets every status later and in order.

use std::path::PathBuf;

use crate::support::daemon::Fixture;
use crate::support::forge::ForgeStandIn;

const TOKEN: &str = "ghp_forge-token-8d2e";

/// The daemon, unstarted, posting to `forge` as a forge of `kind` for `repository`.
fn with_forge(forge: &ForgeStandIn, kind: &str, repository: &str) -> (Fixture, tempfile::TempDir) {
    let secrets = tempfile::tempdir().unwrap();
    let token_file: PathBuf = secrets.path().join("forge-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    // prod may run a provisioner: a slow apply shows its `pending` at the forge.
    let mut fixture = Fixture::build()
        .prod_extra("allow: [local-exec]\n")
        .unstarted();
    fixture.extra_config = format!(
        "forge:\n  kind: {kind}\n  api_url: {}\n  repository: {repository}\n  token_file: {}\n  public_url: https://karrots.example.com\n",
        forge.url,
        token_file.display()
    );
    (fixture, secrets)
}

/// Waits until the last state `forge` took for `sha` in `context` is a final one; returns
/// every state it took there, oldest first.
fn final_statuses(
    fixture: &Fixture,
    forge: &ForgeStandIn,
    sha: &str,
    context: &str,
) -> Vec<(String, String)> {
    let finished = |taken: &[(String, String)]| {
        taken
            .last()
            .is_some_and(|(state, _)| !["pending", "running"].contains(&state.as_str()))
    };
    fixture.wait_for(&format!("the final status of {context} on {sha}"), |_| {
        finished(&forge.taken(sha, context))
    });
    let taken = forge.taken(sha, context);
    let first_final = taken
        .iter()
        .position(|(state, _)| !["pending", "running"].contains(&state.as_str()))
        .unwrap();
    assert_eq!(
        first_final,
        taken.len() - 1,
        "nothing after the final state: {taken:?}"
    );
    taken
}

/// The id of `env`'s newest run of `kind` on `commit`.
fn run_id(fixture: &Fixture, env: &str, kind: &str, commit: &str) -> i64 {
    fixture
        .runs(env)
        .iter()
        .find(|run| run["kind"] == kind && run["commit"] == commit)
        .and_then(|run| run["id"].as_i64())
        .unwrap_or_else(|| panic!("no {kind} run of {env} on {commit}"))
}

#[test]
fn each_run_posts_pending_then_its_outcome_on_the_commit() {
    let forge = ForgeStandIn::start(false);
    let (mut fixture, _secrets) = with_forge(&forge, "github", "acme/infra");
    fixture.start();
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);

    let taken = final_statuses(&fixture, &forge, &first, "karrots/prod");
    // (A `pending` superseded before it was sent is never sent: a fast run may show only its
    // final state.)
    assert_eq!(
        taken.last().unwrap(),
        &("success".to_string(), "applied +1 ~0 -0".to_string())
    );
    let apply = run_id(&fixture, "prod", "apply", &first);
    let last = forge
        .received()
        .into_iter()
        .rfind(|request| request.body["context"] == "karrots/prod" && request.answered == 201)
        .unwrap();
    assert_eq!(last.method, "POST");
    assert_eq!(last.path, format!("/api/repos/acme/infra/statuses/{first}"));
    assert_eq!(last.headers["authorization"], format!("Bearer {TOKEN}"));
    assert_eq!(last.headers["accept"], "application/vnd.github+json");
    assert_eq!(
        last.body["target_url"],
        format!("https://karrots.example.com/runs/{apply}")
    );
    // dev's branch is at the same commit: its own context.
    let dev = final_statuses(&fixture, &forge, &first, "karrots/dev");
    assert_eq!(dev.last().unwrap().0, "success");

    // A feature branch: its preview under its own context, never `karrots/prod`.
    fixture.clone.git(&["checkout", "-q", "-b", "feature"]);
    fixture
        .clone
        .replace("modules/prod-app/main.tf", "\"v1\"", "\"v2\"");
    let feature = fixture.clone.commit_all("feature: v2");
    fixture.push("feature");
    let taken = final_statuses(&fixture, &forge, &feature, "karrots/prod/preview");
    assert_eq!(
        taken.last().unwrap(),
        &("success".to_string(), "preview: +0 ~1 -0".to_string())
    );
    assert!(forge.taken(&feature, "karrots/prod").is_empty());
    fixture.clone.git(&["checkout", "-q", "main"]);
    // A commit the checks refuse: failure, with the reason.
    fixture
        .clone
        .append("environments/prod/karrots.yaml", "surprise: true\n");
    let refused = fixture.clone.commit_all("an unknown key");
    fixture.push("main");
    let taken = final_statuses(&fixture, &forge, &refused, "karrots/prod");
    let (state, description) = taken.last().unwrap();
    assert_eq!(state, "failure");
    assert!(
        description.contains("surprise"),
        "names the problem: {description}"
    );

    assert!(!fixture.logs().contains(TOKEN), "the token is in the logs");
}

#[test]
fn a_run_in_progress_is_pending_at_the_forge_until_its_end() {
    let forge = ForgeStandIn::start(false);
    let (mut fixture, _secrets) = with_forge(&forge, "github", "acme/infra");
    fixture.start();
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("prod applied", |f| f.applied("prod", &first));
    let slow = fixture.start_slow_apply(3);
    fixture.wait_for("the apply's pending status", |_| {
        forge.taken(&slow, "karrots/prod").last()
            == Some(&("pending".to_string(), "applying the plan".to_string()))
    });
    let taken = final_statuses(&fixture, &forge, &slow, "karrots/prod");
    assert_eq!(
        taken.last().unwrap(),
        &("success".to_string(), "applied +1 ~0 -0".to_string())
    );
}

#[test]
fn a_forge_down_across_a_restart_gets_every_status_later_and_in_order() {
    let forge = ForgeStandIn::start(false);
    let (mut fixture, _secrets) = with_forge(&forge, "github", "acme/infra");
    forge.set_down(true);
    fixture.start();
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("prod applied", |f| f.applied("prod", &first));
    fixture.wait_for("a status refused by the forge", |_| {
        forge
            .received()
            .iter()
            .any(|request| request.answered == 503)
    });
    fixture.stop("-TERM");

    forge.set_down(false);
    fixture.start();
    let taken = final_statuses(&fixture, &forge, &first, "karrots/prod");
    assert_eq!(
        taken,
        [("success".to_string(), "applied +1 ~0 -0".to_string())],
        "the pending statuses the final one superseded were not sent after it"
    );
}

#[test]
fn gitlab_gets_its_own_path_states_and_a_repeated_state_is_taken_as_set() {
    let forge = ForgeStandIn::start(true);
    let (mut fixture, _secrets) = with_forge(&forge, "gitlab", "platform/infra");
    fixture.start();
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    let taken = final_statuses(&fixture, &forge, &first, "karrots/prod");
    assert_eq!(taken.last().unwrap().0, "success");
    let requests = forge.received();
    let opening = requests
        .iter()
        .find(|request| request.body["name"] == "karrots/prod")
        .unwrap();
    assert_eq!(
        (opening.answered, &opening.body["state"]),
        (400, &"running".into())
    );
    let last = requests
        .iter()
        .rfind(|request| request.body["name"] == "karrots/prod")
        .unwrap();
    assert_eq!(
        last.path,
        format!("/api/projects/platform%2Finfra/statuses/{first}")
    );
    assert_eq!(last.headers["private-token"], TOKEN);
    // The `running` GitLab refused (the context had it already) is taken as set: never
    // sent again.
    let retried = requests
        .iter()
        .filter(|request| request.body == opening.body)
        .count();
    assert_eq!(retried, 1, "{requests:?}");
}

#[test]
fn a_pull_request_gets_one_comment_edited_at_each_new_commit() {
    let forge = ForgeStandIn::start(false);
    let (mut fixture, _secrets) = with_forge(&forge, "github", "acme/infra");
    fixture.start();
    let first = fixture.clone.git(&["rev-parse", "HEAD"]);
    fixture.wait_for("prod applied", |f| f.applied("prod", &first));

    fixture.clone.git(&["checkout", "-q", "-b", "feature"]);
    fixture
        .clone
        .replace("modules/prod-app/main.tf", "\"v1\"", "\"secret-label-v2\"");
    let one = fixture.clone.commit_all("feature: v2");
    forge.open_pull_request(7, &one);
    fixture.push("feature");
    fixture.wait_for("the pull request's comment", |_| {
        forge
            .comments(7)
            .iter()
            .any(|(_, body)| body.contains(&one[..7]))
    });
    let comments = forge.comments(7);
    assert_eq!(comments.len(), 1, "{comments:?}");
    let (id, body) = &comments[0];
    let preview = run_id(&fixture, "prod", "preview", &one);
    assert!(body.starts_with("<!-- karrots:preview -->"), "{body}");
    assert!(
        body.contains(&format!(
            "| `prod` | +0 ~1 -0 | [#{preview}](https://karrots.example.com/runs/{preview}) |"
        )),
        "{body}"
    );
    assert!(body.contains("- `terraform_data.app`: update"), "{body}");
    assert!(!body.contains("secret-label"), "never a value: {body}");

    // A new commit on the branch: the same comment, edited.
    fixture
        .clone
        .replace("modules/prod-app/main.tf", "\"secret-label-v2\"", "\"v3\"");
    let two = fixture.clone.commit_all("feature: v3");
    forge.open_pull_request(7, &two);
    fixture.push("feature");
    fixture.wait_for("the comment edited for the new commit", |_| {
        forge
            .comments(7)
            .iter()
            .any(|(_, body)| body.contains(&two[..7]))
    });
    let comments = forge.comments(7);
    assert_eq!(comments.len(), 1, "edited in place: {comments:?}");
    assert_eq!(&comments[0].0, id);
    let edits = forge
        .received()
        .iter()
        .filter(|request| request.method == "PATCH")
        .count();
    assert!(edits >= 1);
}
