//! Drawing: a pure function of [`App`] into a ratatui `Frame` — the tab bar, the current
//! screen (one module per screen under [`crate::panes`]), the status bar and whatever modal is
//! open. Tests draw into a `TestBackend` and read the text.

use crate::app::{App, Feed, Modal, Screen, HELP, HELP_LEFT};
use crate::client::ApiError;
use crate::panes;
use crate::theme;
use ratatui::layout::{Alignment, Constraint, Layout, Rect};
use ratatui::text::{Line, Span, Text};
use ratatui::widgets::{Block, BorderType, Borders, Clear, Paragraph, Wrap};
use ratatui::Frame;

/// Draws the whole console.
pub fn draw(f: &mut Frame, app: &App) {
    let [top, body, bar] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(f.area());
    tabs(f, top, app);
    match app.screen {
        Screen::Routes => panes::routes::draw(f, body, app),
        Screen::Plugins => panes::plugins::draw(f, body, app),
        Screen::Workers => panes::workers::draw(f, body, app),
        Screen::Log => panes::log::draw(f, body, app),
        Screen::Certificates => panes::certs::draw(f, body, app),
        Screen::Upstreams => panes::upstreams::draw(f, body, app),
        Screen::Services => panes::services::draw(f, body, app),
    }
    status_bar(f, bar, app);
    let shown = modal(f, body, app);
    app.blind.set(!shown);
}

/// Draws the open modal; false when the terminal is too small to show it whole (a notice
/// says so instead).
fn modal(f: &mut Frame, body: Rect, app: &App) -> bool {
    match &app.modal {
        None => true,
        Some(Modal::Help) => {
            help(f, f.area());
            true
        }
        Some(Modal::Confirm(c)) => dialog(
            f,
            &c.title,
            &c.question,
            yes_no("yes", "no"),
            Fit::Whole,
            false,
        ),
        Some(Modal::Message { title, text, error }) => dialog(
            f,
            title,
            text,
            Line::styled("any key closes", theme::dim()),
            Fit::Cut,
            *error,
        ),
        Some(Modal::Editor(ed)) => panes::editor::draw(f, body, ed),
        Some(Modal::Overwrite { editor, why, .. }) => {
            panes::editor::draw(f, body, editor)
                && dialog(
                    f,
                    "Overwrite",
                    why,
                    yes_no("save", "keep editing"),
                    Fit::Whole,
                    false,
                )
        }
        Some(Modal::Discard { editor, quit }) => {
            let question = format!(
                "{} and lose your changes to route {}?",
                if *quit { "Quit" } else { "Close the editor" },
                editor.id_text()
            );
            panes::editor::draw(f, body, editor)
                && dialog(
                    f,
                    "Discard changes",
                    &question,
                    yes_no("discard", "keep editing"),
                    Fit::Whole,
                    false,
                )
        }
    }
}

/// Said instead of a question or the editor when the terminal cannot show it whole: keys
/// other than Esc and Ctrl-C wait until it is larger.
pub fn too_small(f: &mut Frame, area: Rect) {
    f.render_widget(Clear, area);
    let text = "Terminal too small: enlarge it, or Esc";
    let line = Line::styled(panes::clip(text.to_string(), area.width), theme::error());
    let middle = Rect {
        y: area.y + area.height / 2,
        height: area.height.min(1),
        ..area
    };
    f.render_widget(line.alignment(Alignment::Center), middle);
}

/// ` wasmgate │ 1 Routes  2 Plugins  3 Workers  4 Log  …            gen 12 · epoch 1`; where
/// that does not fit, the tabs close up and the name goes, so the generation stays in view.
fn tabs(f: &mut Frame, area: Rect, app: &App) {
    let right = tabs_right(app);
    let width = area.width as usize;
    let fits =
        |line: &Line, r: Option<&Line>| line.width() + r.map_or(0, |r| r.width() + 1) <= width;
    let mut line = tab_line(app, Tabs::Roomy);
    if !fits(&line, right.first()) {
        line = tab_line(app, Tabs::Closed);
    }
    // etcd's absence is seen from every screen: the other tabs give up their names for it
    // (an 80-column terminal has room for the seven names or for it, not both).
    if etcd_away(app) && !fits(&line, right.last()) {
        line = tab_line(app, Tabs::Numbers);
    }
    let room = width.saturating_sub(line.width() + 1);
    f.render_widget(line, area);
    if let Some(right) = right.into_iter().find(|r| r.width() <= room) {
        f.render_widget(right.alignment(Alignment::Right), area);
    }
}

/// How much of the tab bar is spelled out.
#[derive(Clone, Copy, PartialEq)]
enum Tabs {
    /// The name, then every tab with its title.
    Roomy,
    /// Every tab with its title, closed up.
    Closed,
    /// The current tab's title, the others' numbers only.
    Numbers,
}

/// The tabs as `form` spells them.
fn tab_line(app: &App, form: Tabs) -> Line<'static> {
    let mut spans = match form {
        Tabs::Roomy => vec![Span::styled(" wasmgate ", theme::title()), Span::raw("│")],
        _ => Vec::new(),
    };
    for s in Screen::ALL {
        let label = match (form, s == app.screen) {
            (Tabs::Numbers, false) => format!(" {} ", s.index() + 1),
            _ => format!(" {} {} ", s.index() + 1, s.title()),
        };
        if s == app.screen {
            spans.push(Span::styled(label, theme::tab_active()));
        } else {
            // Closed up: one space between two tabs, not two.
            let after_tab = spans.last().is_some_and(|l| l.content.ends_with(' '));
            let label = match form != Tabs::Roomy && after_tab {
                true => label[1..].to_string(),
                false => label,
            };
            spans.push(Span::raw(label));
        }
    }
    Line::from(spans)
}

/// Whether the gateway reports etcd out of reach.
fn etcd_away(app: &App) -> bool {
    let store = app.status.data.as_ref().and_then(|s| s.store.as_ref());
    store.is_some_and(|s| s.etcd_away())
}

/// What is shown right of the tabs, the fullest first: the generation and epoch, and etcd's
/// absence.
fn tabs_right(app: &App) -> Vec<Line<'static>> {
    let Some(status) = app.status.data.as_ref() else {
        return Vec::new();
    };
    let m = &status.master;
    let away = Span::styled("etcd unreachable ", theme::error());
    let generation = Span::styled(
        format!(
            "gen {} · epoch {} ",
            crate::fmt::opt(m.generation),
            crate::fmt::opt(m.epoch)
        ),
        theme::dim(),
    );
    // Seen from every screen: the gateway serves its last configuration without etcd. That
    // stays when both do not fit.
    match etcd_away(app) {
        false => vec![Line::from(generation)],
        true => vec![
            Line::from(vec![
                away.clone(),
                Span::styled("· ", theme::dim()),
                generation,
            ]),
            Line::from(away),
        ],
    }
}

/// Keys worth knowing on a screen, for the status bar.
fn hints(app: &App) -> &'static [(&'static str, &'static str)] {
    match app.modal {
        Some(_) => &[],
        // Nothing to edit, and no new route, before the routes were read.
        None if app.screen == Screen::Routes && app.routes.data.is_none() => {
            &[("?", "help"), ("q", "quit")]
        }
        None if app.screen == Screen::Routes && app.filtering => {
            &[("Enter", "keep filter"), ("Esc", "drop it")]
        }
        None => match app.screen {
            Screen::Routes => &[
                ("/", "filter"),
                ("n", "new"),
                ("e", "edit"),
                ("d", "delete"),
                ("spc", "on/off"),
                ("?", "help"),
                ("q", "quit"),
            ],
            Screen::Plugins => &[
                ("s", "sort"),
                ("r", "reverse"),
                ("a", "all"),
                ("?", "help"),
                ("q", "quit"),
            ],
            Screen::Workers => &[("R", "reload"), ("?", "help"), ("q", "quit")],
            Screen::Log => &[("←→", "scroll"), ("G", "end"), ("?", "help"), ("q", "quit")],
            Screen::Certificates | Screen::Upstreams | Screen::Services => {
                &[("?", "help"), ("q", "quit")]
            }
        },
    }
}

/// The keys of a question: `y` does `yes`, `n` does `no`.
fn yes_no(yes: &str, no: &str) -> Line<'static> {
    Line::from(vec![
        Span::styled("y", theme::key()),
        Span::raw(format!(" {yes}    ")),
        Span::styled("n", theme::key()),
        Span::raw(format!(" {no}")),
    ])
}

/// Connection state on the left; a note, or the screen's keys, after it.
fn status_bar(f: &mut Frame, area: Rect, app: &App) {
    let mut spans = match (app.connected, &app.unreachable) {
        (Some(false), Some(reason)) if app.refused => vec![Span::styled(
            format!(" ✗ {}: {reason} — retrying… ", app.admin),
            theme::error(),
        )],
        (Some(false), reason) => {
            let mut s = vec![Span::styled(" ✗ disconnected, retrying… ", theme::error())];
            if let Some(r) = reason {
                s.push(Span::styled(format!("({r}) "), theme::error()));
            }
            s
        }
        (None, _) => vec![Span::styled(
            format!(" connecting to {}… ", app.admin),
            theme::warn(),
        )],
        (Some(true), _) => vec![Span::styled(format!(" ● {} ", app.admin), theme::ok())],
    };
    if app.reloading {
        spans.push(Span::styled(" reloading… ", theme::warn()));
    }
    match &app.flash {
        Some(n) => spans.push(Span::styled(
            format!(" {} ", n.text),
            if n.error { theme::error() } else { theme::ok() },
        )),
        None => {
            for (k, what) in hints(app) {
                spans.push(Span::styled(format!(" {k}"), theme::key()));
                spans.push(Span::raw(format!(" {what}")));
            }
        }
    }
    f.render_widget(
        Paragraph::new(Line::from(spans)).style(theme::status_bar()),
        area,
    );
}

/// A bordered block with a title.
pub fn block(title: String) -> Block<'static> {
    Block::default()
        .borders(Borders::ALL)
        .border_type(BorderType::Rounded)
        .title(Span::styled(title, theme::title()))
}

/// A line saying why an endpoint's data is missing or stale; None when the last call worked.
pub fn feed_problem<T>(what: &str, feed: &Feed<T>) -> Option<Line<'static>> {
    let e = feed.error.as_ref()?;
    let text = match (e, feed.data.is_some()) {
        (ApiError::Status { status: 404, .. }, false) => {
            format!("{what}: not available from this gateway ({e})")
        }
        (_, true) => format!("{what} (last known; {e})"),
        (_, false) => format!("{what}: {e}"),
    };
    Some(Line::styled(text, theme::error()))
}

/// A rectangle of at most `w`×`h` centred in `area`.
pub fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    }
}

/// Narrowest a dialog is drawn: its footer (`y discard    n keep editing`) must fit.
const DIALOG_MIN_WIDTH: u16 = 32;

/// How a dialog that the screen cannot show whole is drawn.
#[derive(Clone, Copy, PartialEq)]
enum Fit {
    /// A question: not at all (a notice instead), as it must not be answered unread.
    Whole,
    /// A result: cut to the screen.
    Cut,
}

/// A small box with a question or a result, as tall as its text wrapped; false (and a notice
/// instead) when a question does not fit.
fn dialog(
    f: &mut Frame,
    title: &str,
    text: &str,
    footer: Line<'static>,
    fit: Fit,
    error: bool,
) -> bool {
    let area = f.area();
    let w = (text.chars().count() as u16 + 4)
        .clamp(36, 64)
        .min(area.width);
    // Borders and margins take 4 columns; borders, a blank line and the footer 4 rows.
    let paragraph = Paragraph::new(text.to_string()).wrap(Wrap { trim: false });
    let lines = paragraph.line_count(w.saturating_sub(4));
    let h = lines.saturating_add(4).min(u16::MAX as usize) as u16;
    if fit == Fit::Whole && (h > area.height || w < DIALOG_MIN_WIDTH) {
        too_small(f, area);
        return false;
    }
    let r = centered(area, w, h);
    f.render_widget(Clear, r);
    let style = if error {
        theme::error()
    } else {
        theme::title()
    };
    let b = Block::default()
        .borders(Borders::ALL)
        .border_type(BorderType::Double)
        .border_style(style)
        .title(Span::styled(format!(" {title} "), style));
    let inside = b.inner(r);
    f.render_widget(b, r);
    let [msg, _, foot] = Layout::vertical([
        Constraint::Min(1),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .horizontal_margin(1)
    .areas(inside);
    f.render_widget(paragraph, msg);
    f.render_widget(footer.alignment(Alignment::Center), foot);
    true
}

/// The key list, in two columns.
fn help(f: &mut Frame, area: Rect) {
    let r = centered(area, 78, 21);
    f.render_widget(Clear, r);
    let b = block(" Keys ".into()).title_bottom(Line::styled(" Esc or ? closes ", theme::dim()));
    let inside = b.inner(r);
    f.render_widget(b, r);
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(inside);
    let column = |sections: &[(&str, &[(&str, &str)])]| {
        let mut lines = Vec::new();
        for (i, (section, keys)) in sections.iter().enumerate() {
            if i > 0 {
                lines.push(Line::raw(""));
            }
            lines.push(Line::styled(format!(" {section}"), theme::header()));
            for (k, what) in keys.iter() {
                lines.push(Line::from(vec![
                    Span::styled(format!(" {k:<16}"), theme::key()),
                    Span::raw(what.to_string()),
                ]));
            }
        }
        Text::from(lines)
    };
    let split = HELP_LEFT.min(HELP.len());
    f.render_widget(Paragraph::new(column(&HELP[..split])), left);
    f.render_widget(Paragraph::new(column(&HELP[split..])), right);
}
