//! A small multi-line text area for editing JSON: cursor movement, insertion with automatic
//! indentation, deletion, emacs-style line kills and pasting. Pure state; drawn by
//! [`crate::panes::editor`].

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

/// Lines of text and a cursor (row, column in characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextArea {
    lines: Vec<String>,
    row: usize,
    col: usize,
}

impl Default for TextArea {
    fn default() -> Self {
        TextArea::new("")
    }
}

/// Byte offset of character `col` in `s` (the end when past it).
fn byte_at(s: &str, col: usize) -> usize {
    s.char_indices().nth(col).map_or(s.len(), |(i, _)| i)
}

fn char_len(s: &str) -> usize {
    s.chars().count()
}

impl TextArea {
    /// Text with the cursor at its start.
    pub fn new(text: &str) -> TextArea {
        let mut lines: Vec<String> = text.split('\n').map(|l| l.replace('\r', "")).collect();
        if lines.is_empty() {
            lines.push(String::new());
        }
        TextArea {
            lines,
            row: 0,
            col: 0,
        }
    }

    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// (row, column), both from 0.
    pub fn cursor(&self) -> (usize, usize) {
        (self.row, self.col)
    }

    /// Moves the cursor, clamped to the text.
    pub fn set_cursor(&mut self, row: usize, col: usize) {
        self.row = row.min(self.lines.len() - 1);
        self.col = col.min(char_len(&self.lines[self.row]));
    }

    fn line(&self) -> &String {
        &self.lines[self.row]
    }

    fn clamp_col(&mut self) {
        self.col = self.col.min(char_len(self.line()));
    }

    pub fn insert_char(&mut self, c: char) {
        match c {
            '\n' => self.newline(),
            '\r' => {}
            '\t' => self.insert_str("  "),
            c => {
                let at = byte_at(self.line(), self.col);
                self.lines[self.row].insert(at, c);
                self.col += 1;
            }
        }
    }

    /// Inserts text as typed or pasted (no automatic indentation inside a paste).
    pub fn insert_str(&mut self, s: &str) {
        let s = s.replace("\r\n", "\n").replace('\r', "\n");
        let mut parts = s.split('\n');
        let first = parts.next().unwrap_or("");
        let at = byte_at(self.line(), self.col);
        let tail = self.lines[self.row].split_off(at);
        self.lines[self.row].push_str(first);
        self.col += char_len(first);
        for part in parts {
            self.row += 1;
            self.lines.insert(self.row, part.to_string());
            self.col = char_len(part);
        }
        self.lines[self.row].push_str(&tail);
    }

    /// Splits the line; the new line gets the indentation of this one, two spaces more after an
    /// opening bracket, and a closing bracket right after the cursor goes on a line of its own.
    pub fn newline(&mut self) {
        let line = self.line().clone();
        let at = byte_at(&line, self.col);
        let indent: String = line.chars().take_while(|c| *c == ' ').collect();
        let before = line[..at].trim_end();
        let after = line[at..].trim_start();
        let opens = before.ends_with('{') || before.ends_with('[');
        let closes = after.starts_with('}') || after.starts_with(']');
        self.lines[self.row] = line[..at].to_string();
        let inner = if opens {
            format!("{indent}  ")
        } else {
            indent.clone()
        };
        if opens && closes {
            self.lines.insert(self.row + 1, inner.clone());
            self.lines.insert(self.row + 2, format!("{indent}{after}"));
        } else {
            self.lines.insert(self.row + 1, format!("{inner}{after}"));
        }
        self.row += 1;
        self.col = char_len(&inner);
    }

    pub fn backspace(&mut self) {
        if self.col > 0 {
            let at = byte_at(self.line(), self.col - 1);
            self.lines[self.row].remove(at);
            self.col -= 1;
        } else if self.row > 0 {
            let line = self.lines.remove(self.row);
            self.row -= 1;
            self.col = char_len(self.line());
            self.lines[self.row].push_str(&line);
        }
    }

    pub fn delete(&mut self) {
        if self.col < char_len(self.line()) {
            let at = byte_at(self.line(), self.col);
            self.lines[self.row].remove(at);
        } else if self.row + 1 < self.lines.len() {
            let next = self.lines.remove(self.row + 1);
            self.lines[self.row].push_str(&next);
        }
    }

    /// Ctrl-K: deletes to the end of the line, or joins the next line when already there.
    pub fn kill_to_end(&mut self) {
        if self.col < char_len(self.line()) {
            let at = byte_at(self.line(), self.col);
            self.lines[self.row].truncate(at);
        } else {
            self.delete();
        }
    }

    /// Ctrl-U: deletes from the start of the line to the cursor.
    pub fn kill_to_start(&mut self) {
        let at = byte_at(self.line(), self.col);
        self.lines[self.row].replace_range(..at, "");
        self.col = 0;
    }

    pub fn left(&mut self) {
        if self.col > 0 {
            self.col -= 1;
        } else if self.row > 0 {
            self.row -= 1;
            self.col = char_len(self.line());
        }
    }

    pub fn right(&mut self) {
        if self.col < char_len(self.line()) {
            self.col += 1;
        } else if self.row + 1 < self.lines.len() {
            self.row += 1;
            self.col = 0;
        }
    }

    pub fn up(&mut self, n: usize) {
        self.row = self.row.saturating_sub(n);
        self.clamp_col();
    }

    pub fn down(&mut self, n: usize) {
        self.row = (self.row + n).min(self.lines.len() - 1);
        self.clamp_col();
    }

    pub fn home(&mut self) {
        self.col = 0;
    }

    pub fn end(&mut self) {
        self.col = char_len(self.line());
    }

    /// A key, as the text area understands it; false when it means nothing here.
    pub fn on_key(&mut self, key: KeyEvent) -> bool {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        match key.code {
            KeyCode::Char('a') if ctrl => self.home(),
            KeyCode::Char('e') if ctrl => self.end(),
            KeyCode::Char('k') if ctrl => self.kill_to_end(),
            KeyCode::Char('u') if ctrl => self.kill_to_start(),
            KeyCode::Char('d') if ctrl => self.delete(),
            KeyCode::Char('h') if ctrl => self.backspace(),
            KeyCode::Char(_) if ctrl || key.modifiers.contains(KeyModifiers::ALT) => return false,
            KeyCode::Char(c) => self.insert_char(c),
            KeyCode::Enter => self.newline(),
            KeyCode::Backspace => self.backspace(),
            KeyCode::Delete => self.delete(),
            KeyCode::Left => self.left(),
            KeyCode::Right => self.right(),
            KeyCode::Up => self.up(1),
            KeyCode::Down => self.down(1),
            KeyCode::PageUp => self.up(10),
            KeyCode::PageDown => self.down(10),
            KeyCode::Home if ctrl => self.set_cursor(0, 0),
            KeyCode::End if ctrl => self.set_cursor(usize::MAX, usize::MAX),
            KeyCode::Home => self.home(),
            KeyCode::End => self.end(),
            KeyCode::Tab => self.insert_str("  "),
            _ => return false,
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn ctrl(c: char) -> KeyEvent {
        KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL)
    }

    fn typed(t: &mut TextArea, s: &str) {
        for c in s.chars() {
            t.on_key(key(KeyCode::Char(c)));
        }
    }

    #[test]
    fn typing_and_deleting() {
        let mut t = TextArea::new("");
        typed(&mut t, "héllo");
        assert_eq!((t.text().as_str(), t.cursor()), ("héllo", (0, 5)));
        t.on_key(key(KeyCode::Left));
        t.on_key(key(KeyCode::Left));
        t.on_key(key(KeyCode::Backspace));
        assert_eq!(t.text(), "hélo");
        t.on_key(key(KeyCode::Delete));
        assert_eq!((t.text().as_str(), t.cursor()), ("héo", (0, 2)));
        t.on_key(key(KeyCode::Home));
        t.on_key(key(KeyCode::Backspace));
        assert_eq!(t.text(), "héo");
    }

    #[test]
    fn enter_indents_and_splits_brackets() {
        let mut t = TextArea::new("{}");
        t.set_cursor(0, 1);
        t.on_key(key(KeyCode::Enter));
        assert_eq!(t.text(), "{\n  \n}");
        assert_eq!(t.cursor(), (1, 2));
        typed(&mut t, "\"a\": 1,");
        t.on_key(key(KeyCode::Enter));
        typed(&mut t, "\"b\": 2");
        assert_eq!(t.text(), "{\n  \"a\": 1,\n  \"b\": 2\n}");
    }

    #[test]
    fn lines_join_and_split() {
        let mut t = TextArea::new("ab\ncd");
        t.set_cursor(1, 0);
        t.on_key(key(KeyCode::Backspace));
        assert_eq!((t.text().as_str(), t.cursor()), ("abcd", (0, 2)));
        t.on_key(key(KeyCode::Enter));
        assert_eq!(t.text(), "ab\ncd");
        t.on_key(key(KeyCode::Up));
        t.on_key(key(KeyCode::End));
        t.on_key(key(KeyCode::Delete));
        assert_eq!(t.text(), "abcd");
        t.on_key(key(KeyCode::Right));
        t.on_key(key(KeyCode::Right));
        t.on_key(key(KeyCode::Right));
        assert_eq!(t.cursor(), (0, 4));
    }

    #[test]
    fn kills_empty_the_text() {
        let mut t = TextArea::new("{\n  \"uri\": \"/\"\n}");
        for _ in 0..6 {
            t.on_key(ctrl('k'));
        }
        assert_eq!(t.text(), "");
        t.insert_str("x\r\ny");
        assert_eq!((t.text().as_str(), t.cursor()), ("x\ny", (1, 1)));
        t.on_key(ctrl('u'));
        assert_eq!(t.text(), "x\n");
        assert!(
            !t.on_key(ctrl('s')),
            "Ctrl-S is the editor's, not the text's"
        );
    }

    #[test]
    fn paste_keeps_what_follows_the_cursor() {
        let mut t = TextArea::new("[]");
        t.set_cursor(0, 1);
        t.insert_str("1,\n2");
        assert_eq!((t.text().as_str(), t.cursor()), ("[1,\n2]", (1, 1)));
        t.on_key(KeyEvent::new(KeyCode::End, KeyModifiers::CONTROL));
        assert_eq!(t.cursor(), (1, 2));
        t.on_key(KeyEvent::new(KeyCode::Home, KeyModifiers::CONTROL));
        assert_eq!(t.cursor(), (0, 0));
    }
}
