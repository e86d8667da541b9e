//! Snapshots kept in a database of the same server: `backup --into-database`,
//! `restore --from-database` and `snapshots`.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::json;

use super::{connect, for_each_tenant, output, run_options, selector, worst, CliError, Exit, Global, Output};
use crate::backup::{database, RestoreOptions, RestoreReport, SnapshotInfo, SnapshotOptions, Taken};
use crate::engine::{lock::Lease, runner::RunError};

fn check_store(name: &str) -> Result<(), CliError> {
    crate::tenants::check_db_name(name).map_err(|e| CliError::invalid(format!("snapshot database: {e}")))?;
    Ok(())
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
pub async fn backup(
    g: &Global,
    store_name: &str,
    collections: &[String],
    keep: Option<usize>,
) -> Result<Exit, CliError> {
    check_store(store_name)?;
    if g.tenant.iter().any(|t| t == store_name) {
        return Err(CliError::invalid(format!("{store_name} is the snapshot database: it is not a tenant")));
    }
    let conn = connect(g.uri.as_deref(), Duration::from_secs(g.connect_timeout)).await?;
    let mut tenants = selector(g, conn.default_db.clone()).resolve(&conn.client).await?;
    // A --tenants pattern may match the snapshot database itself.
    tenants.retain(|t| t != store_name);
    if tenants.is_empty() {
        return Err(CliError::invalid(format!("no tenant to snapshot besides the snapshot database {store_name}")));
    }
    let store = conn.client.database(store_name);
    let progress = output::transfer_progress(g.output);
    let results = for_each_tenant(&tenants, g.parallel, |t| {
        let db = conn.client.database(&t);
        let opts = SnapshotOptions {
            collections: collections.to_vec(),
            source: format!("{}/{t}", conn.source),
            tracking: g.tracking_collection.clone(),
            ..Default::default()
        };
        let (store, p) = (&store, progress.clone());
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

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Restored {
    /// `database:<db>/<id>`.
    snapshot: String,
    #[serde(flatten)]
    report: RestoreReport,
}

/// Which snapshot goes to which tenant; every snapshot is checked to exist and be complete
/// before anything is restored.
async fn restore_plan(
    g: &Global,
    store: &mongodb::Database,
    snapshot: Option<&str>,
    default_db: Option<String>,
) -> Result<Vec<(String, String)>, CliError> {
    let plan = if let Some(id) = snapshot {
        let m = database::manifest(store, id).await?;
        let target = match g.tenant.as_slice() {
            [] => m.database.clone(),
            [one] => one.clone(),
            _ => return Err(CliError::invalid("one snapshot can be restored into one tenant: give a single --tenant")),
        };
        vec![(target, id.to_string())]
    } else {
        let sel = selector(g, None);
        let re = sel.validate()?;
        let with_snapshots: Vec<String> = {
            let mut v: Vec<String> = database::list(store, None).await?.into_iter().map(|s| s.tenant).collect();
            v.dedup();
            v
        };
        let mut tenants: Vec<String> = g.tenant.clone();
        if let Some(re) = &re {
            tenants.extend(with_snapshots.iter().filter(|t| re.is_match(t)).cloned());
        }
        if tenants.is_empty() {
            match default_db {
                Some(d) if re.is_none() => tenants.push(d),
                _ if re.is_some() => {
                    return Err(CliError::invalid(format!(
                        "--tenants {:?} matched no tenant with snapshots in {}",
                        g.tenants.as_deref().unwrap_or_default(),
                        store.name()
                    )))
                }
                _ => {
                    return Err(CliError::invalid(
                        "choose what to restore: --tenant NAME, --tenants REGEX or --snapshot ID \
                         (`dbshift snapshots` lists them)",
                    ))
                }
            }
        }
        tenants.retain(|t| !g.exclude.contains(t));
        tenants.sort();
        tenants.dedup();
        let mut plan = Vec::new();
        let mut missing = Vec::new();
        for t in tenants {
            match database::newest(store, &t, None).await? {
                Some(id) => plan.push((t, id)),
                None => missing.push(t),
            }
        }
        if !missing.is_empty() {
            return Err(CliError::invalid(format!(
                "no complete snapshot of {} in database {}; nothing was restored",
                missing.join(", "),
                store.name()
            )));
        }
        plan
    };
    for (t, _) in &plan {
        crate::tenants::check_db_name(t)?;
        if t == store.name() {
            return Err(CliError::invalid(format!("{t} is the snapshot database: it cannot be restored into")));
        }
    }
    Ok(plan)
}

/// `restore --from-database DB [--snapshot ID]`.
pub async fn restore(
    g: &Global,
    store_name: &str,
    snapshot: Option<&str>,
    collections: &[String],
) -> Result<Exit, CliError> {
    check_store(store_name)?;
    let conn = connect(g.uri.as_deref(), Duration::from_secs(g.connect_timeout)).await?;
    let store = conn.client.database(store_name);
    let plan = restore_plan(g, &store, snapshot, conn.default_db.clone()).await?;
    let opts = run_options(g, Arc::new(crate::engine::runner::Quiet))?;
    let progress = output::transfer_progress(g.output);
    let tenants: Vec<String> = plan.iter().map(|(t, _)| t.clone()).collect();
    let results = for_each_tenant(&tenants, g.parallel, |t| {
        let db = conn.client.database(&t);
        let id = plan.iter().find(|(n, _)| n == &t).map(|(_, id)| id.clone()).expect("planned");
        let ropts = RestoreOptions {
            collections: collections.to_vec(),
            tracking: g.tracking_collection.clone(),
            ..Default::default()
        };
        let (store, p, o) = (&store, progress.clone(), &opts);
        async move {
            // A restore changes the tenant: not while a migration runs on it.
            let lease = Lease::acquire(&db, &o.owner, &o.run_id, o.lock_ttl).await.map_err(RunError::from)?;
            let r = database::restore_from_database(&db, store, &id, &ropts, p.as_deref()).await;
            let released = lease.release().await;
            let report = r?;
            if let Err(e) = released {
                tracing::warn!(tenant = %t, error = %e, "could not release the lock");
            }
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

/// `snapshots [--database DB]`: every snapshot kept there (of the selected tenants, if any).
pub async fn list(g: &Global, store_name: &str) -> Result<Exit, CliError> {
    check_store(store_name)?;
    let re = selector(g, None).validate()?;
    let conn = connect(g.uri.as_deref(), Duration::from_secs(g.connect_timeout)).await?;
    let store = conn.client.database(store_name);
    let one = match g.tenant.as_slice() {
        [one] if re.is_none() => Some(one.as_str()),
        _ => None,
    };
    let mut snaps: Vec<SnapshotInfo> = database::list(&store, one).await?;
    if !g.tenant.is_empty() || re.is_some() {
        snaps.retain(|s| g.tenant.contains(&s.tenant) || re.as_ref().is_some_and(|r| r.is_match(&s.tenant)));
    }
    snaps.retain(|s| !g.exclude.contains(&s.tenant));
    if g.output == Output::Json {
        let doc = json!({"command": "snapshots", "ok": true, "database": store_name, "snapshots": snaps});
        println!("{}", conn.redactor.apply(&serde_json::to_string_pretty(&doc).expect("serializable")));
        return Ok(Exit::Ok);
    }
    if snaps.is_empty() {
        println!("no snapshots in database {store_name}");
        return Ok(Exit::Ok);
    }
    let rows: Vec<[String; 8]> = snaps
        .iter()
        .map(|s| {
            [
                s.id.clone(),
                s.state.clone(),
                s.created_at.clone(),
                s.run_id.clone().unwrap_or_else(|| "-".into()),
                s.collections.to_string(),
                s.documents.to_string(),
                s.bytes.to_string(),
                s.sha256.chars().take(12).collect(),
            ]
        })
        .collect();
    let head = ["ID", "STATE", "CREATED", "RUN", "COLLECTIONS", "DOCUMENTS", "BYTES", "SHA256"];
    let widths: Vec<usize> =
        (0..head.len()).map(|i| rows.iter().map(|r| r[i].len()).chain([head[i].len()]).max().unwrap_or(0)).collect();
    let line = |cells: &[&str]| {
        let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(&head);
    for r in &rows {
        line(&r.iter().map(String::as_str).collect::<Vec<_>>());
    }
    Ok(Exit::Ok)
}
