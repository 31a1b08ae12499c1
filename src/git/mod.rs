//! The config repository's git side: resolve a revision, tell whether a commit is on a
//! branch's first-parent chain, read a file at a commit, and export a commit's configuration
//! tree into a workdir.
//!
//! Everything here is blocking libgit2 work; async callers run it on a blocking thread.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use git2::{ObjectType, Oid, Repository, TreeWalkMode, TreeWalkResult};

use crate::repo::CONFIG_FOLDERS;

/// A commit, by its full hex id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CommitId(String);

impl CommitId {
    /// Wraps a full hex commit id as git prints it.
    pub fn from_hex(hex: &str) -> CommitId {
        CommitId(hex.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 7-character abbreviation used in STS session names and messages.
    pub fn short(&self) -> &str {
        &self.0[..7.min(self.0.len())]
    }
}

impl std::fmt::Display for CommitId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("{path}: not a git repository: {source}")]
    Open { path: PathBuf, source: git2::Error },
    #[error("revision {rev:?} not found: {source}")]
    Resolve { rev: String, source: git2::Error },
    #[error("reading commit {commit}: {source}")]
    Read { commit: String, source: git2::Error },
    #[error("exporting commit {commit} to {path}: {source}")]
    Export {
        commit: String,
        path: PathBuf,
        source: io::Error,
    },
}

pub fn open(path: &Path) -> Result<Repository, GitError> {
    Repository::open(path).map_err(|source| GitError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// Resolves a revision (`HEAD`, a branch, a tag, a sha) to the commit it names.
pub fn resolve(repo: &Repository, rev: &str) -> Result<CommitId, GitError> {
    let object = repo
        .revparse_single(rev)
        .and_then(|object| object.peel_to_commit())
        .map_err(|source| GitError::Resolve {
            rev: rev.to_string(),
            source,
        })?;
    Ok(CommitId(object.id().to_string()))
}

/// The tip of a branch: the local branch, else `origin/<branch>`. `None` when neither exists.
pub fn branch_tip(repo: &Repository, branch: &str) -> Option<CommitId> {
    [
        format!("refs/heads/{branch}"),
        format!("refs/remotes/origin/{branch}"),
    ]
    .iter()
    .find_map(|name| repo.refname_to_id(name).ok())
    .map(|oid| CommitId(oid.to_string()))
}

/// The commit object of `commit`.
fn find_commit<'r>(repo: &'r Repository, commit: &CommitId) -> Result<git2::Commit<'r>, GitError> {
    Oid::from_str(commit.as_str())
        .and_then(|oid| repo.find_commit(oid))
        .map_err(|source| read_error(commit, source))
}

fn read_error(commit: &CommitId, source: git2::Error) -> GitError {
    GitError::Read {
        commit: commit.to_string(),
        source,
    }
}

/// Whether `commit` is on the first-parent chain that ends at `tip`: the commits a branch
/// received by merges and pushes to it, not the commits of the branches merged into it.
pub fn on_first_parent_chain(
    repo: &Repository,
    tip: &CommitId,
    commit: &CommitId,
) -> Result<bool, GitError> {
    let wanted = Oid::from_str(commit.as_str()).map_err(|source| read_error(commit, source))?;
    let mut current = find_commit(repo, tip)?;
    loop {
        if current.id() == wanted {
            return Ok(true);
        }
        match current.parent(0) {
            Ok(parent) => current = parent,
            Err(_) => return Ok(false),
        }
    }
}

/// The text of the file at `path` in `commit`, or `None` when the commit has no such file.
pub fn read_file(
    repo: &Repository,
    commit: &CommitId,
    path: &str,
) -> Result<Option<String>, GitError> {
    let read = |source| read_error(commit, source);
    let tree = find_commit(repo, commit)?.tree().map_err(read)?;
    let Ok(entry) = tree.get_path(Path::new(path)) else {
        return Ok(None);
    };
    let blob = entry
        .to_object(repo)
        .and_then(|object| object.peel_to_blob())
        .map_err(read)?;
    Ok(Some(String::from_utf8_lossy(blob.content()).into_owned()))
}

/// Writes the configuration part of `commit` — the repository root's files and everything
/// under `environments/`, `modules/`, `policies/` — into `destination`, which must not exist.
/// Symlinks are recreated as symlinks (the repository check decides whether they may stay);
/// submodules are left out.
pub fn export_config_tree(
    repo: &Repository,
    commit: &CommitId,
    destination: &Path,
) -> Result<(), GitError> {
    let read = |source| read_error(commit, source);
    let export_error = |source| GitError::Export {
        commit: commit.to_string(),
        path: destination.to_path_buf(),
        source,
    };
    let tree = find_commit(repo, commit)?.tree().map_err(read)?;
    fs::create_dir(destination).map_err(export_error)?;
    let mut failure: Option<GitError> = None;
    tree.walk(TreeWalkMode::PreOrder, |parent, entry| {
        let Ok(name) = entry.name() else {
            return TreeWalkResult::Skip;
        };
        let relative = format!("{parent}{name}");
        let top = relative.split('/').next().unwrap_or_default();
        let at_root = parent.is_empty();
        let root_file = at_root && entry.kind() == Some(ObjectType::Blob);
        if !(CONFIG_FOLDERS.contains(&top) || root_file) {
            return TreeWalkResult::Skip;
        }
        let target = destination.join(&relative);
        let written = match entry.kind() {
            Some(ObjectType::Tree) => fs::create_dir(&target),
            Some(ObjectType::Blob) => entry
                .to_object(repo)
                .and_then(|object| object.peel_to_blob())
                .map_err(io::Error::other)
                .and_then(|blob| write_blob(&target, entry.filemode(), blob.content())),
            _ => Ok(()),
        };
        match written {
            Ok(()) => TreeWalkResult::Ok,
            Err(source) => {
                failure = Some(GitError::Export {
                    commit: commit.to_string(),
                    path: target,
                    source,
                });
                TreeWalkResult::Abort
            }
        }
    })
    .map_err(|source| failure.take().unwrap_or_else(|| read(source)))?;
    match failure {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

fn write_blob(target: &Path, mode: i32, content: &[u8]) -> io::Result<()> {
    const SYMLINK: i32 = 0o120000;
    const EXECUTABLE: i32 = 0o100755;
    if mode == SYMLINK {
        let link = String::from_utf8_lossy(content).into_owned();
        return std::os::unix::fs::symlink(link, target);
    }
    fs::write(target, content)?;
    if mode == EXECUTABLE {
        fs::set_permissions(target, fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}
