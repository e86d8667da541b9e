//! `insertDocuments`: seed data; undone by deleting exactly the inserted `_id`s.

use bson::{doc, Bson, Document};
use mongodb::Database;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{data_err, json, Exec, ExecError, Op, Operation, Prepared, RestorePreimages};
use crate::engine::{bsonx, pass};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InsertDocuments {
    /// Collection name.
    pub collection: String,
    /// The documents to insert.
    pub documents: Vec<serde_json::Map<String, Json>>,
    /// What to do when a document's `_id` exists already: `fail` (default) fails the step
    /// before anything is written; `skip` leaves that document alone (it is reported, and not
    /// touched on undo).
    #[serde(default, skip_serializing_if = "OnConflict::is_fail")]
    pub on_conflict: OnConflict,
}

/// What `insertDocuments` does with an `_id` that exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OnConflict {
    #[default]
    Fail,
    Skip,
}

impl OnConflict {
    fn is_fail(&self) -> bool {
        *self == OnConflict::Fail
    }
}

impl InsertDocuments {
    /// Delete exactly the documents it inserted (from its entries); drop the collection again
    /// if the insert created it and the delete leaves it empty.
    fn undo(&self, key: &str, creates: bool) -> Vec<Operation> {
        vec![Operation::RestorePreimages(RestorePreimages {
            collection: self.collection.clone(),
            key: key.to_string(),
            recompute: None,
            drop_if_empty: creates,
        })]
    }
}

impl Op for InsertDocuments {
    const KIND: &'static str = "insertDocuments";

    fn collection(&self) -> Option<&str> {
        Some(&self.collection)
    }

    fn is_data_operation(&self) -> bool {
        true
    }

    fn check(&self) -> Vec<Option<String>> {
        let mut p = vec![self.documents.is_empty().then(|| "`documents` is empty".to_string())];
        for (i, d) in self.documents.iter().enumerate() {
            p.push(bsonx::map_to_doc(d).err().map(|e| format!("documents[{i}]: {e}")));
        }
        p
    }

    /// Every document gets its `_id` now, so the undo knows exactly what to delete.
    async fn prepare(&self, db: &Database, key: &str) -> Result<Prepared, ExecError> {
        let creates = !crate::mongo::collection_exists(db, &self.collection)
            .await
            .map_err(super::mongo("looking for the collection"))?;
        let mut docs = Vec::new();
        for d in &self.documents {
            let mut d = bsonx::map_to_doc(d).map_err(data_err)?;
            if !d.contains_key("_id") {
                let mut with_id = doc! {"_id": bson::oid::ObjectId::new()};
                with_id.extend(d);
                d = with_id;
            }
            if let serde_json::Value::Object(m) = json(Bson::Document(d)) {
                docs.push(m);
            }
        }
        let op =
            InsertDocuments { collection: self.collection.clone(), documents: docs, on_conflict: self.on_conflict };
        let undo = op.undo(key, creates);
        Ok(Prepared::new(Operation::InsertDocuments(op), undo))
    }

    async fn execute(&self, x: &mut Exec<'_>) -> Result<u64, ExecError> {
        let docs: Vec<Document> =
            self.documents.iter().map(bsonx::map_to_doc).collect::<Result<_, _>>().map_err(data_err)?;
        let key = x.key.to_string();
        let skip = self.on_conflict == OnConflict::Skip;
        let (inserted, skipped) = pass::insert(&mut x.pass(&self.collection), &key, docs, skip).await?;
        if !skipped.is_empty() {
            let ids: Vec<String> = skipped.iter().map(|i| i.to_string()).collect();
            tracing::info!(collection = %self.collection, skipped = %ids.join(", "), "documents that existed were left alone");
        }
        Ok(inserted)
    }

    async fn estimate(&self, _db: &Database) -> Result<Option<u64>, ExecError> {
        Ok(Some(self.documents.len() as u64))
    }
}
