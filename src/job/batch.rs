//! A batch (`spec.rollout.tenantsPerJob` above 1): one runner pod migrates several tenants one
//! after another, each exactly as a Job of its own would (its lock, snapshot, checks, rollback
//! data and tracking records).
//!
//! A termination message (4 KiB) cannot hold a batch's results, and the runner pods keep no
//! Kubernetes credentials, so each tenant's [`JobResult`] goes to its own database: one document
//! per run and action in [`RESULTS`], written when the tenant is done. The controller, which
//! reaches every tenant database already, reads them once the Job ended. A tenant without one
//! (the pod was killed first) is judged from its tracking collection: untouched when no record
//! names the run, otherwise interrupted (its next runner finishes or undoes the work).

use bson::{doc, DateTime};
use futures::TryStreamExt;
use mongodb::Database;
use serde::{Deserialize, Serialize};

use super::result::JobResult;
use super::run::{finish, one_tenant, result_line, RunArgs, Settings, Shared};
use crate::exit::Exit;

/// The collection of a tenant database holding the results of batch runs.
pub const RESULTS: &str = "_dbshift_results";
/// Results kept per tenant (the newest; older ones are deleted after each write).
const KEEP: usize = 20;
/// Most tenants one batch takes (the `tenantsPerJob` bound).
pub const MAX_BATCH: usize = 1000;

/// Which Job of a run wrote a result.
pub fn result_id(run_id: &str, rollback: bool) -> String {
    format!("{run_id}:{}", if rollback { "rollback" } else { "migrate" })
}

/// One tenant's result of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResultDoc {
    #[serde(rename = "_id")]
    pub id: String,
    pub run_id: String,
    pub at: DateTime,
    /// The compact JSON of the [`JobResult`] (at most 4 KiB, as a termination message).
    pub result: String,
}

/// Write a tenant's result (replacing one of the same run and action), then keep the newest
/// [`KEEP`].
pub async fn write(db: &Database, run_id: &str, rollback: bool, r: &JobResult) -> mongodb::error::Result<()> {
    let coll = db.collection::<ResultDoc>(RESULTS);
    let id = result_id(run_id, rollback);
    let d = ResultDoc { id: id.clone(), run_id: run_id.into(), at: DateTime::now(), result: r.to_compact_json() };
    coll.replace_one(doc! { "_id": &id }, &d).upsert(true).await?;
    let old: Vec<bson::Document> = db
        .collection::<bson::Document>(RESULTS)
        .find(doc! {})
        .projection(doc! { "_id": 1 })
        .sort(doc! { "at": -1 })
        .skip(KEEP as u64)
        .await?
        .try_collect()
        .await?;
    let ids: Vec<bson::Bson> = old.into_iter().filter_map(|d| d.get("_id").cloned()).collect();
    if !ids.is_empty() {
        db.collection::<bson::Document>(RESULTS).delete_many(doc! { "_id": { "$in": ids } }).await?;
    }
    Ok(())
}

/// Why a result could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReadError {
    /// The server did not answer: try again later (nothing is known of the tenant).
    #[error("{0}")]
    Unreachable(String),
    /// What is stored is not a result of this tenant.
    #[error("{0}")]
    Invalid(String),
}

/// A tenant's result of `run_id`, if its runner wrote one. What is stored may be anything (any
/// user of the database can write there): a document that does not parse, is too large, or
/// names another tenant is [`ReadError::Invalid`], never a result, and its error quotes none
/// of what is stored.
pub async fn read(db: &Database, run_id: &str, rollback: bool) -> Result<Option<JobResult>, ReadError> {
    let id = result_id(run_id, rollback);
    let d = db
        .collection::<bson::Document>(RESULTS)
        .find_one(doc! { "_id": &id })
        .await
        .map_err(|e| ReadError::Unreachable(format!("reading {RESULTS}: {}", crate::mongo::describe(&e))))?;
    let Some(d) = d else { return Ok(None) };
    let invalid = |why: String| ReadError::Invalid(format!("{RESULTS} {id:?} {why}"));
    let text = d.get_str("result").map_err(|_| invalid("holds no result text".into()))?;
    if text.len() > 2 * super::MAX_RESULT {
        return Err(invalid(format!("holds {} bytes, more than a result takes", text.len())));
    }
    let r: JobResult = serde_json::from_str(text)
        .map_err(|e| invalid(format!("holds no readable result (line {}, column {})", e.line(), e.column())))?;
    if r.tenant != db.name() {
        return Err(invalid("names another tenant".into()));
    }
    Ok(Some(r))
}

/// The batch's summary (the result file, and the last line of stdout).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BatchSummary {
    pub v: u32,
    pub tenants: usize,
    pub ok: usize,
    pub failed: usize,
    /// Left untouched: the batch stopped first (a failure, or asked to stop).
    pub not_started: usize,
    /// The first failed tenant and its error, cut short.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_failure: Option<String>,
    pub code: i32,
}

/// Parse `DBSHIFT_BATCH`: a JSON list of tenant databases, each checked.
pub fn parse(batch: &str) -> Result<Vec<String>, String> {
    let tenants: Vec<String> = serde_json::from_str(batch)
        .map_err(|e| format!("DBSHIFT_BATCH is not a JSON list of tenant databases: {e}"))?;
    if tenants.is_empty() || tenants.len() > MAX_BATCH {
        return Err(format!("DBSHIFT_BATCH lists {} tenants: 1 to {MAX_BATCH}", tenants.len()));
    }
    for t in &tenants {
        crate::tenants::check_tenant(t).map_err(|e| format!("DBSHIFT_BATCH: {e}"))?;
    }
    let mut sorted = tenants.clone();
    sorted.sort();
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return Err("DBSHIFT_BATCH lists a tenant twice".into());
    }
    Ok(tenants)
}

/// `dbshift run` with `DBSHIFT_BATCH`: each tenant in order (`--batch-parallel` at once), its
/// result written to its database. Stops starting tenants at the first failure unless
/// `--batch-keep-going`, and when asked to stop (SIGTERM: the tenants in progress are undone
/// by the engine first). Exit 0 when every tenant succeeded, 1 when one failed or was not
/// started, 2 for a bad batch, 3 when MongoDB cannot be reached to write results.
pub async fn run(s: Settings, a: &RunArgs, batch: &str) -> Exit {
    use futures::StreamExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    let fail = |m: &str, code: Exit| finish(a, JobResult::failed("", m, code));
    if !s.tenants.is_empty() {
        return fail("set DBSHIFT_BATCH or DBSHIFT_TENANT (--tenant), not both", Exit::Invalid);
    }
    if a.dry_run {
        // A batch's results are written to its tenants' databases; a dry run writes nothing.
        return fail(
            "a dry run takes one tenant (DBSHIFT_TENANT), not a batch: its results would be written",
            Exit::Invalid,
        );
    }
    let tenants = match parse(batch) {
        Ok(t) => t,
        Err(e) => return fail(&e, Exit::Invalid),
    };
    let Some(uri) = s.uri.as_deref() else {
        return fail(
            "no MongoDB URI: set DBSHIFT_MONGODB_URI or DBSHIFT_MONGODB_URI_FILE, or pass --uri",
            Exit::Invalid,
        );
    };
    let conn = match crate::mongo::connect_for_command(uri, s.connect_timeout).await {
        Ok(c) => c,
        Err(e) => {
            let f = crate::exit::Failure::from(e);
            return fail(&f.message, f.exit);
        }
    };
    let run_id = a.run_id.clone().unwrap_or_else(|| s.options.run_id.clone());
    let rollback = a.rollback_run.is_some();
    // The files are the same for every tenant: loaded (and their scripts compiled) once. Files
    // that do not load fail every tenant, each told so, and touch none.
    let migrations = match crate::engine::load_dir(&s.dir) {
        Ok(m) => m,
        Err(e) => {
            let f = crate::exit::Failure::from(e);
            for t in &tenants {
                let r = JobResult::failed(t, &f.message, f.exit);
                if let Err(e) = write(&conn.client.database(t), &run_id, rollback, &r).await {
                    tracing::error!(tenant = %t, error = %conn.redactor.apply(&crate::mongo::describe(&e)), "could not write the tenant's result");
                }
            }
            return fail(&f.message, f.exit);
        }
    };
    if let Some(t) = tenants.first() {
        if !crate::mongo::supports_transactions(&conn.client.database(t)).await {
            tracing::warn!("{}", crate::engine::pass::WITHOUT_TRANSACTIONS);
        }
    }
    let shared = Shared { migrations, conn };
    let stop = s.options.stop.clone();
    let halted = AtomicBool::new(false);
    let asked = || stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
    let parallel = a.batch_parallel.clamp(1, 64);
    let (s, shared) = (&s, &shared);
    let one = |tenant: String| {
        let (run_id, halted) = (&run_id, &halted);
        async move {
            // Started only while nothing stops the batch.
            if halted.load(Ordering::SeqCst) || asked() {
                return None;
            }
            let r = one_tenant(s, a, &tenant, Some(shared)).await;
            println!("{}", r.to_compact_json());
            let db = shared.conn.client.database(&tenant);
            let mut written = write(&db, run_id, rollback, &r).await;
            for attempt in 1..3 {
                if written.is_ok() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500 * attempt)).await;
                written = write(&db, run_id, rollback, &r).await;
            }
            if let Err(e) = written {
                // The controller judges the tenant from its tracking collection instead.
                let e = shared.conn.redactor.apply(&crate::mongo::describe(&e));
                tracing::error!(tenant, error = %e, "could not write the tenant's result");
            }
            if !r.ok && !a.batch_keep_going {
                halted.store(true, Ordering::SeqCst);
            }
            Some((tenant, r))
        }
    };
    let done: Vec<Option<(String, JobResult)>> =
        futures::stream::iter(tenants.iter().cloned()).map(one).buffered(parallel).collect().await;
    let mut sum = BatchSummary { v: 1, tenants: tenants.len(), ..Default::default() };
    for d in &done {
        match d {
            None => sum.not_started += 1,
            Some((_, r)) if r.ok => sum.ok += 1,
            Some((tenant, r)) => {
                sum.failed += 1;
                if sum.first_failure.is_none() {
                    let e = crate::redact::tenant_values(r.error.as_deref().unwrap_or("failed"));
                    sum.first_failure = Some(format!("{tenant}: {}", e.chars().take(500).collect::<String>()));
                }
            }
        }
    }
    if sum.not_started > 0 {
        let why = if asked() { "asked to stop" } else { "a tenant failed" };
        tracing::warn!(left = sum.not_started, "{why}: the tenants left were not started");
    }
    let exit = if sum.failed == 0 && sum.not_started == 0 { Exit::Ok } else { Exit::Failed };
    sum.code = i32::from(exit.code());
    result_line(a, &serde_json::to_string(&sum).expect("serializable"));
    exit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_a_list_of_distinct_tenants() {
        assert_eq!(parse(r#"["a","b"]"#).unwrap(), ["a", "b"]);
        for (bad, why) in [
            ("a,b", "JSON list"),
            ("[]", "1 to 1000"),
            (r#"["a","a"]"#, "twice"),
            (r#"["admin"]"#, "admin"),
            (r#"["a.b"]"#, "a.b"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let many: Vec<String> = (0..=MAX_BATCH).map(|i| format!("t{i}")).collect();
        assert!(parse(&serde_json::to_string(&many).unwrap()).unwrap_err().contains("1001"));
    }
}
