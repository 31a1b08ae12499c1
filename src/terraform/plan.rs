//! Reads `terraform show -json` of a saved plan into a summary. Pure: text in, data out.
//!
//! The summary comes from `resource_changes` (what an apply would do) and `resource_drift`
//! (what changed outside terraform since the last apply), never from terraform's exit code.

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
}
