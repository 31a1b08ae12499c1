//! The merged lane of one environment as a state machine: [`step`] takes the recorded state
//! and one event (a new head, what was found about it, a plan or apply that ended, a failure,
//! a retry's time) and returns the next state and the effects to carry out (inspect, stage,
//! plan, apply, record an outcome, wait). The daemon's merged worker only carries out effects
//! and feeds their results back as events; every rule of "no change outside a merged commit"
//! that concerns one environment's commits is decided here, without I/O or a clock.
//!
//! The lane is the one that waits: for a retry of a passing failure, and for the approvals of
//! a saved plan — each a [`Phase`] the environment can be found in and resumed from.

use std::time::Duration;

use super::reconcile::{
    AfterPlan, HeadDecision, HeadFacts, MergedState, PlanOutcome, decide_after_plan, decide_head,
    decide_history,
};
use super::retry::{ErrorClass, Policy, error_policy};
use super::state::EnvStatus;
use crate::config::ApplyPolicy;

/// The recorded state of one environment's merged lane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvState {
    pub status: EnvStatus,
    /// Where the environment is: the last applied commit and its fingerprint.
    pub merged: MergedState,
    /// The environment's apply policy, as the trust branch has it.
    pub apply: ApplyPolicy,
    pub streak: Streak,
    pub phase: Phase,
}

/// The failures in a row of one commit. A newer commit starts a new streak: it wins over the
/// retry of an older one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Streak {
    pub commit: Option<String>,
    pub attempts: u32,
    /// The last failure's message: an unknown failure that repeats itself is not passing.
    pub message: String,
}

/// What the lane is doing with which commit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Phase {
    /// Nothing: waiting for a new head.
    #[default]
    Idle,
    /// Finding out whether the head is on the branch, descends from the last applied commit,
    /// and changes any path of its input closure.
    Inspecting {
        commit: String,
    },
    /// Exporting and checking the commit's input closure, and fingerprinting it.
    Staging {
        commit: String,
    },
    Planning {
        commit: String,
        fingerprint: String,
    },
    Applying {
        commit: String,
        fingerprint: String,
        /// The plan was approved (`apply.approval`): a stale plan is made again and waits
        /// for approvals of its own, rather than failing the environment.
        approved: bool,
    },
    /// A plan with changes, saved, waiting for the approvals `apply.approval` asks for.
    AwaitingApproval {
        commit: String,
        fingerprint: String,
    },
    /// A commit whose plan failed for a reason that may pass, tried again after `after`.
    Retrying {
        commit: String,
        after: Duration,
    },
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The newest commit of the environment's branch, taken from its queue.
    Head { commit: String },
    /// What inspecting the head found.
    Inspected(Inspection),
    /// What staging the commit found.
    Staged(Staging),
    /// The plan succeeded.
    Planned(PlanOutcome),
    /// The plan failed; `jitter` in [0, 1) spreads the retries of many environments.
    PlanFailed {
        class: ErrorClass,
        message: String,
        jitter: f64,
    },
    /// The apply ended: `Ok` when it applied, else why not.
    ApplyEnded(Result<(), String>),
    /// Terraform refused the saved plan as stale: the state changed since it was made.
    ApplyStale { message: String },
    /// The approval tags of the environment changed (a fetch brought new ones).
    TagsChanged,
    /// The approval tags were counted for the waiting plan: whether they are enough.
    ApprovalsCounted { approved: bool },
    /// The time of a retry came.
    RetryDue,
    /// The daemon stops: a plan in flight was cut off.
    Interrupted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// On the first-parent chain of the environment's branch, as fetched from the remote.
    pub on_branch: bool,
    /// Descends from the last applied commit (true when there is none).
    pub descends: bool,
    /// Changes no path of the last applied commit's input closure (false when unknown).
    pub untouched: bool,
    /// With `verify.signed_commits`: why a commit of the first-parent chain since the last
    /// applied one does not count as signed (the first such commit), if one does not.
    pub unsigned: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Staging {
    /// The commit's environment passes the checks, with this input fingerprint.
    Checked { fingerprint: String },
    /// The checks refused it (the problems, one per line), or it changes identity fields
    /// only the trust branch may change (the reason).
    Refused { message: String },
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Inspect {
        commit: String,
    },
    Stage {
        commit: String,
    },
    /// Plan in the merged lane, with the apply identity (the environment `planning`).
    Plan {
        commit: String,
    },
    /// Apply the saved plan (the environment `applying`).
    Apply {
        commit: String,
    },
    /// Count the approval tags of the waiting plan of `commit`.
    CountApprovals {
        commit: String,
    },
    /// Record an outcome, in one transaction.
    Record(Record),
    /// Feed [`Event::RetryDue`] back after this long, unless a newer head comes first.
    RetryAfter(Duration),
}

/// An outcome to record: the run's result, the environment's status, where it now is, the
/// audit entry and the alerts, which the daemon words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Not on the first-parent chain of the branch: refused, the status left alone.
    NotOnBranch {
        commit: String,
    },
    /// History rewritten: refused until the branch descends from `last_applied` again.
    HistoryRewritten {
        commit: String,
        last_applied: String,
    },
    /// The commit changes nothing the environment is built from: it is where the environment
    /// now is, without a plan. `staged`: found by staging, else by the paths it changes.
    PassedOver {
        commit: String,
        fingerprint: String,
        staged: bool,
        status: Option<EnvStatus>,
    },
    /// A commit being applied lacks a signer's signature (`verify.signed_commits`): refused.
    Unsigned {
        commit: String,
        message: String,
    },
    /// The commit does not pass the checks, or changes the identity: `config_error`.
    ConfigError {
        commit: String,
        message: String,
    },
    /// The plan has changes and is applied next: its run ends with them.
    Planned {
        commit: String,
    },
    /// The plan has no changes: in sync at this commit.
    InSync {
        commit: String,
        fingerprint: String,
    },
    /// `apply.auto: false` or `apply.approval`: the plan waits for approvals.
    AwaitingApproval {
        commit: String,
    },
    /// The approved plan could not be applied, as the state changed since it was made: it
    /// is made again, and waits for approvals of its own.
    ApprovedPlanStale {
        commit: String,
        message: String,
    },
    /// The plan deletes or replaces something and `apply.allow_destroy` is false.
    RefusedDestroy {
        commit: String,
    },
    /// The plan failed: the environment `error` while it is tried again, else `failed` until
    /// a new commit; alerted on the first failure of a streak and when the retries give up.
    PlanFailed {
        commit: String,
        message: String,
        class: ErrorClass,
        attempt: u32,
        status: EnvStatus,
        retry_after: Option<Duration>,
        alert: bool,
    },
    /// The plan was cut off by a stop: `interrupted`, the environment `failed`.
    PlanInterrupted {
        commit: String,
    },
    Applied {
        commit: String,
        fingerprint: String,
    },
    ApplyFailed {
        commit: String,
        message: String,
    },
}

/// The next state of the merged lane and what to do, given `event`.
pub fn step(mut state: EnvState, event: Event) -> (EnvState, Vec<Effect>) {
    let phase = std::mem::take(&mut state.phase);
    // Only an approved plan is made again when it went stale; any other is a failed apply
    // (the next commit re-plans).
    let event = match (&phase, event) {
        (
            Phase::Applying {
                approved: false, ..
            },
            Event::ApplyStale { message },
        ) => Event::ApplyEnded(Err(message)),
        (_, event) => event,
    };
    let effects = match (phase, event) {
        // The waiting commit queued again (a webhook, a re-fetch): its plan keeps waiting,
        // and the approvals are counted again.
        (
            Phase::AwaitingApproval {
                commit,
                fingerprint,
            },
            Event::Head { commit: head },
        ) if head == commit => {
            state.phase = Phase::AwaitingApproval {
                commit: commit.clone(),
                fingerprint,
            };
            vec![Effect::CountApprovals { commit }]
        }
        (_, Event::Head { commit }) => {
            if state.streak.commit.as_ref() != Some(&commit) {
                state.streak = Streak::default();
            }
            state.phase = Phase::Inspecting {
                commit: commit.clone(),
            };
            vec![Effect::Inspect { commit }]
        }
        (Phase::Retrying { commit, .. }, Event::RetryDue) => {
            state.phase = Phase::Inspecting {
                commit: commit.clone(),
            };
            vec![Effect::Inspect { commit }]
        }
        (Phase::Inspecting { commit }, Event::Inspected(found)) => {
            inspected(&mut state, commit, found)
        }
        (Phase::Staging { commit }, Event::Staged(staged)) => staged_(&mut state, commit, staged),
        (
            Phase::Planning {
                commit,
                fingerprint,
            },
            Event::Planned(plan),
        ) => planned(&mut state, commit, fingerprint, plan),
        (
            Phase::Planning { commit, .. },
            Event::PlanFailed {
                class,
                message,
                jitter,
            },
        ) => plan_failed(&mut state, commit, class, message, jitter),
        (Phase::Planning { commit, .. }, Event::Interrupted) => {
            state.status = EnvStatus::Failed;
            vec![Effect::Record(Record::PlanInterrupted { commit })]
        }
        (
            Phase::AwaitingApproval {
                commit,
                fingerprint,
            },
            Event::TagsChanged,
        ) => {
            state.phase = Phase::AwaitingApproval {
                commit: commit.clone(),
                fingerprint,
            };
            vec![Effect::CountApprovals { commit }]
        }
        (
            Phase::AwaitingApproval {
                commit,
                fingerprint,
            },
            Event::ApprovalsCounted { approved },
        ) => {
            if approved {
                state.status = EnvStatus::Applying;
                state.phase = Phase::Applying {
                    commit: commit.clone(),
                    fingerprint,
                    approved: true,
                };
                vec![Effect::Apply { commit }]
            } else {
                state.phase = Phase::AwaitingApproval {
                    commit,
                    fingerprint,
                };
                Vec::new()
            }
        }
        (
            Phase::Applying {
                commit,
                approved: true,
                ..
            },
            Event::ApplyStale { message },
        ) => {
            state.status = EnvStatus::Planning;
            state.phase = Phase::Staging {
                commit: commit.clone(),
            };
            vec![
                Effect::Record(Record::ApprovedPlanStale {
                    commit: commit.clone(),
                    message,
                }),
                Effect::Stage { commit },
            ]
        }
        (
            Phase::Applying {
                commit,
                fingerprint,
                ..
            },
            Event::ApplyEnded(ended),
        ) => {
            state.streak = Streak::default();
            match ended {
                Ok(()) => {
                    state.status = EnvStatus::InSync;
                    state.merged = MergedState {
                        last_applied: Some(commit.clone()),
                        applied_fingerprint: Some(fingerprint.clone()),
                    };
                    vec![Effect::Record(Record::Applied {
                        commit,
                        fingerprint,
                    })]
                }
                Err(message) => {
                    state.status = EnvStatus::Failed;
                    vec![Effect::Record(Record::ApplyFailed { commit, message })]
                }
            }
        }
        // Anything else is news for a phase the lane is no longer in (a retry's time after a
        // newer head took its place): nothing to do, and the phase stays.
        (phase, _) => {
            state.phase = phase;
            Vec::new()
        }
    };
    (state, effects)
}

fn inspected(state: &mut EnvState, commit: String, found: Inspection) -> Vec<Effect> {
    if !found.on_branch {
        return vec![Effect::Record(Record::NotOnBranch { commit })];
    }
    match decide_history(&state.merged, &commit, found.descends) {
        Some(HeadDecision::AlreadyThere) => return Vec::new(),
        Some(HeadDecision::RefuseRewrittenHistory { last_applied }) => {
            state.status = EnvStatus::Refused;
            return vec![Effect::Record(Record::HistoryRewritten {
                commit,
                last_applied,
            })];
        }
        _ => {}
    }
    if let Some(message) = found.unsigned {
        state.status = EnvStatus::Refused;
        return vec![Effect::Record(Record::Unsigned { commit, message })];
    }
    // No path of the applied closure changed, so neither did the closure nor its
    // fingerprint: decided on the applied fingerprint, without staging the commit.
    if found.untouched
        && let Some(applied) = state.merged.applied_fingerprint.clone()
    {
        let facts = HeadFacts {
            commit: commit.clone(),
            descends_from_last_applied: found.descends,
            fingerprint: applied.clone(),
        };
        if decide_head(&state.merged, &facts) == HeadDecision::Unaffected {
            return vec![passed_over(state, commit, applied, false)];
        }
    }
    state.phase = Phase::Staging {
        commit: commit.clone(),
    };
    vec![Effect::Stage { commit }]
}

fn staged_(state: &mut EnvState, commit: String, staged: Staging) -> Vec<Effect> {
    let fingerprint = match staged {
        Staging::Checked { fingerprint } => fingerprint,
        Staging::Refused { message } => {
            state.status = EnvStatus::Error;
            return vec![Effect::Record(Record::ConfigError { commit, message })];
        }
    };
    let facts = HeadFacts {
        commit: commit.clone(),
        // Staging comes after inspection, which refused a head that does not descend.
        descends_from_last_applied: true,
        fingerprint: fingerprint.clone(),
    };
    if decide_head(&state.merged, &facts) == HeadDecision::Unaffected {
        return vec![passed_over(state, commit, fingerprint, true)];
    }
    state.phase = Phase::Planning {
        commit: commit.clone(),
        fingerprint,
    };
    vec![Effect::Plan { commit }]
}

/// A commit that leaves the inputs as last applied becomes the last applied commit; a
/// refusal, configuration error or wait for approval of a commit in between no longer
/// stands.
fn passed_over(state: &mut EnvState, commit: String, fingerprint: String, staged: bool) -> Effect {
    let status = state
        .status
        .cleared_by_return()
        .then_some(EnvStatus::InSync);
    if let Some(status) = status {
        state.status = status;
    }
    state.merged.last_applied = Some(commit.clone());
    Effect::Record(Record::PassedOver {
        commit,
        fingerprint,
        staged,
        status,
    })
}

fn planned(
    state: &mut EnvState,
    commit: String,
    fingerprint: String,
    plan: PlanOutcome,
) -> Vec<Effect> {
    state.streak = Streak::default();
    let record = match decide_after_plan(&state.apply, plan) {
        AfterPlan::Apply => {
            state.status = EnvStatus::Applying;
            state.phase = Phase::Applying {
                commit: commit.clone(),
                fingerprint,
                approved: false,
            };
            return vec![
                Effect::Record(Record::Planned {
                    commit: commit.clone(),
                }),
                Effect::Apply { commit },
            ];
        }
        AfterPlan::InSync => {
            state.status = EnvStatus::InSync;
            state.merged = MergedState {
                last_applied: Some(commit.clone()),
                applied_fingerprint: Some(fingerprint.clone()),
            };
            Record::InSync {
                commit,
                fingerprint,
            }
        }
        AfterPlan::AwaitApproval => {
            state.status = EnvStatus::AwaitingApproval;
            state.phase = Phase::AwaitingApproval {
                commit: commit.clone(),
                fingerprint,
            };
            return vec![
                Effect::Record(Record::AwaitingApproval {
                    commit: commit.clone(),
                }),
                Effect::CountApprovals { commit },
            ];
        }
        AfterPlan::RefuseDestroy => {
            state.status = EnvStatus::Refused;
            Record::RefusedDestroy { commit }
        }
    };
    vec![Effect::Record(record)]
}

fn plan_failed(
    state: &mut EnvState,
    commit: String,
    class: ErrorClass,
    message: String,
    jitter: f64,
) -> Vec<Effect> {
    let streak = &mut state.streak;
    if streak.commit.as_ref() != Some(&commit) {
        *streak = Streak {
            commit: Some(commit.clone()),
            ..Streak::default()
        };
    }
    streak.attempts += 1;
    let repeated = streak.message == message;
    streak.message = message.clone();
    let attempt = streak.attempts;
    let policy = error_policy(class, attempt, repeated, jitter);
    let retry_after = match policy {
        Policy::Requeue(after) => Some(after),
        Policy::AwaitChange => None,
    };
    state.status = match policy {
        Policy::Requeue(_) => EnvStatus::Error,
        Policy::AwaitChange => EnvStatus::Failed,
    };
    let mut effects = vec![Effect::Record(Record::PlanFailed {
        commit: commit.clone(),
        message,
        class,
        attempt,
        status: state.status,
        retry_after,
        alert: attempt == 1 || policy == Policy::AwaitChange,
    })];
    if let Some(after) = retry_after {
        state.phase = Phase::Retrying { commit, after };
        effects.push(Effect::RetryAfter(after));
    }
    effects
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIVE_MINUTES: Duration = Duration::from_secs(300);

    fn state(status: EnvStatus, last: Option<(&str, &str)>, auto: bool) -> EnvState {
        EnvState {
            status,
            merged: MergedState {
                last_applied: last.map(|(commit, _)| commit.to_string()),
                applied_fingerprint: last.map(|(_, fingerprint)| fingerprint.to_string()),
            },
            apply: ApplyPolicy {
                auto,
                allow_destroy: false,
            },
            streak: Streak::default(),
            phase: Phase::Idle,
        }
    }

    fn head(commit: &str) -> Event {
        Event::Head {
            commit: commit.into(),
        }
    }

    fn inspected(on_branch: bool, descends: bool, untouched: bool) -> Event {
        Event::Inspected(Inspection {
            on_branch,
            descends,
            untouched,
            unsigned: None,
        })
    }

    fn checked(fingerprint: &str) -> Event {
        Event::Staged(Staging::Checked {
            fingerprint: fingerprint.into(),
        })
    }

    fn plan(has_changes: bool, destroys: bool) -> Event {
        Event::Planned(PlanOutcome {
            has_changes,
            destroys,
        })
    }

    fn failed(class: ErrorClass, message: &str) -> Event {
        Event::PlanFailed {
            class,
            message: message.into(),
            jitter: 0.0,
        }
    }

    /// Feeds `events` in order; returns the state and every effect, in order.
    fn run(mut state: EnvState, events: Vec<Event>) -> (EnvState, Vec<Effect>) {
        let mut all = Vec::new();
        for event in events {
            let (next, effects) = step(state, event);
            state = next;
            all.extend(effects);
        }
        (state, all)
    }

    fn records(effects: &[Effect]) -> Vec<&Record> {
        effects
            .iter()
            .filter_map(|effect| match effect {
                Effect::Record(record) => Some(record),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_merged_commit_is_inspected_staged_planned_and_applied() {
        let (after, effects) = run(
            state(EnvStatus::Planning, None, true),
            vec![
                head("b"),
                inspected(true, true, false),
                checked("fp2"),
                plan(true, false),
                Event::ApplyEnded(Ok(())),
            ],
        );
        assert_eq!(
            effects,
            vec![
                Effect::Inspect { commit: "b".into() },
                Effect::Stage { commit: "b".into() },
                Effect::Plan { commit: "b".into() },
                Effect::Record(Record::Planned { commit: "b".into() }),
                Effect::Apply { commit: "b".into() },
                Effect::Record(Record::Applied {
                    commit: "b".into(),
                    fingerprint: "fp2".into()
                }),
            ]
        );
        assert_eq!(after.status, EnvStatus::InSync);
        assert_eq!(after.merged.last_applied.as_deref(), Some("b"));
        assert_eq!(after.merged.applied_fingerprint.as_deref(), Some("fp2"));
        assert_eq!(after.phase, Phase::Idle);
    }

    /// SPEC §3, rules 1, 2 and 5, and the states a decision leaves: one row per rule.
    #[test]
    fn each_rule_for_a_new_head_in_one_table() {
        let applied = Some(("a", "fp1"));
        type Row = (
            &'static str,
            EnvState,
            Vec<Event>,
            Option<Record>,
            EnvStatus,
        );
        let rows: Vec<Row> = vec![
            (
                "rule 1: not on the branch's first-parent chain is refused, the status kept",
                state(EnvStatus::InSync, applied, true),
                vec![head("x"), inspected(false, true, false)],
                Some(Record::NotOnBranch { commit: "x".into() }),
                EnvStatus::InSync,
            ),
            (
                "the applied commit again: nothing at all",
                state(EnvStatus::InSync, applied, true),
                vec![head("a"), inspected(true, true, true)],
                None,
                EnvStatus::InSync,
            ),
            (
                "rule 2: a force-push is refused",
                state(EnvStatus::InSync, applied, true),
                vec![head("x"), inspected(true, false, true)],
                Some(Record::HistoryRewritten {
                    commit: "x".into(),
                    last_applied: "a".into(),
                }),
                EnvStatus::Refused,
            ),
            (
                "rule 5: no path of the closure changed: passed over unstaged",
                state(EnvStatus::InSync, applied, true),
                vec![head("b"), inspected(true, true, true)],
                Some(Record::PassedOver {
                    commit: "b".into(),
                    fingerprint: "fp1".into(),
                    staged: false,
                    status: None,
                }),
                EnvStatus::InSync,
            ),
            (
                "rule 5: staged to the same fingerprint: passed over",
                state(EnvStatus::InSync, applied, true),
                vec![head("b"), inspected(true, true, false), checked("fp1")],
                Some(Record::PassedOver {
                    commit: "b".into(),
                    fingerprint: "fp1".into(),
                    staged: true,
                    status: None,
                }),
                EnvStatus::InSync,
            ),
            (
                "a commit back at the applied inputs clears a refusal",
                state(EnvStatus::Refused, applied, true),
                vec![head("b"), inspected(true, true, true)],
                Some(Record::PassedOver {
                    commit: "b".into(),
                    fingerprint: "fp1".into(),
                    staged: false,
                    status: Some(EnvStatus::InSync),
                }),
                EnvStatus::InSync,
            ),
            (
                "but not a failure: what is deployed is not known",
                state(EnvStatus::Failed, applied, true),
                vec![head("b"), inspected(true, true, false), checked("fp1")],
                Some(Record::PassedOver {
                    commit: "b".into(),
                    fingerprint: "fp1".into(),
                    staged: true,
                    status: None,
                }),
                EnvStatus::Failed,
            ),
            (
                "verify.signed_commits: a commit without a signer's signature is refused, before any plan",
                state(EnvStatus::InSync, applied, true),
                vec![
                    head("b"),
                    Event::Inspected(Inspection {
                        on_branch: true,
                        descends: true,
                        untouched: true,
                        unsigned: Some("commit b: unsigned".into()),
                    }),
                ],
                Some(Record::Unsigned {
                    commit: "b".into(),
                    message: "commit b: unsigned".into(),
                }),
                EnvStatus::Refused,
            ),
            (
                "a commit that fails the checks is a configuration error",
                state(EnvStatus::InSync, applied, true),
                vec![
                    head("b"),
                    inspected(true, true, false),
                    Event::Staged(Staging::Refused {
                        message: "bad".into(),
                    }),
                ],
                Some(Record::ConfigError {
                    commit: "b".into(),
                    message: "bad".into(),
                }),
                EnvStatus::Error,
            ),
            (
                "a plan without changes: in sync at the commit",
                state(EnvStatus::Planning, applied, true),
                vec![
                    head("b"),
                    inspected(true, true, false),
                    checked("fp2"),
                    plan(false, false),
                ],
                Some(Record::InSync {
                    commit: "b".into(),
                    fingerprint: "fp2".into(),
                }),
                EnvStatus::InSync,
            ),
            (
                "apply.auto false: a plan with changes awaits approval, never in_sync",
                state(EnvStatus::Planning, applied, false),
                vec![
                    head("b"),
                    inspected(true, true, false),
                    checked("fp2"),
                    plan(true, false),
                ],
                Some(Record::AwaitingApproval { commit: "b".into() }),
                EnvStatus::AwaitingApproval,
            ),
            (
                "a destroy without allow_destroy is refused",
                state(EnvStatus::Planning, applied, true),
                vec![
                    head("b"),
                    inspected(true, true, false),
                    checked("fp2"),
                    plan(true, true),
                ],
                Some(Record::RefusedDestroy { commit: "b".into() }),
                EnvStatus::Refused,
            ),
        ];
        for (name, before, events, expected, status) in rows {
            let (after, effects) = run(before, events);
            let records = records(&effects);
            assert_eq!(records.first().copied(), expected.as_ref(), "{name}");
            assert!(records.len() <= 1, "{name}: {records:?}");
            assert_eq!(after.status, status, "{name}");
            assert!(
                !effects.iter().any(|e| matches!(e, Effect::Apply { .. })),
                "{name}: nothing here applies"
            );
        }
    }

    #[test]
    fn an_unapplied_plan_never_moves_where_the_environment_is() {
        for (auto, destroys) in [(false, false), (true, true)] {
            let before = state(EnvStatus::InSync, Some(("a", "fp1")), auto);
            let (after, _) = run(
                before.clone(),
                vec![
                    head("b"),
                    inspected(true, true, false),
                    checked("fp2"),
                    plan(true, destroys),
                ],
            );
            assert_eq!(after.merged, before.merged);
        }
        let (after, _) = run(
            state(EnvStatus::InSync, Some(("a", "fp1")), true),
            vec![
                head("b"),
                inspected(true, true, false),
                checked("fp2"),
                plan(true, false),
                Event::ApplyEnded(Err("boom".into())),
            ],
        );
        assert_eq!(after.merged.last_applied.as_deref(), Some("a"));
        assert_eq!(after.status, EnvStatus::Failed);
    }

    /// To the plan of commit `b`, from a fresh environment.
    fn to_plan() -> EnvState {
        run(
            state(EnvStatus::Planning, None, true),
            vec![head("b"), inspected(true, true, false), checked("fp2")],
        )
        .0
    }

    #[test]
    fn a_passing_failure_is_retried_until_it_succeeds() {
        // The daemon started before its AWS endpoint answered: STS refused the connection.
        let (waiting, effects) = step(
            to_plan(),
            failed(ErrorClass::Transient, "sts: connection refused"),
        );
        assert_eq!(
            waiting.status,
            EnvStatus::Error,
            "error while retried, not failed"
        );
        let Some(Effect::RetryAfter(after)) = effects.last() else {
            panic!("no retry: {effects:?}");
        };
        assert!(matches!(
            records(&effects)[0],
            Record::PlanFailed {
                alert: true,
                attempt: 1,
                ..
            }
        ));
        let (again, effects) = run(
            waiting,
            vec![
                Event::RetryDue,
                inspected(true, true, false),
                checked("fp2"),
                failed(ErrorClass::Transient, "sts: connection refused"),
            ],
        );
        assert!(*after <= FIVE_MINUTES);
        assert!(
            matches!(
                records(&effects)[0],
                Record::PlanFailed {
                    alert: false,
                    attempt: 2,
                    status: EnvStatus::Error,
                    ..
                }
            ),
            "the second failure of a streak is not alerted again: {effects:?}"
        );
        let (applied, effects) = run(
            again,
            vec![
                Event::RetryDue,
                inspected(true, true, false),
                checked("fp2"),
                plan(true, false),
                Event::ApplyEnded(Ok(())),
            ],
        );
        assert_eq!(applied.status, EnvStatus::InSync);
        assert_eq!(applied.streak, Streak::default());
        assert!(matches!(
            records(&effects)[..],
            [Record::Planned { .. }, Record::Applied { .. }]
        ));
    }

    #[test]
    fn a_permanent_failure_waits_for_a_new_commit() {
        let (after, effects) = step(to_plan(), failed(ErrorClass::Permanent, "bad"));
        assert_eq!(after.status, EnvStatus::Failed);
        assert_eq!(after.phase, Phase::Idle);
        assert!(!effects.iter().any(|e| matches!(e, Effect::RetryAfter(_))));
        assert!(matches!(
            records(&effects)[0],
            Record::PlanFailed {
                alert: true,
                retry_after: None,
                ..
            }
        ));
        // A retry's time that comes anyway does nothing.
        assert_eq!(step(after, Event::RetryDue).1, Vec::new());
    }

    #[test]
    fn an_unknown_failure_is_tried_once_more_and_given_up_when_it_repeats() {
        let (once, first) = step(to_plan(), failed(ErrorClass::Unknown, "odd"));
        assert_eq!(once.status, EnvStatus::Error);
        assert!(first.iter().any(|e| matches!(e, Effect::RetryAfter(_))));
        let (twice, second) = run(
            once,
            vec![
                Event::RetryDue,
                inspected(true, true, false),
                checked("fp2"),
                failed(ErrorClass::Unknown, "odd"),
            ],
        );
        assert_eq!(twice.status, EnvStatus::Failed);
        assert!(
            matches!(
                records(&second)[0],
                Record::PlanFailed {
                    alert: true,
                    attempt: 2,
                    retry_after: None,
                    ..
                }
            ),
            "giving up is alerted: {second:?}"
        );
    }

    #[test]
    fn a_newer_commit_during_a_retry_wins() {
        let (waiting, _) = step(to_plan(), failed(ErrorClass::Transient, "throttled"));
        let (newer, effects) = step(waiting, head("c"));
        assert_eq!(effects, vec![Effect::Inspect { commit: "c".into() }]);
        assert_eq!(
            newer.streak,
            Streak::default(),
            "a new commit starts a new streak"
        );
        // The old retry's time comes while c is being inspected: nothing of b runs.
        let (still, effects) = step(newer, Event::RetryDue);
        assert_eq!(effects, Vec::new());
        assert_eq!(still.phase, Phase::Inspecting { commit: "c".into() });
    }

    #[test]
    fn a_stop_during_a_plan_is_recorded_interrupted() {
        let (after, effects) = step(to_plan(), Event::Interrupted);
        assert_eq!(after.status, EnvStatus::Failed);
        assert!(matches!(
            records(&effects)[..],
            [Record::PlanInterrupted { .. }]
        ));
        assert!(!effects.iter().any(|e| matches!(e, Effect::RetryAfter(_))));
    }

    /// To the plan of `b` waiting for approvals (`apply.auto` off), applied `a` before.
    fn awaiting() -> EnvState {
        let (waiting, effects) = run(
            state(EnvStatus::InSync, Some(("a", "fp1")), false),
            vec![
                head("b"),
                inspected(true, true, false),
                checked("fp2"),
                plan(true, false),
            ],
        );
        assert_eq!(
            effects[effects.len() - 2..],
            [
                Effect::Record(Record::AwaitingApproval { commit: "b".into() }),
                Effect::CountApprovals { commit: "b".into() },
            ]
        );
        assert_eq!(waiting.status, EnvStatus::AwaitingApproval);
        waiting
    }

    #[test]
    fn a_waiting_plan_is_applied_once_its_approvals_count() {
        let waiting = awaiting();
        // Not enough yet: it waits, and counts again when tags come or the head is queued
        // again — never planning the commit anew, which would void the approvals.
        let (still, effects) = step(waiting, Event::ApprovalsCounted { approved: false });
        assert_eq!(effects, Vec::new());
        assert_eq!(still.status, EnvStatus::AwaitingApproval);
        for again in [Event::TagsChanged, head("b")] {
            let (same, effects) = step(still.clone(), again);
            assert_eq!(effects, vec![Effect::CountApprovals { commit: "b".into() }]);
            assert_eq!(same.phase, still.phase);
        }
        let (applied, effects) = run(
            still,
            vec![
                Event::ApprovalsCounted { approved: true },
                Event::ApplyEnded(Ok(())),
            ],
        );
        assert_eq!(
            effects,
            vec![
                Effect::Apply { commit: "b".into() },
                Effect::Record(Record::Applied {
                    commit: "b".into(),
                    fingerprint: "fp2".into()
                }),
            ]
        );
        assert_eq!(applied.status, EnvStatus::InSync);
        assert_eq!(applied.merged.last_applied.as_deref(), Some("b"));
        // Counting that comes late (the tags fetched again) applies nothing twice.
        let (_, effects) = step(applied, Event::ApprovalsCounted { approved: true });
        assert_eq!(effects, Vec::new());
    }

    #[test]
    fn a_newer_commit_supersedes_the_waiting_plan() {
        let (newer, effects) = step(awaiting(), head("c"));
        assert_eq!(effects, vec![Effect::Inspect { commit: "c".into() }]);
        // Approvals of b that arrive now apply nothing.
        let (_, effects) = step(newer, Event::ApprovalsCounted { approved: true });
        assert_eq!(effects, Vec::new());
    }

    #[test]
    fn an_approved_plan_gone_stale_is_made_again_and_waits_again() {
        let (stale, effects) = run(
            awaiting(),
            vec![
                Event::ApprovalsCounted { approved: true },
                Event::ApplyStale {
                    message: "Saved plan is stale".into(),
                },
            ],
        );
        assert_eq!(
            records(&effects),
            [&Record::ApprovedPlanStale {
                commit: "b".into(),
                message: "Saved plan is stale".into()
            }]
        );
        assert_eq!(effects.last(), Some(&Effect::Stage { commit: "b".into() }));
        assert_eq!(stale.merged.last_applied.as_deref(), Some("a"));
        let (again, effects) = run(stale, vec![checked("fp2"), plan(true, false)]);
        assert_eq!(again.status, EnvStatus::AwaitingApproval);
        assert_eq!(
            effects.last(),
            Some(&Effect::CountApprovals { commit: "b".into() })
        );
        // Without approvals (apply.auto on), a stale plan fails the apply as before.
        let (failed, _) = run(
            to_plan(),
            vec![
                plan(true, false),
                Event::ApplyStale {
                    message: "stale".into(),
                },
            ],
        );
        assert_eq!(failed.status, EnvStatus::Failed);
    }
}
