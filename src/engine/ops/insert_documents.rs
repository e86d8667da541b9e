//! `insertDocuments`: seed data; undone by deleting exactly the inserted `_id`s.

use bson::{doc, Bson, Document};
use mongodb::Database;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{data_err, in_session, json, mongo, DeleteDocuments, Exec, ExecError, Op, Operation, Prepared};
use crate::engine::bsonx;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InsertDocuments {
    /// Collection name.
    pub collection: String,
    /// The documents to insert.
    pub documents: Vec<serde_json::Map<String, Json>>,
}

impl InsertDocuments {
    fn undo(&self, ids: Vec<Bson>) -> Vec<Operation> {
        vec![Operation::DeleteDocuments(DeleteDocuments {
            collection: self.collection.clone(),
            filter: serde_json::json!({ "_id": { "$in": json(Bson::Array(ids)) } }),
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
    async fn prepare(&self, _db: &Database, _key: &str) -> Result<Prepared, ExecError> {
        let mut docs = Vec::new();
        let mut ids = Vec::new();
        for d in &self.documents {
            let mut d = bsonx::map_to_doc(d).map_err(data_err)?;
            if !d.contains_key("_id") {
                let mut with_id = doc! {"_id": bson::oid::ObjectId::new()};
                with_id.extend(d);
                d = with_id;
            }
            ids.push(d.get("_id").cloned().unwrap_or(Bson::Null));
            if let serde_json::Value::Object(m) = json(Bson::Document(d)) {
                docs.push(m);
            }
        }
        let op = InsertDocuments { collection: self.collection.clone(), documents: docs };
        let undo = op.undo(ids);
        Ok(Prepared::new(Operation::InsertDocuments(op), undo))
    }

    async fn execute(&self, x: &mut Exec<'_>) -> Result<u64, ExecError> {
        let docs: Vec<Document> =
            self.documents.iter().map(bsonx::map_to_doc).collect::<Result<_, _>>().map_err(data_err)?;
        let coll = x.db.collection::<Document>(&self.collection);
        let s = &mut x.session;
        let r = in_session!(coll.insert_many(docs), s)
            .map_err(mongo(format!("inserting documents into {}", self.collection)))?;
        Ok(r.inserted_ids.len() as u64)
    }

    async fn estimate(&self, _db: &Database) -> Result<Option<u64>, ExecError> {
        Ok(Some(self.documents.len() as u64))
    }
}
