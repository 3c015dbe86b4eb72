//! A small blocking HTTP/1.1 client (one request per connection, or keep-alive through
//! [`KeepAlive`]), enough to see exactly what a user's curl would see.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

fn split_url(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").expect("http:// URL");
    match rest.find('/') {
        Some(i) => (rest[..i].to_string(), rest[i..].to_string()),
        None => (rest.to_string(), "/".to_string()),
    }
}

/// One request on a fresh connection (`Connection: close`).
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Resp, String> {
    let (authority, path) = split_url(url);
    let mut s = TcpStream::connect(&authority).map_err(|e| format!("connect {authority}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let written = write_request(&mut s, method, &authority, &path, headers, body, true);
    let mut r = BufReader::new(s);
    match written {
        Ok(()) => read_response(&mut r, method == "HEAD"),
        // A server may answer before it has read the whole body (413 for one too large) and
        // close: the rest of the body then meets a broken pipe, but the answer is there.
        Err(e) => read_response(&mut r, method == "HEAD").map_err(|_| e),
    }
}

pub fn write_request(
    s: &mut TcpStream,
    method: &str,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    close: bool,
) -> Result<(), String> {
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {authority}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
    if let Some(b) = body {
        s.write_all(b).map_err(|e| e.to_string())?;
    }
    Ok(())
}

pub fn read_response<R: BufRead>(r: &mut R, head_only: bool) -> Result<Resp, String> {
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| e.to_string())?;
    if line.is_empty() {
        return Err("connection closed before a response".into());
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {line:?}"))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).map_err(|e| e.to_string())?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if head_only || status == 204 || status == 304 {
    } else if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            line.clear();
            r.read_line(&mut line).map_err(|e| e.to_string())?;
            let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| format!("bad chunk size {line:?}"))?;
            if n == 0 {
                line.clear();
                r.read_line(&mut line).map_err(|e| e.to_string())?;
                break;
            }
            let mut chunk = vec![0; n];
            r.read_exact(&mut chunk).map_err(|e| e.to_string())?;
            body.extend_from_slice(&chunk);
            line.clear();
            r.read_line(&mut line).map_err(|e| e.to_string())?;
        }
    } else if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(n, 0);
        r.read_exact(&mut body).map_err(|e| e.to_string())?;
    } else {
        r.read_to_end(&mut body).map_err(|e| e.to_string())?;
    }
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// A request that must get an answer.
pub fn http(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Resp {
    request(method, url, headers, body).unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// An Admin API call; returns the status and the JSON body.
pub fn admin(url: &str, method: &str, key: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let text = body.map(|b| b.to_string());
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(k) = key {
        headers.push(("X-API-KEY", k));
    }
    let r = http(method, url, &headers, text.as_deref().map(str::as_bytes));
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status, v)
}

/// A keep-alive connection reused for many requests (what load generators and browsers do).
pub struct KeepAlive {
    authority: String,
    conn: Option<BufReader<TcpStream>>,
}

impl KeepAlive {
    pub fn new(base: &str) -> KeepAlive {
        let (authority, _) = split_url(base);
        KeepAlive {
            authority,
            conn: None,
        }
    }

    /// GET `path`; reconnects when the server closed the connection after its last response
    /// (as it says with `Connection: close`), like any HTTP client.
    pub fn get(&mut self, path: &str) -> Result<Resp, String> {
        if self.conn.is_none() {
            let s = TcpStream::connect(&self.authority).map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            self.conn = Some(BufReader::new(s));
        }
        let r = self.conn.as_mut().unwrap();
        write_request(r.get_mut(), "GET", &self.authority, path, &[], None, false)?;
        let resp = read_response(r, false);
        let close = resp
            .as_ref()
            .map(|r| r.header("connection") == Some("close"))
            .unwrap_or(true);
        if close {
            self.conn = None;
        }
        resp
    }
}

/// Sends a WebSocket handshake for `path` and `host` on `s`; the answer's head as it came.
pub fn websocket_upgrade<S: Read + Write>(s: &mut S, path: &str, host: &str) -> String {
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    s.flush().unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Opens a WebSocket on `s` (`GET /ws` for `host`) through a route to
/// [`super::upstream::switching_node`], and checks that what is sent comes back echoed.
pub fn websocket_echo<S: Read + Write>(s: &mut S, host: &str) {
    let head = websocket_upgrade(s, "/ws", host);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    for word in ["ping", "again"] {
        s.write_all(word.as_bytes()).unwrap();
        s.flush().unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], format!("echo:{word}").as_bytes());
    }
}
