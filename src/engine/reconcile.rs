//! What the daemon does for an environment when its branch has a new head, and after a plan:
//! a pure function of the recorded state and the facts gathered about the commit.

use std::collections::BTreeSet;

use crate::config::{ApplyPolicy, RepoPath};

/// What the daemon knows about an environment's merged lane.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergedState {
    /// The commit last applied (or found in sync), if any.
    pub last_applied: Option<String>,
    /// The input fingerprint of `last_applied`. A head with the same fingerprint changes
    /// nothing the environment is built from. (Not the last *planned* fingerprint: a plan
    /// whose apply failed or was cut off is not where the environment is.)
    pub applied_fingerprint: Option<String>,
}

/// Facts about a new head of the environment's branch, gathered by the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadFacts {
    pub commit: String,
    /// Whether the head descends from `last_applied` (true when nothing was applied yet).
    pub descends_from_last_applied: bool,
    /// The environment's input fingerprint at the head.
    pub fingerprint: String,
}

/// The decision for a new head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadDecision {
    /// The head is where the environment already is: nothing to record.
    AlreadyThere,
    /// History was rewritten (force-push, rewind): refuse until it descends again.
    RefuseRewrittenHistory { last_applied: String },
    /// The commit does not change the environment's inputs: no plan, recorded as a no-op.
    Unaffected,
    /// Plan the commit in the merged lane.
    Plan,
}

/// The part of [`decide_head`] that needs no fingerprint: whether the head is where the
/// environment already is, or rewrote its history. `None`: go on and fingerprint it.
pub fn decide_history(
    state: &MergedState,
    commit: &str,
    descends_from_last_applied: bool,
) -> Option<HeadDecision> {
    if state.last_applied.as_deref() == Some(commit) {
        return Some(HeadDecision::AlreadyThere);
    }
    match &state.last_applied {
        Some(last) if !descends_from_last_applied => Some(HeadDecision::RefuseRewrittenHistory {
            last_applied: last.clone(),
        }),
        _ => None,
    }
}

pub fn decide_head(state: &MergedState, head: &HeadFacts) -> HeadDecision {
    if let Some(decision) = decide_history(state, &head.commit, head.descends_from_last_applied) {
        return decision;
    }
    match &state.applied_fingerprint {
        Some(fingerprint) if *fingerprint == head.fingerprint && state.last_applied.is_some() => {
            HeadDecision::Unaffected
        }
        _ => HeadDecision::Plan,
    }
}

/// Whether a commit that changed the files `changed` (`/` paths, from the last applied
/// commit) may change an environment whose last applied input closure is `inputs`. A file at
/// the repository root is read by every environment's check (a committed `.terraformrc` there
/// is refused for all of them), so a change there always counts.
pub fn touches_inputs(changed: &[String], inputs: &BTreeSet<RepoPath>) -> bool {
    changed
        .iter()
        .any(|path| !path.contains('/') || inputs.iter().any(|input| input.contains(path)))
}

/// What a merged plan would do, as the decision after it needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanOutcome {
    pub has_changes: bool,
    /// Deletes or replaces something.
    pub destroys: bool,
}

/// The decision after a merged plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterPlan {
    /// Nothing to change: the environment is in sync at this commit.
    InSync,
    /// Apply the saved plan of this commit.
    Apply,
    /// `apply.auto: false`: stop after the plan, which waits for an approval.
    AwaitApproval,
    /// The plan deletes or replaces resources and `apply.allow_destroy` is false.
    RefuseDestroy,
}

pub fn decide_after_plan(policy: &ApplyPolicy, plan: PlanOutcome) -> AfterPlan {
    if !plan.has_changes {
        AfterPlan::InSync
    } else if plan.destroys && !policy.allow_destroy {
        AfterPlan::RefuseDestroy
    } else if !policy.auto {
        AfterPlan::AwaitApproval
    } else {
        AfterPlan::Apply
    }
}

/// The commits waiting for one lane of one environment, oldest first: at most one per
/// branch, as `(branch, commit)`.
pub type Waiting = std::collections::VecDeque<(String, String)>;

/// Queues `commit` of `branch`. A commit of the same branch that was waiting is superseded
/// (returned, and never run); the newer one takes its place in line. A commit of another
/// branch is never superseded by it: two feature branches each get their preview.
pub fn enqueue(waiting: &mut Waiting, branch: &str, commit: &str) -> Option<String> {
    match waiting.iter_mut().find(|(queued, _)| queued == branch) {
        Some((_, queued)) if queued == commit => None,
        Some((_, queued)) => Some(std::mem::replace(queued, commit.to_string())),
        None => {
            waiting.push_back((branch.to_string(), commit.to_string()));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(commit: &str, descends: bool, fingerprint: &str) -> HeadFacts {
        HeadFacts {
            commit: commit.into(),
            descends_from_last_applied: descends,
            fingerprint: fingerprint.into(),
        }
    }

    #[test]
    fn new_heads_in_one_table() {
        let fresh = MergedState::default();
        let applied = MergedState {
            last_applied: Some("a".into()),
            applied_fingerprint: Some("fp1".into()),
        };
        let rows: &[(&str, &MergedState, HeadFacts, HeadDecision)] = &[
            (
                "first commit ever",
                &fresh,
                head("a", true, "fp1"),
                HeadDecision::Plan,
            ),
            (
                "the applied commit again",
                &applied,
                head("a", true, "fp1"),
                HeadDecision::AlreadyThere,
            ),
            (
                "a descendant that changes inputs",
                &applied,
                head("b", true, "fp2"),
                HeadDecision::Plan,
            ),
            (
                "a descendant that does not",
                &applied,
                head("b", true, "fp1"),
                HeadDecision::Unaffected,
            ),
            (
                // b was planned (fp2) but its apply was cut off: the environment is still at
                // a, so b is planned again, never taken as applied.
                "the head of an interrupted apply",
                &applied,
                head("b", true, "fp2"),
                HeadDecision::Plan,
            ),
            (
                "a force-push",
                &applied,
                head("x", false, "fp2"),
                HeadDecision::RefuseRewrittenHistory {
                    last_applied: "a".into(),
                },
            ),
            (
                "a force-push to unchanged inputs is still refused",
                &applied,
                head("x", false, "fp1"),
                HeadDecision::RefuseRewrittenHistory {
                    last_applied: "a".into(),
                },
            ),
        ];
        for (what, state, facts, expected) in rows {
            assert_eq!(&decide_head(state, facts), expected, "{what}");
        }
    }

    #[test]
    fn which_changed_paths_touch_an_input_closure() {
        let inputs: BTreeSet<RepoPath> = ["environments/prod", "modules/app", "policies"]
            .into_iter()
            .map(|path| RepoPath::parse(path).unwrap())
            .collect();
        let rows: &[(&str, &[&str], bool)] = &[
            ("nothing changed", &[], false),
            (
                "another environment",
                &["environments/dev/karrots.yaml"],
                false,
            ),
            ("a module it reaches", &["modules/app/main.tf"], true),
            (
                "a module whose name extends one it reaches",
                &["modules/application/main.tf"],
                false,
            ),
            ("its own folder", &["environments/prod/karrots.yaml"], true),
            ("a policy", &["policies/worker.json"], true),
            ("a file at the root", &[".terraformrc"], true),
            (
                "one of several",
                &["modules/other/x.tf", "modules/app/y.tf"],
                true,
            ),
        ];
        for (what, changed, touches) in rows {
            let changed: Vec<String> = changed.iter().map(ToString::to_string).collect();
            assert_eq!(touches_inputs(&changed, &inputs), *touches, "{what}");
        }
    }

    #[test]
    fn after_a_plan_in_one_table() {
        let policy = |auto, allow_destroy| ApplyPolicy {
            auto,
            allow_destroy,
        };
        let plan = |has_changes, destroys| PlanOutcome {
            has_changes,
            destroys,
        };
        let rows = [
            (
                "nothing to do",
                policy(true, false),
                plan(false, false),
                AfterPlan::InSync,
            ),
            (
                "changes, auto",
                policy(true, false),
                plan(true, false),
                AfterPlan::Apply,
            ),
            (
                "changes, auto off",
                policy(false, false),
                plan(true, false),
                AfterPlan::AwaitApproval,
            ),
            (
                "a replacement refused",
                policy(true, false),
                plan(true, true),
                AfterPlan::RefuseDestroy,
            ),
            (
                "a refused replacement even without auto",
                policy(false, false),
                plan(true, true),
                AfterPlan::RefuseDestroy,
            ),
            (
                "a replacement allowed",
                policy(true, true),
                plan(true, true),
                AfterPlan::Apply,
            ),
        ];
        for (what, policy, plan, expected) in rows {
            assert_eq!(decide_after_plan(&policy, plan), expected, "{what}");
        }
    }

    #[test]
    fn a_newer_commit_supersedes_the_queued_one_of_its_branch_only() {
        let mut waiting = Waiting::new();
        assert_eq!(enqueue(&mut waiting, "main", "a"), None);
        assert_eq!(
            enqueue(&mut waiting, "main", "a"),
            None,
            "the same commit twice is not superseded"
        );
        assert_eq!(enqueue(&mut waiting, "feature-x", "x1"), None);
        assert_eq!(enqueue(&mut waiting, "feature-y", "y1"), None);
        assert_eq!(enqueue(&mut waiting, "feature-x", "x2"), Some("x1".into()));
        let order: Vec<(&str, &str)> = waiting
            .iter()
            .map(|(branch, commit)| (branch.as_str(), commit.as_str()))
            .collect();
        assert_eq!(
            order,
            [("main", "a"), ("feature-x", "x2"), ("feature-y", "y1")],
            "a superseding commit keeps its branch's place in line"
        );
    }
}
