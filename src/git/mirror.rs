//! The daemon's bare mirror of the config repository, under `state_dir`.
//!
//! The remote's branches are fetched into `refs/remotes/origin/*`, so everything that asks
//! "is this commit on the branch?" ([`super::branch_tip`]) sees the branch as the remote has
//! it. A poll first lists the remote's refs and fetches only when one moved. A failed fetch
//! leaves the refs as they were: the daemon keeps the last good revision.
//!
//! The fetch itself runs the `git` CLI, as cargo's `net.git-fetch-with-cli` does: the pack is
//! received and indexed in a child process, streamed to disk, so a large blob costs the
//! daemon no memory (libgit2's local transport built a 200 MB blob's pack inside the daemon:
//! 660 MiB peak). Everything else reads the mirror through git2.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use git2::{Direction, Repository};

use super::remote::Transport;
use super::{CommitId, GitError};
use crate::config::Scheme;

/// The refspec of the mirror: every branch of the remote, pruned when deleted there.
const REFSPEC: &str = "+refs/heads/*:refs/remotes/origin/*";

/// Karrots' own tags (approvals, `karrots/approve/<env>/<sha>[/<name>]`), kept under the same
/// names; no other tag is fetched.
const TAGS_REFSPEC: &str = "+refs/tags/karrots/*:refs/tags/karrots/*";
const TAGS: &str = "refs/tags/karrots/";

/// Tag name (under `refs/tags/`) → the object it names.
pub type Tags = BTreeMap<String, String>;

/// What the remote (or the mirror) has: its branches and Karrots' tags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub heads: Heads,
    pub tags: Tags,
}

impl Listing {
    /// Adds `name` → `oid` when it is a branch or one of Karrots' tags (not a peeled `^{}`).
    fn add(&mut self, name: &str, oid: &str) {
        if let Some(branch) = name.strip_prefix("refs/heads/") {
            self.heads
                .insert(branch.to_string(), CommitId::from_hex(oid));
        } else if name.starts_with(TAGS) && !name.ends_with("^{}") {
            let tag = name.trim_start_matches("refs/tags/");
            self.tags.insert(tag.to_string(), oid.to_string());
        }
    }
}

/// A bare mirror of one remote.
pub struct Mirror {
    path: PathBuf,
}

/// Branch name → commit.
pub type Heads = BTreeMap<String, CommitId>;

fn remote_error(url: &str, source: git2::Error) -> GitError {
    GitError::Remote {
        url: url.to_string(),
        message: source.message().to_string(),
    }
}

impl Mirror {
    /// Opens the mirror at `path`, creating it (bare, remote `origin` = `url`) when missing.
    pub fn open_or_create(path: &Path, url: &str) -> Result<Mirror, GitError> {
        let repo = match Repository::open_bare(path) {
            Ok(repo) => repo,
            Err(_) => Repository::init_bare(path).map_err(|source| GitError::Open {
                path: path.to_path_buf(),
                source,
            })?,
        };
        match repo.find_remote("origin") {
            Ok(remote) if remote.url().ok() == Some(url) => {}
            Ok(_) => repo
                .remote_set_url("origin", url)
                .map_err(|source| remote_error(url, source))?,
            Err(_) => {
                repo.remote_with_fetch("origin", url, REFSPEC)
                    .map_err(|source| remote_error(url, source))?;
            }
        }
        Ok(Mirror {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn open(&self) -> Result<Repository, GitError> {
        Repository::open_bare(&self.path).map_err(|source| GitError::Open {
            path: self.path.clone(),
            source,
        })
    }

    /// The branches the mirror holds now.
    pub fn heads(&self) -> Result<Heads, GitError> {
        let repo = self.open()?;
        let mut heads = Heads::new();
        let references = repo
            .references_glob("refs/remotes/origin/*")
            .map_err(|source| GitError::Open {
                path: self.path.clone(),
                source,
            })?;
        for reference in references.flatten() {
            // Strip the prefix once: a branch named `refs/remotes/origin/main` is held as
            // `refs/remotes/origin/refs/remotes/origin/main` and must stay that name, never
            // become `main`.
            if let (Some(branch), Some(target)) = (
                reference
                    .name()
                    .ok()
                    .and_then(|name| name.strip_prefix("refs/remotes/origin/")),
                reference.target(),
            ) {
                heads.insert(branch.to_string(), CommitId::from_hex(&target.to_string()));
            }
        }
        Ok(heads)
    }

    /// Karrots' tags the mirror holds.
    pub fn tags(&self) -> Result<Tags, GitError> {
        let repo = self.open()?;
        let mut tags = Tags::new();
        let references = repo
            .references_glob(&format!("{TAGS}*"))
            .map_err(|source| GitError::Open {
                path: self.path.clone(),
                source,
            })?;
        for reference in references.flatten() {
            if let (Ok(name), Some(target)) = (reference.name(), reference.target()) {
                let tag = name.trim_start_matches("refs/tags/");
                tags.insert(tag.to_string(), target.to_string());
            }
        }
        Ok(tags)
    }

    /// Lists the remote's branches and Karrots' tags (no objects are transferred): through
    /// git2 for a `file://` remote (a poll that finds nothing costs no process), else
    /// `git ls-remote`.
    pub fn remote_refs(&self, transport: &Transport) -> Result<Listing, GitError> {
        if transport.address().scheme() == Scheme::File {
            return self.local_refs();
        }
        let mut command = transport.command(&self.path);
        command.args(["ls-remote", "origin", "refs/heads/*", &format!("{TAGS}*")]);
        let listed = transport
            .run(command, "git ls-remote")
            .map_err(|message| self.failed(transport, message))?;
        let mut listing = Listing::default();
        for line in listed.lines() {
            if let Some((oid, name)) = line.split_once('\t') {
                listing.add(name, oid);
            }
        }
        Ok(listing)
    }

    fn local_refs(&self) -> Result<Listing, GitError> {
        let repo = self.open()?;
        let mut remote = repo
            .find_remote("origin")
            .map_err(|source| remote_error("origin", source))?;
        let url = remote.url().unwrap_or_default().to_string();
        remote
            .connect(Direction::Fetch)
            .map_err(|source| remote_error(&url, source))?;
        let mut listing = Listing::default();
        for head in remote.list().map_err(|source| remote_error(&url, source))? {
            listing.add(head.name(), &head.oid().to_string());
        }
        Ok(listing)
    }

    fn failed(&self, transport: &Transport, message: String) -> GitError {
        GitError::Remote {
            url: transport.address().to_string(),
            message,
        }
    }

    /// Brings the mirror up to date when the remote's branches or Karrots' tags moved.
    /// Returns what the mirror now holds and whether a fetch happened.
    pub fn update(&self, transport: &Transport) -> Result<(Listing, bool), GitError> {
        let listed = self.remote_refs(transport)?;
        let held = Listing {
            heads: self.heads()?,
            tags: self.tags()?,
        };
        if listed == held {
            return Ok((listed, false));
        }
        let remote_heads = &listed.heads;
        // Pruning every branch would leave nothing to compare the next push with; an emptied
        // remote is far more often an accident (a wrong URL, a botched migration) than intent.
        if remote_heads.is_empty() {
            return Err(GitError::Remote {
                url: self.origin_url()?,
                message: "the remote lists no branches (emptied, or a new repository at this address?); the mirror keeps its branches, and nothing runs from the remote until it has branches again".to_string(),
            });
        }
        self.fetch(transport)?;
        self.prune(&listed)?;
        let now = Listing {
            heads: self.heads()?,
            tags: self.tags()?,
        };
        Ok((now, true))
    }

    /// Deletes the branches `listed` (what the remote listed before the fetch) no longer
    /// has. Not `git fetch --prune`: a remote emptied between the listing and the fetch would
    /// take every branch of the mirror with it, and the next poll would find nothing to say
    /// was lost.
    fn prune(&self, listed: &Listing) -> Result<(), GitError> {
        let repo = self.open()?;
        let branches = self.heads()?;
        let gone_branches = branches
            .keys()
            .filter(|branch| !listed.heads.contains_key(*branch))
            .map(|branch| format!("refs/remotes/origin/{branch}"));
        let tags = self.tags()?;
        let gone_tags = tags
            .keys()
            .filter(|tag| !listed.tags.contains_key(*tag))
            .map(|tag| format!("refs/tags/{tag}"));
        for name in gone_branches.chain(gone_tags) {
            if let Ok(mut reference) = repo.find_reference(&name) {
                reference
                    .delete()
                    .map_err(|source| remote_error(&name, source))?;
            }
        }
        Ok(())
    }

    fn origin_url(&self) -> Result<String, GitError> {
        let repo = self.open()?;
        let remote = repo
            .find_remote("origin")
            .map_err(|source| remote_error("origin", source))?;
        Ok(remote.url().unwrap_or_default().to_string())
    }

    /// `git fetch origin` into the mirror, with an environment of its own: no user or
    /// system git configuration, no prompt, a bounded time.
    fn fetch(&self, transport: &Transport) -> Result<(), GitError> {
        let mut command = transport.command(&self.path);
        command
            // Objects over 16 MiB are streamed, never inflated whole in memory.
            .args(["-c", "core.bigFileThreshold=16m"])
            .args(["fetch", "--quiet", "--no-tags", "--no-write-fetch-head"])
            .args(["--no-recurse-submodules", "origin", REFSPEC, TAGS_REFSPEC]);
        transport
            .run(command, "git fetch")
            .map(drop)
            .map_err(|message| self.failed(transport, message))
    }
}

/// Whether `commit` is `ancestor` or descends from it.
pub fn descends_from(
    repo: &Repository,
    commit: &CommitId,
    ancestor: &CommitId,
) -> Result<bool, GitError> {
    if commit == ancestor {
        return Ok(true);
    }
    let oid = |id: &CommitId| {
        git2::Oid::from_str(id.as_str()).map_err(|source| super::read_error(id, source))
    };
    repo.graph_descendant_of(oid(commit)?, oid(ancestor)?)
        .map_err(|source| super::read_error(commit, source))
}

/// The environments a commit defines: the folder names under `environments/` with a
/// `karrots.yaml`.
pub fn environment_names(repo: &Repository, commit: &CommitId) -> Result<Vec<String>, GitError> {
    let tree = super::find_commit(repo, commit)?
        .tree()
        .map_err(|source| super::read_error(commit, source))?;
    let Ok(entry) = tree.get_path(Path::new("environments")) else {
        return Ok(Vec::new());
    };
    let folder = entry
        .to_object(repo)
        .and_then(|object| object.peel_to_tree())
        .map_err(|source| super::read_error(commit, source))?;
    let mut names: Vec<String> = folder
        .iter()
        .filter(|entry| entry.kind() == Some(git2::ObjectType::Tree))
        .filter_map(|entry| entry.name().ok().map(str::to_string))
        .collect();
    names.sort();
    Ok(names)
}

/// The id of a commit's `environments/` tree, if it has one: two commits with the same id
/// define the same environments with the same files.
pub fn environments_folder(
    repo: &Repository,
    commit: &CommitId,
) -> Result<Option<git2::Oid>, GitError> {
    let tree = super::find_commit(repo, commit)?
        .tree()
        .map_err(|source| super::read_error(commit, source))?;
    Ok(tree
        .get_name("environments")
        .filter(|entry| entry.kind() == Some(git2::ObjectType::Tree))
        .map(|entry| entry.id()))
}

/// The `karrots.yaml` blob of each environment folder in the `environments/` tree `folder`
/// (of `commit`), by folder name, in name order. One tree read per environment.
pub fn environment_files(
    repo: &Repository,
    commit: &CommitId,
    folder: git2::Oid,
) -> Result<Vec<(String, git2::Oid)>, GitError> {
    let read = |source| super::read_error(commit, source);
    let folder = repo.find_tree(folder).map_err(read)?;
    let mut files = Vec::new();
    for entry in folder.iter() {
        let Ok(name) = entry.name() else {
            continue;
        };
        if entry.kind() != Some(git2::ObjectType::Tree) {
            continue;
        }
        let environment = repo.find_tree(entry.id()).map_err(read)?;
        if let Some(file) = environment
            .get_name("karrots.yaml")
            .filter(|file| file.kind() == Some(git2::ObjectType::Blob))
        {
            files.push((name.to_string(), file.id()));
        }
    }
    files.sort();
    Ok(files)
}

/// The paths changed from `from` to `to` when `to` is `from` or descends from it; `None` when
/// it does not (the history was rewritten).
pub fn changes_since(
    repo: &Repository,
    from: &CommitId,
    to: &CommitId,
) -> Result<Option<Vec<String>>, GitError> {
    if !descends_from(repo, to, from)? {
        return Ok(None);
    }
    changed_paths(repo, from, to).map(Some)
}

/// The paths (`/`-separated, old and new sides) that differ between two commits.
pub fn changed_paths(
    repo: &Repository,
    from: &CommitId,
    to: &CommitId,
) -> Result<Vec<String>, GitError> {
    let tree = |id: &CommitId| {
        super::find_commit(repo, id)?
            .tree()
            .map_err(|source| super::read_error(id, source))
    };
    let (old, new) = (tree(from)?, tree(to)?);
    let diff = repo
        .diff_tree_to_tree(Some(&old), Some(&new), None)
        .map_err(|source| super::read_error(to, source))?;
    let mut paths = Vec::new();
    for delta in diff.deltas() {
        for file in [delta.old_file(), delta.new_file()] {
            if let Some(path) = file.path().and_then(Path::to_str) {
                paths.push(path.to_string());
            }
        }
    }
    paths.sort();
    paths.dedup();
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::git::testing::{commit_all, git, write};

    #[test]
    fn karrots_tags_are_fetched_and_pruned_and_no_other_tag() {
        let work = tempfile::tempdir().unwrap();
        git(work.path(), &["init", "-q", "-b", "main"]);
        write(work.path(), "README", "config\n");
        let commit = commit_all(work.path(), "one");
        let remote = tempfile::tempdir().unwrap();
        let url = remote.path().to_str().unwrap();
        git(remote.path(), &["init", "-q", "--bare", "-b", "main"]);
        git(work.path(), &["push", "-q", url, "main"]);
        let state = tempfile::tempdir().unwrap();
        let mirror = Mirror::open_or_create(&state.path().join("mirror.git"), url).unwrap();
        let address = crate::config::RepoAddress::parse(url, Path::new("/")).unwrap();
        let transport = Transport::plain(&address);
        assert!(mirror.update(&transport).unwrap().1, "the first fetch");
        assert!(!mirror.update(&transport).unwrap().1, "nothing moved");

        // An approval and a release tag are pushed; the branch does not move.
        let approval = format!("karrots/approve/prod/{commit}");
        git(
            work.path(),
            &["tag", "-a", "-m", "plan: sha256:0123", &approval],
        );
        git(work.path(), &["tag", "-a", "-m", "release", "v1.0"]);
        git(work.path(), &["push", "-q", url, "--tags"]);
        assert!(
            mirror.update(&transport).unwrap().1,
            "a new tag alone is fetched"
        );
        let tags = mirror.tags().unwrap();
        let names: Vec<&str> = tags.keys().map(String::as_str).collect();
        assert_eq!(names, [approval.as_str()], "Karrots' tags only");
        let object = git(work.path(), &["rev-parse", &approval]);
        assert_eq!(tags[&approval], object, "the tag object, not the commit");
        assert!(!mirror.update(&transport).unwrap().1, "nothing moved");

        git(
            work.path(),
            &["push", "-q", url, &format!(":refs/tags/{approval}")],
        );
        assert!(mirror.update(&transport).unwrap().1);
        assert!(
            mirror.tags().unwrap().is_empty(),
            "a tag deleted there is pruned"
        );
    }

    #[test]
    fn a_remote_emptied_during_a_fetch_leaves_the_mirror_its_branches() {
        let work = tempfile::tempdir().unwrap();
        git(work.path(), &["init", "-q", "-b", "main"]);
        write(
            work.path(),
            "environments/prod/karrots.yaml",
            "name: prod\n",
        );
        let first = commit_all(work.path(), "prod");
        let remote = tempfile::tempdir().unwrap();
        let url = remote.path().to_str().unwrap();
        git(remote.path(), &["init", "-q", "--bare", "-b", "main"]);
        git(
            work.path(),
            &["push", "-q", url, "main", "main:dev", "main:gone"],
        );
        let state = tempfile::tempdir().unwrap();
        let mirror = Mirror::open_or_create(&state.path().join("mirror.git"), url).unwrap();
        let address = crate::config::RepoAddress::parse(url, Path::new("/")).unwrap();
        let transport = Transport::plain(&address);
        mirror.update(&transport).unwrap();
        assert_eq!(mirror.heads().unwrap().len(), 3);

        // The listing sees main and dev; then both go before the fetch runs.
        let delete = |branch: &str| {
            git(
                remote.path(),
                &["update-ref", "-d", &format!("refs/heads/{branch}")],
            )
        };
        delete("gone");
        let listed = mirror.remote_refs(&transport).unwrap();
        delete("main");
        delete("dev");
        mirror.fetch(&transport).unwrap();
        mirror.prune(&listed).unwrap();
        let kept: Vec<String> = mirror.heads().unwrap().into_keys().collect();
        assert_eq!(kept, ["dev", "main"], "only what the listing said was gone");
        let Err(error) = mirror.update(&transport) else {
            panic!("an emptied remote must be an error");
        };
        assert!(error.to_string().contains("lists no branches"), "{error}");
        assert_eq!(mirror.heads().unwrap()["main"], first);
    }

    #[test]
    fn environments_are_read_from_their_folder_tree_and_a_module_commit_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        git(dir.path(), &["init", "-q", "-b", "main"]);
        write(dir.path(), "environments/prod/karrots.yaml", "name: prod\n");
        write(dir.path(), "environments/dev/karrots.yaml", "name: dev\n");
        write(
            dir.path(),
            "environments/notes/README.md",
            "no karrots.yaml here\n",
        );
        write(dir.path(), "modules/app/main.tf", "# v1\n");
        let first = commit_all(dir.path(), "two environments");
        write(dir.path(), "modules/app/main.tf", "# v2\n");
        let module_change = commit_all(dir.path(), "a module");
        write(
            dir.path(),
            "environments/dev/karrots.yaml",
            "name: dev # edited\n",
        );
        let dev_change = commit_all(dir.path(), "dev's file");

        let repo = crate::git::open(dir.path()).unwrap();
        let folder = |commit| environments_folder(&repo, commit).unwrap();
        assert_eq!(folder(&first), folder(&module_change));
        assert_ne!(folder(&module_change), folder(&dev_change));

        let files = environment_files(&repo, &first, folder(&first).unwrap()).unwrap();
        let names: Vec<&str> = files.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names,
            ["dev", "prod"],
            "a folder without karrots.yaml is none"
        );
        let edited = environment_files(&repo, &dev_change, folder(&dev_change).unwrap()).unwrap();
        assert_ne!(files[0].1, edited[0].1, "dev's blob changed");
        assert_eq!(files[1], edited[1], "prod's did not");
    }
}
