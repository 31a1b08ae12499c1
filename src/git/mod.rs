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

pub mod mirror;
pub mod remote;
#[cfg(feature = "runtime")]
pub mod signed;
#[cfg(test)]
pub(crate) mod testing;

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
    #[error("{path}: cannot open the git repository: {source}")]
    Open { path: PathBuf, source: git2::Error },
    #[error("revision {rev:?} not found: {source}")]
    Resolve { rev: String, source: git2::Error },
    #[error("reading commit {commit}: {source}")]
    Read { commit: String, source: git2::Error },
    #[error("reading the tags {name}: {source}")]
    Tags { name: String, source: git2::Error },
    #[error("the config repository {url} cannot be fetched: {message}")]
    Remote { url: String, message: String },
    #[error(
        "commit {commit} has a tree entry named {name:?} under {parent:?}, which no checkout may hold; refusing to export it"
    )]
    BadEntryName {
        commit: String,
        parent: String,
        name: String,
    },
    #[error("{path} in commit {commit}: {}", crate::limits::too_large_to_export(*size, *limit))]
    FileTooLarge {
        commit: String,
        /// The file's `/` path in the repository.
        path: String,
        size: u64,
        limit: u64,
    },
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

/// The tip of a branch as the remote has it. In a repository with a remote, only the
/// remote-tracking branch counts (`refs/remotes/origin/<branch>`, or the only remote's): a
/// local branch may hold commits nobody reviewed or pushed. Without a remote, the local
/// branch. `None` when it does not exist.
pub fn branch_tip(repo: &Repository, branch: &str) -> Option<CommitId> {
    let remotes = repo.remotes().ok()?;
    let names: Vec<&str> = remotes.iter().flatten().flatten().collect();
    let reference = if names.is_empty() {
        format!("refs/heads/{branch}")
    } else {
        let remote = names
            .iter()
            .find(|name| **name == "origin")
            .or(names.first())?;
        format!("refs/remotes/{remote}/{branch}")
    };
    repo.refname_to_id(&reference)
        .ok()
        .map(|oid| CommitId(oid.to_string()))
}

/// The commit object of `commit`.
pub(crate) fn find_commit<'r>(
    repo: &'r Repository,
    commit: &CommitId,
) -> Result<git2::Commit<'r>, GitError> {
    Oid::from_str(commit.as_str())
        .and_then(|oid| repo.find_commit(oid))
        .map_err(|source| read_error(commit, source))
}

pub(crate) fn read_error(commit: &CommitId, source: git2::Error) -> GitError {
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
pub fn export_config_tree(
    repo: &Repository,
    commit: &CommitId,
    destination: &Path,
) -> Result<(), GitError> {
    let include = |relative: &str, is_dir: bool| {
        let top = relative.split('/').next().unwrap_or_default();
        CONFIG_FOLDERS.contains(&top) || (!is_dir && !relative.contains('/'))
    };
    export_tree(repo, commit, destination, &include, u64::MAX)
}

/// Writes the entries of `commit` that `include` accepts (given the `/` path and whether the
/// entry is a directory) into `destination`, which must not exist. A directory that is not
/// included is not entered. Symlinks are recreated as symlinks (the repository check decides
/// whether they may stay); submodules are left out. Every entry name is checked before
/// anything is written: `.`, `..`, `.git`, and names with `/` or NUL are refused. A blob over
/// `max_file_bytes` is refused by the size in its header, before it is inflated.
pub fn export_tree(
    repo: &Repository,
    commit: &CommitId,
    destination: &Path,
    include: &dyn Fn(&str, bool) -> bool,
    max_file_bytes: u64,
) -> Result<(), GitError> {
    fs::create_dir(destination).map_err(|source| GitError::Export {
        commit: commit.to_string(),
        path: destination.to_path_buf(),
        source,
    })?;
    export_more(repo, commit, destination, include, max_file_bytes)
}

/// [`export_tree`] into a `destination` that an earlier export of the same commit wrote:
/// what is already there is kept (the same commit has the same content at the same path),
/// the rest of what `include` accepts is added.
pub fn export_more(
    repo: &Repository,
    commit: &CommitId,
    destination: &Path,
    include: &dyn Fn(&str, bool) -> bool,
    max_file_bytes: u64,
) -> Result<(), GitError> {
    let read = |source| read_error(commit, source);
    let tree = find_commit(repo, commit)?.tree().map_err(read)?;
    let odb = repo.odb().map_err(read)?;
    let mut failure: Option<GitError> = None;
    tree.walk(TreeWalkMode::PreOrder, |parent, entry| {
        let name = match entry.name() {
            Ok(name) if valid_entry_name(name) => name,
            other => {
                failure = Some(GitError::BadEntryName {
                    commit: commit.to_string(),
                    parent: parent.to_string(),
                    name: other.map(str::to_string).unwrap_or_else(|_| {
                        String::from_utf8_lossy(entry.name_bytes()).into_owned()
                    }),
                });
                return TreeWalkResult::Abort;
            }
        };
        let relative = format!("{parent}{name}");
        let is_dir = entry.kind() == Some(ObjectType::Tree);
        if !include(&relative, is_dir) {
            return TreeWalkResult::Skip;
        }
        if entry.kind() == Some(ObjectType::Blob) {
            match odb.read_header(entry.id()) {
                Ok((size, _)) if size as u64 > max_file_bytes => {
                    failure = Some(GitError::FileTooLarge {
                        commit: commit.to_string(),
                        path: relative,
                        size: size as u64,
                        limit: max_file_bytes,
                    });
                    return TreeWalkResult::Abort;
                }
                Ok(_) => {}
                Err(source) => {
                    failure = Some(read(source));
                    return TreeWalkResult::Abort;
                }
            }
        }
        let target = destination.join(&relative);
        // Written by an earlier export of this commit: the same entry.
        let exported = target.symlink_metadata().is_ok();
        let written = match entry.kind() {
            _ if exported => Ok(()),
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

/// Whether a tree entry name may become a file name in a checkout. git itself refuses these
/// names, but a crafted tree object can carry them.
fn valid_entry_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.eq_ignore_ascii_case(".git")
        && !name.contains('/')
        && !name.contains('\0')
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

#[cfg(test)]
mod tests {
    use super::*;

    fn repository() -> (tempfile::TempDir, Repository) {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(dir.path()).unwrap();
        (dir, repo)
    }

    fn commit_tree(repo: &Repository, tree: Oid) -> CommitId {
        let signature = git2::Signature::now("test", "test@karrots.invalid").unwrap();
        let tree = repo.find_tree(tree).unwrap();
        let oid = repo
            .commit(Some("HEAD"), &signature, &signature, "crafted", &tree, &[])
            .unwrap();
        CommitId(oid.to_string())
    }

    /// A raw tree object with one blob entry of any name, as a hostile remote could send.
    fn crafted_tree(repo: &Repository, name: &[u8]) -> Oid {
        let blob = repo
            .blob(b"resource \"terraform_data\" \"x\" {}\n")
            .unwrap();
        let mut bytes = b"100644 ".to_vec();
        bytes.extend_from_slice(name);
        bytes.push(0);
        bytes.extend_from_slice(blob.as_bytes());
        let modules = repo.odb().unwrap().write(ObjectType::Tree, &bytes).unwrap();
        let mut outer = b"40000 modules\0".to_vec();
        outer.extend_from_slice(modules.as_bytes());
        repo.odb().unwrap().write(ObjectType::Tree, &outer).unwrap()
    }

    #[test]
    fn hostile_entry_names_are_refused_before_anything_is_written() {
        for name in [&b".."[..], b".git", b".GIT", b"."] {
            let (dir, repo) = repository();
            let commit = commit_tree(&repo, crafted_tree(&repo, name));
            let destination = dir.path().join("export");
            let error = export_config_tree(&repo, &commit, &destination).unwrap_err();
            assert!(
                matches!(error, GitError::BadEntryName { .. }),
                "{}: {error}",
                String::from_utf8_lossy(name)
            );
            let written: Vec<_> = walkdir::WalkDir::new(&destination)
                .into_iter()
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_file())
                .collect();
            assert!(written.is_empty(), "{written:?}");
        }
        let (dir, repo) = repository();
        let commit = commit_tree(&repo, crafted_tree(&repo, b"main.tf"));
        export_config_tree(&repo, &commit, &dir.path().join("export")).unwrap();
        assert!(dir.path().join("export/modules/main.tf").is_file());
    }

    #[test]
    fn with_a_remote_only_the_remote_tracking_branch_counts() {
        let (dir, repo) = repository();
        let tree = crafted_tree(&repo, b"main.tf");
        let pushed = commit_tree(&repo, tree);
        repo.reference(
            "refs/heads/main",
            Oid::from_str(pushed.as_str()).unwrap(),
            true,
            "",
        )
        .unwrap();
        assert_eq!(branch_tip(&repo, "main"), Some(pushed.clone()));
        repo.remote("origin", &format!("file://{}", dir.path().display()))
            .unwrap();
        assert_eq!(branch_tip(&repo, "main"), None, "not fetched yet");
        repo.reference(
            "refs/remotes/origin/main",
            Oid::from_str(pushed.as_str()).unwrap(),
            true,
            "",
        )
        .unwrap();
        assert_eq!(branch_tip(&repo, "main"), Some(pushed));
    }
}
