//! The fuzz targets, shared by the stable driver (tests/bench/fuzz.rs, `cargo bench --bench
//! fuzz`) and the coverage-guided libFuzzer targets (fuzz/, `cargo +nightly fuzz run NAME`).
//! Each builds its input from bytes with `arbitrary` and returns `Err` when its property breaks
//! (a panic is a crash either way).

use std::path::PathBuf;

use arbitrary::{Result as AResult, Unstructured};
use bson::{Bson, Document, RawDocumentBuf};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

use dbshift::engine::script::{Transformer, DEFAULT_MEMORY};
use dbshift::job::{JobResult, MAX_RESULT};
use dbshift::redact::Redactor;

pub type Check = fn(&mut Unstructured, &mut State) -> AResult<Result<(), String>>;

/// Every target, by name.
pub const TARGETS: [(&str, Check); 4] =
    [("loader", loader), ("transform_bridge", transform_bridge), ("job_result", job_result), ("redactor", redactor)];

/// What a target keeps between inputs (a compiled script is reused).
pub struct State {
    identity: Transformer,
}

impl State {
    pub fn new() -> State {
        State { identity: Transformer::new("(d) => d", DEFAULT_MEMORY).expect("the identity script") }
    }
}

/// Pieces a migration file is made of, so random files get past the first line often.
const YAML_PIECES: &[&str] = &[
    "up:\n",
    "down:\n",
    "validate:\n",
    "description: x\n",
    "  - ",
    "addField: ",
    "transform: ",
    "updateMany: ",
    "insertDocuments: ",
    "runCommand: ",
    "aggregate: ",
    "count: ",
    "{ collection: c, ",
    "field: f, ",
    "value: ",
    "filter: ",
    "script: \"(d) => d\"",
    "batchSize: ",
    "memoryLimit: ",
    "documents: [",
    "]",
    "}",
    "{",
    "[",
    ", ",
    "{ $date: \"2020-01-01T00:00:00Z\" }",
    "{ $oid: \"0123456789abcdef01234567\" }",
    "{ $numberLong: \"-9223372036854775808\" }",
    "{ $numberDecimal: \"1e-6143\" }",
    "{ $binary: { base64: \"AA==\", subType: \"00\" } }",
    "\"$out\"",
    "&a ",
    "*a ",
    "!!binary ",
    "'",
    "\"",
    "\n",
    "    ",
    "-1",
    "99999999999999999999",
    "1e309",
    "null",
    "~",
    "? ",
    ": ",
];

pub fn loader(u: &mut Unstructured, _: &mut State) -> AResult<Result<(), String>> {
    let mut text = String::new();
    while !u.is_empty() && text.len() < 8192 {
        if u.ratio(3, 4)? {
            text.push_str(u.choose(YAML_PIECES)?);
        } else {
            text.push(u.arbitrary()?);
        }
    }
    let name = if u.arbitrary()? { "20250101000000_fuzz.yaml" } else { "20250101000000_fuzz.json" };
    // Errors are expected; a panic or a hang is the failure.
    let _ = dbshift::engine::load_sources(vec![(PathBuf::from(name), text)]);
    Ok(Ok(()))
}

/// A random BSON value, `depth` levels deep at most.
fn value(u: &mut Unstructured, depth: u32) -> AResult<Bson> {
    let kind = u.int_in_range(0..=17u8)?;
    Ok(match kind {
        0 => Bson::Double(u.arbitrary()?),
        1 => Bson::String(u.arbitrary()?),
        2 if depth > 0 => Bson::Document(document(u, depth - 1)?),
        3 if depth > 0 => {
            let n = u.int_in_range(0..=4usize)?;
            Bson::Array((0..n).map(|_| value(u, depth - 1)).collect::<AResult<_>>()?)
        }
        4 => Bson::Binary(bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: u.arbitrary()? }),
        5 => Bson::ObjectId(bson::oid::ObjectId::from_bytes(u.arbitrary()?)),
        6 => Bson::Boolean(u.arbitrary()?),
        7 => Bson::DateTime(bson::DateTime::from_millis(u.arbitrary()?)),
        8 => Bson::Null,
        9 => Bson::Int32(u.arbitrary()?),
        10 => Bson::Int64(u.arbitrary()?),
        11 => Bson::Int64(*u.choose(&[i64::MIN, i64::MAX, (1 << 53) + 1, -(1 << 53) - 1, 1 << 53])?),
        12 => Bson::Double(*u.choose(&[f64::NAN, f64::INFINITY, -0.0, f64::MIN_POSITIVE, 1e300, 0.1])?),
        13 => Bson::Timestamp(bson::Timestamp { time: u.arbitrary()?, increment: u.arbitrary()? }),
        // Decimals as a server stores them: parsed from a number (random bits are mostly
        // non-canonical encodings, which the spec reads as zero).
        14 => {
            let text = format!("{}E{}", u.arbitrary::<i64>()?, u.int_in_range(-6000..=6000i32)?);
            match text.parse() {
                Ok(d) => Bson::Decimal128(d),
                Err(_) => Bson::Null,
            }
        }
        15 => Bson::MinKey,
        16 => Bson::MaxKey,
        _ => Bson::String(String::new()),
    })
}

fn key(u: &mut Unstructured) -> AResult<String> {
    let k: String = u.arbitrary()?;
    // BSON keys are C strings.
    Ok(k.replace('\0', ""))
}

fn document(u: &mut Unstructured, depth: u32) -> AResult<Document> {
    let mut d = Document::new();
    for _ in 0..u.int_in_range(0..=6usize)? {
        d.insert(key(u)?, value(u, depth)?);
    }
    Ok(d)
}

/// `(d) => d` gives every document back unchanged: byte for byte, as the bson crate writes it.
pub fn transform_bridge(u: &mut Unstructured, st: &mut State) -> AResult<Result<(), String>> {
    let mut docs = Vec::new();
    for i in 0..u.int_in_range(1..=4i32)? {
        let mut d = bson::doc! {"_id": i};
        d.extend(document(u, 4)?);
        d.insert("_id", i);
        docs.push(RawDocumentBuf::from_document(&d).expect("a document the bson crate made"));
    }
    Ok(match st.identity.run_batch(&docs) {
        Ok(out) => match out.iter().position(|d| d.is_some()) {
            None => Ok(()),
            Some(i) => Err(format!(
                "changed by the identity script:\n  in:  {:?}\n  out: {:?}",
                docs[i].to_document(),
                out[i].as_ref().map(|d| d.to_document())
            )),
        },
        // A value the bridge refuses must say so, never come back different.
        Err(e) if !e.is_empty() => Ok(()),
        Err(_) => Err("an empty error".into()),
    })
}

/// Any text is read as a result or refused, never a panic; any result the runner makes is
/// written within a termination message and reads back.
pub fn job_result(u: &mut Unstructured, _: &mut State) -> AResult<Result<(), String>> {
    let text: String = u.arbitrary()?;
    let _ = serde_json::from_str::<JobResult>(&text);
    let r = JobResult {
        v: 1,
        tenant: u.arbitrary()?,
        ok: u.arbitrary()?,
        done: (0..u.int_in_range(0..=300usize)?)
            .map(|_| Ok((u.arbitrary::<String>()?, u.arbitrary()?, u.arbitrary()?)))
            .collect::<AResult<_>>()?,
        failed_checks: u.arbitrary()?,
        error: u.arbitrary()?,
        code: u.arbitrary()?,
        ..Default::default()
    };
    let s = r.to_compact_json();
    if s.len() > MAX_RESULT {
        return Ok(Err(format!("a result of {} bytes", s.len())));
    }
    Ok(match serde_json::from_str::<JobResult>(&s) {
        Ok(back) if back.code == r.code => Ok(()),
        Ok(_) => Err("the exit code changed".into()),
        Err(e) => Err(format!("the result does not parse: {e}: {s}")),
    })
}

/// A password, in any URI shape, never comes back from the redactor: as written,
/// percent-encoded, or inside a JSON string. (Passwords with `*` are left out: the mark
/// itself is `***`.)
pub fn redactor(u: &mut Unstructured, _: &mut State) -> AResult<Result<(), String>> {
    let pass: String = u.arbitrary()?;
    if pass.is_empty() || pass.contains('*') {
        return Ok(Ok(()));
    }
    let user: String = u.arbitrary::<String>()?.replace([':', '@', '/', '?'], "");
    let encoded = utf8_percent_encode(&pass, NON_ALPHANUMERIC).to_string();
    let scheme = *u.choose(&["mongodb://", "mongodb+srv://"])?;
    let uri = if u.arbitrary()? {
        format!("{scheme}{user}:{encoded}@db1:27017/shop?authSource=admin")
    } else {
        format!("{scheme}{user}:{pass}@db1/shop")
    };
    let r = Redactor::for_uri(&uri);
    let json = serde_json::to_string(&pass).expect("a string");
    let before: String = u.arbitrary()?;
    let after: String = u.arbitrary()?;
    for form in [&pass, &encoded, &json, &uri] {
        let text = format!("{}{form}{}", before.replace('*', ""), after.replace('*', ""));
        let out = r.apply(&text);
        if out.contains(&pass) || out.contains(&encoded) {
            return Ok(Err(format!("the password {pass:?} came back: {out:?} (uri {uri:?})")));
        }
    }
    Ok(Ok(()))
}
