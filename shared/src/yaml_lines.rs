//! Where a value sits in a YAML text, by its path: the line numbers of config.yaml errors
//! found after parsing (duplicates, ranges, cross-field rules), which the parser's own
//! positions do not cover.
//!
//! A walk over the text's lines by indentation, for the YAML people write by hand: block
//! mappings and sequences (indented or not under their key), with flow mappings and sequences
//! (`{ip: 127.0.0.1, port: 9080}`, `[9080]`) on one line. Anything it cannot follow ends the
//! walk at the deepest line it found, which is still the right neighbourhood.

/// One step of a path: a mapping key, or the n-th item (0-based) of a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step<'a> {
    Key(&'a str),
    Item(usize),
}

/// A line of the text that holds something: its number (1-based), indentation and content
/// without comment.
struct Line<'t> {
    number: usize,
    indent: usize,
    code: &'t str,
}

/// The 1-based line of `path` in `text`: that of the last step found (0 when not even the
/// first was).
pub fn line_of(text: &str, path: &[Step]) -> usize {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<Line> = text
        .lines()
        .enumerate()
        .filter_map(|(i, l)| {
            let code = without_comment(l);
            let trimmed = code.trim_start();
            (!trimmed.is_empty() && trimmed != "---").then(|| Line {
                number: i + 1,
                indent: code.len() - trimmed.len(),
                code: trimmed.trim_end(),
            })
        })
        .collect();
    // The block being searched: lines[from..to], the column of its keys when the line that
    // opened it says (an item's `- key: …`), and what is left of that line (an item's first
    // key, a key's inline value).
    let (mut from, mut to) = (0, lines.len());
    let mut column: Option<usize> = None;
    let mut inline: Option<(usize, &str)> = None;
    let mut found = 0;
    for step in path {
        match *step {
            Step::Key(key) => {
                if let Some((number, rest)) = inline {
                    if let Some(after) = key_in(rest, key) {
                        found = number;
                        inline = Some((number, after));
                        // Inside a flow mapping, or `- key: value` whose block follows.
                        if rest.starts_with('{') {
                            from = to;
                        }
                        continue;
                    }
                    if rest.starts_with(['{', '[', '|', '>']) {
                        return found;
                    }
                }
                // After an item whose first key opens a block scalar (`- vm_config: |`), the
                // block begins with the scalar's text.
                let skip = inline.is_some_and(|(_, rest)| opens_scalar(rest));
                let block = &lines[from..to];
                let Some(at) = block_key(block, key, column, skip).map(|i| from + i) else {
                    return found;
                };
                found = lines[at].number;
                let after = key_in(lines[at].code, key).unwrap_or("");
                inline = (!after.is_empty()).then_some((found, after));
                column = None;
                (from, to) = (at + 1, block_end(&lines, at));
            }
            Step::Item(n) => {
                if let Some((_, rest)) = inline {
                    if rest.starts_with('[') {
                        return found;
                    }
                }
                let Some(at) = block_items(&lines[from..to]).nth(n).map(|i| from + i) else {
                    return found;
                };
                found = lines[at].number;
                let after_dash = &lines[at].code[1..];
                let rest = after_dash.trim_start();
                inline = (!rest.is_empty()).then_some((found, rest));
                // The item's keys stand where its first one does.
                column = (!rest.is_empty())
                    .then(|| lines[at].indent + 1 + after_dash.len() - rest.len());
                (from, to) = (at + 1, block_end(&lines, at));
            }
        }
    }
    found
}

/// The line up to its comment: `#` at the start or after a blank, outside quotes.
fn without_comment(line: &str) -> &str {
    let mut quote = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '#' && prev.is_whitespace() => return &line[..i],
            None => {}
        }
        prev = c;
    }
    line
}

/// What follows `key:` in `code` when `key` is written there as a mapping key (at its start,
/// or after `{` or `,` in a flow mapping; quoted or not), trimmed.
fn key_in<'c>(code: &'c str, key: &str) -> Option<&'c str> {
    let mut from = 0;
    while let Some(i) = code[from..].find(key) {
        let at = from + i;
        from = at + key.len();
        let before = code[..at].trim_end();
        let quoted = before.ends_with(['"', '\'']);
        let before = before.trim_end_matches(['"', '\'']).trim_end();
        if !(before.is_empty() || before.ends_with(['{', ','])) {
            continue;
        }
        let mut after = &code[from..];
        if quoted {
            after = after.strip_prefix(['"', '\'']).unwrap_or(after);
        }
        if let Some(value) = after.trim_start().strip_prefix(':') {
            if value.is_empty() || value.starts_with(char::is_whitespace) {
                return Some(value.trim());
            }
        }
    }
    None
}

/// The index of the line of `block` that holds `key` at the block's keys' column (`column`,
/// or the first line's), past the text of block scalars (`key: |`); `skip`: the block begins
/// with such a text.
fn block_key(block: &[Line], key: &str, column: Option<usize>, skip: bool) -> Option<usize> {
    let indent = column.unwrap_or(block.first()?.indent);
    let mut in_scalar = skip;
    for (i, l) in block.iter().enumerate() {
        if in_scalar && l.indent > indent {
            continue;
        }
        in_scalar = false;
        if l.indent == indent {
            if key_in(l.code, key).is_some() {
                return Some(i);
            }
            in_scalar = opens_scalar(l.code);
        }
    }
    None
}

/// Whether the value on this line opens a block scalar (`|`, `>`, with their modifiers).
fn opens_scalar(code: &str) -> bool {
    code.split_once(':')
        .is_some_and(|(_, value)| value.trim_start().starts_with(['|', '>']))
}

/// The indexes of the lines of `block` that start its sequence's items.
fn block_items<'b>(block: &'b [Line]) -> impl Iterator<Item = usize> + 'b {
    let indent = block.first().map_or(0, |l| l.indent);
    block
        .iter()
        .enumerate()
        .filter(move |(_, l)| l.indent == indent && (l.code == "-" || l.code.starts_with("- ")))
        .map(|(i, _)| i)
}

/// Where the block opened by `lines[at]` ends: at the first later line indented no deeper —
/// except the items of a sequence written at its key's own indentation.
fn block_end(lines: &[Line], at: usize) -> usize {
    let (indent, opener_is_item) = (lines[at].indent, lines[at].code.starts_with('-'));
    lines[at + 1..]
        .iter()
        .position(|l| {
            let item = l.code == "-" || l.code.starts_with("- ");
            l.indent < indent || (l.indent == indent && (opener_is_item || !item))
        })
        .map_or(lines.len(), |i| at + 1 + i)
}

#[cfg(test)]
mod tests {
    use super::{line_of, Step::*};

    const YAML: &str = "\
# a comment naming node_listen: and name: echo
apisix:
  node_listen:            # the proxy's ports
    - 9080
    - {ip: 127.0.0.1, port: 9081}
deployment:
  admin:
    admin_key:
    - name: admin
      key: a
    - {name: viewer, key: v, role: viewer}
  etcd:
    prefix: /apisix
    timeout: 30
wasm:
  plugins:
    - name: echo          # name: other
      file: echo.wasm
      callback_timeout: 100ms
    - {name: echo_two, priority: 1, file: echo.wasm, pause_timeout: 0s}
";

    #[test]
    fn keys_items_and_flow_mappings_are_found() {
        assert_eq!(line_of(YAML, &[Key("apisix"), Key("node_listen")]), 3);
        assert_eq!(
            line_of(YAML, &[Key("apisix"), Key("node_listen"), Item(1)]),
            5
        );
        let key = |n| {
            [
                Key("deployment"),
                Key("admin"),
                Key("admin_key"),
                Item(n),
                Key("name"),
            ]
        };
        assert_eq!(line_of(YAML, &key(0)), 9);
        assert_eq!(line_of(YAML, &key(1)), 11);
        assert_eq!(
            line_of(YAML, &[Key("deployment"), Key("etcd"), Key("timeout")]),
            14
        );
        let plugin = |n, k| [Key("wasm"), Key("plugins"), Item(n), Key(k)];
        assert_eq!(line_of(YAML, &plugin(0, "name")), 17);
        assert_eq!(line_of(YAML, &plugin(0, "callback_timeout")), 19);
        assert_eq!(line_of(YAML, &plugin(1, "pause_timeout")), 20);
    }

    #[test]
    fn what_is_missing_ends_the_walk_where_it_was() {
        assert_eq!(line_of(YAML, &[Key("nginx_config"), Key("http")]), 0);
        assert_eq!(
            line_of(YAML, &[Key("deployment"), Key("etcd"), Key("host")]),
            12
        );
        let plugin = |n, k| [Key("wasm"), Key("plugins"), Item(n), Key(k)];
        // A key of another item is not this item's.
        assert_eq!(line_of(YAML, &plugin(1, "callback_timeout")), 20);
        assert_eq!(line_of(YAML, &plugin(5, "name")), 16);
        // A longer key holding the name is another key.
        assert_eq!(
            line_of("plugin_shm_size: 1\nshm_size: 2\n", &[Key("shm_size")]),
            2
        );
    }

    #[test]
    fn block_scalars_and_a_byte_order_mark_are_stepped_over() {
        let y = "\u{feff}wasm:\n  plugins:\n  - vm_config: |\n      pause_timeout: 5s\n      {\"name\": \"a\"}\n    name: a\n    pause_timeout: 0s\n  - name: b\n    vm_config: >\n      name: c\n    root_id: x\n";
        let plugin = |n, k| [Key("wasm"), Key("plugins"), Item(n), Key(k)];
        assert_eq!(line_of(y, &plugin(0, "pause_timeout")), 7);
        assert_eq!(line_of(y, &plugin(0, "name")), 6);
        assert_eq!(line_of(y, &plugin(1, "root_id")), 11);
        assert_eq!(line_of(y, &plugin(1, "name")), 8);
        // Into a scalar there is no path.
        let into = [
            Key("wasm"),
            Key("plugins"),
            Item(1),
            Key("vm_config"),
            Key("name"),
        ];
        assert_eq!(line_of(y, &into), 9);
    }
}
