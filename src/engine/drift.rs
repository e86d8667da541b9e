//! Live drift (`dbshift status --schema`): the indexes and validators the migrations in effect
//! on a tenant created, changed or dropped, folded in version order into what the database
//! should have, compared with what it has now.

use std::collections::BTreeMap;

use bson::Document;
use mongodb::Database;
use serde::Serialize;

use super::loader::Migration;
use super::ops::{same_index, Operation};
use super::tracking::Record;

/// One difference between what the migrations left and what the database has.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Difference {
    /// `missing`, `extra` or `changed`.
    pub kind: &'static str,
    /// `index` or `validator`.
    pub what: &'static str,
    pub collection: String,
    /// The index name (empty for a validator).
    pub name: String,
    /// The migration that last set it (none for an extra index).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
}

/// What the migrations say a collection has: its indexes by name, and its validator if a
/// migration set one (with the migration's id).
#[derive(Debug, Default)]
struct Expected {
    indexes: BTreeMap<String, (Document, String)>,
    validator: Option<(Document, String)>,
}

fn expected(migrations: &[Migration], records: &[Record]) -> (BTreeMap<String, Expected>, Vec<String>) {
    let mut colls: BTreeMap<String, Expected> = BTreeMap::new();
    let mut unchecked = Vec::new();
    let mut in_effect: Vec<&Migration> =
        migrations.iter().filter(|m| records.iter().any(|r| r.id == m.id() && r.state.in_effect())).collect();
    in_effect.sort_by(|a, b| a.version.cmp(&b.version));
    for m in in_effect {
        for op in &m.file.up {
            match op {
                Operation::CreateIndex(c) => {
                    if let Ok(spec) = c.spec() {
                        let name = spec.get_str("name").unwrap_or_default().to_string();
                        colls.entry(c.collection.clone()).or_default().indexes.insert(name, (spec, m.id()));
                    }
                }
                Operation::DropIndex(d) => {
                    colls.entry(d.collection.clone()).or_default().indexes.remove(&d.name);
                }
                Operation::CreateCollection(c) => {
                    let e = colls.entry(c.collection.clone()).or_default();
                    e.validator = c
                        .command()
                        .ok()
                        .and_then(|cmd| cmd.get_document("validator").ok().cloned())
                        .map(|v| (v, m.id()));
                }
                Operation::SetValidator(v) => {
                    if let Ok(Some(new)) = v.new_validator() {
                        let e = colls.entry(v.collection.clone()).or_default();
                        e.validator = (!new.is_empty()).then(|| (new, m.id()));
                    }
                }
                Operation::DropCollection(c) => {
                    colls.remove(&c.collection);
                }
                Operation::RenameCollection(r) => {
                    if let Some(e) = colls.remove(&r.from) {
                        colls.insert(r.to.clone(), e);
                    }
                }
                Operation::RunCommand(_) => unchecked.push(m.id()),
                _ => {}
            }
        }
    }
    (colls, unchecked)
}

/// The differences on `db`, and the migrations whose `runCommand` steps could not be followed.
pub async fn drift(
    db: &Database,
    migrations: &[Migration],
    records: &[Record],
) -> mongodb::error::Result<(Vec<Difference>, Vec<String>)> {
    let (colls, unchecked) = expected(migrations, records);
    let mut out = Vec::new();
    for (coll, want) in &colls {
        let have = crate::mongo::list_indexes(db, coll).await?;
        for (name, (spec, migration)) in &want.indexes {
            let diff = |kind| Difference {
                kind,
                what: "index",
                collection: coll.clone(),
                name: name.clone(),
                migration: Some(migration.clone()),
            };
            match have.iter().find(|i| i.get_str("name") == Ok(name.as_str())) {
                None => out.push(diff("missing")),
                Some(actual) if !same_index(actual, spec) => out.push(diff("changed")),
                Some(_) => {}
            }
        }
        if !want.indexes.is_empty() {
            for i in &have {
                let name = i.get_str("name").unwrap_or_default();
                if name != "_id_" && !want.indexes.contains_key(name) {
                    let (collection, name) = (coll.clone(), name.to_string());
                    out.push(Difference { kind: "extra", what: "index", collection, name, migration: None });
                }
            }
        }
        if let Some((validator, migration)) = &want.validator {
            let info = crate::mongo::collection_info(db, coll).await?;
            let actual = info.and_then(|i| i.get_document("options").ok()?.get_document("validator").ok().cloned());
            let kind = match actual {
                None => Some("missing"),
                Some(a) if a.is_empty() => Some("missing"),
                Some(a) if &a != validator => Some("changed"),
                Some(_) => None,
            };
            if let Some(kind) = kind {
                out.push(Difference {
                    kind,
                    what: "validator",
                    collection: coll.clone(),
                    name: String::new(),
                    migration: Some(migration.clone()),
                });
            }
        }
    }
    Ok((out, unchecked))
}
