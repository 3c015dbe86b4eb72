#!/usr/bin/env python3
"""Where a proxy's CPU time per request goes, by component, against nginx in the same run.

The set-up is throughput.py's (an nginx upstream, nginx proxy_pass as the baseline, one
pinned worker per proxy, wrk on the other cores). For each case the worker is sampled with
`perf record` while wrk keeps it busy; its CPU time per request (from /proc, as in
throughput.py) is split by the share of samples in each component:

  kernel          system calls, TCP over loopback, wake-ups, scheduling
  hyper           HTTP/1 parsing and encoding, connection state machines (hyper, httparse)
  tokio           the scheduler, I/O readiness, timers, channels (tokio, mio)
  http/bytes      header maps, header values, shared buffers (http, bytes)
  wasmgate        the gateway's own code (routing, plugins' host side, pool, statistics)
  plugin code     the plugins' compiled wasm (perf sees it as [JIT])
  wasmtime        entering and leaving the VM, traps, instance state
  allocator       mimalloc
  memory copies   libc memcpy/memmove/memcmp (moves of futures and messages included)
  clock           clock_gettime through the vDSO
  nginx           the baseline's own code
  other           libc system-call wrappers and generic code (core, alloc, std)

Samples are a statistic: two runs differ by a few tenths of a µs per component, so each case
is profiled --rounds times (cases interleaved) and the figures averaged. Read the split, not
the last digit. Needs perf (Debian: linux-perf) with
/proc/sys/kernel/perf_event_paranoid <= 1 (or root), wrk, nginx and target/release/wasmgate.

usage: scripts/bench/cpu_split.py [--duration 8] [--rounds 2] [--cases nginx,none,one,three]
                                 [--keep DIR]   (perf.data of each case and round, for
                                                 `perf report -i DIR/one-1.data`)
"""
import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput as tp  # noqa: E402  (the same set-up and CPU accounting)

COMPONENTS = ("kernel", "hyper", "tokio", "http/bytes", "wasmgate", "plugin code", "wasmtime",
              "allocator", "memory copies", "clock", "nginx", "other")

LINE = re.compile(r"\s+([\d.]+)%\s+(\[[^\]]+\](?: tid \d+)?|\S+)\s+\[(.)\]\s+(.*)")


def component(dso, kind, sym):
    """The component a perf sample belongs to, from its object and symbol names."""
    if kind == "k":
        return "kernel"
    if dso.startswith("[JIT]"):
        return "plugin code"
    if "vdso" in dso:
        return "clock"
    if dso.startswith("nginx"):
        return "nginx"
    if re.search(r"__mem(move|cpy|set|cmp)", sym):
        return "memory copies"
    if re.search(r"(^|[^a-z])_?mi_", sym):
        return "allocator"
    for name, pattern in (("wasmtime", r"wasmtime|cranelift"), ("hyper", r"hyper::|httparse"),
                          ("tokio", r"tokio::|mio::"), ("http/bytes", r"(^|[<(& ])(http|bytes)::"),
                          ("wasmgate", r"wasmgate")):
        if re.search(pattern, sym):
            return name
    return "other"


def split(data):
    out = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso,sym",
                          "--stdio"], capture_output=True, text=True).stdout
    shares = collections.Counter()
    for line in out.splitlines():
        m = LINE.match(line)
        if m:
            shares[component(m.group(2), m.group(3), m.group(4))] += float(m.group(1)) / 100
    total = sum(shares.values()) or 1
    return {c: v / total for c, v in shares.items()}


def profile(b, url, pids, seconds, work):
    """CPU µs per request of `pids` under wrk, and the perf sample shares."""
    b.wrk(url, b.a.warmup)
    data = os.path.join(work, "perf.data")
    c0 = tp.cpu_ticks(pids())
    wrk = subprocess.Popen(tp.taskset(b.other_cpus) + [
        "wrk", "-t1", f"-c{b.a.connections}", f"-d{seconds}s", "-s",
        os.path.join(b.work, "pct.lua"), url], stdout=subprocess.PIPE, text=True)
    time.sleep(1)
    subprocess.run(["perf", "record", "-q", "-F", "2999", "-o", data,
                    "-p", ",".join(map(str, pids())), "--", "sleep", str(seconds - 2)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    out = wrk.communicate()[0]
    c1 = tp.cpu_ticks(pids())
    reqs = int(re.search(r"^REQS (\d+)$", out, re.M).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return rps, (c1 - c0) * 1e6 / tp.HZ / max(reqs, 1), split(data)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cases", default="nginx,none,one,three")
    ap.add_argument("--keep", help="a folder to keep each case's perf.data in")
    a = ap.parse_args()
    for tool in ("perf", "wrk", "nginx"):
        if not shutil.which(tool):
            sys.exit(f"needs {tool} (Debian: apt-get install linux-perf wrk nginx-light)")
    a.workers, a.pin, a.warmup, a.connections, a.threads = 1, True, 2, 32, 1
    b = tp.Bench(a)
    work = tempfile.mkdtemp(prefix="wasmgate-split-")
    rows = []
    try:
        b.start_nginx()
        _, gw = b.start_gateway()
        with open(os.path.join(b.work, "pct.lua"), "w") as f:
            f.write(tp.WRK_LUA)
        base_master = b.procs[1].pid
        base = lambda: [p for p in tp.children("nginx: worker process")  # noqa: E731
                        if tp.ppid(p) == base_master]
        cases = {"nginx": ("nginx proxy_pass", f"http://127.0.0.1:{b.base}/none", base),
                 "none": ("wasmgate", f"http://127.0.0.1:{b.gw}/none", gw),
                 "one": ("wasmgate+1", f"http://127.0.0.1:{b.gw}/one", gw),
                 "three": ("wasmgate+3", f"http://127.0.0.1:{b.gw}/three", gw)}
        keys = a.cases.split(",")
        runs = {k: [] for k in keys}
        for round_ in range(a.rounds):
            for key in keys:
                name, url, pids = cases[key]
                rps, cpu, shares = profile(b, url, pids, a.duration, work)
                if a.keep:
                    os.makedirs(a.keep, exist_ok=True)
                    shutil.copy(os.path.join(work, "perf.data"),
                                os.path.join(a.keep, f"{key}-{round_ + 1}.data"))
                runs[key].append((rps, cpu, shares))
                print(f"  {name:18} {rps:8.0f} req/s  {cpu:5.1f} µs/req", file=sys.stderr)
        for key in keys:
            n = len(runs[key])
            # µs per component averaged over the rounds, so the rows still add up.
            us = collections.Counter()
            for _, cpu, shares in runs[key]:
                for c, v in shares.items():
                    us[c] += v * cpu / n
            rows.append((cases[key][0], sum(r[0] for r in runs[key]) / n,
                         sum(r[1] for r in runs[key]) / n, us))
    finally:
        b.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    print(f"CPU µs per request of the proxy's worker, by component (perf samples × CPU time, "
          f"mean of {a.rounds} round(s) of {a.duration} s)\n")
    print("| component | " + " | ".join(r[0] for r in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for c in COMPONENTS:
        if any(r[3].get(c, 0) >= 0.005 for r in rows):
            print(f"| {c} | " + " | ".join(f"{r[3].get(c, 0):.2f}" for r in rows) + " |")
    print("| **user space** | " + " | ".join(
        f"**{r[2] - r[3].get('kernel', 0):.2f}**" for r in rows) + " |")
    print("| **total** | " + " | ".join(f"**{r[2]:.2f}**" for r in rows) + " |")
    print("| req/s | " + " | ".join(f"{r[1]:.0f}" for r in rows) + " |")


if __name__ == "__main__":
    main()
