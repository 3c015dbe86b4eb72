//! HTTP/1.1 toward clients, on the wire, through a running gateway: pipelining, HTTP/1.0,
//! heads refused before they reach the proxy, bodies the proxy does not read, interim
//! answers, the headers every answer carries, and clients that leave early.

mod common;

use common::client::read_response;
use common::{eventually, Gateway, TestUpstream};
use serde_json::json;
use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn connect(gw: &Gateway) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", gw.proxy_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
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

/// A request with both lengths, or a coding other than chunked last, is how requests are
/// smuggled past a proxy: 400, the connection closed, nothing sent upstream.
#[test]
fn ambiguous_request_framing_is_refused() {
    let (up, gw) = echoing();
    for head in [
        "POST /e/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST /e/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        "POST /e/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
        "GET /e/a HTTP/1.1\r\nHost: x\r\nBad Header: v\r\n\r\n",
    ] {
        let mut s = connect(&gw);
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(b"0\r\n\r\n").unwrap();
        let mut r = BufReader::new(s);
        let resp = read_response(&mut r, false).unwrap();
        assert_eq!(resp.status, 400, "{head:?}: {}", resp.text());
        assert_eq!(resp.header("connection"), Some("close"), "{head:?}");
        assert!(closed_by_gateway(&mut r), "{head:?}");
    }
    assert_eq!(up.hits(), 0);
}

/// A chunked body that breaks its framing midway is the client's fault, not the upstream's.
#[test]
fn a_broken_chunked_body_gets_400() {
    let (_up, gw) = echoing();
    let mut s = connect(&gw);
    s.write_all(
        b"POST /e/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n",
    )
    .unwrap();
    let resp = read_response(&mut BufReader::new(s), false).unwrap();
    assert_eq!(resp.status, 400, "{}", resp.text());
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
}
