//! Documents into JavaScript: BSON written straight into the JSON text `JSON.parse` reads.
//!
//! Relaxed Extended JSON (see [`bsonx::to_js_json`]), written from the raw bytes the server
//! sent without decoding them into a `Document` first. Where dates (kind 0) and ObjectIds
//! (kind 1) are is noted as `[document index, path, kind]`, so JavaScript converts only those.

use std::fmt::Write;

use bson::{Bson, RawBsonRef, RawDocument};

use crate::engine::bsonx;

enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// Append one document to `out`, noting its special values in `specials`.
pub fn write_document(
    d: &RawDocument,
    out: &mut String,
    doc: usize,
    specials: &mut Vec<serde_json::Value>,
) -> Result<(), String> {
    write_fields(d, out, doc, &mut Vec::new(), specials)
}

fn write_fields<'a>(
    d: &'a RawDocument,
    out: &mut String,
    doc: usize,
    path: &mut Vec<Seg<'a>>,
    specials: &mut Vec<serde_json::Value>,
) -> Result<(), String> {
    if path.len() >= bsonx::MAX_DEPTH {
        return Err(format!("a document is nested deeper than {} levels, MongoDB's limit", bsonx::MAX_DEPTH));
    }
    out.push('{');
    for (n, el) in d.iter().enumerate() {
        let (k, v) = el.map_err(|e| format!("a document is not valid BSON: {e}"))?;
        if n > 0 {
            out.push(',');
        }
        write_str(k, out);
        out.push(':');
        path.push(Seg::Key(k));
        write_value(v, out, doc, path, specials)?;
        path.pop();
    }
    out.push('}');
    Ok(())
}

fn write_value<'a>(
    b: RawBsonRef<'a>,
    out: &mut String,
    doc: usize,
    path: &mut Vec<Seg<'a>>,
    specials: &mut Vec<serde_json::Value>,
) -> Result<(), String> {
    const SAFE: i64 = 1 << 53;
    match b {
        RawBsonRef::Document(d) => write_fields(d, out, doc, path, specials)?,
        RawBsonRef::Array(a) => {
            if path.len() >= bsonx::MAX_DEPTH {
                return Err(format!("a document is nested deeper than {} levels, MongoDB's limit", bsonx::MAX_DEPTH));
            }
            out.push('[');
            for (n, v) in a.into_iter().enumerate() {
                let v = v.map_err(|e| format!("a document is not valid BSON: {e}"))?;
                if n > 0 {
                    out.push(',');
                }
                path.push(Seg::Index(n));
                write_value(v, out, doc, path, specials)?;
                path.pop();
            }
            out.push(']');
        }
        RawBsonRef::String(v) => write_str(v, out),
        RawBsonRef::Int32(v) => {
            let _ = write!(out, "{v}");
        }
        RawBsonRef::Int64(v) if v.unsigned_abs() <= SAFE as u64 => {
            let _ = write!(out, "{v}");
        }
        RawBsonRef::Double(v) if v.is_finite() => {
            let _ = write!(out, "{v:?}");
        }
        RawBsonRef::Boolean(v) => out.push_str(if v { "true" } else { "false" }),
        RawBsonRef::Null => out.push_str("null"),
        other => {
            if matches!(other, RawBsonRef::DateTime(_) | RawBsonRef::ObjectId(_)) {
                let p: Vec<serde_json::Value> = path
                    .iter()
                    .map(|s| match s {
                        Seg::Key(k) => serde_json::Value::from(*k),
                        Seg::Index(i) => serde_json::Value::from(*i),
                    })
                    .collect();
                let kind = if matches!(other, RawBsonRef::DateTime(_)) { 0 } else { 1 };
                specials.push(serde_json::json!([doc, p, kind]));
            }
            let value = Bson::try_from(other).map_err(|e| format!("a document is not valid BSON: {e}"))?;
            out.push_str(&bsonx::to_js_json(&value).to_string());
        }
    }
    Ok(())
}

/// A JSON string literal.
fn write_str(s: &str, out: &mut String) {
    out.push('"');
    let mut plain = 0; // start of the run of characters that need no escape
    for (i, c) in s.char_indices() {
        let escape = match c {
            '"' => "\\\"",
            '\\' => "\\\\",
            '\n' => "\\n",
            '\r' => "\\r",
            '\t' => "\\t",
            c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => "",
            _ => continue,
        };
        out.push_str(&s[plain..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push_str(escape);
        }
        plain = i + c.len_utf8();
    }
    out.push_str(&s[plain..]);
    out.push('"');
}
