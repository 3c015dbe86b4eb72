//! Durations and byte sizes written the way nginx and APISIX operators write them.
//!
//! Durations: a bare number means seconds (`60`, `0.5`); suffixes `ms`, `s`, `m`, `h`, `d`.
//! Sizes: a bare number means bytes; suffixes `k`, `m`, `g` (case-insensitive, 1024-based).

use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// Parses `60s`, `500ms`, `1m`, `2h`, `1d` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, mult_ms) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1_000.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3_600_000.0)
    } else if let Some(n) = t.strip_suffix('d') {
        (n, 86_400_000.0)
    } else {
        (t, 1_000.0)
    };
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid duration {text:?} (expected e.g. 60s, 500ms, 1m)"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!(
            "invalid duration {text:?}: must be a non-negative number"
        ));
    }
    let ms = value * mult_ms;
    if ms > 365.0 * 86_400_000.0 {
        return Err(format!("invalid duration {text:?}: longer than a year"));
    }
    Ok(Duration::from_micros((ms * 1000.0) as u64))
}

/// Parses `1m`, `64k`, `512` (bytes), `0`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim().to_ascii_lowercase();
    let (num, mult) = match t.as_bytes().last() {
        Some(b'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some(b'm') => (&t[..t.len() - 1], 1u64 << 20),
        Some(b'g') => (&t[..t.len() - 1], 1u64 << 30),
        _ => (&t[..], 1u64),
    };
    let value: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid size {text:?} (expected e.g. 1m, 64k, 512)"))?;
    value
        .checked_mul(mult)
        .ok_or_else(|| format!("invalid size {text:?}: too large"))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrText {
    Num(f64),
    Text(String),
}

/// Serde helper: a duration written as a number of seconds or a string such as `60s`.
pub fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match NumOrText::deserialize(d)? {
        NumOrText::Num(n) => parse_duration(&n.to_string()),
        NumOrText::Text(t) => parse_duration(&t),
    }
    .map_err(serde::de::Error::custom)
}

/// Serde helper: an optional duration, as [`de_duration`] when present.
pub fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

/// Serde helper: a switch written as nginx writes one (`on` / `off`) or as a boolean.
pub fn de_on_off<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Switch {
        Bool(bool),
        Text(String),
    }
    match Switch::deserialize(d)? {
        Switch::Bool(b) => Ok(b),
        Switch::Text(t) => match t.trim() {
            "on" => Ok(true),
            "off" => Ok(false),
            other => Err(serde::de::Error::custom(format!(
                "{other:?}: `on` or `off` (or true / false)"
            ))),
        },
    }
}

/// Serde helper: a time limit, as [`de_duration`], or `off` for none (None). 0 is refused: it
/// would be a limit nothing fits in, where `off` says what is meant.
pub fn de_limit<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    match NumOrText::deserialize(d)? {
        NumOrText::Text(t) if t.trim() == "off" => Ok(None),
        NumOrText::Num(n) => parse_duration(&n.to_string()).map(Some),
        NumOrText::Text(t) => parse_duration(&t).map(Some),
    }
    .and_then(|limit| match limit {
        Some(d) if d.is_zero() => Err("a limit of 0 (say `off` for no limit)".to_string()),
        limit => Ok(limit),
    })
    .map_err(serde::de::Error::custom)
}

/// Serde helper: a size written as a number of bytes or a string such as `1m`.
pub fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match NumOrText::deserialize(d)? {
        NumOrText::Num(n) if n >= 0.0 && n.fract() == 0.0 => Ok(n as u64),
        NumOrText::Num(n) => Err(format!("invalid size {n}")),
        NumOrText::Text(t) => parse_size(&t),
    }
    .map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("60").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("0.5").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1m").unwrap(), 1 << 20);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("99999999999999g").is_err());
        assert!(parse_size("big").is_err());
    }
}
