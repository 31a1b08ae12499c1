//! The states Karrots records, as types: an environment's status, a run's kind and result, a
//! drift status. Their text (`in_sync`, `no_changes`…) is what the database stores, the API
//! and the status page show and the metrics label; a text that is none of them is an error
//! where it is read, never taken as some default.

use strum::{Display, EnumString, IntoStaticStr, VariantArray};

/// Implements `as_str` from the variant names strum derives (snake_case).
macro_rules! named {
    ($($ty:ty),*) => {$(
        impl $ty {
            pub fn as_str(self) -> &'static str {
                self.into()
            }
        }
    )*};
}

/// An environment's status (the merged lane's; a preview never changes it).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Display, EnumString, IntoStaticStr, VariantArray,
)]
#[strum(serialize_all = "snake_case")]
#[cfg_attr(feature = "runtime", derive(serde::Serialize))]
#[cfg_attr(feature = "runtime", serde(rename_all = "snake_case"))]
pub enum EnvStatus {
    /// The last applied commit is deployed, and nothing newer changes it.
    InSync,
    /// A merged commit is being planned (or queued to be, when the environment is new).
    #[default]
    Planning,
    /// A merged commit's plan is being applied.
    Applying,
    /// `apply.auto: false`: a plan with changes waits for an approval.
    AwaitingApproval,
    /// A drift check found the infrastructure differs from the last applied commit.
    Drifted,
    /// The newest merged commit was refused (history rewritten, a destroy not allowed).
    Refused,
    /// The newest merged commit failed and is not tried again until a new commit.
    Failed,
    /// A configuration error, or a passing failure that is being tried again.
    Error,
}

/// What a run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Display, EnumString, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
#[cfg_attr(feature = "runtime", derive(serde::Serialize))]
#[cfg_attr(feature = "runtime", serde(rename_all = "snake_case"))]
pub enum RunKind {
    /// A merged commit's plan.
    Plan,
    Apply,
    /// A plan of the last applied commit, to find drift.
    Drift,
    /// A plan of a commit on another branch, never applied.
    Preview,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Display, EnumString, IntoStaticStr, VariantArray)]
#[strum(serialize_all = "snake_case")]
#[cfg_attr(feature = "runtime", derive(serde::Serialize))]
#[cfg_attr(feature = "runtime", serde(rename_all = "snake_case"))]
pub enum RunResult {
    NoChanges,
    Changes,
    Applied,
    Failed,
    /// Decided without terraform: not on the branch, a configuration error, a destroy.
    Refused,
    /// A newer commit of the same branch took its place before it ran.
    Superseded,
    /// Cut off: the daemon stopped or was killed while it ran.
    Interrupted,
}

/// An environment's drift status, as the API shows it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Display, EnumString, IntoStaticStr, VariantArray,
)]
#[strum(serialize_all = "snake_case")]
#[cfg_attr(feature = "runtime", derive(serde::Serialize))]
#[cfg_attr(feature = "runtime", serde(rename_all = "snake_case"))]
pub enum DriftStatus {
    /// `drift.interval` is not set: no drift checks. (The API's, from the configuration;
    /// never stored.)
    Off,
    /// Drift checks are on, but none has finished yet.
    #[default]
    Unchecked,
    /// The last check found the real infrastructure as the last applied commit describes it.
    InSync,
    /// The last check found resources that differ.
    Drifted,
    /// The last check failed: nothing is known about drift.
    Error,
}

named!(EnvStatus, RunKind, RunResult, DriftStatus);

impl EnvStatus {
    /// A status that a commit bringing the environment back to its last applied inputs no
    /// longer stands for: what is deployed is what was last applied. (A failure or drift
    /// does stand: what is deployed is not known to be that.)
    pub fn cleared_by_return(self) -> bool {
        matches!(
            self,
            EnvStatus::Error | EnvStatus::Refused | EnvStatus::AwaitingApproval
        )
    }
}

impl RunKind {
    /// The lane a run of this kind runs in.
    pub fn lane(self) -> super::Lane {
        match self {
            RunKind::Preview => super::Lane::Preview,
            RunKind::Plan | RunKind::Apply | RunKind::Drift => super::Lane::Merged,
        }
    }
}

impl RunResult {
    /// Whether the run's message is why it did not succeed (shown as such on its page).
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            RunResult::Refused | RunResult::Failed | RunResult::Interrupted
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    /// Each name reads back as the state it names, and the names are the contract's.
    fn round_trip<T>(expected: &[&str])
    where
        T: VariantArray + Copy + PartialEq + std::fmt::Debug + FromStr + Into<&'static str>,
    {
        let names: Vec<&str> = T::VARIANTS.iter().map(|v| (*v).into()).collect();
        assert_eq!(names, expected);
        for variant in T::VARIANTS {
            let name: &'static str = (*variant).into();
            assert_eq!(T::from_str(name).ok(), Some(*variant));
        }
    }

    #[test]
    fn the_names_are_the_contracts_and_read_back() {
        round_trip::<EnvStatus>(&[
            "in_sync",
            "planning",
            "applying",
            "awaiting_approval",
            "drifted",
            "refused",
            "failed",
            "error",
        ]);
        round_trip::<RunKind>(&["plan", "apply", "drift", "preview"]);
        round_trip::<RunResult>(&[
            "no_changes",
            "changes",
            "applied",
            "failed",
            "refused",
            "superseded",
            "interrupted",
        ]);
        round_trip::<DriftStatus>(&["off", "unchecked", "in_sync", "drifted", "error"]);
    }

    #[test]
    fn an_unknown_name_is_an_error() {
        assert!(EnvStatus::from_str("In_Sync").is_err());
        assert!(RunResult::from_str("").is_err());
        assert!(DriftStatus::from_str("gone").is_err());
    }
}
