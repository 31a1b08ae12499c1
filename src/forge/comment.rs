//! The pull request comment: one per pull (merge) request, found again by a hidden marker and
//! edited in place at each new commit, with each environment's preview of the commit — the
//! planned resources' addresses and actions (never a value), the summary, refusals with their
//! reason, the run pages — cut to what the forge takes.

use std::collections::BTreeMap;

use crate::engine::state::RunResult;
use crate::store::RunRow;

/// The first line of every Karrots comment: how it is found again, whatever its text.
pub const MARKER: &str = "<!-- karrots:preview -->";

/// What a comment has room for after the table: the resource lines, until `limit`.
pub fn render(sha: &str, runs: &[RunRow], public_url: &str, limit: usize) -> String {
    let newest = newest_per_environment(runs);
    let short = &sha[..sha.len().min(7)];
    let root = public_url.trim_end_matches('/');
    let mut text = format!(
        "{MARKER}\n**Karrots preview** of `{short}`: plans of this commit, never applied before it is merged.\n\n| environment | plan | run |\n|---|---|---|\n"
    );
    for run in newest.values() {
        text.push_str(&format!(
            "| `{}` | {} | [#{id}]({root}/runs/{id}) |\n",
            run.env,
            cell(run),
            id = run.id
        ));
    }
    let mut lines: Vec<(String, Vec<String>)> = Vec::new();
    for run in newest.values().filter(|run| !run.resources.is_empty()) {
        let changes = run.resources.iter().map(resource_line).collect();
        lines.push((run.env.clone(), changes));
    }
    let total: usize = lines.iter().map(|(_, changes)| changes.len()).sum();
    let mut shown = 0;
    let room = |text: &str| limit.saturating_sub(text.len() + 200);
    for (env, changes) in &lines {
        let open = format!(
            "\n<details><summary><code>{env}</code>: {} resources</summary>\n\n",
            changes.len()
        );
        if open.len() > room(&text) {
            break;
        }
        text.push_str(&open);
        for line in changes {
            if line.len() + 20 > room(&text) {
                break;
            }
            text.push_str(line);
            shown += 1;
        }
        text.push_str("</details>\n");
    }
    if shown < total {
        text.push_str(&format!(
            "\n… and {} more resources: see the run pages.\n",
            total - shown
        ));
    }
    text
}

/// Each environment's newest preview of the commit.
fn newest_per_environment(runs: &[RunRow]) -> BTreeMap<String, &RunRow> {
    let mut newest = BTreeMap::new();
    for run in runs {
        if run.result == Some(RunResult::Superseded) {
            continue;
        }
        newest.insert(run.env.clone(), run);
    }
    newest
}

/// The table's plan cell: the summary, or what happened instead.
fn cell(run: &RunRow) -> String {
    let s = &run.summary;
    let reason = || {
        escape(
            run.message
                .lines()
                .find(|line| !line.trim().is_empty())
                .unwrap_or(""),
        )
    };
    match run.result {
        None => "planning…".to_string(),
        Some(RunResult::Changes) => format!("+{} ~{} -{}", s.add, s.change, s.destroy),
        Some(RunResult::NoChanges) => "no changes".to_string(),
        Some(RunResult::Refused) => format!("refused: {}", reason()),
        Some(RunResult::Failed) => format!("failed: {}", reason()),
        Some(RunResult::Interrupted) => "interrupted".to_string(),
        Some(result) => result.to_string(),
    }
}

/// `- \`address\`: create` from a stored change (address and actions only: the store never
/// holds a value).
fn resource_line(change: &serde_json::Value) -> String {
    let address = change["address"].as_str().unwrap_or("?");
    let actions: Vec<&str> = change["actions"]
        .as_array()
        .map(|actions| {
            actions
                .iter()
                .filter_map(|action| action.as_str())
                .collect()
        })
        .unwrap_or_default();
    format!(
        "- `{}`: {}\n",
        address.replace('`', "'"),
        actions.join(", ")
    )
}

/// A line of text safe in a table cell.
fn escape(text: &str) -> String {
    let text = text.trim().replace('|', "\\|");
    if text.chars().count() > 200 {
        let cut: String = text.chars().take(199).collect();
        return format!("{cut}…");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::state::RunKind;
    use crate::store::Summary;

    fn run(
        id: i64,
        env: &str,
        result: Option<RunResult>,
        resources: usize,
        message: &str,
    ) -> RunRow {
        RunRow {
            id,
            env: env.into(),
            commit: "0123456789".into(),
            kind: RunKind::Preview,
            result,
            summary: Summary {
                add: resources,
                change: 0,
                destroy: 0,
            },
            resources: (0..resources)
                .map(|n| serde_json::json!({"address": format!("aws_s3_bucket.b{n}"), "actions": ["create"]}))
                .collect(),
            started_at: String::new(),
            finished_at: None,
            message: message.into(),
            plan_sha256: None,
            approved_by: Vec::new(),
        }
    }

    #[test]
    fn a_comment_has_each_environments_newest_preview_and_its_resources() {
        let runs = [
            run(3, "prod", Some(RunResult::Failed), 0, "the old one"),
            run(5, "prod", Some(RunResult::Changes), 2, ""),
            run(
                6,
                "dev",
                Some(RunResult::Refused),
                0,
                "does not pass karrots check | really\nmore",
            ),
            run(7, "qa", Some(RunResult::Superseded), 0, ""),
        ];
        let text = render("0123456789", &runs, "https://karrots.example.com/", 65_536);
        assert!(text.starts_with(MARKER), "{text}");
        assert!(text.contains("of `0123456`"));
        assert!(
            text.contains("| `prod` | +2 ~0 -0 | [#5](https://karrots.example.com/runs/5) |"),
            "{text}"
        );
        assert!(
            text.contains("| `dev` | refused: does not pass karrots check \\| really | [#6]"),
            "{text}"
        );
        assert!(
            !text.contains("the old one") && !text.contains("`qa`"),
            "{text}"
        );
        assert!(text.contains("- `aws_s3_bucket.b1`: create"), "{text}");
        assert!(!text.contains("more resources"));
    }

    #[test]
    fn a_comment_longer_than_the_forge_takes_is_cut_with_a_count() {
        let runs = [run(1, "prod", Some(RunResult::Changes), 5_000, "")];
        let text = render("0123456789", &runs, "https://k.example.com", 65_536);
        assert!(text.len() <= 65_536, "{}", text.len());
        let shown = text.matches("- `aws_s3_bucket.").count();
        assert!(shown > 100 && shown < 5_000, "{shown}");
        assert!(
            text.ends_with(&format!(
                "… and {} more resources: see the run pages.\n",
                5_000 - shown
            )),
            "{}",
            &text[text.len() - 200..]
        );
    }
}
