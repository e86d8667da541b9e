//! The migration engine: everything that happens to one tenant database.
//!
//! - [`model`] and [`loader`]: the migration file format and reading a directory of files;
//! - [`ops`]: one file per operation (check, prepare, execute, estimate, undo);
//! - [`planner`]: pure decisions (what is applied, pending, changed; what a request runs);
//! - [`runner`]: a tenant's run under its [`lock`]: apply or undo, check, record in [`tracking`];
//! - [`preimages`]: the pre-image store, written before a lossy change, read on undo;
//! - [`script`]: the JavaScript engine behind `transform`; [`validate`]: post-migration checks;
//! - [`risk`]: the risk warnings of `lint` (destructive or risky steps), acknowledged per step.

pub mod bsonx;
pub mod count;
pub mod drift;
pub mod loader;
pub mod lock;
pub mod model;
pub mod ops;
pub mod pass;
pub mod planner;
pub mod preimages;
pub mod risk;
pub mod runner;
pub mod script;
pub mod tracking;
pub mod validate;

pub use loader::{load_dir, load_sources, Migration};
pub use planner::{Direction, DownRequest, UpRequest};
pub use runner::{RunOptions, TenantReport};
