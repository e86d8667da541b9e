//! `dbshift restore`: bring tenants back to a snapshot exactly (from a directory, or from a
//! snapshot database), then verify counts and content hashes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use serde::Serialize;

use crate::backup::{self, database, RestoreOptions, RestoreReport};
use crate::cli::fleet::{self, for_each_tenant, selector, worst};
use crate::cli::{output, Global, Output};
use crate::engine::runner;
use crate::exit::{Exit, Failure};

#[derive(Args, Debug, Clone)]
pub struct RestoreArgs {
    /// A snapshot directory, or a directory of per-tenant snapshots written by `backup`.
    #[arg(long, required_unless_present = "from_database", conflicts_with = "from_database")]
    pub from: Option<PathBuf>,
    /// Only these collections (repeat).
    #[arg(long = "collection")]
    pub collections: Vec<String>,
    /// Restore from snapshots kept in this database (alone: dbshift_snapshots): the newest
    /// complete snapshot of each tenant, or --snapshot.
    #[arg(long, value_name = "DB", num_args = 0..=1, default_missing_value = backup::DEFAULT_DATABASE)]
    pub from_database: Option<String>,
    /// With --from-database: this snapshot (an id listed by `dbshift snapshots`).
    #[arg(long, value_name = "ID", requires = "from_database")]
    pub snapshot: Option<String>,
}

pub async fn run(g: &Global, a: &RestoreArgs) -> Result<Exit, Failure> {
    match &a.from {
        Some(from) => from_dir(g, a, from).await,
        None => {
            let store = a.from_database.as_deref().unwrap_or(backup::DEFAULT_DATABASE);
            from_database(g, a, store).await
        }
    }
}

fn restore_options(g: &Global, a: &RestoreArgs) -> RestoreOptions {
    RestoreOptions { collections: a.collections.clone(), tracking: g.tracking_collection.clone(), ..Default::default() }
}

async fn from_dir(g: &Global, a: &RestoreArgs, from: &Path) -> Result<Exit, Failure> {
    let conn = fleet::connect(g).await?;
    let plan = dir_plan(from, g)?;
    let progress = output::transfer_progress(g.output);
    let tenants: Vec<String> = plan.iter().map(|(t, _)| t.clone()).collect();
    let results = for_each_tenant(&tenants, g.parallel, |t| {
        let db = conn.client.database(&t);
        let src = plan.iter().find(|(n, _)| n == &t).map(|(_, p)| p.clone()).expect("planned");
        let (opts, p) = (restore_options(g, a), progress.clone());
        async move { Ok(backup::restore(&db, &src, &opts, p.as_deref()).await?) }
    })
    .await;
    output::print_restores(g.output, &results, &conn.redactor);
    Ok(worst(&results, |_| Exit::Ok))
}

/// Which snapshot goes to which database: `--from` is one snapshot (restored into the one
/// tenant given, or the database it was taken from), or a directory of per-tenant snapshots.
fn dir_plan(from: &Path, g: &Global) -> Result<Vec<(String, PathBuf)>, Failure> {
    if from.join(backup::MANIFEST).exists() {
        let m = backup::read_manifest(from)?;
        let target = match g.tenant.as_slice() {
            [] => m.database.clone(),
            [one] => one.clone(),
            _ => return Err(Failure::invalid("one snapshot can be restored into one tenant: give a single --tenant")),
        };
        crate::tenants::check_tenant(&target)?;
        return Ok(vec![(target, from.to_path_buf())]);
    }
    let entries = std::fs::read_dir(from).map_err(|e| Failure::invalid(format!("{}: {e}", from.display())))?;
    let re = selector(g, None).validate()?;
    let mut plan = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        if p.join(backup::MANIFEST).exists() {
            let m = backup::read_manifest(&p)?;
            let chosen = (g.tenant.is_empty() && re.is_none())
                || g.tenant.contains(&m.database)
                || re.as_ref().is_some_and(|r| r.is_match(&m.database));
            if chosen && !g.exclude.contains(&m.database) {
                plan.push((m.database.clone(), p));
            }
        }
    }
    if plan.is_empty() {
        return Err(Failure::invalid(format!("{} holds no snapshot for the selected tenants", from.display())));
    }
    plan.sort();
    Ok(plan)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Restored {
    /// `database:<db>/<id>`.
    snapshot: String,
    #[serde(flatten)]
    report: RestoreReport,
}

/// `restore --from-database DB [--snapshot ID]`.
async fn from_database(g: &Global, a: &RestoreArgs, store_name: &str) -> Result<Exit, Failure> {
    super::backup::check_store(store_name)?;
    let conn = fleet::connect(g).await?;
    let store = conn.client.database(store_name);
    let plan = database_plan(g, &store, a.snapshot.as_deref(), conn.default_db.clone()).await?;
    let opts = fleet::run_options(g, Arc::new(crate::engine::runner::Quiet))?;
    let progress = output::transfer_progress(g.output);
    let tenants: Vec<String> = plan.iter().map(|(t, _)| t.clone()).collect();
    let results = for_each_tenant(&tenants, g.parallel, |t| {
        let db = conn.client.database(&t);
        let id = plan.iter().find(|(n, _)| n == &t).map(|(_, id)| id.clone()).expect("planned");
        let ropts = restore_options(g, a);
        let (store, p, o) = (&store, progress.clone(), &opts);
        async move {
            // A restore changes the tenant: not while a migration runs on it, and not over
            // work a stopped runner left (it is undone first).
            let restore = || async { Ok(database::restore_from_database(&db, store, &id, &ropts, p.as_deref()).await) };
            let (recovered, r) = runner::with_lock(&db, &t, o, restore).await?;
            let report = match r {
                Some(r) => r?,
                None => {
                    let why = recovered.iter().find_map(|m| m.error.clone()).unwrap_or_default();
                    return Err(Failure::new(Exit::NeedsAttention, format!("nothing was restored: {why}")));
                }
            };
            Ok(Restored { snapshot: database::location(store.name(), &id), report })
        }
    })
    .await;
    if g.output == Output::Json {
        output::print_json("restore", &results, |r| r.report.collections.iter().all(|c| c.verified), &conn.redactor);
    } else {
        for (tenant, r) in &results {
            match r {
                Ok(Restored { snapshot, report: rep }) => output::print_restored(tenant, &format!("{snapshot}: "), rep),
                Err(e) => output::print_error(tenant, e, &conn.redactor),
            }
        }
    }
    Ok(worst(&results, |_| Exit::Ok))
}

/// Which snapshot goes to which tenant; every snapshot is checked to exist and be complete
/// before anything is restored.
async fn database_plan(
    g: &Global,
    store: &mongodb::Database,
    snapshot: Option<&str>,
    default_db: Option<String>,
) -> Result<Vec<(String, String)>, Failure> {
    let plan = match snapshot {
        Some(id) => {
            let m = database::manifest(store, id).await?;
            let target = match g.tenant.as_slice() {
                [] => m.database.clone(),
                [one] => one.clone(),
                _ => {
                    return Err(Failure::invalid(
                        "one snapshot can be restored into one tenant: give a single --tenant",
                    ))
                }
            };
            vec![(target, id.to_string())]
        }
        None => newest_of_selected(g, store, default_db).await?,
    };
    for (t, _) in &plan {
        crate::tenants::check_tenant(t)?;
        if t == store.name() {
            return Err(Failure::invalid(format!("{t} is the snapshot database: it cannot be restored into")));
        }
    }
    Ok(plan)
}

/// The newest complete snapshot of each selected tenant (all of them must have one).
async fn newest_of_selected(
    g: &Global,
    store: &mongodb::Database,
    default_db: Option<String>,
) -> Result<Vec<(String, String)>, Failure> {
    let re = selector(g, None).validate()?;
    let mut with_snapshots: Vec<String> = database::list(store, None).await?.into_iter().map(|s| s.tenant).collect();
    with_snapshots.dedup();
    let mut tenants: Vec<String> = g.tenant.clone();
    if let Some(re) = &re {
        tenants.extend(with_snapshots.iter().filter(|t| re.is_match(t)).cloned());
    }
    if tenants.is_empty() {
        match default_db {
            Some(d) if re.is_none() => tenants.push(d),
            _ if re.is_some() => {
                return Err(Failure::invalid(format!(
                    "--tenants {:?} matched no tenant with snapshots in {}",
                    g.tenants.as_deref().unwrap_or_default(),
                    store.name()
                )))
            }
            _ => {
                return Err(Failure::invalid(
                    "choose what to restore: --tenant NAME, --tenants REGEX or --snapshot ID \
                     (`dbshift snapshots` lists them)",
                ))
            }
        }
    }
    tenants.retain(|t| !g.exclude.contains(t));
    tenants.sort();
    tenants.dedup();
    let (mut plan, mut missing) = (Vec::new(), Vec::new());
    for t in tenants {
        match database::newest(store, &t, None).await? {
            Some(id) => plan.push((t, id)),
            None => missing.push(t),
        }
    }
    if !missing.is_empty() {
        return Err(Failure::invalid(format!(
            "no complete snapshot of {} in database {}; nothing was restored",
            missing.join(", "),
            store.name()
        )));
    }
    Ok(plan)
}
