//! One isolated working directory per environment, under the state directory:
//!
//! ```text
//! <state_dir>/environments/<env>/
//!   staging/          a commit being exported; never used until promoted
//!   checkout/         the exported configuration of the current commit, plus Karrots' own
//!                     files in the root module (backend block, tfvars)
//!   checkout/.karrots-ready   written last: the commit and fingerprint of a finished preparation
//!   tf-data/          TF_DATA_DIR: providers and modules, kept across commits
//!   state/            the local backend's state, outside the checkout so re-exports keep it
//!   plans/<sha>/      plan.tfplan, plan.json, plan.txt, meta.json — all mode 0600
//!   home/             an empty HOME, so no user file (~/.terraformrc, ~/.aws) reaches terraform
//! ```
//!
//! Workdirs are never shared between environments. A checkout without its readiness marker
//! (a preparation cut off by a crash) is never used: it is deleted and exported again.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::EnvName;
use crate::git::CommitId;

pub const READY_MARKER: &str = ".karrots-ready";

/// What a finished preparation wrote into its readiness marker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    pub commit: String,
    pub fingerprint: String,
}

#[derive(Debug, Clone)]
pub struct Workdir {
    env: EnvName,
    base: PathBuf,
}

impl Workdir {
    pub fn new(state_dir: &Path, env: &EnvName) -> Workdir {
        Workdir {
            env: env.clone(),
            base: state_dir.join("environments").join(env.as_str()),
        }
    }

    pub fn env(&self) -> &EnvName {
        &self.env
    }

    pub fn base(&self) -> &Path {
        &self.base
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

    pub fn state_file(&self) -> PathBuf {
        self.base.join("state").join("terraform.tfstate")
    }

    pub fn home(&self) -> PathBuf {
        self.base.join("home")
    }

    pub fn plan_dir(&self, commit: &CommitId) -> PathBuf {
        self.base.join("plans").join(commit.as_str())
    }

    /// Creates the private directories and an empty staging directory to export into.
    /// Whatever a cut-off preparation left in staging is removed first.
    pub fn begin_staging(&self) -> io::Result<PathBuf> {
        for dir in [
            self.base.clone(),
            self.tf_data(),
            self.home(),
            self.base.join("state"),
        ] {
            create_private_dir(&dir)?;
        }
        let staging = self.staging();
        if staging.exists() {
            fs::remove_dir_all(&staging)?;
        }
        Ok(staging)
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
