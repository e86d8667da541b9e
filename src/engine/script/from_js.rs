//! Documents back from JavaScript: the text `JSON.stringify` wrote, parsed straight into BSON.
//!
//! Every number is a double in JavaScript, so a number whose value the script left alone gets
//! its original BSON type back (an `int` stays an `int`, `1.0` stays a double, a `long` stays a
//! `long`); new integral numbers become `int` (or `long` when they do not fit), others `double`.
//! `{$oid}` and `{$date}` (what `ObjectId` and `Date` serialize to) are read here too; any other
//! object whose first key starts with `$` is Extended JSON and goes through the `bson` crate.
//! This replaces `serde_json::Value` -> `Bson` -> `Document`, which was half of a transform's
//! client time.

use std::borrow::Cow;

use bson::oid::ObjectId;
use bson::{Bson, DateTime, RawArray, RawArrayBuf, RawBson, RawBsonRef, RawDocument, RawDocumentBuf};

use crate::engine::bsonx;

/// Parse the JSON array of documents (or nulls) the script returned, one per input document.
pub fn read_documents(json: &str, olds: &[RawDocumentBuf]) -> Result<Vec<Option<RawDocumentBuf>>, String> {
    let mut p = Parser { s: json, b: json.as_bytes(), i: 0, depth: 0 };
    let mut out = Vec::with_capacity(olds.len());
    let mut more = p.open(b'[', b']')?;
    while more {
        let old = olds.get(out.len()).map(|d| d.as_ref());
        match p.peek() {
            Some(b'n') => {
                p.literal("null")?;
                out.push(None);
            }
            Some(b'{') if p.b.get(p.i + 1..p.i + 3) != Some(b"\"$") => out.push(Some(p.document(old)?)),
            _ => {
                return Err(
                    "the script returned a value that is not a document (return the document, or null to leave it)"
                        .into(),
                )
            }
        }
        more = p.more(b']')?;
    }
    if p.i != p.b.len() {
        return Err(p.unexpected("the end"));
    }
    Ok(out)
}

struct Parser<'a> {
    s: &'a str,
    b: &'a [u8],
    i: usize,
    /// Documents and arrays open around the current position.
    depth: usize,
}

/// A parsed value: borrowed from the input where possible.
enum Value<'a> {
    Ref(RawBsonRef<'a>),
    Owned(RawBson),
}

/// The fields of the original document, looked up in order (the usual case) or by name.
struct OldFields<'o> {
    items: Vec<(&'o str, RawBsonRef<'o>)>,
    next: usize,
}

impl<'o> OldFields<'o> {
    fn new(d: Option<&'o RawDocument>) -> Self {
        let items = d.map(|d| d.iter().filter_map(Result::ok).collect()).unwrap_or_default();
        OldFields { items, next: 0 }
    }

    fn take(&mut self, key: &str) -> Option<RawBsonRef<'o>> {
        let n = self.items.len();
        (0..n).map(|k| (self.next + k) % n).find(|&j| self.items[j].0 == key).map(|j| {
            self.next = j + 1;
            self.items[j].1
        })
    }
}

/// A key JavaScript orders before the others: an array index ("0", or no leading zero, below
/// 2^32 - 1).
pub fn integer_like(k: &str) -> bool {
    (k == "0" || (!k.starts_with('0') && !k.is_empty() && k.len() <= 10 && k.bytes().all(|b| b.is_ascii_digit())))
        && k.parse::<u64>().is_ok_and(|n| n < u32::MAX as u64)
}

fn as_f64(b: &RawBsonRef<'_>) -> Option<f64> {
    match b {
        RawBsonRef::Int32(v) => Some(*v as f64),
        RawBsonRef::Int64(v) => Some(*v as f64),
        RawBsonRef::Double(v) => Some(*v),
        _ => None,
    }
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek();
        self.i += 1;
        c
    }

    fn unexpected(&self, wanted: &str) -> String {
        let at: String = self.s.get(self.i.min(self.s.len())..).unwrap_or("").chars().take(20).collect();
        format!("internal: the transform returned malformed JSON at byte {} (expected {wanted}, found {at:?})", self.i)
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.next() == Some(c) {
            Ok(())
        } else {
            self.i -= 1;
            Err(self.unexpected(&format!("`{}`", c as char)))
        }
    }

    fn literal(&mut self, word: &str) -> Result<(), String> {
        if self.b[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(())
        } else {
            Err(self.unexpected(word))
        }
    }

    /// One level deeper (a document or an array), up to [`bsonx::MAX_DEPTH`].
    fn enter(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > bsonx::MAX_DEPTH {
            return Err(format!(
                "the script returned a document nested deeper than {} levels, MongoDB's limit",
                bsonx::MAX_DEPTH
            ));
        }
        Ok(())
    }

    /// Move past `open`; for an empty container past `close` too, and say there is nothing in it.
    fn open(&mut self, open: u8, close: u8) -> Result<bool, String> {
        self.expect(open)?;
        let empty = self.peek() == Some(close);
        if empty {
            self.i += 1;
        }
        Ok(!empty)
    }

    /// After an item: `true` at `,` (another follows), `false` at `close`.
    fn more(&mut self, close: u8) -> Result<bool, String> {
        match self.next() {
            Some(b',') => Ok(true),
            Some(c) if c == close => Ok(false),
            _ => {
                self.i -= 1;
                Err(self.unexpected(&format!("`,` or `{}`", close as char)))
            }
        }
    }

    /// A document at `{` (a plain one: not Extended JSON).
    fn document(&mut self, old: Option<&RawDocument>) -> Result<RawDocumentBuf, String> {
        self.enter()?;
        let mut fields = Vec::new();
        let mut more = self.open(b'{', b'}')?;
        let mut olds = OldFields::new(old);
        while more {
            let key = self.string()?;
            if key.contains('\0') {
                return Err(format!("the script returned a field name with a NUL character: {key:?}"));
            }
            self.expect(b':')?;
            let old = olds.take(&key);
            fields.push((key, self.value(old)?));
            more = self.more(b'}')?;
        }
        // JavaScript keeps an object's keys in insertion order, except integer-like ones
        // ("0", "2024"), which it always puts first, ascending: `(d) => d` would reorder
        // `{_id, "7": x}`. Where such a key is present, each field that was in the original
        // document goes back where it was, and new fields follow in the script's order.
        if fields.iter().any(|(k, _)| integer_like(k)) {
            let at = |k: &str| olds.items.iter().position(|(o, _)| *o == k).unwrap_or(usize::MAX);
            fields.sort_by_key(|(k, _)| at(k));
        }
        let mut doc = RawDocumentBuf::new();
        for (key, v) in fields {
            match v {
                Value::Ref(v) => doc.append_ref(key.as_ref(), v),
                Value::Owned(v) => doc.append(key.as_ref(), v),
            }
        }
        self.depth -= 1;
        Ok(doc)
    }

    fn array(&mut self, old: Option<&RawArray>) -> Result<RawArrayBuf, String> {
        self.enter()?;
        let mut arr = RawArrayBuf::new();
        let mut more = self.open(b'[', b']')?;
        let mut olds = old.map(|a| a.into_iter());
        while more {
            let old = olds.as_mut().and_then(|it| it.next()).and_then(Result::ok);
            match self.value(old)? {
                Value::Ref(v) => arr.push(v.to_raw_bson()),
                Value::Owned(v) => arr.push(v),
            }
            more = self.more(b']')?;
        }
        self.depth -= 1;
        Ok(arr)
    }

    fn value<'o>(&mut self, old: Option<RawBsonRef<'o>>) -> Result<Value<'a>, String> {
        Ok(match self.peek() {
            Some(b'{') => {
                if self.b.get(self.i + 1..self.i + 3) == Some(b"\"$") {
                    return self.extended(old);
                }
                Value::Owned(RawBson::Document(self.document(old.and_then(|o| o.as_document()))?))
            }
            Some(b'[') => Value::Owned(RawBson::Array(self.array(old.and_then(|o| o.as_array()))?)),
            Some(b'"') => match self.string()? {
                Cow::Borrowed(s) => Value::Ref(RawBsonRef::String(s)),
                Cow::Owned(s) => Value::Owned(RawBson::String(s)),
            },
            Some(b't') => {
                self.literal("true")?;
                Value::Ref(RawBsonRef::Boolean(true))
            }
            Some(b'f') => {
                self.literal("false")?;
                Value::Ref(RawBsonRef::Boolean(false))
            }
            Some(b'n') => {
                self.literal("null")?;
                Value::Ref(RawBsonRef::Null)
            }
            Some(b'-' | b'0'..=b'9') => {
                let new = self.number()?;
                // An unchanged number keeps its original type (and exact value).
                match old {
                    Some(o) if as_f64(&o).is_some() && as_f64(&o) == as_f64(&new) => Value::Owned(o.to_raw_bson()),
                    _ => Value::Ref(new),
                }
            }
            _ => return Err(self.unexpected("a value")),
        })
    }

    fn number(&mut self) -> Result<RawBsonRef<'a>, String> {
        let start = self.i;
        while matches!(self.peek(), Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')) {
            self.i += 1;
        }
        let text = &self.s[start..self.i];
        if !text.contains(['.', 'e', 'E']) {
            if let Ok(v) = text.parse::<i64>() {
                return Ok(match i32::try_from(v) {
                    Ok(v) => RawBsonRef::Int32(v),
                    Err(_) => RawBsonRef::Int64(v),
                });
            }
        }
        text.parse::<f64>().map(RawBsonRef::Double).map_err(|_| {
            self.i = start;
            self.unexpected("a number")
        })
    }

    /// An object whose first key starts with `$`: `{$oid}` and `{$date: "..."}` here, anything
    /// else through the `bson` crate's Extended JSON parser.
    fn extended<'o>(&mut self, old: Option<RawBsonRef<'o>>) -> Result<Value<'a>, String> {
        let start = self.i;
        // A document of the input whose own first key starts with `$` (MongoDB allows such
        // field names), given back unchanged: read as a plain document, so that a nested
        // `{"$symbol": ...}` or `{"$numberLong": ...}` of the data stays a document (found by
        // the libFuzzer run of the transform bridge).
        if let Some(RawBsonRef::Document(o)) = old {
            let depth = self.depth;
            match self.document(Some(o)) {
                Ok(d) if d.as_bytes() == o.as_bytes() => return Ok(Value::Owned(RawBson::Document(d))),
                _ => {
                    self.i = start;
                    self.depth = depth;
                }
            }
        }
        self.i += 1;
        let key = self.string()?;
        if self.next() == Some(b':') && self.peek() == Some(b'"') {
            let v = self.string()?;
            if self.next() == Some(b'}') {
                match key.as_ref() {
                    "$oid" => {
                        if let Ok(id) = ObjectId::parse_str(v.as_ref()) {
                            return Ok(Value::Owned(RawBson::ObjectId(id)));
                        }
                    }
                    "$date" => {
                        if let Ok(d) = DateTime::parse_rfc3339_str(v.as_ref()) {
                            return Ok(Value::Owned(RawBson::DateTime(d)));
                        }
                    }
                    _ => {}
                }
            }
        }
        self.i = start;
        self.skip()?;
        let json: serde_json::Value = serde_json::from_str(&self.s[start..self.i]).map_err(|e| e.to_string())?;
        let new = Bson::try_from(json)
            .map_err(|e| format!("the script returned a document that is not valid Extended JSON: {e}"))?;
        let old = old.and_then(|o| Bson::try_from(o).ok());
        let value = bsonx::restore_number_types(new, old.as_ref());
        RawBson::try_from(value)
            .map(Value::Owned)
            .map_err(|e| format!("the script returned a value BSON cannot hold: {e}"))
    }

    /// Move past one value without building it.
    fn skip(&mut self) -> Result<(), String> {
        match self.peek() {
            Some(b'"') => self.string().map(|_| ()),
            Some(open @ (b'{' | b'[')) => {
                let close = if open == b'{' { b'}' } else { b']' };
                let mut more = self.open(open, close)?;
                while more {
                    if open == b'{' {
                        self.string()?;
                        self.expect(b':')?;
                    }
                    self.skip()?;
                    more = self.more(close)?;
                }
                Ok(())
            }
            Some(b't') => self.literal("true"),
            Some(b'f') => self.literal("false"),
            Some(b'n') => self.literal("null"),
            _ => self.number().map(|_| ()),
        }
    }

    /// A string literal, borrowed when it has no escapes.
    fn string(&mut self) -> Result<Cow<'a, str>, String> {
        self.expect(b'"')?;
        let start = self.i;
        loop {
            match self.next() {
                Some(b'"') => return Ok(Cow::Borrowed(&self.s[start..self.i - 1])),
                Some(b'\\') => break,
                Some(_) => {}
                None => return Err(self.unexpected("the end of a string")),
            }
        }
        // Escapes: decode into an owned string.
        self.i -= 1;
        let mut out = String::from(&self.s[start..self.i]);
        loop {
            let plain = self.i;
            while !matches!(self.peek(), Some(b'"' | b'\\') | None) {
                self.i += 1;
            }
            out.push_str(&self.s[plain..self.i]);
            match self.next() {
                Some(b'"') => return Ok(Cow::Owned(out)),
                Some(b'\\') => {}
                _ => return Err(self.unexpected("the end of a string")),
            }
            match self.next() {
                Some(b'"') => out.push('"'),
                Some(b'\\') => out.push('\\'),
                Some(b'/') => out.push('/'),
                Some(b'b') => out.push('\u{8}'),
                Some(b'f') => out.push('\u{c}'),
                Some(b'n') => out.push('\n'),
                Some(b'r') => out.push('\r'),
                Some(b't') => out.push('\t'),
                Some(b'u') => {
                    let hi = self.hex4()?;
                    let c = if (0xD800..0xDC00).contains(&hi) {
                        if !self.b[self.i..].starts_with(b"\\u") {
                            return Err("the script returned a string holding half of a UTF-16 surrogate pair".into());
                        }
                        self.i += 2;
                        let lo = self.hex4()?;
                        if !(0xDC00..0xE000).contains(&lo) {
                            return Err("the script returned a string holding half of a UTF-16 surrogate pair".into());
                        }
                        char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))
                    } else {
                        char::from_u32(hi)
                    };
                    out.push(c.ok_or("the script returned a string holding half of a UTF-16 surrogate pair")?);
                }
                _ => {
                    self.i -= 1;
                    return Err(self.unexpected("an escape"));
                }
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let h = self.s.get(self.i..self.i + 4).and_then(|h| u32::from_str_radix(h, 16).ok());
        let Some(h) = h else {
            return Err(self.unexpected("four hex digits"));
        };
        self.i += 4;
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unchanged_document_with_dollar_keys_stays_a_document() {
        let old = RawDocumentBuf::from_document(&bson::doc! {
            "_id": 0, "a": { "$1": [], "n": { "$symbol": "" }, "l": { "$numberLong": "5" } }
        })
        .unwrap();
        let json = r#"[{"_id":0,"a":{"$1":[],"n":{"$symbol":""},"l":{"$numberLong":"5"}}}]"#;
        let out = read_documents(json, std::slice::from_ref(&old)).unwrap();
        assert_eq!(out[0].as_ref().unwrap().as_bytes(), old.as_bytes(), "{:?}", out[0]);
        // Changed by the script, such an object is Extended JSON, as documented.
        let json = r#"[{"_id":0,"a":{"$numberLong":"7"}}]"#;
        let out = read_documents(json, std::slice::from_ref(&old)).unwrap();
        assert_eq!(out[0].as_ref().unwrap().get("a").unwrap(), Some(bson::RawBsonRef::Int64(7)));
    }
    use bson::doc;

    fn raw(d: bson::Document) -> RawDocumentBuf {
        RawDocumentBuf::from_document(&d).unwrap()
    }

    #[test]
    fn parses_what_json_stringify_writes() {
        let old = raw(doc! {"_id": 1, "n": 5i64, "x": 2.0, "s": "a", "d": {"k": 3i64}, "l": [1.0, 2]});
        let json = r#"[{"_id":1,"n":5,"x":2,"s":"\"q\"\\\n\u00e9\ud83d\ude00/","d":{"k":3},"l":[1,2.5],"new":1.5,"big":12345678901,"t":true,"z":null,"e":{},"a":[]},null]"#;
        let out = read_documents(json, &[old.clone(), old]).unwrap();
        assert_eq!(
            out[0].as_ref().unwrap().to_document().unwrap(),
            doc! {"_id": 1, "n": 5i64, "x": 2.0, "s": "\"q\"\\\né😀/", "d": {"k": 3i64}, "l": [1.0, 2.5],
            "new": 1.5, "big": 12345678901i64, "t": true, "z": null, "e": {}, "a": []}
        );
        assert_eq!(out[1], None);
    }

    #[test]
    fn extended_json_and_moved_fields() {
        let id = ObjectId::new();
        let old = raw(doc! {"_id": id, "a": 1.0, "b": 2i64, "c": 3});
        // `a` deleted, `c` and `b` swapped: each still finds its original type.
        let json = format!(
            r#"[{{"_id":{{"$oid":"{id}"}},"c":3,"b":2,"at":{{"$date":"2024-01-02T03:04:05.678Z"}},"dec":{{"$numberDecimal":"1.10"}},"nan":{{"$numberDouble":"NaN"}}}}]"#
        );
        let out = read_documents(&json, &[old]).unwrap();
        let d = out[0].as_ref().unwrap().to_document().unwrap();
        assert_eq!(d.get("_id"), Some(&Bson::ObjectId(id)));
        assert_eq!(d.get("c"), Some(&Bson::Int32(3)));
        assert_eq!(d.get("b"), Some(&Bson::Int64(2)));
        assert_eq!(d.get_datetime("at").unwrap().timestamp_millis(), 1_704_164_645_678);
        assert_eq!(d.get("dec").unwrap().to_string(), "1.10");
        assert!(d.get_f64("nan").unwrap().is_nan());
    }

    #[test]
    fn nesting_beyond_mongodbs_limit_is_an_error_not_a_stack_overflow() {
        let deep = |n: usize| format!("[{}{}]", "{\"a\":".repeat(n), "1".to_string() + &"}".repeat(n));
        assert!(read_documents(&deep(100), &[]).is_ok(), "100 levels is MongoDB's limit");
        let e = read_documents(&deep(101), &[]).unwrap_err();
        assert!(e.contains("nested deeper than 100 levels"), "{e}");
        let arrays = format!("[{{\"a\":{}1{}}}]", "[".repeat(200_000), "]".repeat(200_000));
        assert!(read_documents(&arrays, &[]).unwrap_err().contains("deeper than 100"));
    }

    #[test]
    fn bad_output_is_an_error_not_a_panic() {
        let old = raw(doc! {"_id": 1});
        assert!(read_documents(r#"[{"a\u0000b":1}]"#, std::slice::from_ref(&old)).unwrap_err().contains("NUL"));
        assert!(read_documents(r#"[{"s":"\ud800"}]"#, std::slice::from_ref(&old)).unwrap_err().contains("surrogate"));
        assert!(read_documents(r#"[{"a":1"#, std::slice::from_ref(&old)).unwrap_err().contains("malformed"));
        assert!(read_documents(r#"[{"a":1}]x"#, std::slice::from_ref(&old)).unwrap_err().contains("malformed"));
    }
}
