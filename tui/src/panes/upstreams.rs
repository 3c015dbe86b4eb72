//! Screen 6: upstreams — every upstream object, and every upstream written inside a route or
//! service that has health checks, one row per node: its weight, what the checks find it, and
//! how many routes send requests to it.

use crate::app::App;
use crate::model::{scalar, weighted_nodes, Checked, NodeHealth, Route};
use crate::render::{block, feed_problem};
use crate::theme;
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::Frame;
use serde_json::Value;
use std::collections::HashMap;

/// One upstream as the screen lists it.
struct Upstream<'a> {
    /// `upstreams/1`, or `route 7` / `service s` for an upstream written inside one.
    label: String,
    /// The key its health is kept under (`/apisix/upstreams/1`).
    key: String,
    /// Its JSON (None: known only from the health checks).
    value: Option<&'a Value>,
    /// Routes that send requests to it (directly or through their service).
    routes: usize,
}

/// The upstreams to list: the upstream objects in id order, then the checked upstreams that
/// live inside routes and services.
fn upstreams<'a>(app: &'a App) -> Vec<Upstream<'a>> {
    let routes = app.routes.data.as_deref().unwrap_or(&[]);
    let services = app.services.data.as_deref().unwrap_or(&[]);
    // Each route counted once, under the key of the upstream it sends requests to (as the
    // routes screen's health column finds it).
    let mut users: HashMap<String, usize> = HashMap::new();
    for r in routes {
        let service = r.service_id().and_then(|id| app.service(&id));
        if let Some(key) = r.upstream_key(service) {
            *users.entry(key).or_default() += 1;
        }
    }
    let used = |key: &str| users.get(key).copied().unwrap_or(0);
    let mut list: Vec<Upstream> = (app.upstreams.data.iter().flatten())
        .map(|u| {
            let key = format!("/apisix/upstreams/{}", u.id);
            Upstream {
                label: format!("upstreams/{}", u.id),
                routes: used(&key),
                key,
                value: Some(&u.value),
            }
        })
        .collect();
    let health = app.health.data.as_ref();
    for (key, _) in health.into_iter().flat_map(|h| h.all()) {
        let inline = |prefix: &str, within: &'a [Route]| {
            let id = key.strip_prefix(prefix)?;
            Some((id, within.iter().find(|r| r.id == id)))
        };
        let (label, holder) = if let Some((id, r)) = inline("/apisix/routes/", routes) {
            (format!("route {id}"), r)
        } else if let Some((id, s)) = inline("/apisix/services/", services) {
            (format!("service {id}"), s)
        } else {
            continue;
        };
        list.push(Upstream {
            label,
            key: key.to_string(),
            value: holder.and_then(|h| h.value.get("upstream")),
            routes: used(key),
        });
    }
    list
}

/// One node's row: the upstream's node list with the checks' view of each, and the nodes the
/// checks know that the list lacks (an upstream known only from them).
fn node_rows<'c>(
    u: &Upstream<'_>,
    checked: Option<&'c Checked>,
) -> Vec<(String, String, Option<&'c NodeHealth>)> {
    let find = |addr: &str| checked?.nodes.iter().find(|n| n.addr() == addr);
    let mut rows: Vec<_> = (u.value.map(weighted_nodes).unwrap_or_default().into_iter())
        .map(|(addr, weight)| {
            let h = find(&addr);
            (addr, weight, h)
        })
        .collect();
    for n in checked.iter().flat_map(|c| c.nodes.iter()) {
        if !rows.iter().any(|(a, _, _)| *a == n.addr()) {
            rows.push((n.addr(), "-".into(), Some(n)));
        }
    }
    rows
}

/// How many rows the screen shows (what the selection moves over).
pub fn row_count(app: &App) -> usize {
    let health = app.health.data.as_ref();
    (upstreams(app).iter())
        .map(|u| {
            node_rows(u, health.and_then(|h| h.checked(&u.key)))
                .len()
                .max(1)
        })
        .sum()
}

pub fn draw(f: &mut Frame, area: Rect, app: &App) {
    let list = upstreams(app);
    let health = app.health.data.as_ref();
    let plain = Style::new();
    let mut cells = Vec::new();
    let (mut nodes, mut down) = (0, 0);
    for u in &list {
        let checked = health.and_then(|h| h.checked(&u.key));
        let v = u.value;
        let text = |k: &str, default: &str| {
            v.and_then(|v| v.get(k))
                .map_or_else(|| default.to_string(), scalar)
        };
        let name = match v.and_then(|v| v.get("name")).and_then(Value::as_str) {
            Some(n) => format!("{} ({n})", u.label),
            None => u.label.clone(),
        };
        let kind = format!("{} {}", text("type", "roundrobin"), text("scheme", "http"));
        let checks = checked.map_or("-".to_string(), |c| c.kind.clone());
        let rows = node_rows(u, checked);
        if rows.is_empty() {
            cells.push(vec![
                (name.clone(), plain),
                (kind.clone(), plain),
                ("no nodes".into(), theme::error()),
                ("-".into(), plain),
                (checks.clone(), plain),
                ("-".into(), plain),
                ("-".into(), plain),
                (u.routes.to_string(), plain),
            ]);
            continue;
        }
        for (i, (addr, weight, h)) in rows.into_iter().enumerate() {
            nodes += 1;
            let (state, style) = match h {
                None => ("-".to_string(), plain),
                Some(n) if n.healthy() => ("healthy".to_string(), theme::ok()),
                Some(_) => {
                    down += 1;
                    ("UNHEALTHY".to_string(), theme::error())
                }
            };
            let counts = h.map_or("-".to_string(), |n| {
                let c = n.counter;
                let failures = c.http_failure + c.tcp_failure + c.timeout_failure;
                format!("{} ok, {failures} failed", c.success)
            });
            // The upstream's own columns on its first node's row only.
            let first = |s: &String| if i == 0 { s.clone() } else { String::new() };
            cells.push(vec![
                (first(&name), plain),
                (first(&kind), plain),
                (addr, plain),
                (weight, plain),
                (first(&checks), plain),
                (state, style),
                (counts, plain),
                (first(&u.routes.to_string()), plain),
            ]);
        }
    }
    let mut b = block(format!(
        " Upstreams ({}) — {nodes} nodes, {down} unhealthy ",
        list.len()
    ));
    if let Some(p) = feed_problem("upstreams", &app.upstreams) {
        b = b.title_bottom(p);
    }
    let header: Vec<String> = [
        "upstream", "type", "node", "weight", "checks", "health", "counts", "routes",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let selected = (!cells.is_empty()).then_some(app.upstream_selected.min(cells.len() - 1));
    let table = super::grid(header, cells, area.width.saturating_sub(2)).block(b);
    super::draw_list(f, area, app, table, selected);
}
