//! `dbshift snapshots`: the snapshots kept in a database (of the selected tenants, if any).

use clap::Args;
use serde_json::json;

use crate::backup::{self, database, SnapshotInfo};
use crate::cli::fleet::{self, selector};
use crate::cli::{Global, Output};
use crate::exit::{Exit, Failure};

#[derive(Args, Debug, Clone)]
pub struct SnapshotsArgs {
    /// The snapshot database.
    #[arg(long, value_name = "DB", default_value = backup::DEFAULT_DATABASE)]
    pub database: String,
}

pub async fn run(g: &Global, a: &SnapshotsArgs) -> Result<Exit, Failure> {
    let store_name = a.database.as_str();
    super::backup::check_store(store_name)?;
    let re = selector(g, None).validate()?;
    let conn = fleet::connect(g).await?;
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
    print_table(&snaps);
    Ok(Exit::Ok)
}

fn print_table(snaps: &[SnapshotInfo]) {
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
}
