//! dbshift: MongoDB migrations for multi-tenant databases.
//!
//! - [`engine`]: everything that happens to one tenant database (files, plan, lock, apply,
//!   undo, validate, tracking).
//! - [`backup`]: snapshots in mongodump's layout and exact restores.
//! - [`mongo`]: connecting, and reading the server's replies (shared by everything below).
//! - [`job`]: the contract between the controller and each tenant Job's runner, and the run.
//! - [`cli`]: the `dbshift` command line (one file per subcommand).
//! - [`exit`]: exit codes, and the mapping of every error to one.
//! - [`crd`]: the `DatabaseMigration` custom resource of the operator.
//! - [`controller`]: the operator (`dbshift controller`).

pub mod backup;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod engine;
pub mod exit;
pub mod job;
pub mod mongo;
pub mod redact;
pub mod tenants;
