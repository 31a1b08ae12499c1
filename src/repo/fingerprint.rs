//! The input fingerprint of an environment: SHA-256 over the files it is built
//! from, so that "did this commit change this environment?" is a comparison of two strings.
//!
//! The input closure is a set of directories inside the repository (the environment folder,
//! the root module, every local module reached, `policies/`). Every file under them is hashed
//! with its repository-relative `/`-separated path, in byte order of the paths, each field
//! length-prefixed so no two different trees give the same byte stream. A symlink to a file
//! inside the tree contributes that file's content — what terraform reads through it — and
//! any other symlink (which the check refuses) its link text, so the fingerprint never reads
//! outside the tree. Nothing machine-specific (mtimes, owners, the absolute location of the
//! checkout) enters the hash.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use walkdir::WalkDir;

use crate::config::{RepoPath, to_slash};

/// A `sha256:<hex>` digest of an environment's inputs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fingerprint(String);

impl Fingerprint {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where one fingerprinted entry's bytes come from; read only when hashed, one at a time, so
/// the fingerprint holds no file in memory.
enum Entry {
    /// A regular file, or the file of the tree a symlink resolves to.
    File { tag: u8, path: PathBuf },
    /// The text of a symlink that does not resolve to a file of the tree.
    Link(Vec<u8>),
}

/// Fingerprints the files under `directories` of the tree at `root`. A directory that does
/// not exist contributes nothing (an environment without `policies/` is valid).
pub fn fingerprint(root: &Path, directories: &BTreeSet<RepoPath>) -> io::Result<Fingerprint> {
    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    let root_real = fs::canonicalize(root)?;
    for directory in directories {
        let start = directory.to_path(root);
        if !start.exists() {
            continue;
        }
        for entry in WalkDir::new(&start).follow_links(false) {
            let entry = entry.map_err(io::Error::other)?;
            let relative = to_slash(entry.path().strip_prefix(root).map_err(io::Error::other)?);
            if entries.contains_key(&relative) {
                continue;
            }
            let file_type = entry.file_type();
            if file_type.is_symlink() {
                let resolved = fs::canonicalize(entry.path())
                    .ok()
                    .filter(|real| real.starts_with(&root_real) && real.is_file());
                let source = match resolved {
                    Some(real) => Entry::File {
                        tag: b'l',
                        path: real,
                    },
                    None => Entry::Link(
                        fs::read_link(entry.path())?
                            .to_string_lossy()
                            .into_owned()
                            .into_bytes(),
                    ),
                };
                entries.insert(relative, source);
            } else if file_type.is_file() {
                let path = entry.path().to_path_buf();
                entries.insert(relative, Entry::File { tag: b'f', path });
            }
        }
    }
    let mut hasher = Sha256::new();
    for (relative, entry) in &entries {
        let head = |hasher: &mut Sha256, tag: u8, length: u64| {
            hasher.update([tag]);
            hasher.update((relative.len() as u64).to_be_bytes());
            hasher.update(relative.as_bytes());
            hasher.update(length.to_be_bytes());
        };
        match entry {
            Entry::Link(target) => {
                head(&mut hasher, b'l', target.len() as u64);
                hasher.update(target);
            }
            Entry::File { tag, path } => {
                let file = fs::File::open(path)?;
                let length = file.metadata()?.len();
                head(&mut hasher, *tag, length);
                let mut reader = file.take(length);
                let mut chunk = vec![0u8; 64 * 1024];
                let mut copied = 0u64;
                loop {
                    let read = reader.read(&mut chunk)?;
                    if read == 0 {
                        break;
                    }
                    hasher.update(&chunk[..read]);
                    copied += read as u64;
                }
                if copied != length {
                    return Err(io::Error::other(format!(
                        "{relative} changed while it was fingerprinted"
                    )));
                }
            }
        }
    }
    Ok(Fingerprint(format!(
        "sha256:{}",
        hex::encode(hasher.finalize())
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(names: &[&str]) -> BTreeSet<RepoPath> {
        names.iter().map(|n| RepoPath::parse(n).unwrap()).collect()
    }

    #[test]
    fn same_tree_same_fingerprint_and_each_change_shows() {
        let tree = tempfile::tempdir().unwrap();
        let root = tree.path();
        fs::create_dir_all(root.join("modules/a")).unwrap();
        fs::write(root.join("modules/a/main.tf"), "# a\n").unwrap();
        fs::write(root.join("modules/a/vars.tf"), "# v\n").unwrap();
        let set = dirs(&["modules/a", "policies"]);
        let first = fingerprint(root, &set).unwrap();
        assert_eq!(first, fingerprint(root, &set).unwrap());
        assert!(first.as_str().starts_with("sha256:") && first.as_str().len() == 71);

        // Moving content between files changes the fingerprint even if the bytes concatenate
        // to the same stream.
        fs::write(root.join("modules/a/main.tf"), "# a\n# v\n").unwrap();
        fs::write(root.join("modules/a/vars.tf"), "").unwrap();
        let moved = fingerprint(root, &set).unwrap();
        assert_ne!(first, moved);

        // A file outside the closure changes nothing; a new policy does.
        fs::write(root.join("README.md"), "hello").unwrap();
        assert_eq!(moved, fingerprint(root, &set).unwrap());
        fs::create_dir_all(root.join("policies")).unwrap();
        fs::write(root.join("policies/p.json"), "{}").unwrap();
        assert_ne!(moved, fingerprint(root, &set).unwrap());
    }

    #[test]
    fn the_location_of_the_checkout_does_not_matter() {
        let make = || {
            let tree = tempfile::tempdir().unwrap();
            fs::create_dir_all(tree.path().join("modules/a")).unwrap();
            fs::write(tree.path().join("modules/a/main.tf"), "x").unwrap();
            tree
        };
        let (one, two) = (make(), make());
        let set = dirs(&["modules/a"]);
        assert_eq!(
            fingerprint(one.path(), &set).unwrap(),
            fingerprint(two.path(), &set).unwrap()
        );
    }

    #[test]
    fn a_symlink_contributes_what_it_points_at() {
        let tree = tempfile::tempdir().unwrap();
        let root = tree.path();
        fs::create_dir_all(root.join("modules/a")).unwrap();
        fs::create_dir_all(root.join("modules/b")).unwrap();
        fs::write(root.join("modules/b/real.tf"), "# one\n").unwrap();
        std::os::unix::fs::symlink("../b/real.tf", root.join("modules/a/link.tf")).unwrap();
        let set = dirs(&["modules/a"]);
        let before = fingerprint(root, &set).unwrap();
        // The link text is unchanged and modules/b is not in the set, yet the content
        // terraform would read through the link changed: so does the fingerprint.
        fs::write(root.join("modules/b/real.tf"), "# two\n").unwrap();
        assert_ne!(before, fingerprint(root, &set).unwrap());
        // A link out of the tree is hashed by its text; the file it names is never read.
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), "one").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.join("modules/a/out.tf"))
            .unwrap();
        let with_link = fingerprint(root, &set).unwrap();
        fs::write(outside.path().join("secret"), "two").unwrap();
        assert_eq!(with_link, fingerprint(root, &set).unwrap());
    }
}
