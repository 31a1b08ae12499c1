//! Reads what terraform says about a plan into a summary. Pure: text in, data out.
//!
//! Two sources give the same summary: the event stream of `terraform plan -json`
//! ([`summarize_stream`]: `planned_change`, `resource_drift`, `outputs`, and the error
//! diagnostics), which every plan produces anyway, and `terraform show -json` of a saved plan
//! ([`summarize`]: `resource_changes`, `resource_drift`), which costs a second run of the
//! provider schemas and is made only when the whole plan document is wanted. Never from
//! terraform's exit code.

use serde::{Deserialize, Serialize};

/// What a plan would do, and what drifted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSummary {
    /// Resources to create, counting replacements as terraform's own summary line does.
    pub add: usize,
    pub change: usize,
    /// Resources to delete, counting replacements.
    pub destroy: usize,
    /// Resources deleted and created again.
    pub replace: usize,
    /// Every resource with an action other than no-op or read, in plan order.
    pub resources: Vec<ResourceChange>,
    /// Resources whose real state differs from the last applied state.
    pub drift: Vec<ResourceChange>,
    /// Whether any root output would change.
    pub outputs_change: bool,
}

impl PlanSummary {
    /// Whether applying the plan would change anything (like `-detailed-exitcode`'s 2).
    pub fn has_changes(&self) -> bool {
        !self.resources.is_empty() || self.outputs_change
    }

    /// Whether the plan deletes or replaces anything (refused unless `allow_destroy`).
    pub fn destroys(&self) -> bool {
        self.destroy > 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceChange {
    pub address: String,
    /// Terraform's action list: `["create"]`, `["update"]`, `["delete", "create"]`, …
    pub actions: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("terraform show -json gave unreadable output: {0}")]
pub struct PlanJsonError(#[from] serde_json::Error);

#[derive(Deserialize)]
struct ShowJson {
    #[serde(default)]
    resource_changes: Vec<RawChange>,
    #[serde(default)]
    resource_drift: Vec<RawChange>,
    #[serde(default)]
    output_changes: std::collections::BTreeMap<String, RawActions>,
}

#[derive(Deserialize)]
struct RawChange {
    address: String,
    change: RawActions,
}

#[derive(Deserialize)]
struct RawActions {
    actions: Vec<String>,
}

pub fn summarize(show_json: &str) -> Result<PlanSummary, PlanJsonError> {
    let show: ShowJson = serde_json::from_str(show_json)?;
    let mut summary = PlanSummary::default();
    for change in show.resource_changes {
        let actions = change.change.actions;
        let is = |wanted: &[&str]| {
            actions
                .iter()
                .map(String::as_str)
                .eq(wanted.iter().copied())
        };
        if is(&["no-op"]) || is(&["read"]) {
            continue;
        }
        if actions.iter().any(|a| a == "create") {
            summary.add += 1;
        }
        if actions.iter().any(|a| a == "delete") {
            summary.destroy += 1;
        }
        if is(&["update"]) {
            summary.change += 1;
        }
        if actions.len() == 2
            && actions.contains(&"create".into())
            && actions.contains(&"delete".into())
        {
            summary.replace += 1;
        }
        summary.resources.push(ResourceChange {
            address: change.address,
            actions,
        });
    }
    summary.drift = show
        .resource_drift
        .into_iter()
        .map(|change| ResourceChange {
            address: change.address,
            actions: change.change.actions,
        })
        .collect();
    summary.outputs_change = show
        .output_changes
        .values()
        .any(|change| change.actions.iter().any(|a| a != "no-op"));
    Ok(summary)
}

/// What `terraform show -json` says of one resource with a change or drift: its id (to look
/// up who changed it) and the names of the attributes that differ — never their values, which
/// may be sensitive.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceDetail {
    pub id: Option<String>,
    pub changed_attributes: Vec<String>,
}

/// The [`ResourceDetail`] of every resource in `resource_drift` and `resource_changes`, by
/// address. What changed outside terraform (`resource_drift`) is preferred to what the apply
/// would change.
pub fn resource_details(
    show_json: &str,
) -> Result<std::collections::BTreeMap<String, ResourceDetail>, PlanJsonError> {
    let show: serde_json::Value = serde_json::from_str(show_json)?;
    let mut details = std::collections::BTreeMap::<String, ResourceDetail>::new();
    for list in ["resource_drift", "resource_changes"] {
        let entries = show[list].as_array().map(Vec::as_slice).unwrap_or_default();
        for entry in entries {
            let Some(address) = entry["address"].as_str() else {
                continue;
            };
            let (before, after) = (&entry["change"]["before"], &entry["change"]["after"]);
            let id = [before, after]
                .iter()
                .find_map(|side| side["id"].as_str())
                .map(str::to_string);
            let changed_attributes = match (before.as_object(), after.as_object()) {
                (Some(before), Some(after)) => {
                    let keys: std::collections::BTreeSet<&String> =
                        before.keys().chain(after.keys()).collect();
                    keys.into_iter()
                        .filter(|key| before.get(*key) != after.get(*key))
                        .cloned()
                        .collect()
                }
                _ => Vec::new(),
            };
            let detail = details.entry(address.to_string()).or_default();
            if detail.id.is_none() {
                detail.id = id;
            }
            if detail.changed_attributes.is_empty() {
                detail.changed_attributes = changed_attributes;
            }
        }
    }
    Ok(details)
}

/// One line of `terraform plan -json`.
#[derive(Deserialize)]
struct StreamEvent {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(rename = "@level", default)]
    level: String,
    #[serde(rename = "@message", default)]
    message: String,
    change: Option<StreamChange>,
    outputs: Option<std::collections::BTreeMap<String, StreamOutput>>,
    diagnostic: Option<StreamDiagnostic>,
}

#[derive(Deserialize)]
struct StreamChange {
    resource: StreamResource,
    action: String,
}

#[derive(Deserialize)]
struct StreamResource {
    addr: String,
}

#[derive(Deserialize)]
struct StreamOutput {
    #[serde(default)]
    action: String,
}

#[derive(Deserialize)]
struct StreamDiagnostic {
    #[serde(default)]
    detail: String,
}

/// `plan -json`'s single action as `show -json`'s action list.
fn actions_of(action: &str) -> Vec<String> {
    match action {
        "replace" => vec!["delete".into(), "create".into()],
        "noop" => vec!["no-op".into()],
        other => vec![other.to_string()],
    }
}

/// What the event stream of one `terraform plan -json` said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamReport {
    pub summary: PlanSummary,
    /// The error diagnostics, as text (terraform prints them on stdout with `-json`).
    pub errors: String,
}

/// Reads the lines of `terraform plan -json`. Lines that are not JSON (a provider's stray
/// output) are skipped.
pub fn summarize_stream(stream: &str) -> StreamReport {
    let mut report = StreamReport::default();
    let summary = &mut report.summary;
    for line in stream.lines() {
        let Ok(event) = serde_json::from_str::<StreamEvent>(line) else {
            continue;
        };
        if event.level == "error" {
            report.errors.push_str(&event.message);
            report.errors.push('\n');
            if let Some(diagnostic) = &event.diagnostic
                && !diagnostic.detail.is_empty()
            {
                report.errors.push_str(&diagnostic.detail);
                report.errors.push('\n');
            }
        }
        match (event.kind.as_str(), event.change, event.outputs) {
            ("planned_change", Some(change), _) => {
                let actions = actions_of(&change.action);
                match change.action.as_str() {
                    "noop" | "read" => continue,
                    "create" => summary.add += 1,
                    "update" => summary.change += 1,
                    "delete" => summary.destroy += 1,
                    "replace" => {
                        summary.add += 1;
                        summary.destroy += 1;
                        summary.replace += 1;
                    }
                    _ => {}
                }
                summary.resources.push(ResourceChange {
                    address: change.resource.addr,
                    actions,
                });
            }
            ("resource_drift", Some(change), _) => summary.drift.push(ResourceChange {
                address: change.resource.addr,
                actions: actions_of(&change.action),
            }),
            ("outputs", _, Some(outputs)) => {
                summary.outputs_change = outputs.values().any(|output| output.action != "noop");
            }
            _ => {}
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(address: &str, actions: &[&str]) -> serde_json::Value {
        serde_json::json!({"address": address, "change": {"actions": actions}})
    }

    #[test]
    fn counts_follow_terraforms_summary_line() {
        let json = serde_json::json!({
            "format_version": "1.2",
            "resource_changes": [
                change("aws_vpc.main", &["create"]),
                change("aws_subnet.a", &["update"]),
                change("aws_subnet.b", &["delete", "create"]),
                change("aws_subnet.c", &["create", "delete"]),
                change("aws_iam_role.old", &["delete"]),
                change("data.aws_caller_identity.me", &["read"]),
                change("aws_s3_bucket.kept", &["no-op"]),
            ],
            "resource_drift": [change("aws_vpc.main", &["update"])],
            "output_changes": {"vpc_id": {"actions": ["no-op"]}}
        });
        let summary = summarize(&json.to_string()).unwrap();
        assert_eq!(
            (
                summary.add,
                summary.change,
                summary.destroy,
                summary.replace
            ),
            (3, 1, 3, 2)
        );
        let addresses: Vec<&str> = summary
            .resources
            .iter()
            .map(|r| r.address.as_str())
            .collect();
        assert_eq!(
            addresses,
            [
                "aws_vpc.main",
                "aws_subnet.a",
                "aws_subnet.b",
                "aws_subnet.c",
                "aws_iam_role.old"
            ]
        );
        assert_eq!(
            summary.drift,
            vec![ResourceChange {
                address: "aws_vpc.main".into(),
                actions: vec!["update".into()]
            }]
        );
        assert!(summary.has_changes() && summary.destroys() && !summary.outputs_change);
    }

    #[test]
    fn drifted_resources_give_their_id_and_the_names_of_what_changed() {
        let json = serde_json::json!({
            "resource_drift": [
                {"address": "aws_vpc.main", "change": {"actions": ["update"],
                    "before": {"id": "vpc-1", "cidr_block": "10.0.0.0/16", "tags": {"Name": "app"}},
                    "after": {"id": "vpc-1", "cidr_block": "10.0.0.0/16", "tags": {"Name": "by-hand"}}}},
                {"address": "aws_vpc.extra", "change": {"actions": ["delete"],
                    "before": {"id": "vpc-2", "tags": {}}, "after": null}}
            ],
            "resource_changes": [
                {"address": "aws_vpc.main", "change": {"actions": ["update"],
                    "before": {"id": "vpc-1", "tags": {"Name": "by-hand"}, "password": "s3cret"},
                    "after": {"id": "vpc-1", "tags": {"Name": "app"}, "password": "other"}}},
                {"address": "aws_vpc.extra", "change": {"actions": ["create"],
                    "before": null, "after": {"tags": {}}}}
            ]
        });
        let details = resource_details(&json.to_string()).unwrap();
        assert_eq!(
            details["aws_vpc.main"],
            ResourceDetail {
                id: Some("vpc-1".into()),
                changed_attributes: vec!["tags".into()],
            },
            "what changed outside terraform wins over what the apply changes"
        );
        assert_eq!(details["aws_vpc.extra"].id.as_deref(), Some("vpc-2"));
        assert!(details["aws_vpc.extra"].changed_attributes.is_empty());
        assert!(
            !format!("{details:?}").contains("s3cret"),
            "names only, never values"
        );
    }

    #[test]
    fn nothing_to_do_is_no_changes_even_with_drift() {
        let json = serde_json::json!({
            "resource_changes": [change("aws_vpc.main", &["no-op"])],
            "resource_drift": [change("aws_vpc.main", &["update"])],
        });
        let summary = summarize(&json.to_string()).unwrap();
        assert!(!summary.has_changes());
        assert_eq!(summary.drift.len(), 1);
        let outputs_only = serde_json::json!({"output_changes": {"x": {"actions": ["create"]}}});
        assert!(summarize(&outputs_only.to_string()).unwrap().has_changes());
        assert!(summarize("not json").is_err());
    }

    /// Lines as terraform 1.11 prints them (trimmed to the fields read).
    const STREAM: &str = r#"{"@level":"info","@message":"Terraform 1.11.4","type":"version","ui":"1.2"}
{"@level":"info","@message":"aws_vpc.main: Drift detected (update)","change":{"resource":{"addr":"aws_vpc.main"},"action":"update"},"type":"resource_drift"}
{"@level":"info","@message":"aws_vpc.main: Plan to update","change":{"resource":{"addr":"aws_vpc.main"},"action":"update"},"type":"planned_change"}
{"@level":"info","@message":"terraform_data.a: Plan to replace","change":{"resource":{"addr":"terraform_data.a"},"action":"replace","reason":"cannot_update"},"type":"planned_change"}
{"@level":"info","@message":"aws_subnet.a: Plan to create","change":{"resource":{"addr":"aws_subnet.a"},"action":"create"},"type":"planned_change"}
{"@level":"info","@message":"data.x: Plan to read","change":{"resource":{"addr":"data.x"},"action":"read"},"type":"planned_change"}
{"@level":"info","@message":"Plan: 2 to add, 1 to change, 1 to destroy.","changes":{"add":2,"change":1,"import":0,"remove":1,"operation":"plan"},"type":"change_summary"}
{"@level":"info","@message":"Outputs: 1","outputs":{"o":{"sensitive":false,"action":"noop"}},"type":"outputs"}
a provider's stray line
"#;

    #[test]
    fn the_stream_gives_the_same_summary_as_show_json() {
        let report = summarize_stream(STREAM);
        let summary = &report.summary;
        assert_eq!(
            (
                summary.add,
                summary.change,
                summary.destroy,
                summary.replace
            ),
            (2, 1, 1, 1)
        );
        let changes: Vec<(&str, Vec<String>)> = summary
            .resources
            .iter()
            .map(|r| (r.address.as_str(), r.actions.clone()))
            .collect();
        assert_eq!(
            changes,
            vec![
                ("aws_vpc.main", vec!["update".to_string()]),
                (
                    "terraform_data.a",
                    vec!["delete".to_string(), "create".to_string()]
                ),
                ("aws_subnet.a", vec!["create".to_string()]),
            ]
        );
        assert_eq!(summary.drift.len(), 1);
        assert!(summary.has_changes() && summary.destroys() && !summary.outputs_change);
        assert!(report.errors.is_empty());
    }

    #[test]
    fn error_diagnostics_are_collected_as_text() {
        let stream = r#"{"@level":"error","@message":"Error: Module not installed","diagnostic":{"severity":"error","summary":"Module not installed","detail":"Run terraform init."},"type":"diagnostic"}"#;
        let report = summarize_stream(stream);
        assert_eq!(
            report.errors,
            "Error: Module not installed\nRun terraform init.\n"
        );
        assert!(!report.summary.has_changes());
    }
}
