//! Keeping secrets out of output: the MongoDB URI, its password and the secrets its options
//! carry never appear in logs, errors, reports or status.
//!
//! A secret is replaced wherever it appears as written, percent-decoded, percent-encoded, or
//! escaped inside a JSON string, whatever its length (a short password would otherwise slip
//! through; replacing a few innocent characters with it is the price).

use percent_encoding::{percent_decode_str, utf8_percent_encode, NON_ALPHANUMERIC};

use std::sync::Mutex;

/// URI options whose values are secrets.
const SECRET_OPTIONS: &[&str] = &["tlscertificatekeyfilepassword", "authmechanismproperties", "password"];

/// Replaces every secret it was given with `***`.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    /// Secrets of a MongoDB URI (`mongodb://` or `mongodb+srv://`, valid or not): the URI itself,
    /// its user-info, its password, and the values of secret options.
    pub fn for_uri(uri: &str) -> Self {
        let mut found = vec![uri.to_string()];
        if let Some((_, rest)) = uri.split_once("://") {
            // The user-info ends at the last `@` before the options; a password with an
            // unencoded `?` or `@` is covered by the second reading.
            let before_options = rest.split('?').next().unwrap_or(rest);
            for part in [before_options, rest] {
                if let Some((userinfo, _)) = part.rsplit_once('@') {
                    found.push(userinfo.to_string());
                    if let Some((_, pass)) = userinfo.split_once(':') {
                        found.push(pass.to_string());
                    }
                }
            }
            if let Some((_, query)) = rest.split_once('?') {
                for pair in query.split('&') {
                    if let Some((k, v)) = pair.split_once('=') {
                        if SECRET_OPTIONS.contains(&k.to_ascii_lowercase().as_str()) {
                            found.push(v.to_string());
                            // `authMechanismProperties=AWS_SESSION_TOKEN:abc,SERVICE_NAME:x`
                            for prop in v.split(',') {
                                if let Some((_, pv)) = prop.split_once(':').or_else(|| prop.split_once("%3A")) {
                                    found.push(pv.to_string());
                                }
                            }
                        }
                    }
                }
            }
        }
        let mut secrets = Vec::new();
        for s in found {
            let decoded = percent_decode_str(&s).decode_utf8_lossy().into_owned();
            let encoded = utf8_percent_encode(&decoded, NON_ALPHANUMERIC).to_string();
            // A password written with a bare `%` ("p%3x", "%73") may be meant as written: its
            // own encoding is a secret too (found by the fuzzer).
            let encoded_as_written = utf8_percent_encode(&s, NON_ALPHANUMERIC).to_string();
            for v in [s, decoded, encoded, encoded_as_written] {
                let json = serde_json::to_string(&v).unwrap_or_default();
                if let Some(inner) = json.strip_prefix('"').and_then(|j| j.strip_suffix('"')) {
                    secrets.push(inner.to_string());
                }
                secrets.push(v);
            }
        }
        secrets.retain(|s| !s.is_empty());
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        remember(&secrets);
        Redactor { secrets }
    }

    pub fn apply(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "***");
            }
        }
        out
    }
}

/// Where MongoDB's errors carry a tenant's values: the key of a duplicate-key error
/// (`E11000 ... dup key: { email: "..." }`), the failing document of a schema validation
/// (`details`, `errInfo`), the `keyValue` of a write error. Everything from the first of them on
/// is cut (the values may hold anything, brackets and quotes included, so nothing after them
/// can be trusted to be theirs or not).
const TENANT_VALUE_MARKERS: &[&str] =
    &["dup key:", SCRIPT_MESSAGE, "details: Some(", "errInfo", "keyValue", "keyPattern"];

/// Put before what a user's script threw (its message may quote the document it failed on).
pub const SCRIPT_MESSAGE: &str = "the script's message:";

/// `text` with the tenant values a MongoDB error carries removed (see
/// [`TENANT_VALUE_MARKERS`]): status, Events and results hold `_id`s and counts only.
pub fn tenant_values(text: &str) -> String {
    match TENANT_VALUE_MARKERS.iter().filter_map(|m| text.find(m).map(|at| (at, *m))).min() {
        None => text.to_string(),
        Some((at, marker)) => {
            let keep = if marker == "dup key:" || marker == SCRIPT_MESSAGE { at + marker.len() } else { at };
            format!("{} (values not shown)", text[..keep].trim_end())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_values_in_errors_are_cut() {
        let dup = r#"E11000 duplicate key error collection: shop.customers index: email_1 dup key: { email: "ann@example.com" }"#;
        assert_eq!(
            tenant_values(dup),
            "E11000 duplicate key error collection: shop.customers index: email_1 dup key: (values not shown)"
        );
        let debug = r#"write: WriteError { code: 121, message: "Document failed validation", details: Some(Document({"failingDocumentId": "x", "ssn": "123"})) }"#;
        let out = tenant_values(debug);
        assert!(out.contains("Document failed validation") && !out.contains("123"), "{out}");
        let tricky = r#"dup key: { a: "}" secret" } and then keyValue: { b: "more" }"#;
        let out = tenant_values(tricky);
        assert!(!out.contains("secret") && !out.contains("more"), "{out}");
        assert_eq!(tenant_values("plain error"), "plain error");
        let thrown =
            format!("the script failed on the document with _id 7: Error; {SCRIPT_MESSAGE} bad email ann@example.com");
        assert_eq!(
            tenant_values(&thrown),
            format!("the script failed on the document with _id 7: Error; {SCRIPT_MESSAGE} (values not shown)")
        );
    }

    #[test]
    fn removes_uri_userinfo_and_password() {
        let r = Redactor::for_uri("mongodb://app:p%40ssw0rd@db1:27017/shop");
        assert_eq!(r.apply("failed for mongodb://app:p%40ssw0rd@db1:27017/shop"), "failed for ***");
        assert_eq!(r.apply("auth p@ssw0rd and p%40ssw0rd"), "auth *** and ***");
        assert_eq!(r.apply("user app:p%40ssw0rd"), "user ***");
        assert_eq!(Redactor::for_uri("mongodb://localhost").apply("host localhost"), "host localhost");
    }

    #[test]
    fn any_password_in_any_form_any_uri_shape() {
        for (uri, pass) in [
            ("mongodb://app:Sup3r%€pw@db1/shop", "Sup3r%€pw"),
            ("mongodb://app:Sup3r%25%E2%82%ACpw@db1/shop", "Sup3r%€pw"),
            ("mongodb+srv://app:a%2Fb%3Ac%22d%5C@cluster0.example.net/?retryWrites=true", "a/b:c\"d\\"),
            ("mongodb://app:x@db1", "x"),
            ("mongodb://app:pa@ss?word@db1/?authSource=admin", "pa@ss?word"),
            ("mongodb://app:%F0%9F%94%91key@db1", "🔑key"),
        ] {
            let r = Redactor::for_uri(uri);
            let encoded = utf8_percent_encode(pass, NON_ALPHANUMERIC).to_string();
            let json = serde_json::to_string(pass).unwrap();
            for text in [format!("error: {pass}."), format!("error: {encoded}."), format!("{{\"e\":{json}}}")] {
                let out = r.apply(&text);
                assert!(!out.contains(pass) && !out.contains(&encoded), "{uri}: {out}");
                assert!(out.contains("***"), "{uri}: {out}");
            }
        }
    }

    #[test]
    fn a_password_with_a_bare_percent_is_removed_as_written_and_encoded() {
        for pass in ["%73", "2wyV%E8", "@P%dC", "%cB{w"] {
            let r = Redactor::for_uri(&format!("mongodb://app:{pass}@db1/shop"));
            let encoded = utf8_percent_encode(pass, NON_ALPHANUMERIC).to_string();
            for text in [format!("x{pass}y"), format!("x{encoded}y")] {
                let out = r.apply(&text);
                assert!(!out.contains(pass) && !out.contains(&encoded), "{pass}: {out}");
            }
        }
    }

    #[test]
    fn secret_options_are_removed() {
        let uri = "mongodb://db1/?tls=true&tlsCertificateKeyFilePassword=k3yp4ss&authMechanism=MONGODB-AWS\
                   &authMechanismProperties=AWS_SESSION_TOKEN:t0k3nv4lue";
        let r = Redactor::for_uri(uri);
        let out = r.apply("options tlsCertificateKeyFilePassword=k3yp4ss token t0k3nv4lue");
        assert!(!out.contains("k3yp4ss") && !out.contains("t0k3nv4lue"), "{out}");
    }
}

/// Every secret a [`Redactor`] was made for in this process (the newest [`REMEMBERED`]), for
/// the panic hook.
static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());
const REMEMBERED: usize = 4096;

fn remember(secrets: &[String]) {
    let Ok(mut seen) = SEEN.lock() else { return };
    for s in secrets {
        if !seen.contains(s) {
            seen.push(s.clone());
        }
    }
    let extra = seen.len().saturating_sub(REMEMBERED);
    seen.drain(..extra);
    seen.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// `text` with every secret seen so far replaced.
fn redact_seen(text: &str) -> String {
    let seen = match SEEN.lock() {
        Ok(s) => s.clone(),
        Err(p) => p.into_inner().clone(),
    };
    Redactor { secrets: seen }.apply(text)
}

/// A panic hook that redacts: a panic's message can carry a value that holds a URI. This is a
/// backstop (errors are redacted where they are made); it prints the message and where, with
/// every secret any redactor of this process was made for replaced, and no backtrace.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("dbshift panicked, a bug (please report it): {}{at}", redact_seen(&message));
    }));
}

#[cfg(test)]
mod seen_tests {
    #[test]
    fn the_panic_hook_redacts_every_secret_seen() {
        let _ = super::Redactor::for_uri("mongodb://app:Hook%E2%82%ACpw1@db.example:27017/?authSource=admin");
        let text =
            super::redact_seen("called `unwrap()` on mongodb://app:Hook%E2%82%ACpw1@db.example:27017 (Hook€pw1)");
        assert!(!text.contains("Hook"), "{text}");
    }
}
