//! Snapshots kept in a database, through the binary: `backup --into-database`,
//! `restore --from-database`, `snapshots`, and `run` with DBSHIFT_BACKUP and --rollback-run.

mod common;

use bson::{doc, Document};
use common::*;
use futures::TryStreamExt;
use serde_json::Value;

const ADD: &str = "up:\n  - addField: { collection: items, field: color, value: red }\n";
const SIZE: &str = "up:\n  - addField: { collection: items, field: size, value: 1 }\n";
/// Changes every document and cannot be undone from rollback data.
const IRREVERSIBLE: &str = "up:\n  - runCommand: { command: { update: items, updates: [ { q: {}, u: { $set: { name: gone } }, multi: true } ] } }\n";

async fn tenant(prefix: &str) -> String {
    let name = unique(prefix);
    client()
        .await
        .database(&name)
        .collection::<Document>("items")
        .insert_many((0..20).map(|j| doc! {"_id": j, "name": format!("Item {j}"), "n": j as i64, "f": 1.5}))
        .await
        .unwrap();
    name
}

/// Exact bytes of every document of `items`, sorted by `_id`.
async fn raw_items(db: &str) -> Vec<Vec<u8>> {
    raw_bytes(&client().await.database(db), "items").await
}

async fn snapshot_docs(store: &str, tenant: &str) -> Vec<Document> {
    client()
        .await
        .database(store)
        .collection::<Document>("snapshots")
        .find(doc! {"tenant": tenant})
        .sort(doc! {"createdAt": 1, "_id": 1})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

/// `dbshift run` for one tenant, as a Job runs it; returns the output and the result file.
struct Job {
    dir: tempfile::TempDir,
    out: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Job {
    fn new(tenant: &str, files: &[(&str, &str)], env: &[(&str, &str)]) -> Job {
        let dir = migrations(files);
        let out = tempfile::tempdir().unwrap();
        let mut e: Vec<(String, String)> = vec![
            ("DBSHIFT_MONGODB_URI".into(), uri()),
            ("DBSHIFT_TENANT".into(), tenant.into()),
            ("DBSHIFT_DIR".into(), dir.path().display().to_string()),
            ("DBSHIFT_RESULT_FILE".into(), out.path().join("termination-log").display().to_string()),
        ];
        e.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Job { dir, out, env: e }
    }

    fn add(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join(name), text).unwrap();
    }

    fn run(&self, extra: &[(&str, &str)]) -> (std::process::Output, Value) {
        let _ = std::fs::remove_file(self.out.path().join("termination-log"));
        let mut env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        env.extend_from_slice(extra);
        let o = cli(&["run"], &env);
        let r = std::fs::read_to_string(self.out.path().join("termination-log"))
            .unwrap_or_else(|_| panic!("no result file: {}", text(&o)));
        let v: Value = serde_json::from_str(&r).unwrap();
        assert!(r.len() <= 4000);
        (o, v)
    }
}

#[tokio::test]
async fn run_snapshots_before_changing_and_only_when_there_is_work() {
    let t = tenant("bkcli_run").await;
    let store = unique("bkcli_store");
    let backup = format!("database:{store}");
    let job = Job::new(
        &t,
        &[("20250101000000_add.yaml", ADD)],
        &[("DBSHIFT_BACKUP", &backup), ("DBSHIFT_BACKUP_RETENTION", "2")],
    );
    let before = raw_items(&t).await;

    // A dry run plans only: no snapshot.
    let (o, r) = job.run(&[("DBSHIFT_DRY_RUN", "true"), ("DBSHIFT_RUN_ID", "dry")]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(r.get("backup").is_none(), "{r}");
    assert!(snapshot_docs(&store, &t).await.is_empty());

    let (o, r) = job.run(&[("DBSHIFT_RUN_ID", "op-1")]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let snaps = snapshot_docs(&store, &t).await;
    assert_eq!(snaps.len(), 1);
    let s = &snaps[0];
    assert_eq!((s.get_str("state").unwrap(), s.get_str("runId").unwrap()), ("complete", "op-1"));
    let m = s.get_document("manifest").unwrap();
    assert!(m.get_array("appliedMigrations").unwrap().is_empty(), "taken before the migration");
    let b = &r["backup"];
    assert_eq!(b["at"], format!("database:{store}/{}", s.get_str("_id").unwrap()));
    assert_eq!((b["docs"].as_i64(), b["bytes"].as_i64()), (Some(20), m.get_i64("totalBytes").ok()));
    assert_eq!(b["sha256"].as_str(), m.get_str("sha256").ok());
    assert_eq!(r["done"][0][0], "20250101000000_add");
    assert!(r.get("rollback").is_none());
    // The snapshot holds the data as it was before the run.
    let c = client().await;
    let copy = unique("bkcli_copy");
    let o = cli(
        &["restore", "--from-database", &store, "--snapshot", s.get_str("_id").unwrap(), "--tenant", &copy],
        &[("DBSHIFT_MONGODB_URI", &uri())],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(raw_items(&copy).await, before);
    c.database(&copy).drop().await.unwrap();

    // Nothing pending: no snapshot.
    let (o, r) = job.run(&[("DBSHIFT_RUN_ID", "op-2")]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(r.get("backup").is_none(), "{r}");
    assert_eq!(snapshot_docs(&store, &t).await.len(), 1);

    // Retention 2: the two newest stay.
    job.add("20250102000000_size.yaml", SIZE);
    assert_eq!(job.run(&[("DBSHIFT_RUN_ID", "op-3")]).0.status.code(), Some(0));
    assert_eq!(job.run(&[("DBSHIFT_RUN_ID", "op-4"), ("DBSHIFT_TARGET", "20250101000000")]).0.status.code(), Some(0));
    let runs: Vec<String> =
        snapshot_docs(&store, &t).await.iter().map(|d| d.get_str("runId").unwrap().to_string()).collect();
    assert_eq!(runs, ["op-3", "op-4"], "a down run snapshots too; retention kept the newest two");
    let names = c.database(&store).list_collection_names().await.unwrap();
    assert_eq!(names.len(), 3, "two data collections and the manifests: {names:?}");
}

#[tokio::test]
async fn rollback_run_uses_rollback_data_when_it_can() {
    let t = tenant("bkcli_rbdata").await;
    let store = unique("bkcli_store");
    let backup = format!("database:{store}");
    let job = Job::new(&t, &[("20250101000000_add.yaml", ADD)], &[("DBSHIFT_BACKUP", &backup)]);
    let before = raw_items(&t).await;
    assert_eq!(job.run(&[("DBSHIFT_RUN_ID", "op-1")]).0.status.code(), Some(0));
    let (o, r) = job.run(&[("DBSHIFT_RUN_ID", "op-2"), ("DBSHIFT_ROLLBACK_RUN", "op-1")]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!((r["rollback"].as_str(), r["dir"].as_str()), (Some("data"), Some("down")), "{r}");
    assert_eq!(r["done"][0][0], "20250101000000_add");
    assert!(r["backup"]["at"].as_str().unwrap().starts_with(&format!("database:{store}/{t}.")), "{r}");
    assert_eq!(raw_items(&t).await, before);
    let runs: Vec<String> =
        snapshot_docs(&store, &t).await.iter().map(|d| d.get_str("runId").unwrap().to_string()).collect();
    assert_eq!(runs, ["op-1", "op-2"], "the rollback changed the tenant, so it snapshotted it first");
}

#[tokio::test]
async fn rollback_run_restores_the_runs_snapshot_for_an_irreversible_migration() {
    let t = tenant("bkcli_rbsnap").await;
    let store = unique("bkcli_store");
    let backup = format!("database:{store}");
    let job = Job::new(&t, &[("20250101000000_add.yaml", ADD)], &[("DBSHIFT_BACKUP", &backup)]);
    assert_eq!(job.run(&[("DBSHIFT_RUN_ID", "op-0")]).0.status.code(), Some(0));
    let before = raw_items(&t).await;
    job.add("20250102000000_size.yaml", SIZE);
    job.add("20250103000000_rename_all.yaml", IRREVERSIBLE);
    let (o, r) = job.run(&[("DBSHIFT_RUN_ID", "op-1")]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(r["done"].as_array().unwrap().len(), 2);
    let taken = r["backup"]["at"].as_str().unwrap().to_string();
    assert_ne!(raw_items(&t).await, before);

    let (o, r) = job.run(&[("DBSHIFT_RUN_ID", "op-2"), ("DBSHIFT_ROLLBACK_RUN", "op-1")]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!((r["rollback"].as_str(), r["restored"].as_str()), (Some("snapshot"), Some(taken.as_str())), "{r}");
    assert_eq!(
        (r["dir"].as_str(), r["from"].as_str(), r["to"].as_str()),
        (Some("down"), Some("20250103000000"), Some("20250101000000"))
    );
    let mut done: Vec<String> =
        r["done"].as_array().unwrap().iter().map(|d| d[0].as_str().unwrap().to_string()).collect();
    done.sort();
    assert_eq!(done, ["20250102000000_size", "20250103000000_rename_all"]);
    assert!(r["backup"]["at"].as_str().unwrap() != taken, "a snapshot of the state before the rollback: {r}");
    assert_eq!(raw_items(&t).await, before, "byte-identical to before the run");
    let recs: Vec<Document> = client()
        .await
        .database(&t)
        .collection::<Document>("_dbshift_migrations")
        .find(doc! {})
        .sort(doc! {"_id": 1})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let states: Vec<(&str, &str)> =
        recs.iter().map(|d| (d.get_str("state").unwrap(), d.get_str("rolledBackBy").unwrap_or("-"))).collect();
    assert_eq!(states, [("applied", "-"), ("rolled_back", "op-2"), ("rolled_back", "op-2")]);
    // Applied again afterwards, from the restored data.
    let (o, r) = job.run(&[("DBSHIFT_RUN_ID", "op-3")]);
    assert_eq!((o.status.code(), r["done"].as_array().unwrap().len()), (Some(0), 2), "{}", text(&o));
}

#[tokio::test]
async fn rollback_run_without_rollback_data_or_snapshot_needs_attention_and_changes_nothing() {
    let t = tenant("bkcli_rbnone").await;
    let job = Job::new(&t, &[("20250101000000_rename_all.yaml", IRREVERSIBLE)], &[]);
    assert_eq!(job.run(&[("DBSHIFT_RUN_ID", "op-1")]).0.status.code(), Some(0));
    let after = raw_items(&t).await;
    let (o, r) = job.run(&[("DBSHIFT_RUN_ID", "op-2"), ("DBSHIFT_ROLLBACK_RUN", "op-1")]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let e = r["error"].as_str().unwrap();
    assert!(
        e.contains("cannot be rolled back") && e.contains("DBSHIFT_BACKUP") && e.contains("nothing was changed"),
        "{e}"
    );
    assert_eq!((r["ok"].as_bool(), r["dir"].as_str()), (Some(false), Some("down")));
    // A destination without a snapshot by that run.
    let store = unique("bkcli_store");
    let (o, r) = job.run(&[
        ("DBSHIFT_RUN_ID", "op-3"),
        ("DBSHIFT_ROLLBACK_RUN", "op-1"),
        ("DBSHIFT_BACKUP", &format!("database:{store}")),
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(r["error"].as_str().unwrap().contains(&format!("database:{store} holds no complete snapshot")), "{r}");
    assert_eq!(raw_items(&t).await, after);
    let recs = client().await.database(&t).collection::<Document>("_dbshift_migrations");
    assert_eq!(recs.count_documents(doc! {"state": "applied"}).await.unwrap(), 1);
}

#[tokio::test]
async fn bad_backup_settings_fail_before_anything_changes() {
    let t = tenant("bkcli_bad").await;
    let job = Job::new(&t, &[("20250101000000_add.yaml", ADD)], &[]);
    let before = raw_items(&t).await;
    for (value, says) in [
        ("s3://bucket/x", "is not database:<name>, dir:<path> or none"),
        ("dir:/nonexistent/dbshift-backups", "no such directory"),
        (&format!("database:{t}") as &str, "is the tenant itself"),
        ("database:bad.name", "not a valid database name"),
    ] {
        let (o, r) = job.run(&[("DBSHIFT_BACKUP", value)]);
        assert_eq!(o.status.code(), Some(2), "{value}: {}", text(&o));
        assert!(r["error"].as_str().unwrap().contains(says), "{value}: {r}");
    }
    assert_eq!(raw_items(&t).await, before);
    let colls = client().await.database(&t).list_collection_names().await.unwrap();
    assert_eq!(colls, vec!["items".to_string()], "not even a tracking collection");
}

#[tokio::test]
async fn run_with_a_directory_destination() {
    let t = tenant("bkcli_dir").await;
    let backups = tempfile::tempdir().unwrap();
    let dest = format!("dir:{}", backups.path().display());
    let job = Job::new(
        &t,
        &[("20250101000000_rename_all.yaml", IRREVERSIBLE)],
        &[("DBSHIFT_BACKUP", &dest), ("DBSHIFT_BACKUP_RETENTION", "1")],
    );
    let before = raw_items(&t).await;
    let (o, r) = job.run(&[("DBSHIFT_RUN_ID", "op-1")]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let at = r["backup"]["at"].as_str().unwrap().to_string();
    let path = std::path::PathBuf::from(at.strip_prefix("dir:").unwrap());
    assert!(path.starts_with(backups.path().join(&t)) && path.join("dbshift-manifest.json").is_file(), "{at}");
    let (o, r) = job.run(&[("DBSHIFT_RUN_ID", "op-2"), ("DBSHIFT_ROLLBACK_RUN", "op-1")]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!((r["rollback"].as_str(), r["restored"].as_str()), (Some("snapshot"), Some(at.as_str())));
    assert_eq!(raw_items(&t).await, before);
    let left = std::fs::read_dir(backups.path().join(&t)).unwrap().count();
    assert_eq!(left, 1, "retention 1 kept the snapshot taken before the rollback");
}

#[tokio::test]
async fn backup_restore_and_list_snapshots_in_a_database_from_the_command_line() {
    let (a, b) = (tenant("bkcli_db").await, tenant("bkcli_db").await);
    let store = unique("bkcli_store");
    let env = [("DBSHIFT_MONGODB_URI", uri())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let both = format!("{a},{b}");
    for _ in 0..3 {
        let o = cli(&["backup", "--into-database", &store, "--tenant", &both, "--keep", "2", "--output", "json"], &env);
        assert!(o.status.success(), "{}", text(&o));
        let j = json(&o);
        assert_eq!(
            j["tenants"][0]["result"]["location"].as_str().unwrap().split('/').next(),
            Some(&*format!("database:{store}"))
        );
        assert_eq!(j["tenants"][0]["result"]["totalDocuments"], 20);
    }
    let o = cli(&["snapshots", "--database", &store, "--output", "json"], &env);
    assert!(o.status.success(), "{}", text(&o));
    let list = json(&o);
    let snaps = list["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 4, "--keep 2 for each tenant: {list}");
    assert!(snaps.iter().all(|s| s["state"] == "complete" && s["documents"] == 20 && s["collections"] == 1));
    let o = cli(&["snapshots", "--database", &store, "--tenant", &a], &env);
    let human = text(&o);
    assert!(human.starts_with("ID") && human.contains("complete") && !human.contains(&b), "{human}");
    assert_eq!(human.lines().count(), 3, "{human}");

    // Damage both; restore the newest snapshot of each.
    let before = (raw_items(&a).await, raw_items(&b).await);
    let c = client().await;
    for t in [&a, &b] {
        c.database(t).collection::<Document>("items").delete_many(doc! {"_id": {"$lt": 5}}).await.unwrap();
    }
    let o = cli(&["restore", "--from-database", &store, "--tenant", &both], &env);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("counts and hashes verified"), "{}", text(&o));
    assert_eq!((raw_items(&a).await, raw_items(&b).await), before);

    // Bad input: nothing changes.
    c.database(&a).collection::<Document>("items").delete_many(doc! {"_id": 0}).await.unwrap();
    let damaged = raw_items(&a).await;
    for (args, says) in [
        (
            vec!["restore", "--from-database", &store, "--snapshot", "nope.20250101T000000Z"],
            "no snapshot nope.20250101T000000Z",
        ),
        (vec!["restore", "--from-database", "bkcli_nothing_here", "--tenant", &a], "no complete snapshot of"),
        (vec!["restore", "--from-database", &store], "choose what to restore"),
        (
            vec!["restore", "--from-database", &store, "--tenant", &a, "--collection", "nope"],
            "collection nope is not in the snapshot",
        ),
        (vec!["backup", "--into-database", &a, "--tenant", &a], "is the snapshot database"),
        (vec!["backup", "--out", "/tmp/x", "--into-database", &store, "--tenant", &a], "cannot be used with"),
    ] {
        let o = cli(&args, &env);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(text(&o).contains(says), "{args:?}: {}", text(&o));
    }
    assert_eq!(raw_items(&a).await, damaged);

    // Credentials never appear, whatever the command.
    let port = uri().rsplit(':').next().unwrap().to_string();
    let with_pw = format!("mongodb://app:S3cr3tPa55@127.0.0.1:{port}/shop");
    for args in [
        vec!["snapshots", "--database", &store],
        vec!["backup", "--into-database", &store, "--tenant", &a],
        vec!["restore", "--from-database", &store, "--tenant", &a],
    ] {
        for fmt in ["human", "json"] {
            let mut args = args.clone();
            args.extend(["--output", fmt, "--connect-timeout", "2"]);
            let o = cli(&args, &[("DBSHIFT_MONGODB_URI", &with_pw)]);
            assert!(!o.status.success());
            assert!(!text(&o).contains("S3cr3tPa55"), "{args:?}: {}", text(&o));
        }
    }
}

#[tokio::test]
async fn snapshots_are_taken_under_the_tenant_lock() {
    let t = tenant("bkcli_lock").await;
    let store = unique("bkcli_store");
    let backup = format!("database:{store}");
    let job = Job::new(&t, &[("20250101000000_add.yaml", ADD)], &[("DBSHIFT_BACKUP", &backup)]);
    let c = client().await;
    let until = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() + 600_000);
    let lock = c.database(&t).collection::<Document>("_dbshift_lock");
    lock.insert_one(doc! {"_id": "migrations", "owner": "pod-7/1", "run": "r9", "expiresAt": until}).await.unwrap();
    let (o, r) = job.run(&[("DBSHIFT_RUN_ID", "op-1"), ("DBSHIFT_LOCK_WAIT", "0")]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(r.get("backup").is_none() && r["error"].as_str().unwrap().contains("pod-7/1"), "{r}");
    assert!(snapshot_docs(&store, &t).await.is_empty(), "no snapshot without the lock");
    // `backup` only reads and goes ahead; a restore is refused while the lock is held.
    let o = cli(&["backup", "--into-database", &store, "--tenant", &t], &[("DBSHIFT_MONGODB_URI", &uri())]);
    assert!(o.status.success(), "a snapshot only reads: {}", text(&o));
    let o = cli(
        &["restore", "--from-database", &store, "--tenant", &t, "--lock-wait", "0"],
        &[("DBSHIFT_MONGODB_URI", &uri())],
    );
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    lock.delete_many(doc! {}).await.unwrap();
    let (o, r) = job.run(&[("DBSHIFT_RUN_ID", "op-1")]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(r["backup"]["at"].is_string(), "{r}");
}
