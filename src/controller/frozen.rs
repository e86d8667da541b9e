//! A run: what one generation of a `DatabaseMigration` does, frozen when it starts.
//!
//! The plan is written to a ConfigMap owned by the resource before the first Job exists, so
//! a restarted controller continues the same run with the same tenants and the same spec,
//! whatever happened to the resource or its sources in between.

use serde::{Deserialize, Serialize};

use crate::crd::{DatabaseMigration, DatabaseMigrationSpec};

/// Key of the plan inside its ConfigMap.
pub const PLAN_KEY: &str = "plan.json";
/// What a ConfigMap's data may hold (the API server refuses more than 1 MiB), with room for the
/// rest of the object.
pub const CONFIG_MAP_BYTES: usize = 1_000_000;

/// The plan as its ConfigMap holds it, or why it cannot be one (checked before anything is
/// created: a ConfigMap the API server refuses would leave the run unable to start, silently).
pub fn plan_data(plan: &FrozenRun) -> Result<String, String> {
    let json = serde_json::to_string(plan).map_err(|e| format!("the plan cannot be written: {e}"))?;
    if json.len() > CONFIG_MAP_BYTES {
        let names: usize = plan.tenants.iter().map(|t| t.len() + 3).sum();
        return Err(format!(
            "the run's plan takes {} KiB ({} tenants, {} KiB of names), more than a ConfigMap holds (1 MiB): split \
             the tenants over several DatabaseMigrations (e.g. by pattern)",
            json.len() >> 10,
            plan.tenants.len(),
            names >> 10
        ));
    }
    Ok(json)
}

/// Whether the migration files fit in the run's files ConfigMap.
pub fn check_files(files: &std::collections::BTreeMap<String, String>) -> Result<(), String> {
    let bytes: usize = files.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > CONFIG_MAP_BYTES {
        return Err(format!(
            "the migration files take {} KiB, more than a ConfigMap holds (1 MiB): ship them in an image \
             (spec.migrations.image)",
            bytes >> 10
        ));
    }
    Ok(())
}

/// Everything a run needs, decided once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FrozenRun {
    /// `<name>-g<generation>-<uid>`: in Job labels, tracking records and snapshots.
    pub run_id: String,
    /// The generation of the resource this run carries out.
    pub generation: i64,
    /// The version migrated to (`None`: the newest in an image-sourced set, unknown here).
    pub target: Option<String>,
    /// Canaries first, in the order given, then the other tenants sorted.
    pub tenants: Vec<String>,
    /// How many of `tenants` are canaries.
    pub canaries: usize,
    /// ConfigMap holding the frozen migration files (absent for an image source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_config_map: Option<String>,
    /// The spec as it was when the run started.
    pub spec: DatabaseMigrationSpec,
    /// [`spec_digest`] of the resource's spec when the run started (inline files included,
    /// which `spec` leaves out). Absent in plans of controllers before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_digest: Option<String>,
}

impl FrozenRun {
    /// Tenants per migration Job: `spec.rollout.tenantsPerJob`, or 1 for a dry run (its Jobs
    /// write nothing, so its results travel only in termination messages).
    pub fn per_job(&self) -> usize {
        if self.spec.dry_run {
            1
        } else {
            (self.spec.rollout.tenants_per_job as usize).clamp(1, crate::job::batch::MAX_BATCH)
        }
    }

    /// The first tenant of the batch tenant `i` is in: its migration Job is named after it.
    /// Canaries are batches of their own; then runs of [`Self::per_job`] in plan order.
    pub fn batch_start(&self, i: usize) -> usize {
        let c = self.canaries.min(self.tenants.len());
        if i < c {
            i
        } else {
            c + (i - c) / self.per_job() * self.per_job()
        }
    }

    /// The tenants (indexes) of the batch that starts at `start`.
    pub fn batch(&self, start: usize) -> std::ops::Range<usize> {
        let c = self.canaries.min(self.tenants.len());
        let end = if start < c { start + 1 } else { (start + self.per_job()).min(self.tenants.len()) };
        start..end
    }

    /// Every batch's first tenant, in order.
    pub fn batch_starts(&self) -> impl Iterator<Item = usize> + '_ {
        let c = self.canaries.min(self.tenants.len());
        (0..c).chain((c..self.tenants.len()).step_by(self.per_job()))
    }
}

/// SHA-256 of what defines a run in `spec`: everything but what steers a run in progress
/// (`suspend`, `rollout.approval`, `rollout.windows`).
pub fn spec_digest(spec: &DatabaseMigrationSpec) -> String {
    use sha2::{Digest, Sha256};
    let json = serde_json::to_vec(&spec.run_defining()).expect("serializable");
    hex::encode(Sha256::digest(json))
}

/// Whether the resource (`live` spec at `generation`) still describes the run of `plan`: only
/// what steers a run in progress changed, so no new run starts. A plan without a digest (an
/// older controller's) is the resource's run only at its own generation.
pub fn same_run(plan: &FrozenRun, generation: i64, live: &DatabaseMigrationSpec) -> bool {
    match &plan.spec_digest {
        Some(d) => *d == spec_digest(live),
        None => generation == plan.generation,
    }
}

/// The run id of a resource's current generation. Deterministic, so a controller restarted
/// half-way through starting a run finds the objects it already created.
pub fn run_id(dbm: &DatabaseMigration) -> String {
    let name = dbm.metadata.name.as_deref().unwrap_or("run");
    let uid = dbm.metadata.uid.as_deref().unwrap_or("");
    let short: String = uid.chars().filter(|c| c.is_ascii_alphanumeric()).take(6).collect();
    let generation = dbm.metadata.generation.unwrap_or(0);
    format!("{}-g{generation}-{short}", trim_name(name, 40))
}

/// The first run of a generation, for any run of it: `<root>-f<n>` is the root's n-th
/// follow-up (`continuous` mode).
pub fn root_run(run_id: &str) -> &str {
    match run_id.rsplit_once("-f") {
        Some((root, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && is_root(root) => root,
        _ => run_id,
    }
}

/// Whether `id` has the shape of [`run_id`]: `<name>-g<generation>-<uid part>`.
fn is_root(id: &str) -> bool {
    let mut parts = id.rsplitn(3, '-');
    let (uid, generation) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    parts.next().is_some()
        && uid.len() <= 6
        && uid.bytes().all(|b| b.is_ascii_alphanumeric())
        && generation.strip_prefix('g').is_some_and(|g| !g.is_empty() && g.bytes().all(|b| b.is_ascii_digit()))
}

/// The id of the follow-up run after `run_id` (a generation's run or a follow-up of it).
/// Deterministic, so a controller restarted half-way through starting it finds its plan.
pub fn next_follow_up(run_id: &str) -> String {
    let root = root_run(run_id);
    let n: u64 = run_id[root.len()..].strip_prefix("-f").and_then(|n| n.parse().ok()).unwrap_or(0);
    format!("{root}-f{}", n + 1)
}

/// Name of the ConfigMap holding a run's plan.
pub fn plan_config_map(run_id: &str) -> String {
    format!("{run_id}-plan")
}

/// Name of the ConfigMap holding a run's migration files.
pub fn files_config_map(run_id: &str) -> String {
    format!("{run_id}-files")
}

/// Order tenants: canaries first (as listed), then the rest sorted.
pub fn order_tenants(resolved: &[String], canaries: &[String]) -> (Vec<String>, usize) {
    let mut out: Vec<String> = Vec::with_capacity(resolved.len());
    for c in canaries {
        if resolved.contains(c) && !out.contains(c) {
            out.push(c.clone());
        }
    }
    let n = out.len();
    let mut rest: Vec<String> = resolved.iter().filter(|t| !canaries.contains(t)).cloned().collect();
    rest.sort();
    rest.dedup();
    out.extend(rest);
    (out, n)
}

/// Cut a DNS-label-ish name to `max` characters without leaving a trailing `-` or `.`.
pub fn trim_name(name: &str, max: usize) -> &str {
    let mut end = name.len().min(max);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].trim_end_matches(['-', '.'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_change_of_what_steers_a_run_keeps_the_run() {
        let mut spec: DatabaseMigrationSpec = serde_yaml::from_str(
            "connection: { secretRef: { name: s } }\ntenants: { names: [a] }\nmigrations: { inline: { 20250101000000_a.yaml: 'up: []' } }\n",
        )
        .unwrap();
        let plan = |spec: &DatabaseMigrationSpec, digest: bool| FrozenRun {
            run_id: "r".into(),
            generation: 1,
            target: None,
            tenants: vec!["a".into()],
            canaries: 0,
            files_config_map: None,
            spec: spec.clone(),
            spec_digest: digest.then(|| spec_digest(spec)),
        };
        let p = plan(&spec, true);
        let mut steered = spec.clone();
        steered.suspend = true;
        steered.rollout.approval = crate::crd::Approval::AfterCanaries;
        assert!(same_run(&p, 3, &steered), "suspend and approval steer the same run");
        spec.migrations.inline.as_mut().unwrap().insert("20250102000000_b.yaml".into(), "up: []".into());
        assert!(!same_run(&p, 2, &spec), "a new inline file is a new run, though the plan leaves files out");
        // An older controller's plan: its own generation only.
        let old = plan(&spec, false);
        assert!(same_run(&old, 1, &steered) && !same_run(&old, 2, &steered));
    }

    #[test]
    fn ten_thousand_tenants_fit_in_a_plan_and_more_are_refused_with_why() {
        let spec: DatabaseMigrationSpec = serde_yaml::from_str(MINIMAL).unwrap();
        let mut plan = FrozenRun {
            run_id: "r".into(),
            generation: 1,
            target: None,
            tenants: (0..10_000).map(|i| format!("tenant_{i:05}_{}", "x".repeat(50))).collect(),
            canaries: 0,
            files_config_map: None,
            spec,
            spec_digest: None,
        };
        assert!(plan.tenants.iter().all(|t| t.len() == 63));
        let json = plan_data(&plan).unwrap();
        assert!(json.len() <= CONFIG_MAP_BYTES, "{}", json.len());
        plan.tenants.extend((0..10_000).map(|i| format!("more_{i:05}_{}", "y".repeat(50))));
        let e = plan_data(&plan).unwrap_err();
        assert!(e.contains("20000 tenants") && e.contains("split the tenants"), "{e}");
        let files = std::collections::BTreeMap::from([("20250101000000_big.yaml".to_string(), "#".repeat(1 << 20))]);
        assert!(check_files(&files).unwrap_err().contains("spec.migrations.image"));
    }

    #[test]
    fn batches_keep_canaries_alone_and_cut_the_rest_in_order() {
        let mut spec: DatabaseMigrationSpec = serde_yaml::from_str(MINIMAL).unwrap();
        spec.rollout.tenants_per_job = 3;
        let plan = FrozenRun {
            run_id: "r".into(),
            generation: 1,
            target: None,
            tenants: (0..10).map(|i| format!("t{i}")).collect(),
            canaries: 2,
            files_config_map: None,
            spec: spec.clone(),
            spec_digest: None,
        };
        assert_eq!(plan.batch_starts().collect::<Vec<_>>(), [0, 1, 2, 5, 8]);
        assert_eq!([0, 1, 2, 4, 5, 7, 8, 9].map(|i| plan.batch_start(i)), [0, 1, 2, 2, 5, 5, 8, 8]);
        assert_eq!((plan.batch(1), plan.batch(2), plan.batch(8)), (1..2, 2..5, 8..10));
        // A dry run's Jobs take one tenant each; so does the default.
        let mut dry = plan.clone();
        dry.spec.dry_run = true;
        assert_eq!(dry.batch_starts().count(), 10);
        let mut one = plan.clone();
        one.spec.rollout.tenants_per_job = 1;
        assert_eq!((one.batch_start(7), one.batch(7)), (7, 7..8));
        // The default is not written: plans and digests of earlier controllers stay the same.
        assert!(!serde_json::to_string(&one.spec).unwrap().contains("tenantsPerJob"));
    }

    #[test]
    fn follow_ups_count_from_the_generations_run() {
        assert_eq!(next_follow_up("m-g3-abc123"), "m-g3-abc123-f1");
        assert_eq!(next_follow_up("m-g3-abc123-f1"), "m-g3-abc123-f2");
        assert_eq!(next_follow_up("m-g3-abc123-f41"), "m-g3-abc123-f42");
        assert_eq!(root_run("m-g3-abc123-f41"), "m-g3-abc123");
        // A name that merely contains `-f` is a root.
        assert_eq!(root_run("my-feature-g3-abc123"), "my-feature-g3-abc123");
        assert_eq!(next_follow_up("my-f-g3-abc123"), "my-f-g3-abc123-f1");
        // A uid part that starts with f and digits is not a follow-up's number.
        assert_eq!(root_run("m-g3-f12345"), "m-g3-f12345");
        assert_eq!(next_follow_up("m-g3-f12345"), "m-g3-f12345-f1");
        assert_eq!(root_run("m-g3-f12345-f2"), "m-g3-f12345");
    }

    #[test]
    fn canaries_come_first_in_their_order() {
        let resolved: Vec<String> = ["t_c", "t_a", "t_b", "t_d"].iter().map(|s| s.to_string()).collect();
        let (t, n) = order_tenants(&resolved, &["t_d".into(), "t_b".into()]);
        assert_eq!(t, ["t_d", "t_b", "t_a", "t_c"]);
        assert_eq!(n, 2);
    }

    #[test]
    fn run_ids_are_short_deterministic_labels() {
        let mut dbm = DatabaseMigration::new(&"a".repeat(60), serde_yaml::from_str(MINIMAL).unwrap());
        dbm.metadata.uid = Some("0f3c9a7e-1111-2222-3333-444455556666".into());
        dbm.metadata.generation = Some(7);
        let id = run_id(&dbm);
        assert_eq!(id, format!("{}-g7-0f3c9a", "a".repeat(40)));
        assert!(id.len() <= 63);
        assert_eq!(run_id(&dbm), id);
    }

    const MINIMAL: &str = r#"
connection: { secretRef: { name: m } }
tenants: { names: [t] }
migrations: { configMapRef: { name: x } }
"#;
}
