"""Helpers shared by the benchmark scripts in this folder."""
import os
import socket
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BINARY = os.path.join(ROOT, "target", "release", "wasmgate")
KEY = "bench-key-0123456789abcdef"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on {port}")


def pct(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100.0 * (len(v) - 1))))]


def median(values):
    return pct(values, 50)


def upstream_conf(port):
    """nginx.conf of the benchmarks' upstream: one worker answering `return 200` on `port`."""
    return f"""worker_processes 1; daemon off; error_log logs/up-error.log; pid logs/up.pid;
events {{ worker_connections 4096; }}
http {{ access_log off; server {{ listen 127.0.0.1:{port}; location / {{ return 200 "ok\\n"; }} }} }}
"""


def gateway_config(proxy, admin, workers, plugins, nginx_extra="", tail="", level="warn",
                   apisix_extra=""):
    """config.yaml of a benchmarked gateway: loopback listeners, the benchmark key, no access
    log, `plugins` as (name, priority, file) in `wasm.plugins` (none: no `wasm` section),
    `nginx_extra` lines in `nginx_config`, `apisix_extra` lines in `apisix`, `tail` sections
    at the end."""
    listed = "".join(f'    - {{name: {n}, priority: {p}, file: "{f}"{entry_extra(rest)}}}\n'
                     for n, p, f, *rest in plugins)
    wasm = f"wasm:\n  plugins:\n{listed}" if plugins else ""
    return f"""apisix:
  node_listen: [{{ip: 127.0.0.1, port: {proxy}}}]
{apisix_extra}deployment:
  admin:
    admin_key: [{{name: admin, key: {KEY}}}]
    admin_listen: {{ip: 127.0.0.1, port: {admin}}}
nginx_config:
  worker_processes: {workers}
  error_log_level: {level}
{nginx_extra}  http: {{access_log: "off"}}
plugin_attr:
  prometheus: {{enable_export_server: false}}
{wasm}{tail}"""


def entry_extra(rest):
    """More settings of a `wasm.plugins` entry (`key: value` text), if a plugin tuple has them."""
    return f", {rest[0]}" if rest and rest[0] else ""


def bench_plugins(callback_timeout=None):
    """`wasm.plugins` of the throughput benchmarks: three instances of example_headers (Rust
    SDK: a request header and a response header set, a property read) and body_rewrite (Rust
    SDK: the response body buffered and prefixed). `callback_timeout`: the entries' setting
    (`off`: no limit, code without the interruption checks), or the default."""
    hdr = os.path.join(ROOT, "plugins", "example_headers.wasm")
    body = os.path.join(ROOT, "tests", "plugins", "wasm", "body_rewrite.wasm")
    extra = f"callback_timeout: {callback_timeout}" if callback_timeout else ""
    return [("p1", 3, hdr, extra), ("p2", 2, hdr, extra), ("p3", 1, hdr, extra),
            ("body", 0, body, extra)]


def bench_routes(node):
    """The routes of the throughput benchmarks, by id, to `node` (`host:port`): `/none`,
    `/one` and `/three` (that many example_headers plugins), `/body` (body_rewrite)."""
    import json
    conf = {"conf": {"set": {"x-a": "1"}, "response_set": {"x-b": "2"}}}
    routes = {
        "none": {"uri": "/none"},
        "one": {"uri": "/one", "plugins": {"p1": conf}},
        "three": {"uri": "/three", "plugins": {"p1": conf, "p2": conf, "p3": conf}},
        "body": {"uri": "/body",
                 "plugins": {"body": {"conf": json.dumps({"response_prepend": "<<"})}}},
    }
    for r in routes.values():
        r["upstream"] = {"type": "roundrobin", "nodes": {node: 1}}
    return routes


def admin_put(admin, path, body, timeout=30):
    """PUTs `body` (JSON) to the Admin API on port `admin`; exits on an error status."""
    import http.client
    import json
    c = http.client.HTTPConnection("127.0.0.1", admin, timeout=timeout)
    c.request("PUT", path, body=json.dumps(body), headers={"X-API-KEY": KEY})
    r = c.getresponse()
    r.read()
    if r.status not in (200, 201):
        sys.exit(f"PUT {path}: {r.status}")


def store_routes(prefix, n, upstream, plugin_conf=None):
    """Writes routes `r0`…`r<n-1>` (`uri` `/r<i>/*`, one node `upstream`, `host:port`) into
    the file store of `prefix`, as the Admin API would have, before the gateway starts.
    `plugin_conf(i)` gives route i's `plugins` object (None: no plugins)."""
    import json
    os.makedirs(os.path.join(prefix, "data", "routes"), exist_ok=True)
    for i in range(n):
        value = {
            "id": f"r{i}",
            "uri": f"/r{i}/*",
            "upstream": {"type": "roundrobin", "nodes": {upstream: 1}},
            "create_time": 1700000000,
            "update_time": 1700000000,
        }
        if plugin_conf:
            value["plugins"] = plugin_conf(i)
        with open(os.path.join(prefix, "data", "routes", f"r{i}.json"), "w") as f:
            json.dump({"value": value, "createdIndex": i + 1, "modifiedIndex": i + 1}, f)
    with open(os.path.join(prefix, "data", "revision"), "w") as f:
        f.write(str(n))
