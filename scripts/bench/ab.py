#!/usr/bin/env python3
"""Two wasmgate binaries compared in the same minutes: an interleaved A/B.

On a shared machine two throughput runs minutes apart differ by more than most code changes
do. This script starts both gateways at once (throughput.py's set-up: an nginx upstream, the
same plugins and routes, the proxies' workers pinned to their own cores, wrk on the others)
and measures them round after round, alternating which goes first, so that whatever the
machine does meanwhile weighs on both alike. For each case it prints the medians of
requests/s, p99 and server CPU per request (user + system of the gateway's workers, from
/proc) for A and B, and B / A.

Keep each change's verdict on instruction counts (worker_instructions.py), which do not
move with the load; this is for what they do not show (cache effects, copies counted as one
instruction, time in the kernel).

usage: scripts/bench/ab.py OLD_BINARY NEW_BINARY [--rounds 6] [--duration 5]
                           [--cases none,one,three,body] [--workers 1]
(needs wrk and nginx)
"""
import argparse
import os
import shutil
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput as tp  # noqa: E402
from benchlib import median  # noqa: E402

METRICS = (("rps", "req/s", "{:.0f}"), ("p99_ms", "p99 ms", "{:.2f}"),
           ("cpu_us_per_req", "CPU µs/req", "{:.1f}"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old", help="binary A (the reference)")
    ap.add_argument("new", help="binary B")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--cases", default="none,one,three,body")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--connections", type=int, default=32)
    a = ap.parse_args()
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool):
            sys.exit(f"needs {tool} (Debian: apt-get install wrk nginx-light)")
    a.threads, a.pin = 1, True
    b = tp.Bench(a)
    cases = a.cases.split(",")
    rows = {(side, case): [] for side in "AB" for case in cases}
    try:
        b.start_nginx()
        gateways = {"A": b.start_gateway(os.path.abspath(a.old)),
                    "B": b.start_gateway(os.path.abspath(a.new))}
        with open(os.path.join(b.work, "pct.lua"), "w") as f:
            f.write(tp.WRK_LUA)
        for rnd in range(a.rounds):
            for case in cases:
                for side in ("AB" if rnd % 2 == 0 else "BA"):
                    port, workers = gateways[side]
                    r = b.measure(side, f"http://127.0.0.1:{port}/{case}", workers)
                    rows[(side, case)].append(r)
                    print(f"  round {rnd + 1} {case:6} {side}: {r['rps']:8.0f} req/s  "
                          f"p99 {r['p99_ms']:.2f} ms  cpu {r['cpu_us_per_req']:.1f} µs/req",
                          file=sys.stderr)
    finally:
        b.cleanup()
    print(f"A = {a.old}\nB = {a.new}\n{a.rounds} interleaved rounds of {a.duration} s per case, "
          f"{a.workers} worker(s), wrk -c{a.connections}; medians\n")
    head = "| case | " + " | ".join(f"A {n} | B {n} | B / A" for _, n, _ in METRICS) + " |"
    print(head)
    print("|---" * (1 + 3 * len(METRICS)) + "|")
    for case in cases:
        cells = []
        for key, _, fmt in METRICS:
            va = median([r[key] for r in rows[("A", case)]])
            vb = median([r[key] for r in rows[("B", case)]])
            cells += [fmt.format(va), fmt.format(vb), f"{vb / va:.3f}" if va else "—"]
        print(f"| {case} | " + " | ".join(cells) + " |")
    errors = sum(r["errors"] for rs in rows.values() for r in rs)
    if errors:
        print(f"\n{errors} wrk errors over the run")


if __name__ == "__main__":
    main()
