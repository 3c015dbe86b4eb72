//! Client-side limits: oversize heads, oversize bodies, slow clients.

mod common;

use common::{http, Gateway, Setup, TestUpstream};
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn gateway() -> (TestUpstream, Gateway) {
    let up = TestUpstream::start("u");
    let gw = Gateway::start_with(Setup {
        http_extra: vec![
            "client_max_body_size: 1k".into(),
            "client_max_header_size: 8k".into(),
            "client_header_timeout: 1s".into(),
        ],
        ..Setup::default()
    });
    gw.route("1", json!({"uri": "/*"}), Some(&up));
    (up, gw)
}

#[test]
fn oversize_heads_get_431_long_request_lines_414_and_oversize_bodies_413() {
    let (up, gw) = gateway();
    let big = "v".repeat(10_000);
    let r = http("GET", &gw.url("/a"), &[("X-Big", &big)], None);
    assert_eq!(r.status, 431);
    let long_uri = format!("/a?{}", "q".repeat(9_000));
    let r = http("GET", &gw.url(&long_uri), &[], None);
    assert_eq!(r.status, 414, "{}", r.text());
    assert!(r.text().contains("414"), "{}", r.text());
    let r = http("POST", &gw.url("/a"), &[], Some(&[b'x'; 2048]));
    assert_eq!(r.status, 413);
    assert!(
        r.text().contains("413 Request Entity Too Large")
            || r.text().contains("413 Payload Too Large"),
        "{}",
        r.text()
    );
    // None of them reached the upstream; a request within limits does.
    assert_eq!(up.hits(), 0);
    let r = http("POST", &gw.url("/a"), &[], Some(&[b'x'; 512]));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], 512);
}

#[test]
fn a_slow_client_is_cut_off_and_others_are_served() {
    let (_up, gw) = gateway();
    let mut slow = TcpStream::connect(format!("127.0.0.1:{}", gw.proxy_port)).unwrap();
    slow.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n").unwrap();
    let started = Instant::now();
    for _ in 0..5 {
        assert_eq!(http("GET", &gw.url("/a"), &[], None).status, 200);
    }
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "slow client kept for {waited:?}"
    );
}

/// An upstream that stops reading the request body: `timeout.send` ends the wait with 504
/// instead of holding the client forever.
#[test]
fn an_upstream_that_stops_reading_times_out_on_send() {
    let stuck = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = stuck.local_addr().unwrap().port();
    // Accepts, reads nothing, holds the connection.
    let holder = std::thread::spawn(move || {
        let conns: Vec<_> = (0..1).filter_map(|_| stuck.accept().ok()).collect();
        std::thread::sleep(Duration::from_secs(3));
        drop(conns);
    });
    let gw = Gateway::start();
    gw.route(
        "1",
        json!({"uri": "/up", "upstream": {"nodes": {format!("127.0.0.1:{port}"): 1}, "timeout": {"connect": 1, "send": 0.5, "read": 10}}}),
        None,
    );
    let mut s = TcpStream::connect(format!("127.0.0.1:{}", gw.proxy_port)).unwrap();
    let size = 64 << 20;
    s.write_all(
        format!(
            "POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let mut writer = s.try_clone().unwrap();
    std::thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..64 {
            if writer.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let started = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(
        &head,
        b"HTTP/1.1 504",
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        gw.error_log()
            .contains("timed out while sending the request"),
        "{}",
        gw.error_log()
    );
    holder.join().unwrap();
}

/// Sends a request head announcing `len` body bytes, then `sent` bytes of it, then nothing;
/// returns the status line's code and how long the answer took.
fn stall_body(gw: &Gateway, path: &str, len: usize, sent: usize) -> (String, Duration) {
    let mut s = TcpStream::connect(format!("127.0.0.1:{}", gw.proxy_port)).unwrap();
    s.write_all(
        format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n").as_bytes(),
    )
    .unwrap();
    s.write_all(&vec![b'x'; sent]).unwrap();
    let started = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = [0u8; 12];
    let got = s
        .read_exact(&mut head)
        .map(|_| String::from_utf8_lossy(&head[9..12]).into_owned());
    (
        got.unwrap_or_else(|e| format!("no answer: {e}")),
        started.elapsed(),
    )
}

/// `client_body_timeout` (1 s here): a client that stops sending its body gets 408 — on a
/// plain route and on one whose plugin buffers the body — while a slow client that keeps
/// sending (every 300 ms, 2 s in all) is served: the timeout is between reads, as nginx's.
#[test]
fn a_stalled_request_body_gets_408_and_a_slow_steady_one_is_served() {
    let up = TestUpstream::start("u");
    let gw = Gateway::start_with(Setup {
        http_extra: vec!["client_body_timeout: 1s".into()],
        ..Setup::default()
    });
    gw.route("1", json!({"uri": "/plain/*"}), Some(&up));
    let conf = json!({"request_append": "+tail"}).to_string();
    gw.route(
        "2",
        json!({"uri": "/buffered/*", "plugins": {"body_rewrite": {"conf": conf}}}),
        Some(&up),
    );

    for path in ["/plain/a", "/buffered/a"] {
        let (status, took) = stall_body(&gw, path, 100, 10);
        assert_eq!(status, "408", "{path}: {}", gw.error_log());
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(6),
            "{path}: answered after {took:?}"
        );
    }

    let mut s = TcpStream::connect(format!("127.0.0.1:{}", gw.proxy_port)).unwrap();
    s.write_all(
        b"POST /plain/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    for b in b"steady!" {
        std::thread::sleep(Duration::from_millis(300));
        s.write_all(&[*b]).unwrap();
    }
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"body_len\":7"), "{answer}");
}

/// Reads what `s` still brings, for at most `within`: the bytes, and whether the gateway
/// closed the connection (end of stream or a reset) rather than going quiet.
fn read_rest(s: &mut TcpStream, within: Duration) -> (usize, bool) {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (total, true),
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (total, true),
            Err(_) => return (total, false),
        }
    }
}

/// `send_timeout` (2 s here): a client that stops reading a large answer loses its connection
/// (reset, so the kernel lets go of the rest at once) and the error log says why, while a slow
/// client that keeps reading (a little every 100 ms) gets all of it: the timeout is between
/// writes, as nginx's. The worker serves on.
#[test]
fn a_client_that_stops_reading_is_cut_after_send_timeout_and_a_slow_reader_is_served() {
    let up = TestUpstream::start("u");
    let gw = Gateway::start_with(Setup {
        http_extra: vec!["send_timeout: 2s".into()],
        ..Setup::default()
    });
    gw.route("1", json!({"uri": "/big/*"}), Some(&up));
    let get = |len: usize| {
        let mut s = TcpStream::connect(format!("127.0.0.1:{}", gw.proxy_port)).unwrap();
        let req = format!("GET /big/{len} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).unwrap();
        s
    };

    // 64 MiB: far more than loopback's socket buffers hold.
    let big = 64 << 20;
    let mut stalled = get(big);
    std::thread::sleep(Duration::from_secs(5));
    let (got, closed) = read_rest(&mut stalled, Duration::from_secs(5));
    assert!(
        closed,
        "the gateway kept the connection of a client that stopped reading"
    );
    assert!(
        got < big,
        "a client that stopped reading got the whole answer ({got} bytes)"
    );
    common::eventually(Duration::from_secs(5), "the cut in the error log", || {
        gw.error_log().contains("(send_timeout)")
    });

    let len = 16 << 20;
    let mut slow = get(len);
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; 2 << 20];
    let mut total = 0;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        match slow.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => panic!("the slow reader's answer broke after {total} bytes: {e}"),
        }
    }
    assert!(
        total > len,
        "the slow reader got {total} bytes of a {len}-byte body"
    );
    assert_eq!(http("GET", &gw.url("/big/3"), &[], None).status, 200);
}

/// nginx's two waits for a request head: a keep-alive connection may stay idle between
/// requests for `keepalive_timeout` (here 60 s, longer than `client_header_timeout`, 1 s),
/// then the next head, once begun, must come whole within `client_header_timeout`.
/// `keepalive_timeout: 0s` turns keep-alive off: every answer says `Connection: close`.
#[test]
fn keepalive_and_header_timeouts_are_separate() {
    let up = TestUpstream::start("u");
    let gw = Gateway::start_with(Setup {
        http_extra: vec!["client_header_timeout: 1s".into()],
        ..Setup::default()
    });
    gw.route("1", json!({"uri": "/*"}), Some(&up));
    let s = TcpStream::connect(format!("127.0.0.1:{}", gw.proxy_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = std::io::BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let authority = format!("127.0.0.1:{}", gw.proxy_port);
    for _ in 0..2 {
        common::client::write_request(&mut w, "GET", &authority, "/a", &[], None, false).unwrap();
        let r = common::client::read_response(&mut reader, false).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), None);
        // Idle for longer than client_header_timeout: the connection is still there.
        std::thread::sleep(Duration::from_millis(1800));
    }
    // A head begun and left unfinished is cut after client_header_timeout, not keepalive's.
    w.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n").unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_millis(2500),
        "an unfinished head kept for {waited:?}"
    );
    // Closed without an answer, and logged as nginx logs it: 408.
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    common::eventually(Duration::from_secs(5), "the 408 logged", || {
        let log = std::fs::read_to_string(gw.prefix().join("logs/access.log")).unwrap_or_default();
        // $request_time: the time the client had, as nginx logs it.
        log.lines().any(|l| l.contains("\"-\" 408 0 1.000 "))
            && gw
                .error_log()
                .contains("client timed out while reading client request headers")
    });

    let config = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(
        gw.config_path(),
        config.replace("keepalive_timeout: 60s", "keepalive_timeout: 0s"),
    )
    .unwrap();
    let (s, v) = gw.admin("POST", "/wasmgate/reload", None);
    assert_eq!(s, 200, "{v}");
    common::eventually(Duration::from_secs(10), "keep-alive off", || {
        http("GET", &gw.url("/a"), &[], None).header("connection") == Some("close")
    });
    // A request sent a while after connecting is answered (and the connection closed).
    let mut s = TcpStream::connect(format!("127.0.0.1:{}", gw.proxy_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    common::client::write_request(&mut s, "GET", &authority, "/a", &[], None, false).unwrap();
    let mut reader = std::io::BufReader::new(s);
    let r = common::client::read_response(&mut reader, false).unwrap();
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
}
