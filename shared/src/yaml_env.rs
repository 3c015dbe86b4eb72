//! Environment variables in config.yaml, as APISIX reads them: `${{NAME}}`, or
//! `${{NAME:=default}}` for a value used when `NAME` is not set (APISIX's `cli/file.lua`).
//! Deployments keep secrets such as the Admin API key out of the file this way.
//!
//! The references are replaced in the text before it is parsed, so that errors still point
//! at the file's lines; the scan follows what YAML needs for that — quoted scalars (on one line
//! or several), block scalars (`|`, `>`), flow collections and comments. A value goes in as
//! YAML would read it back unchanged: in a quoted scalar it is escaped; in a block scalar it
//! goes in as it is; a reference that is a whole unquoted scalar becomes a number or a boolean
//! when the value is one (APISIX converts such values too), the value itself when YAML reads
//! it as the same text, a quoted string otherwise; inside a longer unquoted scalar
//! (`http://${{HOST}}:2379`) it goes in as it is, and a value that would change the YAML's
//! structure there is refused. References in comments are left alone. A reference to a
//! variable that is not set and has no default is an error, never the text taken literally:
//! a key written `${{ADMIN_KEY}}` must not become the key `${{ADMIN_KEY}}`.

use std::borrow::Cow;

/// An error: the 1-based line, and what is wrong.
pub type LineError = (usize, String);

/// `text` with every `${{…}}` outside comments replaced by what `env` gives for its name.
pub fn expand<'a>(
    text: &'a str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Cow<'a, str>, LineError> {
    if !text.contains("${{") {
        return Ok(Cow::Borrowed(text));
    }
    let mut out = String::with_capacity(text.len());
    let mut scan = Scan::default();
    for (i, line) in text.split_inclusive('\n').enumerate() {
        scan.line(line, &env, &mut out).map_err(|e| (i + 1, e))?;
    }
    Ok(Cow::Owned(out))
}

/// Where a reference stands.
#[derive(Clone, Copy, PartialEq, Default)]
enum Quoting {
    #[default]
    Plain,
    Double,
    Single,
}

/// What carries from one line to the next.
#[derive(Default)]
struct Scan {
    /// A quoted scalar may go on over lines.
    quoting: Quoting,
    /// How deep in `[…]` / `{…}` (which may span lines).
    flow: usize,
    /// Inside a block scalar opened on a line of this indentation: the lines indented more
    /// (or blank) are its text.
    block: Option<usize>,
}

impl Scan {
    fn line(
        &mut self,
        line: &str,
        env: &impl Fn(&str) -> Option<String>,
        out: &mut String,
    ) -> Result<(), String> {
        let indent = line.len() - line.trim_start_matches(' ').len();
        if let Some(opener) = self.block {
            if line.trim().is_empty() || indent > opener {
                return block_text(line, env, out);
            }
            self.block = None;
        }
        let bytes = line.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match self.quoting {
                Quoting::Plain if b == b'#' && (i == 0 || bytes[i - 1].is_ascii_whitespace()) => {
                    // A comment: the rest of the line as it is.
                    self.open_block(&line[..i], indent);
                    out.push_str(&line[i..]);
                    return Ok(());
                }
                // A quote opens a quoted scalar only where a scalar starts (`it's` is plain).
                Quoting::Plain if (b == b'"' || b == b'\'') && self.starts_scalar(&line[..i]) => {
                    self.quoting = if b == b'"' {
                        Quoting::Double
                    } else {
                        Quoting::Single
                    };
                }
                Quoting::Plain if b == b'[' || b == b'{' => self.flow += 1,
                Quoting::Plain if b == b']' || b == b'}' => self.flow = self.flow.saturating_sub(1),
                Quoting::Double if b == b'\\' && i + 1 < bytes.len() => {
                    // The backslash and the whole character it escapes (which may be multi-byte).
                    let next = line[i + 1..].chars().next().map_or(1, char::len_utf8);
                    out.push_str(&line[i..i + 1 + next]);
                    i += 1 + next;
                    continue;
                }
                Quoting::Double if b == b'"' => self.quoting = Quoting::Plain,
                // `''` inside a single-quoted scalar is a quote, not its end.
                Quoting::Single if b == b'\'' && bytes.get(i + 1) == Some(&b'\'') => {
                    out.push_str("''");
                    i += 2;
                    continue;
                }
                Quoting::Single if b == b'\'' => self.quoting = Quoting::Plain,
                _ => {}
            }
            if line[i..].starts_with("${{") {
                let Some(len) = line[i + 3..].find("}}") else {
                    return Err("`${{` without its closing `}}`".into());
                };
                let inner = &line[i + 3..i + 3 + len];
                let end = i + 3 + len + 2;
                let value = resolve(inner, env)?;
                let name = inner.split(":=").next().unwrap_or(inner).trim();
                let at_start = self.quoting == Quoting::Plain && self.starts_scalar(&line[..i]);
                let whole = at_start && ends_scalar(&line[end..]);
                let place = Place {
                    quoting: self.quoting,
                    whole,
                    at_start,
                    in_flow: self.flow > 0,
                };
                place.put(&value, name, out)?;
                i = end;
                continue;
            }
            // Copy one character (a multi-byte one whole).
            let next = line[i..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&line[i..i + next]);
            i += next;
        }
        if self.quoting == Quoting::Plain {
            self.open_block(line, indent);
        }
        Ok(())
    }

    /// Whether what precedes a reference on its line leaves it at the start of a scalar: after
    /// `key: `, `- `, or in a flow collection after `[`, `{` or `,`. A line's first text outside
    /// a flow collection continues the scalar of the lines before (a plain scalar may span
    /// lines) unless it is a key's or an item's.
    fn starts_scalar(&self, before: &str) -> bool {
        let t = before.trim_end();
        let spaced = t.len() < before.len();
        let indicator = |c: char| {
            t.strip_suffix(c)
                .is_some_and(|rest| rest.is_empty() || rest.ends_with(char::is_whitespace))
        };
        (t.is_empty() && (self.flow > 0 || before.is_empty()))
            || (self.flow > 0 && t.ends_with(['[', '{', ',']))
            || (spaced && (t.ends_with(':') || indicator('-')))
    }

    /// After a line outside quotes: whether it opened a block scalar (`key: |`, `- >-`).
    fn open_block(&mut self, code: &str, indent: usize) {
        let t = code.trim_end();
        let Some(start) = t.rfind([' ', '\t']).map(|p| p + 1).or(Some(0)) else {
            return;
        };
        let token = &t[start..];
        let header = token.starts_with(['|', '>'])
            && token[1..]
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b'+' || b == b'-');
        let after_indicator = {
            let rest = t[..start].trim_end();
            rest.is_empty() || rest.ends_with(':') || rest.ends_with('-')
        };
        if header && after_indicator && self.flow == 0 {
            self.block = Some(indent);
        }
    }
}

/// A line of a block scalar's text: references replaced by their values as they are (`#` is
/// text there, not a comment).
fn block_text(
    line: &str,
    env: &impl Fn(&str) -> Option<String>,
    out: &mut String,
) -> Result<(), String> {
    let mut rest = line;
    while let Some(at) = rest.find("${{") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 3..];
        let Some(len) = after.find("}}") else {
            return Err("`${{` without its closing `}}`".into());
        };
        let inner = &after[..len];
        let value = resolve(inner, env)?;
        if value.contains(['\n', '\r']) {
            let name = inner.split(":=").next().unwrap_or(inner).trim();
            return Err(format!(
                "the value of {name} spans lines: a block scalar takes one line of it"
            ));
        }
        out.push_str(&value);
        rest = &after[len + 2..];
    }
    out.push_str(rest);
    Ok(())
}

/// The value of `NAME` or `NAME:=default` (spaces around either ignored).
fn resolve(inner: &str, env: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let (name, default) = match inner.split_once(":=") {
        Some((n, d)) => (n.trim(), Some(d.trim())),
        None => (inner.trim(), None),
    };
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!(
            "`${{{{{inner}}}}}`: an environment variable's name is letters, digits and `_` \
             (write `${{{{NAME}}}}` or `${{{{NAME:=default}}}}`)"
        ));
    }
    match (env(name), default) {
        (Some(v), _) => Ok(v),
        (None, Some(d)) => Ok(d.to_string()),
        (None, None) => Err(format!(
            "environment variable {name} is not set: config.yaml uses `${{{{{name}}}}}` \
             (give a default with `${{{{{name}:=value}}}}`)"
        )),
    }
}

/// Whether what follows a reference ends its scalar (a `#` is a comment only after a space).
fn ends_scalar(after: &str) -> bool {
    let t = after.trim_start();
    let spaced = t.len() < after.len();
    t.is_empty()
        || (spaced && t.starts_with('#'))
        || t.starts_with([',', ']', '}'])
        || t.starts_with(": ")
        || t.trim_end() == ":"
}

/// Where a reference's value goes.
struct Place {
    quoting: Quoting,
    /// The reference is a whole unquoted scalar.
    whole: bool,
    /// It starts one.
    at_start: bool,
    in_flow: bool,
}

impl Place {
    fn put(&self, value: &str, name: &str, out: &mut String) -> Result<(), String> {
        match self.quoting {
            Quoting::Double => double_quoted(value, out),
            Quoting::Single => {
                if value.contains(['\n', '\r']) {
                    return Err(format!(
                        "the value of {name} spans lines: use it in a double-quoted string"
                    ));
                }
                out.push_str(&value.replace('\'', "''"));
            }
            Quoting::Plain if self.whole => {
                let literal = value.parse::<i64>().is_ok()
                    || value.parse::<f64>().is_ok_and(f64::is_finite)
                    || value == "true"
                    || value == "false";
                let null = matches!(value, "" | "~" | "null" | "Null" | "NULL");
                if literal || (!null && self.plain_safe(value)) {
                    out.push_str(value);
                } else {
                    out.push('"');
                    double_quoted(value, out);
                    out.push('"');
                }
            }
            Quoting::Plain => {
                if !self.plain_safe(value) {
                    return Err(format!(
                        "the value of {name} cannot stand in an unquoted scalar as it is (it \
                         has characters YAML reads as structure): put the whole value in \
                         double quotes in config.yaml"
                    ));
                }
                out.push_str(value);
            }
        }
        Ok(())
    }

    /// Whether YAML reads `value`, written unquoted here, as the same text.
    fn plain_safe(&self, value: &str) -> bool {
        let structure = value.contains(['\n', '\r'])
            || value.contains(": ")
            || value.contains(" #")
            || value.ends_with(':')
            || value.chars().any(char::is_control)
            || (self.in_flow && value.contains([',', '[', ']', '{', '}']));
        let bad_start = self.at_start
            && value.starts_with([
                '*', '&', '!', '|', '>', '%', '@', '`', '\'', '"', '?', '-', ' ', '#', '[', '{',
                ']', '}', ',',
            ]);
        !(structure || bad_start || value.ends_with(' '))
    }
}

/// `value` escaped for a double-quoted scalar: as in a JSON string, whose escapes YAML's
/// include.
fn double_quoted(value: &str, out: &mut String) {
    crate::logformat::json_escaped(value, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "KEY" => Some("s3cr3t".into()),
            "PORT" => Some("9080".into()),
            "YES" => Some("true".into()),
            "HOST" => Some("etcd.local".into()),
            "QUOTE" => Some("a\"b\\c'd".into()),
            "COLON" => Some("a: b".into()),
            "EMPTY" => Some(String::new()),
            "LEAD" => Some("'x".into()),
            _ => None,
        }
    }

    fn ex(text: &str) -> Result<String, LineError> {
        expand(text, env).map(|c| c.into_owned())
    }

    #[test]
    fn whole_scalars_become_numbers_booleans_or_quoted_strings() {
        assert_eq!(ex("port: ${{PORT}}\n").unwrap(), "port: 9080\n");
        assert_eq!(ex("on: ${{ YES }}\n").unwrap(), "on: true\n");
        // Text YAML reads back as itself goes in as it is; other text quoted.
        assert_eq!(ex("key: ${{KEY}}\n").unwrap(), "key: s3cr3t\n");
        assert_eq!(ex("- ${{COLON}}\n").unwrap(), "- \"a: b\"\n");
        assert_eq!(ex("k: ${{QUOTE}}\n").unwrap(), "k: a\"b\\c'd\n");
        assert_eq!(ex("k: ${{LEAD}}\n").unwrap(), "k: \"'x\"\n");
        assert_eq!(
            ex("k: [${{PORT}}, ${{KEY}}]\n").unwrap(),
            "k: [9080, s3cr3t]\n"
        );
        assert_eq!(ex("k: ${{EMPTY}}\n").unwrap(), "k: \"\"\n");
        assert_eq!(ex("k: ${{NOPE:=null}}\n").unwrap(), "k: \"null\"\n");
    }

    /// What spans lines: block scalars (their text taken as it is, `#` in it is text),
    /// quoted scalars, plain scalars and flow collections over several lines.
    #[test]
    fn multi_line_scalars() {
        assert_eq!(
            ex("k: |-\n  ${{KEY}}\nn: 1\n").unwrap(),
            "k: |-\n  s3cr3t\nn: 1\n"
        );
        let (line, msg) = ex("k: |\n  x # ${{NOPE}}\n").unwrap_err();
        assert_eq!(line, 2);
        assert!(msg.contains("NOPE is not set"), "{msg}");
        assert_eq!(
            ex("k: \"a\n  ${{QUOTE}}\"\n").unwrap(),
            "k: \"a\n  a\\\"b\\\\c'd\"\n"
        );
        assert_eq!(ex("k: abc\n  ${{KEY}}\n").unwrap(), "k: abc\n  s3cr3t\n");
        assert!(ex("k: abc\n  ${{COLON}}\n").is_err());
        assert_eq!(
            ex("k: [\n  ${{KEY}},\n]\n").unwrap(),
            "k: [\n  s3cr3t,\n]\n"
        );
    }

    /// A quote inside a plain scalar is text; a `#` right after a value is text.
    #[test]
    fn plain_scalars_keep_their_quotes_and_hashes() {
        assert_eq!(ex("k: x'y ${{QUOTE}}\n").unwrap(), "k: x'y a\"b\\c'd\n");
        assert_eq!(ex("k: ${{KEY}}#x\n").unwrap(), "k: s3cr3t#x\n");
        assert_eq!(ex("k: ${{KEY}} #x\n").unwrap(), "k: s3cr3t #x\n");
        assert_eq!(
            ex("k: 'it''s ${{QUOTE}}'\n").unwrap(),
            "k: 'it''s a\"b\\c''d'\n"
        );
    }

    #[test]
    fn defaults_quotes_and_comments() {
        assert_eq!(ex("p: ${{NOPE:=8080}}\n").unwrap(), "p: 8080\n");
        assert_eq!(ex("p: ${{NOPE := a b }}\n").unwrap(), "p: a b\n");
        assert_eq!(ex("p: ${{PORT:=1}}\n").unwrap(), "p: 9080\n");
        assert_eq!(
            ex("k: \"x-${{QUOTE}}\"\n").unwrap(),
            "k: \"x-a\\\"b\\\\c'd\"\n"
        );
        assert_eq!(ex("k: 'x-${{QUOTE}}'\n").unwrap(), "k: 'x-a\"b\\c''d'\n");
        assert_eq!(
            ex("h: http://${{HOST}}:2379 # ${{NOPE}}\n").unwrap(),
            "h: http://etcd.local:2379 # ${{NOPE}}\n"
        );
        assert_eq!(ex("# ${{NOPE}}\nx: 1\n").unwrap(), "# ${{NOPE}}\nx: 1\n");
        // No reference: the text itself, nginx's `$var` and `${var}` untouched.
        assert!(matches!(
            expand("f: \"$remote_addr ${x}\"\n", env).unwrap(),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn what_cannot_be_placed_is_an_error_with_its_line() {
        let (line, msg) = ex("a: 1\nkey: ${{ADMIN_KEY}}\n").unwrap_err();
        assert_eq!(line, 2);
        assert!(msg.contains("ADMIN_KEY is not set"), "{msg}");
        let (_, msg) = ex("h: x-${{COLON}}\n").unwrap_err();
        assert!(msg.contains("double quotes"), "{msg}");
        let (_, msg) = ex("h: ${{BAD NAME}}\n").unwrap_err();
        assert!(msg.contains("letters, digits"), "{msg}");
        let (_, msg) = ex("h: ${{KEY\n").unwrap_err();
        assert!(msg.contains("closing"), "{msg}");
        // An escaped multi-byte character in a quoted scalar is copied whole.
        assert_eq!(ex("k: \"\\é ${{PORT}}\"\n").unwrap(), "k: \"\\é 9080\"\n");
    }
}
