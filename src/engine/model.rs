//! The migration file format: what a `<version>_<slug>.yaml` file may contain.
//!
//! These types are the single source of truth for the format: the loader parses into them,
//! and `dbshift schema` publishes their JSON Schema (generated with schemars) for editors.
//! Filters, values and documents are written as YAML that maps to MongoDB Extended JSON, so
//! `{ $date: "2025-01-01T00:00:00Z" }` or `{ $oid: "..." }` become real BSON dates and ids.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

pub use super::ops::Operation;

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
    /// Checks that must hold before `up` changes anything: run on each tenant before its lock
    /// and its snapshot, on the data as it is before this run (so not on what an earlier
    /// pending migration would change). A tenant that fails one is left untouched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub precheck: Vec<Check>,
    /// What a failed pre-check does to the tenant: `fail` (default) or `skip` (the run goes on
    /// without it). Either way the tenant is untouched and the results are reported.
    #[serde(default, skip_serializing_if = "PrecheckFailure::is_fail")]
    pub on_precheck_failure: PrecheckFailure,
    /// Risk warnings of `dbshift lint` accepted for a step, each with why (editing this never
    /// changes the migration's checksum).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acknowledge: Vec<Acknowledgement>,
}

/// What a failed pre-check does to its tenant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PrecheckFailure {
    /// The tenant fails (exit 1), untouched.
    #[default]
    Fail,
    /// The tenant is skipped, untouched; the others go on.
    Skip,
}

impl PrecheckFailure {
    fn is_fail(&self) -> bool {
        *self == PrecheckFailure::Fail
    }
}

/// One risk warning accepted for one step of `up`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Acknowledgement {
    /// The warning's code, e.g. `DS001`.
    pub code: String,
    /// The step of `up` it is about, counted from 1.
    pub step: u32,
    /// Why the step is fine as it is (for reviewers).
    pub reason: String,
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
    /// No two documents share the values of these keys (what a unique index on them needs;
    /// a missing field counts as null, as the index counts it). Array values are compared
    /// whole: a multikey index compares each element, so duplicates inside arrays are missed.
    Unique(UniqueCheck),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UniqueCheck {
    /// Collection name.
    pub collection: String,
    /// The keys, as a unique index would name them (`{ code: 1 }`, `{ tenant: 1, sku: 1 }`).
    pub keys: serde_json::Map<String, Json>,
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

impl Check {
    pub fn kind(&self) -> &'static str {
        match self {
            Check::Count(_) => "count",
            Check::IndexExists(_) => "indexExists",
            Check::JsonSchema(_) => "jsonSchema",
            Check::Aggregate(_) => "aggregate",
            Check::Unique(_) => "unique",
        }
    }
    pub fn collection(&self) -> &str {
        match self {
            Check::Count(c) => &c.collection,
            Check::IndexExists(c) => &c.collection,
            Check::JsonSchema(c) => &c.collection,
            Check::Aggregate(c) => &c.collection,
            Check::Unique(c) => &c.collection,
        }
    }
}
