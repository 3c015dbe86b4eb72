#!/usr/bin/env python3
"""Configuration propagation and reload latency, measured on a real gateway.

Starts target/release/wasmgate in a temporary prefix (loopback ports), then:
  * propagation: N times, PUT a route with a new uri through the Admin API and time from the
    Admin API's answer until fresh client connections get something other than 404 on that uri
    (each fresh connection may land on any worker; --probes of them must all see it), with
    --routes other routes in the configuration (written to the store before the start), and how
    long each PUT took to be answered (persisted and published);
  * reload: M times, POST /wasmgate/reload and time until it answers (new workers ready).
Prints p50/p99/max in milliseconds. Numbers depend on the machine: compare runs made on the same
machine, and read them as a benchmark, never as a pass/fail test.

usage: scripts/bench/propagation.py [--edits 1000] [--reloads 20] [--workers 2] [--probes 4]
                                    [--routes 0]
"""
import argparse, http.client, json, os, shutil, socket, subprocess, sys, tempfile, time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import KEY, free_port, gateway_config, pct, store_routes


def request(port, method, path, body=None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--edits", type=int, default=1000)
    ap.add_argument("--reloads", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--routes", type=int, default=0, help="routes already configured")
    ap.add_argument("--binary", default="target/release/wasmgate")
    a = ap.parse_args()
    binary = os.path.abspath(a.binary)
    if not os.path.exists(binary):
        sys.exit(f"{binary} not found: run cargo build --release first")
    prefix = tempfile.mkdtemp(prefix="wasmgate-bench-")
    proxy, admin = free_port(), free_port()
    os.makedirs(f"{prefix}/conf")
    with open(f"{prefix}/conf/config.yaml", "w") as f:
        f.write(gateway_config(proxy, admin, a.workers, [],
                               nginx_extra="  worker_shutdown_timeout: 5s\n"))
    store_routes(prefix, a.routes, "127.0.0.1:1")
    subprocess.run([binary, "start", "-p", prefix], check=True)
    try:
        hdr = {"X-API-KEY": KEY}
        deadline = time.time() + 60
        while True:
            try:
                st, body = request(admin, "GET", "/wasmgate/status", headers=hdr)
                w = json.loads(body)["workers"]
                if st == 200 and sum(1 for x in w if x["state"] == "running") == a.workers:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                sys.exit("gateway did not start")
            time.sleep(0.05)

        lat, put = [], []
        for i in range(a.edits):
            route = {"uri": f"/p{i}", "upstream": {"nodes": {"127.0.0.1:1": 1}, "timeout": {"connect": 0.2}}}
            t_put = time.perf_counter()
            st, _ = request(admin, "PUT", f"/apisix/admin/routes/{i % 50}", json.dumps(route), hdr)
            t0 = time.perf_counter()
            put.append((t0 - t_put) * 1000)
            assert st in (200, 201), st
            seen = 0
            while seen < a.probes:
                st, _ = request(proxy, "GET", f"/p{i}")
                if st != 404:
                    seen += 1
            lat.append((time.perf_counter() - t0) * 1000)

        rel = []
        for _ in range(a.reloads):
            t0 = time.perf_counter()
            st, body = request(admin, "POST", "/wasmgate/reload", headers=hdr)
            assert st == 200, body
            rel.append((time.perf_counter() - t0) * 1000)

        print(f"machine: {os.cpu_count()} cores, {a.workers} workers, {a.routes} other routes")
        print(f"propagation (PUT answered -> {a.probes} fresh connections served), {a.edits} edits: "
              f"p50 {pct(lat, 50):.2f} ms, p99 {pct(lat, 99):.2f} ms, max {max(lat):.2f} ms")
        print(f"Admin API PUT (request sent -> answered, persisted and published), {a.edits} edits: "
              f"p50 {pct(put, 50):.2f} ms, p99 {pct(put, 99):.2f} ms")
        print(f"reload (POST /wasmgate/reload -> new workers ready), {a.reloads} reloads: "
              f"p50 {pct(rel, 50):.1f} ms, p99 {pct(rel, 99):.1f} ms")
    finally:
        subprocess.run([binary, "stop", "-p", prefix])
        shutil.rmtree(prefix, ignore_errors=True)


if __name__ == "__main__":
    main()
