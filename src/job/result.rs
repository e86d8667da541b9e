//! What a runner pod reports: a compact JSON [`JobResult`], written to the pod's termination
//! message (and as the last line of stdout), which the controller reads back.

use serde::{Deserialize, Serialize};

use crate::backup::Taken;
use crate::engine::planner::Direction;
use crate::engine::runner::OutcomeState;
use crate::engine::TenantReport;
use crate::exit::Exit;

/// The snapshot a run took before changing the tenant.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BackupInfo {
    /// `database:<db>/<snapshot id>` or `dir:<path>`.
    pub at: String,
    pub docs: u64,
    pub bytes: u64,
    /// The whole snapshot's hash: SHA-256 over its collections' names and content hashes.
    pub sha256: String,
    pub ms: u64,
}

impl From<&Taken> for BackupInfo {
    fn from(t: &Taken) -> Self {
        BackupInfo {
            at: t.location.clone(),
            docs: t.manifest.total_documents,
            bytes: t.manifest.total_bytes,
            sha256: t.manifest.sha256.clone(),
            ms: t.manifest.duration_ms,
        }
    }
}

/// How `--rollback-run` undid a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RollbackHow {
    /// From the pre-image store and the recorded downs.
    Data,
    /// By restoring the snapshot the run took.
    Snapshot,
}

/// The compact result of one tenant's run. Field names are short: it must fit in 4 KiB.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct JobResult {
    /// Format version.
    pub v: u32,
    pub tenant: String,
    pub ok: bool,
    pub dir: Direction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Migrations done: [id, milliseconds, documents].
    #[serde(default)]
    pub done: Vec<(String, i64, i64)>,
    /// How many more were done than listed (the list is cut to stay small).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub more: usize,
    /// Checks run and passed.
    #[serde(default)]
    pub checks: (usize, usize),
    /// Failed checks, cut short: "migration: check on collection: message".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_checks: Vec<String>,
    /// Pre-checks run and passed (before anything changed).
    #[serde(default, skip_serializing_if = "is_none_run")]
    pub pre: (usize, usize),
    /// Failed pre-checks, cut short, like `failed_checks`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_pre: Vec<String>,
    /// A pre-check failed under `onPrecheckFailure: skip`: the tenant was left untouched.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The process exit code.
    pub code: u8,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// The snapshot taken before the run changed the tenant (with `DBSHIFT_BACKUP`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupInfo>,
    /// How `--rollback-run` undid the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<RollbackHow>,
    /// The snapshot a `snapshot` rollback restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored: Option<String>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_none_run(n: &(usize, usize)) -> bool {
    n.0 == 0
}

/// A failed check as a result lists it: "migration: check on collection: message".
fn check_line(c: &crate::engine::validate::CheckResult) -> String {
    format!("{}: {} on {}: {}", c.migration, c.check, c.collection, c.message)
}

/// Largest result written (a termination message holds 4096 bytes).
pub const MAX_RESULT: usize = 4000;

fn cut(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

impl JobResult {
    /// The result of a run that could not start or stopped with an error.
    pub fn failed(tenant: &str, error: &str, code: Exit) -> Self {
        JobResult {
            v: 1,
            tenant: tenant.into(),
            ok: false,
            error: Some(error.into()),
            code: code.code(),
            ..Default::default()
        }
    }

    /// Serialize, shortening lists and messages until it fits.
    pub fn to_compact_json(&self) -> String {
        let mut r = self.clone();
        // Read by anyone who may view the resource: no tenant values, whatever made the text.
        r.error = r.error.map(|e| cut(&crate::redact::tenant_values(&e), 1500));
        r.failed_checks = r.failed_checks.iter().take(5).map(|c| cut(&crate::redact::tenant_values(c), 200)).collect();
        r.failed_pre = r.failed_pre.iter().take(5).map(|c| cut(&crate::redact::tenant_values(c), 200)).collect();
        // Shortened field by field, never cut as text: a result cut inside an escape sequence
        // would not parse, and the controller would take the tenant for a dead runner.
        loop {
            let s = serde_json::to_string(&r).expect("serializable");
            if s.len() <= MAX_RESULT {
                return s;
            }
            if !r.failed_checks.is_empty() {
                r.failed_checks.pop();
            } else if !r.failed_pre.is_empty() {
                r.failed_pre.pop();
            } else if !r.done.is_empty() {
                r.done.pop();
                r.more += 1;
            } else if let Some(e) = r.error.as_ref().filter(|e| e.len() > 16) {
                // Escapes can make a message six times longer in JSON than in text.
                r.error = Some(cut(e, e.len() / 2));
            } else {
                let mut tiny = JobResult::failed(&cut(&r.tenant, 63), "the result did not fit", Exit::Failed);
                tiny.code = r.code;
                return serde_json::to_string(&tiny).expect("serializable");
            }
        }
    }

    pub fn from_report(rep: &TenantReport, code: Exit) -> Self {
        let checks: Vec<_> = rep.migrations.iter().flat_map(|m| m.validation.iter()).collect();
        JobResult {
            v: 1,
            tenant: rep.tenant.clone(),
            ok: rep.ok,
            dir: rep.direction,
            from: rep.from_version.clone(),
            to: rep.to_version.clone(),
            done: rep
                .migrations
                .iter()
                .filter(|m| matches!(m.state, OutcomeState::Applied | OutcomeState::RolledBack))
                .map(|m| (m.id.clone(), m.duration_ms, m.documents_affected))
                .collect(),
            more: 0,
            checks: (checks.len(), checks.iter().filter(|c| c.passed).count()),
            failed_checks: checks.iter().filter(|c| !c.passed).map(|c| check_line(c)).collect(),
            pre: (rep.prechecks.len(), rep.prechecks.iter().filter(|c| c.passed).count()),
            failed_pre: rep.prechecks.iter().filter(|c| !c.passed).map(check_line).collect(),
            skipped: rep.skipped,
            error: rep.error.clone(),
            code: code.code(),
            dry_run: rep.dry_run,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_fit_a_termination_message() {
        let mut r = JobResult { v: 1, tenant: "t".into(), ok: false, code: 1, ..Default::default() };
        for i in 0..500 {
            r.done.push((format!("20250101{i:06}_a_rather_long_migration_name"), 12345, 67890));
        }
        r.error = Some("x".repeat(10_000));
        r.failed_checks = vec!["y".repeat(1000); 20];
        r.backup = Some(BackupInfo {
            at: format!("database:dbshift_snapshots/{}.20250101T120000Z-2", "t".repeat(63)),
            docs: u64::MAX >> 1,
            bytes: u64::MAX >> 1,
            sha256: "f".repeat(64),
            ms: 123_456,
        });
        r.rollback = Some(RollbackHow::Snapshot);
        r.restored = r.backup.as_ref().map(|b| b.at.clone());
        let s = r.to_compact_json();
        assert!(s.len() <= MAX_RESULT, "{}", s.len());
        let back: JobResult = serde_json::from_str(&s).unwrap();
        assert_eq!(back.done.len() + back.more, 500);
        assert!(back.more > 0);
        assert_eq!((back.backup, back.rollback, back.restored), (r.backup, r.rollback, r.restored));
    }

    #[test]
    fn an_error_of_control_characters_still_gives_valid_json() {
        for error in ["\u{1}".repeat(5000), "\"\\".repeat(3000), "é\u{7}".repeat(3000)] {
            let r = JobResult::failed("t", &error, Exit::Failed);
            let s = r.to_compact_json();
            assert!(s.len() <= MAX_RESULT, "{}", s.len());
            let back: JobResult = serde_json::from_str(&s).expect("valid JSON");
            assert_eq!(back.code, Exit::Failed.code());
            assert!(!back.error.unwrap().is_empty());
        }
    }

    #[test]
    fn new_fields_are_optional_and_the_old_ones_unchanged() {
        let old = r#"{"v":1,"tenant":"t","ok":true,"dir":"up","done":[["a",1,2]],"checks":[0,0],"code":0}"#;
        let r: JobResult = serde_json::from_str(old).unwrap();
        assert_eq!(r.to_compact_json(), old, "without a backup or rollback, the result is as before");
        let with = JobResult {
            backup: Some(BackupInfo { at: "dir:/b/t/x".into(), docs: 1, bytes: 2, sha256: "ab".into(), ms: 3 }),
            rollback: Some(RollbackHow::Data),
            ..r
        };
        assert_eq!(
            with.to_compact_json(),
            r#"{"v":1,"tenant":"t","ok":true,"dir":"up","done":[["a",1,2]],"checks":[0,0],"code":0,"backup":{"at":"dir:/b/t/x","docs":1,"bytes":2,"sha256":"ab","ms":3},"rollback":"data"}"#
        );
    }
}
