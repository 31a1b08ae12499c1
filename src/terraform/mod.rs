//! Runs terraform for an environment: prepare the workdir, init when needed, plan to a saved
//! plan file, and apply exactly that file.
//!
//! Providers come from Karrots, not from the commit: Karrots writes the CLI configuration
//! (`TF_CLI_CONFIG_FILE`) with an explicit `provider_installation` — the plugin mirror when one
//! is configured, `direct` only when none is — and gives terraform an empty `HOME`. Every call
//! goes through [`crate::process`], inside the Landlock sandbox ([`crate::sandbox`]) unless the
//! daemon configuration says `sandbox: off`. `terraform init` runs under an exclusive lock on
//! the state directory, never two at once.
//!
//! Each environment has two lanes ([`Lane`]): a plan of the `merged` lane may be applied, a
//! `preview` plan never. A plan record names its lane, its run id and the SHA-256 of its plan
//! file, and [`Terraform::apply`] checks all three.

mod lock;
pub mod plan;
mod stage;
mod workdir;

pub use stage::{StageError, stage_commit};
pub use workdir::{Readiness, RunId, Workdir, create_private_dir};

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use tokio_util::sync::CancellationToken;

use crate::config::PreviewNetwork;
use crate::config::{Backend, RepoPath, S3Locking, SandboxMode, TerraformSettings};
use crate::egress::EgressPolicy;
use crate::engine::Lane;
use crate::git::CommitId;
use crate::process::{ProcessError, ProcessOutput, ProcessSpec, run};
use crate::repo::{CheckedEnvironment, Fingerprint, fingerprint};
use crate::sandbox::{SandboxPolicy, with_real_path};
use plan::{PlanJsonError, PlanSummary, StreamReport, summarize, summarize_stream};
use workdir::write_private;

/// How much of terraform's output an error or an alert carries: its last 4 KiB, where
/// terraform puts the error.
pub const ERROR_TAIL_BYTES: usize = 4 * 1024;
/// A run's saved plan, and plan's event stream, in its plan directory.
const PLAN_FILE: &str = "plan.tfplan";
const PLAN_STREAM: &str = "plan.jsonl";

/// Merged plans kept per environment; older plan directories are deleted.
pub const MERGED_PLANS_KEPT: usize = 10;

/// Files Karrots writes into the root module of a checkout.
const BACKEND_FILE: &str = "karrots_backend.tf";
const TFVARS_FILE: &str = "karrots.auto.tfvars.json";
const LOCK_FILE: &str = ".terraform.lock.hcl";
/// Kept in TF_DATA_DIR: the init that produced the providers there, and the lock file it wrote.
const INIT_KEY_FILE: &str = "karrots-init-key";
const SAVED_LOCK_FILE: &str = "karrots.lock.hcl";
/// Variables of the daemon's own environment that a terraform process may see. None of them
/// is a credential; AWS credentials are added per run.
const INHERITED_VARIABLES: [&str; 12] = [
    "PATH",
    "LANG",
    "LC_ALL",
    "TZ",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "AWS_CA_BUNDLE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "https_proxy",
    "no_proxy",
];

#[derive(Debug, thiserror::Error)]
pub enum TerraformError {
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("terraform {step} failed for environment {env} at {commit} (exit {code}):\n{stderr}")]
    Failed {
        step: &'static str,
        env: String,
        commit: String,
        code: String,
        stderr: String,
    },
    #[error(transparent)]
    PlanJson(#[from] PlanJsonError),
    #[error("{file} exists in the commit, but Karrots writes that file itself; rename it")]
    ReservedFile { file: String },
    #[error(
        "refusing to apply {commit} to {env}: its inputs changed since the plan (planned {planned}, now {now}); plan again"
    )]
    FingerprintMismatch {
        env: String,
        commit: String,
        planned: String,
        now: String,
    },
    #[error(
        "refusing to apply {commit} to {env}: the saved plan is stale (the state changed since); plan again"
    )]
    StalePlan { env: String, commit: String },
    #[error("refusing to apply {commit} to {env}: {reason}")]
    NotReady {
        env: String,
        commit: String,
        reason: String,
    },
    #[error(
        "refusing to apply {commit} to {env}: its plan file changed since the plan (sha256 {planned} then, {now} now); plan again"
    )]
    PlanFileChanged {
        env: String,
        commit: String,
        planned: String,
        now: String,
    },
}

fn io_context(context: impl Into<String>) -> impl FnOnce(io::Error) -> TerraformError {
    let context = context.into();
    move |source| TerraformError::Io { context, source }
}

/// The AWS part of a terraform process's environment, built by [`crate::aws`]. Its values
/// (credentials) are never displayed.
#[derive(Clone, Default)]
pub struct RunEnvironment {
    pub variables: BTreeMap<String, String>,
}

impl std::fmt::Debug for RunEnvironment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunEnvironment")
            .field("names", &self.variables.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A saved plan and what is needed to apply exactly it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRecord {
    pub env: String,
    pub commit: String,
    /// Only a `merged` plan may ever be applied.
    pub lane: Lane,
    pub run_id: RunId,
    /// SHA-256 of the plan file when terraform wrote it; apply refuses any other file.
    pub plan_sha256: String,
    /// The checkout's input fingerprint when the plan was made.
    pub fingerprint: String,
    /// The input directories the fingerprint covers, to recompute it before applying.
    pub inputs: BTreeSet<RepoPath>,
    pub root_module: RepoPath,
    pub summary: PlanSummary,
    pub plan_dir: PathBuf,
    /// Whether this run reused the previous `terraform init`.
    pub init_reused: bool,
}

impl PlanRecord {
    pub fn plan_file(&self) -> PathBuf {
        self.plan_dir.join(PLAN_FILE)
    }
}

/// Settings shared by every terraform run of one state directory.
#[derive(Debug, Clone)]
pub struct Terraform {
    binary: PathBuf,
    timeout: Duration,
    /// Between SIGINT and SIGKILL on timeout.
    grace: Duration,
    state_dir: PathBuf,
    plugin_mirror: Option<PathBuf>,
    sandbox: SandboxMode,
    /// The private network preview processes run in; `None` gives them the host's.
    preview_egress: Option<EgressPolicy>,
    /// AWS is an emulator at one address (`aws.endpoint_url`): the S3 backend addresses
    /// buckets by path, as emulators serve them.
    path_style_s3: bool,
}

impl Terraform {
    /// Prepares the state directory and writes Karrots' terraform CLI configuration, one per
    /// lane (without a mirror each lane has its own plugin cache).
    pub fn new(
        settings: &TerraformSettings,
        state_dir: &Path,
        sandbox: SandboxMode,
    ) -> Result<Terraform, TerraformError> {
        create_private_dir(state_dir)
            .map_err(io_context(format!("creating {}", state_dir.display())))?;
        let binary = resolve_binary(&settings.binary);
        let terraform = Terraform {
            binary,
            timeout: settings.timeout,
            grace: Duration::from_secs(30),
            state_dir: state_dir.to_path_buf(),
            plugin_mirror: settings.plugin_mirror.clone(),
            sandbox,
            preview_egress: None,
            path_style_s3: false,
        };
        for lane in [Lane::Merged, Lane::Preview] {
            terraform.write_cli_config(lane)?;
        }
        Ok(terraform)
    }

    fn cli_config(&self, lane: Lane) -> PathBuf {
        self.state_dir.join(format!("terraformrc-{lane}"))
    }

    fn plugin_cache(&self, lane: Lane) -> Option<PathBuf> {
        match self.plugin_mirror {
            Some(_) => None,
            None => Some(self.state_dir.join("plugin-cache").join(lane.as_str())),
        }
    }

    fn write_cli_config(&self, lane: Lane) -> Result<(), TerraformError> {
        let installation = match &self.plugin_mirror {
            Some(mirror) => format!(
                "  filesystem_mirror {{\n    path = {}\n  }}\n",
                serde_json::to_string(&mirror.display().to_string()).unwrap_or_default()
            ),
            None => "  direct {}\n".to_string(),
        };
        // Without a mirror, the environments of a lane share one download cache; init holds a
        // lock for it. Lanes never share one: a preview cannot seed a merged run's providers.
        let cache = match self.plugin_cache(lane) {
            None => String::new(),
            Some(cache) => {
                create_private_dir(&cache).map_err(io_context("creating the plugin cache"))?;
                format!(
                    "plugin_cache_dir = {}\n",
                    serde_json::to_string(&cache.display().to_string()).unwrap_or_default()
                )
            }
        };
        let text = format!(
            "# Written by Karrots: providers come from here, never from the config repository.\nprovider_installation {{\n{installation}}}\n{cache}disable_checkpoint = true\n"
        );
        let path = self.cli_config(lane);
        write_private(&path, text.as_bytes())
            .map_err(io_context(format!("writing {}", path.display())))
    }

    /// Shortens the SIGINT-to-SIGKILL grace period (tests).
    pub fn with_grace(mut self, grace: Duration) -> Terraform {
        self.grace = grace;
        self
    }

    pub fn workdir(&self, env: &crate::config::EnvName, lane: Lane) -> Workdir {
        Workdir::new(&self.state_dir, env, lane)
    }

    /// Runs preview processes in a private network that reaches only AWS and `endpoint_url`
    /// (and the provider registry when there is no mirror), or in the host's (`Open`).
    pub fn with_preview_network(
        mut self,
        network: PreviewNetwork,
        endpoint_url: Option<&url::Url>,
    ) -> Terraform {
        self.preview_egress = match network {
            PreviewNetwork::Isolated => Some(EgressPolicy::aws(
                endpoint_url.map(url::Url::as_str),
                self.plugin_mirror.is_none(),
            )),
            PreviewNetwork::Open => None,
        };
        self.path_style_s3 = endpoint_url.is_some();
        self
    }

    pub fn sandbox_mode(&self) -> SandboxMode {
        self.sandbox
    }

    /// What one terraform process may read and write: its own lane's directories, nothing of
    /// another lane or environment, nothing else of the state directory.
    fn sandbox_policy(&self, workdir: &Workdir, writable: &[PathBuf]) -> SandboxPolicy {
        let mut read_only = vec![workdir.checkout(), self.cli_config(workdir.lane())];
        read_only.extend(with_real_path(&self.binary));
        read_only.extend(self.plugin_mirror.iter().flat_map(|m| with_real_path(m)));
        let mut read_write = vec![
            workdir.tf_data(),
            workdir.state(),
            workdir.home(),
            workdir.tmp(),
        ];
        read_write.extend(self.plugin_cache(workdir.lane()));
        read_write.extend(writable.iter().cloned());
        SandboxPolicy {
            read_only,
            read_write,
        }
    }

    /// A terraform command for `workdir`, sandboxed, that may also write `writable`.
    fn command(
        &self,
        workdir: &Workdir,
        cwd: &Path,
        run_env: &RunEnvironment,
        writable: &[PathBuf],
    ) -> ProcessSpec {
        let mut env: BTreeMap<String, String> = INHERITED_VARIABLES
            .iter()
            .filter_map(|name| {
                std::env::var(name)
                    .ok()
                    .map(|value| (name.to_string(), value))
            })
            .collect();
        let own = [
            ("HOME", workdir.home()),
            ("TMPDIR", workdir.tmp()),
            ("TF_DATA_DIR", workdir.tf_data()),
            ("TF_CLI_CONFIG_FILE", self.cli_config(workdir.lane())),
        ];
        for (name, path) in own {
            env.insert(name.to_string(), path.display().to_string());
        }
        env.insert("TF_IN_AUTOMATION".into(), "1".into());
        env.insert("TF_INPUT".into(), "0".into());
        env.insert("CHECKPOINT_DISABLE".into(), "1".into());
        // Credentials come only from this run; never from an instance role by accident.
        env.insert("AWS_EC2_METADATA_DISABLED".into(), "true".into());
        env.extend(run_env.variables.clone());
        let mut spec = ProcessSpec::new(&self.binary, cwd)
            .env(env)
            .timeout(self.timeout, self.grace);
        if workdir.lane() == Lane::Preview
            && let Some(policy) = &self.preview_egress
        {
            spec = spec.egress(policy.clone());
        }
        match self.sandbox {
            SandboxMode::Landlock => spec.sandbox(self.sandbox_policy(workdir, writable)),
            SandboxMode::Off => {
                tracing::warn!(env = %workdir.env(), lane = %workdir.lane(), "sandbox: off — terraform runs without the Landlock sandbox and can read whatever this user can");
                spec
            }
        }
    }

    /// Moves the export in `workdir.staging()` into place and writes Karrots' own files into
    /// the root module. The checkout is not ready until [`Terraform::seal`]. Returns the lock
    /// file the commit carries (empty when none), which decides whether init must run again.
    pub fn prepare(
        &self,
        workdir: &Workdir,
        checked: &CheckedEnvironment,
    ) -> Result<Vec<u8>, TerraformError> {
        let root_module = checked.spec.terraform.root.to_path(&workdir.staging());
        for reserved in [BACKEND_FILE, TFVARS_FILE] {
            if root_module.join(reserved).exists() {
                return Err(TerraformError::ReservedFile {
                    file: format!("{}/{reserved}", checked.spec.terraform.root),
                });
            }
        }
        let checkout = workdir.promote_staging().map_err(io_context(format!(
            "preparing the workdir of {}",
            workdir.env()
        )))?;
        let root_module = checked.spec.terraform.root.to_path(&checkout);
        let backend_block = match &checked.spec.terraform.backend {
            Backend::Local => "local",
            Backend::S3(_) => "s3",
        };
        let written = [
            (
                BACKEND_FILE,
                format!(
                    "# Written by Karrots from terraform.backend in karrots.yaml.\nterraform {{\n  backend \"{backend_block}\" {{}}\n}}\n"
                ),
            ),
            (
                TFVARS_FILE,
                serde_json::to_string_pretty(&checked.spec.terraform.vars).unwrap_or_default(),
            ),
        ];
        for (name, text) in written {
            fs::write(root_module.join(name), text)
                .map_err(io_context(format!("writing {name}")))?;
        }
        let committed_lock = fs::read(root_module.join(LOCK_FILE)).unwrap_or_default();
        // A commit without a lock file reuses the one the last init wrote.
        let saved_lock = workdir.tf_data().join(SAVED_LOCK_FILE);
        if committed_lock.is_empty() && saved_lock.exists() {
            fs::copy(&saved_lock, root_module.join(LOCK_FILE))
                .map_err(io_context("restoring the dependency lock file"))?;
        }
        Ok(committed_lock)
    }

    /// Fingerprints the prepared (and initialised: init writes the lock file) checkout and
    /// marks it ready. The plan made next is tied to this fingerprint.
    pub async fn seal(
        &self,
        workdir: &Workdir,
        checked: &CheckedEnvironment,
        commit: &CommitId,
    ) -> Result<Fingerprint, TerraformError> {
        let fingerprint = fingerprint_checkout(workdir, &checked.inputs).await?;
        workdir
            .mark_ready(&Readiness {
                commit: commit.to_string(),
                fingerprint: fingerprint.to_string(),
            })
            .map_err(io_context("marking the workdir ready"))?;
        Ok(fingerprint)
    }

    fn backend_config(&self, workdir: &Workdir, backend: &Backend) -> Vec<String> {
        let pairs: Vec<(String, String)> = match backend {
            Backend::Local => vec![("path".into(), workdir.state_file().display().to_string())],
            Backend::S3(s3) => {
                let mut pairs = vec![
                    ("bucket".into(), s3.bucket.clone()),
                    ("key".into(), s3.key.clone()),
                    ("region".into(), s3.region.clone()),
                ];
                match &s3.locking {
                    S3Locking::DynamoDbTable(table) => {
                        pairs.push(("dynamodb_table".into(), table.clone()))
                    }
                    S3Locking::Lockfile => pairs.push(("use_lockfile".into(), "true".into())),
                }
                if self.path_style_s3 {
                    pairs.push(("use_path_style".into(), "true".into()));
                }
                pairs
            }
        };
        pairs
            .into_iter()
            .map(|(key, value)| format!("-backend-config={key}={value}"))
            .collect()
    }

    /// Plans `commit` of the environment, whose input closure waits in the workdir's staging
    /// directory (see [`stage_commit`]) and has passed the repository check (`checked`). The
    /// plan goes to `plans/<run>/`. `cancel` stops terraform gracefully (SIGINT, grace, kill).
    pub async fn plan(
        &self,
        workdir: &Workdir,
        checked: &CheckedEnvironment,
        commit: &CommitId,
        run_id: &RunId,
        run_env: &RunEnvironment,
        cancel: &CancellationToken,
    ) -> Result<PlanRecord, TerraformError> {
        let init = self.prepare_init(workdir, checked)?;
        let (init_reused, root_module) = (init.reused, &init.root_module);
        if !init_reused {
            self.init(workdir, commit, run_env, &init, cancel).await?;
        }
        let mut fingerprint = self.seal(workdir, checked, commit).await?;

        let plan_dir = workdir.plan_dir(run_id);
        create_private_dir(&plan_dir).map_err(io_context("creating the plan directory"))?;
        let plan_file = plan_dir.join(PLAN_FILE);
        let stream_file = plan_dir.join(PLAN_STREAM);
        let plan_command = self.plan_command(workdir, root_module, run_env, &plan_dir);
        // The summary comes from plan's own event stream: no `show -json`, which would load
        // every provider schema a second time.
        let planned =
            |output: ProcessOutput| -> Result<(ProcessOutput, StreamReport), TerraformError> {
                let stream =
                    fs::read_to_string(&stream_file).map_err(io_context("reading plan.jsonl"))?;
                Ok((output, summarize_stream(&stream)))
            };
        let complaint = |output: &ProcessOutput, report: &StreamReport| {
            format!("{}{}", report.errors, output.stderr)
        };
        let locking = |output: &ProcessOutput| {
            let stream = fs::read_to_string(&stream_file).unwrap_or_default();
            complaint(output, &summarize_stream(&stream))
        };
        let unlock = (workdir, root_module.as_path(), run_env);
        let output = self
            .run_locking(&plan_command, unlock, "OperationTypePlan", cancel, locking)
            .await?;
        let (mut output, mut report) = planned(output)?;
        if !output.success() && init_reused && needs_init(&complaint(&output, &report)) {
            // The init signature missed something init acts on: init again, once.
            self.init(workdir, commit, run_env, &init, cancel).await?;
            fingerprint = self.seal(workdir, checked, commit).await?;
            (output, report) = planned(run(&plan_command, cancel).await?)?;
        }
        let env = workdir.env().as_str();
        if !output.success() {
            output.stderr = complaint(&output, &report);
            return Err(failed("plan", env, commit.as_str(), &output));
        }
        restrict(&plan_file)?;
        let plan_sha256 = sha256_file(&plan_file)?;

        let record = PlanRecord {
            env: workdir.env().to_string(),
            commit: commit.to_string(),
            lane: workdir.lane(),
            run_id: run_id.clone(),
            plan_sha256,
            fingerprint: fingerprint.to_string(),
            inputs: checked.inputs.clone(),
            root_module: checked.spec.terraform.root.clone(),
            summary: report.summary,
            plan_dir: plan_dir.clone(),
            init_reused,
        };
        keep(workdir, &record)?;
        Ok(record)
    }

    /// Writes the checkout of `checked` (see [`Terraform::prepare`]) and says how to init it,
    /// and whether the last init can be reused. A preview of a local backend gets a copy of
    /// the merged state first.
    fn prepare_init(
        &self,
        workdir: &Workdir,
        checked: &CheckedEnvironment,
    ) -> Result<InitSettings, TerraformError> {
        let committed_lock = self.prepare(workdir, checked)?;
        if workdir.lane() == Lane::Preview && checked.spec.terraform.backend == Backend::Local {
            self.snapshot_merged_state(workdir)?;
        }
        let root_module = checked.spec.terraform.root.to_path(&workdir.checkout());
        let backend_args = self.backend_config(workdir, &checked.spec.terraform.backend);
        let key = self.init_key(workdir.lane(), checked, &committed_lock, &backend_args)?;
        let reused =
            fs::read_to_string(workdir.tf_data().join(INIT_KEY_FILE)).is_ok_and(|last| last == key);
        Ok(InitSettings {
            root_module,
            backend_args,
            key,
            reused,
        })
    }

    /// `terraform plan` of `root_module` into `plan_dir` (the plan file and its event
    /// stream). A preview never takes the state lock: it must not hold up an apply, and its
    /// read-only role may not be allowed to write the lock.
    fn plan_command(
        &self,
        workdir: &Workdir,
        root_module: &Path,
        run_env: &RunEnvironment,
        plan_dir: &Path,
    ) -> ProcessSpec {
        let writable = [plan_dir.to_path_buf()];
        let mut plan_command = self
            .command(workdir, root_module, run_env, &writable)
            .args(["plan", "-input=false", "-no-color", "-json", lock::ATTEMPT]);
        if workdir.lane() == Lane::Preview {
            plan_command = plan_command.arg("-lock=false");
        }
        plan_command
            .arg(format!("-out={}", plan_dir.join(PLAN_FILE).display()))
            .stdout_to(plan_dir.join(PLAN_STREAM))
    }

    /// A preview of a local-backend environment plans against a copy of the merged lane's
    /// state: it sees what a merge would change, and cannot touch the real state.
    fn snapshot_merged_state(&self, preview: &Workdir) -> Result<(), TerraformError> {
        let merged = self.workdir(preview.env(), Lane::Merged).state_file();
        let copy = preview.state_file();
        let _ = fs::remove_file(&copy);
        if merged.exists() {
            fs::copy(&merged, &copy)
                .map_err(io_context("copying the merged state for a preview"))?;
        }
        Ok(())
    }

    /// Writes `plan.json` (`terraform show -json` of the saved plan) next to the plan, for
    /// whoever wants the whole plan document; plans themselves do not need it. Returns the
    /// summary read from it.
    pub async fn render_json(
        &self,
        workdir: &Workdir,
        record: &PlanRecord,
        run_env: &RunEnvironment,
        cancel: &CancellationToken,
    ) -> Result<PlanSummary, TerraformError> {
        let json = self.show_json(workdir, record, run_env, cancel).await?;
        Ok(summarize(&json)?)
    }

    /// `terraform show -json` of the saved plan of `record`, written to `plan.json` next to
    /// it and returned.
    pub async fn show_json(
        &self,
        workdir: &Workdir,
        record: &PlanRecord,
        run_env: &RunEnvironment,
        cancel: &CancellationToken,
    ) -> Result<String, TerraformError> {
        let root_module = record.root_module.to_path(&workdir.checkout());
        let json_file = record.plan_dir.join("plan.json");
        let show = self
            .command(
                workdir,
                &root_module,
                run_env,
                std::slice::from_ref(&record.plan_dir),
            )
            .args(["show", "-json", "-no-color"])
            .arg(record.plan_file())
            .stdout_to(&json_file);
        let output = run(&show, cancel).await?;
        if !output.success() {
            return Err(failed("show", &record.env, &record.commit, &output));
        }
        fs::read_to_string(&json_file).map_err(io_context("reading plan.json"))
    }

    /// Deletes the artifacts of a drift check's plan once it is recorded (and applied, when
    /// it remediated): a drift plan is of a commit already applied, and is never kept.
    pub fn discard_plan(&self, record: &PlanRecord) -> Result<(), TerraformError> {
        match fs::remove_dir_all(&record.plan_dir) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => {
                Err(io_context("deleting a drift plan")(error))
            }
            _ => Ok(()),
        }
    }

    /// Deletes the artifacts of a preview plan once its run is recorded: previews are never
    /// applied, and their plans may hold values of unmerged code.
    pub fn discard_preview(&self, record: &PlanRecord) -> Result<(), TerraformError> {
        if record.lane != Lane::Preview {
            return Ok(());
        }
        match fs::remove_dir_all(&record.plan_dir) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => {
                Err(io_context("deleting a preview plan")(error))
            }
            _ => Ok(()),
        }
    }

    /// Runs `terraform init` under the init lock and records what it was run for. Init may
    /// write the dependency lock file into the root module; nothing else of the checkout.
    async fn init(
        &self,
        workdir: &Workdir,
        commit: &CommitId,
        run_env: &RunEnvironment,
        settings: &InitSettings,
        cancel: &CancellationToken,
    ) -> Result<(), TerraformError> {
        let key_file = workdir.tf_data().join(INIT_KEY_FILE);
        let _ = fs::remove_file(&key_file);
        let lock = self.init_lock().await?;
        let command = self
            .command(
                workdir,
                &settings.root_module,
                run_env,
                std::slice::from_ref(&settings.root_module),
            )
            .args(["init", "-input=false", "-no-color", "-reconfigure"])
            .args(settings.backend_args.iter().cloned());
        let output = run(&command, cancel).await?;
        drop(lock);
        if !output.success() {
            return Err(failed(
                "init",
                workdir.env().as_str(),
                commit.as_str(),
                &output,
            ));
        }
        let lock_file = settings.root_module.join(LOCK_FILE);
        if lock_file.exists() {
            fs::copy(&lock_file, workdir.tf_data().join(SAVED_LOCK_FILE))
                .map_err(io_context("saving the dependency lock file"))?;
        }
        fs::write(&key_file, &settings.key).map_err(io_context("recording the init"))?;
        Ok(())
    }

    /// Runs `command`, a plan or apply that takes the state lock for `operation`: again while
    /// another process holds the lock, for [`lock::WAIT`] in all, and again at once after
    /// releasing a lock that is this run's own orphan ([`lock`]). `complaint` is what
    /// terraform said of a failure.
    async fn run_locking(
        &self,
        command: &ProcessSpec,
        (workdir, root_module, run_env): (&Workdir, &Path, &RunEnvironment),
        operation: &str,
        cancel: &CancellationToken,
        complaint: impl Fn(&ProcessOutput) -> String,
    ) -> Result<ProcessOutput, TerraformError> {
        let first = std::time::Instant::now();
        let me = lock::this_user_at_host();
        let mut unlocked = 0;
        loop {
            let started = std::time::SystemTime::now();
            let output = run(command, cancel).await?;
            if output.success() {
                return Ok(output);
            }
            let text = complaint(&output);
            if !lock::failed_to_lock(&text) {
                return Ok(output);
            }
            let orphan =
                lock::holder(&text).filter(|holder| holder.is_own_orphan(operation, &me, started));
            match orphan {
                Some(holder) if unlocked < 3 => {
                    unlocked += 1;
                    tracing::warn!(
                        lock = %holder.id,
                        env = %workdir.env(),
                        "terraform found its own state lock held (a lock request sent twice): releasing it and trying again"
                    );
                    self.force_unlock(workdir, root_module, run_env, &holder.id, cancel)
                        .await?;
                }
                _ if first.elapsed() < lock::WAIT => {
                    tracing::info!(env = %workdir.env(), "the state lock is held; waiting for it");
                }
                _ => return Ok(output),
            }
        }
    }

    /// `terraform force-unlock` of the lock `id`: only ever a lock this run left itself.
    async fn force_unlock(
        &self,
        workdir: &Workdir,
        root_module: &Path,
        run_env: &RunEnvironment,
        id: &str,
        cancel: &CancellationToken,
    ) -> Result<(), TerraformError> {
        let command =
            self.command(workdir, root_module, run_env, &[])
                .args(["force-unlock", "-force", id]);
        let output = run(&command, cancel).await?;
        if output.success() {
            Ok(())
        } else {
            let env = workdir.env().as_str();
            Err(failed("force-unlock", env, "", &output))
        }
    }

    /// Terraform's plugin cache and installer are not safe for concurrent use: one init at a
    /// time per state directory, across processes.
    async fn init_lock(&self) -> Result<nix::fcntl::Flock<fs::File>, TerraformError> {
        let path = self.state_dir.join("init.lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_context(format!("opening {}", path.display())))?;
        tokio::task::spawn_blocking(move || {
            nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, errno)| io::Error::from(errno))
        })
        .await
        .map_err(|e| io_context("waiting for the init lock")(io::Error::other(e)))?
        .map_err(io_context(format!("locking {}", path.display())))
    }

    /// What decides whether a new commit can reuse the previous init: the module
    /// declarations init acts on, the lock file, the backend settings and the CLI config.
    fn init_key(
        &self,
        lane: Lane,
        checked: &CheckedEnvironment,
        committed_lock: &[u8],
        backend_args: &[String],
    ) -> Result<String, TerraformError> {
        let mut hasher = Sha256::new();
        let cli = fs::read(self.cli_config(lane)).map_err(io_context("reading the CLI config"))?;
        for part in [
            checked.init_signature.as_bytes(),
            checked.spec.terraform.root.as_str().as_bytes(),
            committed_lock,
            &cli,
            backend_args.join("\n").as_bytes(),
            self.binary.display().to_string().as_bytes(),
        ] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        Ok(hex::encode(hasher.finalize()))
    }

    /// Applies exactly the saved plan of `record`, after checking that it is a merged plan,
    /// that its file is the one terraform wrote, and that the workdir still holds the inputs
    /// it was made from. The plan file is deleted afterwards, whatever the outcome: a plan is
    /// never applied twice, nor after a failed or interrupted apply.
    pub async fn apply(
        &self,
        workdir: &Workdir,
        record: &PlanRecord,
        run_env: &RunEnvironment,
        cancel: &CancellationToken,
    ) -> Result<ProcessOutput, TerraformError> {
        let plan_file = record.plan_file();
        guard_apply(workdir, record).await?;
        let root_module = record.root_module.to_path(&workdir.checkout());
        let command = self
            .command(
                workdir,
                &root_module,
                run_env,
                std::slice::from_ref(&record.plan_dir),
            )
            .args(["apply", "-input=false", "-no-color", lock::ATTEMPT])
            .arg(&plan_file);
        let unlock = (workdir, root_module.as_path(), run_env);
        let outcome = self
            .run_locking(&command, unlock, "OperationTypeApply", cancel, |output| {
                output.stderr.clone()
            })
            .await;
        let _ = fs::remove_file(&plan_file);
        let output = outcome?;
        if output.success() {
            return Ok(output);
        }
        if output.stderr.contains("Saved plan is stale") {
            return Err(TerraformError::StalePlan {
                env: record.env.clone(),
                commit: record.commit.clone(),
            });
        }
        Err(failed("apply", &record.env, &record.commit, &output))
    }
}

/// What must hold before a saved plan is applied: a merged plan, its file as terraform wrote
/// it, the workdir still at its commit and holding the inputs it was made from. A plan file
/// that fails the hash or fingerprint check is deleted.
async fn guard_apply(workdir: &Workdir, record: &PlanRecord) -> Result<(), TerraformError> {
    let refuse = |reason: String| TerraformError::NotReady {
        env: record.env.clone(),
        commit: record.commit.clone(),
        reason,
    };
    if record.lane != Lane::Merged || workdir.lane() != Lane::Merged {
        return Err(refuse(
            "it is a preview plan; only plans of the merged lane are ever applied".into(),
        ));
    }
    let plan_file = record.plan_file();
    if !plan_file.exists() {
        return Err(refuse(
            "its plan file is gone (already applied, or never made)".into(),
        ));
    }
    let now = sha256_file(&plan_file)?;
    if now != record.plan_sha256 {
        let _ = fs::remove_file(&plan_file);
        return Err(TerraformError::PlanFileChanged {
            env: record.env.clone(),
            commit: record.commit.clone(),
            planned: record.plan_sha256.clone(),
            now,
        });
    }
    match workdir.readiness() {
        Some(ready) if ready.commit == record.commit => {}
        Some(ready) => {
            return Err(refuse(format!("the workdir holds {} now", ready.commit)));
        }
        None => return Err(refuse("the workdir was never finished".into())),
    }
    let now = fingerprint_checkout(workdir, &record.inputs).await?;
    if now.as_str() != record.fingerprint {
        let _ = fs::remove_file(&plan_file);
        return Err(TerraformError::FingerprintMismatch {
            env: record.env.clone(),
            commit: record.commit.clone(),
            planned: record.fingerprint.clone(),
            now: now.to_string(),
        });
    }
    Ok(())
}

/// The record of the plan run `run` saved in `workdir` (its `meta.json`), when it is still
/// there: a plan that waits for approvals across a restart. Applying it still goes through
/// every guard ([`Terraform::apply`]).
pub fn saved_plan(workdir: &Workdir, run: &RunId) -> Option<PlanRecord> {
    let meta = fs::read(workdir.plan_dir(run).join("meta.json")).ok()?;
    serde_json::from_slice(&meta).ok()
}

/// Writes a plan's record (`meta.json`) next to it; the merged lane keeps its newest plans
/// only.
fn keep(workdir: &Workdir, record: &PlanRecord) -> Result<(), TerraformError> {
    let meta = serde_json::to_vec_pretty(record)
        .map_err(|e| io_context("writing meta.json")(io::Error::other(e)))?;
    write_private(&record.plan_dir.join("meta.json"), &meta)
        .map_err(io_context("writing meta.json"))?;
    if workdir.lane() == Lane::Merged {
        workdir
            .prune_plans(MERGED_PLANS_KEPT)
            .map_err(io_context("deleting old plans"))?;
    }
    Ok(())
}

/// The fingerprint of a workdir's checkout, walked on a blocking thread.
async fn fingerprint_checkout(
    workdir: &Workdir,
    inputs: &BTreeSet<RepoPath>,
) -> Result<Fingerprint, TerraformError> {
    let checkout = workdir.checkout();
    let inputs = inputs.clone();
    let context = format!("fingerprinting the workdir of {}", workdir.env());
    tokio::task::spawn_blocking(move || fingerprint(&checkout, &inputs))
        .await
        .map_err(io::Error::other)
        .and_then(|result| result)
        .map_err(io_context(context))
}

fn sha256_file(path: &Path) -> Result<String, TerraformError> {
    let bytes = fs::read(path).map_err(io_context(format!("reading {}", path.display())))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// `terraform` (or `tofu`) resolved on PATH, so the sandbox can name the file it runs.
fn resolve_binary(binary: &Path) -> PathBuf {
    if binary.components().count() > 1 {
        return binary.to_path_buf();
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| binary.to_path_buf())
}

/// What one `terraform init` is run with, and the key recorded when it succeeds.
struct InitSettings {
    root_module: PathBuf,
    backend_args: Vec<String>,
    /// What decides whether an init can be reused ([`Terraform::init_key`]).
    key: String,
    /// Whether the last init was made with the same key.
    reused: bool,
}

fn failed(step: &'static str, env: &str, commit: &str, output: &ProcessOutput) -> TerraformError {
    TerraformError::Failed {
        step,
        env: env.to_string(),
        commit: commit.to_string(),
        code: output.code.map_or("signal".to_string(), |c| c.to_string()),
        stderr: tail(&output.stderr, ERROR_TAIL_BYTES),
    }
}

pub use crate::limits::tail;

/// Terraform's ways of saying the working directory needs `terraform init`.
fn needs_init(stderr: &str) -> bool {
    [
        "terraform init",
        "Module not installed",
        "Inconsistent dependency lock file",
        "Backend initialization required",
        "Required plugins are not installed",
    ]
    .iter()
    .any(|phrase| stderr.contains(phrase))
}

fn restrict(path: &Path) -> Result<(), TerraformError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(io_context(format!("restricting {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_config_names_exactly_one_provider_source() {
        let state = tempfile::tempdir().unwrap();
        let mirrored = TerraformSettings {
            plugin_mirror: Some(PathBuf::from("/opt/tf-plugins")),
            ..TerraformSettings::default()
        };
        Terraform::new(&mirrored, state.path(), SandboxMode::Landlock).unwrap();
        for lane in ["merged", "preview"] {
            let text =
                fs::read_to_string(state.path().join(format!("terraformrc-{lane}"))).unwrap();
            assert!(
                text.contains("filesystem_mirror {\n    path = \"/opt/tf-plugins\"\n  }"),
                "{text}"
            );
            assert!(
                !text.contains("direct") && !text.contains("plugin_cache_dir"),
                "{text}"
            );
        }

        Terraform::new(
            &TerraformSettings::default(),
            state.path(),
            SandboxMode::Landlock,
        )
        .unwrap();
        for lane in ["merged", "preview"] {
            let file = state.path().join(format!("terraformrc-{lane}"));
            let text = fs::read_to_string(&file).unwrap();
            assert!(
                text.contains("provider_installation {\n  direct {}\n}"),
                "{text}"
            );
            // Each lane caches its own downloads: a preview never seeds a merged run.
            assert!(
                text.contains(&format!(
                    "plugin_cache_dir = \"{}/plugin-cache/{lane}\"",
                    state.path().display()
                )),
                "{text}"
            );
            let mode = fs::metadata(&file).unwrap().permissions();
            assert_eq!(
                std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
                0o600
            );
        }
    }

    #[test]
    fn errors_carry_only_the_tail_of_terraform_output() {
        let long = format!("{}Error: the real cause", "noise ".repeat(2000));
        let cut = tail(&long, ERROR_TAIL_BYTES);
        assert!(cut.len() <= ERROR_TAIL_BYTES + "[…]".len());
        assert!(cut.starts_with("[…]") && cut.ends_with("Error: the real cause"));
        assert_eq!(tail("short", ERROR_TAIL_BYTES), "short");
        // Never cut inside a character.
        assert_eq!(tail("ééé", 3), "[…]é");
    }

    #[test]
    fn init_is_needed_when_terraform_says_so() {
        assert!(needs_init("Error: Module not installed\n"));
        assert!(needs_init("Error: Inconsistent dependency lock file"));
        assert!(!needs_init(
            "Error: creating EC2 VPC: UnauthorizedOperation"
        ));
    }
}
