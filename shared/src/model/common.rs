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
                "invalid id {s:?}: 1 to 64 characters from a-z A-Z 0-9 - _ ."
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

/// APISIX's id pattern: `^[a-zA-Z0-9-_.]+$`, at most 64 characters.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
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
