//! Every operation, up and then down, on real data in a real MongoDB wire server. The state
//! after `up` is checked document by document, and `down` must bring back exactly the state
//! before `up` (documents, indexes, collections).

mod common;

use bson::{doc, Bson, Document};
use common::*;
use dbshift::engine::{runner, DownRequest, RunOptions, UpRequest};
use mongodb::Database;

fn customers() -> Vec<Document> {
    vec![
        doc! {"_id": 1, "name": "Ada King Lovelace", "age": "36", "joined": "2021-03-04T00:00:00Z", "plan": "pro", "address": {"city": "London", "zip": "N1"}},
        doc! {"_id": 2, "name": "Alan Turing", "age": "41", "joined": "2020-01-02T00:00:00Z", "plan": "free", "tier": "gold"},
        doc! {"_id": 3, "name": "Grace Hopper", "age": "x", "plan": "free", "address": {"city": "NYC"}, "score": 1.0f64},
        doc! {"_id": 4, "name": "Edsger Dijkstra", "status": "active", "n": 5i64},
    ]
}

async fn seed(prefix: &str) -> Database {
    let db = fresh_db(prefix).await;
    db.collection::<Document>("customers").insert_many(customers()).await.unwrap();
    db
}

/// Apply one migration, check, roll it back, and require the exact previous state.
async fn up_then_down(db: &Database, yaml: &str) -> Vec<(String, Vec<Document>, Vec<String>)> {
    let dir = migrations(&[("20250101000000_op.yaml", yaml)]);
    let m = load(dir.path());
    let opts = RunOptions::new("test-run");
    let before = dump_db(db).await;
    let before_bytes = dump_bytes(db, "customers").await;
    let r = runner::up(db, "t", &m, &UpRequest::default(), &opts).await.unwrap();
    assert!(r.ok, "up failed: {:?}", r.error);
    let after = dump_db(db).await;
    assert_ne!(before, after, "up changed nothing");
    let r = runner::down(db, "t", &m, &DownRequest::Steps(1), &opts).await.unwrap();
    assert!(r.ok, "down failed: {:?}", r.error);
    assert_eq!(dump_db(db).await, before, "down did not restore the previous state");
    STATE.with(|s| *s.borrow_mut() = Some(before_bytes));
    after
}

thread_local! {
    static STATE: std::cell::RefCell<Option<Vec<Vec<u8>>>> = const { std::cell::RefCell::new(None) };
}

/// The customers collection after `up`, by _id.
fn coll<'a>(state: &'a [(String, Vec<Document>, Vec<String>)], name: &str) -> &'a (String, Vec<Document>, Vec<String>) {
    state.iter().find(|(n, _, _)| n == name).unwrap_or_else(|| panic!("no collection {name} in {state:?}"))
}

fn by_id(docs: &[Document], id: i32) -> &Document {
    docs.iter().find(|d| d.get_i32("_id").ok() == Some(id)).unwrap()
}

#[tokio::test]
async fn add_field_sets_missing_only_and_down_keeps_preexisting_values() {
    let db = seed("op_add").await;
    let after = up_then_down(&db, "up:\n  - addField: { collection: customers, field: status, value: active }\n").await;
    let docs = &coll(&after, "customers").1;
    assert!(docs.iter().all(|d| d.get_str("status") == Ok("active")));
    // Customer 4 had the same value before: down must not remove it (checked by up_then_down),
    let after_down = dump(&db, "customers").await;
    assert_eq!(by_id(&after_down, 4).get_str("status"), Ok("active"));
    assert!(by_id(&after_down, 1).get("status").is_none());
}

#[tokio::test]
async fn add_field_nested_with_filter() {
    let db = seed("op_add_nested").await;
    let after = up_then_down(&db, "up:\n  - addField: { collection: customers, field: address.country, value: { code: GB }, filter: { address.city: London } }\n").await;
    let docs = &coll(&after, "customers").1;
    assert_eq!(by_id(docs, 1).get_document("address").unwrap().get_document("country").unwrap(), &doc! {"code": "GB"});
    assert!(by_id(docs, 3).get_document("address").unwrap().get("country").is_none());
}

#[tokio::test]
async fn remove_field_keeps_the_values_it_destroys() {
    let db = seed("op_remove").await;
    let after = up_then_down(&db, "up:\n  - removeField: { collection: customers, field: plan }\n").await;
    assert!(coll(&after, "customers").1.iter().all(|d| !d.contains_key("plan")));
}

#[tokio::test]
async fn remove_nested_field() {
    let db = seed("op_remove_nested").await;
    let after = up_then_down(&db, "up:\n  - removeField: { collection: customers, field: address.zip }\n").await;
    let docs = &coll(&after, "customers").1;
    assert_eq!(by_id(docs, 1).get_document("address").unwrap(), &doc! {"city": "London"});
}

#[tokio::test]
async fn rename_field_over_an_existing_target_is_undone_exactly() {
    let db = seed("op_rename").await;
    let after = up_then_down(&db, "up:\n  - renameField: { collection: customers, from: plan, to: tier }\n").await;
    let docs = &coll(&after, "customers").1;
    // Customer 2 had both: its tier ("gold") was overwritten by plan ("free"); down brings both back.
    assert_eq!(by_id(docs, 2).get_str("tier"), Ok("free"));
    assert!(by_id(docs, 2).get("plan").is_none());
    assert_eq!(by_id(docs, 1).get_str("tier"), Ok("pro"));
    assert!(by_id(docs, 4).get("tier").is_none());
}

#[tokio::test]
async fn convert_type_string_to_int_and_date() {
    let db = seed("op_convert").await;
    let yaml = "up:\n  - convertType: { collection: customers, field: age, to: int, onError: keep }\n  - convertType: { collection: customers, field: joined, from: string, to: date }\n";
    let after = up_then_down(&db, yaml).await;
    let docs = &coll(&after, "customers").1;
    assert_eq!(by_id(docs, 1).get("age"), Some(&Bson::Int32(36)));
    assert_eq!(by_id(docs, 3).get("age"), Some(&Bson::String("x".into())), "onError: keep leaves it");
    assert_eq!(by_id(docs, 2).get_datetime("joined").unwrap().timestamp_millis(), 1_577_923_200_000);
}

#[tokio::test]
async fn convert_type_on_error_null() {
    let db = seed("op_convert_null").await;
    let after = up_then_down(
        &db,
        "up:\n  - convertType: { collection: customers, field: age, to: double, onError: setNull }\n",
    )
    .await;
    let docs = &coll(&after, "customers").1;
    assert_eq!(by_id(docs, 2).get("age"), Some(&Bson::Double(41.0)));
    assert_eq!(by_id(docs, 3).get("age"), Some(&Bson::Null));
}

async fn index(db: &Database, coll: &str, name: &str) -> Option<Document> {
    let r = db.run_command(doc! {"listIndexes": coll}).await.unwrap();
    r.get_document("cursor")
        .unwrap()
        .get_array("firstBatch")
        .unwrap()
        .iter()
        .filter_map(|b| b.as_document().cloned())
        .find(|d| d.get_str("name") == Ok(name))
}

#[tokio::test]
async fn create_index_compound_unique_ttl_partial() {
    let db = seed("op_index").await;
    let yaml = r#"up:
  - createIndex: { collection: customers, keys: { plan: 1, name: -1 }, name: plan_name, unique: true }
  - createIndex: { collection: customers, keys: { joinedAt: 1 }, expireAfterSeconds: 3600 }
  - createIndex: { collection: customers, keys: { age: 1 }, name: adults, partialFilterExpression: { age: { $exists: true } } }
"#;
    let dir = migrations(&[("20250101000000_idx.yaml", yaml)]);
    let m = load(dir.path());
    let opts = RunOptions::new("r");
    let before = dump_db(&db).await;
    assert!(runner::up(&db, "t", &m, &UpRequest::default(), &opts).await.unwrap().ok);
    let u = index(&db, "customers", "plan_name").await.unwrap();
    assert_eq!(u.get_bool("unique"), Ok(true));
    let ttl = index(&db, "customers", "joinedAt_1").await.unwrap();
    assert_eq!(
        ttl.get("expireAfterSeconds").and_then(Bson::as_i64).or(ttl.get_i32("expireAfterSeconds").ok().map(i64::from)),
        Some(3600)
    );
    assert!(index(&db, "customers", "adults").await.unwrap().get_document("partialFilterExpression").is_ok());
    // The unique index is enforced.
    let dup = db
        .collection::<Document>("customers")
        .insert_one(doc! {"_id": 9, "plan": "pro", "name": "Ada King Lovelace"})
        .await;
    assert!(dup.is_err());
    // Running it again finds nothing to do; down removes all three.
    assert!(runner::up(&db, "t", &m, &UpRequest::default(), &opts).await.unwrap().migrations.is_empty());
    assert!(runner::down(&db, "t", &m, &DownRequest::Steps(1), &opts).await.unwrap().ok);
    assert_eq!(dump_db(&db).await, before);
}

#[tokio::test]
async fn drop_index_is_recreated_with_its_definition() {
    let db = seed("op_dropindex").await;
    db.run_command(doc! {"createIndexes": "customers", "indexes": [{"key": {"age": 1}, "name": "age_partial", "partialFilterExpression": {"age": {"$type": "string"}}, "sparse": true}]})
        .await
        .unwrap();
    let spec = index(&db, "customers", "age_partial").await.unwrap();
    let after = up_then_down(&db, "up:\n  - dropIndex: { collection: customers, name: age_partial }\n").await;
    assert!(!coll(&after, "customers").2.contains(&"age_partial".to_string()));
    assert_eq!(index(&db, "customers", "age_partial").await.unwrap(), spec);
}

#[tokio::test]
async fn create_collection_with_json_schema_validator() {
    let db = seed("op_create").await;
    let yaml = r#"up:
  - createCollection:
      collection: orders
      jsonSchema: { bsonType: object, required: [total], properties: { total: { bsonType: [int, double] } } }
  - insertDocuments: { collection: orders, documents: [ { _id: 1, total: 10 } ] }
"#;
    let dir = migrations(&[("20250101000000_c.yaml", yaml)]);
    let m = load(dir.path());
    let opts = RunOptions::new("r");
    let before = dump_db(&db).await;
    assert!(runner::up(&db, "t", &m, &UpRequest::default(), &opts).await.unwrap().ok);
    let bad = db.collection::<Document>("orders").insert_one(doc! {"total": "ten"}).await.unwrap_err();
    assert!(bad.to_string().contains("121") || bad.to_string().to_lowercase().contains("validation"), "{bad}");
    assert_eq!(dump(&db, "orders").await, vec![doc! {"_id": 1, "total": 10}]);
    assert!(runner::down(&db, "t", &m, &DownRequest::Steps(1), &opts).await.unwrap().ok);
    assert_eq!(dump_db(&db).await, before);
}

#[tokio::test]
async fn drop_collection_keeps_it_aside_and_down_brings_it_back_with_indexes() {
    let db = seed("op_dropcoll").await;
    db.run_command(doc! {"createIndexes": "customers", "indexes": [{"key": {"name": 1}, "name": "by_name"}]})
        .await
        .unwrap();
    let after = up_then_down(&db, "up:\n  - dropCollection: { collection: customers }\n").await;
    assert!(after.iter().all(|(n, _, _)| n != "customers"));
    assert!(index(&db, "customers", "by_name").await.is_some());
    assert_eq!(STATE.with(|s| s.borrow().clone()).unwrap(), dump_bytes(&db, "customers").await);
}

#[tokio::test]
async fn rename_collection() {
    let db = seed("op_renamecoll").await;
    let after = up_then_down(&db, "up:\n  - renameCollection: { from: customers, to: clients }\n").await;
    assert_eq!(coll(&after, "clients").1, customers());
}

#[tokio::test]
async fn insert_documents_with_and_without_ids_and_delete_only_them_on_down() {
    let db = seed("op_insert").await;
    let yaml = "up:\n  - insertDocuments: { collection: customers, documents: [ { _id: 10, name: Seed }, { name: NoId, at: { $date: '2025-01-01T00:00:00Z' } } ] }\n";
    let after = up_then_down(&db, yaml).await;
    let docs = &coll(&after, "customers").1;
    assert_eq!(docs.len(), 6);
    let no_id = docs.iter().find(|d| d.get_str("name") == Ok("NoId")).unwrap();
    assert!(no_id.get_object_id("_id").is_ok());
    assert!(no_id.get_datetime("at").is_ok());
}

/// MongoDB creates a collection on the first insert: down drops it again (up_then_down compares
/// the collection lists), unless the application put something there since.
#[tokio::test]
async fn insert_documents_into_a_new_collection_and_down_drops_it_again() {
    let db = seed("op_insert_new").await;
    let yaml = "up:\n  - insertDocuments: { collection: settings, documents: [ { _id: cfg, on: true } ] }\n";
    let after = up_then_down(&db, yaml).await;
    assert_eq!(coll(&after, "settings").1.len(), 1);

    let dir = migrations(&[("20250101000000_op.yaml", yaml)]);
    let m = load(dir.path());
    let opts = RunOptions::new("test-run");
    assert!(runner::up(&db, "t", &m, &UpRequest::default(), &opts).await.unwrap().ok);
    db.collection::<Document>("settings").insert_one(doc! {"_id": "app", "on": false}).await.unwrap();
    assert!(runner::down(&db, "t", &m, &DownRequest::Steps(1), &opts).await.unwrap().ok);
    assert_eq!(dump(&db, "settings").await, vec![doc! {"_id": "app", "on": false}], "the application's document stays");
}

#[tokio::test]
async fn delete_documents_are_restored_byte_for_byte() {
    let db = seed("op_delete").await;
    let after =
        up_then_down(&db, "up:\n  - deleteDocuments: { collection: customers, filter: { plan: free } }\n").await;
    assert_eq!(coll(&after, "customers").1.len(), 2);
    assert_eq!(STATE.with(|s| s.borrow().clone()).unwrap(), dump_bytes(&db, "customers").await);
}

/// Rollback data that is not what dbshift wrote (damaged, or rewritten by someone) is refused:
/// `down` fails saying so, and the migration stays applied.
#[tokio::test]
async fn damaged_rollback_data_is_refused_and_the_migration_stays_applied() {
    let db = seed("op_damaged_rb").await;
    let dir = migrations(&[(
        "20250101000000_op.yaml",
        "up:\n  - deleteDocuments: { collection: customers, filter: { plan: free } }\n",
    )]);
    let m = load(dir.path());
    let opts = RunOptions::new("test-run");
    assert!(runner::up(&db, "t", &m, &UpRequest::default(), &opts).await.unwrap().ok);
    let after_up = dump_bytes(&db, "customers").await;
    let names = db.list_collection_names().await.unwrap();
    let rb = names.iter().find(|n| n.starts_with("_dbshift_rb_20250101000000")).expect("rollback data").clone();
    let chunks = db.collection::<Document>(&rb);
    let stored = chunks.find_one(doc! {}).await.unwrap().unwrap();
    assert!(stored.get_binary_generic("bson").is_ok(), "pre-images are stored as raw BSON: {stored}");
    // Rewrite the chunk in another layout.
    let deleted: Vec<Document> = customers().into_iter().filter(|d| d.get_str("plan") == Ok("free")).collect();
    chunks.delete_many(doc! {}).await.unwrap();
    chunks.insert_one(doc! {"_id": 0i64, "docs": deleted}).await.unwrap();
    let r = runner::down(&db, "t", &m, &DownRequest::Steps(1), &opts).await.unwrap();
    assert!(!r.ok);
    let e = r.error.unwrap();
    assert!(e.contains("is damaged") && e.contains("not in the layout this dbshift writes"), "{e}");
    assert_eq!(dump_bytes(&db, "customers").await, after_up);
    let rec = db.collection::<Document>("_dbshift_migrations").find_one(doc! {}).await.unwrap().unwrap();
    assert_eq!(rec.get_str("state"), Ok("applied"));
}

#[tokio::test]
async fn update_many_with_operators_and_with_a_pipeline() {
    let db = seed("op_update").await;
    let yaml = r#"up:
  - updateMany: { collection: customers, filter: { plan: free }, update: { $set: { plan: basic }, $inc: { visits: 1 } } }
  - updateMany:
      collection: customers
      filter: { name: { $exists: true } }
      update: [ { $set: { label: { $concat: [ "$name", " (", { $ifNull: [ "$plan", "none" ] }, ")" ] } } } ]
"#;
    let after = up_then_down(&db, yaml).await;
    let docs = &coll(&after, "customers").1;
    assert_eq!(by_id(docs, 2).get_str("plan"), Ok("basic"));
    assert_eq!(by_id(docs, 2).get_i32("visits"), Ok(1));
    assert_eq!(by_id(docs, 4).get_str("label"), Ok("Edsger Dijkstra (none)"));
    assert_eq!(STATE.with(|s| s.borrow().clone()).unwrap(), dump_bytes(&db, "customers").await);
}

#[tokio::test]
async fn transform_splits_names_in_batches_and_down_is_byte_exact() {
    let db = seed("op_transform").await;
    // More documents than one batch, to cross batch boundaries.
    let extra: Vec<Document> = (100..2600).map(|i| doc! {"_id": i, "name": format!("First{i} Last{i}"), "score": i as f64, "big": 9_007_199_254_740_993i64}).collect();
    db.collection::<Document>("customers").insert_many(extra).await.unwrap();
    let yaml = r#"up:
  - transform:
      collection: customers
      batchSize: 500
      script: |
        (doc) => {
          if (!doc.name || doc.name.indexOf(' ') < 0) return null;
          const [first, ...rest] = doc.name.split(' ');
          doc.firstName = first;
          doc.lastName = rest.join(' ');
          delete doc.name;
          return doc;
        }
"#;
    let after = up_then_down(&db, yaml).await;
    let docs = &coll(&after, "customers").1;
    assert_eq!(by_id(docs, 1).get_str("firstName"), Ok("Ada"));
    assert_eq!(by_id(docs, 1).get_str("lastName"), Ok("King Lovelace"));
    assert!(by_id(docs, 1).get("name").is_none());
    let d = by_id(docs, 2599);
    assert_eq!(d.get("score"), Some(&Bson::Double(2599.0)), "a double stays a double");
    assert_eq!(d.get("big"), Some(&Bson::Int64(9_007_199_254_740_993)), "a large long survives JavaScript");
    assert_eq!(STATE.with(|s| s.borrow().clone()).unwrap(), dump_bytes(&db, "customers").await);
    let names: Vec<String> = db.list_collection_names().await.unwrap();
    // Rolled back: its pre-image store is gone with it.
    assert!(!names.iter().any(|n| n.starts_with("_dbshift_rb_")), "pre-images left behind: {names:?}");
}

#[tokio::test]
async fn run_command_with_an_explicit_down() {
    let db = seed("op_command").await;
    let yaml = r#"up:
  - runCommand: { command: { createIndexes: customers, indexes: [ { key: { n: 1 }, name: by_n } ] } }
down:
  - dropIndex: { collection: customers, name: by_n }
"#;
    let after = up_then_down(&db, yaml).await;
    assert!(coll(&after, "customers").2.contains(&"by_n".to_string()));
}

#[tokio::test]
async fn run_command_without_down_is_applied_but_down_is_refused_clearly() {
    let db = seed("op_command_nodown").await;
    let yaml =
        "up:\n  - runCommand: { command: { createIndexes: customers, indexes: [ { key: { n: 1 }, name: by_n } ] } }\n";
    let dir = migrations(&[("20250101000000_cmd.yaml", yaml)]);
    let m = load(dir.path());
    let opts = RunOptions::new("r");
    assert!(runner::up(&db, "t", &m, &UpRequest::default(), &opts).await.unwrap().ok);
    let e = runner::down(&db, "t", &m, &DownRequest::Steps(1), &opts).await.unwrap_err();
    assert!(e.to_string().contains("20250101000000_cmd cannot be rolled back: step 1 (runCommand)"), "{e}");
    assert!(index(&db, "customers", "by_n").await.is_some(), "a refused down changes nothing");
}

#[tokio::test]
async fn background_count_reports_the_count_of_its_filter() {
    use dbshift::engine::count::BackgroundCount;
    let db = fresh_db("op_count").await;
    let coll = db.collection::<Document>("people");
    coll.insert_many((0..30).map(|i| doc! {"_id": i, "pro": i % 3 == 0})).await.unwrap();
    for (filter, want) in [(Some(doc! {"pro": true}), 10), (None, 30)] {
        let count = BackgroundCount::start(&coll, filter);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while count.get().is_none() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(count.get(), Some(want));
    }
}

/// Batches are found again by their `_id` range where a range can bound them; `_id`s of every
/// kind, mixed within one batch (numbers of three types, infinity, strings, ObjectIds, dates,
/// embedded documents, null), are all changed once and all put back. (Not NaN: SecantusDB's
/// Python build refuses to update a document whose `_id` is NaN, "would modify the immutable
/// field '_id'"; its Rust build and MongoDB do not.)
#[tokio::test]
async fn ids_of_every_kind_in_one_batch_are_changed_once_and_put_back() {
    let db = fresh_db("op_ids").await;
    let mut docs: Vec<Document> = Vec::new();
    for i in 0..1050i64 {
        let id = match i % 9 {
            0 => Bson::Int32(i as i32),
            1 => Bson::Int64(i),
            2 => Bson::Double(i as f64 + 0.5),
            3 => Bson::String(format!("s{i:05}")),
            4 => Bson::ObjectId(bson::oid::ObjectId::new()),
            5 => Bson::DateTime(bson::DateTime::from_millis(i)),
            6 => Bson::Document(doc! {"k": i}),
            7 if i == 7 => Bson::Null,
            7 if i == 16 => Bson::Double(f64::NEG_INFINITY),
            _ => Bson::Int64(1_000_000 + i),
        };
        docs.push(doc! {"_id": id, "name": format!("A{i} B{i}"), "n": i});
    }
    db.collection::<Document>("customers").insert_many(docs).await.unwrap();
    let yaml = r#"up:
  - addField: { collection: customers, field: status, value: active }
  - updateMany: { collection: customers, filter: {}, update: { $inc: { n: 1 } } }
  - transform:
      collection: customers
      batchSize: 100
      script: "(doc) => { const [a, b] = doc.name.split(' '); doc.first = a; doc.last = b; delete doc.name; return doc; }"
"#;
    let after = up_then_down(&db, yaml).await;
    let docs = &coll(&after, "customers").1;
    assert_eq!(docs.len(), 1050);
    for d in docs {
        let i = d.get_i64("n").unwrap() - 1;
        assert_eq!(d.get_str("status"), Ok("active"), "{d}");
        assert_eq!(d.get_str("first"), Ok(format!("A{i}").as_str()), "{d}: changed once");
        assert!(d.get("name").is_none());
    }
    assert_eq!(STATE.with(|s| s.borrow().clone()).unwrap(), dump_bytes(&db, "customers").await);
}

/// A collection's validation options as listCollections shows them, with the server's
/// defaults filled in: (validator, validationLevel, validationAction).
async fn validation(db: &Database, coll: &str) -> (Document, String, String) {
    let reply = db.run_command(doc! {"listCollections": 1, "filter": {"name": coll}}).await.unwrap();
    let batch = reply.get_document("cursor").unwrap().get_array("firstBatch").unwrap();
    let o = batch[0].as_document().unwrap().get_document("options").cloned().unwrap_or_default();
    (
        o.get_document("validator").cloned().unwrap_or_default(),
        o.get_str("validationLevel").unwrap_or("strict").to_string(),
        o.get_str("validationAction").unwrap_or("error").to_string(),
    )
}

#[tokio::test]
async fn set_validator_on_a_collection_without_one_is_undone_to_none() {
    let db = seed("op_setval").await;
    let yaml = r#"up:
  - setValidator:
      collection: customers
      jsonSchema: { bsonType: object, required: [name] }
      validationLevel: moderate
"#;
    let dir = migrations(&[("20250101000000_v.yaml", yaml)]);
    let m = load(dir.path());
    let opts = RunOptions::new("r");
    let before = dump_db(&db).await;
    assert_eq!(validation(&db, "customers").await, (doc! {}, "strict".into(), "error".into()));
    let r = runner::up(&db, "t", &m, &UpRequest::default(), &opts).await.unwrap();
    assert!(r.ok, "{:?}", r.error);
    let (v, level, action) = validation(&db, "customers").await;
    assert_eq!(v, doc! {"$jsonSchema": {"bsonType": "object", "required": ["name"]}});
    assert_eq!((level.as_str(), action.as_str()), ("moderate", "error"));
    let refused = db.collection::<Document>("customers").insert_one(doc! {"_id": 9, "x": 1}).await;
    assert!(refused.is_err(), "a document without a name was accepted");
    assert_eq!(dump_db(&db).await, before, "setValidator changed documents");
    let r = runner::down(&db, "t", &m, &DownRequest::Steps(1), &opts).await.unwrap();
    assert!(r.ok, "{:?}", r.error);
    assert_eq!(validation(&db, "customers").await, (doc! {}, "strict".into(), "error".into()));
    db.collection::<Document>("customers").insert_one(doc! {"_id": 9, "x": 1}).await.unwrap();
}

/// MongoDB's phased tightening: a validator at `moderate` (existing documents may stay as they
/// are, new writes must pass), a backfill, then `strict`; rolled back step by step to the
/// validator the collection had before, exactly.
#[tokio::test]
async fn set_validator_phased_tightening_and_down_restores_the_previous_validator() {
    let db = fresh_db("op_setval2").await;
    let previous = doc! {"$jsonSchema": {"bsonType": "object", "properties": {"plan": {"bsonType": "string"}}}};
    db.run_command(doc! {"create": "customers", "validator": previous.clone(), "validationAction": "warn"})
        .await
        .unwrap();
    db.collection::<Document>("customers").insert_many(customers()).await.unwrap();
    let schema = "{ bsonType: object, required: [name, plan], properties: { plan: { enum: [free, pro] } } }";
    let files = [
        (
            "20250101000000_moderate.yaml",
            format!("up:\n  - setValidator: {{ collection: customers, jsonSchema: {schema}, validationLevel: moderate, validationAction: error }}\n"),
        ),
        (
            "20250102000000_backfill.yaml",
            "up:\n  - addField: { collection: customers, field: plan, value: free }\n".to_string(),
        ),
        (
            "20250103000000_strict.yaml",
            "up:\n  - setValidator: { collection: customers, validationLevel: strict }\n".to_string(),
        ),
    ];
    let refs: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let dir = migrations(&refs);
    let m = load(dir.path());
    let opts = RunOptions::new("r");
    let before = dump_db(&db).await;
    let r = runner::up(&db, "t", &m, &UpRequest::default(), &opts).await.unwrap();
    assert!(r.ok, "{:?}", r.error);
    let (v, level, action) = validation(&db, "customers").await;
    assert_eq!(v.get_document("$jsonSchema").unwrap().get_array("required").unwrap().len(), 2);
    assert_eq!((level.as_str(), action.as_str()), ("strict", "error"));
    assert!(dump(&db, "customers").await.iter().all(|d| d.get_str("plan").is_ok()), "the backfill ran");
    let bad = db.collection::<Document>("customers").insert_one(doc! {"_id": 9, "name": "x", "plan": "gold"}).await;
    assert!(bad.is_err(), "strict validator accepted plan gold");

    // Down one: back to moderate with the new validator.
    assert!(runner::down(&db, "t", &m, &DownRequest::Steps(1), &opts).await.unwrap().ok);
    let (v2, level, _) = validation(&db, "customers").await;
    assert_eq!((v2, level.as_str()), (v, "moderate"));
    // Down all: the validator, level and action the collection had, and the documents.
    let r = runner::down(&db, "t", &m, &DownRequest::Steps(2), &opts).await.unwrap();
    assert!(r.ok, "{:?}", r.error);
    assert_eq!(validation(&db, "customers").await, (previous, "strict".into(), "warn".into()));
    assert_eq!(dump_db(&db).await, before);
}

#[tokio::test]
async fn set_validator_on_a_missing_collection_fails_and_changes_nothing() {
    let db = seed("op_setval3").await;
    let yaml = "up:\n  - addField: { collection: customers, field: f, value: 1 }\n  - setValidator: { collection: orders, validator: { total: { $gte: 0 } } }\n";
    let dir = migrations(&[("20250101000000_v.yaml", yaml)]);
    let m = load(dir.path());
    let before = dump_db(&db).await;
    let r = runner::up(&db, "t", &m, &UpRequest::default(), &RunOptions::new("r")).await.unwrap();
    assert!(!r.ok);
    let e = r.error.unwrap();
    assert!(e.contains("collection orders does not exist"), "{e}");
    assert_eq!(dump_db(&db).await, before, "the failed migration left changes");
    assert!(!db.list_collection_names().await.unwrap().contains(&"orders".to_string()));
}

/// The phased tightening example of docs/engine.md ("Changing a validator"), as written: its
/// three files apply to customers without a plan, refuse a bad write, and roll back exactly.
#[tokio::test]
async fn the_phased_tightening_example_of_the_docs_works_as_written() {
    let text = include_str!("../docs/engine.md");
    let section = &text[text.find("## Changing a validator").expect("the section")..];
    let start = section.find("```yaml\n").expect("a yaml block") + "```yaml\n".len();
    let block = &section[start..start + section[start..].find("```").unwrap()];
    let files: Vec<(String, String)> = block
        .split("---\n")
        .map(|part| {
            let (first, rest) = part.split_once('\n').unwrap();
            let name = first.trim_start_matches("# migrations/").trim().to_string();
            assert!(name.ends_with(".yaml"), "{first}");
            (name, rest.to_string())
        })
        .collect();
    assert_eq!(files.len(), 3);
    let refs: Vec<(&str, &str)> = files.iter().map(|(n, t)| (n.as_str(), t.as_str())).collect();
    let dir = migrations(&refs);
    let m = load(dir.path());
    let db = seed("op_setval_docs").await;
    let before = dump_db(&db).await;
    let opts = RunOptions::new("r");
    let r = runner::up(&db, "t", &m, &UpRequest::default(), &opts).await.unwrap();
    assert!(r.ok, "{:?}", r.error);
    assert_eq!(validation(&db, "customers").await.1, "strict");
    let bad = db.collection::<Document>("customers").insert_one(doc! {"_id": 9, "name": "x"}).await;
    assert!(bad.is_err(), "a customer without a plan was accepted");
    let r = runner::down(&db, "t", &m, &DownRequest::Steps(3), &opts).await.unwrap();
    assert!(r.ok, "{:?}", r.error);
    assert_eq!(dump_db(&db).await, before);
    assert_eq!(validation(&db, "customers").await, (doc! {}, "strict".into(), "error".into()));
}
