//! Screen 4: the tail of the error log, scrollable.

use crate::app::App;
use crate::render::{block, feed_problem};
use crate::theme;
use ratatui::layout::Rect;
use ratatui::text::Line;
use ratatui::widgets::Paragraph;
use ratatui::Frame;

pub fn draw(f: &mut Frame, area: Rect, app: &App) {
    let lines = app.log_lines();
    let height = area.height.saturating_sub(2) as usize;
    app.log_view.set(height);
    app.page.set(height);
    // The window ends `log_scroll` lines before the end, and starts at the first line at the
    // furthest (the pane may have grown since the scroll).
    let scroll = app.log_scroll.min(app.log_scroll_max());
    let end = lines.len().saturating_sub(scroll);
    let start = end.saturating_sub(height);
    let path = app
        .log
        .data
        .as_ref()
        .and_then(|l| l.path.clone())
        .unwrap_or_else(|| "error log".into());
    let position = if scroll == 0 {
        "following".to_string()
    } else {
        format!("{}-{} of {}", start + 1, end, lines.len())
    };
    // Scrolled sideways: said, as the lines' starts are hidden.
    let position = match app.log_hscroll {
        0 => position,
        n => format!("{position}, from column {}", n + 1),
    };
    let mut b = block(format!(" Log — {path} ({position}) "));
    if let Some(p) = feed_problem("log", &app.log) {
        b = b.title_bottom(p);
    }
    let text: Vec<Line> = lines[start..end]
        .iter()
        .map(|l| Line::styled(l.clone(), theme::log_line(l)))
        .collect();
    f.render_widget(
        Paragraph::new(text).block(b).scroll((0, app.log_hscroll)),
        area,
    );
}
