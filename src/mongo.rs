//! MongoDB: connecting, and reading the server's replies. Shared by the engine, the snapshots,
//! the runner and the controller; none of them talks to the driver's error internals directly.

use std::time::Duration;

use bson::{doc, Document};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::ClientOptions;
use mongodb::{Client, Database};

use crate::redact::Redactor;

/// Server error codes dbshift reacts to (MongoDB's `error_codes.yml`).
pub mod code {
    /// InternalError (SecantusDB: also a conflict its storage engine found at commit).
    pub const INTERNAL_ERROR: i32 = 1;
    /// The collection (namespace) does not exist.
    pub const NAMESPACE_NOT_FOUND: i32 = 26;
    /// `dropIndexes` of an index that does not exist.
    pub const INDEX_NOT_FOUND: i32 = 27;
    /// `create` of a collection that exists.
    pub const NAMESPACE_EXISTS: i32 = 48;
    /// A write conflicted with a concurrent transaction (retryable).
    pub const WRITE_CONFLICT: i32 = 112;
    /// `$convert` without `onError` met a value it cannot convert.
    pub const CONVERSION_FAILURE: i32 = 241;
    /// A unique index refused a value.
    pub const DUPLICATE_KEY: i32 = 11000;
}

/// The server's error code, for command and write errors.
pub fn error_code(e: &mongodb::error::Error) -> Option<i32> {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        // A bulk write: the first write's error (by its index).
        ErrorKind::BulkWrite(b) => b
            .write_errors
            .iter()
            .min_by_key(|(i, _)| **i)
            .map(|(_, w)| w.code)
            .or_else(|| b.write_concern_errors.first().map(|w| w.code)),
        _ => None,
    }
}

pub fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    error_code(e) == Some(code::DUPLICATE_KEY) || e.to_string().contains("E11000")
}

/// A write concern error, from its parts.
fn concern(w: &mongodb::error::WriteConcernError) -> String {
    format!("write concern error {} ({}): {}", w.code, w.code_name, w.message)
}

/// A MongoDB error as one readable sentence: the kind and the server's message, without the
/// driver's debug fields (labels, the raw server response as hex) that would drown it.
pub fn describe(e: &mongodb::error::Error) -> String {
    // Write errors are printed from their parts: the driver's own text is their Debug form, with
    // the failing document (`details`) in it. Tenant values never leave (redact::tenant_values).
    let text = match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => {
            format!("write error {} ({}): {}", w.code, w.code_name.as_deref().unwrap_or("?"), w.message)
        }
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => concern(w),
        ErrorKind::InsertMany(im) => {
            let errors = im.write_errors.as_deref().unwrap_or_default();
            match errors.first() {
                Some(w) => format!(
                    "insert failed at document {} of the batch ({} write error(s)): {} ({}): {}",
                    w.index,
                    errors.len(),
                    w.code,
                    w.code_name.as_deref().unwrap_or("?"),
                    w.message
                ),
                None => match &im.write_concern_error {
                    Some(w) => concern(w),
                    None => e.kind.to_string(),
                },
            }
        }
        ErrorKind::BulkWrite(b) => match b.write_errors.iter().min_by_key(|(i, _)| **i) {
            Some((i, w)) => format!(
                "write failed at operation {i} of the batch ({} write error(s)): {} ({}): {}",
                b.write_errors.len(),
                w.code,
                w.code_name.as_deref().unwrap_or("?"),
                w.message
            ),
            None => match b.write_concern_errors.first() {
                Some(w) => concern(w),
                None => e.kind.to_string(),
            },
        },
        other => other.to_string(),
    };
    let text = crate::redact::tenant_values(&text);
    // Servers repeat themselves in long chains; keep errors to a readable length.
    if text.len() > 500 {
        let mut end = 500;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &text[..end])
    } else {
        text
    }
}

/// Whether the server runs multi-document transactions (replica set or sharded cluster).
pub async fn supports_transactions(db: &Database) -> bool {
    match db.run_command(doc! {"hello": 1}).await {
        Ok(h) => h.contains_key("setName") || h.get_str("msg").ok() == Some("isdbgrid"),
        Err(_) => false,
    }
}

pub async fn collection_exists(db: &Database, name: &str) -> mongodb::error::Result<bool> {
    Ok(!db.list_collection_names().filter(doc! {"name": name}).await?.is_empty())
}

/// A collection's `listCollections` entry (name, type, options, ...), exactly as the server
/// returns it; `None` when there is none of that name.
pub async fn collection_info(db: &Database, name: &str) -> mongodb::error::Result<Option<Document>> {
    let reply = db.run_command(doc! {"listCollections": 1, "filter": {"name": name}}).await?;
    let batch = reply.get_document("cursor").and_then(|c| c.get_array("firstBatch")).cloned().unwrap_or_default();
    Ok(batch.into_iter().find_map(|b| b.as_document().cloned()))
}

/// The index specifications of a collection, exactly as `listIndexes` returns them; none when
/// the collection does not exist. (A collection has at most 64 indexes: one batch holds them.)
pub async fn list_indexes(db: &Database, coll: &str) -> mongodb::error::Result<Vec<Document>> {
    let reply = match db.run_command(doc! {"listIndexes": coll}).await {
        Ok(r) => r,
        Err(e) if error_code(&e) == Some(code::NAMESPACE_NOT_FOUND) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let batch = reply.get_document("cursor").and_then(|c| c.get_array("firstBatch")).cloned().unwrap_or_default();
    Ok(batch.into_iter().filter_map(|b| b.as_document().cloned()).collect())
}

/// Rename a collection within its database (fails if `to` exists).
pub async fn rename_collection(db: &Database, from: &str, to: &str) -> mongodb::error::Result<()> {
    let name = db.name();
    db.client()
        .database("admin")
        .run_command(
            doc! {"renameCollection": format!("{name}.{from}"), "to": format!("{name}.{to}"), "dropTarget": false},
        )
        .await
        .map(|_| ())
}

/// A connected client and what the URI names.
pub struct Connection {
    pub client: Client,
    /// The database named in the URI, if any.
    pub default_db: Option<String>,
    /// Removes the URI's secrets from any text.
    pub redactor: Redactor,
    /// The hosts, for messages and snapshot manifests (no credentials).
    pub source: String,
}

/// Why a connection could not be made. Messages never hold the URI's secrets.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConnectError {
    /// The URI itself is wrong (fix the input).
    #[error("{0}")]
    Invalid(String),
    /// The server did not answer, or refused us (retry, or fix the server).
    #[error("{0}")]
    Unreachable(String),
}

/// Every `%` in a URI starts a percent-encoded byte (`%` followed by two hex digits). Checked
/// before the driver parses it: the driver (3.9) panics on a `%` followed by a non-ASCII
/// character in a password, and the panic message holds part of the password.
fn check_escapes(uri: &str) -> Result<(), ConnectError> {
    let b = uri.as_bytes();
    let bad = b.iter().enumerate().any(|(i, &c)| {
        c == b'%'
            && !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit) && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    });
    if bad {
        return Err(ConnectError::Invalid(
            "the MongoDB URI is not valid: it has a `%` that is not followed by two hex digits; percent-encode the \
             user name and password (write `%` as `%25`, `@` as `%40`, `:` as `%3A`, `/` as `%2F`)"
                .into(),
        ));
    }
    Ok(())
}

/// Connect and check the server answers, with a few attempts for transient outages.
/// Clients of this process's command (see [`connect_for_command`]), shut down before it exits.
static COMMAND_CLIENTS: std::sync::Mutex<Vec<Client>> = std::sync::Mutex::new(Vec::new());

/// [`connect`], for a command that ends with the process (the CLI, `dbshift run`): the client
/// is shut down by [`shutdown_command_clients`] before the runtime goes. Without that, a
/// driver task still ending a session or cursor as the runtime stops could find its pool's
/// worker gone, and the driver panics (seen once in CI, in `dbshift snapshots`).
pub async fn connect_for_command(uri: &str, timeout: Duration) -> Result<Connection, ConnectError> {
    let conn = connect(uri, timeout).await?;
    COMMAND_CLIENTS.lock().expect("lock").push(conn.client.clone());
    Ok(conn)
}

/// Shut down the clients [`connect_for_command`] made, waiting at most 5 s for each.
pub async fn shutdown_command_clients() {
    let clients: Vec<Client> = std::mem::take(&mut *COMMAND_CLIENTS.lock().expect("lock"));
    for c in clients {
        let _ = tokio::time::timeout(Duration::from_secs(5), c.shutdown()).await;
    }
}

pub async fn connect(uri: &str, timeout: Duration) -> Result<Connection, ConnectError> {
    let redactor = Redactor::for_uri(uri);
    check_escapes(uri)?;
    let mut options = ClientOptions::parse(uri).await.map_err(|e| {
        ConnectError::Invalid(format!("the MongoDB URI is not valid: {}", redactor.apply(&describe(&e))))
    })?;
    options.app_name = Some("dbshift".into());
    options.server_selection_timeout = Some(timeout);
    options.connect_timeout = Some(timeout);
    let default_db = options.default_database.clone();
    let hosts = options.hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>().join(",");
    let client = Client::with_options(options).map_err(|e| ConnectError::Invalid(redactor.apply(&describe(&e))))?;
    let attempts = 3;
    let mut last = String::new();
    for attempt in 1..=attempts {
        match client.database("admin").run_command(doc! {"ping": 1}).await {
            Ok(_) => return Ok(Connection { client, default_db, redactor, source: hosts }),
            Err(e) => {
                last = redactor.apply(&describe(&e));
                // Only network trouble is worth another attempt; bad credentials are not.
                let transient = matches!(
                    *e.kind,
                    ErrorKind::ServerSelection { .. } | ErrorKind::Io(_) | ErrorKind::ConnectionPoolCleared { .. }
                );
                if !transient {
                    return Err(ConnectError::Unreachable(format!(
                        "MongoDB at {hosts} refused the connection: {last}"
                    )));
                }
                tracing::warn!(attempt, error = %last, "MongoDB did not answer");
                if attempt < attempts {
                    tokio::time::sleep(Duration::from_secs(attempt)).await;
                }
            }
        }
    }
    Err(ConnectError::Unreachable(format!(
        "cannot reach MongoDB at {hosts} after {attempts} attempts ({}s timeout each): {last}",
        timeout.as_secs()
    )))
}
