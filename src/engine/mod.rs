//! The migration engine: everything that happens to one tenant database.

pub mod bsonx;
pub mod executor;
pub mod loader;
pub mod lock;
pub mod model;
pub mod plan;
pub mod rollback;
pub mod runner;
pub mod tracking;
pub mod transform;
pub mod validate;

pub use loader::{load_dir, load_sources, Migration};
pub use plan::{Direction, DownRequest, UpRequest};
pub use runner::{RunOptions, TenantReport};
