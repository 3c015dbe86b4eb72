//! The Prometheus text exposition format, version 0.0.4 — what APISIX's exporter serves and
//! every Prometheus-compatible scraper reads.
//!
//! Written here rather than with `prometheus-client`: that crate's encoder follows OpenMetrics
//! and appends `_total` to every counter, so APISIX's counters could not keep their names
//! (`apisix_http_status`, `apisix_bandwidth`) and APISIX's Grafana dashboards found nothing.
//! Format 0.0.4 leaves a counter's name to its owner; the rest of it is a few escaping rules.

use std::collections::HashSet;
use std::fmt::Write;

/// What `Content-Type` says of a page written here.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A sample's labels, in the order written.
pub type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A page being written: families one after the other, each with its `# HELP` and `# TYPE`.
#[derive(Default)]
pub struct Page {
    text: String,
    /// Every name a family written so far claims (see [`claims`]), written or empty.
    taken: HashSet<String>,
}

/// The names a family of `kind` under `name` claims: its samples' (`_bucket`, `_sum`,
/// `_count` of a histogram), and for a counter the name with and without `_total`, which a
/// scraper would read as one family. Two families that share one cannot both be on a page.
pub fn claims(name: &str, kind: Kind) -> Vec<String> {
    match kind {
        Kind::Gauge => vec![name.to_string()],
        Kind::Counter => {
            let stem = name.strip_suffix("_total").unwrap_or(name);
            vec![stem.to_string(), format!("{stem}_total")]
        }
        Kind::Histogram => ["", "_bucket", "_sum", "_count"]
            .iter()
            .map(|suffix| format!("{name}{suffix}"))
            .collect(),
    }
}

impl Page {
    pub fn into_text(self) -> String {
        self.text
    }

    /// A page with nothing written that claims what this one claims now.
    pub fn claims_only(&self) -> Page {
        Page {
            text: String::new(),
            taken: self.taken.clone(),
        }
    }

    /// Whether a family of `kind` under `name` can be added: none written so far claims any
    /// of its names.
    pub fn is_free(&self, name: &str, kind: Kind) -> bool {
        claims(name, kind).iter().all(|n| !self.taken.contains(n))
    }

    /// A counter family under `name` as given (no suffix added); nothing when `rows` is empty.
    pub fn counter(
        &mut self,
        name: &str,
        help: &str,
        rows: impl IntoIterator<Item = (Labels, u64)>,
    ) {
        self.family(name, help, Kind::Counter, rows, |page, name, labels, v| {
            page.sample(name, labels, None, v)
        });
    }

    pub fn gauge(&mut self, name: &str, help: &str, rows: impl IntoIterator<Item = (Labels, i64)>) {
        self.family(name, help, Kind::Gauge, rows, |page, name, labels, v| {
            page.sample(name, labels, None, v)
        });
    }

    /// A histogram family from `(sum, [(upper bound, count in that bucket)])` per series (per
    /// bucket, not cumulative; the last bound `+Inf`): written as `_bucket` lines with
    /// cumulative counts, `_sum` and `_count`.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        rows: impl IntoIterator<Item = (Labels, (f64, Vec<(f64, u64)>))>,
    ) {
        self.family(
            name,
            help,
            Kind::Histogram,
            rows,
            |page, name, labels, (sum, buckets)| {
                let mut below = 0u64;
                for (bound, n) in buckets {
                    below += n;
                    let le = match bound {
                        b if b == f64::INFINITY => "+Inf".to_string(),
                        b => b.to_string(),
                    };
                    page.sample(&format!("{name}_bucket"), labels, Some(&le), below);
                }
                page.sample(&format!("{name}_sum"), labels, None, sum);
                page.sample(&format!("{name}_count"), labels, None, below);
            },
        );
    }

    fn family<T>(
        &mut self,
        name: &str,
        help: &str,
        kind: Kind,
        rows: impl IntoIterator<Item = (Labels, T)>,
        mut write: impl FnMut(&mut Page, &str, &Labels, T),
    ) {
        // Claimed even when empty now: a family the gateway writes only at times (etcd's,
        // the routes') keeps its names from plugin metrics all the same.
        self.taken.extend(claims(name, kind));
        let mut rows = rows.into_iter().peekable();
        if rows.peek().is_none() {
            return;
        }
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {}", kind.as_str());
        for (labels, value) in rows {
            write(self, name, &labels, value);
        }
    }

    /// One line: `name{labels,le="…"} value`.
    fn sample(&mut self, name: &str, labels: &Labels, le: Option<&str>, value: impl Value) {
        self.text.push_str(name);
        let pairs = labels
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .chain(le.map(|le| ("le", le)));
        let mut first = true;
        for (k, v) in pairs {
            self.text.push(if first { '{' } else { ',' });
            first = false;
            self.text.push_str(k);
            self.text.push_str("=\"");
            escape_label(&mut self.text, v);
            self.text.push('"');
        }
        if !first {
            self.text.push('}');
        }
        self.text.push(' ');
        value.write(&mut self.text);
        self.text.push('\n');
    }
}

/// A label value as the format quotes it: backslash, double quote and line feed escaped.
fn escape_label(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A sample's value as text.
trait Value {
    fn write(self, out: &mut String);
}

impl Value for u64 {
    fn write(self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
}

impl Value for i64 {
    fn write(self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
}

impl Value for f64 {
    fn write(self, out: &mut String) {
        match self {
            v if v.is_nan() => out.push_str("NaN"),
            v if v == f64::INFINITY => out.push_str("+Inf"),
            v if v == f64::NEG_INFINITY => out.push_str("-Inf"),
            v => {
                let _ = write!(out, "{v}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_claim_their_sample_names() {
        let mut page = Page::default();
        page.counter("req", "Counted.", []);
        page.histogram("lat", "Timed.", []);
        page.gauge("g", "Gauged.", [(Vec::new(), 1)]);
        for (name, kind) in [
            ("req", Kind::Gauge),
            ("req_total", Kind::Gauge),
            ("req_total", Kind::Counter),
            ("lat_bucket", Kind::Gauge),
            ("lat_count", Kind::Counter),
            ("g", Kind::Histogram),
            ("g_total", Kind::Counter),
        ] {
            assert!(!page.is_free(name, kind), "{name} {kind:?}");
        }
        assert!(page.is_free("g_count", Kind::Gauge));
        assert!(page.is_free("lat_max", Kind::Gauge));
        // The empty families wrote nothing.
        assert_eq!(page.into_text(), "# HELP g Gauged.\n# TYPE g gauge\ng 1\n");
    }

    #[test]
    fn families_samples_and_escapes() {
        let mut page = Page::default();
        page.counter(
            "apisix_http_status",
            "By code.\nSecond line \\ end",
            [(
                vec![("code", "200".into()), ("route", "a\"b\\c\nd".into())],
                5,
            )],
        );
        page.gauge("g", "A gauge.", [(Vec::new(), -3)]);
        page.counter("empty", "Not written.", []);
        page.histogram(
            "lat",
            "Latency.",
            [(
                vec![("type", "request".into())],
                (7.5, vec![(1.0, 2), (2.5, 0), (f64::INFINITY, 1)]),
            )],
        );
        assert_eq!(
            page.into_text(),
            "# HELP apisix_http_status By code.\\nSecond line \\\\ end\n\
             # TYPE apisix_http_status counter\n\
             apisix_http_status{code=\"200\",route=\"a\\\"b\\\\c\\nd\"} 5\n\
             # HELP g A gauge.\n\
             # TYPE g gauge\n\
             g -3\n\
             # HELP lat Latency.\n\
             # TYPE lat histogram\n\
             lat_bucket{type=\"request\",le=\"1\"} 2\n\
             lat_bucket{type=\"request\",le=\"2.5\"} 2\n\
             lat_bucket{type=\"request\",le=\"+Inf\"} 3\n\
             lat_sum{type=\"request\"} 7.5\n\
             lat_count{type=\"request\"} 3\n"
        );
    }
}
