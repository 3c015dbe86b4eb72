//! Screen 2: plugins — the loaded Proxy-Wasm plugins, live counters per plugin context (one
//! plugin on one route or global rule) with req/s, and a sparkline of req/s.

use crate::app::{App, SortBy};
use crate::fmt;
use crate::model::StatContext;
use crate::render::{block, feed_problem};
use crate::theme;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::Line;
use ratatui::widgets::{Paragraph, RenderDirection, Sparkline};
use ratatui::Frame;

pub fn draw(f: &mut Frame, area: Rect, app: &App) {
    let plugins = app
        .plugins
        .data
        .as_ref()
        .map_or(&[][..], |p| p.plugins.as_slice());
    let cap = if area.height >= 30 { 10 } else { 4 };
    let plugin_rows = plugins.len().clamp(1, cap) as u16;
    let [top, middle, bottom] = Layout::vertical([
        Constraint::Length(plugin_rows + 3),
        Constraint::Min(5),
        Constraint::Length(if area.height >= 30 { 8 } else { 5 }),
    ])
    .areas(area);
    loaded(f, top, app);
    stats(f, middle, app);
    sparkline(f, bottom, app);
}

/// The plugins declared in config.yaml and their instances.
fn loaded(f: &mut Frame, area: Rect, app: &App) {
    let plugins = app
        .plugins
        .data
        .as_ref()
        .map_or(&[][..], |p| p.plugins.as_slice());
    let mut b = block(format!(" Plugins ({}) ", plugins.len()));
    if let Some(p) = feed_problem("plugins", &app.plugins) {
        b = b.title_bottom(p);
    }
    let plain = Style::new();
    let rows = plugins
        .iter()
        .map(|p| {
            let fault = match p.fail_open {
                Some(true) => "continue",
                Some(false) => "503",
                None => "-",
            };
            vec![
                (p.name.clone(), plain),
                (fmt::opt(p.priority), plain),
                (fmt::opt(p.phase.as_deref()), plain),
                (fault.to_string(), plain),
                (p.instances.len().to_string(), plain),
                (fmt::bytes(p.memory_bytes()), plain),
                (fmt::opt(p.file.as_deref()), plain),
            ]
        })
        .collect();
    let header = [
        "name", "priority", "phase", "on fault", "VMs", "memory", "file",
    ]
    .map(String::from)
    .to_vec();
    let table = super::grid(header, rows, area.width.saturating_sub(2)).block(b);
    f.render_widget(table, area);
}

/// The per-context counters, sorted as chosen.
fn stats(f: &mut Frame, area: Rect, app: &App) {
    let view = &app.stats;
    let rows = view.rows();
    let generation = view
        .feed
        .data
        .as_ref()
        .and_then(|s| s.generation)
        .map_or(String::new(), |g| format!(", generation {g}"));
    let order = if view.descending { "▼" } else { "▲" };
    let mut b = block(format!(
        " Plugin contexts ({}{generation}) — sorted by {} {order} ",
        rows.len(),
        view.sort.label()
    ));
    if let Some(p) = feed_problem("stats", &view.feed) {
        b = b.title_bottom(p);
    }
    if view.feed.data.is_none() {
        f.render_widget(Paragraph::new("").block(b), area);
        return;
    }
    if rows.is_empty() {
        f.render_widget(
            Paragraph::new(Line::styled(
                " No plugin has run yet: send requests to a route with plugins.",
                theme::dim(),
            ))
            .block(b),
            area,
        );
        return;
    }
    // Wide terminals get the other counters too.
    let wide = area.width >= 110;
    let mut header: Vec<String> = [
        SortBy::Plugin,
        SortBy::Owner,
        SortBy::Rate,
        SortBy::Requests,
        SortBy::Errors,
        SortBy::Traps,
        SortBy::P50,
        SortBy::P99,
    ]
    .iter()
    .map(|s| {
        if *s == view.sort {
            format!("{}{order}", s.label())
        } else {
            s.label().to_string()
        }
    })
    .collect();
    if wide {
        header.extend(["replies", "timeouts", "mem hits", "configs"].map(String::from));
    }
    let plain = Style::new();
    let bad = |n: Option<u64>| {
        let style = if n.unwrap_or(0) > 0 {
            theme::error()
        } else {
            plain
        };
        (fmt::opt(n), style)
    };
    // A route gone from the configuration keeps its counts (they outlive reloads): marked.
    let routes = app.routes.data.as_ref();
    let gone = |c: &StatContext| {
        c.owner_kind.as_deref() == Some("route")
            && routes.is_some_and(|rs| {
                !rs.iter()
                    .any(|r| Some(r.id.as_str()) == c.owner_id.as_deref())
            })
    };
    let table_rows = rows
        .iter()
        .map(|c| {
            let key = c.key();
            let owner = match gone(c) {
                true => (format!("{} (deleted)", key.owner()), theme::dim()),
                false => (key.owner(), plain),
            };
            let mut cells = vec![
                (c.plugin.clone(), plain),
                owner,
                (fmt::rate(view.rates.get(&key).copied()), plain),
                (fmt::opt(c.requests), plain),
                bad(c.errors),
                bad(c.traps),
                (fmt::micros(c.p50_us), plain),
                (fmt::micros(c.p99_us), plain),
            ];
            if wide {
                cells.extend([
                    (fmt::opt(c.local_replies), plain),
                    bad(c.timeouts),
                    bad(c.memory_hits),
                    (fmt::opt(c.configures), plain),
                ]);
            }
            cells
        })
        .collect();
    let table = super::grid(header, table_rows, area.width.saturating_sub(2)).block(b);
    super::draw_list(f, area, app, table, view.selection());
}

/// req/s over time, newest on the right.
fn sparkline(f: &mut Frame, area: Rect, app: &App) {
    let (what, samples) = app.stats.sparkline();
    let width = area.width.saturating_sub(2) as usize;
    let shown = &samples[samples.len().saturating_sub(width)..];
    let max = shown.iter().copied().fold(0.0, f64::max);
    let now = shown.last().copied();
    let b = block(format!(
        " req/s — {what}: now {}, max {} ",
        fmt::rate(now),
        fmt::rate(shown.first().map(|_| max))
    ));
    // Hundredths, so that rates below one request per second still show; newest first, drawn
    // from the right edge.
    let data: Vec<u64> = shown
        .iter()
        .rev()
        .map(|v| (v * 100.0).round() as u64)
        .collect();
    f.render_widget(
        Sparkline::default()
            .block(b)
            .data(&data)
            .direction(RenderDirection::RightToLeft)
            .style(theme::ok()),
        area,
    );
}
