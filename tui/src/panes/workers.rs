//! Screen 3: workers — the master and a live table of worker processes.

use crate::app::App;
use crate::fmt;
use crate::render::{block, feed_problem};
use crate::theme;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Wrap};
use ratatui::Frame;

pub fn draw(f: &mut Frame, area: Rect, app: &App) {
    let status = app.status.data.as_ref();
    let store = status.and_then(|s| s.store.as_ref());
    let mut b = block(" Master ".into());
    if let Some(p) = feed_problem("status", &app.status) {
        b = b.title_bottom(p);
    }
    let master = status.map(|s| &s.master);
    let field = |label: &'static str, value: String| {
        vec![
            Span::styled(format!("{label} "), theme::dim()),
            Span::raw(value),
            Span::raw("   "),
        ]
    };
    let mut spans = Vec::new();
    if let Some(m) = master {
        spans.extend(field("pid", fmt::opt(m.pid)));
        spans.extend(field("version", fmt::opt(m.version.as_deref())));
        spans.extend(field("up", fmt::uptime(m.uptime_s)));
        spans.extend(field("epoch", fmt::opt(m.epoch)));
        spans.extend(field("generation", fmt::opt(m.generation)));
        spans.extend(field("config", fmt::opt(m.config.as_deref())));
    }
    let mut lines = vec![Line::from(spans)];
    if let Some(store) = store {
        lines.push(store_line(store));
    }
    let paragraph = Paragraph::new(lines).wrap(Wrap { trim: true });
    // As tall as its wrapped text (the reason etcd is away can be long), within a third of
    // the screen; at least the two lines it always had.
    let wrapped = paragraph.line_count(area.width.saturating_sub(2)) as u16;
    let master_rows = wrapped.clamp(2, (area.height / 3).max(2)) + 2;
    let [top, rest] =
        Layout::vertical([Constraint::Length(master_rows), Constraint::Min(4)]).areas(area);
    f.render_widget(paragraph.block(b), top);

    let workers = status.map_or(&[][..], |s| s.workers.as_slice());
    let generation = master.and_then(|m| m.generation);
    // The master's count goes on across reloads; a gateway without one, the live workers'.
    let live: u64 = workers.iter().filter_map(|w| w.requests).sum();
    let total = master.and_then(|m| m.requests).unwrap_or(live);
    let b = block(format!(" Workers ({}) — {total} requests ", workers.len()));
    // Narrow terminals leave out the slot.
    let wide = rest.width >= 100;
    let keep = |i: &usize| wide || *i != 1;
    let plain = Style::new();
    let header: Vec<String> = [
        "id", "slot", "pid", "state", "epoch", "uptime", "restarts", "gen", "requests", "conns",
        "faults", "rss",
    ]
    .into_iter()
    .enumerate()
    .filter(|(i, _)| keep(i))
    .map(|(_, h)| h.to_string())
    .collect();
    let rows = workers
        .iter()
        .map(|w| {
            let state = w.state.clone().unwrap_or_else(|| "-".into());
            let state_style = match state.as_str() {
                "running" => theme::ok(),
                "-" => plain,
                _ => theme::warn(),
            };
            // A worker that has not applied the master's generation yet.
            let lagging = generation.is_some() && w.generation_seen != generation;
            let faults = w.plugin_faults.unwrap_or(0);
            let cells = vec![
                (fmt::opt(w.worker_id), plain),
                (fmt::opt(w.slot), plain),
                (fmt::opt(w.pid), plain),
                (state, state_style),
                (fmt::opt(w.epoch), plain),
                (fmt::uptime(w.uptime_s), plain),
                (
                    fmt::opt(w.restarts),
                    // A worker that died and was replaced.
                    if w.restarts.unwrap_or(0) > 0 {
                        theme::warn()
                    } else {
                        plain
                    },
                ),
                (
                    fmt::opt(w.generation_seen),
                    if lagging { theme::warn() } else { plain },
                ),
                (fmt::opt(w.requests), plain),
                (fmt::opt(w.active_connections), plain),
                (
                    fmt::opt(w.plugin_faults),
                    if faults > 0 { theme::error() } else { plain },
                ),
                (fmt::bytes(w.rss_bytes), plain),
            ];
            cells
                .into_iter()
                .enumerate()
                .filter(|(i, _)| keep(i))
                .map(|(_, c)| c)
                .collect()
        })
        .collect();
    let table = super::grid(header, rows, rest.width.saturating_sub(2)).block(b);
    let selected = (!workers.is_empty()).then_some(app.worker_selected);
    super::draw_list(f, rest, app, table, selected);
}

/// `store etcd http://10.0.0.5:2379 /apisix  reachable  revision 812`, or why etcd is away.
fn store_line(store: &crate::model::StoreInfo) -> Line<'static> {
    let mut spans = vec![Span::styled("store ", theme::dim())];
    match store.kind.as_deref() {
        Some("etcd") => {
            spans.push(Span::raw(format!(
                "etcd {} {}   ",
                store.endpoints.join(","),
                fmt::opt(store.prefix.as_deref())
            )));
            match store.reachable {
                Some(false) => {
                    let why = store.error.as_deref().unwrap_or("no answer");
                    spans.push(Span::styled(
                        format!("UNREACHABLE: {why} (serving the last configuration)   "),
                        theme::error(),
                    ));
                }
                _ => spans.push(Span::styled("reachable   ", theme::ok())),
            }
        }
        kind => spans.push(Span::raw(format!("{}   ", fmt::opt(kind)))),
    }
    spans.push(Span::styled("revision ", theme::dim()));
    spans.push(Span::raw(fmt::opt(store.revision)));
    Line::from(spans)
}
