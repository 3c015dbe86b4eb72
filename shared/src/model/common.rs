//! Field types shared by several objects.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;

/// An object id. APISIX accepts strings and integers; wasmgate keeps the string form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(pub String);

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            N(u64),
        }
        let s = match Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("an id is a string or a non-negative integer"))?
        {
            Raw::S(s) => s,
            Raw::N(n) => n.to_string(),
        };
        if !valid_id(&s) {
            return Err(serde::de::Error::custom(format!(
                "invalid id {:?}: 1 to 64 characters from a-z A-Z 0-9 - _ .",
                shown_id(&s)
            )));
        }
        Ok(Id(s))
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// An id as an error shows it: its first 64 characters, then `…` (a 10 kB id is not echoed).
pub fn shown_id(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

/// APISIX's id pattern: `^[a-zA-Z0-9-_.]+$`, at most 64 characters. (New objects of the local
/// store may not start with a dot either: see `wasmgate_master::admin::objects`.)
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// How ids are listed and how routes that tie on priority are ordered: numbers first, in
/// numeric order, then other ids in text order; ids of equal number ("1", "01") by their
/// text. A total order, so every sort and every worker agree.
pub fn id_order(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering::{Greater, Less};
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y).then_with(|| a.cmp(b)),
        (Ok(_), Err(_)) => Less,
        (Err(_), Ok(_)) => Greater,
        _ => a.cmp(b),
    }
}

/// `labels`: string keys to string values.
pub type Labels = BTreeMap<String, String>;

/// Upstream timeouts in seconds (`{connect, send, read}`).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Timeout {
    pub connect: Option<f64>,
    pub send: Option<f64>,
    pub read: Option<f64>,
}

impl Timeout {
    pub fn check(&self, field: &str) -> Result<(), String> {
        for (name, v) in [
            ("connect", self.connect),
            ("send", self.send),
            ("read", self.read),
        ] {
            if let Some(v) = v {
                if !(v > 0.0 && v <= 86_400.0) {
                    return Err(format!(
                        "property \"{field}.{name}\" validation failed: expected a number of seconds in (0, 86400], got {v}"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_order_totally() {
        let mut ids = vec!["b", "10", "1a", "2", "01", "1", "a"];
        ids.sort_by(|a, b| id_order(a, b));
        assert_eq!(ids, ["01", "1", "2", "10", "1a", "a", "b"]);
    }
}
