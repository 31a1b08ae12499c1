//! Karrots: a GitOps reconciler for Terraform on AWS.
//!
//! Code map (see ARCHITECTURE.md for the whole picture):
//! - [`config`]: `karrots.yaml` and the daemon configuration, raw serde structs → validated types.
//! - [`repo`]: the config repository as data — environments, module closure, the refusals of
//!   SPEC §3.8, policy lint, input fingerprints.
//! - [`problem`]: the located `path:line: message` every validation error is.
//! - [`cli`]: one module per subcommand; `main.rs` parses arguments and maps errors to exit codes.

pub mod aws;
pub mod cli;
pub mod config;
pub mod git;
pub mod problem;
pub mod process;
pub mod repo;
pub mod terraform;
