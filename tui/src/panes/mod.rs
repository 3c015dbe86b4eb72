//! One module per screen, plus the route editor drawn over them, and the table layout they
//! share.

pub mod certs;
pub mod editor;
pub mod log;
pub mod plugins;
pub mod routes;
pub mod services;
pub mod upstreams;
pub mod workers;

use crate::theme;
use ratatui::layout::Constraint;
use ratatui::style::Style;
use ratatui::text::Span;
use ratatui::widgets::{Cell, Row, Table, TableState};

/// A table state showing `selected` (ratatui scrolls the rows to keep it in view).
pub fn table_state(selected: Option<usize>) -> TableState {
    TableState::default().with_selected(selected)
}

/// Draws a screen's list, `selected` highlighted, and keeps the rows it shows as the page
/// PageUp/PageDown move by (inside its border, below its header).
pub fn draw_list(
    f: &mut ratatui::Frame,
    area: ratatui::layout::Rect,
    app: &crate::app::App,
    table: Table<'static>,
    selected: Option<usize>,
) {
    app.page.set(area.height.saturating_sub(3) as usize);
    f.render_stateful_widget(table, area, &mut table_state(selected));
}

/// One row's cells: text and style.
pub type Cells = Vec<(String, Style)>;

/// An upstream's healthy nodes of all its nodes (`up/all`), when it has health checks: green
/// when all are up, yellow while some are down, red when none is left; `-` without checks.
pub fn health_cell(counts: Option<(usize, usize)>) -> (String, Style) {
    match counts {
        None => ("-".into(), Style::new()),
        Some((up, all)) if up == all => (format!("{up}/{all}"), crate::theme::ok()),
        Some((0, all)) => (format!("0/{all}"), crate::theme::error()),
        Some((up, all)) => (format!("{up}/{all}"), crate::theme::warn()),
    }
}

/// Narrowest a column is squeezed to.
const MIN_COLUMN: u16 = 4;

pub fn text_width(s: &str) -> u16 {
    Span::raw(s).width().min(u16::MAX as usize) as u16
}

/// Column widths: each column as wide as its widest cell when they all fit in `width`;
/// otherwise the widest columns (the rightmost of equals) give up space first, none below
/// [`MIN_COLUMN`] (or its natural width when smaller). Columns that still do not fit are left
/// out from the right (fewer widths are returned): the table would otherwise cut them itself,
/// without the `…` that says a value is cut.
pub fn fit(natural: &[u16], width: u16, spacing: u16) -> Vec<u16> {
    let mut w = natural.to_vec();
    while !w.is_empty() {
        let gaps = spacing.saturating_mul(w.len().saturating_sub(1) as u16);
        let available = width.saturating_sub(gaps) as u32;
        shrink(&mut w, available);
        if w.iter().map(|&x| x as u32).sum::<u32>() <= available {
            break;
        }
        if let [only] = w.as_mut_slice() {
            // One column, narrower than MIN_COLUMN: cut to what there is.
            *only = available as u16;
            break;
        }
        // One column less, the others at their natural widths again.
        w = natural[..w.len() - 1].to_vec();
    }
    w
}

/// Narrows the widest of `w` until they fit in `available` or are all at [`MIN_COLUMN`].
fn shrink(w: &mut [u16], available: u32) {
    while w.iter().map(|&x| x as u32).sum::<u32>() > available {
        let Some((i, &widest)) = w.iter().enumerate().max_by_key(|(i, x)| (**x, *i)) else {
            return;
        };
        if widest <= MIN_COLUMN {
            return;
        }
        w[i] -= 1;
    }
}

/// `s` cut to `width` columns, its last one a `…` when it does not fit: a cut id or address
/// must not read as another, whole one.
pub fn clip(s: String, width: u16) -> String {
    if text_width(&s) <= width {
        return s;
    }
    let mut out = String::new();
    let mut used = 0;
    let mut buf = [0u8; 4];
    for c in s.chars() {
        let w = text_width(c.encode_utf8(&mut buf));
        if used + w + 1 > width {
            break;
        }
        used += w;
        out.push(c);
    }
    out.push('…');
    out
}

/// The widest cell of each column, the header's included.
pub fn natural_widths<'a>(
    header: &[String],
    rows: impl IntoIterator<Item = &'a Cells>,
) -> Vec<u16> {
    let mut natural: Vec<u16> = header.iter().map(|h| text_width(h)).collect();
    for r in rows {
        for (n, (s, _)) in natural.iter_mut().zip(r) {
            *n = (*n).max(text_width(s));
        }
    }
    natural
}

/// A table whose columns are sized by [`fit`] for `inner_width` columns.
pub fn grid(header: Vec<String>, rows: Vec<Cells>, inner_width: u16) -> Table<'static> {
    let natural = natural_widths(&header, &rows);
    grid_sized(header, rows, &natural, inner_width)
}

/// [`grid`] with the columns' natural widths given (measured over more rows than are drawn).
pub fn grid_sized(
    header: Vec<String>,
    rows: Vec<Cells>,
    natural: &[u16],
    inner_width: u16,
) -> Table<'static> {
    let fitted = fit(natural, inner_width, 1);
    let cut = |cells: Vec<(String, Style)>| -> Row<'static> {
        Row::new(
            cells
                .into_iter()
                .zip(&fitted)
                .map(|((s, st), &width)| Cell::from(clip(s, width)).style(st)),
        )
    };
    let rows: Vec<Row> = rows.into_iter().map(cut).collect();
    let header: Cells = header.into_iter().map(|h| (h, theme::header())).collect();
    let widths: Vec<Constraint> = fitted.iter().copied().map(Constraint::Length).collect();
    Table::new(rows, widths)
        .header(cut(header))
        .column_spacing(1)
        .row_highlight_style(theme::selected())
}

/// The first row to show of `len` rows, `height` at a time, so that `selected` is in view,
/// moving as little as possible from `offset` (the last drawing's).
pub fn scroll_offset(offset: usize, selected: usize, height: usize, len: usize) -> usize {
    let height = height.max(1);
    let offset = offset.min(selected).min(len.saturating_sub(height));
    if selected >= offset + height {
        selected + 1 - height
    } else {
        offset
    }
}

#[cfg(test)]
mod tests {
    use super::fit;

    #[test]
    fn cut_text_ends_with_an_ellipsis() {
        use super::clip;
        assert_eq!(clip("127.0.0.1:8080".into(), 20), "127.0.0.1:8080");
        assert_eq!(clip("127.0.0.1:8080".into(), 14), "127.0.0.1:8080");
        assert_eq!(clip("127.0.0.1:8080".into(), 10), "127.0.0.1…");
        assert_eq!(clip("long-route-id".into(), 1), "…");
    }

    #[test]
    fn widest_columns_shrink_first() {
        assert_eq!(fit(&[3, 10, 20], 40, 1), [3, 10, 20]);
        assert_eq!(fit(&[3, 10, 20], 30, 1), [3, 10, 15]);
        assert_eq!(fit(&[3, 10, 20], 20, 1), [3, 8, 7]);
        assert_eq!(fit(&[3, 10, 20], 13, 1), [3, 4, 4]);
    }

    #[test]
    fn columns_that_cannot_fit_are_left_out() {
        assert_eq!(fit(&[3, 10, 20], 12, 1), [3, 8]);
        assert_eq!(fit(&[3, 10, 20], 5, 1), [3]);
        assert_eq!(fit(&[6, 10], 3, 1), [3]);
    }

    #[test]
    fn the_offset_keeps_the_selection_in_view() {
        use super::scroll_offset;
        assert_eq!(scroll_offset(0, 3, 10, 100), 0);
        assert_eq!(scroll_offset(0, 12, 10, 100), 3, "down past the end");
        assert_eq!(scroll_offset(3, 8, 10, 100), 3, "stays while in view");
        assert_eq!(scroll_offset(3, 1, 10, 100), 1, "up past the top");
        assert_eq!(scroll_offset(95, 15, 10, 20), 10, "the list got shorter");
    }
}
