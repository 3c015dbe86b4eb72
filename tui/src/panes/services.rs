//! Screen 7: services — every service (APISIX's shared hosts, plugins and upstream for the
//! routes that name it), with the routes that use it and their traffic together.

use super::Cells;
use crate::app::App;
use crate::model::Route;
use crate::render::{block, feed_problem};
use crate::theme;
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::text::{Line, Text};
use ratatui::widgets::Paragraph;
use ratatui::Frame;
use std::collections::HashMap;

const HEADER: [&str; 8] = [
    "service", "hosts", "plugins", "upstream", "healthy", "routes", "reqs", "5xx",
];

/// What the routes naming a service add up to.
#[derive(Default)]
struct Users {
    routes: usize,
    /// Summed over the routes the traffic endpoint knows (None: it reports none of them).
    requests: Option<u64>,
    server_errors: Option<u64>,
}

/// The routes of each service id, and their traffic, in one pass over the routes.
fn users(app: &App) -> HashMap<String, Users> {
    let traffic = app.traffic.data.as_ref();
    let mut by_service: HashMap<String, Users> = HashMap::new();
    for r in app.routes.data.iter().flatten() {
        let Some(id) = r.service_id() else { continue };
        let u = by_service.entry(id).or_default();
        u.routes += 1;
        if let Some(t) = traffic.and_then(|t| t.of(&r.id)) {
            let add = |sum: &mut Option<u64>, n: Option<u64>| {
                *sum = Some(sum.unwrap_or(0) + n.unwrap_or(0));
            };
            add(&mut u.requests, t.requests);
            add(&mut u.server_errors, t.server_errors);
        }
    }
    by_service
}

/// How many rows the screen shows (what the selection moves over).
pub fn row_count(app: &App) -> usize {
    app.services.data.as_ref().map_or(0, Vec::len)
}

pub fn draw(f: &mut Frame, area: Rect, app: &App) {
    let services = app.services.data.as_deref().unwrap_or(&[]);
    let mut b = block(format!(" Services ({}) ", services.len()));
    if let Some(p) = feed_problem("services", &app.services) {
        b = b.title_bottom(p);
    }
    if services.is_empty() {
        let (text, style) = match (&app.services.data, &app.services.error) {
            (Some(_), _) => (
                "No services: routes share hosts, plugins and an upstream through one \
                 (PUT /apisix/admin/services/ID)."
                    .to_string(),
                theme::dim(),
            ),
            (None, Some(e)) => (format!("services: {e}"), theme::error()),
            (None, None) => ("Loading…".to_string(), theme::dim()),
        };
        let text = Text::from(vec![
            Line::raw(""),
            Line::styled(format!("  {text}"), style),
        ]);
        f.render_widget(Paragraph::new(text).block(b), area);
        return;
    }
    let users = users(app);
    let none = Users::default();
    let rows: Vec<Cells> = (services.iter())
        .map(|s| cells(app, s, users.get(&s.id).unwrap_or(&none)))
        .collect();
    let header = HEADER.iter().map(|h| h.to_string()).collect();
    let selected = Some(app.service_selected.min(rows.len() - 1));
    let table = super::grid(header, rows, area.width.saturating_sub(2)).block(b);
    super::draw_list(f, area, app, table, selected);
}

/// One service's row.
fn cells(app: &App, s: &Route, users: &Users) -> Cells {
    let plain = Style::new();
    let name = match s.name() {
        Some(n) => format!("{} ({n})", s.id),
        None => s.id.clone(),
    };
    let list = |v: Vec<String>| match v.is_empty() {
        true => "-".to_string(),
        false => v.join(","),
    };
    let count = |n: Option<u64>| n.map_or("-".to_string(), |n| n.to_string());
    // Without the traffic endpoint `-`; a service none of whose routes was requested yet 0.
    let traffic = |n: Option<u64>| match app.traffic.data {
        Some(_) => count(Some(n.unwrap_or(0))),
        None => count(None),
    };
    let errors = users.server_errors.unwrap_or(0);
    vec![
        (name, plain),
        (list(s.hosts()), plain),
        (list(s.plugins()), plain),
        (s.upstream(), plain),
        healthy(app, s),
        (users.routes.to_string(), plain),
        (traffic(users.requests), plain),
        (
            traffic(users.server_errors),
            if errors > 0 { theme::error() } else { plain },
        ),
    ]
}

/// Healthy nodes of all the nodes of the service's upstream, when it has health checks.
fn healthy(app: &App, s: &Route) -> (String, Style) {
    let health = app.health.data.as_ref();
    super::health_cell(s.own_upstream_key("services").and_then(|k| health?.of(&k)))
}
