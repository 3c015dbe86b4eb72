//! Screen 1: routes — a table of every route, and at larger sizes the selected route's JSON.
//!
//! Thousands of routes are drawn at the cost of the rows in view: only they are formatted, and
//! the columns' widths over the whole list are measured once per change of the list.

use super::Cells;
use crate::app::{App, Lookup};
use crate::model::Route;
use crate::render::{block, feed_problem};
use crate::theme;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Text};
use ratatui::widgets::Paragraph;
use ratatui::Frame;

const HEADER: [&str; 11] = [
    "id", "uri", "hosts", "methods", "plugins", "upstream", "healthy", "reqs", "4xx", "5xx",
    "status",
];
/// Where `healthy` is in [`HEADER`]: the column is shown only while some upstream has health
/// checks, so that the others keep its room.
const HEALTHY: usize = 6;

/// The header, with or without `healthy`.
fn header(app: &App) -> Vec<String> {
    let shown = shows_health(app);
    (HEADER.iter().enumerate())
        .filter(|(i, _)| shown || *i != HEALTHY)
        .map(|(_, h)| h.to_string())
        .collect()
}

fn shows_health(app: &App) -> bool {
    app.health.data.as_ref().is_some_and(|h| !h.is_empty())
}

/// The columns counted from `GET /wasmgate/traffic` (they change with every poll).
fn count_columns(app: &App) -> std::ops::Range<usize> {
    match shows_health(app) {
        true => 7..10,
        false => 6..9,
    }
}

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

    let title = title(app, routes.len());
    let mut b = block(title);
    if let Some(p) = feed_problem("routes", &app.routes) {
        b = b.title_bottom(p);
    }
    if routes.is_empty() {
        let note = empty_note(app);
        let text = Text::from(vec![Line::raw(""), note]);
        f.render_widget(Paragraph::new(text).block(b), table_area);
        return;
    }

    // Borders and the header row.
    let height = table_area.height.saturating_sub(3) as usize;
    app.page.set(height);
    let selected = app.route_index().unwrap_or(0);
    let offset = super::scroll_offset(app.route_offset.get(), selected, height, routes.len());
    app.route_offset.set(offset);
    let shown = &routes[offset..(offset + height).min(routes.len())];
    let rows: Vec<Cells> = shown.iter().map(|r| cells(app, r)).collect();
    let header = header(app);
    let natural = widths(app);
    let table =
        super::grid_sized(header, rows, &natural, table_area.width.saturating_sub(2)).block(b);
    let mut state = super::table_state(app.route_index().map(|i| i - offset));
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

/// ` Routes (12) `, or with a filter ` Routes (3 of 12) /api▏ ` (the bar while it is typed).
fn title(app: &App, shown: usize) -> String {
    if app.route_filter.is_empty() && !app.filtering {
        return format!(" Routes ({shown}) ");
    }
    let cursor = if app.filtering { "▏" } else { "" };
    format!(
        " Routes ({shown} of {}) /{}{cursor} ",
        app.all_routes().len(),
        app.route_filter
    )
}

/// What an empty table says: no routes, still loading, or why nothing could be read.
fn empty_note(app: &App) -> Line<'static> {
    if app.routes.data.is_some() && !app.route_filter.is_empty() {
        let text = "  No route matches the filter: Esc drops it.";
        return Line::styled(text, theme::dim());
    }
    let (text, style) = match (&app.routes.data, &app.routes.error, &app.unreachable) {
        (Some(_), _, _) => ("No routes yet: press n to create one.".into(), theme::dim()),
        (None, Some(e), _) => (format!("routes: {e}"), theme::error()),
        (None, None, Some(why)) if app.refused => (why.clone(), theme::error()),
        (None, None, Some(why)) => (format!("gateway unreachable: {why}"), theme::error()),
        (None, None, None) => ("Loading…".into(), theme::dim()),
    };
    Line::styled(format!("  {text}"), style)
}

/// The natural widths of the columns over every route: those of the text columns as measured
/// at the last change of the route or service list, those of the counts from the traffic now.
fn widths(app: &App) -> Vec<u16> {
    let mut cache = app.route_widths.borrow_mut();
    let measured = match cache.as_ref() {
        // Measured for this list and these columns (`healthy` comes and goes).
        Some((version, w)) if *version == app.config_version && w.len() == header(app).len() => w,
        _ => {
            let header = header(app);
            let all: Vec<Cells> = app.route_list().iter().map(|r| cells(app, r)).collect();
            &cache
                .insert((app.config_version, super::natural_widths(&header, &all)))
                .1
        }
    };
    let mut w = measured.clone();
    let counts = app
        .traffic
        .data
        .as_ref()
        .map_or(&[][..], |t| t.routes.as_slice());
    let digits = |n: Option<u64>| n.map_or(1, |n| n.to_string().len() as u16);
    for t in counts {
        for (i, n) in count_columns(app).zip([t.requests, t.client_errors, t.server_errors]) {
            w[i] = w[i].max(digits(n));
        }
    }
    w
}

/// One route's row.
fn cells(app: &App, r: &Route) -> Cells {
    let plain = Style::new();
    let status = if r.enabled() {
        ("enabled".to_string(), theme::ok())
    } else {
        ("disabled".to_string(), theme::dim())
    };
    // Requests and errors since the master started (a gateway without the traffic endpoint:
    // `-`); a route answering 5xx stands out.
    let traffic = app.traffic.data.as_ref();
    let t = traffic.and_then(|t| t.of(&r.id));
    let count = |n: Option<u64>| n.map_or("-".to_string(), |n| n.to_string());
    let or_zero = |n: Option<u64>| t.map_or(traffic.map(|_| 0), |_| n);
    let errors = t.and_then(|t| t.server_errors).unwrap_or(0);
    let (hosts, plugins) = hosts_and_plugins(app, r);
    let mut row = vec![
        (r.id.clone(), plain),
        (r.uris().join(" "), plain),
        (hosts, plain),
        (list(r.methods()), plain),
        (plugins, plain),
        (r.upstream(), plain),
    ];
    if shows_health(app) {
        row.push(healthy(app, r));
    }
    row.extend([
        (count(or_zero(t.and_then(|t| t.requests))), plain),
        (count(or_zero(t.and_then(|t| t.client_errors))), plain),
        (
            count(or_zero(t.and_then(|t| t.server_errors))),
            if errors > 0 { theme::error() } else { plain },
        ),
        status,
    ]);
    row
}

/// Healthy nodes of all the nodes of the route's upstream, when it has health checks
/// (`-` when not): yellow while some are down, red when all are.
fn healthy(app: &App, r: &Route) -> (String, Style) {
    let service = r.service_id().and_then(|id| app.service(&id));
    let key = r.upstream_key(service);
    let health = app.health.data.as_ref();
    super::health_cell(key.and_then(|k| health?.of(&k)))
}

fn list(v: Vec<String>) -> String {
    if v.is_empty() {
        "-".to_string()
    } else {
        v.join(",")
    }
}

fn own_part(own: Vec<String>) -> Vec<String> {
    match own.is_empty() {
        true => Vec::new(),
        false => vec![own.join(",")],
    }
}

/// Adds `names` followed by `(from)`, unless there are none.
fn taken_part(parts: &mut Vec<String>, names: Vec<String>, from: &str) {
    if !names.is_empty() {
        parts.push(format!("{} ({from})", names.join(",")));
    }
}

fn joined(parts: Vec<String>) -> String {
    match parts.is_empty() {
        true => "-".to_string(),
        false => parts.join(" + "),
    }
}

/// The hosts and plugins columns: a route with a `service_id` takes the service's hosts when
/// it has none of its own; it runs its own plugins, then those of its plugin config it does
/// not configure itself, then those of its service neither configures (APISIX's merge).
fn hosts_and_plugins(app: &App, r: &Route) -> (String, String) {
    let (hosts, own) = (r.hosts(), r.plugins());
    let service_id = r.service_id();
    let service = service_id.as_deref().and_then(|id| app.service(id));
    let mut taken = own.clone();
    let mut plugins = own_part(own);
    if let Some(id) = r.plugin_config_id() {
        match app.plugin_config(&id) {
            Lookup::Found(config) => {
                let names = (config.plugins().into_iter())
                    .filter(|p| !taken.contains(p))
                    .collect::<Vec<_>>();
                taken.extend(names.iter().cloned());
                taken_part(&mut plugins, names, &format!("plugin config {id}"));
            }
            Lookup::Missing => plugins.push(format!("plugin config {id} MISSING")),
            Lookup::Unread => {}
        }
    }
    if let (Some(id), Some(service)) = (&service_id, service) {
        let names = (service.plugins().into_iter())
            .filter(|p| !taken.contains(p))
            .collect();
        taken_part(&mut plugins, names, &format!("service {id}"));
    }
    let hosts = match (&service_id, service) {
        (Some(id), Some(service)) if hosts.is_empty() => {
            let mut parts = Vec::new();
            taken_part(&mut parts, service.hosts(), &format!("service {id}"));
            joined(parts)
        }
        _ => list(hosts),
    };
    (hosts, joined(plugins))
}
