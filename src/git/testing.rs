//! Test repositories made with the real `git` CLI, for the unit tests that read commits.

use std::fs;
use std::path::Path;

/// Runs `git args` in `dir` as a test author; returns its trimmed output.
pub(crate) fn git(dir: &Path, args: &[&str]) -> String {
    let output = std::process::Command::new("git")
        .args([
            "-c",
            "user.name=test",
            "-c",
            "user.email=test@karrots.invalid",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git is installed");
    assert!(output.status.success(), "git {args:?}: {output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// Writes `text` at the `/` path `path` under `dir`, making its folders.
pub(crate) fn write(dir: &Path, path: &str, text: &str) {
    let path = dir.join(path);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

/// Commits everything in `dir`; returns the commit.
pub(crate) fn commit_all(dir: &Path, message: &str) -> super::CommitId {
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-qm", message]);
    super::CommitId::from_hex(&git(dir, &["rev-parse", "HEAD"]))
}
