//! The fleet as its databases stand (`status.fleet`): every selected tenant's tracking
//! collection read, and each tenant counted at its version, at the target, behind, held, ahead
//! or drifted. Taken after each run ends and every `spec.resyncInterval`; in `continuous` mode
//! the tenants behind it (and not held) get a follow-up run.
//!
//! The tracking collection is the memory: a tenant whose migration failed or was rolled back
//! by one of this generation's runs says so in its records, so the controller keeps no list of
//! its own (and a restarted one decides the same).

use std::collections::BTreeMap;

use futures::StreamExt;
use mongodb::Client;

use crate::crd::{FleetStatus, VersionCount};
use crate::engine::loader::Migration;
use crate::engine::planner::{self, PlanError, UpRequest};
use crate::engine::tracking::{self, Record, State};

/// Tenant databases read at once.
const CONCURRENCY: usize = 16;
/// Versions listed in `status.fleet.versions` (the newest; the rest are summed as `older`).
pub const MAX_VERSIONS: usize = 50;
/// Tenants named in `status.fleet.error` when some could not be read.
const NAMED: usize = 5;

/// Where one tenant stands against the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    AtTarget,
    /// New, pending migrations, or a runner stopped on it mid-way: a follow-up run's.
    Behind,
    /// Behind, but its migration failed or was rolled back in this generation's runs, or the
    /// last run had it and left it behind: not followed until the resource changes.
    Held,
    /// Past the target.
    Ahead,
}

/// What the census needs to know of the run it follows.
pub struct Basis<'a> {
    /// The migrations (absent for an image source: versions are compared instead).
    pub migrations: Option<&'a [Migration]>,
    pub target: Option<&'a str>,
    pub profiles: &'a [String],
    /// The generation's first run id: its follow-ups are `<root>-f<n>`.
    pub root_run: &'a str,
    /// The tenants of the last run: one of them still behind (not interrupted) is held.
    pub last_run: &'a std::collections::HashSet<String>,
}

/// Whether `run` is the generation's run `root` or one of its follow-ups.
pub fn of_generation(run: &str, root: &str) -> bool {
    run == root || run.strip_prefix(root).and_then(|s| s.strip_prefix("-f")).is_some_and(|n| n.parse::<u32>().is_ok())
}

/// The version in effect: the newest applied or baselined.
pub fn version_of(records: &[Record]) -> Option<String> {
    records.iter().filter(|r| r.state.in_effect()).map(|r| r.version.clone()).max()
}

/// Where a tenant with these records stands.
pub fn standing(records: &[Record], b: &Basis<'_>) -> Standing {
    if records.iter().any(|r| matches!(r.state, State::Applying | State::RollingBack)) {
        return Standing::Behind;
    }
    let current = version_of(records);
    let pending: Vec<String> = match b.migrations {
        Some(ms) => {
            let req = UpRequest { target: b.target.map(String::from), only: None, allow_changed: true };
            match planner::plan_up(ms, records, &req, b.profiles) {
                Ok(p) => p.iter().map(|m| m.id()).collect(),
                Err(PlanError::TargetBelowCurrent { .. }) => return Standing::Ahead,
                // Not a plan a follow-up could carry out: counted behind, not followed.
                Err(_) => return Standing::Held,
            }
        }
        // An image source: only versions can be compared.
        None => match (b.target, current.as_deref()) {
            (_, None) => vec![String::new()],
            (Some(t), Some(c)) if c < t => vec![String::new()],
            (Some(t), Some(c)) if c > t => return Standing::Ahead,
            _ => Vec::new(),
        },
    };
    if pending.is_empty() {
        return Standing::AtTarget;
    }
    let held = records.iter().any(|r| {
        matches!(r.state, State::Failed | State::RolledBack)
            && (pending.contains(&r.id) || (b.migrations.is_none() && b.target.is_none_or(|t| r.version.as_str() <= t)))
            && (of_generation(&r.run_id, b.root_run)
                || r.rolled_back_by.as_deref().is_some_and(|by| of_generation(by, b.root_run)))
    });
    if held {
        Standing::Held
    } else {
        Standing::Behind
    }
}

/// One tenant, read.
struct Seen {
    tenant: String,
    version: Option<String>,
    standing: Standing,
    drifted: bool,
}

async fn look(client: &Client, tenant: String, b: &Basis<'_>) -> Result<Seen, (String, String)> {
    let db = client.database(&tenant);
    let records = match tracking::load(&db, tracking::TRACKING).await {
        Ok(r) => r,
        Err(e) => return Err((tenant, crate::mongo::describe(&e))),
    };
    let interrupted = records.iter().any(|r| matches!(r.state, State::Applying | State::RollingBack));
    let standing = match standing(&records, b) {
        // Tried by the last run and still behind: not again at every resync.
        Standing::Behind if !interrupted && b.last_run.contains(&tenant) => Standing::Held,
        s => s,
    };
    let drifted = match (b.migrations, records.is_empty()) {
        (Some(ms), false) => match crate::engine::drift::drift(&db, ms, &records).await {
            Ok((d, _)) => !d.is_empty(),
            Err(e) => return Err((tenant, crate::mongo::describe(&e))),
        },
        _ => false,
    };
    Ok(Seen { tenant, version: version_of(&records), standing, drifted })
}

/// The count, and the tenants a follow-up run would migrate (behind, not held), in order.
pub struct Census {
    pub fleet: FleetStatus,
    pub behind: Vec<String>,
}

/// Read every tenant (at most [`CONCURRENCY`] at once). A tenant that cannot be read is named in
/// `fleet.error` and left out of the counts and of any follow-up; the message has passed the
/// connection's redactor.
pub async fn take(conn: &crate::mongo::Connection, tenants: &[String], b: &Basis<'_>) -> Census {
    let seen: Vec<Result<Seen, (String, String)>> = futures::stream::iter(tenants.iter().cloned())
        .map(|t| look(&conn.client, t, b))
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut fleet = FleetStatus { tenants: tenants.len() as u32, ..Default::default() };
    let mut versions: BTreeMap<String, u32> = BTreeMap::new();
    let mut behind = Vec::new();
    let mut unreadable: Vec<(String, String)> = Vec::new();
    for s in seen {
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                unreadable.push(e);
                continue;
            }
        };
        *versions.entry(s.version.unwrap_or_else(|| "none".into())).or_default() += 1;
        fleet.drifted += s.drifted as u32;
        match s.standing {
            Standing::AtTarget => fleet.at_target += 1,
            Standing::Behind => {
                fleet.behind += 1;
                behind.push(s.tenant);
            }
            Standing::Held => {
                fleet.behind += 1;
                fleet.held += 1;
            }
            Standing::Ahead => fleet.ahead += 1,
        }
    }
    behind.sort();
    fleet.versions = version_list(versions);
    if !unreadable.is_empty() {
        unreadable.sort();
        let named: Vec<String> =
            unreadable.iter().take(NAMED).map(|(t, e)| conn.redactor.apply(&format!("{t}: {e}"))).collect();
        fleet.error =
            Some(format!("{} tenant(s) could not be read and are not counted: {}", unreadable.len(), named.join("; ")));
    }
    fleet.summary = summary(&fleet);
    Census { fleet, behind }
}

/// Newest first, at most [`MAX_VERSIONS`] (the rest summed as `older`), `none` last.
fn version_list(mut versions: BTreeMap<String, u32>) -> Vec<VersionCount> {
    let none = versions.remove("none");
    let mut out: Vec<VersionCount> =
        versions.into_iter().rev().map(|(version, tenants)| VersionCount { version, tenants }).collect();
    if out.len() > MAX_VERSIONS {
        let older: u32 = out.drain(MAX_VERSIONS..).map(|v| v.tenants).sum();
        out.push(VersionCount { version: "older".into(), tenants: older });
    }
    out.extend(none.map(|tenants| VersionCount { version: "none".into(), tenants }));
    out
}

/// `40/42 at target, 2 behind (1 held), 1 drifted`.
pub fn summary(f: &FleetStatus) -> String {
    let mut s = format!("{}/{} at target", f.at_target, f.tenants);
    if f.behind > 0 {
        s.push_str(&format!(", {} behind", f.behind));
        if f.held > 0 {
            s.push_str(&format!(" ({} held)", f.held));
        }
    }
    for (n, what) in [(f.ahead, "ahead"), (f.drifted, "drifted")] {
        if n > 0 {
            s.push_str(&format!(", {n} {what}"));
        }
    }
    if f.error.is_some() {
        s.push_str(", some unread");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::loader::load_sources;
    use std::path::PathBuf;

    fn migrations() -> Vec<Migration> {
        let file = |v: &str| {
            (PathBuf::from(format!("{v}_m.yaml")), "up: [{ createCollection: { collection: c } }]\n".to_string())
        };
        load_sources(vec![file("20250101000000"), file("20250102000000"), file("20250103000000")]).unwrap()
    }

    fn record(m: &Migration, state: State, run: &str) -> Record {
        Record::of(m, state, 1, run, "h".into())
    }

    #[test]
    fn tenants_stand_where_their_records_say() {
        let ms = migrations();
        let none = Default::default();
        let b = Basis {
            migrations: Some(&ms),
            target: Some("20250102000000"),
            profiles: &[],
            root_run: "m-g2-abc123",
            last_run: &none,
        };
        assert_eq!(standing(&[], &b), Standing::Behind, "a new tenant");
        let at = [record(&ms[0], State::Applied, "x"), record(&ms[1], State::Applied, "m-g2-abc123")];
        assert_eq!(standing(&at, &b), Standing::AtTarget);
        let ahead = [record(&ms[0], State::Applied, "x"), record(&ms[2], State::Applied, "y")];
        assert_eq!(standing(&ahead, &b), Standing::Ahead);
        // Failed in this generation (its run or a follow-up): held; in another: behind.
        for (run, want) in [
            ("m-g2-abc123", Standing::Held),
            ("m-g2-abc123-f3", Standing::Held),
            ("m-g1-abc123", Standing::Behind),
            ("m-g2-abc123x", Standing::Behind),
        ] {
            let failed = [record(&ms[0], State::Applied, "x"), record(&ms[1], State::Failed, run)];
            assert_eq!(standing(&failed, &b), want, "{run}");
        }
        // Rolled back by this generation (the failure policy, or `down` by hand after it).
        let mut rb = record(&ms[1], State::RolledBack, "m-g1-abc123");
        rb.rolled_back_by = Some("m-g2-abc123-f1".into());
        assert_eq!(standing(&[record(&ms[0], State::Applied, "x"), rb], &b), Standing::Held);
        // A runner stopped mid-way: behind, whatever else (the next runner undoes it).
        let mut stopped = record(&ms[1], State::Failed, "m-g2-abc123");
        stopped.state = State::Applying;
        assert_eq!(standing(&[stopped], &b), Standing::Behind);
        // A baseline is in effect (`dbshift baseline --to` records every migration up to it).
        let based = [record(&ms[0], State::Baselined, "x"), record(&ms[1], State::Baselined, "x")];
        assert_eq!(standing(&based, &b), Standing::AtTarget);
    }

    #[test]
    fn image_sources_compare_versions() {
        let ms = migrations();
        let none = Default::default();
        let b =
            Basis { migrations: None, target: Some("20250102000000"), profiles: &[], root_run: "r", last_run: &none };
        assert_eq!(standing(&[], &b), Standing::Behind);
        assert_eq!(standing(&[record(&ms[0], State::Applied, "x")], &b), Standing::Behind);
        assert_eq!(standing(&[record(&ms[1], State::Applied, "x")], &b), Standing::AtTarget);
        assert_eq!(standing(&[record(&ms[2], State::Applied, "x")], &b), Standing::Ahead);
        let failed = [record(&ms[0], State::Applied, "x"), record(&ms[1], State::Failed, "r-f1")];
        assert_eq!(standing(&failed, &b), Standing::Held);
    }

    #[test]
    fn versions_newest_first_and_bounded() {
        let mut v: BTreeMap<String, u32> = (0..60).map(|i| (format!("2025010100{i:04}"), 2)).collect();
        v.insert("none".into(), 3);
        let l = version_list(v);
        assert_eq!(l.len(), MAX_VERSIONS + 2);
        assert_eq!(l[0].version, "20250101000059");
        assert_eq!(l[MAX_VERSIONS].version, "older");
        assert_eq!(l[MAX_VERSIONS].tenants, 20);
        assert_eq!(l.last().unwrap().version, "none");
        let f = FleetStatus { tenants: 42, at_target: 40, behind: 2, held: 1, drifted: 1, ..Default::default() };
        assert_eq!(summary(&f), "40/42 at target, 2 behind (1 held), 1 drifted");
    }
}
