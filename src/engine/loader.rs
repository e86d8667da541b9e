//! Reads a migrations directory: file names, YAML, semantic checks, checksums.
//!
//! Everything is checked before any database is touched; every problem found is reported
//! (not just the first) with the file, the line when it is known, and what to change.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::bsonx;
use super::model::*;

/// A migration read from disk.
#[derive(Debug, Clone)]
pub struct Migration {
    /// `yyyyMMddHHmmss`, UTC.
    pub version: String,
    /// The slug after the version in the file name.
    pub name: String,
    pub path: PathBuf,
    pub file: MigrationFile,
    /// SHA-256 of the canonical form of what changes the database (`up`, `down`, `transaction`).
    /// Comments, formatting, description and checks can be edited without changing it.
    pub checksum: String,
}

impl Migration {
    /// `<version>_<name>`, the id recorded in the tracking collection.
    pub fn id(&self) -> String {
        format!("{}_{}", self.version, self.name)
    }

    /// Whether this migration runs under the given active profiles.
    pub fn active_for(&self, profiles: &[String]) -> bool {
        self.file.profiles.is_empty() || self.file.profiles.iter().any(|p| profiles.contains(p))
    }
}

/// One problem in one file.
#[derive(Debug, Clone, PartialEq)]
pub struct FileError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a migrations directory.
#[derive(Debug, Clone, thiserror::Error)]
pub struct LoadError {
    pub errors: Vec<FileError>,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        writeln!(f, "{n} problem{} in migration files:", if n == 1 { "" } else { "s" })?;
        for e in &self.errors {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

/// Split `20250105120000_add_preferences.yaml` into version and slug.
pub fn parse_file_name(name: &str) -> Result<(String, String), String> {
    let stem = name
        .strip_suffix(".yaml")
        .or_else(|| name.strip_suffix(".yml"))
        .ok_or_else(|| "not a .yaml file".to_string())?;
    let bad = || {
        "file name must be <version>_<slug>.yaml with a 14-digit UTC version (yyyyMMddHHmmss) \
         and a slug of lowercase letters, digits, '_' or '-', e.g. 20250105120000_add_preferences.yaml"
            .to_string()
    };
    let (version, slug) = stem.split_once('_').ok_or_else(bad)?;
    if version.len() != 14 || !version.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    if slug.is_empty() || !slug.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err(bad());
    }
    chrono::NaiveDateTime::parse_from_str(version, "%Y%m%d%H%M%S")
        .map_err(|_| format!("version {version} is not a valid UTC timestamp (yyyyMMddHHmmss)"))?;
    Ok((version.to_string(), slug.to_string()))
}

/// Load every migration file of `dir`, sorted by version.
pub fn load_dir(dir: &Path) -> Result<Vec<Migration>, LoadError> {
    let one = |message: String| LoadError {
        errors: vec![FileError { path: dir.to_path_buf(), line: None, column: None, message }],
    };
    let entries = std::fs::read_dir(dir).map_err(|e| one(format!("cannot read the migrations directory: {e}")))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| one(format!("cannot read the migrations directory: {e}")))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if (name.ends_with(".yaml") || name.ends_with(".yml")) && entry.path().is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    let mut sources = Vec::new();
    let mut errors = Vec::new();
    for path in files {
        match std::fs::read_to_string(&path) {
            Ok(text) => sources.push((path, text)),
            Err(e) => errors.push(FileError { path, line: None, column: None, message: format!("cannot read: {e}") }),
        }
    }
    match load_sources(sources) {
        Ok(m) if errors.is_empty() => Ok(m),
        Ok(_) => Err(LoadError { errors }),
        Err(mut e) => {
            errors.append(&mut e.errors);
            Err(LoadError { errors })
        }
    }
}

/// Parse and check migrations given as (path, text) pairs. Used by [`load_dir`] and by the
/// operator, which reads files from a ConfigMap.
pub fn load_sources(sources: Vec<(PathBuf, String)>) -> Result<Vec<Migration>, LoadError> {
    let mut errors = Vec::new();
    let mut by_version: BTreeMap<String, Migration> = BTreeMap::new();
    for (path, text) in sources {
        let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let err = |line, column, message| FileError { path: path.clone(), line, column, message };
        let (version, name) = match parse_file_name(&file_name) {
            Ok(v) => v,
            Err(m) => {
                errors.push(err(None, None, m));
                continue;
            }
        };
        if let Err((line, message)) = check_shape(&text) {
            errors.push(err(line, None, message));
            continue;
        }
        let file: MigrationFile = match parse_yaml(&text) {
            Ok(f) => f,
            Err(e) => {
                let loc = e.location();
                errors.push(err(
                    loc.as_ref().map(|l| l.line()),
                    loc.as_ref().map(|l| l.column()),
                    e.to_string().split(" at line ").next().unwrap_or_default().to_string(),
                ));
                continue;
            }
        };
        let problems = check_file(&file);
        if !problems.is_empty() {
            for (section, index, message) in problems {
                let line = index.and_then(|i| locate_item(&text, section, i));
                let place = match index {
                    Some(i) => format!("{section}[{i}]: "),
                    None => String::new(),
                };
                errors.push(err(line, None, format!("{place}{message}")));
            }
            continue;
        }
        if let Some(other) = by_version.get(&version) {
            errors.push(err(None, None, format!("version {version} is also used by {}", other.path.display())));
            continue;
        }
        let checksum = checksum(&file);
        by_version.insert(version.clone(), Migration { version, name, path: path.clone(), file, checksum });
    }
    if errors.is_empty() {
        Ok(by_version.into_values().collect())
    } else {
        Err(LoadError { errors })
    }
}

/// The largest migration file: a Kubernetes ConfigMap holds 1 MiB, and a file's documents end
/// up in MongoDB documents of at most 16 MiB.
pub const MAX_FILE_BYTES: usize = 16 << 20;
/// How deep a file may nest: the documents in it nest at most [`bsonx::MAX_DEPTH`] levels, and
/// the file's own structure (`up`, the list, the operation, its fields) adds a few.
pub const MAX_FILE_DEPTH: usize = crate::engine::bsonx::MAX_DEPTH + 8;

/// Size and nesting, checked before the YAML parser sees the text (a deeply nested file takes
/// it seconds to minutes). Counts block indentation levels, `- ` entries and `[` / `{` outside
/// quotes, comments and block scalars (a script's braces are not nesting). Returns the line
/// where the limit was passed.
fn check_shape(text: &str) -> Result<(), (Option<usize>, String)> {
    if text.len() > MAX_FILE_BYTES {
        return Err((None, format!("the file is {} bytes; at most {MAX_FILE_BYTES} are read", text.len())));
    }
    let too_deep = |line: usize| {
        Err((
            Some(line),
            format!(
                "nested deeper than {MAX_FILE_DEPTH} levels (documents nest at most {} levels in MongoDB)",
                crate::engine::bsonx::MAX_DEPTH
            ),
        ))
    };
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    // Inside a block scalar (`|`, `>`): lines indented more than this are its text.
    let mut scalar: Option<usize> = None;
    for (n, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        let rest = line.trim_start_matches(' ');
        if let Some(at) = scalar {
            if rest.is_empty() || indent > at {
                continue;
            }
            scalar = None;
        }
        if rest.is_empty() || rest.starts_with('#') {
            continue;
        }
        if flow == 0 {
            while indents.last().is_some_and(|&i| i >= indent) {
                indents.pop();
            }
            indents.push(indent);
        }
        // `- ` entries on this line nest too (`- - x`).
        let mut dashes = 0;
        let b = rest.as_bytes();
        let mut i = 0;
        let mut last = b' ';
        while i < b.len() {
            match b[i] {
                b'-' if flow == 0 && last == b' ' && b.get(i + 1).is_none_or(|c| *c == b' ') => dashes += 1,
                b'#' if last == b' ' => break,
                b'"' => {
                    i += 1;
                    while i < b.len() && b[i] != b'"' {
                        i += if b[i] == b'\\' { 2 } else { 1 };
                    }
                }
                b'\'' => {
                    i += 1;
                    while i < b.len() && b[i] != b'\'' {
                        i += 1;
                    }
                }
                b'[' | b'{' => flow += 1,
                b']' | b'}' => flow = flow.saturating_sub(1),
                b'|' | b'>'
                    if flow == 0
                        && last == b' '
                        && rest[i + 1..].trim_end().bytes().all(|c| c.is_ascii_digit() || c == b'+' || c == b'-') =>
                {
                    scalar = Some(indent);
                    break;
                }
                _ => {}
            }
            if indents.len() + dashes + flow > MAX_FILE_DEPTH {
                return too_deep(n + 1);
            }
            last = b.get(i).copied().unwrap_or(b' ');
            i += 1;
        }
    }
    Ok(())
}

/// Parse a migration file. Operations are written as single-key maps (`- addField: {...}`).
pub fn parse_yaml(text: &str) -> Result<MigrationFile, serde_yaml::Error> {
    serde_yaml::with::singleton_map_recursive::deserialize(serde_yaml::Deserializer::from_str(text))
}

/// Checksum of what a migration does to a database.
pub fn checksum(file: &MigrationFile) -> String {
    let canonical = serde_json::json!({ "up": file.up, "down": file.down, "transaction": file.transaction });
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(&canonical).expect("serializable"));
    hex::encode(h.finalize())
}

/// The line of item `index` of the top-level list `section` (best effort, for error messages).
fn locate_item(text: &str, section: &str, index: usize) -> Option<usize> {
    let mut lines = text.lines().enumerate();
    lines.find(|(_, l)| l.trim_end() == format!("{section}:") || l.starts_with(&format!("{section}: ")))?;
    let mut indent = None;
    let mut seen = 0;
    for (n, l) in lines {
        let trimmed = l.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let ind = l.len() - trimmed.len();
        if ind == 0 && !trimmed.starts_with('-') {
            return None;
        }
        if trimmed.starts_with('-') {
            let expected = *indent.get_or_insert(ind);
            if ind == expected {
                if seen == index {
                    return Some(n + 1);
                }
                seen += 1;
            }
        }
    }
    None
}

type Problem = (&'static str, Option<usize>, String);

/// Semantic checks serde cannot express. Returns (section, item index, message).
pub fn check_file(file: &MigrationFile) -> Vec<Problem> {
    let mut out: Vec<Problem> = Vec::new();
    if file.up.is_empty() {
        out.push(("up", None, "`up` must list at least one operation".into()));
    }
    for (i, op) in file.up.iter().enumerate() {
        for m in op.check() {
            out.push(("up", Some(i), format!("{}: {m}", op.kind())));
        }
        if file.transaction && !op.is_data_operation() {
            out.push((
                "up",
                Some(i),
                format!(
                    "{} cannot run inside a transaction (`transaction: true` allows only document operations)",
                    op.kind()
                ),
            ));
        }
    }
    for (i, op) in file.down.iter().flatten().enumerate() {
        for m in op.check() {
            out.push(("down", Some(i), format!("{}: {m}", op.kind())));
        }
    }
    for (i, c) in file.validate.iter().enumerate() {
        for m in check_check(c) {
            out.push(("validate", Some(i), format!("{}: {m}", c.kind())));
        }
    }
    for (i, c) in file.precheck.iter().enumerate() {
        for m in check_check(c) {
            out.push(("precheck", Some(i), format!("{}: {m}", c.kind())));
        }
    }
    for p in &file.profiles {
        if p.trim().is_empty() {
            out.push(("profiles", None, "profile names must not be empty".into()));
        }
    }
    for m in super::risk::acknowledgement_problems(file) {
        out.push(("acknowledge", None, m));
    }
    out
}

fn check_filter(filter: Option<&serde_json::Value>, what: &str) -> Option<String> {
    super::ops::filter_problem(filter, what)
}

fn check_check(c: &Check) -> Vec<String> {
    let mut p = vec![super::ops::collection_problem(c.collection())];
    match c {
        Check::Count(c) => {
            p.push(check_filter(c.filter.as_ref(), "filter"));
            if c.equals.is_none() && c.max.is_none() && c.min.is_none() {
                p.push(Some("give at least one of `equals`, `min` or `max`".into()));
            }
        }
        Check::IndexExists(c) => {
            if c.name.is_none() && c.keys.is_none() {
                p.push(Some("give the index `name` or its `keys`".into()));
            }
        }
        Check::JsonSchema(c) => {
            p.push(check_filter(Some(&c.schema), "schema"));
            p.push(check_filter(c.filter.as_ref(), "filter"));
        }
        Check::Unique(c) => {
            if c.keys.is_empty() {
                p.push(Some("give the `keys` that must not repeat".into()));
            }
            p.extend(c.keys.keys().map(|k| super::ops::field_problem(k, "keys")));
        }
        Check::Aggregate(c) => {
            for (i, s) in c.pipeline.iter().enumerate() {
                p.push(bsonx::to_doc(s).err().map(|e| format!("`pipeline[{i}]`: {e}")));
                if let Some(stage) = writing_stage(s) {
                    p.push(Some(format!("`pipeline[{i}]` uses {stage}, which writes: checks only read")));
                }
            }
        }
    }
    p.into_iter().flatten().collect()
}

/// A stage that writes (`$out`, `$merge`), anywhere in a pipeline (sub-pipelines included).
fn writing_stage(v: &serde_json::Value) -> Option<&'static str> {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                if let Some(s) = ["$out", "$merge"].into_iter().find(|s| k == s) {
                    return Some(s);
                }
                if let Some(s) = writing_stage(v) {
                    return Some(s);
                }
            }
            None
        }
        serde_json::Value::Array(a) => a.iter().find_map(writing_stage),
        _ => None,
    }
}

/// The text of a new migration file, for `dbshift new`. It does not pass `lint` until it
/// has at least one operation, so an unedited scaffold can never be applied by accident.
pub fn scaffold(slug: &str, author: &str) -> String {
    let description = slug.replace(['_', '-'], " ");
    let author = if author.is_empty() { "unknown" } else { author };
    format!(
        r#"# yaml-language-server: $schema=./migration.schema.json
# Operations: addField removeField renameField convertType createIndex dropIndex createCollection
# setValidator dropCollection renameCollection insertDocuments deleteDocuments updateMany transform
# runCommand. `dbshift lint` warns about risky steps (codes DS001...; see `acknowledge`).
# `down` is optional: dbshift inverts `up` and keeps what lossy operations destroy.
description: {description}
author: {author}
# profiles: [staging]        # run only when one of these profiles is active
up: []
#  - addField: {{ collection: users, field: preferences, value: {{ newsletter: false }} }}
validate: []
#  - count: {{ collection: users, filter: {{ preferences: {{ $exists: false }} }}, equals: 0 }}
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(name: &str, text: &str) -> Result<Vec<Migration>, LoadError> {
        load_sources(vec![(PathBuf::from(format!("migrations/{name}")), text.to_string())])
    }

    #[test]
    fn file_names_are_checked() {
        assert_eq!(
            parse_file_name("20250105120000_add_prefs.yaml").unwrap(),
            ("20250105120000".into(), "add_prefs".into())
        );
        assert!(parse_file_name("2025_add.yaml").is_err());
        assert!(parse_file_name("20251305120000_add.yaml").unwrap_err().contains("not a valid UTC timestamp"));
        assert!(parse_file_name("20250105120000_Add.yaml").is_err());
    }

    #[test]
    fn yaml_errors_carry_the_line() {
        let e =
            load("20250105120000_x.yaml", "description: x\nup:\n  - addFeild: { collection: c, field: f, value: 1 }\n")
                .unwrap_err();
        let fe = &e.errors[0];
        assert_eq!(fe.line, Some(3), "{e}");
        assert!(fe.message.contains("unknown variant `addFeild`"), "{e}");
        assert!(e.to_string().contains("migrations/20250105120000_x.yaml:3"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_item_and_line() {
        let text = "up:\n  - addField: { collection: c, field: f, value: 1 }\n  - renameField: { collection: c, from: a, to: a }\n";
        let e = load("20250105120000_x.yaml", text).unwrap_err();
        assert_eq!(e.errors.len(), 1, "{e}");
        assert_eq!(e.errors[0].line, Some(3));
        assert!(e.errors[0].message.contains("up[1]: renameField: `from` and `to` are the same"), "{e}");
    }

    #[test]
    fn reserved_collections_and_id_are_refused() {
        let text = "up:\n  - removeField: { collection: _dbshift_migrations, field: _id }\n";
        let e = load("20250105120000_x.yaml", text).unwrap_err();
        let all = e.to_string();
        assert!(all.contains("reserved for dbshift"), "{all}");
        assert!(all.contains("cannot be `_id`"), "{all}");
    }

    #[test]
    fn checksum_ignores_description_and_comments() {
        let a = load("20250105120000_x.yaml", "description: one\nup:\n  - dropIndex: { collection: c, name: i }\n")
            .unwrap();
        let b = load(
            "20250105120000_x.yaml",
            "# comment\ndescription: two\nup: [ { dropIndex: { collection: c, name: i } } ]\n",
        )
        .unwrap();
        let c = load("20250105120000_x.yaml", "up:\n  - dropIndex: { collection: c, name: j }\n").unwrap();
        assert_eq!(a[0].checksum, b[0].checksum);
        assert_ne!(a[0].checksum, c[0].checksum);
    }

    #[test]
    fn duplicate_versions_are_refused() {
        let e = load_sources(vec![
            (PathBuf::from("m/20250105120000_a.yaml"), "up: [ { dropIndex: { collection: c, name: i } } ]".into()),
            (PathBuf::from("m/20250105120000_b.yaml"), "up: [ { dropIndex: { collection: c, name: i } } ]".into()),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("also used by"), "{e}");
    }

    #[test]
    fn scaffold_needs_an_operation_before_it_loads() {
        let text = scaffold("add_prefs", "ann");
        assert!(load("20250105120000_add_prefs.yaml", &text)
            .unwrap_err()
            .to_string()
            .contains("at least one operation"));
        let text = text.replace("up: []", "up:\n  - addField: { collection: users, field: prefs, value: {} }");
        let m = load("20250105120000_add_prefs.yaml", &text).unwrap();
        assert_eq!((m[0].file.description.as_str(), m[0].file.author.as_str()), ("add prefs", "ann"));
    }
}
