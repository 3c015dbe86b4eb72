//! Screen 1: routes — a table of every route, and at larger sizes the selected route's JSON.

use crate::app::App;
use crate::render::{block, feed_problem};
use crate::theme;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Text};
use ratatui::widgets::Paragraph;
use ratatui::Frame;

pub fn draw(f: &mut Frame, area: Rect, app: &App) {
    let routes = app.route_list();
    // Tall terminals show the selected route's JSON under the table, which keeps at least
    // half the height when it has that many rows.
    let detail_height = match app.selected_route() {
        Some(r) if area.height >= 28 => {
            let table = (routes.len() as u16 + 3).clamp(5, area.height / 2);
            (r.editable_json().lines().count() as u16 + 2).min(area.height - table)
        }
        _ => 0,
    };
    let [table_area, detail_area] =
        Layout::vertical([Constraint::Min(5), Constraint::Length(detail_height)]).areas(area);

    let title = format!(" Routes ({}) ", routes.len());
    let mut b = block(title);
    if let Some(p) = feed_problem("routes", &app.routes) {
        b = b.title_bottom(p);
    }
    if routes.is_empty() {
        let text = if app.routes.data.is_some() {
            Text::from(vec![
                Line::raw(""),
                Line::styled("  No routes yet: press n to create one.", theme::dim()),
            ])
        } else {
            Text::from(vec![
                Line::raw(""),
                Line::styled("  Loading…", theme::dim()),
            ])
        };
        f.render_widget(Paragraph::new(text).block(b), table_area);
        return;
    }

    let plain = Style::new();
    let traffic = app.traffic.data.as_ref();
    let rows = routes
        .iter()
        .map(|r| {
            let list = |v: Vec<String>| {
                if v.is_empty() {
                    "-".to_string()
                } else {
                    v.join(",")
                }
            };
            let status = if r.enabled() {
                ("enabled".to_string(), theme::ok())
            } else {
                ("disabled".to_string(), theme::dim())
            };
            // Requests and errors since the master started (a gateway without the traffic
            // endpoint: `-`); a route answering 5xx stands out.
            let t = traffic.and_then(|t| t.of(&r.id));
            let count = |n: Option<u64>| n.map_or("-".to_string(), |n| n.to_string());
            let errors = t.and_then(|t| t.server_errors).unwrap_or(0);
            vec![
                (r.id.clone(), plain),
                (r.uris().join(" "), plain),
                (list(r.hosts()), plain),
                (list(r.methods()), plain),
                (list(r.plugins()), plain),
                (r.upstream(), plain),
                (count(t.map_or(traffic.map(|_| 0), |t| t.requests)), plain),
                (
                    count(t.map_or(traffic.map(|_| 0), |t| t.client_errors)),
                    plain,
                ),
                (
                    count(t.map_or(traffic.map(|_| 0), |t| t.server_errors)),
                    if errors > 0 { theme::error() } else { plain },
                ),
                status,
            ]
        })
        .collect();
    let header = [
        "id", "uri", "hosts", "methods", "plugins", "upstream", "reqs", "4xx", "5xx", "status",
    ]
    .map(String::from)
    .to_vec();
    let table = super::grid(header, rows, table_area.width.saturating_sub(2)).block(b);
    let mut state = super::table_state(app.route_index());
    f.render_stateful_widget(table, table_area, &mut state);

    if detail_height > 0 {
        if let Some(r) = app.selected_route() {
            let title = match r.name() {
                Some(n) => format!(" Route {} — {n} ", r.id),
                None => format!(" Route {} ", r.id),
            };
            f.render_widget(
                Paragraph::new(r.editable_json()).block(block(title)),
                detail_area,
            );
        }
    }
}
