//! Step 1 of a run: dereference and check everything it needs before anything is touched —
//! the Secret, the migration files, the target, the tenants.
//!
//! Errors say whether waiting can fix them (a Secret not created yet, MongoDB down: retried
//! with backoff) or only a change of the resource can (a bad pattern, a malformed file).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use kube::Client;

use super::pod_security::JobPolicy;
use crate::crd::DatabaseMigration;
use crate::engine::loader;
use crate::mongo::{ConnectError, Connection};
use crate::tenants::{check_db_name, check_tenant, TenantSelector};

/// Why a run cannot start.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct InputError {
    /// PascalCase, for the condition reason, Events and metrics.
    pub reason: &'static str,
    pub message: String,
    /// Only a change of the resource can fix it (otherwise it is retried).
    pub permanent: bool,
}

fn waiting(reason: &'static str, message: String) -> InputError {
    InputError { reason, message, permanent: false }
}

fn invalid(reason: &'static str, message: String) -> InputError {
    InputError { reason, message, permanent: true }
}

/// What a run starts from.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// Migration files (file name, text), or `None` for an image source.
    pub files: Option<BTreeMap<String, String>>,
    /// The version to migrate to, when known.
    pub target: Option<String>,
    /// Tenant databases, sorted, exclusions removed.
    pub tenants: Vec<String>,
}

/// Check the parts of the spec that need no server: the tenant selector, canaries, sources, and
/// the privileges the jobTemplate asks for.
pub fn check_spec(dbm: &DatabaseMigration, policy: &JobPolicy) -> Result<(), InputError> {
    let spec = &dbm.spec;
    policy.check(&spec.job_template).map_err(|e| invalid("JobTemplateRefused", e))?;
    if let Some(m) = &spec.job_template.script_memory {
        crate::engine::script::parse_memory(m)
            .map_err(|e| invalid("InvalidSpec", format!("spec.jobTemplate.scriptMemory: {e}")))?;
    }
    super::windows::parse(&spec.rollout.windows).map_err(|e| invalid("InvalidSpec", e))?;
    if let Some(i) = &spec.resync_interval {
        crate::crd::parse_interval(i).map_err(|e| invalid("InvalidSpec", e))?;
    }
    // The CRD's CEL rule (crd::RULES), for servers without CEL.
    if spec.mode == crate::crd::Mode::Continuous && spec.dry_run {
        return Err(invalid(
            "InvalidSpec",
            "spec.mode continuous with spec.dryRun would plan the same tenants again at every resync: set one of them"
                .into(),
        ));
    }
    let t = &spec.tenants;
    if t.names.is_empty() && t.pattern.is_none() && t.registry.is_none() {
        return Err(invalid("InvalidSpec", "spec.tenants selects nothing: set names, pattern or registry".into()));
    }
    // The bounds and the rule the CRD's CEL rules check on 1.25+ (crd::RULES), for older servers.
    if t.names.len() > crate::crd::MAX_NAMES || spec.rollout.canaries.len() > crate::crd::MAX_CANARIES {
        return Err(invalid(
            "InvalidSpec",
            format!(
                "spec.tenants.names may list at most {} tenants (use a pattern or a registry for more), \
                 spec.rollout.canaries at most {}",
                crate::crd::MAX_NAMES,
                crate::crd::MAX_CANARIES
            ),
        ));
    }
    if t.pattern.is_none() && t.registry.is_none() {
        if let Some(c) = spec.rollout.canaries.iter().find(|c| !t.names.contains(c)) {
            return Err(invalid(
                "InvalidSpec",
                format!(
                    "spec.rollout.canaries must be among spec.tenants.names when names are the only tenant \
                     source: {c:?} is not"
                ),
            ));
        }
    }
    for n in &t.exclude {
        check_db_name(n).map_err(|e| invalid("InvalidSpec", format!("spec.tenants.exclude: {e}")))?;
    }
    for n in t.names.iter().chain(&spec.rollout.canaries) {
        check_tenant(n).map_err(|e| invalid("InvalidSpec", format!("spec.tenants: {e}")))?;
        if spec.backup.destination.as_ref().and_then(|d| d.database.as_ref()) == Some(n) {
            return Err(invalid(
                "InvalidSpec",
                format!("spec.tenants: {n:?} is spec.backup.destination.database, where snapshots go: never a tenant"),
            ));
        }
    }
    if let Some(p) = &t.pattern {
        regex::Regex::new(p).map_err(|e| {
            invalid("InvalidSpec", format!("spec.tenants.pattern {p:?} is not a valid regular expression: {e}"))
        })?;
    }
    if let Some(r) = &t.registry {
        check_db_name(&r.database)
            .map_err(|e| invalid("InvalidSpec", format!("spec.tenants.registry.database: {e}")))?;
        if r.collection.is_empty() || r.field.is_empty() {
            return Err(invalid("InvalidSpec", "spec.tenants.registry needs a collection and a field".into()));
        }
    }
    let m = &spec.migrations;
    let sources = [m.config_map_ref.is_some(), m.inline.is_some(), m.image.is_some()].iter().filter(|x| **x).count();
    if sources != 1 {
        return Err(invalid(
            "InvalidSpec",
            format!("spec.migrations must set exactly one of configMapRef, inline, image ({sources} set)"),
        ));
    }
    if let Some(d) = &spec.backup.destination {
        if d.database.is_some() && d.persistent_volume_claim.is_some() {
            return Err(invalid(
                "InvalidSpec",
                "spec.backup.destination: set database or persistentVolumeClaim, not both".into(),
            ));
        }
        if let Some(db) = &d.database {
            check_db_name(db).map_err(|e| invalid("InvalidSpec", format!("spec.backup.destination.database: {e}")))?;
        }
    }
    Ok(())
}

/// Read the connection URI from the Secret the spec names (same namespace only).
pub async fn read_uri(client: &Client, dbm: &DatabaseMigration) -> Result<String, InputError> {
    let ns = dbm.metadata.namespace.as_deref().unwrap_or("default");
    let r = &dbm.spec.connection.secret_ref;
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(&r.name)
        .await
        .map_err(|e| waiting("KubernetesError", format!("reading Secret {ns}/{}: {e}", r.name)))?
        .ok_or_else(|| waiting("SecretNotFound", format!("Secret {ns}/{} does not exist (yet)", r.name)))?;
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .map(|b| b.0.clone())
        .or_else(|| secret.string_data.as_ref().and_then(|d| d.get(&r.key)).map(|s| s.clone().into_bytes()))
        .ok_or_else(|| waiting("SecretKeyMissing", format!("Secret {ns}/{} has no key {:?}", r.name, r.key)))?;
    let uri = String::from_utf8(bytes)
        .map_err(|_| invalid("InvalidSecret", format!("Secret {ns}/{} key {:?} is not UTF-8 text", r.name, r.key)))?;
    let uri = uri.trim().to_string();
    if !(uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://")) {
        return Err(invalid(
            "InvalidSecret",
            format!("Secret {ns}/{} key {:?} does not hold a mongodb:// or mongodb+srv:// URI", r.name, r.key),
        ));
    }
    Ok(uri)
}

/// The migration files of a ConfigMap or inline source, checked with the engine's loader.
pub async fn read_files(
    client: &Client,
    dbm: &DatabaseMigration,
) -> Result<Option<BTreeMap<String, String>>, InputError> {
    let ns = dbm.metadata.namespace.as_deref().unwrap_or("default");
    let m = &dbm.spec.migrations;
    let files: BTreeMap<String, String> = if let Some(r) = &m.config_map_ref {
        let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
            .get_opt(&r.name)
            .await
            .map_err(|e| waiting("KubernetesError", format!("reading ConfigMap {ns}/{}: {e}", r.name)))?
            .ok_or_else(|| waiting("ConfigMapNotFound", format!("ConfigMap {ns}/{} does not exist (yet)", r.name)))?;
        cm.data.unwrap_or_default()
    } else if let Some(inline) = &m.inline {
        inline.clone()
    } else {
        return Ok(None);
    };
    let sources: Vec<(PathBuf, String)> = files
        .iter()
        .filter(|(k, _)| k.ends_with(".yaml") || k.ends_with(".yml"))
        .map(|(k, v)| (PathBuf::from(k), v.clone()))
        .collect();
    if sources.is_empty() {
        return Err(invalid("InvalidMigrations", "the migration source holds no .yaml files".into()));
    }
    // Off the async threads: checking a file compiles its scripts, which (bounded in time as
    // they are) must never hold up the reconciles of other resources.
    tokio::task::spawn_blocking(move || loader::load_sources(sources))
        .await
        .map_err(|e| invalid("InvalidMigrations", format!("checking the migration files failed: {e}")))?
        .map_err(|e| {
            invalid("InvalidMigrations", format!("migration files are invalid:\n{}", e.to_string().trim_end()))
        })?;
    // Only the migration files are handed to the Jobs.
    Ok(Some(files.into_iter().filter(|(k, _)| k.ends_with(".yaml") || k.ends_with(".yml")).collect()))
}

/// The target version: the spec's (which must exist in the files), or the newest file.
pub fn resolve_target(
    dbm: &DatabaseMigration,
    files: Option<&BTreeMap<String, String>>,
) -> Result<Option<String>, InputError> {
    let Some(files) = files else { return Ok(dbm.spec.target.clone()) };
    let versions: Vec<(String, String)> = files.keys().filter_map(|k| loader::parse_file_name(k).ok()).collect();
    if let (Some(b), Some(t)) = (&dbm.spec.tenants.baseline, &dbm.spec.target) {
        if b.as_str() > t.as_str() {
            return Err(invalid(
                "InvalidSpec",
                format!(
                    "spec.tenants.baseline {b} is above spec.target {t}: new tenants would be recorded past the target"
                ),
            ));
        }
    }
    if let Some(b) = &dbm.spec.tenants.baseline {
        if !versions.iter().any(|(v, _)| v == b) {
            return Err(invalid(
                "BaselineNotFound",
                format!(
                    "spec.tenants.baseline {b} is not the version of any migration file ({} files)",
                    versions.len()
                ),
            ));
        }
    }
    match &dbm.spec.target {
        Some(t) => {
            let known = versions.iter().any(|(v, n)| v == t || &format!("{v}_{n}") == t);
            if known {
                Ok(Some(t.clone()))
            } else {
                Err(invalid(
                    "TargetNotFound",
                    format!("spec.target {t} is not the version of any migration file ({} files)", versions.len()),
                ))
            }
        }
        None => Ok(versions.iter().map(|(v, _)| v.clone()).max()),
    }
}

/// Connect to the MongoDB the URI names (errors say whether waiting can help).
pub async fn connect(uri: &str, timeout: Duration) -> Result<Connection, InputError> {
    crate::mongo::connect(uri, timeout).await.map_err(|e| match e {
        ConnectError::Invalid(m) => invalid("InvalidSecret", m),
        ConnectError::Unreachable(m) => waiting("MongoUnreachable", m),
    })
}

/// Resolve the tenant databases on the server.
pub async fn resolve_tenants(dbm: &DatabaseMigration, conn: &Connection) -> Result<Vec<String>, InputError> {
    let redact = |s: String| conn.redactor.apply(&s);
    let t = &dbm.spec.tenants;
    let selector =
        TenantSelector { names: t.names.clone(), pattern: t.pattern.clone(), exclude: Vec::new(), default: None };
    let mut tenants = if t.names.is_empty() && t.pattern.is_none() {
        Vec::new()
    } else {
        selector.resolve(&conn.client).await.map_err(|e| match e {
            crate::tenants::TenantError::List(_) => waiting("MongoUnreachable", redact(e.to_string())),
            crate::tenants::TenantError::NoMatch(p) => {
                invalid("NoTenants", format!("spec.tenants.pattern {p:?} matches no database on the server"))
            }
            other => invalid("InvalidSpec", redact(other.to_string())),
        })?
    };
    if let Some(r) = &t.registry {
        let filter = match &r.filter {
            Some(f) => bson::to_document(f)
                .map_err(|e| invalid("InvalidSpec", format!("spec.tenants.registry.filter: {e}")))?,
            None => bson::Document::new(),
        };
        let coll = conn.client.database(&r.database).collection::<bson::Document>(&r.collection);
        let mut cursor = coll.find(filter).projection(bson::doc! { &r.field: 1 }).await.map_err(|e| {
            waiting("MongoUnreachable", redact(format!("reading the tenant registry: {}", crate::mongo::describe(&e))))
        })?;
        while let Some(doc) = cursor.try_next().await.map_err(|e| {
            waiting("MongoUnreachable", redact(format!("reading the tenant registry: {}", crate::mongo::describe(&e))))
        })? {
            let name = doc.get_str(&r.field).map_err(|_| {
                invalid(
                    "InvalidRegistry",
                    format!("registry {}.{}: a document has no string field {:?}", r.database, r.collection, r.field),
                )
            })?;
            check_tenant(name).map_err(|e| invalid("InvalidRegistry", format!("registry entry: {e}")))?;
            tenants.push(name.to_string());
        }
    }
    tenants.retain(|n| !t.exclude.contains(n));
    // Never migrate the database that holds the snapshots.
    if let Some(db) = dbm.spec.backup.destination.as_ref().and_then(|d| d.database.as_ref()) {
        tenants.retain(|n| n != db);
    }
    tenants.sort();
    tenants.dedup();
    if tenants.is_empty() {
        return Err(invalid("NoTenants", "no tenant database is selected (after exclusions)".into()));
    }
    for c in &dbm.spec.rollout.canaries {
        if !tenants.contains(c) {
            return Err(invalid("InvalidSpec", format!("canary {c:?} is not among the selected tenants")));
        }
    }
    Ok(tenants)
}

/// Everything, in order: spec, Secret, files, target, tenants.
pub async fn gather(
    client: &Client,
    dbm: &DatabaseMigration,
    timeout: Duration,
    policy: &JobPolicy,
) -> Result<Inputs, InputError> {
    Ok(gather_connected(client, dbm, timeout, policy).await?.0)
}

/// [`gather`], keeping the connection it made (for reading the tenants' databases).
pub async fn gather_connected(
    client: &Client,
    dbm: &DatabaseMigration,
    timeout: Duration,
    policy: &JobPolicy,
) -> Result<(Inputs, Connection), InputError> {
    check_spec(dbm, policy)?;
    let uri = read_uri(client, dbm).await?;
    let files = read_files(client, dbm).await?;
    let target = resolve_target(dbm, files.as_ref())?;
    let conn = connect(&uri, timeout).await?;
    let tenants = resolve_tenants(dbm, &conn).await?;
    Ok((Inputs { files, target, tenants }, conn))
}

/// The migrations of a file set read by [`read_files`] (already checked there), off the async
/// threads: loading compiles their scripts.
pub async fn load_migrations(files: &BTreeMap<String, String>) -> Result<Vec<loader::Migration>, InputError> {
    let sources: Vec<(PathBuf, String)> = files.iter().map(|(k, v)| (PathBuf::from(k), v.clone())).collect();
    tokio::task::spawn_blocking(move || loader::load_sources(sources))
        .await
        .map_err(|e| invalid("InvalidMigrations", format!("loading the migration files failed: {e}")))?
        .map_err(|e| {
            invalid("InvalidMigrations", format!("migration files are invalid:\n{}", e.to_string().trim_end()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dbm(spec: &str) -> DatabaseMigration {
        DatabaseMigration::new("m", serde_yaml::from_str(spec).unwrap())
    }

    #[test]
    fn spec_checks_name_the_field_to_fix() {
        let bad_regex =
            dbm("connection: {secretRef: {name: s}}\ntenants: {pattern: '^t('}\nmigrations: {configMapRef: {name: c}}");
        let e = check_spec(&bad_regex, &JobPolicy::default()).unwrap_err();
        assert!(e.permanent && e.message.contains("spec.tenants.pattern"), "{e}");

        let two_sources = dbm(
            "connection: {secretRef: {name: s}}\ntenants: {names: [a]}\nmigrations: {configMapRef: {name: c}, image: {image: i}}",
        );
        assert!(check_spec(&two_sources, &JobPolicy::default()).unwrap_err().message.contains("exactly one"));

        let nothing = dbm("connection: {secretRef: {name: s}}\ntenants: {}\nmigrations: {configMapRef: {name: c}}");
        assert!(check_spec(&nothing, &JobPolicy::default()).unwrap_err().message.contains("selects nothing"));

        let bad_name = dbm("connection: {secretRef: {name: s}}\ntenants: {names: ['a.b']}\nmigrations: {inline: {}}");
        assert!(check_spec(&bad_name, &JobPolicy::default()).unwrap_err().message.contains("a.b"));

        for name in ["admin", "config", "local", "dbshift_snapshots"] {
            for spec in [
                format!("connection: {{secretRef: {{name: s}}}}\ntenants: {{names: [{name}]}}\nmigrations: {{inline: {{}}}}"),
                format!(
                    "connection: {{secretRef: {{name: s}}}}\ntenants: {{pattern: x}}\nrollout: {{canaries: [{name}]}}\nmigrations: {{inline: {{}}}}"
                ),
            ] {
                let e = check_spec(&dbm(&spec), &JobPolicy::default()).unwrap_err();
                assert!(e.permanent && e.message.contains("is never a tenant"), "{spec}: {e}");
            }
        }
        let into_store = dbm(
            "connection: {secretRef: {name: s}}\ntenants: {names: [snaps]}\nmigrations: {inline: {}}\nbackup: {enabled: true, destination: {database: snaps}}",
        );
        assert!(check_spec(&into_store, &JobPolicy::default()).unwrap_err().message.contains("where snapshots go"));

        // The CRD's CEL rule, for servers without CEL: canaries among the names when names are
        // the only source (with a pattern or registry they may come from there).
        let canary = |tenants: &str| {
            dbm(&format!(
                "connection: {{secretRef: {{name: s}}}}\ntenants: {tenants}\nrollout: {{canaries: [b]}}\nmigrations: {{inline: {{}}}}"
            ))
        };
        let e = check_spec(&canary("{names: [a]}"), &JobPolicy::default()).unwrap_err();
        assert!(e.message.contains("spec.rollout.canaries") && e.message.contains("\"b\""), "{e}");
        assert!(check_spec(&canary("{names: [a, b]}"), &JobPolicy::default()).is_ok());
        assert!(check_spec(&canary("{names: [a], pattern: x}"), &JobPolicy::default()).is_ok());
        // Continuous mode: a resync interval it can read, and never with a dry run.
        let base = "connection: {secretRef: {name: s}}\ntenants: {names: [a]}\nmigrations: {inline: {}}\n";
        for (extra, want) in [
            ("resyncInterval: 5s", "10s to 24h"),
            ("resyncInterval: 25h", "10s to 24h"),
            ("resyncInterval: 5d", "like 30s"),
            ("mode: continuous\ndryRun: true", "set one of them"),
        ] {
            let e = check_spec(&dbm(&format!("{base}{extra}")), &JobPolicy::default()).unwrap_err();
            assert!(e.permanent && e.message.contains(want), "{extra}: {e}");
        }
        assert!(
            check_spec(&dbm(&format!("{base}mode: continuous\nresyncInterval: 90s")), &JobPolicy::default()).is_ok()
        );
        assert_eq!(dbm(&format!("{base}resyncInterval: 2h")).spec.resync(), Duration::from_secs(7200));
        assert_eq!(dbm(base).spec.resync(), crate::crd::DEFAULT_RESYNC);
        let many: Vec<String> = (0..=crate::crd::MAX_NAMES).map(|i| format!("t{i}")).collect();
        let e = check_spec(&canary(&format!("{{names: [{}]}}", many.join(", "))), &JobPolicy::default()).unwrap_err();
        assert!(e.message.contains("at most 10000") && e.message.contains("at most 10"), "{e}");
    }

    #[test]
    fn the_target_must_be_a_known_version() {
        let files: BTreeMap<String, String> = [
            ("20250101000000_a.yaml".to_string(), String::new()),
            ("20250105000000_b.yaml".to_string(), String::new()),
        ]
        .into();
        let mut d = dbm("connection: {secretRef: {name: s}}\ntenants: {names: [a]}\nmigrations: {inline: {}}");
        assert_eq!(resolve_target(&d, Some(&files)).unwrap().as_deref(), Some("20250105000000"));
        d.spec.target = Some("20250101000000".into());
        assert_eq!(resolve_target(&d, Some(&files)).unwrap().as_deref(), Some("20250101000000"));
        d.spec.target = Some("20240101000000".into());
        let e = resolve_target(&d, Some(&files)).unwrap_err();
        assert_eq!(e.reason, "TargetNotFound");
        // A baseline must be a file's version, and not above the target.
        d.spec.target = None;
        d.spec.tenants.baseline = Some("20250102000000".into());
        assert_eq!(resolve_target(&d, Some(&files)).unwrap_err().reason, "BaselineNotFound");
        d.spec.tenants.baseline = Some("20250105000000".into());
        d.spec.target = Some("20250101000000".into());
        assert!(resolve_target(&d, Some(&files)).unwrap_err().message.contains("above spec.target"));
        d.spec.target = None;
        assert!(resolve_target(&d, Some(&files)).is_ok());
    }
}
