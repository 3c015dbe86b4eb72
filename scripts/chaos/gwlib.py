"""Shared helpers for the chaos scripts: a real wasmgate (target/release/wasmgate, master +
workers) in a temporary prefix on loopback ports, a test upstream, a load generator, process
inspection through /proc, and a tiny WebAssembly encoder for hostile test plugins.

Only the standard library is used. Every script prints one summary line of the form
  SUMMARY fault=<...> injected=<...> sent=<n> failed=<n> data_lost=<n> result=PASS|FAIL [extra]
and exits non-zero on FAIL.
"""
import http.client
import http.server
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.path.join(ROOT, "target", "release", "wasmgate")
FIXTURES = os.path.join(ROOT, "tests", "plugins", "wasm")
KEY = "chaos-admin-key-0123456789abcdef"
VIEWER_KEY = "chaos-viewer-key-0123456789"

# (name, priority, fixture file or absolute path, phase, extra settings)
PLUGINS = [
    ("wasm_log", 7999, "recorder", "access", ""),
    ("echo", 100, "echo", "access", ""),
    ("rewrite", 500, "header_rewrite", "access", ""),
    ("faulty", 9000, "faulty", "access", "callback_timeout: 200ms, memory_limit: 16m"),
    ("faulty_open", 9001, "faulty", "access", "fail_open: true, callback_timeout: 200ms"),
]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def pct(values, p):
    if not values:
        return 0.0
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100.0 * (len(v) - 1))))]


def summary(fault, injected, sent, failed, data_lost, ok, **extra):
    ex = " ".join(f"{k}={v}" for k, v in extra.items())
    line = (f"SUMMARY fault={fault!r} injected={injected!r} sent={sent} failed={failed} "
            f"data_lost={data_lost} result={'PASS' if ok else 'FAIL'} {ex}")
    print(line, flush=True)
    return 0 if ok else 1


# --------------------------------------------------------------------------------------------
# HTTP client helpers


def request(port, method, path, body=None, headers=None, timeout=30):
    """One request on a fresh connection: (status, headers dict lower-cased, body bytes)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        c.close()


# --------------------------------------------------------------------------------------------
# Test upstream


class _UpHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body are two writes: no 40 ms delayed-ACK stall

    def log_message(self, *a):
        pass

    def _answer(self):
        n = int(self.headers.get("content-length") or 0)
        if n:
            self.rfile.read(n)
        elif "chunked" in (self.headers.get("transfer-encoding") or "").lower():
            self._read_chunked()
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[0] == "delay" and len(parts) > 1:
            time.sleep(int(parts[1]) / 1000.0)
        self.server.hits += 1
        if parts[0] == "big" and len(parts) > 1:
            body = b"x" * int(parts[1])
        else:
            body = json.dumps({"server": self.server.name, "uri": self.path}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("x-upstream", self.server.name)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _read_chunked(self):
        # Reads the whole body as a real server does before answering, so an answer never
        # races the body the gateway is still sending.
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return
            self.rfile.read(size + 2)

    do_GET = do_POST = do_PUT = do_DELETE = _answer


class _UpServer(http.server.ThreadingHTTPServer):
    # Python's default backlog is 5: more connections at once wait for SYN retries (1 s, 3 s),
    # which the gateway would see as a slow upstream.
    request_queue_size = 1024


class Upstream:
    """A threaded HTTP/1.1 upstream answering `x-upstream: <name>`; `/delay/<ms>` waits,
    `/big/<bytes>` answers that many bytes."""

    def __init__(self, name="u"):
        self.srv = _UpServer(("127.0.0.1", 0), _UpHandler)
        self.srv.daemon_threads = True
        self.srv.handle_error = lambda request, address: None  # resets are expected here
        self.srv.name = name
        self.srv.hits = 0
        self.port = self.srv.server_address[1]
        self.t = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.t.start()

    @property
    def addr(self):
        return f"127.0.0.1:{self.port}"

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


# --------------------------------------------------------------------------------------------
# The gateway


class Gateway:
    def __init__(self, workers=2, http_extra=(), extra_plugins=(), shutdown_timeout="5s",
                 access_log=True, log_level="warn", data_dir=None, nofile=None):
        if not os.path.exists(BIN):
            sys.exit(f"{BIN} not found: run cargo build --release first")
        self.workers = workers
        self.prefix = tempfile.mkdtemp(prefix="wasmgate-chaos-")
        self.proxy_port, self.admin_port = free_port(), free_port()
        self.metrics_port = free_port()
        plugins = list(PLUGINS) + list(extra_plugins)
        lines = []
        for name, prio, f, phase, extra in plugins:
            path = f if os.path.isabs(f) else os.path.join(FIXTURES, f + ".wasm")
            ex = f", {extra}" if extra else ""
            lines.append(f"    - {{name: {name}, priority: {prio}, file: \"{path}\", "
                         f"http_request_phase: {phase}{ex}}}")
        http_lines = "".join(f"    {l}\n" for l in http_extra)
        if not access_log:
            http_lines += "    access_log: \"off\"\n"
        os.makedirs(os.path.join(self.prefix, "conf"))
        with open(self.config_path, "w") as f:
            f.write(
                "apisix:\n"
                f"  node_listen: [{{ip: 127.0.0.1, port: {self.proxy_port}}}]\n"
                "deployment:\n  admin:\n    admin_key:\n"
                f"      - {{name: admin, key: {KEY}, role: admin}}\n"
                f"      - {{name: viewer, key: {VIEWER_KEY}, role: viewer}}\n"
                f"    admin_listen: {{ip: 127.0.0.1, port: {self.admin_port}}}\n"
                "nginx_config:\n"
                f"  worker_processes: {workers}\n"
                f"  error_log_level: {log_level}\n"
                f"  worker_shutdown_timeout: {shutdown_timeout}\n"
                "  http:\n" + ("" if "keepalive_timeout" in http_lines
                                else "    keepalive_timeout: 60s\n") + http_lines +
                f"plugin_attr:\n  prometheus:\n    export_addr: {{ip: 127.0.0.1, port: {self.metrics_port}}}\n"
                "wasm:\n  plugins:\n" + "\n".join(lines) + "\n" +
                (f"wasmgate:\n  data_dir: \"{data_dir}\"\n" if data_dir else ""))
        self._data_dir = data_dir or os.path.join(self.prefix, "data")
        self.nofile = nofile
        self.proc = None
        self.start()

    @property
    def config_path(self):
        return os.path.join(self.prefix, "conf", "config.yaml")

    @property
    def data_dir(self):
        return self._data_dir

    def start(self, wait=True):
        self.stderr = open(os.path.join(self.prefix, "master.stderr"), "ab")
        limit = None
        if self.nofile:
            import resource
            limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))
        self.proc = subprocess.Popen([BIN, "start", "--foreground", "-p", self.prefix],
                                     stdout=subprocess.DEVNULL, stderr=self.stderr,
                                     preexec_fn=limit)
        if wait:
            self.wait_ready()

    def wait_ready(self, within=30):
        deadline = time.time() + within
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited during start: {self.master_stderr()}")
            try:
                w = self.status()["workers"]
                if len(w) == self.workers and all(x["state"] == "running" for x in w):
                    return
            except (OSError, ValueError, KeyError, http.client.HTTPException):
                pass
            time.sleep(0.02)
        raise RuntimeError("gateway not ready in time")

    def master_stderr(self):
        with open(os.path.join(self.prefix, "master.stderr"), "rb") as f:
            return f.read().decode(errors="replace")

    def error_log(self):
        try:
            with open(os.path.join(self.prefix, "logs", "error.log"), "rb") as f:
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self):
        return self.proc.pid

    def admin(self, method, path, body=None, key=KEY, timeout=30):
        h = {"Content-Type": "application/json"}
        if key:
            h["X-API-KEY"] = key
        st, _, data = request(self.admin_port, method, path, body, h, timeout)
        try:
            return st, json.loads(data)
        except ValueError:
            return st, data.decode(errors="replace")

    def status(self):
        st, v = self.admin("GET", "/wasmgate/status", timeout=10)
        if st != 200:
            raise ValueError(f"status {st}")
        return v

    def stats(self):
        return self.admin("GET", "/wasmgate/stats")[1]

    def worker_pids(self):
        return [w["pid"] for w in self.status()["workers"]]

    def wait_propagated(self, within=10):
        deadline = time.time() + within
        while True:
            s = self.status()
            g = s["master"]["generation"]
            if all(w["generation_seen"] == g for w in s["workers"]):
                return
            if time.time() > deadline:
                raise RuntimeError(f"generation not propagated: {s}")
            time.sleep(0.01)

    def route(self, rid, body, upstream=None):
        if upstream is not None:
            body = dict(body, upstream={"type": "roundrobin", "nodes": {upstream.addr: 1}})
        st, v = self.admin("PUT", f"/apisix/admin/routes/{rid}", body)
        if st not in (200, 201):
            raise RuntimeError(f"route {rid}: {st} {v}")
        self.wait_propagated()

    def url_get(self, path, headers=None, timeout=30):
        return request(self.proxy_port, "GET", path, None, headers, timeout)

    def signal(self, sig):
        os.kill(self.proc.pid, sig)

    def kill9(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cleanup(self):
        self.stop()
        subprocess.run(["chattr", "-R", "-i", self.prefix], stderr=subprocess.DEVNULL)
        shutil.rmtree(self.prefix, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Processes


def proc_info(pid):
    """(ppid, state, cmdline) of a live process, None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    rest = stat.rsplit(") ", 1)[1].split()
    return int(rest[1]), rest[0], cmd


def alive(pid):
    i = proc_info(pid)
    return i is not None and i[1] != "Z"


def worker_children(master_pid):
    """Live `wasmgate: worker process` children of the master."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        i = proc_info(int(d))
        if i and i[0] == master_pid and i[1] != "Z" and i[2].startswith("wasmgate: worker process"):
            out.append(int(d))
    return out


def wait_for(cond, within, what):
    deadline = time.time() + within
    while not cond():
        if time.time() > deadline:
            raise RuntimeError(f"timed out waiting for: {what}")
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# Load


class Load:
    """`concurrency` client threads sending GETs until stopped. Half keep their connection
    alive (like browsers and load balancers), half open one connection per request.
    `check(status, headers, body, path)` returns None when the answer is right, else a reason."""

    def __init__(self, port, paths, concurrency=8, timeout=30, check=None, keepalive=True,
                 pace=0.0, fail_pause=0.0):
        self.port, self.paths, self.concurrency = port, paths, concurrency
        self.fail_pause = fail_pause
        self.timeout, self.keepalive, self.pace = timeout, keepalive, pace
        self.check = check or (lambda st, h, b, p: None if st == 200 else f"status {st}")
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.sent = self.ok = self.failed = 0
        self.errors = []
        self.latencies = []
        self.done_at = []  # completion times of successful requests (monotonic)
        self.fail_spans = []  # (sent, failed) monotonic times of each failed request
        self.threads = []
        self.started = self.stopped = None

    def start(self):
        self.started = time.monotonic()
        for i in range(self.concurrency):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def _run(self, i):
        rnd = random.Random(i)
        conn = None
        keep = self.keepalive and i % 2 == 0
        while not self.stop_flag.is_set():
            path = rnd.choice(self.paths)
            t0 = time.monotonic()
            err = None
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
                conn.request("GET", path, headers={} if keep else {"Connection": "close"})
                r = conn.getresponse()
                body = r.read()
                hdrs = {k.lower(): v for k, v in r.getheaders()}
                err = self.check(r.status, hdrs, body, path)
                if not keep or hdrs.get("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                err = f"{type(e).__name__}: {e}"
                if conn is not None:
                    conn.close()
                conn = None
            dt = time.monotonic() - t0
            with self.lock:
                self.sent += 1
                if err is None:
                    self.ok += 1
                    self.latencies.append(dt)
                    self.done_at.append(t0 + dt)
                else:
                    self.failed += 1
                    self.fail_spans.append((t0, t0 + dt))
                    if len(self.errors) < 20:
                        self.errors.append(f"{path}: {err}")
            if self.pace:
                time.sleep(self.pace)
            if err is not None and self.fail_pause:
                time.sleep(self.fail_pause)
        if conn is not None:
            conn.close()

    def stop(self):
        self.stopped = time.monotonic()
        self.stop_flag.set()
        for t in self.threads:
            t.join(self.timeout + 5)
        return self

    def longest_stall(self):
        """The longest time (s) during the run without any request completing successfully."""
        t = sorted(self.done_at)
        points = [self.started] + t + [self.stopped]
        return max(b - a for a, b in zip(points, points[1:]))

    def unexplained(self, events, slack=0.05):
        """Failed requests during which none of `events` (monotonic times) happened."""
        ev = sorted(events)
        import bisect
        n = 0
        for a, b in self.fail_spans:
            i = bisect.bisect_left(ev, a - slack)
            if i == len(ev) or ev[i] > b + slack:
                n += 1
        return n

    def snapshot(self):
        with self.lock:
            return self.sent, self.ok, self.failed


# --------------------------------------------------------------------------------------------
# A minimal WebAssembly encoder for hostile Proxy-Wasm plugins (no wat2wasm needed)


def _uleb(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _sleb(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if (n == 0 and not b & 0x40) or (n == -1 and b & 0x40):
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


def _vec(items):
    return _uleb(len(items)) + b"".join(items)


def _name(s):
    return _uleb(len(s)) + s.encode()


def _section(sid, payload):
    return bytes([sid]) + _uleb(len(payload)) + payload


I32 = 0x7F


def _functype(params, results):
    return b"\x60" + _vec([bytes([p]) for p in params]) + _vec([bytes([r]) for r in results])


def _loop_calls(call_idx, args, count):
    """Body: `for i in 0..count { drop(call(args...)) }; return 0` with params (i32 i32 i32)
    and one extra local (index 3)."""
    code = bytearray()
    code += b"\x03\x40"  # loop (empty block type)
    for a in args:
        code += b"\x41" + _sleb(a)  # i32.const
    code += b"\x10" + _uleb(call_idx) + b"\x1a"  # call, drop
    code += b"\x20\x03\x41\x01\x6a\x22\x03"  # local.get 3, i32.const 1, i32.add, local.tee 3
    code += b"\x41" + _sleb(count) + b"\x49"  # i32.const count, i32.lt_u
    code += b"\x0d\x00\x0b"  # br_if 0, end (loop)
    code += b"\x41\x00\x0b"  # i32.const 0 (Continue), end (function)
    locals_ = _vec([_uleb(1) + bytes([I32])])
    body = locals_ + bytes(code)
    return _uleb(len(body)) + body


def hostile_module(kind, count, request=True, response=True):
    """A Proxy-Wasm module (ABI 0.2.1) whose `proxy_on_request_headers` and
    `proxy_on_response_headers` each call a host function `count` times:
    kind 'logflood' → proxy_log(warn, "log flood line …"); kind 'hdrflood' →
    proxy_add_header_map_value(map, "x-flood", 100-byte value) on the request (map 0) and
    response (map 2) headers. `request`/`response` False: that callback does nothing."""
    text = b"x-flood" + b"v" * 100 if kind == "hdrflood" else b"log flood line " + b"x" * 60
    types = [
        _functype([I32, I32, I32], [I32]),  # 0: proxy_log
        _functype([I32] * 5, [I32]),  # 1: proxy_add_header_map_value
        _functype([], []),  # 2: abi marker
        _functype([I32, I32], []),  # 3: context_create
        _functype([I32, I32, I32], [I32]),  # 4: on_*_headers
    ]
    imports = [
        _name("env") + _name("proxy_log") + b"\x00" + _uleb(0),
        _name("env") + _name("proxy_add_header_map_value") + b"\x00" + _uleb(1),
    ]
    funcs = [_uleb(2), _uleb(3), _uleb(4), _uleb(4)]  # 2 marker, 3 ctx, 4 req, 5 resp
    mem = _vec([b"\x00" + _uleb(1)])
    exports = [
        _name("memory") + b"\x02" + _uleb(0),
        _name("proxy_abi_version_0_2_1") + b"\x00" + _uleb(2),
        _name("proxy_on_context_create") + b"\x00" + _uleb(3),
        _name("proxy_on_request_headers") + b"\x00" + _uleb(4),
        _name("proxy_on_response_headers") + b"\x00" + _uleb(5),
    ]
    empty = _uleb(2) + b"\x00\x0b"
    ret0 = _uleb(4) + b"\x00\x41\x00\x0b"  # no locals; i32.const 0; end
    if kind == "logflood":
        req = _loop_calls(0, [3, 16, len(text)], count)
        resp = _loop_calls(0, [3, 16, len(text)], count)
    else:
        req = _loop_calls(1, [0, 16, 7, 23, 100], count)
        resp = _loop_calls(1, [2, 16, 7, 23, 100], count)
    code = [empty, empty, req if request else ret0, resp if response else ret0]
    data = [b"\x00\x41" + _sleb(16) + b"\x0b" + _uleb(len(text)) + text]
    return (b"\x00asm\x01\x00\x00\x00"
            + _section(1, _vec(types)) + _section(2, _vec(imports)) + _section(3, _vec(funcs))
            + _section(5, mem) + _section(7, _vec(exports)) + _section(10, _vec(code))
            + _section(11, _vec(data)))
