#!/usr/bin/env python3
"""Proxy throughput and latency against nginx proxy_pass, measured in one run.

An nginx upstream answers `return 200`; each proxy under test gets the same worker count and
the same loopback load from wrk (fixed connections, a warm-up, then a timed run):

  nginx-proxy_pass     nginx, upstream keepalive — the baseline
  wasmgate             no plugin
  wasmgate+1           one Rust SDK plugin (example_headers: a request and a response header)
  wasmgate+3           three of them on the route
  wasmgate+body        a body plugin (body_rewrite: the response body buffered and prefixed)

For each: requests/s, p50/p99/p99.9 latency, the server's CPU time per request (user + system
of its worker processes, from /proc: steadier than 1/throughput on a shared machine), and each
as a ratio to the baseline. With --cpus, the proxy's workers run on their own cores (taskset)
and the upstream and wrk on the others, so the proxy is the bottleneck being measured.

Results go to stdout as a Markdown table, and with --json / --svg to files (the SVG is the
plot in docs/BENCHMARKS.md). Needs wrk and nginx (Debian: wrk, nginx-light) and
target/release/wasmgate.

With --tls, the clients speak TLS to the proxies (wrk's keep-alive connections: a handshake
per connection, then records): nginx terminates TLS with `listen … ssl`, the gateway with its
`apisix.ssl` listener and an SSL object, both with the same ECDSA P-256 certificate (made
with openssl); the upstream hop stays plain HTTP.

With --rates, each case also (or only) runs at fixed offered loads: wrk sends on a schedule
(a Lua `delay` hook), so every proxy serves the same requests per second and their latency
compares at equal load, as a gateway runs in production, below its saturation. In a
saturating run the latency is mostly queueing (connections / throughput), and a slower proxy's
p99 is higher for that reason alone.

usage: scripts/bench/throughput.py [--workers 1] [--duration 10] [--connections 32] [--tls]
                                   [--rates max,20000,40000] [--json out.json] [--svg out.svg]
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (BINARY, admin_put, bench_plugins, bench_routes, free_port,
                      gateway_config, median, upstream_conf, wait_port)

# The name the benchmark's certificate is for; clients that send no name (wrk to an IP) get
# it as `fallback_sni`.
TLS_NAME = "bench.test"


def make_certificate(d):
    """An ECDSA P-256 certificate for TLS_NAME and 127.0.0.1 and its key, as files in `d`."""
    cert, key = os.path.join(d, "bench.crt"), os.path.join(d, "bench.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                    "-subj", f"/CN={TLS_NAME}",
                    "-addext", f"subjectAltName=DNS:{TLS_NAME},IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    return cert, key

HZ = os.sysconf("SC_CLK_TCK")

# wrk prints these after its own summary: exact percentiles from its histogram.
WRK_LUA = """
done = function(summary, latency, requests)
  io.write(string.format("REQS %d\\nERRS %d\\n", summary.requests,
    summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout))
  for _, p in pairs({50, 99, 99.9}) do
    io.write(string.format("P%s %d\\n", p, latency:percentile(p)))
  end
end
"""

# With --rates: each wrk thread sends on a schedule, one request every INTERVAL ms, so the
# offered load is the same for every proxy and below what each can serve. wrk calls
# `delay()` before each next request of a connection; the schedule is kept per thread (its
# connections share one Lua state) with the monotonic clock through LuaJIT's FFI, so the
# load does not slow down when a proxy answers more slowly, as it does in the closed loop of
# a saturating run. A thread that falls behind its schedule sends at once until it catches up.
PACE_LUA = """
local ffi = require("ffi")
ffi.cdef[[ typedef struct { long tv_sec; long tv_nsec; } wg_timespec;
           int clock_gettime(int, wg_timespec *); ]]
local ts = ffi.new("wg_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
local next_at = nil
delay = function()
  local now = now_ms()
  if next_at == nil then next_at = now end
  next_at = next_at + INTERVAL
  if next_at < now then return 0 end
  return next_at - now
end
"""


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total


def children(pattern):
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def taskset(cpus):
    return ["taskset", "-c", cpus] if cpus and shutil.which("taskset") else []


class Bench:
    def __init__(self, a, upstream=upstream_conf):
        """`upstream(port)` is the upstream nginx's configuration (`return 200` by default)."""
        self.a = a
        self.upstream_conf = upstream
        self.work = tempfile.mkdtemp(prefix="wasmgate-bench-")
        n = os.cpu_count() or 2
        w = a.workers
        # The proxy's workers on cores 0..w-1, the rest (upstream, wrk) on the others.
        self.proxy_cpus = f"0-{w - 1}" if a.pin and n > w else ""
        self.other_cpus = f"{w}-{n - 1}" if a.pin and n > w else ""
        self.up, self.base, self.gw, self.admin = (free_port() for _ in range(4))
        self.procs = []
        self.gateways = []
        # Other scripts (ab.py, bodies.py, cpu_split.py) build their own settings: no --tls.
        tls = getattr(a, "tls", False)
        self.tls = make_certificate(self.work) if tls else None
        self.scheme = "https" if tls else "http"

    def start_nginx(self):
        d = os.path.join(self.work, "nginx")
        os.makedirs(os.path.join(d, "logs"))
        # The upstream: its own nginx, on the other cores.
        up_conf = os.path.join(d, "up.conf")
        with open(up_conf, "w") as f:
            f.write(self.upstream_conf(self.up))
        # The baseline: nginx proxy_pass with upstream keepalive, same worker count.
        base_conf = os.path.join(d, "base.conf")
        with open(base_conf, "w") as f:
            f.write(f"""worker_processes {self.a.workers}; daemon off; error_log logs/base-error.log; pid logs/base.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream backend {{ server 127.0.0.1:{self.up}; keepalive 64; }}
  server {{ listen 127.0.0.1:{self.base}{self.nginx_tls()}
    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }} }}
}}
""")
        for conf, cpus in ((up_conf, self.other_cpus), (base_conf, self.proxy_cpus)):
            self.procs.append(subprocess.Popen(
                taskset(cpus) + ["nginx", "-p", d, "-c", conf],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(self.up)
        wait_port(self.base)

    def nginx_tls(self):
        """The baseline server's TLS settings (after its `listen` address)."""
        if not self.tls:
            return ";"
        cert, key = self.tls
        # APISIX's protocols, which are the gateway's default too (Debian's nginx 1.22 leaves
        # TLS 1.3 out unless told: a run without this compared its TLS 1.2 to our 1.3).
        return (f" ssl; ssl_certificate {cert}; ssl_certificate_key {key};"
                " ssl_protocols TLSv1.2 TLSv1.3;")

    def start_gateway(self, binary=BINARY):
        """Starts a gateway running `binary` with the benchmark's plugins and routes (`/none`,
        `/one`, `/three`, `/body`); the first one listens on self.gw. Returns its port and a
        function listing its worker pids."""
        port, admin = (self.gw, self.admin) if not self.gateways else (free_port(), free_port())
        d = os.path.join(self.work, f"gw{len(self.gateways)}")
        os.makedirs(os.path.join(d, "conf"))
        # With TLS, the cases' port is the TLS listener's; plain HTTP moves to another.
        plain, ssl = (free_port(), (f"  ssl: {{enable: true, listen: [{{ip: 127.0.0.1, "
                                    f"port: {port}}}], fallback_sni: {TLS_NAME}}}\n")) \
            if self.tls else (port, "")
        with open(os.path.join(d, "conf", "config.yaml"), "w") as f:
            f.write(gateway_config(plain, admin, self.a.workers,
                                   bench_plugins(self.a.callback_timeout), apisix_extra=ssl))
        if not os.path.exists(binary):
            sys.exit(f"{binary} does not exist: build first (cargo build --release)")
        # Workers inherit the master's affinity.
        master = subprocess.Popen(
            taskset(self.proxy_cpus) + [binary, "start", "--foreground", "-p", d],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(master)
        self.gateways.append(master)
        wait_port(admin)
        for rid, r in bench_routes(f"127.0.0.1:{self.up}").items():
            admin_put(admin, f"/apisix/admin/routes/{rid}", r, timeout=10)
        if self.tls:
            cert, key = (open(f).read() for f in self.tls)
            admin_put(admin, "/apisix/admin/ssls/bench",
                      {"cert": cert, "key": key, "snis": [TLS_NAME]}, timeout=10)
        wait_port(port)
        time.sleep(0.5)
        workers = lambda: [p for p in children("wasmgate: worker process")  # noqa: E731
                           if ppid(p) == master.pid]
        return port, workers

    def wrk(self, url, seconds, rate=None):
        """wrk's output for `seconds` of load on `url`: as fast as the proxy answers, or with
        `rate`, that many requests per second offered on a schedule (PACE_LUA)."""
        lua = os.path.join(self.work, f"pct-{rate or 0}.lua")
        with open(lua, "w") as f:
            f.write(WRK_LUA)
            if rate:
                f.write(PACE_LUA.replace("INTERVAL", repr(1000.0 * self.a.threads / rate)))
        cmd = taskset(self.other_cpus) + [
            "wrk", f"-t{self.a.threads}", f"-c{self.a.connections}", f"-d{seconds}s", "-s", lua, url]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    def measure(self, name, url, pids, rate=None):
        self.wrk(url, self.a.warmup, rate)
        c0 = cpu_ticks(pids())
        out = self.wrk(url, self.a.duration, rate)
        c1 = cpu_ticks(pids())
        v = dict(re.findall(r"^(REQS|ERRS|P50|P99|P99\.9) (\d+)$", out, re.M))
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        reqs = int(v["REQS"])
        return {
            "name": name,
            "rate": rate,
            "rps": rps,
            "errors": int(v["ERRS"]),
            "p50_ms": int(v["P50"]) / 1000,
            "p99_ms": int(v["P99"]) / 1000,
            "p999_ms": int(v["P99.9"]) / 1000,
            "cpu_us_per_req": (c1 - c0) * 1e6 / HZ / max(reqs, 1),
        }

    def run(self):
        self.start_nginx()
        _, gw_workers = self.start_gateway()
        nginx_workers = lambda: children(f"nginx: worker process")  # noqa: E731
        # The baseline's workers only (the upstream nginx runs under its own master).
        base_master = self.procs[1].pid
        base_workers = lambda: [p for p in nginx_workers() if ppid(p) == base_master]  # noqa: E731
        at = f"{self.scheme}://127.0.0.1"
        cases = [
            ("nginx-proxy_pass", f"{at}:{self.base}/none", base_workers),
            ("wasmgate", f"{at}:{self.gw}/none", gw_workers),
            ("wasmgate+1", f"{at}:{self.gw}/one", gw_workers),
            ("wasmgate+3", f"{at}:{self.gw}/three", gw_workers),
            ("wasmgate+body", f"{at}:{self.gw}/body", gw_workers),
        ]
        rows = []
        loads = [None] if not self.a.rates else self.a.rates
        for rnd in range(self.a.rounds):
            for rate in loads:
                for name, url, pids in cases:
                    r = self.measure(name, url, pids, rate)
                    r["round"] = rnd
                    rows.append(r)
                    print(f"  {name:18} {r['rps']:10.0f} req/s  p99 {r['p99_ms']:.2f} ms  "
                          f"cpu {r['cpu_us_per_req']:.1f} us/req"
                          + (f"  (offered {rate}/s)" if rate else ""), file=sys.stderr)
        return rows

    def cleanup(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.work, ignore_errors=True)


def ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return 0


def summarize(rows):
    """Median over rounds per case, with ratios to the baseline."""
    names = []
    for r in rows:
        if r["name"] not in names:
            names.append(r["name"])
    out = []
    for n in names:
        rs = [r for r in rows if r["name"] == n]
        out.append({k: (median([r[k] for r in rs]) if k != "name" else n)
                    for k in ("name", "rps", "errors", "p50_ms", "p99_ms", "p999_ms", "cpu_us_per_req")})
    base = out[0]
    for r in out:
        r["rps_ratio"] = r["rps"] / base["rps"]
        r["p99_ratio"] = r["p99_ms"] / base["p99_ms"] if base["p99_ms"] else 0
        r["cpu_ratio"] = r["cpu_us_per_req"] / base["cpu_us_per_req"] if base["cpu_us_per_req"] else 0
    return out


def table(summary, a, rows=(), rate=None):
    load = f"{rate} requests/s offered" if rate else "as fast as answered"
    lines = [
        f"{os.cpu_count()} cores; {a.workers} worker(s) per proxy"
        + (", pinned" if a.pin else "") + f"; wrk -t{a.threads} -c{a.connections}, {load}, "
        f"{a.warmup} s warm-up + {a.duration} s, median of {a.rounds} round(s)",
        "",
        "| proxy | req/s | × nginx | p50 ms | p99 ms | p99.9 ms | p99 × nginx | server CPU µs/req | CPU × nginx | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['name']} | {r['rps']:.0f} | {r['rps_ratio']:.2f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['p999_ms']:.2f} | {r['p99_ratio']:.2f} | "
            f"{r['cpu_us_per_req']:.1f} | {r['cpu_ratio']:.2f} | {r['errors']} |")
    by = {r["name"]: r for r in summary}
    if "wasmgate" in by and "wasmgate+3" in by:
        none = by["wasmgate"]["cpu_us_per_req"]
        lines.append("")
        lines.append(
            f"Added server CPU per request vs no plugin: 1 plugin "
            f"{by['wasmgate+1']['cpu_us_per_req'] - none:.1f} µs, 3 plugins "
            f"{by['wasmgate+3']['cpu_us_per_req'] - none:.1f} µs "
            f"({(by['wasmgate+3']['cpu_us_per_req'] - none) / 3:.1f} µs per plugin), body plugin "
            f"{by['wasmgate+body']['cpu_us_per_req'] - none:.1f} µs.")
    if rows:
        lines += ["", "Paired within each round (its cases run back to back), then the median "
                  "and range over the rounds:", ""] + paired(rows)
    return "\n".join(lines)


def paired(rows):
    """Figures taken within each round, then spread over the rounds: the machine's load
    drifts between rounds, and a difference of two medians taken in different rounds mixes
    that drift into what one plugin costs."""
    rounds = {}
    for r in rows:
        rounds.setdefault(r["round"], {})[r["name"]] = r
    figures = (
        ("wasmgate+1 req/s × nginx", lambda c: c["wasmgate+1"]["rps"] / c["nginx-proxy_pass"]["rps"]),
        ("wasmgate req/s × nginx", lambda c: c["wasmgate"]["rps"] / c["nginx-proxy_pass"]["rps"]),
        ("first plugin, added CPU µs/req",
         lambda c: c["wasmgate+1"]["cpu_us_per_req"] - c["wasmgate"]["cpu_us_per_req"]),
        ("per plugin with three, added CPU µs/req",
         lambda c: (c["wasmgate+3"]["cpu_us_per_req"] - c["wasmgate"]["cpu_us_per_req"]) / 3),
    )
    if any(r.get("rate") for r in rows):
        # At a fixed offered load every proxy serves the same requests per second: what
        # differs is how long they wait, and what they cost.
        p99 = lambda case: lambda c: c[case]["p99_ms"] / c["nginx-proxy_pass"]["p99_ms"]  # noqa: E731
        figures = (("wasmgate p99 × nginx", p99("wasmgate")),
                   ("wasmgate+1 p99 × nginx", p99("wasmgate+1")),
                   ("wasmgate+3 p99 × nginx", p99("wasmgate+3")),
                   ("wasmgate+body p99 × nginx", p99("wasmgate+body"))) + figures[2:]
    out = ["| figure | median | lowest | highest |", "|---|---:|---:|---:|"]
    for label, f in figures:
        try:
            values = [f(c) for c in rounds.values()]
        except (KeyError, ZeroDivisionError):
            continue
        out.append(f"| {label} | {median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    return out


def svg(summary, title):
    """Two bar charts side by side: requests/s and CPU per request, relative to nginx."""
    w, h, pad, bar = 760, 300, 40, 44
    colors = ["#888888", "#2f6db5", "#4a90d9", "#7ab3e8", "#e0883a"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             f'font-family="sans-serif" font-size="12">',
             f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="14">{title}</text>']
    for panel, (key, label) in enumerate((("rps_ratio", "requests/s × nginx"),
                                          ("cpu_ratio", "server CPU per request × nginx"))):
        x0 = pad + panel * (w / 2)
        top, bottom = 40, h - 60
        vmax = max(1.2, max(r[key] for r in summary) * 1.1)
        parts.append(f'<text x="{x0 + (w / 2 - 2 * pad) / 2}" y="{top - 6}" '
                     f'text-anchor="middle">{label}</text>')
        y1 = bottom - (bottom - top) / vmax
        parts.append(f'<line x1="{x0}" x2="{x0 + w / 2 - 2 * pad}" y1="{y1:.1f}" y2="{y1:.1f}" '
                     f'stroke="#c00" stroke-dasharray="4 3"/>')
        parts.append(f'<text x="{x0 + w / 2 - 2 * pad}" y="{y1 - 3:.1f}" text-anchor="end" '
                     f'fill="#c00" font-size="10">nginx = 1.0</text>')
        for i, r in enumerate(summary):
            v = r[key]
            bh = (bottom - top) * v / vmax
            bx = x0 + 8 + i * (bar + 10)
            parts.append(f'<rect x="{bx}" y="{bottom - bh:.1f}" width="{bar}" height="{bh:.1f}" '
                         f'fill="{colors[i % len(colors)]}"/>')
            parts.append(f'<text x="{bx + bar / 2}" y="{bottom - bh - 4:.1f}" '
                         f'text-anchor="middle" font-size="11">{v:.2f}</text>')
            parts.append(f'<text x="{bx + bar / 2}" y="{bottom + 14}" text-anchor="end" '
                         f'font-size="10" transform="rotate(-30 {bx + bar / 2} {bottom + 14})">'
                         f'{r["name"]}</text>')
        parts.append(f'<line x1="{x0}" x2="{x0 + w / 2 - 2 * pad}" y1="{bottom}" y2="{bottom}" '
                     f'stroke="#333"/>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def rates(text):
    """`--rates`: `max,20000` → [None, 20000] (None: as fast as answered)."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if part == "max":
            out.append(None)
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise argparse.ArgumentTypeError(f"{part!r}: a number of requests/s or `max`")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="do not pin the proxy to its own cores")
    ap.add_argument("--tls", action="store_true",
                    help="clients speak TLS to the proxies (nginx `listen ssl`, the gateway's "
                         "apisix.ssl listener)")
    ap.add_argument("--callback-timeout", help="the plugins' callback_timeout (off: no limit)")
    ap.add_argument("--rates", type=rates,
                    help="comma-separated offered loads in requests/s, `max` for as fast as "
                         "answered (the default): latency compared at the same load")
    ap.add_argument("--json")
    ap.add_argument("--svg")
    a = ap.parse_args()
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool):
            sys.exit(f"needs {tool} (Debian: apt-get install wrk nginx-light)")
    b = Bench(a)
    try:
        rows = b.run()
    finally:
        b.cleanup()
    texts, summaries = [], {}
    for rate in a.rates or [None]:
        these = [r for r in rows if r["rate"] == rate]
        summary = summaries[rate or "max"] = summarize(these)
        texts.append(table(summary, a, these, rate))
    print("\n\n".join(texts))
    summary = summaries.get("max") or next(iter(summaries.values()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"settings": vars(a), "rows": rows, "summary": summary,
                       "by_load": summaries}, f, indent=1)
    if a.svg:
        with open(a.svg, "w") as f:
            f.write(svg(summary, f"wasmgate vs nginx proxy_pass{' over TLS' if a.tls else ''}, "
                                 f"{a.workers} worker(s), "
                                 f"{os.cpu_count()} cores"))


if __name__ == "__main__":
    main()
