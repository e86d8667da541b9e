//! Keeping secrets out of output: the MongoDB URI and its password never appear in logs,
//! errors, reports or status.

/// Replaces every secret it was given with `***`.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    /// Secrets of a MongoDB URI: the URI itself, its user-info and its password (raw and
    /// percent-decoded).
    pub fn for_uri(uri: &str) -> Self {
        let mut secrets = vec![uri.to_string()];
        if let Some((_, rest)) = uri.split_once("://") {
            if let Some((userinfo, _)) = rest.rsplit_once('@') {
                secrets.push(userinfo.to_string());
                if let Some((_, pass)) = userinfo.split_once(':') {
                    secrets.push(pass.to_string());
                    secrets.push(percent_decode(pass));
                }
            }
        }
        secrets.retain(|s| s.len() >= 3);
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
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

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_uri_userinfo_and_password() {
        let r = Redactor::for_uri("mongodb://app:p%40ssw0rd@db1:27017/shop");
        assert_eq!(r.apply("failed for mongodb://app:p%40ssw0rd@db1:27017/shop"), "failed for ***");
        assert_eq!(r.apply("auth p@ssw0rd and p%40ssw0rd"), "auth *** and ***");
        assert_eq!(r.apply("user app:p%40ssw0rd"), "user ***");
        assert_eq!(Redactor::for_uri("mongodb://localhost").apply("host localhost"), "host localhost");
    }
}
