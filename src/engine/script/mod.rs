//! `transform`: a user's JavaScript function run over documents, in an embedded QuickJS engine.
//!
//! Documents cross into JavaScript as Extended JSON, a batch at a time (one call per batch, not
//! per document): dates become `Date`, ObjectIds an `ObjectId` object (`.toString()` gives the
//! hex), 64-bit integers beyond 2^53 stay `{$numberLong}` objects, and every other number is a
//! JavaScript number. On the way back, numbers whose value did not change keep their original
//! BSON type; new integral numbers become int/long, others double.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bson::{Bson, RawDocument, RawDocumentBuf};
use rquickjs::{Context, Function, Runtime};

mod from_js;
mod to_js;

pub use from_js::integer_like;

/// The JavaScript heap of a transform whose `memoryLimit` says nothing, unless the process was
/// given another default (`--script-memory`, DBSHIFT_SCRIPT_MEMORY). A batch holds at most
/// 16 MiB of documents (pass::BATCH_BYTES) plus one document, and takes about five times its
/// size in the heap: 256 MiB takes any batch, a 16 MiB document included.
pub const DEFAULT_MEMORY: usize = 256 << 20;
/// The smallest and largest heap a transform may have.
pub const MIN_MEMORY: usize = 16 << 20;
pub const MAX_MEMORY: usize = 16 << 30;
static PROCESS_MEMORY: AtomicUsize = AtomicUsize::new(DEFAULT_MEMORY);

/// The heap of transforms without a `memoryLimit` in this process.
pub fn default_memory() -> usize {
    PROCESS_MEMORY.load(Ordering::Relaxed)
}

/// Set the heap of transforms without a `memoryLimit` (from the command line).
pub fn set_default_memory(bytes: usize) {
    PROCESS_MEMORY.store(bytes.clamp(MIN_MEMORY, MAX_MEMORY), Ordering::Relaxed);
}

/// A heap size as Kubernetes writes memory: `<n>Mi` or `<n>Gi`, from 16Mi to 16Gi.
pub fn parse_memory(s: &str) -> Result<usize, String> {
    let bad = || format!("{s:?} is not a memory size such as 256Mi or 1Gi (from 16Mi to 16Gi)");
    let (n, unit) = if let Some(n) = s.strip_suffix("Mi") {
        (n, 1usize << 20)
    } else if let Some(n) = s.strip_suffix("Gi") {
        (n, 1usize << 30)
    } else {
        return Err(bad());
    };
    let n: usize = n.parse().map_err(|_| bad())?;
    let bytes = n.checked_mul(unit).ok_or_else(bad)?;
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&bytes) {
        return Err(bad());
    }
    Ok(bytes)
}
/// The longest one batch may run before it is stopped (an endless loop in a script).
const BATCH_DEADLINE: Duration = Duration::from_secs(120);
/// How long evaluating a script may take (defining its function; code outside it runs now).
const EVAL_DEADLINE: Duration = Duration::from_secs(5);

// Special values are converted only where Rust says they are (no JSON reviver or replacer,
// which QuickJS would call for every value: that was most of the cost of a transform).
// Dates and ObjectIds serialize themselves back through toJSON.
const PRELUDE: &str = r#"
class ObjectId {
  constructor(hex) { this.$oid = String(hex); }
  toString() { return this.$oid; }
  toHexString() { return this.$oid; }
  equals(o) { return o != null && String(o) === this.$oid; }
  toJSON() { return { $oid: this.$oid }; }
}
globalThis.ObjectId = ObjectId;
Object.defineProperty(Date.prototype, 'toJSON', {
  value: function () {
    if (isNaN(this.getTime())) throw new TypeError('a field holds an invalid Date');
    return { $date: this.toISOString() };
  },
  writable: true, configurable: true,
});
function __dbshiftSpecials(docs, specials) {
  for (const s of specials) {
    let o = docs[s[0]];
    const path = s[1];
    for (let i = 0; i < path.length - 1; i++) o = o[path[i]];
    const k = path[path.length - 1];
    const v = o[k];
    if (s[2] === 0) {
      const d = v.$date;
      o[k] = new Date(typeof d === 'string' ? d : Number(d.$numberLong));
    } else {
      o[k] = new ObjectId(v.$oid);
    }
  }
}
"#;

/// A compiled transform, ready to run batches.
pub struct Transformer {
    runtime: Runtime,
    context: Context,
    /// Its heap, in bytes.
    memory: usize,
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
    /// Compile `script`, which must evaluate to a function of one document, with a heap of
    /// `memory` bytes.
    pub fn new(script: &str, memory: usize) -> Result<Self, String> {
        let runtime = Runtime::new().map_err(|e| e.to_string())?;
        runtime.set_memory_limit(memory);
        runtime.set_max_stack_size(1 << 20);
        let context = Context::full(&runtime).map_err(|e| e.to_string())?;
        // Evaluating the script (code outside its function runs now) has a deadline too.
        let deadline = Instant::now() + EVAL_DEADLINE;
        runtime.set_interrupt_handler(Some(Box::new(move || Instant::now() > deadline)));
        let made = context.with(|ctx| -> Result<(), String> {
            ctx.eval::<(), _>(PRELUDE).map_err(|e| js_err(&ctx, e))?;
            let f: rquickjs::Value = ctx.eval(format!("(\n{}\n)", script.trim().trim_end_matches(';'))).map_err(|e| {
                if Instant::now() > deadline {
                    format!(
                        "evaluating it took longer than {} s (code outside the function that never ends?)",
                        EVAL_DEADLINE.as_secs()
                    )
                } else {
                    format!("does not compile: {}", js_err(&ctx, e))
                }
            })?;
            if !f.is_function() {
                return Err("must be a JavaScript function such as `(doc) => { ...; return doc; }`".into());
            }
            ctx.globals().set("__dbshiftUser", f).map_err(|e| e.to_string())?;
            ctx.eval::<(), _>(
                r#"globalThis.__dbshiftBatch = function (json, specials) {
                    const docs = JSON.parse(json);
                    __dbshiftSpecials(docs, JSON.parse(specials));
                    const out = new Array(docs.length);
                    for (let i = 0; i < docs.length; i++) {
                        let r;
                        try { r = __dbshiftUser(docs[i]); }
                        catch (e) { return JSON.stringify({ error: String(e && e.message !== undefined ? e.message : e), name: (e instanceof Error && ['Error', 'TypeError', 'RangeError', 'SyntaxError', 'ReferenceError', 'EvalError', 'URIError', 'InternalError', 'AggregateError'].includes(e.name)) ? e.name : (e instanceof Error ? 'an error' : 'a thrown ' + typeof e), thrown: true, index: i }); }
                        if (r === null || r === undefined) { out[i] = null; continue; }
                        if (typeof r !== 'object' || Array.isArray(r)) {
                            return JSON.stringify({ error: 'the script returned ' + (Array.isArray(r) ? 'an array' : typeof r) + ', not a document (or null)', index: i });
                        }
                        out[i] = r;
                    }
                    return JSON.stringify(out);
                };"#,
            )
            .map_err(|e| js_err(&ctx, e))
        });
        runtime.set_interrupt_handler(None);
        made?;
        Ok(Transformer { runtime, context, memory })
    }

    /// Run the script over a batch. Returns, per input document, `Some(new)` when the script
    /// changed it and `None` when it returned null or the document unchanged.
    pub fn run_batch(&self, docs: &[RawDocumentBuf]) -> Result<Vec<Option<RawDocumentBuf>>, String> {
        let mut specials = Vec::new();
        let mut input = String::with_capacity(docs.iter().map(|d| d.as_bytes().len()).sum::<usize>() * 5 / 4 + 2);
        input.push('[');
        for (i, d) in docs.iter().enumerate() {
            if i > 0 {
                input.push(',');
            }
            to_js::write_document(d, &mut input, i, &mut specials)?;
        }
        input.push(']');
        let specials = serde_json::to_string(&specials).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + BATCH_DEADLINE;
        self.runtime.set_interrupt_handler(Some(Box::new(move || Instant::now() > deadline)));
        let batch_bytes: usize = docs.iter().map(|d| d.as_bytes().len()).sum();
        let out_of_memory = |m: &str| {
            if m.contains("out of memory") {
                format!(
                    "the script ran out of its {} MiB heap on a batch of {} document(s), {:.1} MiB: raise the \
                     transform's memoryLimit (or --script-memory), or lower its batchSize",
                    self.memory >> 20,
                    docs.len(),
                    batch_bytes as f64 / (1 << 20) as f64
                )
            } else {
                m.to_string()
            }
        };
        let output: String = self.context.with(|ctx| {
            let f: Function = ctx.globals().get("__dbshiftBatch").map_err(|e| e.to_string())?;
            f.call((input, specials)).map_err(|e| {
                let m = js_err(&ctx, e);
                if Instant::now() > deadline {
                    format!("the script ran longer than {}s on one batch", BATCH_DEADLINE.as_secs())
                } else if m.contains("out of memory") {
                    out_of_memory(&m)
                } else {
                    // Thrown outside the per-document call (a getter, a `toJSON`): it may
                    // quote a document too.
                    format!("the script failed on this batch; {} {m}", crate::redact::SCRIPT_MESSAGE)
                }
            })
        })?;
        self.runtime.set_interrupt_handler(None);
        if output.starts_with('{') {
            let failure: serde_json::Value = serde_json::from_str(&output).map_err(|e| e.to_string())?;
            let i = failure.get("index").and_then(|i| i.as_u64()).unwrap_or(0) as usize;
            let error = failure.get("error").and_then(|e| e.as_str()).unwrap_or_default();
            let id = docs.get(i).map(|d| id_string(d)).unwrap_or_default();
            let thrown = failure.get("thrown").and_then(|t| t.as_bool()).unwrap_or(false);
            let name = failure.get("name").and_then(|n| n.as_str()).unwrap_or("an error");
            return Err(if thrown && !error.contains("out of memory") {
                // What the script says may quote the document: marked, so that status, Events and
                // results leave it out (redact::tenant_values); the runner's log keeps it.
                let name: String = name.chars().take(40).collect();
                format!(
                    "the script failed on the document with _id {id}: {name}; {} {error}",
                    crate::redact::SCRIPT_MESSAGE
                )
            } else {
                format!("the script failed on the document with _id {id}: {}", out_of_memory(error))
            });
        }
        let outs = from_js::read_documents(&output, docs)?;
        if outs.len() != docs.len() {
            return Err("internal: the transform returned a malformed batch".into());
        }
        let mut result = Vec::with_capacity(docs.len());
        for (old, new) in docs.iter().zip(outs) {
            let Some(new) = new else {
                result.push(None);
                continue;
            };
            if new.get("_id").ok().flatten() != old.get("_id").ok().flatten() {
                return Err(format!(
                    "the script changed or removed _id of the document with _id {}; _id cannot change",
                    id_string(old)
                ));
            }
            // Unchanged means byte-identical (NaN == NaN; a reordered document is a change).
            result.push((new.as_bytes() != old.as_bytes()).then_some(new));
        }
        Ok(result)
    }
}

/// A document's `_id`, for messages.
fn id_string(d: &RawDocument) -> String {
    match d.get("_id") {
        Ok(Some(v)) => Bson::try_from(v).map(|b| b.to_string()).unwrap_or_default(),
        _ => String::new(),
    }
}

/// Compile a script without running it (for `lint` and file loading).
pub fn compile_check(script: &str) -> Result<(), String> {
    Transformer::new(script, default_memory()).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, oid::ObjectId, DateTime, Document};

    fn new(script: &str) -> Result<Transformer, String> {
        Transformer::new(script, DEFAULT_MEMORY)
    }

    /// Found by the fuzzer (tests/bench/fuzz.rs): JavaScript moves integer-like keys first, and
    /// a double inside a `$`-keyed subdocument lost its last bit on the way back.
    #[test]
    fn the_identity_script_changes_nothing_with_numeric_keys_or_dollar_subdocuments() {
        let t = new("(d) => d").unwrap();
        let docs = [
            doc! {"_id": 1, "b": 1, "2024": 2, "a": {"10": 1, "x": 2, "9": 3}, "0": 4},
            doc! {"_id": 2, "": {"$\"odd": 315523232, "V": 7.425028595562724e-146}},
            doc! {"_id": 3, "": {"$": {"": "", "3": 1i64, "x": ""}}},
        ];
        assert_eq!(run(&t, &docs).unwrap(), vec![None, None, None]);
        // A script's own new fields follow the document's.
        let t = new("(d) => { d.z = 1; d['5'] = 2; return d; }").unwrap();
        let out = run(&t, &[doc! {"_id": 1, "7": 0, "a": 1}]).unwrap();
        let keys: Vec<String> = out[0].as_ref().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["_id", "7", "a", "5", "z"]);
    }

    /// `run_batch` on documents.
    fn run(t: &Transformer, docs: &[Document]) -> Result<Vec<Option<Document>>, String> {
        let raw: Vec<RawDocumentBuf> = docs.iter().map(|d| RawDocumentBuf::from_document(d).unwrap()).collect();
        Ok(t.run_batch(&raw)?.into_iter().map(|d| d.map(|d| d.to_document().unwrap())).collect())
    }

    #[test]
    fn the_extreme_64_bit_integers_stay_64_bit_integers() {
        let t = new("(d) => { d.copy = d.v; d.copy2 = d.w; return d; }").unwrap();
        let out = run(&t, &[doc! {"_id": 1, "v": i64::MIN, "w": i64::MAX}]).unwrap();
        let d = out[0].as_ref().unwrap();
        assert_eq!(d.get_i64("copy"), Ok(i64::MIN), "{d}");
        assert_eq!(d.get_i64("copy2"), Ok(i64::MAX), "{d}");
        assert_eq!(d.get_i64("v"), Ok(i64::MIN), "{d}");
    }

    #[test]
    fn a_script_that_never_finishes_evaluating_is_stopped() {
        let t0 = Instant::now();
        let e = new("(() => { for (;;) {} })()").unwrap_err();
        assert!(e.contains("took longer than 5 s"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(30));
        let e = new("while (true) {}").unwrap_err();
        assert!(e.contains("longer than") || e.contains("does not compile"), "{e}");
    }

    #[test]
    fn splits_a_name_and_keeps_types() {
        let t = new(
            "(doc) => { if (!doc.name) return null; const [first, ...rest] = doc.name.split(' '); doc.firstName = first; doc.lastName = rest.join(' '); delete doc.name; return doc; }",
        )
        .unwrap();
        let id = ObjectId::new();
        let at = DateTime::from_millis(1_700_000_000_123);
        let docs = vec![
            doc! {"_id": id, "name": "Ada King Lovelace", "n": 1i64, "x": 2.0f64, "at": at, "big": 9_007_199_254_740_993i64},
            doc! {"_id": 2, "other": true},
        ];
        let out = run(&t, &docs).unwrap();
        assert_eq!(
            out[0],
            Some(
                doc! {"_id": id, "n": 1i64, "x": 2.0f64, "at": at, "big": 9_007_199_254_740_993i64, "firstName": "Ada", "lastName": "King Lovelace"}
            )
        );
        assert_eq!(out[1], None);
    }

    #[test]
    fn every_kind_of_string_and_number_survives_the_round_trip() {
        let t = new("(d) => { d.copy = d.s; return d; }").unwrap();
        let s = "quote\" backslash\\ newline\n tab\t nul\u{0} bell\u{7} é 😀 \u{2028}\u{2029} </script>";
        let d = doc! {"_id": 1, "s": s, "x": 0.1f64, "y": -0.0f64, "z": 1e300f64, "n": i32::MIN, "l": -(1i64 << 53), "nan": f64::NAN, "arr": [[1, "a"], {"k": null}]};
        let out = run(&t, std::slice::from_ref(&d)).unwrap()[0].clone().unwrap();
        assert_eq!(out.get_str("copy").unwrap(), s);
        let mut expected = d.clone();
        expected.insert("copy", s);
        // NaN is not equal to itself: compare the rest, then NaN's type.
        assert!(out.get_f64("nan").unwrap().is_nan());
        let (mut a, mut b) = (out.clone(), expected);
        a.remove("nan");
        b.remove("nan");
        assert_eq!(bson::to_vec(&a).unwrap(), bson::to_vec(&b).unwrap(), "byte-identical apart from the new field");
        let same = new("(d) => d").unwrap();
        assert_eq!(run(&same, &[d]).unwrap(), vec![None]);
    }

    #[test]
    fn unchanged_documents_are_not_rewritten() {
        let t = new("(d) => d").unwrap();
        let out = run(&t, &[doc! {"_id": 1, "a": 1.5, "b": [1, 2]}]).unwrap();
        assert_eq!(out, vec![None]);
    }

    #[test]
    fn dates_and_ids_are_usable_in_javascript() {
        let t = new("(d) => { d.year = d.at.getUTCFullYear(); d.ref = d.owner.toString(); return d; }").unwrap();
        let owner = ObjectId::new();
        let out = run(&t, &[doc! {"_id": 1, "at": DateTime::from_millis(1_700_000_000_000), "owner": owner}]).unwrap();
        let d = out[0].clone().unwrap();
        assert_eq!(d.get_i32("year").unwrap(), 2023);
        assert_eq!(d.get_str("ref").unwrap(), owner.to_hex());
        assert_eq!(d.get_object_id("owner").unwrap(), owner);
    }

    #[test]
    fn errors_are_specific() {
        assert!(new("(d) => {").unwrap_err().contains("does not compile"));
        assert!(new("42").unwrap_err().contains("must be a JavaScript function"));
        let t = new("(d) => { throw new Error('boom') }").unwrap();
        let e = run(&t, &[doc! {"_id": 7}]).unwrap_err();
        assert!(e.contains("_id 7") && e.contains("Error; the script's message: boom"), "{e}");
        let shown = crate::redact::tenant_values(&e);
        assert!(!shown.contains("boom") && shown.contains("_id 7: Error;"), "{shown}");
        // A name the script set, and a throw outside the per-document call, are withheld too.
        let t = new("(d) => { const e = new Error('x'); e.name = d.secret; throw e }").unwrap();
        let shown =
            crate::redact::tenant_values(&run(&t, &[doc! {"_id": 7, "secret": "ann@example.com"}]).unwrap_err());
        assert!(!shown.contains("ann@") && shown.contains("an error;"), "{shown}");
        let t = new("(d) => ({ ...d, toJSON() { throw new Error('leak ' + d.secret) } })").unwrap();
        let shown =
            crate::redact::tenant_values(&run(&t, &[doc! {"_id": 7, "secret": "ann@example.com"}]).unwrap_err());
        assert!(!shown.contains("ann@") && shown.contains("values not shown"), "{shown}");
        let t = new("(d) => { d._id = 1; return d; }").unwrap();
        assert!(run(&t, &[doc! {"_id": 7}]).unwrap_err().contains("_id cannot change"));
        let t = new("(d) => new Date(0)").unwrap();
        assert!(run(&t, &[doc! {"_id": 7}]).unwrap_err().contains("not a document"), "a Date is not a document");
    }
}
