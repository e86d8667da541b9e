//! Which tenant databases a command works on.

use mongodb::Client;

/// Databases that are never tenants: MongoDB's own, and dbshift's default snapshot database.
const SYSTEM: &[&str] = &["admin", "local", "config", crate::engine::tracking::SNAPSHOT_DATABASE];

#[derive(Debug, Clone, Default)]
pub struct TenantSelector {
    /// Explicit database names.
    pub names: Vec<String>,
    /// A regular expression matched against the server's database names.
    pub pattern: Option<String>,
    /// Names to leave out.
    pub exclude: Vec<String>,
    /// The database named in the URI, used when nothing else is given.
    pub default: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error("no tenant database given: pass --tenant NAME or --tenants REGEX, or name a database in the URI")]
    NoneGiven,
    #[error("--tenants {pattern:?} is not a valid regular expression: {message}")]
    BadPattern { pattern: String, message: String },
    #[error("{0:?} is not a valid database name (it must be 1-63 characters without / \\ . space \" $ * < > : | ?)")]
    BadName(String),
    #[error("listing databases: {}", crate::mongo::describe(.0))]
    List(#[source] mongodb::error::Error),
    #[error("--tenants {0:?} matched no database")]
    NoMatch(String),
    #[error("{0:?} is never a tenant: admin, config and local are MongoDB's own databases, and {snap} holds snapshots", snap = crate::engine::tracking::SNAPSHOT_DATABASE)]
    NotATenant(String),
}

pub fn check_db_name(name: &str) -> Result<(), TenantError> {
    let bad = name.is_empty() || name.len() > 63 || name.chars().any(|c| "/\\. \"$*<>:|?\0".contains(c));
    if bad {
        Err(TenantError::BadName(name.to_string()))
    } else {
        Ok(())
    }
}

/// A name that can be a tenant: a valid database name, and not one of [`SYSTEM`].
pub fn check_tenant(name: &str) -> Result<(), TenantError> {
    check_db_name(name)?;
    if SYSTEM.contains(&name) {
        return Err(TenantError::NotATenant(name.to_string()));
    }
    Ok(())
}

impl TenantSelector {
    /// Check what can be checked without a server (regex syntax, names).
    pub fn validate(&self) -> Result<Option<regex::Regex>, TenantError> {
        for n in self.names.iter().chain(self.default.iter()) {
            check_tenant(n)?;
        }
        self.pattern
            .as_ref()
            .map(|p| {
                regex::Regex::new(p).map_err(|e| TenantError::BadPattern { pattern: p.clone(), message: e.to_string() })
            })
            .transpose()
    }

    /// The tenant database names, sorted, without exclusions.
    pub async fn resolve(&self, client: &Client) -> Result<Vec<String>, TenantError> {
        let re = self.validate()?;
        let mut out: Vec<String> = self.names.clone();
        if let Some(re) = &re {
            let names = client.list_database_names().await.map_err(TenantError::List)?;
            let matched: Vec<String> =
                names.into_iter().filter(|n| !SYSTEM.contains(&n.as_str()) && re.is_match(n)).collect();
            if matched.is_empty() && self.names.is_empty() {
                return Err(TenantError::NoMatch(self.pattern.clone().unwrap_or_default()));
            }
            out.extend(matched);
        }
        if out.is_empty() {
            match &self.default {
                Some(d) => out.push(d.clone()),
                None => return Err(TenantError::NoneGiven),
            }
        }
        out.retain(|n| !self.exclude.contains(n));
        out.sort();
        out.dedup();
        Ok(out)
    }
}
