//! What the approval and signature checks read from the mirror: an environment's approval
//! tags as git stores them, who wrote the commits being applied, and the signatures of the
//! commits on a branch's first-parent chain.

use git2::{ObjectType, Oid, Repository, Sort};

use super::{CommitId, GitError, find_commit, read_error};
use crate::signature::{Refusal, Signed, Signer, verify_detached};

/// The approval tags of `env` (`karrots/approve/<env>/…`): each name under `refs/tags/` and
/// its object as `git cat-file` prints it (an annotated tag's text, or the commit a
/// lightweight tag names, which counts for nothing).
pub fn approval_tags(repo: &Repository, env: &str) -> Result<Vec<(String, Vec<u8>)>, GitError> {
    let glob = format!("refs/tags/karrots/approve/{env}/*");
    let odb = repo.odb().map_err(|source| read_error_at(&glob, source))?;
    let references = repo
        .references_glob(&glob)
        .map_err(|source| read_error_at(&glob, source))?;
    let mut tags = Vec::new();
    for reference in references.flatten() {
        let (Ok(name), Some(target)) = (reference.name(), reference.target()) else {
            continue;
        };
        let object = odb
            .read(target)
            .map_err(|source| read_error_at(name, source))?;
        let name = name.trim_start_matches("refs/tags/").to_string();
        tags.push((name, object.data().to_vec()));
    }
    Ok(tags)
}

fn read_error_at(name: &str, source: git2::Error) -> GitError {
    GitError::Tags {
        name: name.to_string(),
        source,
    }
}

/// The author and committer emails of the commits `head` brings since `last` (every commit
/// reachable from `head` and not from `last`), or of `head` alone when nothing was applied.
pub fn authors_since(
    repo: &Repository,
    last: Option<&CommitId>,
    head: &CommitId,
) -> Result<Vec<String>, GitError> {
    let commits = match last {
        None => vec![oid(head)?],
        Some(last) => {
            let (from, to) = (oid(head)?, oid(last)?);
            let mut walk = repo.revwalk().map_err(|source| read_error(head, source))?;
            walk.push(from)
                .and_then(|()| walk.hide(to))
                .map_err(|source| read_error(head, source))?;
            walk.collect::<Result<Vec<Oid>, _>>()
                .map_err(|source| read_error(head, source))?
        }
    };
    let mut emails = Vec::new();
    for id in commits {
        let commit = find_commit(repo, &CommitId::from_hex(&id.to_string()))?;
        for email in [commit.author().email(), commit.committer().email()]
            .into_iter()
            .flatten()
        {
            if !emails.iter().any(|known| known == email) {
                emails.push(email.to_string());
            }
        }
    }
    Ok(emails)
}

/// The commits of the first-parent chain from `head` back to `last` (not included), oldest
/// first; `head` alone when nothing was applied.
pub fn first_parents_since(
    repo: &Repository,
    last: Option<&CommitId>,
    head: &CommitId,
) -> Result<Vec<CommitId>, GitError> {
    let Some(last) = last else {
        return Ok(vec![head.clone()]);
    };
    let (from, to) = (oid(head)?, oid(last)?);
    let mut walk = repo.revwalk().map_err(|source| read_error(head, source))?;
    walk.simplify_first_parent()
        .and_then(|()| walk.set_sorting(Sort::TOPOLOGICAL | Sort::REVERSE))
        .and_then(|()| walk.push(from))
        .and_then(|()| walk.hide(to))
        .map_err(|source| read_error(head, source))?;
    walk.map(|id| {
        id.map(|id| CommitId::from_hex(&id.to_string()))
            .map_err(|source| read_error(head, source))
    })
    .collect()
}

/// Verifies the SSH signature of `commit` (its `gpgsig` header, over the commit without it)
/// by one of `signers`.
pub fn verify_commit(
    repo: &Repository,
    commit: &CommitId,
    signers: &[Signer],
) -> Result<Result<Signed, Refusal>, GitError> {
    let id = oid(commit)?;
    // Only a commit carries the signature a branch is checked for.
    repo.find_object(id, Some(ObjectType::Commit))
        .map_err(|source| read_error(commit, source))?;
    let (armored, payload) = match repo.extract_signature(&id, None) {
        Ok(parts) => parts,
        Err(error) if error.code() == git2::ErrorCode::NotFound => {
            return Ok(Err(Refusal::Unsigned));
        }
        Err(source) => return Err(read_error(commit, source)),
    };
    let armored = String::from_utf8_lossy(&armored);
    Ok(verify_detached(&payload, &armored, signers))
}

fn oid(commit: &CommitId) -> Result<Oid, GitError> {
    Oid::from_str(commit.as_str()).map_err(|source| read_error(commit, source))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::git::testing::{commit_all, git, write};
    use crate::signature::tests::key;

    /// Commits everything in `work` signed with the key at `signing_key` (`git commit -S`
    /// under `gpg.format=ssh`), as `email`.
    fn signed_commit(
        work: &std::path::Path,
        signing_key: &std::path::Path,
        email: &str,
    ) -> CommitId {
        git(work, &["add", "-A"]);
        let signing = format!("user.signingkey={}", signing_key.display());
        let author = format!("user.email={email}");
        git(
            work,
            &[
                "-c",
                "gpg.format=ssh",
                "-c",
                &signing,
                "-c",
                &author,
                "commit",
                "-S",
                "-qm",
                "signed",
            ],
        );
        CommitId::from_hex(&git(work, &["rev-parse", "HEAD"]))
    }

    #[test]
    fn commits_are_verified_along_the_first_parent_chain() {
        let dir = tempfile::tempdir().unwrap();
        let bob = key(dir.path(), "bob", "bob@example.com");
        key(dir.path(), "eve", "eve@example.com");
        let work = dir.path().join("repo");
        std::fs::create_dir(&work).unwrap();
        git(&work, &["init", "-q", "-b", "main"]);
        write(&work, "a", "1\n");
        let applied = commit_all(&work, "applied");
        write(&work, "a", "2\n");
        let good = signed_commit(&work, &dir.path().join("bob"), "bob@example.com");
        write(&work, "a", "3\n");
        let unsigned = commit_all(&work, "unsigned");
        write(&work, "a", "4\n");
        let eves = signed_commit(&work, &dir.path().join("eve"), "eve@example.com");
        let repo = Repository::open(&work).unwrap();
        let signers = [bob];

        assert_eq!(
            first_parents_since(&repo, Some(&applied), &eves).unwrap(),
            [good.clone(), unsigned.clone(), eves.clone()],
            "oldest first, the applied commit left out"
        );
        assert_eq!(
            first_parents_since(&repo, None, &good).unwrap(),
            std::slice::from_ref(&good)
        );
        let signed = verify_commit(&repo, &good, &signers).unwrap().unwrap();
        assert_eq!(signed.email, "bob@example.com");
        assert_eq!(
            verify_commit(&repo, &unsigned, &signers).unwrap(),
            Err(Refusal::Unsigned)
        );
        assert!(matches!(
            verify_commit(&repo, &eves, &signers).unwrap(),
            Err(Refusal::UnknownKey(_))
        ));

        let authors = authors_since(&repo, Some(&unsigned), &eves).unwrap();
        assert!(
            authors.contains(&"eve@example.com".to_string()),
            "{authors:?}"
        );
        assert!(
            !authors.contains(&"bob@example.com".to_string()),
            "{authors:?}"
        );
    }
}
