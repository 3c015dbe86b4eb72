//! One module per screen, plus the route editor drawn over them, and the table layout they
//! share.

pub mod editor;
pub mod log;
pub mod plugins;
pub mod routes;
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

/// One row's cells: text and style.
pub type Cells = Vec<(String, Style)>;

/// Narrowest a column is squeezed to.
const MIN_COLUMN: u16 = 4;

fn text_width(s: &str) -> u16 {
    Span::raw(s).width().min(u16::MAX as usize) as u16
}

/// Column widths: each column as wide as its widest cell when they all fit in `width`;
/// otherwise the widest columns (the rightmost of equals) give up space first, none below [`MIN_COLUMN`] (or its natural
/// width when smaller).
pub fn fit(natural: &[u16], width: u16, spacing: u16) -> Vec<u16> {
    let gaps = spacing.saturating_mul(natural.len().saturating_sub(1) as u16);
    let available = width.saturating_sub(gaps) as u32;
    let mut w = natural.to_vec();
    while w.iter().map(|&x| x as u32).sum::<u32>() > available {
        let Some((i, &widest)) = w.iter().enumerate().max_by_key(|(i, x)| (**x, *i)) else {
            break;
        };
        if widest <= MIN_COLUMN {
            break;
        }
        w[i] -= 1;
    }
    w
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

/// A table whose columns are sized by [`fit`] for `inner_width` columns.
pub fn grid(header: Vec<String>, rows: Vec<Cells>, inner_width: u16) -> Table<'static> {
    let mut natural: Vec<u16> = header.iter().map(|h| text_width(h)).collect();
    for r in &rows {
        for (i, (s, _)) in r.iter().enumerate() {
            if let Some(n) = natural.get_mut(i) {
                *n = (*n).max(text_width(s));
            }
        }
    }
    let fitted = fit(&natural, inner_width, 1);
    let rows: Vec<Row> = rows
        .into_iter()
        .map(|r| {
            let cells = r.into_iter().enumerate().map(|(i, (s, st))| {
                let width = fitted.get(i).copied().unwrap_or(u16::MAX);
                Cell::from(clip(s, width)).style(st)
            });
            Row::new(cells)
        })
        .collect();
    let widths: Vec<Constraint> = fitted.iter().copied().map(Constraint::Length).collect();
    Table::new(rows, widths)
        .header(Row::new(
            header
                .into_iter()
                .map(|h| Cell::from(h).style(theme::header())),
        ))
        .column_spacing(1)
        .row_highlight_style(theme::selected())
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
        assert_eq!(fit(&[3, 10, 20], 5, 1), [3, 4, 4]);
    }
}
