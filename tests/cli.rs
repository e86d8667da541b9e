//! The `dbshift` binary end to end: commands, output, exit codes, and secrets kept out.

mod common;

use bson::{doc, Document};
use common::*;
use serde_json::Value;

const ADD: &str = "description: add colour\nup:\n  - addField: { collection: items, field: color, value: red }\nvalidate:\n  - count: { collection: items, filter: { color: { $exists: false } }, equals: 0 }\n";
const SPLIT: &str = r#"description: split names
up:
  - transform:
      collection: items
      script: "(d) => { if (!d.name) return null; const [a, ...b] = d.name.split(' '); d.first = a; d.last = b.join(' '); delete d.name; return d; }"
"#;

async fn tenants(prefix: &str, n: usize) -> Vec<String> {
    let c = client().await;
    let base = unique(prefix);
    let mut names = Vec::new();
    for i in 0..n {
        let name = format!("{base}_t{i}");
        c.database(&name)
            .collection::<Document>("items")
            .insert_many((0..20).map(|j| doc! {"_id": j, "name": format!("Item {j} of {i}")}))
            .await
            .unwrap();
        names.push(name);
    }
    names
}

#[tokio::test]
async fn a_release_across_tenants_with_status_plan_up_and_down_batch() {
    let names = tenants("cli_flow", 3).await;
    let base = names[0].trim_end_matches("_t0").to_string();
    let dir = migrations(&[("20250101000000_add_color.yaml", ADD), ("20250102000000_split_names.yaml", SPLIT)]);
    let d = dir.path().to_str().unwrap();
    let uri = uri();
    let pattern = format!("^{base}_");
    let excluded = names[2].clone();
    let args = |cmd: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        a.extend(
            ["--dir", d, "--tenants", &pattern, "--exclude", &excluded, "--output", "json"]
                .iter()
                .map(|s| s.to_string()),
        );
        a
    };
    let run = |cmd: &[&str]| {
        let a = args(cmd);
        cli(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[("DBSHIFT_MONGODB_URI", &uri)])
    };

    let o = run(&["status"]);
    assert!(o.status.success(), "{}", text(&o));
    let s = json(&o);
    assert_eq!(s["tenants"].as_array().unwrap().len(), 2, "the excluded tenant is left out");
    assert_eq!(s["tenants"][0]["result"][0]["standing"], "pending");

    let o = run(&["plan"]);
    assert!(o.status.success(), "{}", text(&o));
    let p = json(&o);
    assert_eq!(p["tenants"][0]["result"]["migrations"][0]["estimates"][0], 20);
    let c = client().await;
    assert!(
        !c.database(&names[0]).list_collection_names().await.unwrap().iter().any(|n| n.starts_with("_dbshift")),
        "plan writes nothing"
    );

    let o = run(&["up"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let u = json(&o);
    assert_eq!(u["ok"], true);
    assert_eq!(u["tenants"][1]["result"]["migrations"][1]["documentsAffected"], 20);
    let doc1 = c.database(&names[1]).collection::<Document>("items").find_one(doc! {"_id": 3}).await.unwrap().unwrap();
    assert_eq!(doc1, doc! {"_id": 3, "color": "red", "first": "Item", "last": "3 of 1"});
    let untouched =
        c.database(&names[2]).collection::<Document>("items").find_one(doc! {"_id": 3}).await.unwrap().unwrap();
    assert_eq!(untouched, doc! {"_id": 3, "name": "Item 3 of 2"});

    let o = run(&["validate"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(json(&o)["tenants"][0]["result"][0]["passed"], true);

    let o = run(&["down", "--batch"]);
    assert!(o.status.success(), "{}", text(&o));
    let restored =
        c.database(&names[1]).collection::<Document>("items").find_one(doc! {"_id": 3}).await.unwrap().unwrap();
    assert_eq!(restored, doc! {"_id": 3, "name": "Item 3 of 1"});
    let o = run(&["status"]);
    assert_eq!(json(&o)["tenants"][1]["result"][1]["standing"], "pending");

    // Human output names tenants and migrations.
    let o = cli(&["status", "--dir", d, "--tenant", &names[0]], &[("DBSHIFT_MONGODB_URI", &uri)]);
    let t = text(&o);
    assert!(t.contains(&names[0]) && t.contains("pending") && t.contains("20250102000000_split_names"), "{t}");
}

#[tokio::test]
async fn malformed_files_exit_2_with_path_and_line_and_touch_nothing() {
    let names = tenants("cli_bad", 1).await;
    let dir = migrations(&[
        ("20250101000000_ok.yaml", ADD),
        ("20250102000000_bad.yaml", "up:\n  - addField: { collection: items, field: color }\n"),
        ("notes.yaml", "up: []\n"),
    ]);
    let d = dir.path().to_str().unwrap();
    let o = cli(&["lint", "--dir", d], &[]);
    assert_eq!(o.status.code(), Some(2));
    let t = text(&o);
    assert!(t.contains("20250102000000_bad.yaml:2:") && t.contains("missing field `value`"), "{t}");
    assert!(t.contains("notes.yaml: file name must be <version>_<slug>.yaml"), "{t}");
    let o = cli(&["up", "--dir", d, "--tenant", &names[0]], &[("DBSHIFT_MONGODB_URI", &uri())]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let c = client().await;
    let colls = c.database(&names[0]).list_collection_names().await.unwrap();
    assert_eq!(colls, vec!["items".to_string()], "nothing touched");
}

#[tokio::test]
async fn new_scaffolds_a_file_that_lints_once_filled_in() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("migrations");
    let o = cli(&["new", "add_preferences", "--dir", d.to_str().unwrap(), "--author", "ann"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let files: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert_eq!(files.len(), 1);
    let schema: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("migration.schema.json")).unwrap()).unwrap();
    assert_eq!(schema["title"], "dbshift migration", "editors find the schema the scaffold points at");
    let name = files[0].file_name().unwrap().to_string_lossy().to_string();
    assert!(
        name.ends_with("_add_preferences.yaml") && name.len() == "20250101000000_add_preferences.yaml".len(),
        "{name}"
    );
    let o = cli(&["lint", "--dir", d.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2), "an unedited scaffold has no operations: {}", text(&o));
    assert!(text(&o).contains("`up` must list at least one operation"), "{}", text(&o));
    let body = std::fs::read_to_string(&files[0])
        .unwrap()
        .replace("up: []", "up:\n  - addField: { collection: users, field: prefs, value: {} }");
    std::fs::write(&files[0], body).unwrap();
    let o = cli(&["lint", "--dir", d.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let o = cli(&["new", "Bad Slug", "--dir", d.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2));
}

#[tokio::test]
async fn the_uri_password_never_appears_in_output() {
    let dir = migrations(&[("20250101000000_add_color.yaml", ADD)]);
    let d = dir.path().to_str().unwrap();
    // The URI can come from a mounted file, as in a Job.
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), format!("{}\n", uri())).unwrap();
    let o = cli(&["lint", "--dir", d], &[]);
    assert!(o.status.success());
    let o = cli(
        &["status", "--dir", d, "--tenant", "cli_urifile"],
        &[("DBSHIFT_MONGODB_URI_FILE", f.path().to_str().unwrap())],
    );
    assert!(o.status.success(), "{}", text(&o));
    // Unreachable: exit 3 with the host named, the password not.
    let bad = "mongodb://app:S3cr3tPa55@127.0.0.1:1/shop";
    let o = cli(&["status", "--dir", d, "--connect-timeout", "1"], &[("DBSHIFT_MONGODB_URI", bad)]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("cannot reach MongoDB at 127.0.0.1:1"), "{t}");
    assert!(!t.contains("S3cr3tPa55") && !t.contains("app:"), "{t}");
    // Reachable server, credentials it does not accept: still never printed, in any format.
    let port = uri().rsplit(':').next().unwrap().to_string();
    let with_pw = format!("mongodb://app:S3cr3tPa55@127.0.0.1:{port}/shop");
    for fmt in ["human", "json"] {
        for cmd in ["status", "up", "validate"] {
            let o = cli(
                &[cmd, "--dir", d, "--output", fmt, "--connect-timeout", "2"],
                &[("DBSHIFT_MONGODB_URI", &with_pw), ("DBSHIFT_LOG", "debug")],
            );
            let t = text(&o);
            assert!(!t.contains("S3cr3tPa55"), "{cmd} {fmt}: {t}");
        }
    }
    // A malformed URI is reported without echoing it.
    let o = cli(&["status", "--dir", d], &[("DBSHIFT_MONGODB_URI", "mongodb://app:S3cr3tPa55@/?badopt=%%")]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(!text(&o).contains("S3cr3tPa55"), "{}", text(&o));
    // Passwords no parser expects: never a panic, never printed, in any form.
    for (pw, forms) in [
        ("Sup3r%€pw", vec!["Sup3r%€pw", "Sup3r%25%E2%82%ACpw"]),
        ("a%2Fb%3Ac%22d%5C", vec!["a/b:c\"d\\", "a%2Fb%3Ac%22d%5C"]),
        ("pa@ss?w:rd", vec!["pa@ss?w:rd"]),
        ("%F0%9F%94%91k3y", vec!["🔑k3y", "%F0%9F%94%91k3y"]),
    ] {
        for (uri, code) in [
            (format!("mongodb://app:{pw}@127.0.0.1:{port}/shop?tlsCertificateKeyFilePassword=T0pK3y"), None),
            // (mongodb+srv:// is covered by the redactor's unit tests: it would need DNS.)
            (format!("mongodb://app:{pw}@127.0.0.1:1/shop"), Some(3)),
        ] {
            for fmt in ["human", "json"] {
                let o = cli(
                    &["status", "--dir", d, "--output", fmt, "--connect-timeout", "1"],
                    &[("DBSHIFT_MONGODB_URI", &uri), ("DBSHIFT_LOG", "debug")],
                );
                let t = text(&o);
                assert_ne!(o.status.code(), Some(101), "{uri}: a panic: {t}");
                assert!(
                    o.status.code().is_some()
                        && (code.is_none() || o.status.code() == code || o.status.code() == Some(2)),
                    "{uri}: {t}"
                );
                for f in &forms {
                    assert!(!t.contains(f), "{uri} {fmt}: {f} in {t}");
                }
                assert!(!t.contains("T0pK3y"), "{uri} {fmt}: {t}");
            }
        }
    }
}

#[tokio::test]
async fn run_writes_a_compact_result_like_a_job() {
    let names = tenants("cli_run", 1).await;
    let dir = migrations(&[("20250101000000_add_color.yaml", ADD), ("20250102000000_split_names.yaml", SPLIT)]);
    let out = tempfile::tempdir().unwrap();
    let result = out.path().join("termination-log");
    let env = |extra: &[(&'static str, String)]| -> Vec<(String, String)> {
        let mut v = vec![
            ("DBSHIFT_MONGODB_URI".to_string(), uri()),
            ("DBSHIFT_TENANT".to_string(), names[0].clone()),
            ("DBSHIFT_DIR".to_string(), dir.path().display().to_string()),
            ("DBSHIFT_RESULT_FILE".to_string(), result.display().to_string()),
            ("DBSHIFT_RUN_ID".to_string(), "op-run-1".to_string()),
        ];
        v.extend(extra.iter().map(|(k, val)| (k.to_string(), val.clone())));
        v
    };
    let go =
        |e: Vec<(String, String)>| cli(&["run"], &e.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>());

    let o = go(env(&[("DBSHIFT_TARGET", "20250101000000".into())]));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap();
    assert_eq!(
        (r["ok"].as_bool(), r["to"].as_str(), r["checks"][0].as_u64(), r["checks"][1].as_u64()),
        (Some(true), Some("20250101000000"), Some(1), Some(1))
    );
    assert_eq!(r["done"][0][0], "20250101000000_add_color");
    assert_eq!(r["done"][0][2], 20);
    // Latest, then a target below the current version rolls back.
    assert_eq!(go(env(&[])).status.code(), Some(0));
    let o = go(env(&[("DBSHIFT_TARGET", "20250101000000".into())]));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap();
    assert_eq!(
        (r["dir"].as_str(), r["from"].as_str(), r["to"].as_str()),
        (Some("down"), Some("20250102000000"), Some("20250101000000"))
    );
    // Roll back everything this run id applied.
    let o = go(env(&[("DBSHIFT_ROLLBACK_RUN", "op-run-1".into())]));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let c = client().await;
    assert_eq!(
        c.database(&names[0])
            .collection::<Document>("items")
            .count_documents(doc! {"color": {"$exists": true}})
            .await
            .unwrap(),
        0
    );
    // A failing run: exit 1, and the reason in the result.
    std::fs::write(
        dir.path().join("20250103000000_fail.yaml"),
        "up:\n  - convertType: { collection: items, field: first, to: int }\n",
    )
    .unwrap();
    let o = go(env(&[]));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap();
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("cannot be converted to int"), "{r}");
    let last_line = String::from_utf8_lossy(&o.stdout).lines().last().unwrap().to_string();
    assert_eq!(serde_json::from_str::<Value>(&last_line).unwrap(), r, "stdout ends with the same result");
}

#[tokio::test]
async fn changed_files_and_held_locks_have_their_own_exit_codes() {
    let names = tenants("cli_codes", 1).await;
    let dir = migrations(&[("20250101000000_add_color.yaml", ADD)]);
    let d = dir.path().to_str().unwrap();
    let mongo = uri();
    let env = [("DBSHIFT_MONGODB_URI", mongo.as_str())];
    assert!(cli(&["up", "--dir", d, "--tenant", &names[0]], &env).status.success());
    std::fs::write(dir.path().join("20250101000000_add_color.yaml"), ADD.replace("red", "blue")).unwrap();
    let o = cli(&["up", "--dir", d, "--tenant", &names[0]], &env);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("--allow-changed"), "{}", text(&o));
    let o = cli(&["status", "--dir", d, "--tenant", &names[0]], &env);
    assert!(text(&o).contains("changed"), "{}", text(&o));
    // Someone else holds the lock.
    let c = client().await;
    let until = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() + 600_000);
    c.database(&names[0])
        .collection::<Document>("_dbshift_lock")
        .insert_one(doc! {"_id": "migrations", "owner": "pod-7/1", "run": "r9", "expiresAt": until})
        .await
        .unwrap();
    std::fs::write(
        dir.path().join("20250102000000_more.yaml"),
        "up:\n  - addField: { collection: items, field: size, value: 1 }\n",
    )
    .unwrap();
    let o = cli(&["up", "--dir", d, "--tenant", &names[0], "--allow-changed", "--lock-wait", "0"], &env);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(text(&o).contains("pod-7/1"), "{}", text(&o));
    // Waiting a little gives up just the same once the wait is over, and says who holds it.
    let t0 = std::time::Instant::now();
    let o = cli(&["up", "--dir", d, "--tenant", &names[0], "--allow-changed", "--lock-wait", "2s"], &env);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(text(&o).contains("pod-7/1"), "{}", text(&o));
    assert!(t0.elapsed() >= std::time::Duration::from_secs(2), "it waited before giving up");
}

#[tokio::test]
async fn backup_and_restore_from_the_command_line() {
    let names = tenants("cli_backup", 2).await;
    let out = tempfile::tempdir().unwrap();
    let o_dir = out.path().join("snap");
    let mongo = uri();
    let env = [("DBSHIFT_MONGODB_URI", mongo.as_str())];
    let tenants_arg = names.join(",");
    let o = cli(&["backup", "--out", o_dir.to_str().unwrap(), "--tenant", &tenants_arg, "--gzip"], &env);
    assert!(o.status.success(), "{}", text(&o));
    let c = client().await;
    let before: Vec<Vec<Document>> = futures::future::join_all(names.iter().map(|n| {
        let db = c.database(n);
        async move { dump(&db, "items").await }
    }))
    .await;
    for n in &names {
        c.database(n).collection::<Document>("items").delete_many(doc! {}).await.unwrap();
    }
    let o = cli(&["restore", "--from", o_dir.to_str().unwrap(), "--output", "json"], &env);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(json(&o)["tenants"][0]["result"]["collections"][0]["verified"], true);
    for (n, b) in names.iter().zip(before) {
        assert_eq!(dump(&c.database(n), "items").await, b);
    }
}

/// `up --backup`: each tenant it changes is snapshotted first (the runner's own hook), a tenant
/// with nothing to do is not, the snapshot restores the data as it was before, retention keeps
/// the newest, and a destination that cannot be is refused before anything changes.
#[tokio::test]
async fn up_with_backup_snapshots_each_tenant_it_changes() {
    let names = tenants("cli_upbackup", 3).await;
    let c = client().await;
    let mongo = uri();
    let env = [("DBSHIFT_MONGODB_URI", mongo.as_str())];
    let dir = migrations(&[("20250101000000_add_color.yaml", ADD)]);
    let d = dir.path().to_str().unwrap();
    let store = unique("snaps_upb");
    let dest = format!("database:{store}");
    let (t0, t1, t2) = (&names[0], &names[1], &names[2]);
    let two = format!("{t0},{t1}");

    // A destination that cannot be: refused, nothing read or changed.
    let before: Vec<Document> = dump(&c.database(t0), "items").await;
    for bad in ["s3://bucket", "dir:/does/not/exist", "database:no/slash"] {
        let o = cli(&["up", "--dir", d, "--tenant", &two, "--backup", bad], &env);
        assert_eq!(o.status.code(), Some(2), "--backup {bad}: {}", text(&o));
        assert_eq!(dump(&c.database(t0), "items").await, before, "--backup {bad} changed nothing");
        assert!(dump(&c.database(t0), "_dbshift_migrations").await.is_empty());
    }

    // t1 is migrated without a snapshot; then t0 and t1 with one: only t0 changes, so only t0
    // is snapshotted.
    let o = cli(&["up", "--dir", d, "--tenant", t1], &env);
    assert!(o.status.success(), "{}", text(&o));
    let o = cli(&["up", "--dir", d, "--tenant", &two, "--backup", &dest, "--output", "json"], &env);
    assert!(o.status.success(), "{}", text(&o));
    let j = json(&o);
    let by_tenant = |t: &str| j["tenants"].as_array().unwrap().iter().find(|x| x["tenant"] == t).cloned().unwrap();
    let at = by_tenant(t0)["result"]["snapshot"].as_str().expect("t0 snapshotted").to_string();
    assert!(at.starts_with(&format!("database:{store}/")), "{at}");
    assert!(by_tenant(t1)["result"].get("snapshot").is_none(), "nothing to do: no snapshot");
    let listed = cli(&["snapshots", "--database", &store, "--output", "json"], &env);
    let snaps = json(&listed)["snapshots"].as_array().unwrap().clone();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0]["tenant"], t0.as_str());
    assert_ne!(dump(&c.database(t0), "items").await, before, "migrated");

    // The snapshot holds t0 as it was before the migration.
    let o = cli(&["restore", "--from-database", &store, "--tenant", t0, "--collection", "items"], &env);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(dump(&c.database(t0), "items").await, before, "restored exactly");

    // Retention: two more changing runs of t2 with --backup-retention 1 keep its newest only.
    let o = cli(&["up", "--dir", d, "--tenant", t2, "--backup", &dest, "--backup-retention", "1"], &env);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("snapshot taken before the change"), "{}", text(&o));
    let o = cli(&["down", "--dir", d, "--tenant", t2, "--to", "0"], &env);
    assert!(o.status.success(), "{}", text(&o));
    // A plan of t2, which has work again, takes none.
    let t2_snapshots = || {
        let listed = cli(&["snapshots", "--database", &store, "--tenant", t2, "--output", "json"], &env);
        json(&listed)["snapshots"].as_array().unwrap().iter().map(|s| s["id"].to_string()).collect::<Vec<_>>()
    };
    let first = t2_snapshots();
    assert_eq!(first.len(), 1, "{first:?}");
    let o = cli(&["plan", "--dir", d, "--tenant", t2, "--backup", &dest], &env);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("add_color"), "the plan has work: {}", text(&o));
    assert_eq!(t2_snapshots(), first, "a plan takes no snapshot");
    let o = cli(&["up", "--dir", d, "--tenant", t2, "--backup", &dest, "--backup-retention", "1"], &env);
    assert!(o.status.success(), "{}", text(&o));
    let now = t2_snapshots();
    assert_eq!(now.len(), 1, "retention 1 keeps one: {now:?}");
    assert_ne!(now, first, "the newest is kept");
    let listed = cli(&["snapshots", "--database", &store, "--output", "json"], &env);
    assert_eq!(json(&listed)["snapshots"].as_array().unwrap().len(), 2, "{}", text(&listed));
}

/// Risk lint: a risky step warns with its code and what to do (exit 0); `--strict` fails on it
/// (exit 2); acknowledging it in the file quiets it without changing the migration's checksum.
#[tokio::test]
async fn lint_warns_about_risky_steps_and_strict_fails_until_acknowledged() {
    let risky =
        "up:\n  - dropCollection: { collection: legacy }\n  - addField: { collection: items, field: f, value: 1 }\n";
    let dir = migrations(&[("20250101000000_drop_legacy.yaml", risky)]);
    let d = dir.path().to_str().unwrap();
    let o = cli(&["lint", "--dir", d], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("warn DS001 step 1 (dropCollection legacy)"), "{t}");
    assert!(t.contains("acknowledge it: { code: DS001, step: 1, reason: ... }"), "{t}");
    let checksum = |o: &std::process::Output| json(o)["migrations"][0]["checksum"].as_str().unwrap().to_string();
    let before = cli(&["lint", "--dir", d, "--output", "json"], &[]);
    assert_eq!(json(&before)["migrations"][0]["warnings"][0]["code"], "DS001");
    let o = cli(&["lint", "--dir", d, "--strict"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("1 risk warning(s) not acknowledged (--strict)"), "{}", text(&o));

    let path = dir.path().join("20250101000000_drop_legacy.yaml");
    let acked =
        format!("{risky}acknowledge:\n  - {{ code: DS001, step: 1, reason: \"legacy is empty since 2024\" }}\n");
    std::fs::write(&path, acked).unwrap();
    let o = cli(&["lint", "--dir", d, "--strict"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("acknowledged DS001 step 1 (dropCollection legacy)"), "{}", text(&o));
    let after = cli(&["lint", "--dir", d, "--output", "json"], &[]);
    assert_eq!(checksum(&after), checksum(&before), "acknowledging changed the checksum");

    // An acknowledgement of a step that is not there is invalid input.
    let wrong = format!("{risky}acknowledge:\n  - {{ code: DS001, step: 7, reason: r }}\n");
    std::fs::write(&path, wrong).unwrap();
    let o = cli(&["lint", "--dir", d], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("step 7 is not a step of `up` (1 to 2)"), "{}", text(&o));
}

/// Pre-checks run before the lock and the snapshot: `plan` and `status` show them, `up` leaves a
/// tenant that fails one exactly as it was (no tracking record, no lock, no snapshot) and fails
/// it (exit 1), or skips it with `onPrecheckFailure: skip` (exit 0); the others migrate.
#[tokio::test]
async fn a_tenant_failing_a_precheck_is_left_untouched_and_failed_or_skipped() {
    let names = tenants("cli_pre", 2).await;
    let c = client().await;
    // Tenant 1's codes repeat: a unique index on them cannot be built there.
    for (i, name) in names.iter().enumerate() {
        let items = c.database(name).collection::<Document>("items");
        for j in 0..20 {
            let code = if i == 1 && j >= 18 { "dup".to_string() } else { format!("c{j}") };
            items.update_one(doc! {"_id": j}, doc! {"$set": {"code": code}}).await.unwrap();
        }
    }
    let file = |policy: &str| {
        format!(
            "up:\n  - addField: {{ collection: items, field: color, value: red }}\n  - createIndex: {{ collection: items, keys: {{ code: 1 }}, unique: true }}\nprecheck:\n  - unique: {{ collection: items, keys: {{ code: 1 }} }}\n  - count: {{ collection: items, min: 1 }}\n{policy}"
        )
    };
    let dir = migrations(&[("20250101000000_unique_codes.yaml", &file(""))]);
    let d = dir.path().to_str().unwrap();
    let mongo = uri();
    let env = [("DBSHIFT_MONGODB_URI", mongo.as_str())];
    let tenant_args = ["--tenant", &names[0], "--tenant", &names[1]];
    let before = dump_db(&c.database(&names[1])).await;

    let lint = cli(&["lint", "--dir", d], &[]);
    assert!(!text(&lint).contains("DS004"), "the unique pre-check answers the warning: {}", text(&lint));
    let o = cli(&[&["plan", "--dir", d][..], &tenant_args].concat(), &env);
    let t = text(&o);
    assert!(
        t.contains(&format!("{}: pre-check unique of 20250101000000_unique_codes on items: passed", names[0])),
        "{t}"
    );
    assert!(
        t.contains(&format!(
            "{}: pre-check unique of 20250101000000_unique_codes on items: FAILED - 1 value(s) of code repeat",
            names[1]
        )),
        "{t}"
    );
    let o = cli(&[&["status", "--dir", d][..], &tenant_args].concat(), &env);
    assert!(text(&o).contains("pre-check unique on items: FAILED"), "{}", text(&o));

    let o = cli(&[&["up", "--dir", d][..], &tenant_args].concat(), &env);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains(&format!("{}: FAILED: pre-check unique of 20250101000000_unique_codes on items failed", names[1])),
        "{t}"
    );
    assert!(t.contains("the tenant is untouched"), "{t}");
    assert_eq!(dump_db(&c.database(&names[1])).await, before, "the failing tenant was changed");
    let colls = c.database(&names[1]).list_collection_names().await.unwrap();
    assert_eq!(colls, vec!["items".to_string()], "no tracking, lock or rollback data on it");
    let migrated = dump(&c.database(&names[0]), "items").await;
    assert!(migrated.iter().all(|d| d.get_str("color") == Ok("red")), "the passing tenant migrated");

    std::fs::write(dir.path().join("20250101000000_unique_codes.yaml"), file("onPrecheckFailure: skip\n")).unwrap();
    let o = cli(&[&["up", "--dir", d, "--output", "json"][..], &tenant_args].concat(), &env);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j = json(&o);
    let t1 = &j["tenants"][1];
    assert_eq!(t1["result"]["skipped"], true, "{j}");
    assert_eq!(t1["result"]["prechecks"][0]["passed"], false, "{j}");
    assert_eq!(dump_db(&c.database(&names[1])).await, before, "the skipped tenant was changed");
    let o = cli(&[&["up", "--dir", d][..], &tenant_args].concat(), &env);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    let skipped =
        format!("{}: SKIPPED (onPrecheckFailure: skip): pre-check unique of 20250101000000_unique_codes", names[1]);
    assert!(t.contains(&skipped), "{t}");
    assert!(t.contains("2 tenant(s): 1 ok, 0 failed, 1 skipped by pre-checks"), "{t}");
}

/// A database migrated by other means: `baseline --to` records the migrations up to there as
/// `baselined` without touching data, `up` applies only the later ones, and `down` never undoes
/// a baselined migration.
#[tokio::test]
async fn baseline_records_without_changing_and_down_never_undoes_it() {
    let names = tenants("cli_base", 1).await;
    let t = &names[0];
    let c = client().await;
    let items = c.database(t).collection::<Document>("items");
    // What the first two migrations do, done by hand (another tool, a script).
    items.update_many(doc! {}, doc! {"$set": {"color": "red"}}).await.unwrap();
    let index = mongodb::IndexModel::builder().keys(doc! {"name": 1}).build();
    items.create_index(index).await.unwrap();
    let dir = migrations(&[
        ("20250101000000_add_color.yaml", ADD),
        ("20250102000000_name_index.yaml", "up:\n  - createIndex: { collection: items, keys: { name: 1 } }\n"),
        ("20250103000000_add_size.yaml", "up:\n  - addField: { collection: items, field: size, value: 1 }\n"),
    ]);
    let d = dir.path().to_str().unwrap();
    let mongo = uri();
    let env = [("DBSHIFT_MONGODB_URI", mongo.as_str())];
    let before = dump(&c.database(t), "items").await;

    let o = cli(&["baseline", "--to", "20250102000000", "--dir", d, "--tenant", t], &env);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o)
            .contains(&format!("{t}: baselined 2 migration(s): 20250101000000_add_color, 20250102000000_name_index")),
        "{}",
        text(&o)
    );
    assert_eq!(dump(&c.database(t), "items").await, before, "baseline changed data");
    let o = cli(&["status", "--dir", d, "--tenant", t], &env);
    assert!(text(&o).contains(&format!("{t}: 0 applied, 2 baselined, 1 pending")), "{}", text(&o));
    let o = cli(&["baseline", "--to", "20250102000000", "--dir", d, "--tenant", t], &env);
    assert!(text(&o).contains("nothing to baseline"), "{}", text(&o));

    let o = cli(&["up", "--dir", d, "--tenant", t], &env);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("applied 20250103000000_add_size") && !out.contains("applied 20250101000000"), "{out}");
    let o = cli(&["down", "--to", "0", "--dir", d, "--tenant", t], &env);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(dump(&c.database(t), "items").await, before, "down undid more than the applied migration");
    let o = cli(&["down", "--only", "20250101000000", "--dir", d, "--tenant", t], &env);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("is baselined"), "{}", text(&o));
    let o = cli(&["baseline", "--to", "20991231000000", "--dir", d, "--tenant", t], &env);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

/// `import migrate-mongo`: the changelog's files map to dbshift migrations by timestamp or by a
/// mapping file and are recorded as baselined; a file that maps to nothing records nothing.
#[tokio::test]
async fn import_migrate_mongo_baselines_what_its_changelog_lists() {
    let names = tenants("cli_import", 1).await;
    let t = &names[0];
    let c = client().await;
    let changelog = c.database(t).collection::<Document>("changelog");
    let applied = bson::DateTime::from_millis(1_700_000_000_000);
    changelog
        .insert_many([
            doc! {"fileName": "20250101000000-add-color.js", "appliedAt": applied, "migrationBlock": 1},
            doc! {"fileName": "20240301120000-index-names.js", "appliedAt": applied, "migrationBlock": 1},
        ])
        .await
        .unwrap();
    let dir = migrations(&[
        ("20250101000000_add_color.yaml", ADD),
        ("20250102000000_name_index.yaml", "up:\n  - createIndex: { collection: items, keys: { name: 1 } }\n"),
        ("20250103000000_add_size.yaml", "up:\n  - addField: { collection: items, field: size, value: 1 }\n"),
    ]);
    let d = dir.path().to_str().unwrap();
    let mongo = uri();
    let env = [("DBSHIFT_MONGODB_URI", mongo.as_str())];

    let o = cli(&["import", "migrate-mongo", "--dir", d, "--tenant", t], &env);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("1 migrate-mongo file(s) map to no dbshift migration, so nothing was recorded: 20240301120000-index-names.js"), "{}", text(&o));
    assert!(!c.database(t).list_collection_names().await.unwrap().contains(&"_dbshift_migrations".to_string()));

    let elsewhere = tempfile::tempdir().unwrap();
    let mapping = elsewhere.path().join("mapping.yaml");
    std::fs::write(&mapping, "20240301120000-index-names.js: 20250102000000_name_index\n").unwrap();
    let m = mapping.to_str().unwrap();
    let o = cli(&["import", "migrate-mongo", "--mapping", m, "--dir", d, "--tenant", t], &env);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(&format!("{t}: imported 2 migration(s) as baselined")), "{}", text(&o));
    let o = cli(&["status", "--dir", d, "--tenant", t], &env);
    assert!(text(&o).contains(&format!("{t}: 0 applied, 2 baselined, 1 pending")), "{}", text(&o));
    // A mapping to a migration that does not exist is refused before anything is read.
    std::fs::write(&mapping, "x.js: 20990101000000\n").unwrap();
    let o = cli(&["import", "migrate-mongo", "--mapping", m, "--dir", d, "--tenant", t], &env);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

/// `dbshift run` with `DBSHIFT_BASELINE` (what `spec.tenants.baseline` sets): a tenant with no
/// tracking record is baselined to that version and gets only the later migrations; a tenant
/// that has records is migrated as usual, replaying nothing it lacks.
#[tokio::test]
async fn a_new_tenant_is_baselined_before_it_is_migrated_and_an_old_one_is_not() {
    let names = tenants("cli_newbase", 2).await;
    let c = client().await;
    let dir = migrations(&[
        ("20250101000000_add_color.yaml", ADD),
        ("20250102000000_add_size.yaml", "up:\n  - addField: { collection: items, field: size, value: 1 }\n"),
    ]);
    let d = dir.path().to_str().unwrap();
    let uri = uri();
    // Tenant 1 has a history: the first migration, applied by dbshift.
    let o = cli(&["up", "--to", "20250101000000", "--dir", d, "--tenant", &names[1]], &[("DBSHIFT_MONGODB_URI", &uri)]);
    assert!(o.status.success(), "{}", text(&o));
    // Tenant 0 was created from the current schema... minus what migration 1 would add: the
    // baseline says it has it, so it is not replayed.
    for t in &names {
        let o = cli(
            &["run"],
            &[
                ("DBSHIFT_MONGODB_URI", &uri),
                ("DBSHIFT_TENANT", t),
                ("DBSHIFT_DIR", d),
                ("DBSHIFT_BASELINE", "20250101000000"),
                ("DBSHIFT_RESULT_FILE", "/nonexistent/result"),
            ],
        );
        assert!(o.status.success(), "{t}: {}", text(&o));
    }
    let states = |docs: Vec<Document>| -> Vec<(String, String)> {
        docs.iter().map(|r| (r.get_str("_id").unwrap().to_string(), r.get_str("state").unwrap().to_string())).collect()
    };
    let new = states(dump(&c.database(&names[0]), "_dbshift_migrations").await);
    assert_eq!(
        new,
        [
            ("20250101000000_add_color".to_string(), "baselined".to_string()),
            ("20250102000000_add_size".to_string(), "applied".to_string())
        ]
    );
    let items = dump(&c.database(&names[0]), "items").await;
    assert!(items.iter().all(|d| d.get("color").is_none() && d.get_i32("size") == Ok(1)), "replayed: {items:?}");
    let old = states(dump(&c.database(&names[1]), "_dbshift_migrations").await);
    assert!(old.iter().all(|(_, s)| s == "applied") && old.len() == 2, "{old:?}");

    // A dry run on a new tenant plans only what comes after the baseline, and writes nothing.
    let fresh = tenants("cli_newbase_dry", 1).await;
    let o = cli(
        &["run", "--output", "json"],
        &[
            ("DBSHIFT_MONGODB_URI", &uri),
            ("DBSHIFT_TENANT", &fresh[0]),
            ("DBSHIFT_DIR", d),
            ("DBSHIFT_BASELINE", "20250101000000"),
            ("DBSHIFT_DRY_RUN", "true"),
            ("DBSHIFT_RESULT_FILE", "/nonexistent/result"),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let colls = c.database(&fresh[0]).list_collection_names().await.unwrap();
    assert_eq!(colls, vec!["items".to_string()], "a dry run wrote: {}", text(&o));
}

/// `status --schema`: after `up` the indexes and validators match what the migrations left
/// (exit 0); changed by hand, each difference is listed, missing, extra or changed (exit 1).
#[tokio::test]
async fn status_schema_lists_indexes_and_validators_that_drifted() {
    let names = tenants("cli_drift", 1).await;
    let t = &names[0];
    let c = client().await;
    let dir = migrations(&[
        (
            "20250101000000_index.yaml",
            "up:\n  - createIndex: { collection: items, keys: { name: 1 }, name: name_unique, unique: true }\n",
        ),
        (
            "20250102000000_validator.yaml",
            "up:\n  - setValidator: { collection: items, jsonSchema: { required: [name] } }\n",
        ),
    ]);
    let d = dir.path().to_str().unwrap();
    let mongo = uri();
    let env = [("DBSHIFT_MONGODB_URI", mongo.as_str())];
    let o = cli(&["up", "--dir", d, "--tenant", t], &env);
    assert!(o.status.success(), "{}", text(&o));
    let o = cli(&["status", "--schema", "--dir", d, "--tenant", t], &env);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(&format!("{t}: schema as the applied migrations left it")), "{}", text(&o));

    // By hand, behind dbshift's back: the unique index dropped, another added, the validator loosened.
    let db = c.database(t);
    db.run_command(doc! {"dropIndexes": "items", "index": "name_unique"}).await.unwrap();
    db.collection::<Document>("items")
        .create_index(mongodb::IndexModel::builder().keys(doc! {"color": 1}).build())
        .await
        .unwrap();
    db.run_command(doc! {"collMod": "items", "validator": {"$jsonSchema": {"required": ["color"]}}}).await.unwrap();
    let o = cli(&["status", "--schema", "--dir", d, "--tenant", t], &env);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = text(&o);
    for line in [
        format!("{t}: drift: missing index name_unique on items (set by 20250101000000_index)"),
        format!("{t}: drift: extra index color_1 on items (no migration made it)"),
        format!("{t}: drift: changed validator on items (set by 20250102000000_validator)"),
    ] {
        assert!(out.contains(&line), "no {line:?} in:\n{out}");
    }
    let o = cli(&["status", "--schema", "--output", "json", "--dir", d, "--tenant", t], &env);
    let j = json(&o);
    assert_eq!(j["tenants"][0]["result"]["drift"].as_array().unwrap().len(), 3, "{j}");
    assert_eq!(j["ok"], false);
}
