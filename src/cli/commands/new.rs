//! `dbshift new SLUG`: scaffold a migration file (and the JSON Schema editors validate it with).

use clap::Args;

use crate::cli::{output, Global};
use crate::engine::loader;
use crate::exit::{Exit, Failure};

#[derive(Args, Debug, Clone)]
pub struct NewArgs {
    /// Short name: lowercase letters, digits, `_` or `-`.
    pub slug: String,
    /// Recorded as the migration's author.
    #[arg(long, env = "DBSHIFT_AUTHOR")]
    pub author: Option<String>,
}

pub fn run(g: &Global, a: &NewArgs) -> Result<Exit, Failure> {
    let now = chrono::Utc::now().format("%Y%m%d%H%M%S").to_string();
    let file = format!("{now}_{}.yaml", a.slug);
    loader::parse_file_name(&file).map_err(|e| Failure::invalid(format!("slug {:?}: {e}", a.slug)))?;
    let io = |p: &std::path::Path| {
        let shown = p.display().to_string();
        move |e: std::io::Error| Failure::invalid(format!("{shown}: {e}"))
    };
    std::fs::create_dir_all(&g.dir).map_err(io(&g.dir))?;
    let path = g.dir.join(&file);
    if path.exists() {
        return Err(Failure::invalid(format!("{} already exists", path.display())));
    }
    std::fs::write(&path, loader::scaffold(&a.slug, a.author.as_deref().unwrap_or(""))).map_err(io(&path))?;
    // Editors that read `$schema` (the scaffold points at it) validate and complete files.
    let schema = g.dir.join("migration.schema.json");
    if !schema.exists() {
        std::fs::write(&schema, super::schema::migration_schema()).map_err(io(&schema))?;
    }
    output::print_created(g.output, &path);
    Ok(Exit::Ok)
}
