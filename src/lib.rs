//! dbshift: MongoDB migrations for multi-tenant databases.
//!
//! - [`engine`]: everything that happens to one tenant database (files, plan, lock, apply,
//!   undo, validate, tracking).
//! - [`backup`]: snapshots in mongodump's layout and exact restores.
//! - [`cli`]: the `dbshift` command line, which is also what each Kubernetes Job runs.
//! - [`crd`]: the `DatabaseMigration` custom resource of the operator.
//! - [`controller`]: the operator (`dbshift controller`) and `dbshift wait`.

pub mod backup;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod engine;
pub mod exit;
pub mod mongo;
pub mod redact;
pub mod tenants;
