//! `_restorePreimages` (internal, never written in a file): put back what a step stored in
//! its pre-image store, field by field. It is how changes to documents are undone.

use mongodb::options::UpdateModifications;
use mongodb::Database;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::{data_err, mongo, restore, Exec, ExecError, Op, Operation, Prepared};
use crate::engine::{bsonx, pass};

/// How to tell what a change wrote, for changes the server computed: the update and filter it
/// ran with, applied again to the pre-images in a scratch collection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Recompute {
    /// Update operators, or a pipeline (a list of stages).
    pub update: Json,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Json>,
}

impl Recompute {
    pub fn new(update: Json, filter: Option<Json>) -> Self {
        Recompute { update, filter }
    }

    fn to_pass(&self) -> Result<pass::Recompute, ExecError> {
        let update = match &self.update {
            Json::Array(stages) => UpdateModifications::Pipeline(
                stages.iter().map(bsonx::to_doc).collect::<Result<_, _>>().map_err(data_err)?,
            ),
            u => UpdateModifications::Document(bsonx::to_doc(u).map_err(data_err)?),
        };
        Ok(pass::Recompute { update, filter: bsonx::filter_doc(self.filter.as_ref()).map_err(data_err)? })
    }
}

/// Internal undo step: put back the documents a step changed, from its pre-image store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RestorePreimages {
    /// Collection the documents belong to.
    pub collection: String,
    /// The step key of the pre-image store (`<version>_<step>`).
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recompute: Option<Recompute>,
    /// The step created the collection (MongoDB creates one on the first insert): drop it
    /// again when the restore leaves it empty with no index of its own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drop_if_empty: bool,
}

impl Op for RestorePreimages {
    const KIND: &'static str = "restorePreimages";

    fn collection(&self) -> Option<&str> {
        Some(&self.collection)
    }

    fn is_data_operation(&self) -> bool {
        true
    }

    fn check(&self) -> Vec<Option<String>> {
        vec![Some("is internal to dbshift and cannot be written in a file".into())]
    }

    /// A restore stores what it overwrites under its own key: undoing it puts that back.
    async fn prepare(&self, _db: &Database, key: &str) -> Result<Prepared, ExecError> {
        Ok(Prepared::new(Operation::RestorePreimages(self.clone()), vec![restore(&self.collection, key, None)]))
    }

    async fn execute(&self, x: &mut Exec<'_>) -> Result<u64, ExecError> {
        let recompute = self.recompute.as_ref().map(Recompute::to_pass).transpose()?;
        let key = x.key.to_string();
        let bypass = validated(x.db, &self.collection).await?;
        let mut p = x.pass(&self.collection);
        p.bypass_validation = bypass;
        let r = pass::restore(&mut p, &key, &self.key, recompute.as_ref()).await?;
        if r.conflicts > 0 {
            let ids: Vec<String> = r.conflict_ids.iter().map(|i| i.to_string()).collect();
            tracing::warn!(collection = %self.collection, conflicts = r.conflicts, ids = %ids.join(", "),
                "fields changed again since the migration: the pre-image won");
        }
        x.conflicts(r.conflicts, r.conflict_ids);
        if self.drop_if_empty {
            drop_if_empty(x.db, &self.collection).await?;
        }
        Ok(r.written)
    }
}

/// Whether writes into `coll` are validated (a validator, level not `off`): a restore there
/// bypasses validation, since the state it puts back may be one a validator set since refuses
/// (MongoDB's phased tightening: the validator comes before the backfill it requires). That
/// needs the `bypassDocumentValidation` privilege (roles dbAdmin, restore), as setting the
/// validator (collMod) needed dbAdmin; a collection without a validator is written as usual.
async fn validated(db: &Database, coll: &str) -> Result<bool, ExecError> {
    let info =
        crate::mongo::collection_info(db, coll).await.map_err(mongo(format!("reading the options of {coll}")))?;
    let options = info.and_then(|i| i.get_document("options").ok().cloned()).unwrap_or_default();
    let validator = options.get_document("validator").is_ok_and(|v| !v.is_empty());
    Ok(validator && options.get_str("validationLevel") != Ok("off"))
}

/// Drop `coll` if nothing is in it and nobody gave it an index: what an insert into a missing
/// collection created. Anything the application put there since keeps it.
async fn drop_if_empty(db: &Database, coll: &str) -> Result<(), ExecError> {
    if !crate::mongo::collection_exists(db, coll).await.map_err(mongo("looking for the collection"))? {
        return Ok(());
    }
    let c = db.collection::<bson::Document>(coll);
    let empty = c.find_one(bson::doc! {}).await.map_err(mongo("looking into the collection"))?.is_none();
    let indexes = crate::mongo::list_indexes(db, coll).await.map_err(mongo("listing indexes"))?;
    if empty && indexes.iter().all(|i| i.get_str("name") == Ok("_id_")) {
        c.drop().await.map_err(mongo("dropping the collection the step created"))?;
    }
    Ok(())
}
