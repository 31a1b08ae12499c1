//! The status page: server-rendered HTML for people, from the same views as the JSON API.
//!
//! Architecture invariant: this module does no I/O. It turns views into markup; the routes in
//! [`super`] read the store. Everything shown is escaped by `maud`, the page needs no external
//! asset and no JavaScript (it refreshes itself with a `<meta>` tag), and a run shows the
//! addresses and actions of its planned changes only, never a value.

use std::time::SystemTime;

use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::{DriftView, EnvironmentView};
use crate::store::{RunResult, RunRow};

/// How often a page reloads itself, in seconds.
const REFRESH_SECONDS: u32 = 10;

/// A run's message is shown up to this many trailing lines (an error's tail).
const MESSAGE_TAIL_LINES: usize = 40;

const STYLE: &str = r#"
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5rem 2rem; color: #1d232a; background: #fbfbfa; }
h1 { font-size: 1.4rem; margin: 0 0 .2rem; }
h1 a { color: inherit; text-decoration: none; }
h2 { font-size: 1.1rem; margin: 1.8rem 0 .5rem; }
.sub { color: #66707a; margin: 0 0 1rem; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; vertical-align: top; padding: .35rem .6rem; border-bottom: 1px solid #e4e6e8; }
th { font-weight: 600; color: #4a535c; background: #f3f4f5; }
code { font: 12.5px ui-monospace, monospace; }
pre { font: 12.5px/1.4 ui-monospace, monospace; background: #f3f4f5; padding: .8rem; overflow-x: auto; white-space: pre-wrap; }
.badge { display: inline-block; padding: 0 .45rem; border-radius: .6rem; font-size: 12px; font-weight: 600; background: #e4e6e8; }
.ok { background: #d5f0dc; color: #17622d; }
.busy { background: #dce9fb; color: #1c4f94; }
.warn { background: #fdf0c9; color: #7a5600; }
.bad { background: #fbdcdc; color: #8f1d1d; }
ul { margin: .2rem 0; padding-left: 1.1rem; }
.who { color: #4a535c; font-size: 12.5px; }
a { color: #1c4f94; }
dl { display: grid; grid-template-columns: max-content auto; gap: .25rem 1rem; }
dt { color: #66707a; }
dd { margin: 0; }
"#;

/// The overview: every environment, then the latest runs.
pub(crate) fn overview(
    environments: &[EnvironmentView],
    runs: &[RunRow],
    now: SystemTime,
) -> Markup {
    let body = html! {
        h2 { "Environments" }
        @if environments.is_empty() {
            p { "No environment yet: the daemon has not read the trust branch, or it defines none." }
        } @else {
            table id="environments" {
                thead { tr {
                    th { "Environment" } th { "Branch" } th { "Head" } th { "Last applied" }
                    th { "Status" } th { "Drift" } th { "Last run" }
                } }
                tbody {
                    @for env in environments {
                        tr id=(format!("env-{}", env.row.name)) {
                            td { strong { (env.row.name) } }
                            td { code { (env.row.branch) } }
                            td { (commit(env.row.head.as_deref())) }
                            td { (commit(env.row.last_applied.as_deref())) }
                            td { (badge(env.row.status.as_str())) }
                            td { (drift(&env.drift, now)) }
                            td {
                                @match &env.last_run {
                                    Some(run) => (run_line(run, now)),
                                    None => span class="sub" { "none yet" },
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Latest runs" }
        (run_table(runs, now))
    };
    page("Karrots", None, body, now)
}

/// One run: what it planned (addresses and actions), its outcome and message, and the other
/// runs of its environment.
pub(crate) fn run_page(run: &RunRow, others: &[RunRow], now: SystemTime) -> Markup {
    let title = format!("Run {} · {} · {}", run.id, run.env, run.kind);
    let body = html! {
        p { a href="/" { "← all environments" } " · " a href=(format!("/#env-{}", run.env)) { "environment " (run.env) } }
        dl id="run" {
            dt { "Environment" } dd { (run.env) }
            dt { "Commit" } dd { code { (run.commit) } }
            dt { "Kind" } dd { (run.kind) }
            dt { "Result" } dd { (badge(result(run))) }
            dt { "Started" } dd { (run.started_at) " (" (ago(&run.started_at, now)) ")" }
            dt { "Finished" } dd { (run.finished_at.as_deref().unwrap_or("—")) }
            dt { "Plan" } dd { (counts(run)) }
            @if let Some(sha256) = &run.plan_sha256 {
                dt { "Plan file" } dd { code id="plan-sha256" { "sha256:" (sha256) } }
            }
        }
        @if !run.approved_by.is_empty() {
            h2 { "Approved by" }
            table id="approved-by" {
                thead { tr { th { "Approver" } th { "Key" } th { "Tag" } th { "Signed" } } }
                tbody {
                    @for approval in &run.approved_by {
                        tr {
                            td { (approval.email) }
                            td { code { (approval.fingerprint) } }
                            td { code { (approval.tag) } }
                            td { (approval.signed_at) }
                        }
                    }
                }
            }
        }
        h2 { "Planned changes" }
        @if run.resources.is_empty() {
            p class="sub" { "None recorded." }
        } @else {
            table id="changes" {
                thead { tr { th { "Address" } th { "Actions" } } }
                tbody {
                    @for resource in &run.resources {
                        tr {
                            td { code { (resource["address"].as_str().unwrap_or("?")) } }
                            td { (actions(&resource["actions"])) }
                        }
                    }
                }
            }
        }
        @if !run.message.is_empty() {
            h2 { (message_heading(run)) }
            pre id="message" { (tail(&run.message, MESSAGE_TAIL_LINES)) }
        }
        h2 { "Other runs of " (run.env) }
        (run_table(others, now))
    };
    page(&title, Some(&title), body, now)
}

/// The form that takes the API token once and leaves a cookie (off loopback). Shows nothing
/// of the infrastructure.
pub(crate) fn login(wrong: bool, now: SystemTime) -> Markup {
    let body = html! {
        h2 { "Sign in" }
        p { "This daemon listens off loopback: enter its API token (the contents of " code { "api_token_file" } ")." }
        @if wrong { p class="badge bad" { "That token is not the daemon's." } }
        form method="post" action="/login" {
            input type="password" name="token" autocomplete="current-password" autofocus;
            " "
            button type="submit" { "Sign in" }
        }
    };
    page("Karrots · sign in", None, body, now)
}

fn page(title: &str, heading: Option<&str>, body: Markup, now: SystemTime) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta http-equiv="refresh" content=(REFRESH_SECONDS);
                title { (title) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                h1 { a href="/" { "Karrots" } @if let Some(heading) = heading { " · " (heading) } }
                p class="sub" {
                    "As of " (humantime::format_rfc3339_seconds(now))
                    " · refreshes every " (REFRESH_SECONDS) " s · "
                    a href="/api/v1/environments" { "JSON" }
                }
                (body)
            }
        }
    }
}

fn run_table(runs: &[RunRow], now: SystemTime) -> Markup {
    html! {
        @if runs.is_empty() {
            p class="sub" { "No runs yet." }
        } @else {
            table class="runs" {
                thead { tr {
                    th { "Run" } th { "Environment" } th { "Kind" } th { "Commit" }
                    th { "Result" } th { "Plan" } th { "Started" }
                } }
                tbody {
                    @for run in runs {
                        tr {
                            td { a href=(run_href(run)) { "#" (run.id) } }
                            td { (run.env) }
                            td { (run.kind) }
                            td { (commit(Some(&run.commit))) }
                            td { (badge(result(run))) }
                            td { (counts(run)) }
                            td { (ago(&run.started_at, now)) }
                        }
                    }
                }
            }
        }
    }
}

fn run_line(run: &RunRow, now: SystemTime) -> Markup {
    html! {
        a href=(run_href(run)) { "#" (run.id) } " " (run.kind) " "
        (badge(result(run)))
        " " span class="sub" { (ago(&run.started_at, now)) }
        @if run.result.is_some_and(RunResult::is_failure) {
            div class="who reason" { (excerpt(&run.message, 160)) }
        }
    }
}

/// The first line of `text`, cut at `max` characters.
fn excerpt(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or_default();
    match line.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line.to_string(),
    }
}

fn drift(view: &DriftView, now: SystemTime) -> Markup {
    let resources = view.details.as_slice();
    html! {
        (badge(view.status.as_str()))
        @if let Some(at) = &view.checked_at { " " span class="sub" { "checked " (ago(at, now)) } }
        @if !resources.is_empty() {
            ul class="drifted" {
                @for resource in resources {
                    li {
                        code { (resource.address) } " " (resource.actions.join(", "))
                        @if !resource.changed_attributes.is_empty() {
                            " (" (resource.changed_attributes.join(", ")) ")"
                        }
                        @if resource.changed_by.is_empty() {
                            div class="who" { "changed by: unknown (CloudTrail had nothing)" }
                        }
                        @for change in &resource.changed_by {
                            div class="who changed-by" {
                                "changed by " code { (change.principal) }
                                @if let Some(session) = &change.session { " (" (session) ")" }
                                " · " (change.event) " · " (change.time)
                            }
                        }
                    }
                }
            }
        }
        @if !view.message.is_empty() { div class="who" { (view.message) } }
    }
}

fn badge(status: &str) -> Markup {
    let class = match status {
        "in_sync" | "applied" | "no_changes" => "ok",
        "planning" | "applying" | "running" | "changes" => "busy",
        "drifted" | "refused" | "superseded" | "unchecked" => "warn",
        "failed" | "error" | "interrupted" => "bad",
        _ => "",
    };
    html! { span class=(format!("badge {class}")) { (status) } }
}

fn commit(commit: Option<&str>) -> Markup {
    match commit {
        Some(commit) => html! { code title=(commit) { (&commit[..7.min(commit.len())]) } },
        None => html! { span class="sub" { "—" } },
    }
}

fn counts(run: &RunRow) -> String {
    let s = &run.summary;
    format!("+{} ~{} −{}", s.add, s.change, s.destroy)
}

fn actions(actions: &serde_json::Value) -> String {
    actions
        .as_array()
        .map(|actions| {
            actions
                .iter()
                .filter_map(|action| action.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn message_heading(run: &RunRow) -> &'static str {
    match run.result {
        Some(RunResult::Refused) => "Why it was refused",
        Some(RunResult::Failed | RunResult::Interrupted) => "Error (last lines)",
        _ => "Message",
    }
}

/// A run's result as its badge shows it: `running` while it has none.
fn result(run: &RunRow) -> &'static str {
    run.result.map_or("running", RunResult::as_str)
}

fn run_href(run: &RunRow) -> String {
    format!("/runs/{}", run.id)
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut out = String::new();
    if start > 0 {
        out.push_str(&format!("… {start} earlier lines\n"));
    }
    out.push_str(&all[start..].join("\n"));
    out
}

/// "42 s ago" for an RFC 3339 time; the time itself when it does not parse.
fn ago(rfc3339: &str, now: SystemTime) -> String {
    let Ok(then) = humantime::parse_rfc3339_weak(rfc3339) else {
        return rfc3339.to_string();
    };
    let seconds = now.duration_since(then).map(|d| d.as_secs()).unwrap_or(0);
    match seconds {
        0..60 => format!("{seconds} s ago"),
        60..3600 => format!("{} min ago", seconds / 60),
        3600..86400 => format!("{} h ago", seconds / 3600),
        _ => format!("{} d ago", seconds / 86400),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::{DriftStatus, EnvStatus, EnvironmentRow, RunKind, Summary};

    fn at(seconds: u64) -> SystemTime {
        humantime::parse_rfc3339("2026-11-24T10:00:00Z").unwrap() + Duration::from_secs(seconds)
    }

    fn run(id: i64, result: RunResult, message: &str) -> RunRow {
        RunRow {
            id,
            env: "prod".into(),
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
            kind: RunKind::Apply,
            result: Some(result),
            summary: Summary {
                add: 1,
                change: 0,
                destroy: 1,
            },
            resources: vec![
                serde_json::json!({"address": "aws_vpc.main", "actions": ["delete", "create"]}),
            ],
            started_at: "2026-11-24T10:00:00Z".into(),
            finished_at: Some("2026-11-24T10:00:09Z".into()),
            message: message.into(),
            plan_sha256: None,
            approved_by: Vec::new(),
        }
    }

    #[test]
    fn the_overview_escapes_what_it_shows_and_names_who_drifted() {
        let env = EnvironmentView {
            row: EnvironmentRow {
                name: "prod".into(),
                branch: "main".into(),
                head: Some("0123456789abcdef".into()),
                last_applied: None,
                status: EnvStatus::Drifted,
                applied_fingerprint: None,
                applied_inputs: None,
            },
            last_run: Some(run(7, RunResult::Applied, "")),
            drift: DriftView {
                status: DriftStatus::Drifted,
                checked_at: Some("2026-11-24T10:00:30Z".into()),
                resources: vec!["aws_vpc.main".into()],
                details: vec![
                    serde_json::from_value(serde_json::json!({
                        "address": "aws_vpc.main", "actions": ["update"], "changed_attributes": ["tags"],
                        "changed_by": [{"principal": "arn:aws:iam::1:role/<b>admin</b>", "session": "alice",
                            "event": "CreateTags", "time": "t", "access_key_id": "ASIA", "event_id": "e"}]
                    }))
                    .unwrap(),
                ],
                message: String::new(),
            },
        };
        let html = overview(&[env], &[run(7, RunResult::Applied, "")], at(90)).into_string();
        assert!(
            html.contains("arn:aws:iam::1:role/&lt;b&gt;admin&lt;/b&gt;</code> (alice)"),
            "{html}"
        );
        assert!(
            !html.contains("<b>admin"),
            "markup from the data is escaped"
        );
        assert!(html.contains(r#"href="/runs/7""#));
        assert!(html.contains("checked 1 min ago"));
        assert!(
            !html.contains(r#"class="who reason""#),
            "an applied run has no reason"
        );
        assert!(html.contains(r#"http-equiv="refresh""#));
        assert!(!html.contains("<script"), "no JavaScript");
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "no external asset"
        );
    }

    #[test]
    fn a_run_page_shows_addresses_actions_and_the_tail_of_its_error() {
        let long: Vec<String> = (1..=100).map(|n| format!("line {n}")).collect();
        let html = run_page(
            &run(7, RunResult::Failed, &long.join("\n")),
            &[run(6, RunResult::Applied, "")],
            at(5),
        )
        .into_string();
        assert!(html.contains("<code>aws_vpc.main</code>"));
        assert!(html.contains("delete, create"));
        assert!(html.contains("Error (last lines)"));
        assert!(html.contains("… 60 earlier lines\nline 61\n") && html.contains("line 100"));
        assert!(!html.contains("line 60\n"));
        assert!(html.contains(r#"href="/runs/6""#) && html.contains(r##"href="/#env-prod""##));
        assert!(!html.contains("Approved by") && !html.contains("plan-sha256"));

        let approved = RunRow {
            plan_sha256: Some("ab12".into()),
            approved_by: vec![crate::approval::Approval {
                fingerprint: "SHA256:abc".into(),
                email: "alice@example.com".into(),
                tag: "karrots/approve/prod/0123/alice".into(),
                signed_at: "2026-11-24T09:00:00Z".into(),
            }],
            ..run(8, RunResult::Applied, "")
        };
        let html = run_page(&approved, &[], at(5)).into_string();
        assert!(
            html.contains(r#"<code id="plan-sha256">sha256:ab12</code>"#),
            "{html}"
        );
        assert!(html.contains("<td>alice@example.com</td><td><code>SHA256:abc</code></td><td><code>karrots/approve/prod/0123/alice</code></td>"), "{html}");
    }

    #[test]
    fn the_reason_of_a_refused_last_run_is_its_first_line_cut_short() {
        let refused = run(
            3,
            RunResult::Refused,
            &format!("{}\nsecond line", "x".repeat(200)),
        );
        let html = run_line(&refused, at(1)).into_string();
        assert!(html.contains(&format!("{}…", "x".repeat(160))), "{html}");
        assert!(!html.contains("second line"));
    }

    #[test]
    fn times_read_as_how_long_ago() {
        assert_eq!(ago("2026-11-24T10:00:00Z", at(42)), "42 s ago");
        assert_eq!(ago("2026-11-24T10:00:00Z", at(7200)), "2 h ago");
        assert_eq!(ago("not a time", at(1)), "not a time");
    }
}
