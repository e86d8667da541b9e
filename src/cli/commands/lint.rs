//! `dbshift lint`: check every migration file; touches no database.

use crate::cli::{output, Global};
use crate::exit::{Exit, Failure};

pub fn run(g: &Global) -> Result<Exit, Failure> {
    let migrations = crate::engine::load_dir(&g.dir)?;
    output::print_lint(g.output, &migrations);
    Ok(Exit::Ok)
}
