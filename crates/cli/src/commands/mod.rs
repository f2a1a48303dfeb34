//! One module per command: each owns its arguments (clap) and its `run`.

pub mod convert;
pub mod diff;
pub mod eval;
pub mod freeze;
pub mod infer;
pub mod insert;
pub mod report;
pub mod run;
pub mod show;
pub mod train;
pub mod verify;
