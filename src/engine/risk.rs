//! Risk lint: the steps of a migration that destroy data or may go wrong on some tenants,
//! each as a warning with a stable code, what it means and what to do. A file accepts a
//! warning for one step with `acknowledge: [{ code, step, reason }]`; `dbshift lint --strict`
//! fails on the others (for CI). Pure: reads the file only.

use serde::Serialize;

use super::model::{Check, MigrationFile};
use super::ops::Operation;

/// Every code, what it flags, and what to do about it. Codes are never reused.
pub const CODES: &[(&str, &str, &str)] = &[
    (
        "DS001",
        "dropCollection: the collection is gone for the application at once (dbshift moves it aside for `down`)",
        "make sure nothing reads or writes it any more, and that a rollback later would not lose what it received since",
    ),
    (
        "DS002",
        "removeField: the field's values are gone for the application (kept as rollback data until the record is pruned)",
        "make sure no reader needs the field; copy it elsewhere first if it must survive",
    ),
    (
        "DS003",
        "deleteDocuments with an empty filter deletes every document of the collection",
        "give a filter naming what to delete, or use dropCollection if the collection goes",
    ),
    (
        "DS004",
        "a unique index fails on any tenant whose data repeats its keys (the migration is then undone there)",
        "add a pre-check `unique: { collection, keys }` to the file so such tenants are found before anything changes",
    ),
    (
        "DS005",
        "runCommand cannot be undone automatically, and this migration has no `down`",
        "give the migration a `down` that undoes the command",
    ),
    (
        "DS006",
        "transform without a filter reads and rewrites every document of the collection",
        "give a filter selecting the documents the script changes",
    ),
];

/// The code an acknowledgement names that matches no warning of its step.
pub const UNUSED: &str = "DS000";

/// One warning about one step of `up`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Warning {
    pub code: &'static str,
    /// The step of `up`, counted from 1 (0 for the whole file).
    pub step: usize,
    /// The step's operation and collection, e.g. `dropCollection orders`.
    pub what: String,
    pub message: String,
    pub fix: String,
}

/// A file's warnings: those it acknowledges, and the others.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Review {
    pub warnings: Vec<Warning>,
    pub acknowledged: Vec<Warning>,
}

fn known(code: &str) -> Option<&'static (&'static str, &'static str, &'static str)> {
    CODES.iter().find(|(c, _, _)| *c == code)
}

/// Problems with the acknowledgements themselves (an unknown code, a step `up` does not have,
/// no reason): invalid input, reported as the file's errors.
pub fn acknowledgement_problems(file: &MigrationFile) -> Vec<String> {
    let mut out = Vec::new();
    for (i, a) in file.acknowledge.iter().enumerate() {
        let at = format!("acknowledge[{i}]");
        if known(&a.code).is_none() {
            let codes: Vec<&str> = CODES.iter().map(|c| c.0).collect();
            out.push(format!("{at}: unknown code `{}` (known: {})", a.code, codes.join(", ")));
        }
        if a.step == 0 || a.step as usize > file.up.len() {
            out.push(format!("{at}: step {} is not a step of `up` (1 to {})", a.step, file.up.len()));
        }
        if a.reason.trim().is_empty() {
            out.push(format!("{at}: give the `reason` the step is fine as it is"));
        }
    }
    out
}

/// The risky steps of `file`.
pub fn review(file: &MigrationFile) -> Review {
    let mut found: Vec<Warning> = Vec::new();
    let mut warn = |code: &'static str, step: usize, op: &Operation| {
        let (_, message, fix) = known(code).expect("a listed code");
        let what = match op.collection() {
            Some(c) => format!("{} {c}", op.kind()),
            None => op.kind().to_string(),
        };
        found.push(Warning { code, step, what, message: message.to_string(), fix: fix.to_string() });
    };
    for (i, op) in file.up.iter().enumerate() {
        let step = i + 1;
        match op {
            Operation::DropCollection(_) => warn("DS001", step, op),
            Operation::RemoveField(_) => warn("DS002", step, op),
            Operation::DeleteDocuments(d) if is_empty_filter(&d.filter) => warn("DS003", step, op),
            Operation::CreateIndex(c) if c.unique && !prechecked_unique(file, &c.collection, &c.keys) => {
                warn("DS004", step, op)
            }
            Operation::RunCommand(_) if file.down.is_none() => warn("DS005", step, op),
            Operation::Transform(t) if t.filter.as_ref().is_none_or(is_empty_filter) => warn("DS006", step, op),
            _ => {}
        }
    }
    let mut review = Review::default();
    let mut used = vec![false; file.acknowledge.len()];
    for w in found {
        let ack = file.acknowledge.iter().position(|a| a.code == w.code && a.step as usize == w.step);
        match ack {
            Some(k) => {
                used[k] = true;
                review.acknowledged.push(w);
            }
            None => review.warnings.push(w),
        }
    }
    for (a, _) in file.acknowledge.iter().zip(used).filter(|(a, used)| !used && known(&a.code).is_some()) {
        review.warnings.push(Warning {
            code: UNUSED,
            step: a.step as usize,
            what: "acknowledge".into(),
            message: format!("acknowledges {} for step {}, which has no such warning", a.code, a.step),
            fix: "remove the acknowledgement (the step changed, or it names the wrong step)".into(),
        });
    }
    review
}

/// Whether a `unique` pre-check of the file covers an index on `keys` of `collection`: the
/// same key names, in any order (the index's direction does not matter for duplicates).
fn prechecked_unique(
    file: &MigrationFile,
    collection: &str,
    keys: &serde_json::Map<String, serde_json::Value>,
) -> bool {
    let mut want: Vec<&String> = keys.keys().collect();
    want.sort();
    file.precheck.iter().any(|c| match c {
        Check::Unique(u) if u.collection == collection => {
            let mut have: Vec<&String> = u.keys.keys().collect();
            have.sort();
            have == want
        }
        _ => false,
    })
}

fn is_empty_filter(f: &serde_json::Value) -> bool {
    f.as_object().is_some_and(|m| m.is_empty()) || f.is_null()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::loader::parse_yaml;

    fn codes(yaml: &str) -> (Vec<(&'static str, usize)>, Vec<&'static str>) {
        let r = review(&parse_yaml(yaml).unwrap());
        (r.warnings.iter().map(|w| (w.code, w.step)).collect(), r.acknowledged.iter().map(|w| w.code).collect())
    }

    #[test]
    fn each_risky_step_has_its_code_and_safe_ones_none() {
        let yaml = r#"
up:
  - dropCollection: { collection: old }
  - removeField: { collection: c, field: f }
  - deleteDocuments: { collection: c, filter: {} }
  - deleteDocuments: { collection: c, filter: { stale: true } }
  - createIndex: { collection: c, keys: { code: 1 }, unique: true }
  - createIndex: { collection: c, keys: { code: 1 } }
  - runCommand: { command: { ping: 1 } }
  - transform: { collection: c, script: "(d) => d" }
  - transform: { collection: c, filter: { a: 1 }, script: "(d) => d" }
  - addField: { collection: c, field: g, value: 1 }
"#;
        let (w, ack) = codes(yaml);
        assert_eq!(w, [("DS001", 1), ("DS002", 2), ("DS003", 3), ("DS004", 5), ("DS005", 7), ("DS006", 8)]);
        assert!(ack.is_empty());
        // A unique pre-check on the same keys answers DS004.
        let checked = format!("{yaml}precheck:\n  - unique: {{ collection: c, keys: {{ code: 1 }} }}\n");
        assert!(!codes(&checked).0.iter().any(|(c, _)| *c == "DS004"));
        let elsewhere = format!("{yaml}precheck:\n  - unique: {{ collection: other, keys: {{ code: 1 }} }}\n");
        assert!(codes(&elsewhere).0.iter().any(|(c, _)| *c == "DS004"));
        // A down makes runCommand undoable.
        let with_down = format!("{yaml}down:\n  - runCommand: {{ command: {{ ping: 1 }} }}\n");
        assert!(!codes(&with_down).0.iter().any(|(c, _)| *c == "DS005"));
    }

    #[test]
    fn an_acknowledgement_covers_its_step_only_and_a_stale_one_is_reported() {
        let yaml = r#"
up:
  - dropCollection: { collection: a }
  - dropCollection: { collection: b }
acknowledge:
  - { code: DS001, step: 1, reason: "a is empty since 2024" }
  - { code: DS002, step: 2, reason: "wrong code" }
"#;
        let (w, ack) = codes(yaml);
        assert_eq!(ack, ["DS001"]);
        assert_eq!(w, [("DS001", 2), (UNUSED, 2)]);
    }

    #[test]
    fn acknowledgements_are_checked() {
        let file = parse_yaml(
            "up:\n  - dropCollection: { collection: a }\nacknowledge:\n  - { code: DS999, step: 3, reason: ' ' }\n",
        )
        .unwrap();
        let p = acknowledgement_problems(&file).join("\n");
        assert!(p.contains("unknown code `DS999`"), "{p}");
        assert!(p.contains("step 3 is not a step of `up` (1 to 1)"), "{p}");
        assert!(p.contains("give the `reason`"), "{p}");
    }
}
