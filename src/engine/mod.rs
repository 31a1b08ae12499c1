//! Pure decisions: what Karrots may do with a commit of an environment — which lane and
//! identity it runs with ([`decide_lane`]) and, in the daemon, whether to plan, apply, refuse
//! or supersede it ([`reconcile`]).
//!
//! Architecture invariant: nothing here does I/O, reads a clock or starts a process. Callers
//! gather the facts (the environment as the trust branch has it, as the commit has it, whether
//! the commit is on the environment's branch) and carry out the answer. `karrots plan` and the
//! daemon ask the same function, so they cannot disagree on who gets the apply role.

use crate::config::EnvironmentSpec;

pub mod drift;
pub mod machine;
pub mod reconcile;
pub mod retry;
pub mod state;

/// The two workdirs of an environment. They share nothing: no checkout, no lock file, no
/// plugin state, no plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "runtime", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "runtime", serde(rename_all = "snake_case"))]
pub enum Lane {
    /// Commits on the environment's branch (and drift checks of the last applied one): run
    /// with the apply identity (`role_arn`); their plans may be applied.
    Merged,
    /// Every other commit: `preview_role_arn` or no credentials; never applied.
    Preview,
}

impl Lane {
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Merged => "merged",
            Lane::Preview => "preview",
        }
    }
}

impl std::fmt::Display for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a commit may not run at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunRefusal {
    /// The environment's `karrots.yaml` is not on the trust branch yet: its identity is
    /// unknown, so nothing of it runs until it is merged there.
    NotOnTrustBranch,
    /// The commit changes identity fields that only the trust branch may change.
    IdentityChanged { fields: Vec<&'static str> },
}

impl RunRefusal {
    /// The refusal as a sentence, e.g. for `refusing to plan prod at 1a2b3c4: …`.
    pub fn reason(&self, trust_branch: &str) -> String {
        match self {
            RunRefusal::NotOnTrustBranch => format!(
                "the environment is not on the trust branch {trust_branch}: merge its karrots.yaml there first"
            ),
            RunRefusal::IdentityChanged { fields } => format!(
                "it changes {} of the environment, which only the trust branch {trust_branch} may change",
                fields.join(", ")
            ),
        }
    }
}

/// Decides the lane of a commit, or refuses it.
///
/// - `trusted`: the environment as the trust branch describes it (`None`: not there).
/// - `candidate`: the environment as the commit describes it.
/// - `on_branch`: whether the commit is on the first-parent chain of the trusted `branch`, as
///   fetched from the remote.
pub fn decide_lane(
    trusted: Option<&EnvironmentSpec>,
    candidate: &EnvironmentSpec,
    on_branch: bool,
) -> Result<Lane, RunRefusal> {
    let trusted = trusted.ok_or(RunRefusal::NotOnTrustBranch)?;
    let fields = trusted.identity_differences(candidate);
    if !fields.is_empty() {
        return Err(RunRefusal::IdentityChanged { fields });
    }
    Ok(if on_branch {
        Lane::Merged
    } else {
        Lane::Preview
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_environment;

    const PROD: &str = "apiVersion: karrots/v1\nname: prod\nbranch: main\naws:\n  account_id: \"123456789012\"\n  region: us-east-1\n  role_arn: arn:aws:iam::123456789012:role/karrots-worker\n  preview_role_arn: arn:aws:iam::123456789012:role/karrots-readonly\nterraform:\n  root: modules/app\n  vars: { size: 1 }\n";

    /// PROD with every `(from, to)` edit applied.
    fn spec(edits: &[(&str, &str)]) -> EnvironmentSpec {
        let mut text = PROD.to_string();
        for (from, to) in edits {
            assert!(text.contains(from), "{from:?} does not apply");
            text = text.replace(from, to);
        }
        parse_environment(&text, "environments/prod/karrots.yaml".as_ref(), "prod").unwrap()
    }

    #[test]
    fn the_lane_and_the_refusals_in_one_table() {
        type Row<'a> = (
            &'a str,
            bool,
            &'a [(&'a str, &'a str)],
            bool,
            Result<Lane, RunRefusal>,
        );
        let changed = |fields: &[&'static str]| {
            Err(RunRefusal::IdentityChanged {
                fields: fields.to_vec(),
            })
        };
        let rows: &[Row] = &[
            ("a commit on the branch", true, &[], true, Ok(Lane::Merged)),
            ("a commit elsewhere", true, &[], false, Ok(Lane::Preview)),
            (
                "vars are not identity",
                true,
                &[("size: 1", "size: 9")],
                true,
                Ok(Lane::Merged),
            ),
            (
                "not on the trust branch",
                false,
                &[],
                true,
                Err(RunRefusal::NotOnTrustBranch),
            ),
            (
                "a branch moves the account and both roles",
                true,
                &[("123456789012", "210987654321")],
                false,
                changed(&["aws.account_id", "aws.role_arn", "aws.preview_role_arn"]),
            ),
            (
                "a preview asks for the apply role",
                true,
                &[("role/karrots-readonly", "role/karrots-worker")],
                false,
                changed(&["aws.preview_role_arn"]),
            ),
            (
                "a branch lifts its own refusals",
                true,
                &[("terraform:\n", "allow: [external]\nterraform:\n")],
                false,
                changed(&["allow"]),
            ),
            (
                "even on the branch, allow comes from the trust branch",
                true,
                &[("terraform:\n", "allow: [local-exec]\nterraform:\n")],
                true,
                changed(&["allow"]),
            ),
            (
                "a branch retargets the environment's branch",
                true,
                &[("branch: main", "branch: dev")],
                false,
                changed(&["branch"]),
            ),
            (
                "a branch moves the state",
                true,
                &[(
                    "  vars:",
                    "  backend: { s3: { bucket: other-state, key: prod.tfstate, region: us-east-1, use_lockfile: true } }\n  vars:",
                )],
                false,
                changed(&["terraform.backend"]),
            ),
            (
                "a branch changes the profile",
                true,
                &[(
                    "  region: us-east-1\n",
                    "  region: us-east-1\n  profile: admin\n",
                )],
                false,
                changed(&["aws.profile"]),
            ),
        ];
        let trusted = spec(&[]);
        for (what, on_trust_branch, edits, on_branch, expected) in rows {
            let decided = decide_lane(
                on_trust_branch.then_some(&trusted),
                &spec(edits),
                *on_branch,
            );
            assert_eq!(&decided, expected, "{what}");
        }
    }

    #[test]
    fn refusals_read_as_sentences() {
        let refusal = RunRefusal::IdentityChanged {
            fields: vec!["aws.account_id", "allow"],
        };
        assert_eq!(
            refusal.reason("main"),
            "it changes aws.account_id, allow of the environment, which only the trust branch main may change"
        );
        assert!(
            RunRefusal::NotOnTrustBranch
                .reason("main")
                .contains("merge its karrots.yaml there first")
        );
    }
}
