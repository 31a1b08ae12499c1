//! A problem found in a file of the config repository, located by path and line.
//!
//! Every user-facing validation error in Karrots is one of these, so `karrots check` can print
//! them as `path:line: message` lines that editors and CI annotations understand.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem, pointing at the line a user has to change.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// The file (or directory) at fault, relative to the repository root when it lies inside it,
    /// so messages read the same on every machine.
    pub path: PathBuf,
    /// 1-based line. Problems about a whole file, directory or symlink point at line 1.
    pub line: usize,
    /// What is wrong and, where it helps, what is allowed instead.
    pub message: String,
}

impl Problem {
    pub fn new(path: impl Into<PathBuf>, line: usize, message: impl Into<String>) -> Problem {
        Problem {
            path: path.into(),
            line: line.max(1),
            message: message.into(),
        }
    }

    /// A problem about a file or directory as a whole.
    pub fn whole(path: impl Into<PathBuf>, message: impl Into<String>) -> Problem {
        Problem::new(path, 1, message)
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.path.display(), self.line, self.message)
    }
}

/// A non-empty list of problems, returned by the loaders and checks as one error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(Vec<Problem>);

impl Problems {
    /// Sorts by file and line and drops exact duplicates (a shared module reached by several
    /// environments reports a parse error once). Returns `None` for an empty list.
    pub fn from_vec(mut problems: Vec<Problem>) -> Option<Problems> {
        problems.sort();
        problems.dedup();
        if problems.is_empty() {
            None
        } else {
            Some(Problems(problems))
        }
    }

    pub fn one(problem: Problem) -> Problems {
        Problems(vec![problem])
    }

    pub fn iter(&self) -> impl Iterator<Item = &Problem> {
        self.0.iter()
    }

    pub fn into_vec(self) -> Vec<Problem> {
        self.0
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, problem) in self.0.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// The 1-based line of a byte offset in `text`.
pub fn line_of_offset(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// `path` relative to `root` when it lies inside it; otherwise `path` unchanged.
pub fn relative_to(root: &Path, path: &Path) -> PathBuf {
    path.strip_prefix(root)
        .map(Path::to_path_buf)
        .unwrap_or_else(|_| path.to_path_buf())
}
