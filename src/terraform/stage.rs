//! Staging a commit for an environment: what of the commit terraform will see.
//!
//! What the check of this one environment reads is exported to `inspect/`: the repository
//! root's files, its folder, `policies/`, and the module folders it reaches, found by
//! following module calls from its root module (and the module folders its symlinks point
//! into, so the check can say where a link leads) — not the other environments' folders nor
//! the modules they alone use, however many there are. Then only its input closure — its
//! folder, the modules it reaches, `policies/` — is exported again into `staging/`. A
//! `file()` that reaches another environment's folder or an unreached module finds nothing,
//! so terraform reads only fingerprinted input.
//!
//! Blocking (libgit2 and file walks): async callers run it with `spawn_blocking`.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::Path;

use crate::config::{EnvName, RepoPath, parse_environment};
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
    // Its own folder, the policies and the root's files first; the modules it reaches next.
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
            "policies" => true,
            "modules" => path == "modules",
            "environments" => {
                path == "environments"
                    || path == own_folder
                    || path.starts_with(&format!("{own_folder}/"))
            }
            _ => !is_dir && !path.contains('/'),
        }
    };
    git::export_tree(&repo, commit, &inspect, &own, options.max_file_bytes).map_err(too_large)?;
    let reached = Reached {
        repo: &repo,
        commit,
        inspect: &inspect,
        max_file_bytes: options.max_file_bytes,
    };
    reached.export(workdir.env()).map_err(too_large)?;
    let checked =
        check_environment(&inspect, workdir.env(), options).map_err(StageError::Refused)?;
    let inputs = &checked.inputs;
    let closure =
        |path: &str, is_dir: bool| inputs.iter().any(|input| input.exported_with(path, is_dir));
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

/// The module folders an environment reaches, exported into the `inspect/` tree one at a
/// time as they are found.
struct Reached<'a> {
    repo: &'a git2::Repository,
    commit: &'a CommitId,
    inspect: &'a Path,
    max_file_bytes: u64,
}

impl Reached<'_> {
    /// Exports every module folder reached from the environment's root module through local
    /// module calls, and every module folder a symlink of what was exported points into. A
    /// `karrots.yaml` that does not load reaches nothing: the check says why.
    fn export(&self, env: &EnvName) -> Result<(), GitError> {
        let yaml = format!("environments/{env}/karrots.yaml");
        let root_module = crate::limits::read_text(&self.inspect.join(&yaml))
            .ok()
            .and_then(|text| parse_environment(&text, yaml.as_ref(), env.as_str()).ok())
            .map(|spec| spec.terraform.root);
        // Folders to read, each with whether its module calls are followed (the modules it
        // reaches) or only its symlinks (the folders around it the check must see).
        let mut queue: Vec<(RepoPath, bool)> =
            root_module.into_iter().map(|root| (root, true)).collect();
        queue.extend(
            ["policies", &format!("environments/{env}")]
                .iter()
                .filter_map(|folder| RepoPath::parse(folder).ok())
                .map(|folder| (folder, false)),
        );
        let mut seen = BTreeSet::new();
        while let Some((folder, follow_calls)) = queue.pop() {
            if !seen.insert((folder.clone(), follow_calls)) {
                continue;
            }
            self.export_module_folder(&folder)?;
            if !folder.to_path(self.inspect).is_dir() {
                continue;
            }
            if follow_calls {
                let calls = crate::repo::local_module_calls(self.inspect, &folder);
                queue.extend(calls.into_iter().map(|call| (call, true)));
            }
            let links = self.linked_module_folders(&folder);
            queue.extend(links.into_iter().map(|link| (link, false)));
        }
        Ok(())
    }

    /// Exports `folder` when it is under `modules/` and not exported yet; the other folders
    /// the check may read were exported whole, and the rest it must not find.
    fn export_module_folder(&self, folder: &RepoPath) -> Result<(), GitError> {
        if !folder.as_str().starts_with("modules/")
            || folder.to_path(self.inspect).symlink_metadata().is_ok()
        {
            return Ok(());
        }
        let include = |path: &str, is_dir: bool| folder.exported_with(path, is_dir);
        git::export_more(
            self.repo,
            self.commit,
            self.inspect,
            &include,
            self.max_file_bytes,
        )
    }

    /// The module folders (`modules/<name>`) that the relative symlinks under `folder` point
    /// into.
    fn linked_module_folders(&self, folder: &RepoPath) -> Vec<RepoPath> {
        let mut found = Vec::new();
        let walk = walkdir::WalkDir::new(folder.to_path(self.inspect)).follow_links(false);
        for entry in walk.into_iter().filter_map(Result::ok) {
            if !entry.path_is_symlink() {
                continue;
            }
            let (Ok(link), Ok(target)) = (
                entry.path().strip_prefix(self.inspect),
                std::fs::read_link(entry.path()),
            ) else {
                continue;
            };
            let parent = link.parent().unwrap_or(Path::new(""));
            let Some(resolved) = parent
                .join(target)
                .to_str()
                .and_then(|joined| RepoPath::parse(joined).ok())
            else {
                continue;
            };
            let mut parts = resolved.as_str().split('/');
            if let (Some("modules"), Some(name)) = (parts.next(), parts.next())
                && let Ok(module) = RepoPath::parse(&format!("modules/{name}"))
            {
                found.push(module);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Lane;
    use crate::git::testing::{commit_all, git, write};

    /// prod's root module `app` calls `net`; `other` is dev's alone. `link`, when given, is a
    /// symlink `modules/app/linked.tf` to that target.
    fn repository(dir: &Path, link: Option<&str>) -> CommitId {
        git(dir, &["init", "-q", "-b", "main"]);
        for (env, root) in [("prod", "app"), ("dev", "other")] {
            write(
                dir,
                &format!("environments/{env}/karrots.yaml"),
                &format!(
                    "apiVersion: karrots/v1\nname: {env}\nbranch: main\naws:\n  account_id: \"123456789012\"\n  region: us-east-1\nterraform:\n  root: modules/{root}\n"
                ),
            );
        }
        write(
            dir,
            "modules/app/main.tf",
            "module \"net\" {\n  source = \"../net\"\n}\n",
        );
        write(
            dir,
            "modules/net/main.tf",
            "resource \"terraform_data\" \"net\" {}\n",
        );
        write(
            dir,
            "modules/other/main.tf",
            "resource \"terraform_data\" \"other\" {}\n",
        );
        if let Some(target) = link {
            std::os::unix::fs::symlink(target, dir.join("modules/app/linked.tf")).unwrap();
        }
        commit_all(dir, "three modules")
    }

    fn exported_modules(repo_dir: &Path, commit: &CommitId) -> Vec<String> {
        let repo = git::open(repo_dir).unwrap();
        let inspect = tempfile::tempdir().unwrap();
        let inspect = inspect.path().join("inspect");
        let prod_and_modules_folder = |path: &str, is_dir: bool| {
            path == "modules"
                || path.starts_with("environments") && !path.contains("dev")
                || !is_dir && !path.contains('/')
        };
        git::export_tree(&repo, commit, &inspect, &prod_and_modules_folder, u64::MAX).unwrap();
        let reached = Reached {
            repo: &repo,
            commit,
            inspect: &inspect,
            max_file_bytes: u64::MAX,
        };
        reached.export(&EnvName::parse("prod").unwrap()).unwrap();
        let mut names: Vec<String> = fs::read_dir(inspect.join("modules"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_check_reads_only_the_modules_an_environment_reaches() {
        let dir = tempfile::tempdir().unwrap();
        let commit = repository(dir.path(), None);
        assert_eq!(exported_modules(dir.path(), &commit), ["app", "net"]);

        let state = tempfile::tempdir().unwrap();
        let workdir = Workdir::new(state.path(), &EnvName::parse("prod").unwrap(), Lane::Merged);
        let options = CheckOptions::default();
        let checked = stage_commit(&workdir, dir.path(), &commit, &options).unwrap();
        let inputs: Vec<&str> = checked.inputs.iter().map(RepoPath::as_str).collect();
        assert_eq!(
            inputs,
            [
                "environments/prod",
                "modules/app",
                "modules/net",
                "policies"
            ]
        );
    }

    #[test]
    fn a_symlink_into_a_module_not_reached_is_named_for_where_it_leads() {
        let dir = tempfile::tempdir().unwrap();
        let commit = repository(dir.path(), Some("../other/main.tf"));
        assert_eq!(
            exported_modules(dir.path(), &commit),
            ["app", "net", "other"],
            "the linked module is exported, so the check sees where the link leads"
        );
        let state = tempfile::tempdir().unwrap();
        let workdir = Workdir::new(state.path(), &EnvName::parse("prod").unwrap(), Lane::Merged);
        let refused = stage_commit(&workdir, dir.path(), &commit, &CheckOptions::default());
        let Err(StageError::Refused(problems)) = refused else {
            panic!("the link is refused: {refused:?}");
        };
        let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert!(
            lines.iter().any(|line| line.contains(
                "modules/app/linked.tf:1: symlink to ../other/main.tf resolves to modules/other/main.tf, which is not a file of environment prod's inputs"
            )),
            "{lines:?}"
        );
    }
}
