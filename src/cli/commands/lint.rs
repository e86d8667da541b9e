//! `dbshift lint`: check every migration file, and warn about risky steps; touches no database.

use clap::Args;

use crate::cli::{output, Global};
use crate::engine::risk;
use crate::exit::{Exit, Failure};

#[derive(Args, Debug, Clone, Default)]
pub struct LintArgs {
    /// Fail (exit 2) when a risk warning is not acknowledged in its file: for CI.
    #[arg(long)]
    pub strict: bool,
}

pub fn run(g: &Global, a: &LintArgs) -> Result<Exit, Failure> {
    let migrations = crate::engine::load_dir(&g.dir)?;
    let reviews: Vec<risk::Review> = migrations.iter().map(|m| risk::review(&m.file)).collect();
    output::print_lint(g.output, &migrations, &reviews, a.strict);
    let open: usize = reviews.iter().map(|r| r.warnings.len()).sum();
    if a.strict && open > 0 {
        return Err(Failure::invalid(format!(
            "{open} risk warning(s) not acknowledged (--strict): fix each step, or acknowledge it in its file \
             with `acknowledge: [{{ code, step, reason }}]`"
        )));
    }
    Ok(Exit::Ok)
}
