//! What a run reaches outside the daemon, behind two traits so that the workers can be
//! driven without terraform or AWS: the terraform runner ([`Runner`]) and the AWS identity a
//! run gets ([`Identities`]). The daemon runs [`Terraform`] and [`Sts`]; the unit tests of
//! the workers script both (`daemon::tests`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::aws::{AwsError, RunIdentity};
use crate::config::{AwsTarget, DaemonConfig, EnvName};
use crate::engine::Lane;
use crate::git::CommitId;
use crate::repo::CheckedEnvironment;
use crate::terraform::{PlanRecord, RunEnvironment, RunId, Terraform, TerraformError, Workdir};

/// A boxed future a trait object can return.
pub(crate) type Pending<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Terraform, as the workers use it: plan into a workdir, apply a saved plan, show a plan as
/// JSON, and drop what a plan left behind.
pub(crate) trait Runner: Send + Sync {
    fn plan<'a>(
        &'a self,
        workdir: &'a Workdir,
        checked: &'a CheckedEnvironment,
        commit: &'a CommitId,
        run: &'a RunId,
        env: &'a RunEnvironment,
        cancel: &'a CancellationToken,
    ) -> Pending<'a, Result<PlanRecord, TerraformError>>;

    fn apply<'a>(
        &'a self,
        workdir: &'a Workdir,
        record: &'a PlanRecord,
        env: &'a RunEnvironment,
        cancel: &'a CancellationToken,
    ) -> Pending<'a, Result<(), TerraformError>>;

    fn show_json<'a>(
        &'a self,
        workdir: &'a Workdir,
        record: &'a PlanRecord,
        env: &'a RunEnvironment,
        cancel: &'a CancellationToken,
    ) -> Pending<'a, Result<String, TerraformError>>;

    /// A merged plan that will not be applied (a drift check's).
    fn discard_plan(&self, record: &PlanRecord) -> Result<(), TerraformError>;

    /// A preview's plan, once its summary is recorded.
    fn discard_preview(&self, record: &PlanRecord) -> Result<(), TerraformError>;
}

impl Runner for Terraform {
    fn plan<'a>(
        &'a self,
        workdir: &'a Workdir,
        checked: &'a CheckedEnvironment,
        commit: &'a CommitId,
        run: &'a RunId,
        env: &'a RunEnvironment,
        cancel: &'a CancellationToken,
    ) -> Pending<'a, Result<PlanRecord, TerraformError>> {
        Box::pin(Terraform::plan(
            self, workdir, checked, commit, run, env, cancel,
        ))
    }

    fn apply<'a>(
        &'a self,
        workdir: &'a Workdir,
        record: &'a PlanRecord,
        env: &'a RunEnvironment,
        cancel: &'a CancellationToken,
    ) -> Pending<'a, Result<(), TerraformError>> {
        Box::pin(async move {
            Terraform::apply(self, workdir, record, env, cancel).await?;
            Ok(())
        })
    }

    fn show_json<'a>(
        &'a self,
        workdir: &'a Workdir,
        record: &'a PlanRecord,
        env: &'a RunEnvironment,
        cancel: &'a CancellationToken,
    ) -> Pending<'a, Result<String, TerraformError>> {
        Box::pin(Terraform::show_json(self, workdir, record, env, cancel))
    }

    fn discard_plan(&self, record: &PlanRecord) -> Result<(), TerraformError> {
        Terraform::discard_plan(self, record)
    }

    fn discard_preview(&self, record: &PlanRecord) -> Result<(), TerraformError> {
        Terraform::discard_preview(self, record)
    }
}

/// The AWS identity of one run: the lane's role in the environment's account, checked
/// against the account before terraform sees it.
pub(crate) trait Identities: Send + Sync {
    fn establish<'a>(
        &'a self,
        env: &'a EnvName,
        target: &'a AwsTarget,
        lane: Lane,
        commit: &'a CommitId,
    ) -> Pending<'a, Result<RunIdentity, AwsError>>;
}

/// AWS STS, at `endpoint` (an emulator) or the real one.
pub(crate) struct Sts {
    pub endpoint: Option<String>,
}

impl Identities for Sts {
    fn establish<'a>(
        &'a self,
        env: &'a EnvName,
        target: &'a AwsTarget,
        lane: Lane,
        commit: &'a CommitId,
    ) -> Pending<'a, Result<RunIdentity, AwsError>> {
        Box::pin(crate::aws::establish(
            env,
            target,
            lane,
            commit,
            self.endpoint.as_deref(),
        ))
    }
}

/// The runner and the identities a daemon's runs use.
pub(crate) struct World {
    pub runner: Arc<dyn Runner>,
    pub identities: Arc<dyn Identities>,
}

impl World {
    /// Terraform as `config` sets it up, and AWS STS.
    pub fn real(config: &DaemonConfig) -> Result<World, TerraformError> {
        let terraform = Terraform::new(&config.terraform, &config.state_dir, config.sandbox)?
            .with_preview_network(config.preview_network, config.aws_endpoint_url.as_ref());
        Ok(World {
            runner: Arc::new(terraform),
            identities: Arc::new(Sts {
                endpoint: config.aws_endpoint_url.as_ref().map(ToString::to_string),
            }),
        })
    }
}
