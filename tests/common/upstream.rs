//! A test upstream written in Rust: echoes what it received as JSON, and misbehaves on demand.
//!
//! - `/delay/<ms>/…`: answers after `ms` milliseconds;
//! - `/stream/<n>`: streams `n` chunks of 1 KiB;
//! - `/big/<bytes>`: a body of that many bytes;
//! - `/status/<code>`: answers with that status;
//! - `/auth`: 200 with `x-user: alice` and body `ok-body` for `Authorization: Bearer good`,
//!   401 otherwise (an auth service for plugins' call-outs);
//! - anything else: 200 with `{"server", "method", "uri", "headers", "body_len", "body_sum"}`.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::io::{BufRead, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

pub struct TestUpstream {
    pub name: String,
    pub port: u16,
    pub hits: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestUpstream {
    pub fn start(name: &str) -> TestUpstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (n, h) = (name.to_string(), hits.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(serve(listener, n, h, rx));
        });
        TestUpstream {
            name: name.into(),
            port,
            hits,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    l: std::net::TcpListener,
    name: String,
    hits: Arc<AtomicUsize>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    l.set_nonblocking(true).unwrap();
    let l = tokio::net::TcpListener::from_std(l).unwrap();
    loop {
        tokio::select! {
            _ = &mut stop => return,
            Ok((s, _)) = l.accept() => {
                let (name, hits) = (name.clone(), hits.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        hits.fetch_add(1, Ordering::Relaxed);
                        answer(name.clone(), req)
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
                });
            }
        }
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

async fn answer(
    name: String,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let path = req.uri().path().to_string();
    let mut parts = path.trim_start_matches('/').split('/');
    let first = parts.next().unwrap_or("");
    let arg: u64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    if first == "delay" {
        tokio::time::sleep(Duration::from_millis(arg)).await;
    }
    let mut resp = match first {
        "stream" => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
            tokio::spawn(async move {
                for i in 0..arg {
                    let chunk = Bytes::from(vec![b'a' + (i % 26) as u8; 1024]);
                    if tx.send(chunk).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            });
            Response::new(ChanBody(rx).boxed())
        }
        "big" => Response::new(full(vec![b'x'; arg as usize])),
        "auth" => {
            let good = req
                .headers()
                .get("authorization")
                .is_some_and(|v| v == "Bearer good");
            let mut r = Response::new(full(if good { "ok-body\n" } else { "no" }));
            if good {
                r.headers_mut().insert("x-user", "alice".parse().unwrap());
            } else {
                *r.status_mut() = hyper::StatusCode::UNAUTHORIZED;
            }
            r
        }
        "status" => {
            let mut r = Response::new(full(format!("status {arg}")));
            *r.status_mut() =
                hyper::StatusCode::from_u16(arg as u16).unwrap_or(hyper::StatusCode::OK);
            r
        }
        _ => {
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let mut headers = serde_json::Map::new();
            for (k, v) in req.headers() {
                let v = v.to_str().unwrap_or("").to_string();
                let joined = match headers.get(k.as_str()).and_then(|p| p.as_str()) {
                    Some(prev) => format!("{prev}, {v}"),
                    None => v,
                };
                headers.insert(k.to_string(), joined.into());
            }
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let sum: u64 = body.iter().map(|b| *b as u64).sum();
            let v = json!({"server": name, "method": method, "uri": uri, "headers": headers, "body_len": body.len(), "body_sum": sum});
            Response::new(full(v.to_string()))
        }
    };
    resp.headers_mut()
        .insert("x-upstream", name.parse().unwrap());
    Ok(resp)
}

/// A body fed by a channel, so chunks reach the wire with gaps between them.
struct ChanBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChanBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// A node that switches to an echo protocol when asked (`Upgrade`), else answers `plain`;
/// its address and the request heads it saw.
pub fn switching_node() -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = heads.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                let mut head = String::new();
                while reader.read_line(&mut head).unwrap_or(0) > 2 {}
                let head = head.to_ascii_lowercase();
                seen.lock().unwrap().push(head.clone());
                let mut conn = conn;
                if !head.contains("\r\nupgrade: websocket\r\n") {
                    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain");
                    return;
                }
                let _ = conn.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                      Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
                );
                let mut buf = [0u8; 1024];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let mut out = b"echo:".to_vec();
                            out.extend_from_slice(&buf[..n]);
                            if conn.write_all(&out).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, heads)
}
