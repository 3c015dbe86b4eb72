//! Screen 5: certificates — the SSL objects the TLS listener serves, the soonest to expire
//! first, with the days they have left.

use crate::app::App;
use crate::model::Route;
use crate::render::{block, feed_problem};
use crate::theme;
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::Frame;
use serde_json::Value;

/// Days left under which a certificate is shown as a warning.
const SOON_DAYS: i64 = 14;

/// One SSL object as the table shows it.
struct Row {
    id: String,
    names: String,
    /// notAfter, Unix seconds (the object's `validity_end`).
    end: Option<i64>,
    enabled: bool,
    /// Its `client`: it asks clients for certificates.
    mtls: bool,
    protocols: String,
}

impl Row {
    fn of(r: &Route) -> Row {
        let v = &r.value;
        let strings = |k: &str| -> Vec<String> {
            match v.get(k) {
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(|s| s.as_str())
                    .map(String::from)
                    .collect(),
                Some(Value::String(s)) => vec![s.clone()],
                _ => Vec::new(),
            }
        };
        let mut names = strings("snis");
        names.extend(strings("sni"));
        Row {
            id: r.id.clone(),
            names: names.join(","),
            // A date chrono cannot show (another Admin API's) counts as none.
            end: (v.get("validity_end").and_then(Value::as_i64))
                .filter(|t| chrono::DateTime::from_timestamp(*t, 0).is_some()),
            enabled: v.get("status").and_then(Value::as_u64) != Some(0),
            mtls: v.get("client").is_some_and(Value::is_object),
            protocols: strings("ssl_protocols").join(" "),
        }
    }
}

fn now() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.map_or(0, |d| d.as_secs() as i64)
}

/// `2027-03-01` for a Unix time.
fn date(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map_or_else(|| "-".into(), |d| d.format("%Y-%m-%d").to_string())
}

pub fn draw(f: &mut Frame, area: Rect, app: &App) {
    let now = app.fixed_now.unwrap_or_else(now);
    let mut rows: Vec<Row> = app.ssls.data.iter().flatten().map(Row::of).collect();
    // The soonest to expire first; those without a date (written elsewhere) last.
    rows.sort_by_key(|r| (r.end.is_none(), r.end, r.id.clone()));
    let days = |r: &Row| r.end.map(|e| e.saturating_sub(now).div_euclid(86_400));
    let soon = (rows.iter())
        .filter(|r| r.enabled && days(r).is_some_and(|d| d < SOON_DAYS))
        .count();
    let mut b = block(format!(
        " Certificates ({}) — {soon} served expired or expire within {SOON_DAYS} days ",
        rows.len()
    ));
    if let Some(p) = feed_problem("ssls", &app.ssls) {
        b = b.title_bottom(p);
    }
    let plain = Style::new();
    let header: Vec<String> = [
        "id",
        "names",
        "expires",
        "days left",
        "mTLS",
        "protocols",
        "status",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let cells = rows
        .iter()
        .map(|r| {
            let (left, style) = match days(r) {
                None => ("-".to_string(), plain),
                Some(d) if d < 0 => ("expired".to_string(), theme::error()),
                Some(d) if d < SOON_DAYS => (d.to_string(), theme::warn()),
                Some(d) => (d.to_string(), theme::ok()),
            };
            let off = !r.enabled;
            vec![
                (r.id.clone(), plain),
                (r.names.clone(), plain),
                (r.end.map_or_else(|| "-".into(), date), plain),
                (left, if off { theme::dim() } else { style }),
                ((if r.mtls { "yes" } else { "-" }).to_string(), plain),
                (
                    if r.protocols.is_empty() {
                        "-".into()
                    } else {
                        r.protocols.clone()
                    },
                    plain,
                ),
                (
                    (if off { "off" } else { "on" }).to_string(),
                    if off { theme::dim() } else { plain },
                ),
            ]
        })
        .collect();
    let table = super::grid(header, cells, area.width.saturating_sub(2)).block(b);
    let selected = (!rows.is_empty()).then_some(app.cert_selected);
    super::draw_list(f, area, app, table, selected);
}
