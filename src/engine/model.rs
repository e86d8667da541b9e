//! The migration file format: what a `<version>_<slug>.yaml` file may contain.
//!
//! These types are the single source of truth for the format: the loader parses into them,
//! and `dbshift schema` publishes their JSON Schema (generated with schemars) for editors.
//! Filters, values and documents are written as YAML that maps to MongoDB Extended JSON, so
//! `{ $date: "2025-01-01T00:00:00Z" }` or `{ $oid: "..." }` become real BSON dates and ids.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

/// One migration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(title = "dbshift migration")]
pub struct MigrationFile {
    /// What this migration does, in a sentence. Shown by `status` and recorded when applied.
    #[serde(default)]
    pub description: String,
    /// Who wrote it (a name or e-mail). Recorded when applied.
    #[serde(default)]
    pub author: String,
    /// Run only when one of these profiles is active (`--profile`); empty means always.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<String>,
    /// Run every operation of this migration inside one MongoDB transaction when the server
    /// supports them (replica set or sharded cluster). Only data operations may then appear
    /// (no index, collection or transform operations). Without a transaction dbshift still
    /// undoes a half-applied migration from its rollback data.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub transaction: bool,
    /// The operations that apply this migration, in order.
    pub up: Vec<Operation>,
    /// Optional explicit inverse. Without it dbshift inverts `up` automatically: invertible
    /// operations are inverted, lossy ones are undone from the pre-images stored when they ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down: Option<Vec<Operation>>,
    /// Checks that must hold after `up` (run by `up` and by `validate`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub validate: Vec<Check>,
}

/// One operation. Exactly one key names the operation, e.g. `addField: {...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Operation {
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

/// A collection name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CollectionRef {
    /// Collection name.
    pub collection: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddField {
    /// Collection name.
    pub collection: String,
    /// Field path (dots for nested fields).
    pub field: String,
    /// Default value (any YAML / Extended JSON value).
    pub value: Json,
    /// Only documents matching this filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Json>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RemoveField {
    /// Collection name.
    pub collection: String,
    /// Field path (dots for nested fields).
    pub field: String,
    /// Only documents matching this filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Json>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RenameField {
    /// Collection name.
    pub collection: String,
    /// Current field path.
    pub from: String,
    /// New field path.
    pub to: String,
    /// Only documents matching this filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Json>,
}

/// Target BSON types for `convertType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BsonType {
    String,
    Int,
    Long,
    Double,
    Decimal,
    Bool,
    Date,
    ObjectId,
}

impl BsonType {
    /// The name MongoDB's `$convert` and `$type` use.
    pub fn mongo_name(self) -> &'static str {
        match self {
            BsonType::String => "string",
            BsonType::Int => "int",
            BsonType::Long => "long",
            BsonType::Double => "double",
            BsonType::Decimal => "decimal",
            BsonType::Bool => "bool",
            BsonType::Date => "date",
            BsonType::ObjectId => "objectId",
        }
    }
}

/// What `convertType` does with a value that cannot be converted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OnConvertError {
    /// Stop the migration (and undo it) at the first value that cannot be converted.
    #[default]
    Fail,
    /// Leave such values as they are.
    Keep,
    /// Set such values to null.
    SetNull,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConvertType {
    /// Collection name.
    pub collection: String,
    /// Field path (dots for nested fields).
    pub field: String,
    /// The type to convert to.
    pub to: BsonType,
    /// Convert only values currently of this type (default: any type other than `to`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<BsonType>,
    /// What to do with values that cannot be converted.
    #[serde(default)]
    pub on_error: OnConvertError,
    /// Only documents matching this filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Json>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateIndex {
    /// Collection name.
    pub collection: String,
    /// Index keys in order, e.g. `{ tenant: 1, createdAt: -1 }`.
    pub keys: serde_json::Map<String, Json>,
    /// Index name (default: MongoDB's generated name, e.g. `tenant_1_createdAt_-1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Reject duplicate keys.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unique: bool,
    /// Skip documents that lack the indexed field.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sparse: bool,
    /// TTL index: delete documents this many seconds after the date in the (single) key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_after_seconds: Option<u32>,
    /// Partial index: only documents matching this filter are indexed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_filter_expression: Option<Json>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DropIndex {
    /// Collection name.
    pub collection: String,
    /// Index name.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateCollection {
    /// Collection name.
    pub collection: String,
    /// A `$jsonSchema` document used as the collection's validator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_schema: Option<Json>,
    /// Any other validator query (combined with `jsonSchema` when both are given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validator: Option<Json>,
    /// `strict` (default) or `moderate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_level: Option<ValidationLevel>,
    /// `error` (default) or `warn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_action: Option<ValidationAction>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ValidationLevel {
    Off,
    Strict,
    Moderate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ValidationAction {
    Error,
    Warn,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RenameCollection {
    /// Current collection name.
    pub from: String,
    /// New collection name (must not exist).
    pub to: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InsertDocuments {
    /// Collection name.
    pub collection: String,
    /// The documents to insert.
    pub documents: Vec<serde_json::Map<String, Json>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeleteDocuments {
    /// Collection name.
    pub collection: String,
    /// Documents matching this filter are deleted (required; use `{}` for all).
    pub filter: Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateMany {
    /// Collection name.
    pub collection: String,
    /// Documents matching this filter are updated (required; use `{}` for all).
    pub filter: Json,
    /// Update operators (`{ $set: {...} }`) or an aggregation pipeline (a list of stages).
    pub update: Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Transform {
    /// Collection name.
    pub collection: String,
    /// A JavaScript function `(doc) => { ...; return doc; }`. Returning null or undefined
    /// leaves the document unchanged. `_id` cannot be changed.
    pub script: String,
    /// Only documents matching this filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Json>,
    /// Documents per batch (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunCommand {
    /// The command document, e.g. `{ collMod: orders, validationLevel: moderate }`.
    pub command: serde_json::Map<String, Json>,
}

/// How stored pre-images are written back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RestoreMode {
    /// Put back the stored top-level fields, leave the others.
    Fields,
    /// Replace the whole document (re-inserting it if it is gone).
    Replace,
}

/// Internal undo step: documents saved in `_dbshift_rollback` before a lossy operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RestorePreimages {
    /// Collection the documents belong to.
    pub collection: String,
    /// The key of the rollback data (`<version>/<step>`).
    pub key: String,
    /// How to write them back.
    pub mode: RestoreMode,
    /// Fields to remove first (fields the operation added that the pre-images do not hold).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unset: Vec<String>,
}

/// A post-migration check. Exactly one key names the check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Check {
    /// Count documents matching `filter` and compare.
    Count(CountCheck),
    /// An index with this name (or these keys) exists.
    IndexExists(IndexExistsCheck),
    /// Every document (matching `filter`) satisfies this `$jsonSchema`.
    JsonSchema(JsonSchemaCheck),
    /// An aggregation that must return no documents (each returned document is a violation).
    Aggregate(AggregateCheck),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CountCheck {
    /// Collection name.
    pub collection: String,
    /// Documents to count (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Json>,
    /// The count must equal this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<u64>,
    /// The count must be at most this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
    /// The count must be at least this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IndexExistsCheck {
    /// Collection name.
    pub collection: String,
    /// Index name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Index keys (compared in order), when no name is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<serde_json::Map<String, Json>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JsonSchemaCheck {
    /// Collection name.
    pub collection: String,
    /// The `$jsonSchema` every document must match.
    pub schema: Json,
    /// Only documents matching this filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Json>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AggregateCheck {
    /// Collection name.
    pub collection: String,
    /// Aggregation pipeline; any document it returns is reported as a violation.
    pub pipeline: Vec<Json>,
    /// What the check means, for the report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl Operation {
    /// The operation's name as written in files.
    pub fn kind(&self) -> &'static str {
        match self {
            Operation::AddField(_) => "addField",
            Operation::RemoveField(_) => "removeField",
            Operation::RenameField(_) => "renameField",
            Operation::ConvertType(_) => "convertType",
            Operation::CreateIndex(_) => "createIndex",
            Operation::DropIndex(_) => "dropIndex",
            Operation::CreateCollection(_) => "createCollection",
            Operation::DropCollection(_) => "dropCollection",
            Operation::RenameCollection(_) => "renameCollection",
            Operation::InsertDocuments(_) => "insertDocuments",
            Operation::DeleteDocuments(_) => "deleteDocuments",
            Operation::UpdateMany(_) => "updateMany",
            Operation::Transform(_) => "transform",
            Operation::RunCommand(_) => "runCommand",
            Operation::RestorePreimages(_) => "restorePreimages",
        }
    }

    /// The collection the operation works on (the source, for renames); None for runCommand.
    pub fn collection(&self) -> Option<&str> {
        Some(match self {
            Operation::AddField(o) => &o.collection,
            Operation::RemoveField(o) => &o.collection,
            Operation::RenameField(o) => &o.collection,
            Operation::ConvertType(o) => &o.collection,
            Operation::CreateIndex(o) => &o.collection,
            Operation::DropIndex(o) => &o.collection,
            Operation::CreateCollection(o) => &o.collection,
            Operation::DropCollection(o) => &o.collection,
            Operation::RenameCollection(o) => &o.from,
            Operation::InsertDocuments(o) => &o.collection,
            Operation::DeleteDocuments(o) => &o.collection,
            Operation::UpdateMany(o) => &o.collection,
            Operation::Transform(o) => &o.collection,
            Operation::RestorePreimages(o) => &o.collection,
            Operation::RunCommand(_) => return None,
        })
    }

    /// Whether the operation changes documents (as opposed to indexes or collections).
    pub fn is_data_operation(&self) -> bool {
        matches!(
            self,
            Operation::AddField(_)
                | Operation::RemoveField(_)
                | Operation::RenameField(_)
                | Operation::ConvertType(_)
                | Operation::InsertDocuments(_)
                | Operation::DeleteDocuments(_)
                | Operation::UpdateMany(_)
        )
    }
}

impl Check {
    pub fn kind(&self) -> &'static str {
        match self {
            Check::Count(_) => "count",
            Check::IndexExists(_) => "indexExists",
            Check::JsonSchema(_) => "jsonSchema",
            Check::Aggregate(_) => "aggregate",
        }
    }
    pub fn collection(&self) -> &str {
        match self {
            Check::Count(c) => &c.collection,
            Check::IndexExists(c) => &c.collection,
            Check::JsonSchema(c) => &c.collection,
            Check::Aggregate(c) => &c.collection,
        }
    }
}
