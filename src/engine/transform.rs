//! `transform`: a user's JavaScript function run over documents, in an embedded QuickJS engine.
//!
//! Documents cross into JavaScript as Extended JSON, a batch at a time (one call per batch, not
//! per document): dates become `Date`, ObjectIds an `ObjectId` object (`.toString()` gives the
//! hex), 64-bit integers beyond 2^53 stay `{$numberLong}` objects, and every other number is a
//! JavaScript number. On the way back, numbers whose value did not change keep their original
//! BSON type; new integral numbers become int/long, others double.

use std::time::{Duration, Instant};

use bson::{Bson, Document};
use rquickjs::{Context, Function, Runtime};

use super::bsonx;

/// The JavaScript heap a transform may use.
const MEMORY_LIMIT: usize = 48 << 20;
/// The longest one batch may run before it is stopped (an endless loop in a script).
const BATCH_DEADLINE: Duration = Duration::from_secs(120);

const PRELUDE: &str = r#"
class ObjectId {
  constructor(hex) { this.$oid = String(hex); }
  toString() { return this.$oid; }
  toHexString() { return this.$oid; }
  equals(o) { return o != null && String(o) === this.$oid; }
}
globalThis.ObjectId = ObjectId;
function __dbshiftRevive(k, v) {
  if (v !== null && typeof v === 'object' && !Array.isArray(v)) {
    const keys = Object.keys(v);
    if (keys.length === 1) {
      if (keys[0] === '$date') {
        const d = v.$date;
        return new Date(typeof d === 'string' ? d : Number(d.$numberLong));
      }
      if (keys[0] === '$oid') return new ObjectId(v.$oid);
    }
  }
  return v;
}
function __dbshiftReplace(k, v) {
  const raw = this[k];
  if (raw instanceof Date) {
    if (isNaN(raw.getTime())) throw new TypeError('field ' + k + ' is an invalid Date');
    return { $date: raw.toISOString() };
  }
  if (typeof raw === 'number' && !isFinite(raw)) return { $numberDouble: String(raw) };
  if (typeof raw === 'bigint') return { $numberLong: String(raw) };
  return v;
}
"#;

/// A compiled transform, ready to run batches.
pub struct Transformer {
    runtime: Runtime,
    context: Context,
}

impl std::fmt::Debug for Transformer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Transformer")
    }
}

fn js_err(ctx: &rquickjs::Ctx<'_>, e: rquickjs::Error) -> String {
    if let rquickjs::Error::Exception = e {
        let v = ctx.catch();
        if let Some(ex) = v.as_exception() {
            return ex.message().unwrap_or_else(|| "exception".into());
        }
        if let Ok(s) = v.get::<rquickjs::Coerced<String>>() {
            return s.0;
        }
    }
    e.to_string()
}

impl Transformer {
    /// Compile `script`, which must evaluate to a function of one document.
    pub fn new(script: &str) -> Result<Self, String> {
        let runtime = Runtime::new().map_err(|e| e.to_string())?;
        runtime.set_memory_limit(MEMORY_LIMIT);
        runtime.set_max_stack_size(1 << 20);
        let context = Context::full(&runtime).map_err(|e| e.to_string())?;
        context.with(|ctx| -> Result<(), String> {
            ctx.eval::<(), _>(PRELUDE).map_err(|e| js_err(&ctx, e))?;
            let f: rquickjs::Value = ctx
                .eval(format!("(\n{}\n)", script.trim().trim_end_matches(';')))
                .map_err(|e| format!("does not compile: {}", js_err(&ctx, e)))?;
            if !f.is_function() {
                return Err("must be a JavaScript function such as `(doc) => { ...; return doc; }`".into());
            }
            ctx.globals().set("__dbshiftUser", f).map_err(|e| e.to_string())?;
            ctx.eval::<(), _>(
                r#"globalThis.__dbshiftBatch = function (json) {
                    const docs = JSON.parse(json, __dbshiftRevive);
                    const out = new Array(docs.length);
                    for (let i = 0; i < docs.length; i++) {
                        let r;
                        try { r = __dbshiftUser(docs[i]); }
                        catch (e) { return JSON.stringify({ error: String(e && e.message !== undefined ? e.message : e), index: i }); }
                        if (r === null || r === undefined) { out[i] = null; continue; }
                        if (typeof r !== 'object' || Array.isArray(r)) {
                            return JSON.stringify({ error: 'the script returned ' + (Array.isArray(r) ? 'an array' : typeof r) + ', not a document (or null)', index: i });
                        }
                        out[i] = r;
                    }
                    return JSON.stringify({ docs: out }, __dbshiftReplace);
                };"#,
            )
            .map_err(|e| js_err(&ctx, e))
        })?;
        Ok(Transformer { runtime, context })
    }

    /// Run the script over a batch. Returns, per input document, `Some(new)` when the script
    /// changed it and `None` when it returned null or the document unchanged.
    pub fn run_batch(&self, docs: &[Document]) -> Result<Vec<Option<Document>>, String> {
        let input =
            serde_json::Value::Array(docs.iter().map(|d| bsonx::to_js_json(&Bson::Document(d.clone()))).collect());
        let input = serde_json::to_string(&input).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + BATCH_DEADLINE;
        self.runtime.set_interrupt_handler(Some(Box::new(move || Instant::now() > deadline)));
        let output: String = self.context.with(|ctx| {
            let f: Function = ctx.globals().get("__dbshiftBatch").map_err(|e| e.to_string())?;
            f.call((input,)).map_err(|e| {
                let m = js_err(&ctx, e);
                if Instant::now() > deadline {
                    format!("the script ran longer than {}s on one batch", BATCH_DEADLINE.as_secs())
                } else {
                    m
                }
            })
        })?;
        self.runtime.set_interrupt_handler(None);
        let mut parsed: serde_json::Value = serde_json::from_str(&output).map_err(|e| e.to_string())?;
        if let Some(err) = parsed.get("error") {
            let i = parsed.get("index").and_then(|i| i.as_u64()).unwrap_or(0) as usize;
            let id = docs.get(i).and_then(|d| d.get("_id")).map(|v| v.to_string()).unwrap_or_default();
            return Err(format!(
                "the script failed on the document with _id {id}: {}",
                err.as_str().unwrap_or_default()
            ));
        }
        let outs = match parsed.get_mut("docs").map(serde_json::Value::take) {
            Some(serde_json::Value::Array(a)) if a.len() == docs.len() => a,
            _ => return Err("internal: the transform returned a malformed batch".into()),
        };
        let mut result = Vec::with_capacity(docs.len());
        for (old, new) in docs.iter().zip(outs) {
            if new.is_null() {
                result.push(None);
                continue;
            }
            let new = bsonx::to_bson(&new).map_err(|e| format!("the script returned a document that is {e}"))?;
            let old_b = Bson::Document(old.clone());
            let new = match bsonx::restore_number_types(new, Some(&old_b)) {
                Bson::Document(d) => d,
                _ => unreachable!("a document stays a document"),
            };
            if new.get("_id") != old.get("_id") {
                return Err(format!(
                    "the script changed or removed _id of the document with _id {}; _id cannot change",
                    old.get("_id").map(|v| v.to_string()).unwrap_or_default()
                ));
            }
            result.push(if &new == old { None } else { Some(new) });
        }
        Ok(result)
    }
}

/// Compile a script without running it (for `lint` and file loading).
pub fn compile_check(script: &str) -> Result<(), String> {
    Transformer::new(script).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, oid::ObjectId, DateTime};

    #[test]
    fn splits_a_name_and_keeps_types() {
        let t = Transformer::new(
            "(doc) => { if (!doc.name) return null; const [first, ...rest] = doc.name.split(' '); doc.firstName = first; doc.lastName = rest.join(' '); delete doc.name; return doc; }",
        )
        .unwrap();
        let id = ObjectId::new();
        let at = DateTime::from_millis(1_700_000_000_123);
        let docs = vec![
            doc! {"_id": id, "name": "Ada King Lovelace", "n": 1i64, "x": 2.0f64, "at": at, "big": 9_007_199_254_740_993i64},
            doc! {"_id": 2, "other": true},
        ];
        let out = t.run_batch(&docs).unwrap();
        assert_eq!(
            out[0],
            Some(
                doc! {"_id": id, "n": 1i64, "x": 2.0f64, "at": at, "big": 9_007_199_254_740_993i64, "firstName": "Ada", "lastName": "King Lovelace"}
            )
        );
        assert_eq!(out[1], None);
    }

    #[test]
    fn unchanged_documents_are_not_rewritten() {
        let t = Transformer::new("(d) => d").unwrap();
        let out = t.run_batch(&[doc! {"_id": 1, "a": 1.5, "b": [1, 2]}]).unwrap();
        assert_eq!(out, vec![None]);
    }

    #[test]
    fn dates_and_ids_are_usable_in_javascript() {
        let t = Transformer::new("(d) => { d.year = d.at.getUTCFullYear(); d.ref = d.owner.toString(); return d; }")
            .unwrap();
        let owner = ObjectId::new();
        let out =
            t.run_batch(&[doc! {"_id": 1, "at": DateTime::from_millis(1_700_000_000_000), "owner": owner}]).unwrap();
        let d = out[0].clone().unwrap();
        assert_eq!(d.get_i32("year").unwrap(), 2023);
        assert_eq!(d.get_str("ref").unwrap(), owner.to_hex());
        assert_eq!(d.get_object_id("owner").unwrap(), owner);
    }

    #[test]
    fn errors_are_specific() {
        assert!(Transformer::new("(d) => {").unwrap_err().contains("does not compile"));
        assert!(Transformer::new("42").unwrap_err().contains("must be a JavaScript function"));
        let t = Transformer::new("(d) => { throw new Error('boom') }").unwrap();
        let e = t.run_batch(&[doc! {"_id": 7}]).unwrap_err();
        assert!(e.contains("_id 7") && e.contains("boom"), "{e}");
        let t = Transformer::new("(d) => { d._id = 1; return d; }").unwrap();
        assert!(t.run_batch(&[doc! {"_id": 7}]).unwrap_err().contains("_id cannot change"));
    }
}
