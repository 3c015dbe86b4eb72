//! The access-log line format (`nginx_config.http.access_log_format`): text with nginx-style
//! `$variables`, parsed once when the configuration is loaded, so an unknown variable is a
//! configuration error rather than a surprise in the log.

/// The variables a format may use.
pub const VARIABLES: [&str; 20] = [
    "remote_addr",
    "remote_user",
    "time_local",
    "time_iso8601",
    "msec",
    "http_host",
    "request",
    "request_method",
    "request_uri",
    "status",
    "body_bytes_sent",
    "request_time",
    "http_referer",
    "http_user_agent",
    "upstream_addr",
    "upstream_status",
    "upstream_response_time",
    "route_id",
    "apisix_route_id",
    "request_id",
];

/// The default: APISIX's fields, ending with the matched route's id.
pub const DEFAULT: &str = "$remote_addr - $remote_user [$time_local] $http_host \"$request\" $status $body_bytes_sent $request_time \"$http_referer\" \"$http_user_agent\" $upstream_addr $upstream_status $upstream_response_time $route_id";

/// A piece of a parsed format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    /// An index into [`VARIABLES`].
    Var(usize),
}

/// A parsed format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFormat {
    pub pieces: Vec<Piece>,
}

impl LogFormat {
    /// Parses `$name` and `${name}` references; `$$` is a literal `$`.
    pub fn parse(format: &str) -> Result<LogFormat, String> {
        let mut pieces = Vec::new();
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
            let Some(var) = VARIABLES.iter().position(|v| *v == name) else {
                return Err(format!(
                    "unknown variable ${name} in access_log_format (known: {})",
                    VARIABLES.join(", ")
                ));
            };
            if !text.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut text)));
            }
            pieces.push(Piece::Var(var));
            rest = after;
        }
        text.push_str(rest);
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(LogFormat { pieces })
    }

    /// Renders a line: `value(name)` gives each variable's text ("-" is used when empty);
    /// values are escaped so a client cannot forge a line.
    pub fn render(&self, value: impl Fn(&str) -> String) -> String {
        let mut out = String::with_capacity(256);
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Var(i) => {
                    let v = value(VARIABLES[*i]);
                    if v.is_empty() {
                        out.push('-');
                    } else {
                        out.extend(v.escape_debug());
                    }
                }
            }
        }
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_renders() {
        let f = LogFormat::parse("$remote_addr ${status}x $$ \"$request\"").unwrap();
        let line = f.render(|v| match v {
            "remote_addr" => "1.2.3.4".into(),
            "status" => "200".into(),
            "request" => "GET /\"a\"\n".into(),
            _ => String::new(),
        });
        assert_eq!(line, "1.2.3.4 200x $ \"GET /\\\"a\\\"\\n\"\n");
        assert!(LogFormat::parse(DEFAULT).is_ok());
    }

    #[test]
    fn unknown_variables_are_errors() {
        let e = LogFormat::parse("$remote_addr $nope").unwrap_err();
        assert!(e.contains("$nope"), "{e}");
        assert!(LogFormat::parse("${status").is_err());
    }
}
