//! Files a config repository may not carry: its own terraform CLI settings and
//! provider directories, override files, unchecked JSON configuration, and symlinks that
//! leave the repository. Any of these would let an unmerged commit change what a preview plan
//! runs.
//!
//! Scanned: the repository root's own entries, and everything under `environments/`,
//! `modules/` and `policies/` — the trees an environment's inputs come from. Other top-level
//! folders (a project's `src/` or `target/`) are not configuration and are not read.

use std::fs;
use std::path::Path;

use walkdir::WalkDir;

use crate::problem::{Problem, relative_to};

/// The folders whose whole contents are configuration.
pub const CONFIG_FOLDERS: [&str; 3] = ["environments", "modules", "policies"];

pub(crate) fn scan_layout(root: &Path) -> Vec<Problem> {
    let mut problems = Vec::new();
    if let Ok(entries) = fs::read_dir(root) {
        let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if CONFIG_FOLDERS.contains(&name.as_ref()) {
                continue;
            }
            // At the top level only the CLI-settings names matter; override files there are
            // not part of any module.
            if let Some(reason) = forbidden_cli_settings(&name) {
                problems.push(Problem::whole(relative_to(root, &path), reason));
            }
            check_symlink(root, &path, &mut problems);
        }
    }
    for folder in CONFIG_FOLDERS {
        let walker = WalkDir::new(root.join(folder))
            .follow_links(false)
            .sort_by_file_name();
        let mut entries = walker.into_iter();
        while let Some(entry) = entries.next() {
            let entry = match entry {
                Ok(entry) => entry,
                Err(error) => {
                    if error.io_error().map(|e| e.kind()) != Some(std::io::ErrorKind::NotFound) {
                        let path = error.path().unwrap_or(root);
                        problems.push(Problem::whole(
                            relative_to(root, path),
                            format!("cannot read: {error}"),
                        ));
                    }
                    continue;
                }
            };
            let path = entry.path();
            let name = entry.file_name().to_string_lossy();
            let reason = forbidden_cli_settings(&name).or_else(|| forbidden_in_module(&name));
            if let Some(reason) = reason {
                problems.push(Problem::whole(relative_to(root, path), reason));
                if entry.file_type().is_dir() {
                    entries.skip_current_dir();
                }
                continue;
            }
            check_symlink(root, path, &mut problems);
        }
    }
    problems
}

fn forbidden_cli_settings(name: &str) -> Option<String> {
    match name {
        ".terraformrc" | "terraform.rc" => Some(format!(
            "a committed {name} is refused: Karrots writes the terraform CLI configuration itself"
        )),
        "terraform.d" => Some(
            "a committed terraform.d/ is refused: providers come from Karrots' own provider_installation, not the repository"
                .to_string(),
        ),
        ".terraform" => Some(
            "a committed .terraform/ is refused: it holds providers and modules from another machine; add it to .gitignore"
                .to_string(),
        ),
        _ => None,
    }
}

/// Terraform's and OpenTofu's configuration file suffixes; OpenTofu reads `.tofu` files as
/// terraform reads `.tf`, so each is refused exactly like its counterpart.
const CONFIGURATION_SUFFIXES: [&str; 4] = [".tf.json", ".tofu.json", ".tf", ".tofu"];

fn forbidden_in_module(name: &str) -> Option<String> {
    let (stem, suffix) = CONFIGURATION_SUFFIXES
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix).map(|stem| (stem, *suffix)))?;
    if stem == "override" || stem.ends_with("_override") {
        return Some(format!(
            "override file {name} is refused: it would silently replace reviewed configuration"
        ));
    }
    if suffix.ends_with(".json") {
        let hcl = suffix.trim_end_matches(".json");
        return Some(format!(
            "{name} is refused: Karrots checks HCL ({hcl}) configuration only; write it as {hcl}"
        ));
    }
    None
}

/// A symlink is refused when its target, resolved physically where it exists and lexically
/// where it dangles, lies outside the repository.
fn check_symlink(root: &Path, path: &Path, problems: &mut Vec<Problem>) {
    let Ok(target) = fs::read_link(path) else {
        return;
    };
    if !symlink_leaves(root, path) {
        return;
    }
    problems.push(Problem::whole(
        relative_to(root, path),
        format!("symlink to {} leaves the repository", target.display()),
    ));
}

/// Whether the symlink at `path` points outside the repository at `root`: physically where it
/// resolves, lexically where it dangles.
pub(crate) fn symlink_leaves(root: &Path, path: &Path) -> bool {
    let (Ok(target), Ok(root_real)) = (fs::read_link(path), fs::canonicalize(root)) else {
        return false;
    };
    let parent = path.parent().unwrap_or(root);
    match fs::canonicalize(path) {
        Ok(resolved) => !resolved.starts_with(&root_real),
        Err(_) => {
            let parent_real = fs::canonicalize(parent).unwrap_or_else(|_| parent.to_path_buf());
            let joined = parent_real.join(&target);
            let mut normal = std::path::PathBuf::new();
            for component in joined.components() {
                match component {
                    std::path::Component::ParentDir => {
                        normal.pop();
                    }
                    std::path::Component::CurDir => {}
                    other => normal.push(other),
                }
            }
            !normal.starts_with(&root_real)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_refused_in_modules() {
        for name in [
            "override.tf",
            "override.tf.json",
            "dev_override.tf",
            "x_override.tf.json",
            "main.tf.json",
            "override.tofu",
            "dev_override.tofu",
            "override.tofu.json",
            "main.tofu.json",
        ] {
            assert!(forbidden_in_module(name).is_some(), "{name}");
        }
        assert_eq!(
            forbidden_in_module("main.tofu.json").unwrap(),
            "main.tofu.json is refused: Karrots checks HCL (.tofu) configuration only; write it as .tofu"
        );
        for name in [
            "main.tf",
            "main.tofu",
            "overrides.tf",
            "override.tfvars",
            "README.md",
        ] {
            assert!(forbidden_in_module(name).is_none(), "{name}");
        }
    }
}
