//! A strict reader of the Prometheus text exposition format (0.0.4), for tests that scrape a
//! running gateway: every line must be a comment, a `# HELP`/`# TYPE` line, or a sample of a
//! family whose `# TYPE` came before it; anything else fails the test with the line.

use std::collections::{BTreeMap, HashMap};

/// A series' labels other than `le`, in order.
type LabelKey = Vec<(String, String)>;

#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Default)]
pub struct Page {
    pub samples: Vec<Sample>,
    /// Family name → type (`counter`, `gauge`, `histogram`, `untyped`).
    pub types: HashMap<String, String>,
}

impl Page {
    pub fn parse(text: &str) -> Page {
        let mut page = Page::default();
        for (n, line) in text.lines().enumerate() {
            macro_rules! fail {
                ($why:expr) => {
                    panic!("line {}: {}: {line:?}\n{text}", n + 1, $why)
                };
            }
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or_else(|| fail!("bad TYPE"));
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                    fail!("unknown type");
                }
                if page.types.insert(name.into(), kind.into()).is_some() {
                    fail!("family declared twice");
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let sample = parse_sample(line).unwrap_or_else(|e| fail!(e));
            if page.family_of(&sample.name).is_none() {
                fail!("sample before its family's TYPE");
            }
            page.samples.push(sample);
        }
        page
    }

    /// The declared family a sample name belongs to (`x_bucket` → `x` for a histogram).
    pub fn family_of(&self, name: &str) -> Option<&str> {
        if let Some((k, _)) = self.types.get_key_value(name) {
            return Some(k);
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let stem = name.strip_suffix(suffix)?;
            let (k, t) = self.types.get_key_value(stem)?;
            (t == "histogram" || t == "summary").then_some(k.as_str())
        })
    }

    /// Samples named `name` whose labels include every pair of `labels`.
    pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The one sample `name{labels}` (panics when there is none or several).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found = self.find(name, labels);
        assert_eq!(found.len(), 1, "{name}{labels:?}: {found:?}");
        found[0].value
    }

    /// Checks every histogram: buckets cumulative and ending with `+Inf` = `_count`.
    pub fn check_histograms(&self) {
        for (family, _) in self.types.iter().filter(|(_, t)| *t == "histogram") {
            let mut series: BTreeMap<LabelKey, Vec<(f64, f64)>> = BTreeMap::new();
            for s in self.find(&format!("{family}_bucket"), &[]) {
                let mut key: Vec<_> = s.labels.clone().into_iter().collect();
                key.retain(|(k, _)| k != "le");
                let le = s.labels["le"].as_str();
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                series.entry(key).or_default().push((le, s.value));
            }
            for (key, buckets) in series {
                for w in buckets.windows(2) {
                    assert!(
                        w[0].0 < w[1].0 && w[0].1 <= w[1].1,
                        "{family}{key:?}: {buckets:?}"
                    );
                }
                let (last_le, last) = *buckets.last().unwrap();
                assert!(last_le.is_infinite(), "{family}{key:?}: no +Inf bucket");
                let labels: Vec<(&str, &str)> =
                    key.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let count = self.value(&format!("{family}_count"), &labels);
                assert_eq!(last, count, "{family}{key:?}: +Inf bucket vs _count");
            }
        }
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("bad metric name".into());
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = rest.find('=').ok_or("label without '='")?;
            let key = rest[..eq].trim_start_matches(',');
            let mut chars = rest[eq + 1..].char_indices();
            if chars.next().map(|c| c.1) != Some('"') {
                return Err("label value not quoted".into());
            }
            let mut value = String::new();
            let mut end = None;
            let mut escaped = false;
            for (i, c) in chars {
                match (escaped, c) {
                    (true, 'n') => value.push('\n'),
                    (true, c) => value.push(c),
                    (false, '\\') => {}
                    (false, '"') => {
                        end = Some(eq + 1 + i + 1);
                        break;
                    }
                    (false, c) => value.push(c),
                }
                escaped = !escaped && c == '\\';
            }
            let end = end.ok_or("unterminated label value")?;
            if labels.insert(key.to_string(), value).is_some() {
                return Err(format!("label {key} twice"));
            }
            rest = rest[end..].trim_start_matches(',');
        }
    }
    let value = rest.trim();
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().map_err(|_| format!("bad value {v:?}"))?,
    };
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}
