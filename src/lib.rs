//! Karrots: a GitOps reconciler for Terraform on AWS.
//!
//! Code map (see ARCHITECTURE.md for the whole picture):
//! - [`config`]: `karrots.yaml` and the daemon configuration, raw serde structs → validated types.
//! - [`repo`]: the config repository as data — environments, module closure, the refusals of
//!   the repository rules, policy lint, input fingerprints.
//! - [`limits`]: the size of file the checks read.
//! - [`problem`]: the located `path:line: message` every validation error is.
//! - [`engine`]: pure decisions — which lane and identity a commit runs with, or why it is
//!   refused.
//! - [`git`]: revisions, first-parent chains, and the export of a commit's configuration tree.
//! - [`aws`]: the run identity (credential chain, AssumeRole, the account check).
//! - [`terraform`]: workdirs, the CLI config Karrots writes, init/plan/show/apply.
//! - [`process`]: the one subprocess wrapper (process groups, SIGINT then SIGKILL).
//! - [`sandbox`]: the Landlock policy every terraform process runs under.
//! - [`egress`]: the private network a preview's terraform runs in (AWS endpoints only).
//! - [`cli`]: one module per subcommand; `main.rs` parses arguments and maps errors to exit codes.
//!
//! `aws`, `terraform`, `process`, `sandbox`, `egress` and `cli` need the `runtime` feature (on by default); without
//! it the crate is the pure configuration and repository checks, which the fuzz target builds.

#[cfg(feature = "runtime")]
pub mod alert;
#[cfg(feature = "runtime")]
pub mod approval;
#[cfg(feature = "runtime")]
pub mod aws;
#[cfg(feature = "runtime")]
pub mod cli;
pub mod config;
#[cfg(feature = "runtime")]
pub mod daemon;
#[cfg(feature = "runtime")]
pub mod egress;
pub mod engine;
#[cfg(feature = "runtime")]
pub mod forge;
pub mod git;
#[cfg(feature = "runtime")]
pub mod http;
pub mod limits;
#[cfg(feature = "runtime")]
pub mod metrics;
#[cfg(feature = "runtime")]
pub mod outbox;
pub mod problem;
#[cfg(feature = "runtime")]
pub mod process;
pub mod repo;
#[cfg(feature = "runtime")]
pub mod sandbox;
#[cfg(feature = "runtime")]
pub mod signature;
#[cfg(feature = "runtime")]
pub mod store;
#[cfg(feature = "runtime")]
pub mod terraform;
