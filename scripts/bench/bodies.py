#!/usr/bin/env python3
"""Large response bodies through the proxy, against nginx proxy_pass, measured in one run.

The upstream nginx serves a file of each size (random bytes) for every path; nginx
`proxy_pass` (the baseline) and the gateway (route `/none`, no plugin) relay it to wrk, with
the same pinning as throughput.py (the proxy's worker on core 0). For each size: requests/s
and the proxy's CPU time per request, medians over the rounds, and each as a ratio to
nginx. With --compare OLD, a second gateway running the binary OLD is measured in the same
rounds (an A/B of how bodies stream).

usage: scripts/bench/bodies.py [--sizes 64k,1m] [--rounds 3] [--duration 5]
                               [--binary target/release/wasmgate] [--compare OLD]
"""
import argparse
import os
import shutil
import sys
import tempfile

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import BINARY, median  # noqa: E402
from throughput import Bench, children, ppid  # noqa: E402


def size_bytes(text):
    units = {"k": 1 << 10, "m": 1 << 20}
    t = text.strip().lower()
    return int(t[:-1]) * units[t[-1]] if t[-1] in units else int(t)


def file_upstream(root, name):
    def conf(port):
        return f"""worker_processes 1; daemon off; error_log logs/up-error.log; pid logs/up.pid;
events {{ worker_connections 4096; }}
http {{ access_log off; server {{ listen 127.0.0.1:{port};
  location / {{ root {root}; try_files /{name} =404; }} }} }}
"""
    return conf


def run_size(a, root, size):
    name = f"body-{size}"
    with open(os.path.join(root, name), "wb") as f:
        f.write(os.urandom(size_bytes(size)))
    os.chmod(os.path.join(root, name), 0o644)
    b = Bench(a, upstream=file_upstream(root, name))
    rows = {}
    try:
        b.start_nginx()
        proxies = [("wasmgate", *b.start_gateway(a.binary))]
        if a.compare:
            proxies.append(("wasmgate (compare)", *b.start_gateway(a.compare)))
        base_master = b.procs[1].pid
        base = lambda: [p for p in children("nginx: worker process")  # noqa: E731
                        if ppid(p) == base_master]
        cases = [("nginx-proxy_pass", b.base, base)] + proxies
        for rnd in range(a.rounds):
            for label, port, pids in cases:
                m = b.measure(label, f"http://127.0.0.1:{port}/none", pids)
                rows.setdefault(label, []).append(m)
                print(f"  {size:>5} round {rnd} {label:20} {m['rps']:9.0f} req/s  "
                      f"cpu {m['cpu_us_per_req']:8.1f} us/req  errors {m['errors']}",
                      file=sys.stderr)
    finally:
        b.cleanup()
    if any(m["errors"] for ms in rows.values() for m in ms):
        sys.exit(f"{size}: errors (non-2xx answers or failed requests): the figures are not bodies")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="64k,1m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--binary", default=BINARY)
    ap.add_argument("--compare", help="a second gateway binary measured in the same rounds")
    a = ap.parse_args()
    a.workers, a.threads, a.pin = 1, 1, True
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool):
            sys.exit(f"needs {tool} (Debian: apt-get install wrk nginx-light)")
    root = tempfile.mkdtemp(prefix="wasmgate-bodies-")
    os.chmod(root, 0o755)  # nginx's workers run as an unprivileged user
    print(f"{os.cpu_count()} cores; 1 worker per proxy, pinned; wrk -t1 -c{a.connections}, "
          f"{a.warmup} s warm-up + {a.duration} s, median of {a.rounds} round(s)\n")
    print("| size | proxy | req/s | × nginx | CPU µs/req | CPU × nginx | errors |")
    print("|---|---|---:|---:|---:|---:|---:|")
    try:
        for size in a.sizes.split(","):
            rows = run_size(a, root, size)
            base_rps = median([m["rps"] for m in rows["nginx-proxy_pass"]])
            base_cpu = median([m["cpu_us_per_req"] for m in rows["nginx-proxy_pass"]])
            for label, ms in rows.items():
                rps = median([m["rps"] for m in ms])
                cpu = median([m["cpu_us_per_req"] for m in ms])
                errors = sum(m["errors"] for m in ms)
                print(f"| {size} | {label} | {rps:.0f} | {rps / base_rps:.2f} | {cpu:.1f} | "
                      f"{cpu / base_cpu:.2f} | {errors} |", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
