//! The example migrations in migrations/ work as shipped: they apply to data shaped like the
//! demo's, pass their own checks, and roll back to exactly the previous state.

mod common;

use std::path::Path;

use bson::{doc, Bson, Document};
use common::*;
use dbshift::engine::{runner, DownRequest, RunOptions, UpRequest};

async fn seed(db: &mongodb::Database) {
    let customers: Vec<Document> = (0..300)
        .map(|i| doc! {"_id": i, "name": format!("Ada{i} King Lovelace"), "email": format!("c{i}@x.example.com")})
        .collect();
    db.collection::<Document>("customers").insert_many(customers).await.unwrap();
    let orders: Vec<Document> = (0..600)
        .map(|i| {
            doc! {"_id": i, "customerId": i % 300, "total": format!("{}.{:02}", i, i % 100), "placedAt": format!("2024-{:02}-10T12:00:00Z", i % 12 + 1), "status": if i % 3 == 0 { "open" } else { "shipped" }}
        })
        .collect();
    db.collection::<Document>("orders").insert_many(orders).await.unwrap();
}

#[tokio::test]
async fn example_migrations_apply_validate_and_roll_back_exactly() {
    let db = fresh_db("examples").await;
    seed(&db).await;
    let m = load(Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations").as_path());
    assert!(m.len() >= 5);
    let before = dump_db(&db).await;
    let opts = RunOptions::new("examples");
    let r = runner::up(&db, "t", &m, &UpRequest::default(), &opts).await.unwrap();
    assert!(r.ok, "{:?}", r.error);
    assert_eq!(r.migrations.len(), m.len() - 1, "the staging-only fixture is skipped without its profile");
    assert!(r.migrations.iter().flat_map(|o| &o.validation).all(|c| c.passed));
    let c = db.collection::<Document>("customers").find_one(doc! {"_id": 7}).await.unwrap().unwrap();
    assert_eq!((c.get_str("firstName"), c.get_str("lastName")), (Ok("Ada7"), Ok("King Lovelace")));
    assert_eq!(c.get_document("preferences").unwrap(), &doc! {"newsletter": false, "language": "en"});
    let o = db.collection::<Document>("orders").find_one(doc! {"_id": 12}).await.unwrap().unwrap();
    assert!(matches!(o.get("total"), Some(Bson::Decimal128(_))), "{o}");
    assert!(o.get_datetime("placedAt").is_ok());
    assert_eq!(db.collection::<Document>("audit_log").count_documents(doc! {}).await.unwrap(), 1);

    let r = runner::down(&db, "t", &m, &DownRequest::To("0".into()), &opts).await.unwrap();
    assert!(r.ok, "{:?}", r.error);
    assert_eq!(dump_db(&db).await, before);
}

#[tokio::test]
async fn the_staging_profile_adds_its_fixture() {
    let db = fresh_db("examples_staging").await;
    seed(&db).await;
    let m = load(Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations").as_path());
    let mut opts = RunOptions::new("examples");
    opts.profiles = vec!["staging".into()];
    let r = runner::up(&db, "t", &m, &UpRequest::default(), &opts).await.unwrap();
    assert!(r.ok, "{:?}", r.error);
    assert_eq!(db.collection::<Document>("customers").count_documents(doc! {"_id": "fixture-1"}).await.unwrap(), 1);
}
