//! Two isolated working directories per environment, one per lane, under the state directory:
//!
//! ```text
//! <state_dir>/environments/<env>/<lane>/      lane: merged or preview
//!   inspect/          a commit's whole configuration tree, exported to be checked; removed after
//!   staging/          the commit's input closure being exported; never used until promoted
//!   checkout/         the input closure of the current commit (its folder, the modules it
//!                     reaches, policies/), plus Karrots' own files in the root module
//!   checkout/.karrots-ready   written last: the commit and fingerprint of a finished preparation
//!   tf-data/          TF_DATA_DIR: providers and modules, kept across commits of this lane
//!   state/            the local backend's state, outside the checkout so re-exports keep it
//!   plans/<run-id>/   plan.tfplan, plan.jsonl (terraform's event stream), meta.json, and
//!                     plan.json when asked for — all mode 0600
//!   home/             an empty HOME, so no user file (~/.terraformrc, ~/.aws) reaches terraform
//!   tmp/              TMPDIR: the only scratch space the sandbox allows
//! ```
//!
//! The lanes share nothing: a preview's lock file, providers or checkout never reach a merged
//! run. Workdirs are never shared between environments. A checkout without its readiness
//! marker (a preparation cut off by a crash) is never used: it is deleted and exported again.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::EnvName;
use crate::engine::Lane;

pub const READY_MARKER: &str = ".karrots-ready";

/// What a finished preparation wrote into its readiness marker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    pub commit: String,
    pub fingerprint: String,
}

/// One run's identity: names its plan directory and its record. Letters, digits and `-`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RunId(String);

impl RunId {
    pub fn parse(text: &str) -> Result<RunId, String> {
        let valid = !text.is_empty()
            && text.len() <= 64
            && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if valid {
            Ok(RunId(text.to_string()))
        } else {
            Err(format!("{text:?} is not a run id (letters, digits and -)"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RunId {
    type Error = String;

    fn try_from(text: String) -> Result<RunId, String> {
        RunId::parse(&text)
    }
}

impl From<RunId> for String {
    fn from(id: RunId) -> String {
        id.0
    }
}

impl std::fmt::Display for RunId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone)]
pub struct Workdir {
    env: EnvName,
    lane: Lane,
    base: PathBuf,
}

impl Workdir {
    pub fn new(state_dir: &Path, env: &EnvName, lane: Lane) -> Workdir {
        Workdir {
            env: env.clone(),
            lane,
            base: state_dir
                .join("environments")
                .join(env.as_str())
                .join(lane.as_str()),
        }
    }

    pub fn env(&self) -> &EnvName {
        &self.env
    }

    pub fn lane(&self) -> Lane {
        self.lane
    }

    pub fn base(&self) -> &Path {
        &self.base
    }

    pub fn inspect(&self) -> PathBuf {
        self.base.join("inspect")
    }

    pub fn staging(&self) -> PathBuf {
        self.base.join("staging")
    }

    pub fn checkout(&self) -> PathBuf {
        self.base.join("checkout")
    }

    pub fn tf_data(&self) -> PathBuf {
        self.base.join("tf-data")
    }

    pub fn state(&self) -> PathBuf {
        self.base.join("state")
    }

    pub fn state_file(&self) -> PathBuf {
        self.state().join("terraform.tfstate")
    }

    pub fn home(&self) -> PathBuf {
        self.base.join("home")
    }

    pub fn tmp(&self) -> PathBuf {
        self.base.join("tmp")
    }

    pub fn plans(&self) -> PathBuf {
        self.base.join("plans")
    }

    pub fn plan_dir(&self, run: &RunId) -> PathBuf {
        self.plans().join(run.as_str())
    }

    /// Creates the private directories and empty `inspect/` and `staging/` directories to
    /// export into. Whatever a cut-off preparation left there is removed first.
    pub fn begin_staging(&self) -> io::Result<()> {
        for dir in [
            self.base.clone(),
            self.tf_data(),
            self.home(),
            self.state(),
            self.tmp(),
            self.plans(),
        ] {
            create_private_dir(&dir)?;
        }
        for dir in [self.inspect(), self.staging()] {
            if dir.exists() {
                fs::remove_dir_all(&dir)?;
            }
        }
        Ok(())
    }

    /// Replaces the checkout with the staged export. The new checkout is not ready until
    /// [`Workdir::mark_ready`].
    pub fn promote_staging(&self) -> io::Result<PathBuf> {
        let checkout = self.checkout();
        if checkout.exists() {
            fs::remove_dir_all(&checkout)?;
        }
        fs::rename(self.staging(), &checkout)?;
        Ok(checkout)
    }

    pub fn mark_ready(&self, readiness: &Readiness) -> io::Result<()> {
        let text = serde_json::to_string(readiness).map_err(io::Error::other)?;
        write_private(&self.checkout().join(READY_MARKER), text.as_bytes())
    }

    /// The readiness of the current checkout; `None` when it was never finished.
    pub fn readiness(&self) -> Option<Readiness> {
        let text = fs::read_to_string(self.checkout().join(READY_MARKER)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Keeps the plan directories of the newest `keep` runs and deletes the rest.
    pub fn prune_plans(&self, keep: usize) -> io::Result<()> {
        let mut runs: Vec<(std::time::SystemTime, PathBuf)> = match fs::read_dir(self.plans()) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .filter_map(|entry| {
                    let modified = entry.metadata().and_then(|m| m.modified()).ok()?;
                    Some((modified, entry.path()))
                })
                .collect(),
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(error),
        };
        runs.sort();
        let excess = runs.len().saturating_sub(keep);
        for (_, path) in runs.into_iter().take(excess) {
            fs::remove_dir_all(path)?;
        }
        Ok(())
    }
}

pub fn create_private_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// Writes a file only its owner can read (plans and their renderings can hold secrets).
pub fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_share_no_directory() {
        let state = Path::new("/var/lib/karrots");
        let env = EnvName::parse("prod").unwrap();
        let merged = Workdir::new(state, &env, Lane::Merged);
        let preview = Workdir::new(state, &env, Lane::Preview);
        let dirs = |w: &Workdir| {
            vec![
                w.checkout(),
                w.staging(),
                w.tf_data(),
                w.state(),
                w.plans(),
                w.home(),
                w.tmp(),
            ]
        };
        for mine in dirs(&merged) {
            for theirs in dirs(&preview) {
                assert!(
                    !mine.starts_with(&theirs) && !theirs.starts_with(&mine),
                    "{mine:?} {theirs:?}"
                );
            }
        }
        assert_eq!(
            merged.checkout(),
            Path::new("/var/lib/karrots/environments/prod/merged/checkout")
        );
    }

    #[test]
    fn run_ids_are_safe_file_names() {
        assert!(RunId::parse("1700000000000-abc1234").is_ok());
        for bad in ["", "../x", "a/b", "a b", &"x".repeat(65)] {
            assert!(RunId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pruning_keeps_the_newest_runs() {
        let state = tempfile::tempdir().unwrap();
        let workdir = Workdir::new(state.path(), &EnvName::parse("dev").unwrap(), Lane::Merged);
        workdir.begin_staging().unwrap();
        for n in 0..13 {
            let dir = workdir.plan_dir(&RunId::parse(&format!("run-{n:02}")).unwrap());
            create_private_dir(&dir).unwrap();
            let when =
                std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000 + n);
            fs::File::open(&dir).unwrap().set_modified(when).unwrap();
        }
        workdir.prune_plans(10).unwrap();
        let mut left: Vec<String> = fs::read_dir(workdir.plans())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left.len(), 10);
        assert_eq!(left[0], "run-03");
    }
}
