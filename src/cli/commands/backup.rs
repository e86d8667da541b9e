//! `dbshift backup`: snapshot each tenant into a directory (mongodump's layout plus a
//! manifest) or into a database of the same server (`--into-database`).

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use crate::backup::{self, database, SnapshotOptions, Taken};
use crate::cli::fleet::{self, for_each_tenant, worst};
use crate::cli::{output, Global, Output};
use crate::exit::{Exit, Failure};

#[derive(Args, Debug, Clone)]
pub struct BackupArgs {
    /// Directory to write into.
    #[arg(long, required_unless_present = "into_database", conflicts_with = "into_database")]
    pub out: Option<PathBuf>,
    /// Only these collections (repeat).
    #[arg(long = "collection")]
    pub collections: Vec<String>,
    /// Compress files with gzip.
    #[arg(long, conflicts_with = "into_database")]
    pub gzip: bool,
    /// Keep the snapshots in this database of the same server (alone: dbshift_snapshots).
    #[arg(long, value_name = "DB", num_args = 0..=1, default_missing_value = backup::DEFAULT_DATABASE)]
    pub into_database: Option<String>,
    /// With --into-database: then keep only the N newest complete snapshots of each tenant.
    #[arg(long, value_name = "N", requires = "into_database")]
    pub keep: Option<usize>,
}

pub async fn run(g: &Global, a: &BackupArgs) -> Result<Exit, Failure> {
    match &a.out {
        Some(dir) => to_dir(g, a, dir).await,
        None => to_database(g, a, a.into_database.as_deref().unwrap_or(backup::DEFAULT_DATABASE)).await,
    }
}

async fn to_dir(g: &Global, a: &BackupArgs, dir: &std::path::Path) -> Result<Exit, Failure> {
    let (conn, tenants) = fleet::tenants(g).await?;
    let progress = output::transfer_progress(g.output);
    let results = for_each_tenant(&tenants, g.parallel, |t| {
        let db = conn.client.database(&t);
        let opts = SnapshotOptions {
            collections: a.collections.clone(),
            gzip: a.gzip,
            source: format!("{}/{t}", conn.source),
            tracking: g.tracking_collection.clone(),
            ..Default::default()
        };
        let target = dir.join(&t);
        let p = progress.clone();
        async move { Ok(backup::snapshot(&db, &target, &opts, p.as_deref()).await?) }
    })
    .await;
    output::print_backups(g.output, dir, &results, &conn.redactor);
    Ok(worst(&results, |_| Exit::Ok))
}

/// The snapshot database's name must be a database name.
pub(super) fn check_store(name: &str) -> Result<(), Failure> {
    crate::tenants::check_db_name(name).map_err(|e| Failure::invalid(format!("snapshot database: {e}")))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Backed {
    #[serde(flatten)]
    taken: Taken,
    /// Older snapshots deleted by `--keep`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    deleted: Vec<String>,
}

/// `backup --into-database DB [--keep N]`.
async fn to_database(g: &Global, a: &BackupArgs, store_name: &str) -> Result<Exit, Failure> {
    check_store(store_name)?;
    if g.tenant.iter().any(|t| t == store_name) {
        return Err(Failure::invalid(format!("{store_name} is the snapshot database: it is not a tenant")));
    }
    let (conn, mut tenants) = fleet::tenants(g).await?;
    // A --tenants pattern may match the snapshot database itself.
    tenants.retain(|t| t != store_name);
    if tenants.is_empty() {
        return Err(Failure::invalid(format!("no tenant to snapshot besides the snapshot database {store_name}")));
    }
    let store = conn.client.database(store_name);
    let progress = output::transfer_progress(g.output);
    let results = for_each_tenant(&tenants, g.parallel, |t| {
        let db = conn.client.database(&t);
        let opts = SnapshotOptions {
            collections: a.collections.clone(),
            source: format!("{}/{t}", conn.source),
            tracking: g.tracking_collection.clone(),
            ..Default::default()
        };
        let (store, p, keep) = (&store, progress.clone(), a.keep);
        async move {
            let taken = database::snapshot_to_database(&db, store, &opts, p.as_deref()).await?;
            let deleted = match keep {
                Some(k) => database::retain(store, &t, k).await?,
                None => Vec::new(),
            };
            Ok(Backed { taken, deleted })
        }
    })
    .await;
    if g.output == Output::Json {
        output::print_json("backup", &results, |_| true, &conn.redactor);
    } else {
        for (tenant, r) in &results {
            match r {
                Ok(b) => {
                    let m = &b.taken.manifest;
                    println!(
                        "{tenant}: snapshot of {} collection(s), {} documents, {} bytes in {} ms -> {}",
                        m.collections.len(),
                        m.total_documents,
                        m.total_bytes,
                        m.duration_ms,
                        b.taken.location
                    );
                    if !b.deleted.is_empty() {
                        println!("  deleted older snapshots: {}", b.deleted.join(", "));
                    }
                }
                Err(e) => output::print_error(tenant, e, &conn.redactor),
            }
        }
    }
    Ok(worst(&results, |_| Exit::Ok))
}
