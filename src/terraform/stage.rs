//! Staging a commit for an environment: what of the commit terraform will see.
//!
//! The commit's configuration tree — less the other environments' folders — is exported to
//! `inspect/` and checked for this one environment; then only its input closure — its folder, the modules it reaches, `policies/` —
//! is exported again into `staging/`. A `file()` that reaches another environment's folder or
//! an unreached module finds nothing, so terraform reads only fingerprinted input.
//!
//! Blocking (libgit2 and file walks): async callers run it with `spawn_blocking`.

use std::fs;
use std::io;
use std::path::Path;

use crate::git::{self, CommitId, GitError};
use crate::problem::Problem;
use crate::repo::{CheckOptions, CheckedEnvironment, check_environment};

use super::Workdir;

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Git(#[from] GitError),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    /// The commit does not pass the checks for this environment; each problem is located.
    #[error("the commit does not pass karrots check for this environment")]
    Refused(Vec<Problem>),
}

/// Exports `commit`'s input closure for the workdir's environment into its staging directory
/// and returns the checked environment as the commit describes it.
pub fn stage_commit(
    workdir: &Workdir,
    repo_dir: &Path,
    commit: &CommitId,
    options: &CheckOptions,
) -> Result<CheckedEnvironment, StageError> {
    let io = |context: &str| {
        let context = format!("{context} in {}", workdir.base().display());
        move |source| StageError::Io { context, source }
    };
    workdir
        .begin_staging()
        .map_err(io("preparing the workdir"))?;
    let repo = git::open(repo_dir)?;
    let inspect = workdir.inspect();
    // What the check needs: the root's files, this environment's folder, every module and
    // the policies — not the other environments' folders, however many there are.
    let own_folder = format!("environments/{}", workdir.env());
    let too_large = |error: GitError| match error {
        GitError::FileTooLarge {
            path, size, limit, ..
        } => StageError::Refused(vec![Problem::whole(
            Path::new(&path),
            crate::limits::too_large_to_export(size, limit),
        )]),
        other => StageError::Git(other),
    };
    let own = |path: &str, is_dir: bool| {
        let top = path.split('/').next().unwrap_or_default();
        match top {
            "modules" | "policies" => true,
            "environments" => {
                path == "environments"
                    || path == own_folder
                    || path.starts_with(&format!("{own_folder}/"))
            }
            _ => !is_dir && !path.contains('/'),
        }
    };
    git::export_tree(&repo, commit, &inspect, &own, options.max_file_bytes).map_err(too_large)?;
    let checked =
        check_environment(&inspect, workdir.env(), options).map_err(StageError::Refused)?;
    let inputs = &checked.inputs;
    let closure = |path: &str, is_dir: bool| {
        inputs.iter().any(|input| input.contains(path))
            || (is_dir && inputs.iter().any(|input| input.is_below(path)))
    };
    git::export_tree(
        &repo,
        commit,
        &workdir.staging(),
        &closure,
        options.max_file_bytes,
    )
    .map_err(too_large)?;
    fs::remove_dir_all(&inspect).map_err(io("removing the inspected export"))?;
    Ok(checked)
}
