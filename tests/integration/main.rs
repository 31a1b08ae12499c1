//! The integration tests: the real `karrots` binary against config repositories built in temp
//! dirs. One test binary, so the crate is linked once.

mod approvals;
mod check;
mod daemon;
mod drift;
mod forge;
mod hardening;
mod hosts;
mod operations;
mod plan;
mod platform;
mod reconcile;
mod several;
mod store;
mod support;
mod untrusted;
