//! Conversions between the YAML/JSON written in migration files and BSON, and small BSON helpers.

use bson::{Bson, Document};
use serde_json::Value as Json;

/// Parse a YAML/JSON value as MongoDB Extended JSON (`{$date: ...}`, `{$oid: ...}` become BSON types).
pub fn to_bson(value: &Json) -> Result<Bson, String> {
    Bson::try_from(value.clone()).map_err(|e| format!("not valid Extended JSON: {e}"))
}

/// Like [`to_bson`], for values that must be documents (filters, updates, commands).
pub fn to_doc(value: &Json) -> Result<Document, String> {
    match to_bson(value)? {
        Bson::Document(d) => Ok(d),
        other => Err(format!("expected a mapping, found {}", type_name(&other))),
    }
}

pub fn map_to_doc(map: &serde_json::Map<String, Json>) -> Result<Document, String> {
    to_doc(&Json::Object(map.clone()))
}

/// An optional filter (`None` = every document).
pub fn filter_doc(value: Option<&Json>) -> Result<Document, String> {
    value.map(to_doc).transpose().map(|d| d.unwrap_or_default())
}

/// How deep documents and arrays may nest: MongoDB's limit for a BSON document (a top-level
/// document is level 1). Every recursive conversion stops here with an error instead of
/// running out of stack.
pub const MAX_DEPTH: usize = 100;

/// `a AND b`, without nesting when one side is empty.
pub fn and(a: Document, b: Document) -> Document {
    if a.is_empty() {
        b
    } else if b.is_empty() {
        a
    } else {
        bson::doc! { "$and": [a, b] }
    }
}

/// The first segment of a dotted path: the top-level field that holds it.
pub fn top_field(path: &str) -> &str {
    path.split('.').next().unwrap_or(path)
}

/// The name `$type` gives a value's BSON type.
pub fn type_name_mongo(b: &Bson) -> &'static str {
    match b {
        Bson::Double(_) => "double",
        Bson::String(_) => "string",
        Bson::Document(_) => "object",
        Bson::Array(_) => "array",
        Bson::Binary(_) => "binData",
        Bson::Undefined => "undefined",
        Bson::ObjectId(_) => "objectId",
        Bson::Boolean(_) => "bool",
        Bson::DateTime(_) => "date",
        Bson::Null => "null",
        Bson::RegularExpression(_) => "regex",
        Bson::DbPointer(_) => "dbPointer",
        Bson::JavaScriptCode(_) => "javascript",
        Bson::Symbol(_) => "symbol",
        Bson::JavaScriptCodeWithScope(_) => "javascriptWithScope",
        Bson::Int32(_) => "int",
        Bson::Timestamp(_) => "timestamp",
        Bson::Int64(_) => "long",
        Bson::Decimal128(_) => "decimal",
        Bson::MinKey => "minKey",
        Bson::MaxKey => "maxKey",
    }
}

pub fn type_name(b: &Bson) -> &'static str {
    match b {
        Bson::Double(_) => "double",
        Bson::String(_) => "string",
        Bson::Array(_) => "array",
        Bson::Document(_) => "document",
        Bson::Boolean(_) => "bool",
        Bson::Null => "null",
        Bson::Int32(_) => "int",
        Bson::Int64(_) => "long",
        Bson::DateTime(_) => "date",
        Bson::ObjectId(_) => "objectId",
        Bson::Decimal128(_) => "decimal",
        Bson::Binary(_) => "binData",
        _ => "other",
    }
}

/// Extended JSON for the JavaScript side of `transform`: relaxed, except that 64-bit integers
/// JavaScript cannot hold exactly stay `{$numberLong}` so they survive the round trip.
pub fn to_js_json(b: &Bson) -> Json {
    const SAFE: i64 = 1 << 53;
    match b {
        Bson::Int64(v) if v.unsigned_abs() > SAFE as u64 => serde_json::json!({ "$numberLong": v.to_string() }),
        Bson::Document(d) => Json::Object(d.iter().map(|(k, v)| (k.clone(), to_js_json(v))).collect()),
        Bson::Array(a) => Json::Array(a.iter().map(to_js_json).collect()),
        other => other.clone().into_relaxed_extjson(),
    }
}

/// After a value went through JavaScript (where every number is a double), give numbers that
/// did not change their original BSON type back (`Int32(5)` stays `Int32`, `Double(1.0)` stays double).
pub fn restore_number_types(new: Bson, old: Option<&Bson>) -> Bson {
    match (new, old) {
        (Bson::Document(nd), Some(Bson::Document(od))) => Bson::Document(restore_document_types(nd, od)),
        (Bson::Array(na), Some(Bson::Array(oa))) => {
            Bson::Array(na.into_iter().enumerate().map(|(i, v)| restore_number_types(v, oa.get(i))).collect())
        }
        (n, Some(o)) => match (as_f64(&n), as_f64(o)) {
            (Some(a), Some(b)) if a == b || (a.is_nan() && b.is_nan()) => o.clone(),
            _ => n,
        },
        (n, None) => n,
    }
}

/// [`restore_number_types`] for a whole document, without copying the original. JavaScript
/// puts integer-like keys first: where there is one, the fields of the original keep their
/// place (as the transform bridge does, src/engine/script/from_js.rs).
fn restore_document_types(new: Document, old: &Document) -> Document {
    let mut fields: Vec<(String, Bson)> = new
        .into_iter()
        .map(|(k, v)| {
            let o = old.get(&k);
            (k, restore_number_types(v, o))
        })
        .collect();
    if fields.iter().any(|(k, _)| crate::engine::script::integer_like(k)) {
        let at = |k: &str| old.keys().position(|o| o == k).unwrap_or(usize::MAX);
        fields.sort_by_key(|(k, _)| at(k));
    }
    fields.into_iter().collect()
}

fn as_f64(b: &Bson) -> Option<f64> {
    match b {
        Bson::Int32(v) => Some(*v as f64),
        Bson::Int64(v) => Some(*v as f64),
        Bson::Double(v) => Some(*v),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    #[test]
    fn extended_json_becomes_bson_types() {
        let v: Json =
            serde_json::json!({"at": {"$date": "2025-01-01T00:00:00Z"}, "n": 3, "big": 5000000000i64, "x": 1.5});
        let d = to_doc(&v).unwrap();
        assert!(matches!(d.get("at"), Some(Bson::DateTime(_))));
        assert_eq!(d.get("n"), Some(&Bson::Int32(3)));
        assert_eq!(d.get("big"), Some(&Bson::Int64(5_000_000_000)));
        assert_eq!(d.get("x"), Some(&Bson::Double(1.5)));
        assert!(to_doc(&serde_json::json!([1])).unwrap_err().contains("expected a mapping"));
    }

    #[test]
    fn number_types_survive_unchanged_values_only() {
        let old = Bson::Document(doc! {"a": 1.0f64, "b": 5i64, "c": 7, "d": {"e": 2.0f64}});
        let new = Bson::Document(doc! {"a": 1, "b": 5, "c": 8, "d": {"e": 2}, "f": 3});
        let got = restore_number_types(new, Some(&old));
        assert_eq!(got, Bson::Document(doc! {"a": 1.0f64, "b": 5i64, "c": 8, "d": {"e": 2.0f64}, "f": 3}));
    }

    #[test]
    fn huge_longs_stay_exact_for_javascript() {
        let j = to_js_json(&Bson::Int64(9_007_199_254_740_993));
        assert_eq!(j, serde_json::json!({"$numberLong": "9007199254740993"}));
        assert_eq!(to_js_json(&Bson::Int64(42)), serde_json::json!(42));
    }
}
