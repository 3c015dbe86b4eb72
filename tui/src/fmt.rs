//! How numbers are shown: "-" for anything the gateway did not report.

use std::fmt::Display;

/// The value, or "-".
pub fn opt<T: Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// Bytes in binary units: `512B`, `12.0K`, `3.4M`, `1.2G`.
pub fn bytes(n: Option<u64>) -> String {
    let Some(n) = n else { return "-".into() };
    const UNITS: [&str; 4] = ["K", "M", "G", "T"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut v = n as f64 / 1024.0;
    for unit in UNITS {
        if v < 1024.0 || unit == "T" {
            return format!("{v:.1}{unit}");
        }
        v /= 1024.0;
    }
    unreachable!()
}

/// An uptime: `42s`, `3m05s`, `2h03m`, `4d02h`.
pub fn uptime(s: Option<u64>) -> String {
    let Some(s) = s else { return "-".into() };
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// A duration in microseconds: `850µs`, `1.25ms`, `1.50s`.
pub fn micros(us: Option<f64>) -> String {
    let Some(us) = us.filter(|v| v.is_finite()) else {
        return "-".into();
    };
    if us < 1000.0 {
        format!("{us:.0}µs")
    } else if us < 1_000_000.0 {
        format!("{:.2}ms", us / 1000.0)
    } else {
        format!("{:.2}s", us / 1_000_000.0)
    }
}

/// Requests per second: `0.5`, `20.0`, `1234`, `12.3k`.
pub fn rate(r: Option<f64>) -> String {
    let Some(r) = r.filter(|v| v.is_finite()) else {
        return "-".into();
    };
    if r < 100.0 {
        format!("{r:.1}")
    } else if r < 10_000.0 {
        format!("{r:.0}")
    } else {
        format!("{:.1}k", r / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(opt::<u64>(None), "-");
        assert_eq!(opt(Some(3)), "3");
        assert_eq!(bytes(Some(512)), "512B");
        assert_eq!(bytes(Some(12 * 1024 + 100)), "12.1K");
        assert_eq!(bytes(Some(35 << 20)), "35.0M");
        assert_eq!(bytes(Some(3 << 30)), "3.0G");
        assert_eq!(uptime(Some(42)), "42s");
        assert_eq!(uptime(Some(185)), "3m05s");
        assert_eq!(uptime(Some(7380)), "2h03m");
        assert_eq!(uptime(Some(4 * 86400 + 7200)), "4d02h");
        assert_eq!(micros(Some(850.2)), "850µs");
        assert_eq!(micros(Some(1250.0)), "1.25ms");
        assert_eq!(micros(Some(1.5e6)), "1.50s");
        assert_eq!(micros(None), "-");
        assert_eq!(rate(Some(0.5)), "0.5");
        assert_eq!(rate(Some(20.0)), "20.0");
        assert_eq!(rate(Some(1234.4)), "1234");
        assert_eq!(rate(Some(12_345.0)), "12.3k");
    }
}
