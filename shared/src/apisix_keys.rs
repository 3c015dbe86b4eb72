//! APISIX config.yaml keys that wasmgate has no use for, so that an APISIX installation's
//! config.yaml loads as it is.
//!
//! Each key here tunes something wasmgate does not have (Lua, nginx internals, an etcd client
//! setting), or holds the value that is what wasmgate does anyway. Such a key is set aside
//! before the file is parsed (its lines blanked, so errors keep their line numbers) and named
//! in a warning at `start`, `reload` and `test`. A key whose value asks for what wasmgate does
//! not do (a Lua router that ignores hosts, an Admin API open to a network) is
//! refused with the reason; any key not listed stays an error, as a misspelt key must.

use crate::yaml_lines::{line_of, Step};
use serde_norway::Value;
use std::borrow::Cow;

/// What to make of a key that is present.
enum Rule {
    /// Set aside whatever its value, with this reason in the warning.
    Ignore(&'static str),
    /// Set aside when its value (as YAML writes the scalar) is one of these; refused otherwise
    /// with the reason.
    OnlyWith(&'static [&'static str], &'static str),
    /// Set aside when the check finds nothing against it (given the whole file); refused with
    /// what it says otherwise.
    Check(fn(&Value, &Value) -> Option<String>, &'static str),
}

use Rule::*;

const NO_LUA: &str = "wasmgate runs no Lua";
const RESOLVER: &str = "node names are resolved by the system's resolver when a worker connects";
const SNIPPET: &str = "nginx configuration snippets are not supported";

/// The keys, by path.
const KEYS: &[(&[&str], Rule)] = &[
    (&["apisix", "enable_ipv6"], Ignore("the listeners are node_listen's addresses: list `[::]` ones there")),
    (&["apisix", "enable_dev_mode"], Ignore(NO_LUA)),
    (&["apisix", "enable_debug"], Ignore(NO_LUA)),
    (&["apisix", "enable_reuseport"], Ignore("the workers share each listener")),
    (&["apisix", "enable_server_tokens"], OnlyWith(&["true"], "the Server header always names wasmgate and its version")),
    (&["apisix", "show_upstream_status_in_response_header"], OnlyWith(&["false"], "the upstream's status is not added to answers")),
    (&["apisix", "enable_control"], Ignore("there is no control API: `wasmgate status` and the metrics tell what it told")),
    (&["apisix", "control"], Ignore("there is no control API")),
    (&["apisix", "resolver_timeout"], Ignore(RESOLVER)),
    (&["apisix", "dns_resolver"], Ignore(RESOLVER)),
    (&["apisix", "dns_resolver_valid"], Ignore(RESOLVER)),
    (&["apisix", "enable_resolv_search_opt"], Ignore(RESOLVER)),
    (&["apisix", "worker_startup_time_threshold"], Ignore(NO_LUA)),
    (&["apisix", "extra_lua_path"], Ignore(NO_LUA)),
    (&["apisix", "extra_lua_cpath"], Ignore(NO_LUA)),
    (&["apisix", "lua_module_hook"], Ignore(NO_LUA)),
    (&["apisix", "disable_sync_configuration_during_start"], Ignore("workers serve once the master has the configuration")),
    (&["apisix", "config_center"], OnlyWith(&["etcd"], "routes live in deployment.etcd or the data directory; there is no apisix.yaml")),
    (&["apisix", "delete_uri_tail_slash"], OnlyWith(&["false"], "a trailing slash is part of the path routes match")),
    (&["apisix", "normalize_uri_like_servlet"], OnlyWith(&["false"], "`;` is not special in paths")),
    (&["apisix", "proxy_mode"], OnlyWith(&["http"], "wasmgate proxies HTTP, not TCP or UDP streams")),
    (&["apisix", "router"], Check(router, "wasmgate routes as APISIX's radixtree_host_uri")),
    (&["apisix", "ssl", "ssl_ciphers"], Ignore("rustls's suites are offered: TLS 1.3's, and TLS 1.2's ECDHE with AES-GCM or ChaCha20-Poly1305")),
    (&["apisix", "ssl", "ssl_trusted_combined_path"], Ignore("the CAs are read from ssl_trusted_certificate")),
    (&["nginx_config", "user"], Ignore("the gateway runs as the user that starts it")),
    (&["nginx_config", "worker_rlimit_nofile"], Ignore("raise the limit with ulimit or the service manager's LimitNOFILE")),
    (&["nginx_config", "worker_rlimit_core"], Ignore("core dumps follow the service manager's limits")),
    (&["nginx_config", "enable_cpu_affinity"], Ignore("workers are not pinned")),
    (&["nginx_config", "max_pending_timers"], Ignore(NO_LUA)),
    (&["nginx_config", "max_running_timers"], Ignore(NO_LUA)),
    (&["nginx_config", "event"], Ignore("connections per worker are not capped; client_header_timeout and the limits bound what each holds")),
    (&["nginx_config", "envs"], Ignore("workers inherit the master's environment")),
    (&["nginx_config", "meta"], Ignore(NO_LUA)),
    (&["nginx_config", "stream"], Ignore("there are no stream listeners")),
    (&["nginx_config", "main_configuration_snippet"], Check(no_snippet, SNIPPET)),
    (&["nginx_config", "http_configuration_snippet"], Check(no_snippet, SNIPPET)),
    (&["nginx_config", "http_server_configuration_snippet"], Check(no_snippet, SNIPPET)),
    (&["nginx_config", "http_server_location_configuration_snippet"], Check(no_snippet, SNIPPET)),
    (&["nginx_config", "http_admin_configuration_snippet"], Check(no_snippet, SNIPPET)),
    (&["nginx_config", "http_end_configuration_snippet"], Check(no_snippet, SNIPPET)),
    (&["nginx_config", "stream_configuration_snippet"], Check(no_snippet, SNIPPET)),
    (&["nginx_config", "http", "access_log_buffer"], Ignore("access-log lines are written in batches, at least every 200 ms")),
    (&["nginx_config", "http", "underscores_in_headers"], OnlyWith(&["on"], "header names with `_` are passed on")),
    (&["nginx_config", "http", "charset"], Ignore("answers keep the upstream's Content-Type")),
    (&["nginx_config", "http", "variables_hash_max_size"], Ignore("an nginx internal")),
    (&["nginx_config", "http", "lua_shared_dict"], Ignore(NO_LUA)),
    (&["nginx_config", "http", "custom_lua_shared_dict"], Ignore(NO_LUA)),
    (&["nginx_config", "http", "proxy_ssl_server_name"], Ignore("SNI is sent to `https` nodes: the host of the request's Host")),
    (&["deployment", "role_traditional"], Check(etcd_provider, "routes live in deployment.etcd or the data directory")),
    (&["deployment", "admin", "admin_api_version"], OnlyWith(&["v3"], "the Admin API answers in APISIX's v3 shapes")),
    (&["deployment", "admin", "enable_admin_ui"], Ignore("there is no dashboard; `wasmgate tui` is the console")),
    (&["deployment", "admin", "https_admin"], OnlyWith(&["false"], "the Admin API speaks plain HTTP: keep it on loopback")),
    (&["deployment", "admin", "allow_admin"], Check(loopback_admin, "the Admin API has no address filter")),
    (&["deployment", "etcd", "watch_timeout"], Ignore("an etcd client setting of APISIX's")),
    (&["deployment", "etcd", "tls"], Check(etcd_tls, "no TLS setting is made")),
    (&["deployment", "etcd", "resync_delay"], Ignore("an etcd client setting of APISIX's")),
    (&["deployment", "etcd", "health_check_timeout"], Ignore("an etcd client setting of APISIX's")),
    (&["deployment", "etcd", "use_grpc"], OnlyWith(&["false"], "wasmgate reads etcd over its HTTP gateway")),
    (&["plugins"], Ignore("the plugins are the wasm plugins of wasm.plugins")),
    (&["stream_plugins"], Ignore("there are no stream listeners")),
    (&["graphql"], Ignore("routes do not match on GraphQL")),
    (&["plugin_attr", "prometheus", "refresh_interval"], Ignore("the metrics are read when scraped")),
    (&["plugin_attr", "prometheus", "default_buckets"], Ignore("the latency histograms have fixed buckets")),
    (&["plugin_attr", "prometheus", "metrics"], Ignore("the metrics have fixed labels")),
    (&["plugin_attr", "prometheus", "prefer_name"], Ignore("metrics name routes by id")),
];

/// An nginx snippet: only one that holds nothing but nginx comments (as APISIX's sample
/// config.yaml has them).
fn no_snippet(v: &Value, _: &Value) -> Option<String> {
    let empty = match v {
        Value::Null => true,
        Value::String(s) => s.lines().all(|l| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#')
        }),
        _ => false,
    };
    (!empty).then(|| format!("{SNIPPET}: this one would change how requests are served"))
}

/// `apisix.router`: the default routers only.
fn router(v: &Value, _: &Value) -> Option<String> {
    if !v.is_mapping() {
        return Some(
            "apisix.router: expected a mapping, {http: radixtree_host_uri, ssl: radixtree_sni}"
                .into(),
        );
    }
    let http = v.get("http").and_then(Value::as_str);
    let ssl = v.get("ssl").and_then(Value::as_str);
    match (http, ssl) {
        (Some(h), _) if h != "radixtree_host_uri" => Some(format!(
            "apisix.router.http: {h} is not supported: wasmgate routes as radixtree_host_uri \
             (routes with hosts first)"
        )),
        (_, Some(s)) if s != "radixtree_sni" => Some(format!(
            "apisix.router.ssl: {s} is not supported (certificates are chosen as radixtree_sni does)"
        )),
        _ => None,
    }
}

const SSL_OFF: &str = "a setting of the TLS listener, which is off";

/// The keys of `apisix.ssl` read whether the TLS listener is on or off.
const SSL_ALWAYS_READ: [&str; 2] = ["enable", "ssl_trusted_certificate"];

/// Whether the file switches the TLS listener off (`ssl.enable: false`): then the settings
/// of APISIX's listener that wasmgate does not know are set aside rather than refused.
fn ssl_listener_off(root: &Value) -> bool {
    lookup(root, &["apisix", "ssl", "enable"]).and_then(Value::as_bool) == Some(false)
}

/// `deployment.role_traditional`: the etcd provider (wasmgate's data directory stands in
/// when there is no etcd).
fn etcd_provider(v: &Value, _: &Value) -> Option<String> {
    match v.get("config_provider").and_then(Value::as_str) {
        None | Some("etcd") => None,
        Some(p) => Some(format!(
            "deployment.role_traditional.config_provider: {p} is not supported: routes live \
             in deployment.etcd, or in the data directory through the Admin API"
        )),
    }
}

/// Whether a value says nothing: absent, empty text or an empty mapping.
fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Mapping(m) => m.is_empty(),
        _ => false,
    }
}

/// `deployment.etcd.tls`: wasmgate's etcd client speaks plain HTTP. APISIX's default
/// (`verify: true` alone, which only matters for https:// endpoints) changes nothing here.
fn etcd_tls(v: &Value, _: &Value) -> Option<String> {
    let verify_only = v
        .as_mapping()
        .is_some_and(|m| m.keys().all(|k| k.as_str() == Some("verify")));
    let off = matches!(v, Value::Bool(false));
    (!is_empty(v) && !verify_only && !off).then(|| {
        "deployment.etcd.tls: TLS to etcd is not supported: the endpoints are http:// ones \
         (on a private network), or leave this key out"
            .into()
    })
}

/// `deployment.admin.allow_admin`: harmless only when it allows loopback alone and the Admin
/// API listens on loopback, which is what wasmgate does by default.
fn loopback_admin(v: &Value, root: &Value) -> Option<String> {
    // A network inside 127.0.0.0/8, or ::1 itself: `127.0.0.1/0` is every address.
    let loopback = |s: &str| {
        crate::model::vars::Cidr::parse(s).is_some_and(|c| match c.parts() {
            (std::net::IpAddr::V4(ip), bits) => ip.is_loopback() && bits >= 8,
            (std::net::IpAddr::V6(ip), bits) => ip.is_loopback() && bits == 128,
        })
    };
    let listed = v.as_sequence().map(|l| l.iter().filter_map(Value::as_str));
    let all_loopback = listed.is_some_and(|mut l| l.all(loopback));
    let listen_ip = root
        .get("deployment")
        .and_then(|d| d.get("admin"))
        .and_then(|a| a.get("admin_listen"))
        .and_then(|l| l.get("ip"))
        .and_then(Value::as_str)
        .unwrap_or("127.0.0.1");
    (!(all_loopback && loopback(listen_ip))).then(|| {
        "deployment.admin.allow_admin is not supported: the Admin API has no address filter; \
         keep deployment.admin.admin_listen on loopback (the default) or filter it with a \
         firewall"
            .into()
    })
}

/// The text with the keys above set aside (their lines blanked), and a warning for each.
/// Text that is not YAML comes back as it is: the parser reports it.
pub fn set_aside(text: &str) -> Result<(Cow<'_, str>, Vec<String>), (usize, String)> {
    let Ok(root) = serde_norway::from_str::<Value>(text) else {
        return Ok((Cow::Borrowed(text), Vec::new()));
    };
    let mut found: Vec<(Vec<&str>, String)> = Vec::new();
    for (path, rule) in KEYS {
        let Some(value) = lookup(&root, path) else {
            continue;
        };
        let dotted = path.join(".");
        let why = match rule {
            Ignore(why) => why.to_string(),
            OnlyWith(allowed, why) => {
                let shown = scalar(value);
                if !allowed.contains(&shown.as_str()) {
                    return Err((
                        line(text, path),
                        format!("{dotted}: {shown} is not supported ({why})"),
                    ));
                }
                format!("{shown} is what wasmgate does")
            }
            Check(check, why) => {
                if let Some(refusal) = check(value, &root) {
                    return Err((line(text, path), refusal));
                }
                why.to_string()
            }
        };
        found.push((path.to_vec(), why));
    }
    // The settings of a TLS listener that is off, whatever they are (APISIX's, or ones wasmgate
    // reads: they ask nothing of a listener that does not run, and are not checked). With the
    // listener on, an unknown one stays an error (a misspelt key must not pass unnoticed).
    if let Some(ssl) = lookup(&root, &["apisix", "ssl"]).and_then(Value::as_mapping) {
        if ssl_listener_off(&root) {
            for key in ssl.keys().filter_map(Value::as_str) {
                let path = ["apisix", "ssl", key];
                let ruled = KEYS.iter().any(|(p, _)| *p == path);
                if !SSL_ALWAYS_READ.contains(&key) && !ruled {
                    found.push((path.to_vec(), SSL_OFF.into()));
                }
            }
        }
    }
    // Settings of plugins wasmgate does not have.
    if let Some(attrs) = root.get("plugin_attr").and_then(Value::as_mapping) {
        for key in attrs.keys().filter_map(Value::as_str) {
            if key != "prometheus" {
                found.push((
                    vec!["plugin_attr", key],
                    "a plugin wasmgate does not have".into(),
                ));
            }
        }
    }
    if found.is_empty() {
        return Ok((Cow::Borrowed(text), Vec::new()));
    }
    let mut lines: Vec<String> = text.split('\n').map(str::to_owned).collect();
    let mut warnings = Vec::new();
    for (path, why) in &found {
        let dotted = path.join(".");
        if blank(&mut lines, text, path) {
            warnings.push(format!(
                "{dotted}: ignored, an APISIX setting wasmgate has no use for: {why}"
            ));
        }
        // Else the key is written where lines cannot be blanked (inside `{…}`): the parser
        // refuses it as unknown.
    }
    // A section left with no key reads as `{}`, not as nothing.
    for (path, _) in &found {
        for depth in (1..path.len()).rev() {
            let parent = &path[..depth];
            let emptied = lookup(&root, parent)
                .and_then(Value::as_mapping)
                .is_some_and(|m| {
                    m.keys().filter_map(Value::as_str).all(|k| {
                        found.iter().any(|(p, _)| {
                            p.len() == depth + 1 && p[..depth] == *parent && p[depth] == k
                        })
                    })
                });
            if emptied {
                let n = line(text, parent);
                if let Some(l) = n.checked_sub(1).and_then(|i| lines.get_mut(i)) {
                    if l.trim_end().ends_with(':') {
                        l.push_str(" {}");
                    }
                }
            }
        }
    }
    Ok((Cow::Owned(lines.join("\n")), warnings))
}

fn lookup<'v>(root: &'v Value, path: &[&str]) -> Option<&'v Value> {
    path.iter().try_fold(root, |v, k| v.as_mapping()?.get(*k))
}

/// A scalar as config.yaml would write it (`true`, `v3`, `` for an empty string, `~` for null).
fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "~".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_string(),
        _ => "(a mapping or list)".into(),
    }
}

fn line(text: &str, path: &[&str]) -> usize {
    let steps: Vec<Step> = path.iter().map(|k| Step::Key(k)).collect();
    line_of(text, &steps)
}

/// Blanks the lines of the key at `path` — its own and the more indented ones under it.
/// False when its line is not `key:` of a block mapping.
fn blank(lines: &mut [String], text: &str, path: &[&str]) -> bool {
    let key = path[path.len() - 1];
    let Some(at) = line(text, path).checked_sub(1) else {
        return false;
    };
    let Some(first) = lines.get(at) else {
        return false;
    };
    let indent = first.len() - first.trim_start().len();
    let code = first.trim_start();
    let named = [key.to_string(), format!("\"{key}\""), format!("'{key}'")]
        .iter()
        .any(|k| {
            code.strip_prefix(k.as_str())
                .is_some_and(|r| r.trim_start().starts_with(':'))
        });
    if !named {
        return false;
    }
    // `key:` with nothing after it may have its list's items at its own indentation.
    let block_value = code
        .split_once(':')
        .is_some_and(|(_, v)| v.trim().is_empty() || v.trim_start().starts_with('#'));
    lines[at].clear();
    for l in lines[at + 1..].iter_mut() {
        let t = l.trim_start();
        let own_item = block_value && (t.starts_with("- ") || t == "-");
        let column = l.len() - t.len();
        let text = !t.is_empty() && !t.starts_with('#');
        if text && (column < indent || (column == indent && !own_item)) {
            break;
        }
        l.clear();
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignored_keys_are_blanked_and_named() {
        let y = "apisix:\n  node_listen: 9080\n  enable_ipv6: false\n  router:\n    http: radixtree_host_uri\nnginx_config:\n  event:\n    worker_connections: 10620\n  http:\n    charset: utf-8\nplugin_attr:\n  log-rotate:\n    interval: 3600\nplugins:\n  - key-auth\n  - wasm\n";
        let (text, warnings) = set_aside(y).unwrap();
        assert_eq!(text.lines().count(), y.lines().count());
        assert_eq!(
            text,
            "apisix:\n  node_listen: 9080\n\n\n\nnginx_config:\n\n\n  http: {}\n\nplugin_attr: {}\n\n\n\n\n\n"
        );
        assert_eq!(warnings.len(), 6, "{warnings:?}");
        assert!(
            warnings[0].starts_with("apisix.enable_ipv6: ignored, an APISIX setting"),
            "{warnings:?}"
        );
    }

    /// A list whose items stand at the key's own indentation (valid YAML) goes with it; the
    /// next key does not.
    #[test]
    fn lists_at_the_keys_indentation() {
        let y = "plugins:\n- key-auth\n- wasm\napisix:\n  node_listen: 9080\n";
        let (text, warnings) = set_aside(y).unwrap();
        assert_eq!(text, "\n\n\napisix:\n  node_listen: 9080\n");
        assert_eq!(warnings.len(), 1);
        let y = "deployment:\n  admin:\n    allow_admin:\n    - 127.0.0.0/24\n    admin_listen: {ip: 127.0.0.1, port: 9180}\n";
        let (text, _) = set_aside(y).unwrap();
        assert_eq!(
            text,
            "deployment:\n  admin:\n\n\n    admin_listen: {ip: 127.0.0.1, port: 9180}\n"
        );
        let (_, msg) = set_aside("apisix:\n  router: radixtree_uri\n").unwrap_err();
        assert!(msg.contains("expected a mapping"), "{msg}");
        let (_, msg) =
            set_aside("deployment:\n  admin:\n    allow_admin: [127.0.0.1/0]\n").unwrap_err();
        assert!(msg.contains("no address filter"), "{msg}");
    }

    #[test]
    fn values_wasmgate_does_not_serve_are_refused_with_their_line() {
        let (line, msg) = set_aside("apisix:\n  router:\n    http: radixtree_uri\n").unwrap_err();
        assert_eq!(line, 2);
        assert!(msg.contains("radixtree_uri is not supported"), "{msg}");
        // The TLS listener's settings are read; APISIX's cipher list is set aside.
        let on = "apisix:\n  ssl:\n    enable: true\n    listen: [9443]\n    ssl_ciphers: ECDHE-RSA-AES128-GCM-SHA256\n";
        let (text, warnings) = set_aside(on).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            text.contains("listen: [9443]") && !text.contains("ECDHE"),
            "{text}"
        );
        // The settings of a listener that is off are set aside, whatever they say.
        let off = "apisix:\n  ssl:\n    enable: false\n    ssl_protocols_x: 1\n    ssl_protocols: TLSv1.1\n    listen: [{port: 9443, enable_http2: true}]\n    ssl_trusted_certificate: system\n";
        let (text, warnings) = set_aside(off).unwrap();
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(text.contains("ssl_trusted_certificate: system"), "{text}");
        let (_, msg) =
            set_aside("deployment:\n  admin:\n    allow_admin: [0.0.0.0/0]\n").unwrap_err();
        assert!(msg.contains("no address filter"), "{msg}");
        let ok = "deployment:\n  admin:\n    allow_admin:\n      - 127.0.0.0/24\n";
        assert_eq!(set_aside(ok).unwrap().1.len(), 1);
        let (_, msg) = set_aside("nginx_config:\n  http_configuration_snippet: |\n    gzip on;\n")
            .unwrap_err();
        assert!(msg.contains("snippets"), "{msg}");
        let empty = "nginx_config:\n  http_configuration_snippet: |\n    # nothing\n";
        assert_eq!(set_aside(empty).unwrap().1.len(), 1);
        // etcd with TLS: refused by name, not "unknown field"; a user and password are
        // wasmgate's own keys now (GatewayConfig checks them).
        let etcd = |rest: &str| format!("deployment:\n  etcd:\n    host: [http://e:2379]\n{rest}");
        let auth = etcd("    user: root\n    password: x\n");
        let (text, warnings) = set_aside(&auth).unwrap();
        assert_eq!((text.as_ref(), warnings.len()), (auth.as_str(), 0));
        let (_, msg) = set_aside(&etcd("    tls:\n      cert: /a.pem\n")).unwrap_err();
        assert!(msg.contains("TLS to etcd is not supported"), "{msg}");
        // APISIX's default, `verify` alone, changes nothing for http:// endpoints.
        let verify = etcd("    tls:\n      verify: true\n");
        assert_eq!(set_aside(&verify).unwrap().1.len(), 1);
        let blank = etcd("    tls: {}\n");
        let (text, warnings) = set_aside(&blank).unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(!text.contains("tls"), "{text}");
    }
}
