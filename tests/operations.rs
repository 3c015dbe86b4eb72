//! Operating a running gateway: request ids, the access-log format, and reopening logs on
//! SIGUSR1 (logrotate's way).

mod common;

use common::{eventually, http, Gateway, Setup, TestUpstream};
use serde_json::json;
use std::time::Duration;

fn access_log(gw: &Gateway) -> String {
    std::fs::read_to_string(gw.prefix().join("logs/access.log")).unwrap_or_default()
}

/// nginx's request variables in the access-log format: `$http_<field>` as sent (`$http_host`
/// keeps its case and port, where `$host` is the routing host), `$arg_<name>`, `$cookie_<name>`,
/// `$remote_user` from Basic credentials, and what went upstream — APISIX's own default format
/// ends with `"$upstream_scheme://$upstream_host$upstream_uri"`.
#[test]
fn request_variables_in_the_access_log_format() {
    let up = TestUpstream::start("u");
    let format = "$remote_user|$http_host|$host|$arg_page|$cookie_sid|$http_x_trace|\
                  $upstream_scheme://$upstream_host$upstream_uri|$uri|$args|$server_protocol|$scheme";
    let gw = Gateway::start_with(Setup {
        http_extra: vec![format!("access_log_format: \"{format}\"")],
        workers: 1,
        ..Setup::default()
    });
    gw.route("vars", json!({"uri": "/vars/*"}), Some(&up));
    let r = http(
        "GET",
        &gw.url("/vars/x?page=2&b=1"),
        &[
            ("Host", "Example.COM:8443"),
            ("Cookie", "a=1; sid=s9"),
            ("X-Trace", "t1"),
            // bob:pw
            ("Authorization", "Basic Ym9iOnB3"),
        ],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = http("GET", &gw.url("/nowhere"), &[], None);
    assert_eq!(r.status, 404);
    // `$uri` decoded, as nginx's (and as routes match it).
    let r = http("GET", &gw.url("/vars/caf%C3%A9"), &[], None);
    assert_eq!(r.status, 200);
    eventually(Duration::from_secs(5), "access log lines", || {
        let log = access_log(&gw);
        log.contains(
            "bob|Example.COM:8443|example.com|2|s9|t1|\
             http://Example.COM:8443/vars/x?page=2&b=1|/vars/x|page=2&b=1|HTTP/1.1|http\n",
        ) && log.contains("|/vars/caf\u{e9}|")
            && log.contains(&format!(
                "-|127.0.0.1:{}|127.0.0.1|-|-|-|-://--|/nowhere|-|HTTP/1.1|http\n",
                gw.proxy_port
            ))
    });
}

/// `access_log_format_escape: json` (APISIX's key, nginx's `escape=json`): a format that
/// writes JSON stays JSON whatever a client sends; an absent value is empty, not `-`.
#[test]
fn json_escaped_access_log_lines_parse() {
    let up = TestUpstream::start("u");
    let gw = Gateway::start_with(Setup {
        http_extra: vec![
            "access_log_format_escape: json".into(),
            r#"access_log_format: '{"ua":"$http_user_agent","ref":"$http_referer","status":$status}'"#
                .into(),
        ],
        workers: 1,
        ..Setup::default()
    });
    gw.route("j", json!({"uri": "/j"}), Some(&up));
    let ua = "evil\" \\ \t\"status\":1}";
    let r = http("GET", &gw.url("/j"), &[("User-Agent", ua)], None);
    assert_eq!(r.status, 200);
    eventually(Duration::from_secs(5), "the access log line", || {
        !access_log(&gw).is_empty()
    });
    let log = access_log(&gw);
    let line: serde_json::Value =
        serde_json::from_str(log.lines().next().unwrap()).unwrap_or_else(|e| panic!("{e}: {log}"));
    assert_eq!(line, json!({"ua": ua, "ref": "", "status": 200}));
}

/// A request without `X-Request-Id` gets one, seen by the upstream, the client, plugins and
/// the access log; a client's own id is kept.
#[test]
fn request_ids_and_the_access_log_format() {
    let up = TestUpstream::start("u");
    let gw = Gateway::start_with(Setup {
        http_extra: vec![
            r#"access_log_format: "$request_id $status $request_method $request_uri $route_id $http_user_agent""#
                .into(),
        ],
        ..Setup::default()
    });
    gw.route("ids", json!({"uri": "/ids"}), Some(&up));
    gw.route(
        "echo",
        json!({"uri": "/echo", "plugins": {"echo": {"conf": "-"}}}),
        Some(&up),
    );

    let r = http("GET", &gw.url("/ids?a=1"), &[], None);
    assert_eq!(r.status, 200);
    let id = r.header("x-request-id").unwrap().to_string();
    assert_eq!(id.len(), 36, "{id}");
    assert_eq!(r.json()["headers"]["x-request-id"], id.as_str());
    let r = http("GET", &gw.url("/ids"), &[("X-Request-Id", "abc-123")], None);
    assert_eq!(r.header("x-request-id"), Some("abc-123"));
    assert_eq!(r.json()["headers"]["x-request-id"], "abc-123");

    let r = http(
        "GET",
        &gw.url("/echo"),
        &[("X-Request-Id", "from-client")],
        None,
    );
    assert_eq!(r.status, 200);
    let headers = r.json()["headers"].as_array().unwrap().clone();
    assert!(
        headers.contains(&json!(["x-request-id", "from-client"])),
        "{headers:?}"
    );

    // Two ids: the first is the request's, for the node too (not both).
    let r = http(
        "GET",
        &gw.url("/ids?two"),
        &[
            ("X-Request-Id", "one"),
            ("X-Request-Id", "two"),
            ("User-Agent", "café/1.0"),
        ],
        None,
    );
    assert_eq!(r.header("x-request-id"), Some("one"));
    assert_eq!(r.json()["headers"]["x-request-id"], "one");

    eventually(Duration::from_secs(5), "access log lines", || {
        let log = access_log(&gw);
        log.contains(&format!("{id} 200 GET /ids?a=1 ids -\n"))
            && log.contains("abc-123 200 GET /ids ids -\n")
            // Text that is not ASCII is logged as it came, not as `-`.
            && log.contains("one 200 GET /ids?two ids café/1.0\n")
    });

    // An unknown variable is refused at reload, naming it; the old format keeps going.
    let yaml = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(gw.config_path(), yaml.replace("$route_id ", "$nope ")).unwrap();
    let (s, v) = gw.admin("POST", "/wasmgate/reload", None);
    assert_eq!(s, 400, "{v}");
    assert!(v["error_msg"].as_str().unwrap().contains("$nope"), "{v}");
}

/// `wasmgate reopen` (SIGUSR1) makes the master and every worker reopen their log files: after
/// logrotate renamed them, new lines go to fresh files.
#[test]
fn sigusr1_reopens_the_logs() {
    let up = TestUpstream::start("u");
    let gw = Gateway::start();
    gw.route("r", json!({"uri": "/r"}), Some(&up));
    assert_eq!(http("GET", &gw.url("/r"), &[], None).status, 200);
    eventually(Duration::from_secs(5), "the first access line", || {
        access_log(&gw).contains("GET /r")
    });
    let logs = gw.prefix().join("logs");
    std::fs::rename(logs.join("access.log"), logs.join("access.log.1")).unwrap();
    std::fs::rename(logs.join("error.log"), logs.join("error.log.1")).unwrap();
    // `wasmgate reopen` sends SIGUSR1 to the master through the pid file.
    common::run_ok(
        std::process::Command::new(common::bin())
            .args(["reopen", "-p"])
            .arg(gw.prefix()),
    );
    eventually(Duration::from_secs(5), "a new error log", || {
        std::fs::read_to_string(logs.join("error.log")).is_ok_and(|l| l.contains("logs reopened"))
    });
    for _ in 0..4 {
        assert_eq!(http("GET", &gw.url("/r?after"), &[], None).status, 200);
    }
    eventually(
        Duration::from_secs(5),
        "new access lines in the new file",
        || access_log(&gw).matches("GET /r?after").count() == 4,
    );
    let old = std::fs::read_to_string(logs.join("access.log.1")).unwrap();
    assert!(!old.contains("GET /r?after"));
    let old_err = std::fs::read_to_string(logs.join("error.log.1")).unwrap();
    assert!(!old_err.contains("logs reopened"));
}
