#!/usr/bin/env python3
"""Instructions a worker executes per proxied request, counted by callgrind: the whole worker
(hyper, tokio, the router, the upstream pool, the Proxy-Wasm host and the plugins' code), not
only the host's part that instructions.sh counts.

The gateway runs under valgrind with its worker traced (WASMGATE_WORKER_EXE names the binary:
under valgrind `/proc/self/exe` is valgrind itself); an nginx upstream answers `return 200`.
For each route (no plugin, example_headers, three of them, shared_counter, no plugin with
health checks on its upstream) the script warms
up, zeroes the worker's counters, sends a fixed number of keep-alive requests one after the
other, dumps the counters and divides; it also counts the calls to the allocator (mimalloc's entry points)
per request. The count does not move with the machine's load, so two builds can be
compared on a shared machine: run it with each binary.

usage: scripts/bench/worker_instructions.py [--requests 2000] [--binary target/release/wasmgate]
                                           [--dumps DIR] [--callback-timeout off]
With --dumps, each route's callgrind dump is kept as DIR/<route>.cg for `callgrind_annotate`.
(needs valgrind and nginx)
"""
import argparse
import glob
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (ROOT, admin_put, bench_plugins, bench_routes, free_port, gateway_config,
                      upstream_conf, wait_port)

ROUTES = ("none", "one", "three", "counter", "checked")

# A plugin whose header value changes from request to request (shared_counter's
# `x-counter: <n>`, the count kept in shared data), as an auth plugin's user id or a trace id
# does: what setting such a value costs, beside example_headers' constant ones.
COUNTER = ("counter", 5, os.path.join(ROOT, "tests", "plugins", "wasm", "shared_counter.wasm"), "")


def requests(port, path, n):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for _ in range(n):
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        if r.status != 200:
            sys.exit(f"GET {path}: {r.status}")
    c.close()


def wait_route(port, path, timeout=60):
    """Until the worker serves `path` (it builds its router a moment after the Admin API write)."""
    end = time.time() + timeout
    while time.time() < end:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        c.close()
        if r.status == 200:
            return
        time.sleep(0.2)
    sys.exit(f"{path} is not served")


def totals(path):
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    sys.exit(f"no totals in {path}")


# The allocator's entry points as the gateway calls them (mimalloc through
# wasmgate_shared::alloc): one call per allocation, one per growth.
ALLOC_FNS = ("mi_malloc", "mi_zalloc", "mi_malloc_aligned", "mi_zalloc_aligned")
REALLOC_FNS = ("mi_realloc", "mi_realloc_aligned")


def allocations(path):
    """Calls to the allocator in a dump: (allocations, reallocations)."""
    allocs = reallocs = 0
    target = None
    with open(path) as f:
        for line in f:
            if line.startswith("cfn="):
                # `cfn=(id) name` with compressed strings, `cfn=name` without.
                target = line[4:].strip().split(") ", 1)[-1]
            elif line.startswith("calls=") and target:
                n = int(line[6:].split()[0])
                if target in ALLOC_FNS:
                    allocs += n
                elif target in REALLOC_FNS:
                    reallocs += n
                target = None
    return allocs, reallocs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "wasmgate"))
    ap.add_argument("--dumps", help="keep each route's callgrind dump in this folder")
    ap.add_argument("--callback-timeout", help="the plugins' callback_timeout (off: no limit)")
    a = ap.parse_args()
    for tool in ("valgrind", "callgrind_control", "nginx"):
        if not shutil.which(tool):
            sys.exit(f"needs {tool} (Debian: apt-get install valgrind nginx-light)")
    work = tempfile.mkdtemp(prefix="wasmgate-vg-")
    up, gw, admin = free_port(), free_port(), free_port()
    procs = []
    try:
        os.makedirs(os.path.join(work, "logs"))
        os.makedirs(os.path.join(work, "conf"))
        with open(os.path.join(work, "up.conf"), "w") as f:
            f.write(upstream_conf(up))
        procs.append(subprocess.Popen(["nginx", "-p", work, "-c", os.path.join(work, "up.conf")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with open(os.path.join(work, "conf", "config.yaml"), "w") as f:
            f.write(gateway_config(gw, admin, 1, bench_plugins(a.callback_timeout) + [COUNTER]))
        binary = os.path.abspath(a.binary)
        env = dict(os.environ, WASMGATE_WORKER_EXE=binary)
        out = os.path.join(work, "cg.%p")
        procs.append(subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--trace-children=yes", "--compress-strings=no",
             f"--callgrind-out-file={out}",
             binary, "start", "--foreground", "-p", work],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(admin, 120)
        routes = bench_routes(f"127.0.0.1:{up}")
        routes["counter"] = {"uri": "/counter", "plugins": {"counter": {"conf": "-"}},
                             "upstream": routes["none"]["upstream"]}
        # No plugin, the upstream with health checks: each pick reads the node's record and
        # each answer is counted (passive); the master's probes are not the worker's.
        checked = dict(routes["none"]["upstream"])
        checked["checks"] = {"active": {"type": "tcp"}, "passive": {}}
        routes["checked"] = {"uri": "/checked", "upstream": checked}
        for r in ROUTES:
            admin_put(admin, f"/apisix/admin/routes/{r}", routes[r])
        wait_port(gw, 120)
        time.sleep(2)
        worker = None
        for _ in range(100):
            ps = subprocess.run(["pgrep", "-f", f"valgrind.*{re.escape(binary)}( worker)?$"], capture_output=True, text=True).stdout.split()
            if ps:
                worker = ps[0]
                break
            time.sleep(0.2)
        if worker is None:
            sys.exit("no worker under valgrind")
        print(f"{os.path.basename(binary)}: instructions per request in the worker (callgrind, "
              f"{a.requests} keep-alive requests per route)")
        for r in ROUTES:
            wait_route(gw, f"/{r}")
            requests(gw, f"/{r}", 200)
            subprocess.run(["callgrind_control", "-z", worker], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            requests(gw, f"/{r}", a.requests)
            before = set(glob.glob(os.path.join(work, f"cg.{worker}.*")))
            subprocess.run(["callgrind_control", "-d", worker], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            after = set(glob.glob(os.path.join(work, f"cg.{worker}.*"))) - before
            if not after:
                sys.exit("callgrind wrote no dump")
            total = sum(totals(p) for p in after)
            if a.dumps:
                os.makedirs(a.dumps, exist_ok=True)
                for i, p in enumerate(sorted(after)):
                    shutil.copy(p, os.path.join(a.dumps, f"{r}.cg" + (f".{i}" if i else "")))
            allocs = [allocations(p) for p in after]
            per = lambda n: n / a.requests  # noqa: E731
            print(f"  {r:6} {total // a.requests:>8} instructions per request, "
                  f"{per(sum(x[0] for x in allocs)):.1f} allocations "
                  f"(+{per(sum(x[1] for x in allocs)):.1f} reallocations)")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
