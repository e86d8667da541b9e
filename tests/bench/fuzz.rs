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
//! Stable Rust (CI machines get no nightly toolchain from the package registries); the same
//! targets (tests/bench/fuzz_targets.rs) run coverage-guided under libFuzzer from fuzz/ where
//! nightly and cargo-fuzz are installed. Exit status 1 when any target crashed, hung or broke
//! its property.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use arbitrary::Unstructured;
use rand::{Rng, SeedableRng};

mod fuzz_targets;
use fuzz_targets::{State, TARGETS};

const HANG: Duration = Duration::from_secs(2);

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
    let mut state = State::new();
    let mut failed = false;
    for (name, check) in TARGETS {
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
