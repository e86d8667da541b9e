//! Migration operations, one file each. An operation's file holds everything about it:
//!
//! - its fields (what a migration file may write),
//! - `check`: the problems found in a file without a database (`lint`),
//! - `prepare`: preconditions, and what it stores before anything changes (pre-images in the
//!   step's [pre-image store](super::preimages), a dropped collection moved aside); it returns
//!   the operation to execute and its `undo`,
//! - `undo`: the operations that put the database back,
//! - `execute`: the change itself,
//! - `estimate`: how many documents it would touch, for plans.
//!
//! Adding an operation: a file here, a `mod` line, and a line in [`operations!`] below.

use std::sync::Arc;

use mongodb::{ClientSession, Database};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::bsonx;
use super::pass::{Guard, Pass, Server};

mod add_field;
mod convert_type;
mod create_collection;
mod create_index;
mod delete_documents;
mod drop_collection;
mod drop_index;
mod insert_documents;
mod remove_field;
mod rename_collection;
mod rename_field;
mod restore_preimages;
mod run_command;
mod set_validator;
mod transform;
mod update_many;

pub use add_field::AddField;
pub use convert_type::{BsonType, ConvertType, OnConvertError};
pub use create_collection::{CreateCollection, ValidationAction, ValidationLevel};
pub(crate) use create_index::same_index;
pub use create_index::CreateIndex;
pub use delete_documents::DeleteDocuments;
pub use drop_collection::CollectionRef;
pub use drop_index::DropIndex;
pub use insert_documents::InsertDocuments;
pub use remove_field::RemoveField;
pub use rename_collection::RenameCollection;
pub use rename_field::RenameField;
pub use restore_preimages::{Recompute, RestorePreimages};
pub use run_command::RunCommand;
pub use set_validator::SetValidator;
pub use transform::Transform;
pub use update_many::UpdateMany;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The operation cannot run on this database as it is (a precondition failed).
    #[error("{0}")]
    Precondition(String),
    /// The operation's own input is wrong (found only at run time, e.g. a value that cannot convert).
    #[error("{0}")]
    Data(String),
    /// Stopped before the next write: the lock was lost, or the process was asked to stop.
    #[error("{0}")]
    Stopped(String),
    #[error("{action}: {}", crate::mongo::describe(source))]
    Mongo {
        action: String,
        #[source]
        source: mongodb::error::Error,
    },
}

/// Wraps a driver error with the action that failed.
pub(crate) fn mongo(action: impl Into<String>) -> impl FnOnce(mongodb::error::Error) -> ExecError {
    let action = action.into();
    move |source| ExecError::Mongo { action, source }
}

pub(crate) fn data_err(e: String) -> ExecError {
    ExecError::Data(e)
}

/// Progress of long operations: (documents done, documents expected if known).
pub type Progress = Arc<dyn Fn(u64, Option<u64>) + Send + Sync>;

/// How an operation is undone.
#[derive(Debug, Clone, PartialEq)]
pub enum Undo {
    /// Run these operations, in order.
    Ops(Vec<Operation>),
    /// It cannot be undone automatically, and why.
    Impossible(String),
}

/// What `prepare` found and stored.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The operation to execute (with run-time choices filled in, e.g. generated `_id`s).
    pub op: Operation,
    pub undo: Undo,
    /// Nothing to do (e.g. the identical index already exists).
    pub skip: bool,
}

impl Prepared {
    pub fn new(op: Operation, undo: Vec<Operation>) -> Self {
        Prepared { op, undo: Undo::Ops(undo), skip: false }
    }

    pub fn irreversible(op: Operation, why: impl Into<String>) -> Self {
        Prepared { op, undo: Undo::Impossible(why.into()), skip: false }
    }

    /// Nothing to do and nothing to undo.
    pub fn skip(op: Operation) -> Self {
        Prepared { op, undo: Undo::Ops(Vec::new()), skip: true }
    }
}

/// Where an operation executes: the tenant database, its step key (which names the step's
/// pre-image store), the migration's transaction when it has one, a progress report, what
/// stops it before its next write, and what the server offers.
pub struct Exec<'a> {
    pub db: &'a Database,
    pub key: &'a str,
    pub session: Option<&'a mut ClientSession>,
    pub progress: Option<Progress>,
    pub guard: &'a Guard,
    pub server: Server,
    /// Conflicts met by restores: (how many, the first `_id`s).
    pub conflicts: (u64, Vec<bson::Bson>),
}

impl Exec<'_> {
    /// Count conflicts a restore met.
    pub fn conflicts(&mut self, n: u64, ids: Vec<bson::Bson>) {
        self.conflicts.0 += n;
        for id in ids {
            if self.conflicts.1.len() < 100 {
                self.conflicts.1.push(id);
            }
        }
    }

    /// A document pass over `coll` (see [`super::pass`]).
    pub fn pass<'s>(&'s mut self, coll: &'s str) -> Pass<'s> {
        Pass {
            db: self.db,
            coll,
            guard: self.guard,
            server: self.server,
            outer: self.session.as_deref_mut(),
            progress: self.progress.clone(),
            batching: Default::default(),
            bypass_validation: false,
        }
    }
}

/// What every operation provides (see the module documentation).
#[allow(async_fn_in_trait)] // dispatched through the `Operation` enum, never as `dyn`
pub trait Op {
    /// The name as written in files.
    const KIND: &'static str;
    /// The collection it works on (the source, for renames); `None` for runCommand.
    fn collection(&self) -> Option<&str>;
    /// Whether it changes documents (as opposed to indexes or collections): only those may
    /// run inside a transaction.
    fn is_data_operation(&self) -> bool {
        false
    }
    /// Problems found without a database, each a sentence (the collection name is checked for all).
    fn check(&self) -> Vec<Option<String>>;
    /// Check preconditions, store what will be destroyed, and work out the undo.
    async fn prepare(&self, db: &Database, key: &str) -> Result<Prepared, ExecError>;
    /// Change the data. Returns the number of documents affected.
    async fn execute(&self, x: &mut Exec<'_>) -> Result<u64, ExecError>;
    /// How many documents it would touch (for plans), when that can be known cheaply.
    async fn estimate(&self, _db: &Database) -> Result<Option<u64>, ExecError> {
        Ok(None)
    }
}

/// Declares the `Operation` enum (the file format: exactly one key names the operation) and
/// dispatches each method to the operation's own file.
macro_rules! operations {
    ($( $(#[$meta:meta])* $variant:ident($ty:ty), )*) => {
        /// One operation. Exactly one key names the operation, e.g. `addField: {...}`.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
        #[serde(rename_all = "camelCase")]
        pub enum Operation {
            $( $(#[$meta])* $variant($ty), )*
        }

        impl Operation {
            /// The operation's name as written in files.
            pub fn kind(&self) -> &'static str {
                match self { $( Operation::$variant(_) => <$ty as Op>::KIND, )* }
            }
            /// The collection the operation works on (the source, for renames); None for runCommand.
            pub fn collection(&self) -> Option<&str> {
                match self { $( Operation::$variant(o) => o.collection(), )* }
            }
            /// Whether the operation changes documents (as opposed to indexes or collections).
            pub fn is_data_operation(&self) -> bool {
                match self { $( Operation::$variant(o) => o.is_data_operation(), )* }
            }
            /// Problems found without a database (`lint`).
            pub fn check(&self) -> Vec<String> {
                let own = match self { $( Operation::$variant(o) => o.check(), )* };
                let name = self.collection().and_then(collection_problem);
                name.into_iter().chain(own.into_iter().flatten()).collect()
            }
            /// Phase one: check preconditions, store what will be destroyed, work out the undo.
            pub async fn prepare(&self, db: &Database, key: &str) -> Result<Prepared, ExecError> {
                match self { $( Operation::$variant(o) => o.prepare(db, key).await, )* }
            }
            /// Phase two: change the data (nothing when `prepare` said there is nothing to do).
            pub async fn execute(&self, x: &mut Exec<'_>) -> Result<u64, ExecError> {
                match self { $( Operation::$variant(o) => o.execute(x).await, )* }
            }
            pub async fn estimate(&self, db: &Database) -> Result<Option<u64>, ExecError> {
                match self { $( Operation::$variant(o) => o.estimate(db).await, )* }
            }
        }
    };
}

operations! {
    /// Set `field` to `value` on documents where the field is missing.
    AddField(AddField),
    /// Remove `field` from every document (matching `filter`). Lossy: removed values are kept as rollback data.
    RemoveField(RemoveField),
    /// Rename `from` to `to` on every document (matching `filter`).
    RenameField(RenameField),
    /// Convert the type of `field` (e.g. string to date). Lossy: previous values are kept as rollback data.
    ConvertType(ConvertType),
    /// Create an index (compound, unique, TTL, partial).
    CreateIndex(CreateIndex),
    /// Drop an index by name. Its definition is kept so it can be re-created.
    DropIndex(DropIndex),
    /// Create a collection, optionally with a `$jsonSchema` validator.
    CreateCollection(CreateCollection),
    /// Change an existing collection's validator, validationLevel and validationAction (collMod). Undone by putting the previous options back.
    SetValidator(SetValidator),
    /// Drop a collection. Lossy: the collection is moved aside (renamed) and kept as rollback data.
    DropCollection(CollectionRef),
    /// Rename a collection within the database.
    RenameCollection(RenameCollection),
    /// Insert documents (seed data). Documents without `_id` get one at run time.
    InsertDocuments(InsertDocuments),
    /// Delete documents matching `filter`. Lossy: deleted documents are kept as rollback data.
    DeleteDocuments(DeleteDocuments),
    /// `updateMany` with update operators or an aggregation-pipeline update. Lossy: pre-images are kept.
    UpdateMany(UpdateMany),
    /// Run a JavaScript function over every document (matching `filter`), in batches.
    Transform(Transform),
    /// Escape hatch: run a database command. Not invertible: give the migration a `down`.
    RunCommand(RunCommand),
    /// Internal (never written by hand): put back documents stored as rollback data.
    #[schemars(skip)]
    #[serde(rename = "_restorePreimages")]
    RestorePreimages(RestorePreimages),
}

/// Problems with a collection name written by a user.
pub fn collection_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("collection name is empty".into())
    } else if name.starts_with(super::tracking::INTERNAL_PREFIX) {
        Some(format!("collection `{name}`: names starting with `_dbshift` are reserved for dbshift's own data"))
    } else if name.starts_with("system.") {
        Some(format!("collection `{name}`: system collections cannot be migrated"))
    } else if name.contains('$') || name.contains('\0') {
        Some(format!("collection `{name}` contains `$` or a NUL character"))
    } else {
        None
    }
}

/// Problems with a field path written by a user (`what` names the key it was given in).
pub(crate) fn field_problem(field: &str, what: &str) -> Option<String> {
    if field.is_empty() {
        Some(format!("`{what}` is empty"))
    } else if field.contains('\0') {
        Some(format!("`{what}` contains a NUL character"))
    } else if field.len() > 1024 {
        Some(format!("`{what}` is longer than 1024 bytes"))
    } else if field.starts_with('$') || field.split('.').any(|s| s.is_empty()) {
        Some(format!("`{what}` `{field}` is not a valid field path"))
    } else if field == "_id" || field.starts_with("_id.") {
        Some(format!("`{what}` cannot be `_id`: a document's _id cannot change"))
    } else {
        None
    }
}

/// Problems with a filter or other document written as Extended JSON.
pub(crate) fn filter_problem(filter: Option<&serde_json::Value>, what: &str) -> Option<String> {
    filter.and_then(|f| bsonx::to_doc(f).err()).map(|e| format!("`{what}`: {e}"))
}

/// Canonical Extended JSON of a BSON value (how undo operations are written).
pub(crate) fn json(b: bson::Bson) -> serde_json::Value {
    b.into_canonical_extjson()
}

/// The undo step that puts a step's stored pre-images back (`recompute`: how to tell what the
/// change wrote, for changes the server computed).
pub(crate) fn restore(collection: &str, key: &str, recompute: Option<Recompute>) -> Operation {
    Operation::RestorePreimages(RestorePreimages {
        collection: collection.to_string(),
        key: key.to_string(),
        recompute,
        drop_if_empty: false,
    })
}

/// Count the documents of `coll` matching `q`, for plans.
pub(crate) async fn count(db: &Database, coll: &str, q: bson::Document) -> Result<Option<u64>, ExecError> {
    db.collection::<bson::Document>(coll)
        .count_documents(q)
        .await
        .map(Some)
        .map_err(mongo("counting documents for the plan"))
}
