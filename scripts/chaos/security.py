#!/usr/bin/env python3
"""Security checks of the Admin API from a client's point of view.

  * no key / wrong key (header, `api_key` argument, `x_api_key` cookie) → 401, nothing changes;
  * a viewer key reads (GET) but every write, and POST /wasmgate/reload, is 401;
  * the Admin API is not served on the proxy port;
  * with no `admin_listen` in config.yaml it binds 127.0.0.1:9180 only (checked in /proc/net/tcp;
    skipped when 9180 is taken);
  * hostile Admin API input from an admin: a 2 MiB body → 413; a route nested 30 000 levels deep
    (PATCH sub-path) → 400 and the master keeps running (it used to overflow its stack).

usage: scripts/chaos/security.py [--attempts 200]
"""
import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gwlib import BIN, KEY, VIEWER_KEY, Gateway, Upstream, log, request, summary


def oversize_put(port, path, body):
    """PUTs `body` and returns the answer's status. The server may answer (413) and close before
    the whole body is sent: the client's write then fails (EPIPE), and the answer is read all
    the same, as a browser or curl would."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        head = (f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-KEY: {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        try:
            s.sendall(head.encode() + body.encode())
        except (BrokenPipeError, ConnectionResetError):
            pass
        line = s.makefile("rb").readline().split()
        return int(line[1]) if len(line) > 1 else f"no answer: {line!r}"
    finally:
        s.close()


def listening(port):
    """Local addresses listening on `port` (IPv4), from /proc/net/tcp."""
    out = []
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            ip, p = local.split(":")
            if int(p, 16) == port and state == "0A":
                out.append(socket.inet_ntoa(bytes.fromhex(ip)[::-1]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--attempts", type=int, default=200)
    a = ap.parse_args()
    up = Upstream("u")
    gw = Gateway(workers=1)
    sent = failed = 0
    problems = []

    def expect(what, got, want):
        nonlocal sent, failed
        sent += 1
        if got != want:
            failed += 1
            problems.append(f"{what}: got {got}, want {want}")

    try:
        gw.route("1", {"uri": "/x"}, up)
        before = gw.admin("GET", "/apisix/admin/routes")[1]
        body = {"uri": "/evil", "upstream": {"nodes": {up.addr: 1}}}
        ap_ = gw.admin_port
        for i in range(a.attempts):
            key = None if i % 2 == 0 else f"guess-{i:032d}"
            st, v = gw.admin(["PUT", "DELETE", "GET", "PATCH"][i % 4], "/apisix/admin/routes/1",
                             body, key=key)
            desc = v.get("description") if isinstance(v, dict) else v
            expect(f"key {key}", (st, desc), (401, "missing apikey" if key is None else "wrong apikey"))
        for method, path in (("GET", f"/apisix/admin/routes?api_key={KEY}"),):
            expect("api_key argument", request(ap_, method, path)[0], 200)
        expect("x_api_key cookie",
               request(ap_, "GET", "/apisix/admin/routes", headers={"Cookie": f"x_api_key={KEY}"})[0], 200)
        expect("viewer GET", gw.admin("GET", "/apisix/admin/routes", key=VIEWER_KEY)[0], 200)
        expect("viewer status", gw.admin("GET", "/wasmgate/status", key=VIEWER_KEY)[0], 200)
        for method, path, b in (("PUT", "/apisix/admin/routes/1", body),
                                ("PATCH", "/apisix/admin/routes/1", {"uri": "/evil"}),
                                ("POST", "/apisix/admin/routes", body),
                                ("DELETE", "/apisix/admin/routes/1", None),
                                ("PUT", "/apisix/admin/upstreams/9", {"nodes": {up.addr: 1}}),
                                ("POST", "/wasmgate/reload", None)):
            st, v = gw.admin(method, path, b, key=VIEWER_KEY)
            expect(f"viewer {method} {path}", (st, v.get("description")),
                   (401, "invalid method for role viewer"))
        expect("epoch unchanged by viewer reload", gw.status()["master"]["epoch"], 0)
        expect("nothing changed", gw.admin("GET", "/apisix/admin/routes")[1], before)
        st, _, _ = request(gw.proxy_port, "GET", "/apisix/admin/routes", headers={"X-API-KEY": KEY})
        expect("admin API on the proxy port", st, 404)
        big = '{"uri": "/big", "desc": "' + "x" * (2 << 20) + '"}'
        expect("2 MiB Admin API body", oversize_put(ap_, "/apisix/admin/routes/big", big), 413)
        gw.route("deep", {"uri": "/deep", "plugins": {"echo": {"conf": {"k": 1}}}})
        sub = "/".join(["a"] * 30000)
        try:
            st, v = gw.admin("PATCH", f"/apisix/admin/routes/deep/plugins/echo/conf/{sub}", 1)
        except OSError as e:
            st = f"connection lost: {e}"
        expect("PATCH 30 000 levels deep", st, 400)
        time.sleep(0.3)
        expect("master alive after deep PATCH", gw.proc.poll(), None)
    finally:
        gw.cleanup()
    # Default Admin API address: loopback.
    default_bind = "skipped (9180 in use)"
    if not listening(9180):
        d = tempfile.mkdtemp(prefix="wasmgate-sec-")
        os.makedirs(f"{d}/conf")
        proxy = socket.socket()
        proxy.bind(("127.0.0.1", 0))
        pport = proxy.getsockname()[1]
        proxy.close()
        with open(f"{d}/conf/config.yaml", "w") as f:
            f.write(f"apisix:\n  node_listen: [{{ip: 127.0.0.1, port: {pport}}}]\n"
                    f"deployment:\n  admin:\n    admin_key: [{{name: admin, key: {KEY}}}]\n"
                    "nginx_config:\n  worker_processes: 1\n"
                    "plugin_attr:\n  prometheus:\n    enable_export_server: false\n")
        p = subprocess.Popen([BIN, "start", "--foreground", "-p", d],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 20
            while not listening(9180) and time.time() < deadline:
                time.sleep(0.05)
            addrs = listening(9180)
            default_bind = ",".join(addrs) or "none"
            expect("default admin_listen", addrs, ["127.0.0.1"])
        finally:
            p.terminate()
            p.wait(15)
            subprocess.run(["rm", "-rf", d])
    up.close()
    for p_ in problems:
        log(f"problem: {p_}")
    return summary("unauthorised / hostile Admin API use",
                   f"{a.attempts} requests without or with wrong keys, viewer writes, oversize and "
                   "30 000-deep bodies", sent, failed, 0, failed == 0,
                   default_admin_bind=default_bind)


if __name__ == "__main__":
    sys.exit(main())
