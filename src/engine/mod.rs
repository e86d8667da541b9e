//! The migration engine: everything that happens to one tenant database.

pub mod bsonx;
pub mod count;
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

/// A MongoDB error as one readable sentence: the kind and the server's message, without the
/// driver's debug fields (labels, the raw server response as hex) that would drown it.
pub fn describe(e: &mongodb::error::Error) -> String {
    let text = e.kind.to_string();
    // Servers repeat themselves in long chains; keep errors to a readable length.
    if text.len() > 500 {
        let mut end = 500;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &text[..end])
    } else {
        text
    }
}
