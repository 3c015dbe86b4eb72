#!/usr/bin/env python3
"""Memory and start-up costs with many routes that use a plugin.

For each route count (default 1, 100, 10000) a gateway starts in a temporary prefix whose store
already holds that many routes, each with the example plugin (written as store files: creating
10 000 routes one Admin API call at a time would measure the Admin API instead). Then:

  * worker start: POST /wasmgate/reload until the new workers are ready (they load the
    snapshot, build the router and instantiate the plugin VMs);
  * RSS per worker, idle (no plugin context yet: contexts are created by a route's first
    request);
  * PluginContext creation: every route is requested once (first request: the context is
    created, proxy_on_configure runs) and then again; the difference of the medians is what
    a route's first request pays;
  * RSS per worker once every route has its context.

Needs target/release/wasmgate. Prints a Markdown table; --json writes the numbers.

usage: scripts/bench/footprint.py [--routes 1,100,10000] [--workers 1] [--json out.json]
"""
import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import KEY, ROOT, free_port, gateway_config, median, store_routes


class Conn:
    """A keep-alive client connection (reopened when the server closes it)."""

    def __init__(self, port):
        self.port = port
        self.c = None

    def request(self, method, path, body=None, headers=None):
        for _ in range(2):
            if self.c is None:
                self.c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                self.c.request(method, path, body=body, headers=headers or {})
                r = self.c.getresponse()
                return r.status, r.read()
            except (http.client.HTTPException, OSError):
                self.c.close()
                self.c = None
        raise RuntimeError(f"{method} {path} failed twice")


def prepare(prefix, n, up_port, proxy, admin, workers):
    os.makedirs(os.path.join(prefix, "conf"))
    plugin = os.path.join(ROOT, "plugins", "example_headers.wasm")
    with open(os.path.join(prefix, "conf", "config.yaml"), "w") as f:
        f.write(gateway_config(proxy, admin, workers, [("example_headers", 1000, plugin)],
                               nginx_extra="  worker_shutdown_timeout: 5s\n",
                               tail="wasmgate:\n  shm_size: 256m\n"))
    store_routes(prefix, n, f"127.0.0.1:{up_port}", lambda i: {
        "example_headers": {"conf": {"response_set": {"x-route": f"r{i}"}}}})


def workers(admin):
    st, body = admin.request("GET", "/wasmgate/status", headers={"X-API-KEY": KEY})
    return [w for w in json.loads(body)["workers"] if w["state"] == "running"]


def run_one(binary, n, nworkers, up_port):
    prefix = tempfile.mkdtemp(prefix="wasmgate-footprint-")
    proxy, admin_port = free_port(), free_port()
    prepare(prefix, n, up_port, proxy, admin_port, nworkers)
    t0 = time.perf_counter()
    subprocess.run([binary, "start", "-p", prefix], check=True, stderr=subprocess.DEVNULL)
    start_s = time.perf_counter() - t0
    admin = Conn(admin_port)
    try:
        end = time.time() + 120
        while len(workers(admin)) < nworkers:
            if time.time() > end:
                sys.exit("workers not ready")
            time.sleep(0.05)
        reloads = []
        for _ in range(3):
            t0 = time.perf_counter()
            st, body = admin.request("POST", "/wasmgate/reload", headers={"X-API-KEY": KEY})
            assert st == 200, body
            reloads.append(time.perf_counter() - t0)
        time.sleep(1)
        idle = [w["rss_bytes"] for w in workers(admin)]
        client = Conn(proxy)
        first, second = [], []
        for rnd in (first, second):
            for i in range(n):
                t0 = time.perf_counter()
                st, _ = client.request("GET", f"/r{i}/x")
                rnd.append(time.perf_counter() - t0)
                assert st == 200, st
        loaded = [w["rss_bytes"] for w in workers(admin)]
        return {
            "routes": n,
            "workers": nworkers,
            "start_s": start_s,
            "reload_ms": median(reloads) * 1000,
            "rss_idle_mib": max(idle) / 2**20,
            "rss_contexts_mib": max(loaded) / 2**20,
            "first_request_us": median(first) * 1e6,
            "second_request_us": median(second) * 1e6,
        }
    finally:
        subprocess.run([binary, "stop", "-p", prefix], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        shutil.rmtree(prefix, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--routes", default="1,100,10000")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args()
    binary = os.path.join(ROOT, "target", "release", "wasmgate")
    if not os.path.exists(binary):
        sys.exit("build first: cargo build --release")
    if not shutil.which("nginx"):
        sys.exit("needs nginx (Debian: nginx-light) as the upstream")
    work = tempfile.mkdtemp(prefix="wasmgate-footprint-up-")
    up_port = free_port()
    os.makedirs(os.path.join(work, "logs"))
    with open(os.path.join(work, "up.conf"), "w") as f:
        f.write(f"""worker_processes 1; daemon off; error_log logs/error.log; pid logs/up.pid;
events {{ worker_connections 1024; }}
http {{ access_log off; server {{ listen 127.0.0.1:{up_port}; location / {{ return 200 "ok\\n"; }} }} }}
""")
    up = subprocess.Popen(["nginx", "-p", work, "-c", "up.conf"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rows = [run_one(binary, int(n), a.workers, up_port) for n in a.routes.split(",")]
    finally:
        up.terminate()
        up.wait()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{os.cpu_count()} cores; {a.workers} worker(s); each route has the example plugin")
    print()
    print("| routes | start (s) | reload → new workers ready (ms) | worker RSS idle (MiB) | "
          "worker RSS, every context created (MiB) | first request (µs) | later request (µs) | "
          "context creation ≈ (µs) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['routes']} | {r['start_s']:.2f} | {r['reload_ms']:.0f} | "
              f"{r['rss_idle_mib']:.1f} | {r['rss_contexts_mib']:.1f} | "
              f"{r['first_request_us']:.0f} | {r['second_request_us']:.0f} | "
              f"{r['first_request_us'] - r['second_request_us']:.0f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
