#!/usr/bin/env python3
"""Fault: hostile clients, while well-behaved clients keep using the gateway.

Limits under test (config: client_header_timeout 2s, client_body_timeout 2s,
client_max_header_size 8k, client_max_body_size 64k, keepalive_timeout 5s, send_timeout 2s):

  * slowloris: --slowloris connections trickling one header byte every 0.5 s, reconnecting when
    cut: each must be cut within client_header_timeout (+1 s);
  * idle: --idle connections that never send a byte: cut within client_header_timeout (+1 s);
  * header floods: 150 headers, a 10 KB header, an endless header stream → 431, connection closed;
  * oversize bodies: Content-Length 1 MB → 413; chunked 1 MB (no length) → 413;
  * stalled body: --slowbody requests that send 10 of 60 000 announced body bytes, then nothing:
    each must be cut (408) within client_body_timeout (+2 s). As in nginx, the timeout is
    between two reads, so a body that keeps trickling is not cut by it;
  * non-readers: --nonreaders connections that ask for an 8 MiB answer and never read it: the
    gateway must let go of each (its worker's connection count falls back) within send_timeout
    (+3 s), however long the client keeps its socket open;
  * fd exhaustion: a second gateway with RLIMIT_NOFILE 1024 and 1 worker, 1500 idle connections.

Good clients (keep-alive and one-shot) must see no failure; their latency is reported next to a
baseline taken before the attack.

usage: scripts/chaos/hostile_clients.py [--duration 20] [--slowloris 200] [--idle 500]
                                        [--slowbody 20] [--nonreaders 50]
"""
import argparse
import os
import resource
import socket
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gwlib import Gateway, Load, Upstream, log, pct, summary

LIMITS = ["client_header_timeout: 2s", "client_body_timeout: 2s", "client_max_header_size: 8k",
          "client_max_body_size: 64k", "keepalive_timeout: 5s", "send_timeout: 2s"]
HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
SEND_TIMEOUT = 2.0


def connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def closed(s):
    """Whether the server cut `s`: closed it, or answered a request that was never completed
    (the 408 for a stalled body); the answer is consumed so the next check sees the close."""
    try:
        s.setblocking(False)
        d = s.recv(4096)
        return True if d == b"" else d.startswith(b"HTTP/1.1 4") or closed(s)
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        try:
            s.setblocking(True)
        except OSError:
            pass


class Trickle:
    """`n` connections sending `head` then `unit` every `every` s; records each lifetime."""

    def __init__(self, port, n, head, unit, every):
        self.port, self.n, self.head, self.unit, self.every = port, n, head, unit, every
        self.lifetimes, self.stop = [], threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self):
        conns = []
        while not self.stop.is_set():
            while len(conns) < self.n and not self.stop.is_set():
                try:
                    s = connect(self.port)
                    if self.head:
                        s.sendall(self.head)
                    conns.append((s, time.monotonic()))
                except OSError:
                    time.sleep(0.05)
                    break
            keep = []
            for s, born in conns:
                gone = closed(s)
                if not gone and self.unit:
                    try:
                        s.sendall(self.unit)
                    except OSError:
                        gone = True
                if gone:
                    self.lifetimes.append(time.monotonic() - born)
                    s.close()
                else:
                    keep.append((s, born))
            conns = keep
            self.stop.wait(self.every)
        self.open_at_end = [time.monotonic() - b for _, b in conns]
        for s, _ in conns:
            s.close()


def exchange(port, data, timeout=10):
    """Sends `data`, returns (status line, seconds)."""
    t0 = time.monotonic()
    s = connect(port)
    s.settimeout(timeout)
    try:
        s.sendall(data)
    except OSError:
        pass
    out = b""
    try:
        while b"\r\n" not in out:
            d = s.recv(4096)
            if not d:
                break
            out += d
    except OSError:
        pass
    s.close()
    return out.split(b"\r\n")[0].decode(errors="replace"), time.monotonic() - t0


def endless_headers(port):
    """Header lines without end: (status line, bytes the gateway took before cutting)."""
    s = connect(port)
    s.settimeout(5)
    sent = 0
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        while sent < 50 << 20:
            s.sendall(b"X-Flood: " + b"a" * 1000 + b"\r\n")
            sent += 1011
    except OSError:
        pass
    try:
        line = s.recv(200).split(b"\r\n")[0].decode(errors="replace")
    except OSError as e:
        line = f"<{e}>"
    s.close()
    return line, sent


def floods(port, stop, results):
    hdrs = "".join(f"X-H{i}: v\r\n" for i in range(150)).encode()
    big = b"X-Big: " + b"v" * 10_000 + b"\r\n"
    body = b"x" * (1 << 20)
    chunked = b"100000\r\n" + body + b"\r\n0\r\n\r\n"
    cases = {
        "150 headers": (b"GET /a HTTP/1.1\r\nHost: x\r\n" + hdrs + b"Connection: close\r\n\r\n", "431"),
        "10 KB header": (b"GET /a HTTP/1.1\r\nHost: x\r\n" + big + b"Connection: close\r\n\r\n", "431"),
        "Content-Length 1 MB": (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n"
                                b"Connection: close\r\n\r\n" + body, "413"),
        "chunked 1 MB": (b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                         b"Connection: close\r\n\r\n" + chunked, "413"),
    }
    while not stop.is_set():
        for name, (data, want) in cases.items():
            line, _ = exchange(port, data)
            r = results.setdefault(name, {"sent": 0, "ok": 0, "got": {}})
            r["sent"] += 1
            code = line.split(" ")[1] if line.count(" ") >= 1 else line
            r["got"][code] = r["got"].get(code, 0) + 1
            if code == want:
                r["ok"] += 1
        line, taken = endless_headers(port)
        r = results.setdefault("endless header stream", {"sent": 0, "ok": 0, "got": {}, "max_taken": 0})
        r["sent"] += 1
        code = line.split(" ")[1] if line.startswith("HTTP/") else line
        r["got"][code] = r["got"].get(code, 0) + 1
        r["max_taken"] = max(r["max_taken"], taken)
        if code == "431":
            r["ok"] += 1
        stop.wait(0.2)


def good_clients(port, seconds, concurrency=4):
    load = Load(port, ["/good"], concurrency, timeout=30).start()
    time.sleep(seconds)
    load.stop()
    return load


def connections(gw):
    return sum(w["active_connections"] for w in gw.status()["workers"])


def non_readers(gw, n):
    """`n` clients ask for 8 MiB each and never read, keeping their sockets open. Returns the
    gateway's connection count once they are all in (over the count before), how long after
    the last request it fell back (None: not within send_timeout + 10 s), and how many of the
    answers the access log shows cut short (status 200, fewer than 8 MiB sent)."""
    # The floods' connections close within their linger: a quiet count to start from.
    deadline = time.monotonic() + 5
    while connections(gw) > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    before = connections(gw)
    socks = []
    for _ in range(n):
        s = connect(gw.proxy_port)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        s.sendall(b"GET /big/8388608 HTTP/1.1\r\nHost: x\r\n\r\n")
        socks.append(s)
    started = time.monotonic()
    time.sleep(0.5)
    held = connections(gw) - before
    released = None
    while time.monotonic() - started < SEND_TIMEOUT + 10:
        if connections(gw) <= before:
            released = time.monotonic() - started
            break
        time.sleep(0.1)
    for s in socks:
        s.close()
    time.sleep(0.5)
    cut = 0
    with open(os.path.join(gw.prefix, "logs", "access.log"), errors="replace") as f:
        for line in f:
            if '"GET /big/8388608 HTTP/1.1"' in line:
                status, sent = line.split('"GET /big/8388608 HTTP/1.1"', 1)[1].split()[:2]
                cut += status == "200" and int(sent) < 8388608
    return held, released, cut


def fd_exhaustion(up, seconds=8):
    gw = Gateway(workers=1, http_extra=LIMITS, nofile=1024)
    try:
        gw.route("1", {"uri": "/*"}, up)
        warm = Load(gw.proxy_port, ["/good"], 2).start()
        time.sleep(1)
        warm.stop()
        idle = Trickle(gw.proxy_port, 1500, b"", b"", 0.2)
        idle.t.start()
        time.sleep(1)
        load = good_clients(gw.proxy_port, seconds, 4)
        idle.stop.set()
        idle.t.join()
        emfile = gw.error_log().count("accept() failed")
        return load, emfile, idle
    finally:
        gw.cleanup()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--slowloris", type=int, default=200)
    ap.add_argument("--idle", type=int, default=500)
    ap.add_argument("--slowbody", type=int, default=20)
    ap.add_argument("--nonreaders", type=int, default=50)
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    up = Upstream("u")
    gw = Gateway(workers=2, http_extra=LIMITS)
    try:
        gw.route("1", {"uri": "/*", "upstream": {"nodes": {up.addr: 1},
                                                 "timeout": {"connect": 2, "send": 5, "read": 5}}})
        base = good_clients(gw.proxy_port, 5)
        log(f"baseline: {base.ok}/{base.sent} ok, p50 {pct(base.latencies, 50) * 1000:.1f} ms, "
            f"p99 {pct(base.latencies, 99) * 1000:.1f} ms")
        loris = Trickle(gw.proxy_port, a.slowloris, b"GET /a HTTP/1.1\r\nHost: x\r\n", b"X", 0.5)
        idle = Trickle(gw.proxy_port, a.idle, b"", b"", 0.5)
        rudy = Trickle(gw.proxy_port, a.slowbody,
                       b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n" + b"x" * 10,
                       b"", 0.5)
        stop, fl = threading.Event(), {}
        ft = threading.Thread(target=floods, args=(gw.proxy_port, stop, fl), daemon=True)
        for t in (loris.t, idle.t, rudy.t, ft):
            t.start()
        time.sleep(1)
        attack = good_clients(gw.proxy_port, a.duration)
        stop.set()
        for x in (loris, idle, rudy):
            x.stop.set()
        for t in (loris.t, idle.t, rudy.t, ft):
            t.join(30)
        st = gw.status()
        rss = max(w["rss_bytes"] for w in st["workers"]) >> 20
        restarts = sum(w["restarts"] for w in st["workers"])
        log(f"under attack: {attack.ok}/{attack.sent} ok, p50 "
            f"{pct(attack.latencies, 50) * 1000:.1f} ms, p99 {pct(attack.latencies, 99) * 1000:.1f} ms"
            f", max {max(attack.latencies or [0]) * 1000:.0f} ms; worker RSS max {rss} MiB, "
            f"restarts {restarts}")
        for e in attack.errors[:3]:
            log(f"  good client failure: {e}")
        loris_max = max(loris.lifetimes + loris.open_at_end or [0])
        idle_max = max(idle.lifetimes + idle.open_at_end or [0])
        rudy_max = max(rudy.lifetimes + rudy.open_at_end or [0])
        log(f"slowloris: {len(loris.lifetimes)} connections cut, longest {loris_max:.1f} s")
        log(f"idle: {len(idle.lifetimes)} connections cut, longest {idle_max:.1f} s")
        log(f"stalled body: {len(rudy.lifetimes)} cut, p50 {pct(rudy.lifetimes, 50):.1f} s, "
            f"longest {rudy_max:.1f} s, "
            f"{len(rudy.open_at_end)} open at the end")
        flood_bad = 0
        for name, r in fl.items():
            log(f"{name}: {r['ok']}/{r['sent']} as expected, answers {r['got']}"
                + (f", at most {r['max_taken'] >> 10} KiB taken" if "max_taken" in r else ""))
            flood_bad += r["sent"] - r["ok"]
        held, released, cut = non_readers(gw, a.nonreaders)
        log(f"non-readers: {a.nonreaders} asked for 8 MiB and never read; {held} connections "
            f"held, " + (f"all let go {released:.1f} s after the last request"
                         if released is not None
                         else f"still held after {SEND_TIMEOUT + 10:.0f} s")
            + f"; {cut} answers cut short in the access log")
        fd_load, emfile, fd_idle = fd_exhaustion(up)
        log(f"fd exhaustion (nofile 1024, 1500 idle): good {fd_load.ok}/{fd_load.sent} ok, "
            f"p99 {pct(fd_load.latencies, 99) * 1000:.0f} ms, max "
            f"{max(fd_load.latencies or [0]) * 1000:.0f} ms; {emfile} accept() failures logged")
        for e in fd_load.errors[:3]:
            log(f"  good client failure: {e}")
        limit = HEADER_TIMEOUT + 1.0
        # + the 0.5 s between checks, + the upstream connect: the body is read (and its clock
        # runs) once the upstream connection is up, and the upstream here is a Python server
        # under the floods.
        rudy_held = rudy_max > BODY_TIMEOUT + 2.0
        failed = attack.failed + fd_load.failed
        # + the time to fill the sockets' buffers (the clock starts at the last write that
        # went through; the Python upstream makes each 8 MiB answer), + the count's refresh.
        # At least send_timeout: the timeout let them go, not some other error.
        readers_held = (released is None or released > SEND_TIMEOUT + 3.0
                        or released < SEND_TIMEOUT or held < a.nonreaders
                        or cut != a.nonreaders)
        ok = (failed == 0 and loris_max <= limit and idle_max <= limit and flood_bad == 0
              and not rudy_held and not readers_held and restarts == 0)
        return summary(
            "hostile clients",
            f"{a.slowloris} slowloris + {a.idle} idle + {a.slowbody} stalled-body connections, header/"
            f"body floods for {a.duration:.0f}s; {a.nonreaders} non-readers; 1500 idle vs nofile "
            f"1024",
            attack.sent + fd_load.sent, failed, 0, ok,
            base_p99_ms=f"{pct(base.latencies, 99) * 1000:.1f}",
            attack_p99_ms=f"{pct(attack.latencies, 99) * 1000:.1f}",
            slowloris_max_s=f"{loris_max:.1f}", idle_max_s=f"{idle_max:.1f}",
            stalled_body_max_s=f"{rudy_max:.1f}", floods_unexpected=flood_bad,
            non_readers_released_s=f"{released:.1f}" if released is not None else "never",
            fd_exhaustion_max_ms=f"{max(fd_load.latencies or [0]) * 1000:.0f}",
            worker_rss_mib=rss)
    finally:
        gw.cleanup()
        up.close()


if __name__ == "__main__":
    sys.exit(main())
