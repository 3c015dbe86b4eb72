//! HTTP/1.1 toward clients, on the wire, through a running gateway: pipelining, HTTP/1.0,
//! heads refused before they reach the proxy, bodies the proxy does not read, interim
//! answers, the headers every answer carries, and clients that leave early.

mod common;

use common::client::{read_response, Resp};
use common::{eventually, Gateway, TestUpstream};
use serde_json::{json, Value};
use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn connect(gw: &Gateway) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", gw.proxy_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// The answer to `request`, sent alone on a new connection.
fn ask(gw: &Gateway, request: &str) -> Resp {
    let mut s = connect(gw);
    s.write_all(request.as_bytes()).unwrap();
    read_response(&mut BufReader::new(s), false).unwrap()
}

/// A gateway routing every path to a test upstream that echoes what it got.
fn echoing() -> (TestUpstream, Gateway) {
    let up = TestUpstream::start("e");
    let gw = Gateway::start();
    gw.route("1", json!({"uri": "/e/*"}), Some(&up));
    (up, gw)
}

/// Whether the gateway closed the connection (after whatever it still had to say).
fn closed_by_gateway(r: &mut impl Read) -> bool {
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).is_ok()
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let (_up, gw) = echoing();
    let mut s = connect(&gw);
    s.write_all(
        b"GET /e/1 HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /e/2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc\
          GET /e/3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut r = BufReader::new(s);
    for (path, len) in [("/e/1", 0), ("/e/2", 3), ("/e/3", 0)] {
        let resp = read_response(&mut r, false).unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
        let v = resp.json();
        assert_eq!(
            (v["uri"].as_str(), v["body_len"].as_u64()),
            (Some(path), Some(len))
        );
    }
    assert!(closed_by_gateway(&mut r), "Connection: close was asked for");
}

#[test]
fn http10_clients_get_http10_answers_and_keep_alive_only_when_asked() {
    let (_up, gw) = echoing();
    let mut s = connect(&gw);
    s.write_all(b"GET /e/a HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.0 200 OK\r\n"), "{out}");

    let mut s = connect(&gw);
    let ask = b"GET /e/b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
    s.write_all(ask).unwrap();
    let mut r = BufReader::new(s);
    let first = read_response(&mut r, false).unwrap();
    assert_eq!(first.header("connection"), Some("keep-alive"));
    r.get_mut().write_all(ask).unwrap();
    let second = read_response(&mut r, false).unwrap();
    assert_eq!(second.json()["uri"], "/e/b");
}

/// A request with both lengths, or a coding other than chunked alone, is how requests are
/// smuggled past a proxy: refused (400, or nginx's 501 for an unknown coding), the connection
/// closed, nothing sent upstream.
#[test]
fn ambiguous_request_framing_is_refused() {
    let (up, gw) = echoing();
    for (head, status) in [
        ("POST /e/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        ("POST /e/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 501),
        ("POST /e/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        ("POST /e/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n", 400),
        ("GET /e/a HTTP/1.1\r\nHost: x\r\nBad Header: v\r\n\r\n", 400),
        // A method in lower case (nginx's 400): `get` would pass routes limited to `GET`.
        ("get /e/a HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ] {
        let mut s = connect(&gw);
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(b"0\r\n\r\n").unwrap();
        let mut r = BufReader::new(s);
        let resp = read_response(&mut r, false).unwrap();
        assert_eq!(resp.status, status, "{head:?}: {}", resp.text());
        assert_eq!(resp.header("connection"), Some("close"), "{head:?}");
        assert!(closed_by_gateway(&mut r), "{head:?}");
    }
    assert_eq!(up.hits(), 0);
    // Each refusal is in the access log, as nginx logs its 400s.
    let log = gw.prefix().join("logs/access.log");
    common::eventually(Duration::from_secs(5), "the refusals logged", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.matches("\"-\" 400 ").count() == 4 && text.matches("\"-\" 501 ").count() == 2
    });
}

/// A chunk size line or trailer ended by a bare LF is refused: a proxy in front that ends the
/// line elsewhere would see a different request.
#[test]
fn chunked_lines_end_only_with_crlf() {
    let (_up, gw) = echoing();
    for body in ["2;\nab\r\n0\r\n\r\n", "2\r\nab\r\n0\r\nX: a\n\n"] {
        let head = "POST /e/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
        let resp = ask(&gw, &format!("{head}{body}"));
        assert_eq!(resp.status, 400, "{body:?}: {}", resp.text());
    }
}

/// Requests pipelined and then the sending side closed (`nc -N`): each request that has
/// another after it is answered. (The close after the last one reads as a client gone, which
/// abandons that request, as with hyper and nginx's default `proxy_ignore_client_abort off`.)
#[test]
fn pipelined_requests_before_a_half_close_are_answered() {
    let (_up, gw) = echoing();
    let mut s = connect(&gw);
    s.write_all(
        b"GET /e/1 HTTP/1.1\r\nHost: x\r\n\r\nGET /e/2 HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /e/3 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut r = BufReader::new(s);
    for path in ["/e/1", "/e/2"] {
        let resp = read_response(&mut r, false).unwrap();
        assert_eq!(resp.json()["uri"], path);
    }
}

/// An upstream answer with both lengths is framed by its chunks, and the client never gets a
/// byte more than the length the gateway announces (what follows would read as an answer).
#[test]
fn an_upstream_answer_with_both_lengths_cannot_split_the_response() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let smuggled = "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged";
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{smuggled}\r\n0\r\n\r\n",
                smuggled.len()
            );
            let _ = stream.write_all(answer.as_bytes());
        }
    });
    let gw = Gateway::start();
    let (status, v) = gw.admin(
        "PUT",
        "/apisix/admin/routes/1",
        Some(json!({"uri": "/*", "upstream": {"type": "roundrobin", "nodes": {addr.to_string(): 1}}})),
    );
    assert!(status == 200 || status == 201, "{v}");
    gw.wait_propagated();
    let mut s = connect(&gw);
    s.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(s);
    let resp = read_response(&mut r, false).unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-length"), None, "{:?}", resp.headers);
    assert!(resp.text().ends_with("forged"), "{}", resp.text());
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
}

/// A chunked body that breaks its framing midway is the client's fault, not the upstream's.
#[test]
fn a_broken_chunked_body_gets_400() {
    let (_up, gw) = echoing();
    let resp = ask(
        &gw,
        "POST /e/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n",
    );
    assert_eq!(resp.status, 400, "{}", resp.text());
    // So is one whose framing outweighs its data: 4 KB chunk extensions on one-byte chunks
    // (without a bound, gigabytes through the body limit, a write upstream per byte).
    let chunk = format!("1;{}\r\nA\r\n", "e".repeat(4000));
    let resp = ask(
        &gw,
        &format!(
            "POST /e/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{}0\r\n\r\n",
            chunk.repeat(10)
        ),
    );
    assert_eq!(resp.status, 400, "{}", resp.text());
    // One-byte chunks without extensions are a body like any other.
    let resp = ask(
        &gw,
        &format!(
            "POST /e/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{}0\r\n\r\n",
            "1\r\nA\r\n".repeat(5000)
        ),
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
}

#[test]
fn every_answer_carries_date_and_server() {
    let (_up, gw) = echoing();
    for path in ["/e/a", "/nowhere"] {
        let r = common::http("GET", &gw.url(path), &[], None);
        let date = r.header("date").unwrap_or_default();
        assert!(
            date.ends_with(" GMT") && date.len() == 29,
            "{path}: {date:?}"
        );
        let server = r.header("server").unwrap_or_default();
        assert!(server.starts_with("wasmgate/"), "{path}: {server:?}");
    }
}

/// A body the proxy never read (no route) is skipped, and the connection carries on; a
/// client expecting to be told to send it is not told, since the answer is already final.
#[test]
fn refused_requests_leave_their_connection_usable() {
    let (_up, gw) = echoing();
    let mut s = connect(&gw);
    s.write_all(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        .unwrap();
    let mut r = BufReader::new(s);
    assert_eq!(read_response(&mut r, false).unwrap().status, 404);
    r.get_mut()
        .write_all(b"GET /e/next HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let next = read_response(&mut r, false).unwrap();
    assert_eq!(next.json()["uri"], "/e/next");

    let mut s = connect(&gw);
    s.write_all(
        b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    let first = read_response(&mut BufReader::new(s), false).unwrap();
    assert_eq!(first.status, 404, "no 100 Continue before a final answer");
    assert_eq!(
        first.header("connection"),
        Some("close"),
        "its body never came"
    );

    // Half the body here: the answer says the connection ends, and it does.
    let mut s = connect(&gw);
    s.write_all(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        .unwrap();
    let mut r = BufReader::new(s);
    let resp = read_response(&mut r, false).unwrap();
    assert_eq!(
        (resp.status, resp.header("connection")),
        (404, Some("close"))
    );
    assert!(closed_by_gateway(&mut r));
}

/// A client that closes while its request waits on a slow upstream abandons it: the worker
/// lets the connection go at once instead of when the upstream answers.
#[test]
fn a_client_that_leaves_abandons_its_request() {
    let (up, gw) = echoing();
    gw.route("2", json!({"uri": "/delay/*"}), Some(&up));
    let mut s = connect(&gw);
    s.write_all(b"GET /delay/4000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    eventually(
        Duration::from_secs(3),
        "the request reached the upstream",
        || up.hits() == 1,
    );
    drop(s);
    let connections = || {
        gw.status()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["active_connections"].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    eventually(
        Duration::from_millis(1500),
        "the connection released",
        || connections() == 0,
    );
    // Logged and counted as nginx does, 499, naming the node it waited on.
    eventually(Duration::from_secs(5), "the 499 in the access log", || {
        let log = std::fs::read_to_string(gw.prefix().join("logs/access.log")).unwrap_or_default();
        log.lines()
            .any(|l| l.contains("\"GET /delay/4000 HTTP/1.1\" 499 ") && l.contains(&up.addr()))
    });
    assert!(
        gw.error_log()
            .contains("client prematurely closed connection, request abandoned"),
        "{}",
        gw.error_log()
    );
}

/// RFC 9112 §3.2: one valid `Host` (required in HTTP/1.1) or 400, as nginx answers; an
/// absolute-form target names the host, for routing and upstream alike, whatever `Host` says;
/// an HTTP/1.0 request without one still reaches the upstream with a `Host` (the node's).
#[test]
fn the_host_is_one_valid_field_or_the_targets() {
    let (up, gw) = echoing();
    gw.route(
        "h",
        json!({"uri": "/h/*", "host": "abs.example"}),
        Some(&up),
    );
    for head in [
        "GET /e/a HTTP/1.1\r\n\r\n",
        "GET /e/a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        "GET /e/a HTTP/1.1\r\nHost: a/../b\r\n\r\n",
        "GET /e/a HTTP/1.1\r\nHost: a b\r\n\r\n",
        "GET /e/a HTTP/1.1\r\nHost:\r\n\r\n",
        "GET http://u@abs.example/h/a HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let resp = ask(&gw, head);
        assert_eq!(resp.status, 400, "{head:?}: {}", resp.text());
    }
    assert_eq!(up.hits(), 0);

    let get = |head: &str| ask(&gw, head);
    let r = get("GET http://abs.example/h/a?q=1 HTTP/1.1\r\nHost: other\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.json();
    assert_eq!(seen["uri"], "/h/a?q=1");
    assert_eq!(seen["headers"]["host"], "abs.example");
    assert_eq!(seen["headers"]["x-forwarded-host"], "abs.example");
    let r = get("GET http://other/h/a HTTP/1.1\r\nHost: abs.example\r\n\r\n");
    assert_eq!(r.status, 404, "routed by the Host field: {}", r.text());
    let r = get("GET /h/a HTTP/1.1\r\nHost: ABS.example.:80\r\n\r\n");
    assert_eq!(
        r.status,
        200,
        "the name's case, root dot and port: {}",
        r.text()
    );

    let r = get("GET /e/old HTTP/1.0\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["headers"]["host"], up.addr().as_str());
    // With no `Host` there is no host to forward, and the client's claim is not passed on
    // in its place: `X-Forwarded-Host` goes only from a trusted client.
    let r = get("GET /e/old HTTP/1.0\r\nX-Forwarded-Host: evil.test\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["headers"]["x-forwarded-host"],
        Value::Null,
        "{}",
        r.text()
    );

    // A target with no path goes on as `/`, its query kept.
    gw.route(
        "root",
        json!({"uri": "/", "host": "root.example"}),
        Some(&up),
    );
    gw.wait_propagated();
    let r = get("GET http://root.example?q=1 HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["uri"], "/?q=1");
}

/// What a client puts in its request that the upstream must not get as it came: framing
/// fields among the trailers, a `Content-Length` repeated, a chunk size with anything but
/// extensions after it.
#[test]
fn framing_fields_reach_the_upstream_once_and_never_as_trailers() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let node = listener.local_addr().unwrap().to_string();
    // One request at a time: what the upstream read, answered once it stops coming.
    let captured = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
    let sink = captured.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            conn.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            sink.lock().unwrap().push(got);
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    let gw = Gateway::start();
    gw.route(
        "raw",
        json!({"uri": "/raw", "upstream": {"type": "roundrobin", "nodes": {node.as_str(): 1}}}),
        None,
    );
    let send = |req: &str| ask(&gw, req);
    let r = send(
        "POST /raw HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
         5\r\nhello\r\n0\r\nX-Sum: 7\r\nContent-Length: 99\r\nHost: evil\r\nX-Real-IP: 6.6.6.6\r\n\r\n",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r =
        send("POST /raw HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc");
    assert_eq!(r.status, 200, "{}", r.text());
    let seen: Vec<String> = captured
        .lock()
        .unwrap()
        .iter()
        .map(|b| String::from_utf8_lossy(b).to_ascii_lowercase())
        .collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let trailers = seen[0].split("\r\n0\r\n").nth(1).unwrap_or_default();
    assert!(trailers.contains("x-sum: 7"), "{}", seen[0]);
    for barred in ["content-length", "host", "x-real-ip"] {
        assert!(
            !trailers.contains(barred),
            "{barred} in the trailers: {}",
            seen[0]
        );
    }
    assert_eq!(
        seen[1].matches("content-length: 3").count(),
        1,
        "{}",
        seen[1]
    );

    for body in ["0x5\r\nhello\r\n0\r\n\r\n", "5 zz\r\nhello\r\n0\r\n\r\n"] {
        let head = "POST /raw HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
        let r = send(&format!("{head}{body}"));
        assert_eq!(r.status, 400, "{body:?}: {}", r.text());
    }
    let r = send("POST /raw HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5 ;a=b\r\nhello\r\n0\r\n\r\n");
    assert_eq!(
        r.status,
        200,
        "a chunk extension after whitespace: {}",
        r.text()
    );
}

/// Routes are matched on the path as nginx resolves it (`$uri`): dot segments, escapes and
/// doubled slashes cannot take a request for `/admin/...` past the `/admin/*` route to the
/// catch-all one, nor one for `/public/...` into it; a path with dot segments goes upstream
/// resolved, so the node serves the path the route was chosen by, and any other as written
/// (an escaped slash stays escaped). A path that climbs above the root or has a broken
/// escape is refused.
#[test]
fn routes_match_the_resolved_path() {
    let admin = TestUpstream::start("admin");
    let public = TestUpstream::start("public");
    let gw = Gateway::start();
    gw.route("admin", json!({"uri": "/admin/*"}), Some(&admin));
    gw.route("all", json!({"uri": "/*"}), Some(&public));
    for path in [
        "/admin/x",
        "/public/../admin/x",
        "/%61dmin/x",
        "/public/%2e%2e/admin/x",
        "//admin/x",
        "/x/..%2Fadmin/x",
        "/admin%2Fx",
        "/./admin/./x",
    ] {
        let r = get_raw(&gw, &format!("{path}?q=1"));
        assert_eq!(
            (r.status, r.header("x-upstream")),
            (200, Some("admin")),
            "{path}"
        );
        let seen: serde_json::Value = serde_json::from_str(&r.text()).unwrap();
        let sent = match path.contains("/.") || path.contains("%2e") || path.contains("..%2F") {
            true => "/admin/x?q=1".to_string(),
            false => format!("{path}?q=1"),
        };
        assert_eq!(
            seen["uri"], sent,
            "{path}: dot segments resolved, nothing else"
        );
    }
    for path in ["/public/x", "/admin/../public/x", "/admin/%2e%2e/public/x"] {
        let r = get_raw(&gw, path);
        assert_eq!(r.header("x-upstream"), Some("public"), "{path}");
        let seen: serde_json::Value = serde_json::from_str(&r.text()).unwrap();
        assert_eq!(
            seen["uri"], "/public/x",
            "{path}: no /admin/ for the node to read"
        );
    }
    let seen: serde_json::Value = serde_json::from_str(&get_raw(&gw, "/a%20b/%25").text()).unwrap();
    assert_eq!(
        seen["uri"], "/a%20b/%25",
        "escapes a path needs stay escaped"
    );
    for path in ["/..", "/a/../../admin/x", "/%zz", "/a%00b"] {
        assert_eq!(get_raw(&gw, path).status, 400, "{path}");
    }
    // Bytes that are not UTF-8 go on as they came when the dots are resolved.
    let r = get_raw(&gw, "/admin/caf%e9/./x");
    assert_eq!(r.header("x-upstream"), Some("admin"));
    let seen: serde_json::Value = serde_json::from_str(&r.text()).unwrap();
    assert_eq!(seen["uri"], "/admin/caf%E9/x");
}

/// A GET of `target` exactly as written (clients resolve dot segments themselves).
fn get_raw(gw: &Gateway, target: &str) -> Resp {
    ask(
        gw,
        &format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
}
