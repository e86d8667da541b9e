//! Hostile and careless input: each case gets a specific error naming what to fix (exit 2),
//! never a panic or a hang, and no database changes. (URI passwords no parser expects are in
//! tests/cli.rs, `the_uri_password_never_appears_in_output`.)

mod common;

use bson::{doc, Document};
use common::*;

const ADD: &str = "up:\n  - addField: { collection: items, field: color, value: red }\n";

/// The databases a command could have written to, and what they hold.
async fn databases() -> Vec<String> {
    let mut names = client().await.list_database_names().await.unwrap();
    names.sort();
    names
}

#[tokio::test]
async fn system_databases_are_never_tenants_whichever_way_they_are_named() {
    let dir = migrations(&[("20250101000000_add.yaml", ADD)]);
    let d = dir.path().to_str().unwrap();
    let before = dump_db(&client().await.database("admin")).await;
    for name in ["admin", "config", "local", "dbshift_snapshots"] {
        for cmd in ["up", "status", "down"] {
            let o = cli(&[cmd, "--dir", d, "--tenant", name], &[("DBSHIFT_MONGODB_URI", &uri())]);
            assert_eq!(o.status.code(), Some(2), "{cmd} --tenant {name}: {}", text(&o));
            assert!(text(&o).contains("is never a tenant"), "{cmd} --tenant {name}: {}", text(&o));
        }
        // Named by the URI.
        let by_uri = format!("{}/{name}", uri().trim_end_matches('/'));
        let o = cli(&["up", "--dir", d], &[("DBSHIFT_MONGODB_URI", &by_uri)]);
        assert_eq!(o.status.code(), Some(2), "URI naming {name}: {}", text(&o));
        assert!(text(&o).contains("is never a tenant"), "{}", text(&o));
        // As a Job would run it.
        let o = cli(&["run"], &[("DBSHIFT_MONGODB_URI", &uri()), ("DBSHIFT_TENANT", name), ("DBSHIFT_DIR", d)]);
        assert_eq!(o.status.code(), Some(2), "run {name}: {}", text(&o));
        assert!(text(&o).contains("is never a tenant"), "{}", text(&o));
        // And restored into.
        let out = tempfile::tempdir().unwrap();
        let o = cli(
            &["restore", "--from", out.path().to_str().unwrap(), "--tenant", name],
            &[("DBSHIFT_MONGODB_URI", &uri())],
        );
        assert_eq!(o.status.code(), Some(2), "restore into {name}: {}", text(&o));
    }
    assert_eq!(dump_db(&client().await.database("admin")).await, before, "admin changed");
    let c = client().await;
    for name in ["config", "local", "dbshift_snapshots"] {
        let colls = c.database(name).list_collection_names().await.unwrap();
        assert!(!colls.iter().any(|n| n.starts_with("_dbshift")), "{name}: {colls:?}");
    }
}

#[tokio::test]
async fn a_check_that_writes_is_refused_before_anything_runs() {
    let db = fresh_db("hostile_out").await;
    db.collection::<Document>("items").insert_one(doc! {"_id": 1}).await.unwrap();
    let target = unique("hostile_stolen");
    for stage in [
        format!("{{ $out: {{ db: {target}, coll: x }} }}"),
        format!("{{ $merge: {{ into: {{ db: {target}, coll: x }} }} }}"),
        format!("{{ $facet: {{ a: [ {{ $match: {{}} }} ], b: [ {{ $out: {target} }} ] }} }}"),
    ] {
        let file = format!(
            "up:\n  - addField: {{ collection: items, field: color, value: red }}\nvalidate:\n  - aggregate: {{ collection: items, pipeline: [ {stage} ] }}\n"
        );
        let dir = migrations(&[("20250101000000_add.yaml", &file)]);
        let d = dir.path().to_str().unwrap();
        let o = cli(&["lint", "--dir", d], &[]);
        assert_eq!(o.status.code(), Some(2), "{stage}: {}", text(&o));
        assert!(text(&o).contains("which writes: checks only read"), "{stage}: {}", text(&o));
        for cmd in ["up", "validate"] {
            let o = cli(&[cmd, "--dir", d, "--tenant", db.name()], &[("DBSHIFT_MONGODB_URI", &uri())]);
            assert_eq!(o.status.code(), Some(2), "{cmd} {stage}: {}", text(&o));
        }
    }
    assert!(!databases().await.contains(&target), "a check wrote to {target}");
    assert_eq!(dump(&db, "items").await, vec![doc! {"_id": 1}], "nothing ran");
}

#[tokio::test]
async fn lint_names_each_bad_number_name_and_script() {
    let db = fresh_db("hostile_lint").await;
    db.collection::<Document>("items").insert_one(doc! {"_id": 1, "name": "a"}).await.unwrap();
    for (file, says) in [
        (
            "up:\n  - transform: { collection: items, batchSize: 2000000000, script: '(d) => d' }\n",
            "`batchSize` must be between 1 and 100000 (it is 2000000000)",
        ),
        (
            "up:\n  - transform: { collection: items, batchSize: 0, script: '(d) => d' }\n",
            "`batchSize` must be between 1",
        ),
        ("up:\n  - addField: { collection: items, field: \"a\\0b\", value: 1 }\n", "contains a NUL character"),
        ("up:\n  - renameField: { collection: items, from: name, to: \"x\\0\" }\n", "contains a NUL character"),
        ("up:\n  - transform: { collection: items, script: '(() => { for (;;) {} })()' }\n", "took longer than 5 s"),
    ]
    .into_iter()
    .map(|(f, s)| (f.to_string(), s))
    .chain([
        // Nested far deeper than any document can be: refused before the YAML parser sees it.
        (
            format!(
                "up:\n  - addField: {{ collection: items, field: a, value: {}{} }}\n",
                "[".repeat(100_000),
                "]".repeat(100_000)
            ),
            "nested deeper than 108 levels",
        ),
        (
            format!(
                "up:\n  - addField:\n{}",
                (0..2000).map(|i| format!("{}k:\n", " ".repeat(4 + i))).collect::<String>()
            ),
            "nested deeper than 108 levels",
        ),
    ]) {
        let file = file.as_str();
        let dir = migrations(&[("20250101000000_bad.yaml", file)]);
        let d = dir.path().to_str().unwrap();
        for args in [vec!["lint", "--dir", d], vec!["up", "--dir", d, "--tenant", db.name()]] {
            let envs = [("DBSHIFT_MONGODB_URI", uri())];
            let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let o = cli(&args, &envs);
            assert_eq!(o.status.code(), Some(2), "{file}: {}", text(&o));
            assert!(text(&o).contains(says), "{file}: {}", text(&o));
            assert!(text(&o).contains("20250101000000_bad.yaml"), "the file is named: {}", text(&o));
        }
    }
    assert_eq!(dump(&db, "items").await, vec![doc! {"_id": 1, "name": "a"}]);
    assert!(!db.list_collection_names().await.unwrap().iter().any(|n| n.starts_with("_dbshift")));
}

/// A transform whose result nests deeper than MongoDB allows fails the step with a clear error
/// (not a stack overflow that aborts the process with the lock held), and nothing changes.
#[tokio::test]
async fn a_transform_returning_too_deep_a_document_fails_cleanly() {
    let db = fresh_db("hostile_deep").await;
    let docs: Vec<Document> = (0..3).map(|i| doc! {"_id": i, "name": "a"}).collect();
    db.collection::<Document>("items").insert_many(docs.clone()).await.unwrap();
    for (levels, says) in [(150, "nested deeper than 100 levels"), (100_000, "step 1 (transform)")] {
        let script = format!(
            "(d) => {{ const o = {{}}; let x = o; for (let i = 0; i < {levels}; i++) {{ x.a = {{}}; x = x.a; }} d.deep = o; return d; }}"
        );
        let file = format!("up:\n  - transform:\n      collection: items\n      script: \"{script}\"\n");
        let dir = migrations(&[("20250101000000_deep.yaml", &file)]);
        let d = dir.path().to_str().unwrap();
        for _ in 0..2 {
            // Twice: the first run released its lock.
            let o =
                cli(&["up", "--dir", d, "--tenant", db.name(), "--lock-wait", "0"], &[("DBSHIFT_MONGODB_URI", &uri())]);
            assert_eq!(o.status.code(), Some(1), "{levels} levels: {}", text(&o));
            assert!(text(&o).contains(says), "{levels} levels: {}", text(&o));
        }
        assert_eq!(dump(&db, "items").await, docs, "{levels} levels");
    }
}

/// Collection names are not paths: a snapshot never writes outside its directory, restore reads
/// them back under their names, and a manifest pointing elsewhere is refused.
#[tokio::test]
async fn collection_names_never_leave_the_snapshot_directory() {
    let db = fresh_db("hostile_paths").await;
    let escape = format!("/tmp/{}", unique("dbshift_escape"));
    let names = [escape.clone(), "x/../../../up".to_string(), "a\\b".to_string(), "%41".to_string()];
    for (i, n) in names.iter().enumerate() {
        db.collection::<Document>(n).insert_one(doc! {"_id": i as i32}).await.unwrap();
    }
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("inner/snap");
    let env = [("DBSHIFT_MONGODB_URI", uri())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let o = cli(&["backup", "--out", out.to_str().unwrap(), "--tenant", db.name()], &env);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!std::path::Path::new(&format!("{escape}.metadata.json")).exists(), "wrote outside the directory");
    let top: Vec<_> = std::fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(top, vec![std::ffi::OsString::from("inner")], "only the snapshot directory was written");
    let files: Vec<String> = std::fs::read_dir(out.join(db.name()).join(db.name()))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(files.iter().any(|f| f == "x%2F..%2F..%2F..%2Fup.bson"), "{files:?}");
    assert!(files.iter().any(|f| f == "%2541.bson"), "{files:?}");

    // Back under their own names, into another tenant.
    let copy = unique("hostile_paths_copy");
    let snap = out.join(db.name());
    let o = cli(&["restore", "--from", snap.to_str().unwrap(), "--tenant", &copy], &env);
    assert!(o.status.success(), "{}", text(&o));
    let restored = client().await.database(&copy);
    for (i, n) in names.iter().enumerate() {
        assert_eq!(dump(&restored, n).await, vec![doc! {"_id": i as i32}], "{n}");
    }

    // A manifest that points a collection at another file is refused, and nothing changes.
    let manifest = snap.join("dbshift-manifest.json");
    let text_before = std::fs::read_to_string(&manifest).unwrap();
    let tampered = text_before.replace("x%2F..%2F..%2F..%2Fup.bson", "../../../../etc/passwd");
    assert_ne!(tampered, text_before);
    std::fs::write(&manifest, tampered).unwrap();
    let before = dump_db(&restored).await;
    let o = cli(&["restore", "--from", snap.to_str().unwrap(), "--tenant", &copy], &env);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("refusing a file outside the snapshot's layout"), "{}", text(&o));
    assert_eq!(dump_db(&restored).await, before);
}

/// The `down` stored in a tracking record can be written by anyone who can write the tenant
/// database: it is checked like a file's, and a `runCommand` in it runs only when the file says
/// the same (or with --trust-stored-down).
#[tokio::test]
async fn a_stored_down_is_checked_and_a_changed_run_command_is_refused() {
    let db = fresh_db("hostile_down").await;
    db.collection::<Document>("items").insert_one(doc! {"_id": 1}).await.unwrap();
    let file =
        "up:\n  - runCommand: { command: { create: made } }\ndown:\n  - runCommand: { command: { drop: made } }\n";
    let dir = migrations(&[("20250101000000_cmd.yaml", file)]);
    let d = dir.path().to_str().unwrap();
    let envs = [("DBSHIFT_MONGODB_URI", uri())];
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--tenant", db.name()]);
        cli(&all, &envs)
    };
    assert_eq!(run(&["up", "--dir", d]).status.code(), Some(0));
    let records = db.collection::<Document>("_dbshift_migrations");
    let tamper = |down: &str| {
        let records = records.clone();
        let down = down.to_string();
        async move {
            let r = records.update_one(doc! {}, doc! {"$set": {"down": down}}).await.unwrap();
            assert_eq!(r.matched_count, 1);
        }
    };
    let collections = || async { db.list_collection_names().await.unwrap() };
    // Another command than the file's.
    tamper(r#"[{"runCommand":{"command":{"create":"pwned"}}}]"#).await;
    for args in [vec!["down", "--dir", d], vec!["down", "--dir", d, "--dry-run"]] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(text(&o).contains("differs from the down in the migration's file"), "{args:?}: {}", text(&o));
    }
    assert!(!collections().await.contains(&"pwned".to_string()));
    // Without the file to compare it with.
    let empty = migrations(&[]);
    let o = run(&["down", "--dir", empty.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("the migration's file (with its down) is not here"), "{}", text(&o));
    // An operation a file could not hold.
    tamper(r#"[{"transform":{"collection":"items","script":"(d) => d","batchSize":0}}]"#).await;
    let o = run(&["down", "--dir", d]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("is refused: down[0] (transform): `batchSize` must be between 1"), "{}", text(&o));
    assert!(collections().await.contains(&"made".to_string()), "nothing was rolled back");
    // Trusted explicitly, the stored command runs as stored.
    tamper(r#"[{"runCommand":{"command":{"create":"pwned"}}}]"#).await;
    assert_eq!(run(&["down", "--dir", d, "--trust-stored-down"]).status.code(), Some(0));
    assert!(collections().await.contains(&"pwned".to_string()));
    // And the file's own down, untouched, runs without the flag.
    assert_eq!(run(&["up", "--dir", d]).status.code(), Some(0));
    assert_eq!(run(&["down", "--dir", d]).status.code(), Some(0));
    assert!(!collections().await.contains(&"made".to_string()));
}

/// A failed check and a duplicate-key error, as a Job reports them: the tenant's values stay in
/// the tenant (status and Events are readable by anyone who may view the resource); `_id`s do
/// not, and the database is as before.
#[tokio::test]
async fn failed_checks_and_duplicate_keys_report_ids_never_values() {
    const SSN: &str = "999-12-3456";
    const EMAIL: &str = "ann.secret@example.com";
    let db = fresh_db("hostile_values").await;
    let people = db.collection::<Document>("people");
    people.insert_one(doc! {"_id": "p-1", "ssn": SSN, "email": EMAIL}).await.unwrap();
    db.run_command(
        doc! {"createIndexes": "people", "indexes": [{"key": {"email": 1}, "name": "email_1", "unique": true}]},
    )
    .await
    .unwrap();
    let before = dump_db(&db).await;
    let check = "up:\n  - addField: { collection: people, field: flag, value: true }\n\
                 validate:\n  - aggregate: { collection: people, pipeline: [ { $match: { ssn: { $exists: true } } } ] }\n";
    let dup = format!(
        "up:\n  - insertDocuments: {{ collection: people, documents: [ {{ _id: p-2, email: \"{EMAIL}\" }} ] }}\n"
    );
    // A script's own error may quote the document: status and results get its kind, the
    // runner's log (stderr) the whole message.
    let thrown =
        "up:\n  - transform: { collection: people, script: \"(d) => { throw new TypeError('no ' + d.email) }\" }\n";
    for (name, file) in [("check", check.to_string()), ("dup", dup), ("thrown", thrown.to_string())] {
        let dir = migrations(&[("20250101000000_m.yaml", &file)]);
        let out = tempfile::tempdir().unwrap();
        let result = out.path().join("termination-log");
        let o = cli(
            &["run"],
            &[
                ("DBSHIFT_MONGODB_URI", &uri()),
                ("DBSHIFT_TENANT", db.name()),
                ("DBSHIFT_DIR", dir.path().to_str().unwrap()),
                ("DBSHIFT_RESULT_FILE", result.to_str().unwrap()),
            ],
        );
        assert_eq!(o.status.code(), Some(1), "{name}: {}", text(&o));
        let r = std::fs::read_to_string(&result).unwrap();
        assert!(!r.contains(SSN) && !r.contains(EMAIL), "{name}: the result carries tenant values: {r}");
        if name == "check" {
            assert!(r.contains("p-1") && r.contains("1 violation"), "{name}: {r}");
        } else if name == "dup" {
            assert!(r.contains("email_1") || r.contains("uplicate"), "{name}: {r}");
        } else {
            assert!(r.contains("_id \\\"p-1\\\": TypeError") && r.contains("values not shown"), "{name}: {r}");
            let log = String::from_utf8_lossy(&o.stderr);
            assert!(log.contains(&format!("no {EMAIL}")), "{name}: the log keeps the whole error: {log}");
        }
        assert_eq!(dump_db(&db).await, before, "{name}: the tenant changed");
    }
}

/// Documents up to MongoDB's 16 MiB limit transform with the defaults, and come back byte for
/// byte: a batch ends at 16 MiB of documents as well as at `batchSize`, the script's heap
/// (256 MiB by default) takes such a batch, and a pre-image too large for one store document
/// is stored in parts. A heap too small for a batch fails with what to change, and nothing
/// changes.
#[tokio::test]
async fn documents_up_to_16_mib_transform_with_defaults_and_come_back() {
    let db = fresh_db("hostile_large").await;
    let coll = db.collection::<Document>("blobs");
    let big = "x".repeat(15 << 20);
    coll.insert_one(doc! {"_id": 0, "body": &big}).await.unwrap();
    let mid = "y".repeat(30 << 10);
    let small: Vec<Document> = (1..=1000).map(|i| doc! {"_id": i, "body": &mid}).collect();
    coll.insert_many(small).await.unwrap();
    let before = dump_bytes(&db, "blobs").await;
    let env = [("DBSHIFT_MONGODB_URI", uri())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    let file = "up:\n  - transform: { collection: blobs, script: \"(d) => { d.body = d.body.toUpperCase(); d.size = d.body.length; return d; }\" }\n";
    let dir = migrations(&[("20250101000000_size.yaml", file)]);
    let d = dir.path().to_str().unwrap();
    let o = cli(&["up", "--dir", d, "--tenant", db.name()], &env);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let sizes: Vec<(i32, i32)> =
        dump(&db, "blobs").await.iter().map(|d| (d.get_i32("_id").unwrap(), d.get_i32("size").unwrap())).collect();
    assert_eq!(sizes.len(), 1001);
    assert_eq!(sizes[0], (0, 15 << 20));
    assert_eq!(sizes[500], (500, 30 << 10));
    assert!(dump(&db, "blobs").await.iter().all(|d| !d.get_str("body").unwrap().contains(['x', 'y'])));
    // The pre-images of the 15 MiB bodies did not fit in one store document: stored in parts.
    let store = db.list_collection_names().await.unwrap().into_iter().find(|n| n.starts_with("_dbshift_rb_")).unwrap();
    let parts = db.collection::<Document>(&store).count_documents(doc! {"cont": {"$exists": true}}).await.unwrap();
    assert!(parts >= 2, "{parts} continuation part(s) in {store}");
    let o = cli(&["down", "--dir", d, "--tenant", db.name()], &env);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(dump_bytes(&db, "blobs").await == before, "not put back byte for byte");

    // A heap too small for a batch: the message says what to change; nothing changed.
    let file = "up:\n  - transform: { collection: blobs, memoryLimit: 16Mi, script: \"(d) => { d.copy = d.body + d.body; return d; }\" }\n";
    let dir = migrations(&[("20250101000000_copy.yaml", file)]);
    let o = cli(&["up", "--dir", dir.path().to_str().unwrap(), "--tenant", db.name()], &env);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("heap") && text(&o).contains("memoryLimit"), "{}", text(&o));
    assert!(dump_bytes(&db, "blobs").await == before, "a failed transform left changes");

    // Out of bounds: refused by lint, naming the range.
    for bad in ["10Mi", "512", "1Ti", "-1Gi"] {
        let file =
            format!("up:\n  - transform: {{ collection: blobs, memoryLimit: \"{bad}\", script: \"(d) => d\" }}\n");
        let dir = migrations(&[("20250101000000_bad.yaml", &file)]);
        let o = cli(&["lint", "--dir", dir.path().to_str().unwrap()], &[]);
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", text(&o));
        assert!(text(&o).contains("memoryLimit") && text(&o).contains("16Mi to 16Gi"), "{bad}: {}", text(&o));
    }
    let o = cli(&["lint", "--dir", d, "--script-memory", "8Mi"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    // The server keeps everything in memory: give it back.
    db.drop().await.unwrap();
}

/// A batch's results live in the tenant databases, where any of their users can write: what
/// the controller reads back is checked (it parses, fits, names this tenant) and anything else
/// is an error naming the document, never a result; a bad `DBSHIFT_BATCH` is refused (exit 2)
/// before anything is touched.
#[tokio::test]
async fn batch_results_and_batches_that_are_not_what_they_claim_are_refused() {
    let c = client().await;
    let db = c.database(&unique("hres"));
    let other = dbshift::job::JobResult { v: 1, tenant: "someone_else".into(), ok: true, ..Default::default() };
    dbshift::job::batch::write(&db, "r1", false, &other).await.unwrap();
    let e = dbshift::job::batch::read(&db, "r1", false).await.unwrap_err();
    assert!(matches!(&e, dbshift::job::batch::ReadError::Invalid(m) if m.contains("names another tenant")), "{e}");
    let coll = db.collection::<Document>(dbshift::job::batch::RESULTS);
    for (body, why) in [
        (bson::Bson::String("{ not json".into()), "no readable result"),
        (bson::Bson::String("x".repeat(20_000)), "more than a result takes"),
        (bson::Bson::Int32(7), "no result text"),
    ] {
        coll.replace_one(doc! {"_id": "r2:migrate"}, doc! {"_id": "r2:migrate", "result": body})
            .upsert(true)
            .await
            .unwrap();
        let e = dbshift::job::batch::read(&db, "r2", false).await.unwrap_err();
        assert!(matches!(&e, dbshift::job::batch::ReadError::Invalid(m) if m.contains(why)), "{e}");
    }
    assert_eq!(dbshift::job::batch::read(&db, "r3", false).await.unwrap(), None, "no result: none");
    db.drop().await.unwrap();

    let dir = migrations(&[("20250101000000_add.yaml", ADD)]);
    let t = unique("hbatch");
    let twice = format!(r#"["{t}","{t}"]"#);
    for (batch, why) in
        [("tenant_a,tenant_b", "JSON list"), (r#"["admin"]"#, "never a tenant"), (twice.as_str(), "twice")]
    {
        let o = cli(
            &["run", "--dir", dir.path().to_str().unwrap()],
            &[("DBSHIFT_MONGODB_URI", &uri()), ("DBSHIFT_BATCH", batch), ("DBSHIFT_RESULT_FILE", "/nonexistent/r")],
        );
        assert_eq!(o.status.code(), Some(2), "{batch}: {}", text(&o));
        assert!(text(&o).contains(why), "{batch}: {}", text(&o));
    }
    let o = cli(
        &["run", "--dir", dir.path().to_str().unwrap(), "--dry-run"],
        &[
            ("DBSHIFT_MONGODB_URI", &uri()),
            ("DBSHIFT_BATCH", &format!(r#"["{t}"]"#)),
            ("DBSHIFT_RESULT_FILE", "/nonexistent/r"),
        ],
    );
    assert_eq!(o.status.code(), Some(2), "a dry run of a batch: {}", text(&o));
    assert!(text(&o).contains("a dry run takes one tenant"), "{}", text(&o));
    // Other tests create databases meanwhile: only the batch's own names are looked for.
    let now = databases().await;
    assert!(!now.contains(&t) && !now.iter().any(|n| n.starts_with("tenant_a")), "nothing was written: {now:?}");
}
