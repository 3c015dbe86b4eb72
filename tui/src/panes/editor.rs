//! The route editor, drawn over the screen (between the tab bar and the status bar): the id, the JSON with line numbers, the Admin
//! API's error under it, and the keys.

use crate::app::{Focus, RouteEditor};
use crate::editor::TextArea;
use crate::theme;
use ratatui::layout::{Constraint, Layout, Position, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, BorderType, Borders, Clear, Paragraph, Wrap};
use ratatui::Frame;

/// The smallest area the editor is drawn in: its borders, the id, a line of text in its box
/// and the keys, with room for the id.
pub const MIN_SIZE: (u16, u16) = (30, 7);

/// Draws the editor; false (and a notice instead) when `area` is smaller than [`MIN_SIZE`], as
/// keys must not edit or save text that cannot be seen.
pub fn draw(f: &mut Frame, area: Rect, ed: &RouteEditor) -> bool {
    if area.width < MIN_SIZE.0 || area.height < MIN_SIZE.1 {
        crate::render::too_small(f, area);
        return false;
    }
    let r = area;
    f.render_widget(Clear, r);
    let title = if ed.new {
        " New route ".to_string()
    } else {
        format!(" Edit route {} ", ed.id_text())
    };
    let b = Block::default()
        .borders(Borders::ALL)
        .border_type(BorderType::Double)
        .border_style(theme::title())
        .title(Span::styled(title, theme::title()));
    let inside = b.inner(r);
    f.render_widget(b, r);

    // The error, wrapped, takes what it needs up to a third of the height.
    let error_text = ed.error.as_ref().map(|e| {
        Paragraph::new(e.clone())
            .style(theme::error())
            .wrap(Wrap { trim: false })
    });
    let error_height = error_text.as_ref().map_or(0, |p| {
        let lines = p
            .line_count(inside.width.saturating_sub(2))
            .min(u16::MAX as usize) as u16;
        lines.saturating_add(2).min(inside.height / 3).max(3)
    });
    let [id_area, body_area, error_area, keys_area] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(error_height),
        Constraint::Length(1),
    ])
    .areas(inside);

    // id
    let id_style = if ed.focus == Focus::Id {
        theme::selected()
    } else {
        ratatui::style::Style::new()
    };
    let mut id_line = vec![Span::styled(" id: ", theme::header())];
    // A long id is cut with `…`, so that it does not read as another.
    let id = super::clip(ed.id.text(), id_area.width.saturating_sub(7));
    if ed.new {
        id_line.push(Span::styled(format!(" {id} "), id_style));
    } else {
        id_line.push(Span::raw(id));
        id_line.push(Span::styled("  (PUT replaces the route)", theme::dim()));
    }
    f.render_widget(Line::from(id_line), id_area);
    if ed.focus == Focus::Id && !ed.saving {
        let x = id_area.x + 6 + ed.id.cursor().1 as u16;
        f.set_cursor_position(Position::new(
            x.min(id_area.right().saturating_sub(1)),
            id_area.y,
        ));
    }

    // JSON
    let body_block = Block::default()
        .borders(Borders::ALL)
        .border_style(if ed.focus == Focus::Body {
            theme::key()
        } else {
            theme::dim()
        })
        .title(" JSON ");
    let text_area = body_block.inner(body_area);
    f.render_widget(body_block, body_area);
    if let Some(cursor) = text(f, text_area, &ed.body) {
        if ed.focus == Focus::Body && !ed.saving {
            f.set_cursor_position(cursor);
        }
    }

    // The Admin API's answer
    if let Some(p) = error_text {
        let b = Block::default()
            .borders(Borders::ALL)
            .border_style(theme::error())
            .title(Span::styled(" not saved ", theme::error()));
        f.render_widget(p.block(b), error_area);
    }

    // keys
    let mut keys = if ed.saving {
        vec![Span::styled(" saving…", theme::warn())]
    } else {
        vec![
            Span::styled(" Ctrl-S", theme::key()),
            Span::raw(" save  "),
            Span::styled("Esc", theme::key()),
            Span::raw(" cancel  "),
        ]
    };
    if ed.new && !ed.saving {
        keys.push(Span::styled("Tab", theme::key()));
        keys.push(Span::raw(" id/JSON  "));
    }
    let (row, col) = ed.body.cursor();
    keys.push(Span::styled(
        format!(" {}:{}", row + 1, col + 1),
        theme::dim(),
    ));
    f.render_widget(Line::from(keys), keys_area);
    true
}

/// Draws the text with line numbers, scrolled so the cursor is in view; returns where the
/// cursor is on screen.
fn text(f: &mut Frame, area: Rect, t: &TextArea) -> Option<Position> {
    if area.width < 4 || area.height == 0 {
        return None;
    }
    let lines = t.lines();
    let (row, col) = t.cursor();
    let gutter = lines.len().to_string().len() + 1;
    let width = (area.width as usize).saturating_sub(gutter + 1).max(1);
    let height = area.height as usize;
    let top = (row + 1).saturating_sub(height);
    let left = (col + 1).saturating_sub(width);
    let shown: Vec<Line> = lines
        .iter()
        .enumerate()
        .skip(top)
        .take(height)
        .map(|(i, l)| {
            Line::from(vec![
                Span::styled(format!("{:>w$} ", i + 1, w = gutter), theme::dim()),
                Span::raw(l.chars().skip(left).take(width).collect::<String>()),
            ])
        })
        .collect();
    f.render_widget(Paragraph::new(shown), area);
    Some(Position::new(
        area.x + (gutter + 1 + col - left) as u16,
        area.y + (row - top) as u16,
    ))
}
