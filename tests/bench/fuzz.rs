//! Bounded fuzzing of what dbshift parses from outside: migration files (YAML with Extended
//! JSON inside), the transform bridge (BSON -> JavaScript -> BSON, checked against the bson
//! crate), the runner's result (what the controller reads back from a pod), and the redactor.
//!
//! Each target gets inputs built by `arbitrary` from random bytes (seeded: a failure prints the
//! seed and the input, and `--seed` replays it) and must hold its property: no panic, and
//! what the target promises (a round trip is exact, a result fits and parses, a password never
//! comes back). A panic counts as a crash; an input slower than 2 s counts as a hang.
//!
//!   cargo bench --bench fuzz -- [--seconds N] [--target NAME] [--seed S]
//!   cargo bench --profile dev --bench fuzz -- --seconds 10    # CI's smoke run (tests/run.sh)
//!
//! Stable Rust only (no cargo-fuzz): CI machines get no nightly toolchain from the package
//! registries. Exit status 1 when any target crashed, hung or broke its property.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use arbitrary::{Result as AResult, Unstructured};
use bson::{Bson, Document, RawDocumentBuf};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use rand::{Rng, SeedableRng};

use dbshift::engine::script::{Transformer, DEFAULT_MEMORY};
use dbshift::job::{JobResult, MAX_RESULT};
use dbshift::redact::Redactor;

const HANG: Duration = Duration::from_secs(2);

type Check = fn(&mut Unstructured, &mut State) -> AResult<Result<(), String>>;

/// What a target keeps between inputs (a compiled script is reused).
struct State {
    identity: Transformer,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("fuzz targets: not run under `cargo test` (cargo bench --bench fuzz; tests/run.sh runs them briefly)");
        return;
    }
    let opt = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let seconds: u64 = opt("--seconds").and_then(|s| s.parse().ok()).unwrap_or(60);
    let only = opt("--target");
    let seed: Option<u64> = opt("--seed").and_then(|s| s.parse().ok());
    let targets: [(&str, Check); 4] = [
        ("loader", loader),
        ("transform_bridge", transform_bridge),
        ("job_result", job_result),
        ("redactor", redactor),
    ];
    let mut state = State { identity: Transformer::new("(d) => d", DEFAULT_MEMORY).expect("the identity script") };
    let mut failed = false;
    for (name, check) in targets {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let mut seeds = rand::rngs::StdRng::seed_from_u64(seed.unwrap_or_else(rand::random));
        let (mut runs, mut crashes, mut hangs, mut broken, mut slowest) = (0u64, 0u64, 0u64, 0u64, Duration::ZERO);
        while Instant::now() < deadline {
            let s: u64 = seeds.random();
            let mut rng = rand::rngs::StdRng::seed_from_u64(s);
            let len = rng.random_range(0..4096usize);
            let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let started = Instant::now();
            let outcome = catch_unwind(AssertUnwindSafe(|| check(&mut Unstructured::new(&bytes), &mut state)));
            let took = started.elapsed();
            slowest = slowest.max(took);
            runs += 1;
            let problem = match outcome {
                Err(p) => {
                    crashes += 1;
                    Some(format!("panic: {}", panic_text(&p)))
                }
                Ok(Ok(Err(why))) => {
                    broken += 1;
                    Some(why)
                }
                Ok(_) if took > HANG => {
                    hangs += 1;
                    Some(format!("took {took:?}"))
                }
                Ok(_) => None,
            };
            if let Some(p) = problem {
                let file = save(name, s, &bytes);
                eprintln!("[fuzz] {name}: seed {s} ({}): {p}", file.display());
                if crashes + broken + hangs >= 5 {
                    break;
                }
            }
            if seed.is_some() {
                break;
            }
        }
        println!(
            "[fuzz] {name}: {runs} inputs in {seconds} s, {crashes} crash(es), {hangs} hang(s), {broken} broken \
             propert(y/ies), slowest input {:.1} ms",
            slowest.as_secs_f64() * 1000.0
        );
        failed |= crashes + hangs + broken > 0;
    }
    std::process::exit(i32::from(failed));
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

/// The input of a failure, to replay and to keep.
fn save(target: &str, seed: u64, bytes: &[u8]) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz").join(target);
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(format!("{seed}.bin"));
    let _ = std::fs::write(&file, bytes);
    file
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

fn loader(u: &mut Unstructured, _: &mut State) -> AResult<Result<(), String>> {
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
fn transform_bridge(u: &mut Unstructured, st: &mut State) -> AResult<Result<(), String>> {
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
fn job_result(u: &mut Unstructured, _: &mut State) -> AResult<Result<(), String>> {
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
fn redactor(u: &mut Unstructured, _: &mut State) -> AResult<Result<(), String>> {
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
