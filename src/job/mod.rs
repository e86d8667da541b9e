//! The contract between the controller and the runner pod of each tenant Job: the
//! environment the controller sets ([`env`]), the result the runner writes back
//! ([`result`]), and the run itself ([`run`], what `dbshift run` does).
//!
//! Both sides use these definitions, so a name or a field cannot drift between them.

pub mod batch;
pub mod env;
pub mod result;
pub mod run;

pub use result::{BackupInfo, JobResult, MAX_RESULT};
pub use run::RunArgs;
