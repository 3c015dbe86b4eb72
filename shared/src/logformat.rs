//! The access-log line format (`nginx_config.http.access_log_format`): text with nginx-style
//! `$variables`, parsed once when the configuration is loaded, so an unknown variable is a
//! configuration error rather than a surprise in the log.

/// The variables a format may use by name, with the connection's
/// ([`crate::model::vars::CONNECTION_VARIABLES`]); besides them, the families of [`Capture`]:
/// `$http_<field>`, `$arg_<name>`, `$cookie_<name>`, and `$remote_user`.
pub const VARIABLES: [&str; 24] = [
    "remote_addr",
    "remote_port",
    "time_local",
    "time_iso8601",
    "msec",
    "host",
    "request",
    "request_method",
    "request_uri",
    "uri",
    "args",
    "server_protocol",
    "status",
    "body_bytes_sent",
    "request_time",
    "upstream_addr",
    "upstream_status",
    "upstream_response_time",
    "upstream_scheme",
    "upstream_host",
    "upstream_uri",
    "route_id",
    "apisix_route_id",
    "request_id",
];

/// Every variable a format may name, in the order [`Piece::Var`] counts them.
fn variables() -> impl Iterator<Item = &'static str> {
    let connection = crate::model::vars::CONNECTION_VARIABLES.iter();
    VARIABLES.iter().chain(connection).copied()
}

/// The variable [`Piece::Var`] `i` names.
fn variable(i: usize) -> &'static str {
    let connection = &crate::model::vars::CONNECTION_VARIABLES;
    match VARIABLES.get(i) {
        Some(v) => v,
        None => connection.get(i - VARIABLES.len()).copied().unwrap_or(""),
    }
}

/// Variables read from the request as it came, when its head is read (`$http_<field>` and
/// the others): nginx's values, the request's before plugins change it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capture {
    /// `$http_x_foo`: the first `X-Foo` field's value, as sent.
    Header(http::HeaderName),
    /// `$arg_page`: the query argument `page`, as sent (not decoded).
    Arg(String),
    /// `$cookie_session`: the cookie `session`.
    Cookie(String),
    /// `$remote_user`: the user name of `Authorization: Basic`.
    RemoteUser,
}

/// The default: APISIX's fields, ending with the matched route's id.
pub const DEFAULT: &str = "$remote_addr - $remote_user [$time_local] $http_host \"$request\" $status $body_bytes_sent $request_time \"$http_referer\" \"$http_user_agent\" $upstream_addr $upstream_status $upstream_response_time $route_id";

/// APISIX's own default `access_log_format`, which this accepts as it is.
pub const APISIX_DEFAULT: &str = "$remote_addr - $remote_user [$time_local] $http_host \"$request\" $status $body_bytes_sent $request_time \"$http_referer\" \"$http_user_agent\" $upstream_addr $upstream_status $upstream_response_time \"$upstream_scheme://$upstream_host$upstream_uri\"";

/// A piece of a parsed format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    /// An index into [`variables`].
    Var(usize),
    /// An index into [`LogFormat::captures`].
    Captured(usize),
}

/// How values are escaped in a line: nginx's `log_format … escape=`, APISIX's
/// `nginx_config.http.access_log_format_escape`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Escape {
    /// Quotes, backslashes and control characters escaped as Rust's `escape_debug` writes
    /// them; an empty value is `-`.
    #[default]
    Default,
    /// As a JSON string's contents (`\"`, `\\`, `\n`, `\u001b`); an empty value is empty,
    /// as nginx's `escape=json` writes it: a JSON format stays valid JSON.
    Json,
}

/// A parsed format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFormat {
    pub pieces: Vec<Piece>,
    /// What to read off each request's head for it, in the order of the pieces.
    pub captures: Vec<Capture>,
    pub escape: Escape,
}

/// The [`Capture`] a variable name is, if it is one.
fn capture(name: &str) -> Result<Option<Capture>, String> {
    let bad = |what: &str| format!("${name} in access_log_format: {what}");
    if name == "remote_user" {
        return Ok(Some(Capture::RemoteUser));
    }
    if let Some(field) = name.strip_prefix("http_") {
        let field = field.replace('_', "-").to_ascii_lowercase();
        let name = http::HeaderName::from_bytes(field.as_bytes())
            .map_err(|_| bad("not a header field name"))?;
        return Ok(Some(Capture::Header(name)));
    }
    for (prefix, make) in [
        ("arg_", Capture::Arg as fn(String) -> Capture),
        ("cookie_", Capture::Cookie),
    ] {
        if let Some(arg) = name.strip_prefix(prefix) {
            if arg.is_empty() {
                return Err(bad("a name is missing"));
            }
            return Ok(Some(make(arg.to_string())));
        }
    }
    Ok(None)
}

/// A variable's value: what `${name}` stands for when it comes from a capture.
pub fn captured(c: &Capture, headers: &http::HeaderMap, query: Option<&str>) -> String {
    let text = |v: &http::HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
    match c {
        Capture::Header(name) => headers.get(name).map(text).unwrap_or_default(),
        Capture::Arg(arg) => query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .find_map(|pair| match pair.split_once('=') {
                Some((k, v)) if k == arg => Some(v.to_string()),
                None if pair == arg => Some(String::new()),
                _ => None,
            })
            .unwrap_or_default(),
        Capture::Cookie(cookie) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
            .find_map(|pair| {
                let pair = pair.trim_ascii();
                let (k, v) = pair.split_at(pair.iter().position(|b| *b == b'=')?);
                (k == cookie.as_bytes()).then(|| String::from_utf8_lossy(&v[1..]).into_owned())
            })
            .unwrap_or_default(),
        Capture::RemoteUser => headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| basic_user(v.as_bytes()))
            .unwrap_or_default(),
    }
}

/// The user name of an `Authorization: Basic` value (nginx's `$remote_user`).
fn basic_user(value: &[u8]) -> Option<String> {
    use base64::Engine;
    let scheme_end = value.iter().position(|b| *b == b' ')?;
    if !value[..scheme_end].eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(value[scheme_end + 1..].trim_ascii())
        .ok()?;
    let user = decoded.split(|b| *b == b':').next()?;
    Some(String::from_utf8_lossy(user).into_owned())
}

impl LogFormat {
    /// Parses `$name` and `${name}` references; `$$` is a literal `$`.
    pub fn parse(format: &str) -> Result<LogFormat, String> {
        let mut pieces = Vec::new();
        let mut captures = Vec::new();
        let mut text = String::new();
        let mut rest = format;
        while let Some(i) = rest.find('$') {
            text.push_str(&rest[..i]);
            rest = &rest[i + 1..];
            if let Some(r) = rest.strip_prefix('$') {
                text.push('$');
                rest = r;
                continue;
            }
            let (name, after) = match rest.strip_prefix('{') {
                Some(r) => {
                    let end = r
                        .find('}')
                        .ok_or_else(|| "unclosed ${ in access_log_format".to_string())?;
                    (&r[..end], &r[end + 1..])
                }
                None => {
                    let end = rest
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(rest.len());
                    (&rest[..end], &rest[end..])
                }
            };
            let piece = match (variables().position(|v| v == name), capture(name)?) {
                (Some(var), _) => Piece::Var(var),
                (None, Some(c)) => {
                    captures.push(c);
                    Piece::Captured(captures.len() - 1)
                }
                (None, None) => {
                    return Err(format!(
                        "unknown variable ${name} in access_log_format (known: {}, \
                         $remote_user, $http_<field>, $arg_<name>, $cookie_<name>)",
                        variables().collect::<Vec<_>>().join(", ")
                    ))
                }
            };
            if !text.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut text)));
            }
            pieces.push(piece);
            rest = after;
        }
        text.push_str(rest);
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(LogFormat {
            pieces,
            captures,
            escape: Escape::Default,
        })
    }

    /// This format with values escaped as `escape` says.
    pub fn escaped(self, escape: Escape) -> LogFormat {
        LogFormat { escape, ..self }
    }

    /// Whether a piece names one of `names` (values only some formats need).
    pub fn uses(&self, names: &[&str]) -> bool {
        self.pieces
            .iter()
            .any(|p| matches!(p, Piece::Var(i) if names.contains(&variable(*i))))
    }

    /// Renders a line: `value(name)` gives each variable's text, `captured` the captures' in
    /// their order ("-" is used when empty); values are escaped so a client cannot forge a
    /// line.
    pub fn render(&self, value: impl Fn(&str) -> String, captured: &[String]) -> String {
        let mut out = String::with_capacity(256);
        for p in &self.pieces {
            let v = match p {
                Piece::Text(t) => {
                    out.push_str(t);
                    continue;
                }
                Piece::Var(i) => value(variable(*i)),
                Piece::Captured(i) => captured.get(*i).cloned().unwrap_or_default(),
            };
            match self.escape {
                Escape::Default if v.is_empty() => out.push('-'),
                Escape::Default => out.extend(v.escape_debug()),
                Escape::Json => json_escaped(&v, &mut out),
            }
        }
        out.push('\n');
        out
    }
}

/// `v` as the contents of a JSON string (RFC 8259 §7); valid in a YAML double-quoted scalar
/// too (YAML's escapes include JSON's).
pub(crate) fn json_escaped(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escape_keeps_a_json_format_valid() {
        let f = LogFormat::parse("{\"ua\":\"$http_user_agent\",\"ref\":\"$http_referer\"}")
            .unwrap()
            .escaped(Escape::Json);
        let hostile = "a\"b\\c\nd\u{1b}é".to_string();
        let line = f.render(|_| String::new(), &[hostile, String::new()]);
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(v["ua"], "a\"b\\c\nd\u{1b}é");
        assert_eq!(v["ref"], "");
    }

    #[test]
    fn parses_and_renders() {
        let f = LogFormat::parse("$remote_addr ${status}x $$ \"$request\"").unwrap();
        let line = f.render(
            |v| match v {
                "remote_addr" => "1.2.3.4".into(),
                "status" => "200".into(),
                "request" => "GET /\"a\"\n".into(),
                _ => String::new(),
            },
            &[],
        );
        assert_eq!(line, "1.2.3.4 200x $ \"GET /\\\"a\\\"\\n\"\n");
        assert!(LogFormat::parse(DEFAULT).is_ok());
        assert!(LogFormat::parse(APISIX_DEFAULT).is_ok());
    }

    #[test]
    fn request_variables_are_read_as_nginx_reads_them() {
        let f = LogFormat::parse("$http_x_trace|$arg_page|$cookie_sid|$remote_user|$http_host")
            .unwrap();
        let mut h = http::HeaderMap::new();
        h.insert("x-trace", "t1".parse().unwrap());
        h.insert("host", "Example.COM:8443".parse().unwrap());
        h.append("cookie", "a=1; sid=xyz".parse().unwrap());
        // bob:secret
        h.insert("authorization", "Basic Ym9iOnNlY3JldA==".parse().unwrap());
        let captured: Vec<String> = f
            .captures
            .iter()
            .map(|c| captured(c, &h, Some("q=1&page=%32&x")))
            .collect();
        assert_eq!(
            f.render(|_| String::new(), &captured),
            "t1|%32|xyz|bob|Example.COM:8443\n"
        );
        assert_eq!(captured_of("$arg_x", Some("x")), "");
        assert_eq!(captured_of("$arg_x", Some("x=&y=2")), "");
        assert_eq!(captured_of("$arg_y", Some("x=&y=2")), "2");
        assert!(LogFormat::parse("$arg_").is_err());
        assert!(LogFormat::parse("${http_a b}").is_err());
    }

    fn captured_of(var: &str, query: Option<&str>) -> String {
        let f = LogFormat::parse(var).unwrap();
        captured(&f.captures[0], &http::HeaderMap::new(), query)
    }

    #[test]
    fn unknown_variables_are_errors() {
        let e = LogFormat::parse("$remote_addr $nope").unwrap_err();
        assert!(e.contains("$nope"), "{e}");
        assert!(LogFormat::parse("${status").is_err());
    }
}
