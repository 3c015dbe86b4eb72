//! Environment variables in config.yaml, as APISIX reads them: `${{NAME}}`, or
//! `${{NAME:=default}}` for a value used when `NAME` is not set (APISIX's `cli/file.lua`).
//! Deployments keep secrets such as the Admin API key out of the file this way.
//!
//! The references are replaced in the text before it is parsed, line by line, so that errors
//! still point at the file's lines. A value goes in as YAML would read it back unchanged: in a
//! quoted scalar it is escaped; a reference that is a whole unquoted scalar becomes a number or
//! a boolean when the value is one (APISIX converts such values too), else a quoted string; in
//! a longer unquoted scalar (`http://${{HOST}}:2379`) it goes in as it is, and a value that
//! would change the YAML's structure there is refused. References in comments are left alone.
//! A reference to a variable that is not set and has no default is an error, never the text
//! taken literally: a key written `${{ADMIN_KEY}}` must not become the key `${{ADMIN_KEY}}`.

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
    for (i, line) in text.split_inclusive('\n').enumerate() {
        expand_line(line, &env, &mut out).map_err(|e| (i + 1, e))?;
    }
    Ok(Cow::Owned(out))
}

/// Where a reference stands on its line.
#[derive(Clone, Copy, PartialEq)]
enum Quoting {
    Plain,
    Double,
    Single,
}

fn expand_line(
    line: &str,
    env: &impl Fn(&str) -> Option<String>,
    out: &mut String,
) -> Result<(), String> {
    let bytes = line.as_bytes();
    let mut quoting = Quoting::Plain;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match quoting {
            Quoting::Plain if b == b'#' && (i == 0 || bytes[i - 1].is_ascii_whitespace()) => {
                // A comment: the rest of the line as it is.
                out.push_str(&line[i..]);
                return Ok(());
            }
            Quoting::Plain if b == b'"' => quoting = Quoting::Double,
            Quoting::Plain if b == b'\'' => quoting = Quoting::Single,
            Quoting::Double if b == b'\\' && i + 1 < bytes.len() => {
                // The backslash and the whole character it escapes (which may be multi-byte).
                let next = line[i + 1..].chars().next().map_or(1, char::len_utf8);
                out.push_str(&line[i..i + 1 + next]);
                i += 1 + next;
                continue;
            }
            Quoting::Double if b == b'"' => quoting = Quoting::Plain,
            Quoting::Single if b == b'\'' => quoting = Quoting::Plain,
            _ => {}
        }
        if line[i..].starts_with("${{") {
            let Some(len) = line[i + 3..].find("}}") else {
                return Err("`${{` without its closing `}}`".into());
            };
            let inner = &line[i + 3..i + 3 + len];
            let end = i + 3 + len + 2;
            let value = resolve(inner, env)?;
            let whole =
                quoting == Quoting::Plain && starts_scalar(&line[..i]) && ends_scalar(&line[end..]);
            let name = inner.split(":=").next().unwrap_or(inner).trim();
            place(&value, quoting, whole, &line[..i], name, out)?;
            i = end;
            continue;
        }
        // Copy one character (a multi-byte one whole).
        let next = line[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&line[i..i + next]);
        i += next;
    }
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

/// Whether what precedes a reference on its line leaves it at the start of a scalar.
fn starts_scalar(before: &str) -> bool {
    let t = before.trim_end();
    // `key: `, `- ` need their space (`a:b`, `x-` are inside a scalar); flow `[`, `{`, `,`
    // do not.
    let spaced = t.len() < before.len();
    let indicator = |c: char| {
        t.strip_suffix(c)
            .is_some_and(|rest| rest.is_empty() || rest.ends_with(char::is_whitespace))
    };
    t.is_empty() || t.ends_with(['[', '{', ',']) || (spaced && (t.ends_with(':') || indicator('-')))
}

/// Whether what follows a reference ends its scalar.
fn ends_scalar(after: &str) -> bool {
    let t = after.trim_start();
    t.is_empty() || t.starts_with(['#', ',', ']', '}']) || t.starts_with(": ") || t == ":\n"
}

/// Writes `value`, the value of `name`, where a reference stood (`before` it on its line).
fn place(
    value: &str,
    quoting: Quoting,
    whole: bool,
    before: &str,
    name: &str,
    out: &mut String,
) -> Result<(), String> {
    match quoting {
        Quoting::Double => {
            for c in value.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\t' => out.push_str("\\t"),
                    c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
                    c => out.push(c),
                }
            }
        }
        Quoting::Single => {
            if value.contains(['\n', '\r']) {
                return Err(format!(
                    "the value of {name} spans lines: use it in a double-quoted string"
                ));
            }
            out.push_str(&value.replace('\'', "''"));
        }
        Quoting::Plain if whole => {
            let literal = value.parse::<i64>().is_ok()
                || value.parse::<f64>().is_ok_and(f64::is_finite)
                || value == "true"
                || value == "false";
            if literal {
                out.push_str(value);
            } else {
                out.push('"');
                place(value, Quoting::Double, false, "", name, out)?;
                out.push('"');
            }
        }
        Quoting::Plain => {
            let at_start = starts_scalar(before);
            let unsafe_inside = value.contains(['\n', '\r', ',', '[', ']', '{', '}'])
                || value.contains(": ")
                || value.contains(" #")
                || value.ends_with(':')
                || value.chars().any(char::is_control);
            let unsafe_start = at_start
                && value.starts_with([
                    '*', '&', '!', '|', '>', '%', '@', '`', '\'', '"', '?', '-', ' ', '#',
                ]);
            if unsafe_inside || unsafe_start {
                return Err(format!(
                    "the value of {name} cannot stand in an unquoted scalar as it is (it has \
                     characters YAML reads as structure): put the whole value in double quotes \
                     in config.yaml"
                ));
            }
            out.push_str(value);
        }
    }
    Ok(())
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
        assert_eq!(ex("key: ${{KEY}}\n").unwrap(), "key: \"s3cr3t\"\n");
        assert_eq!(ex("- ${{COLON}}\n").unwrap(), "- \"a: b\"\n");
        assert_eq!(ex("k: ${{QUOTE}}\n").unwrap(), "k: \"a\\\"b\\\\c'd\"\n");
        assert_eq!(
            ex("k: [${{PORT}}, ${{KEY}}]\n").unwrap(),
            "k: [9080, \"s3cr3t\"]\n"
        );
        assert_eq!(ex("k: ${{EMPTY}}\n").unwrap(), "k: \"\"\n");
    }

    #[test]
    fn defaults_quotes_and_comments() {
        assert_eq!(ex("p: ${{NOPE:=8080}}\n").unwrap(), "p: 8080\n");
        assert_eq!(ex("p: ${{NOPE := a b }}\n").unwrap(), "p: \"a b\"\n");
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
