#!/usr/bin/env python3
"""TLS handshakes against nginx, measured in one run: what a new connection costs the server,
with a full handshake and with a resumed session, and how many sessions resume.

nginx terminates TLS as APISIX configures it (`ssl_session_cache shared:SSL:20m`,
`ssl_session_timeout 10m`, `ssl_session_tickets off`) and proxies to an nginx upstream
(`return 200`); the gateway does the same with its `apisix.ssl` listener and an SSL object
(sessions in its shared cache, tickets off, the default). Both have the same worker count
(2 by default: a client that reconnects lands on either worker) and the same ECDSA P-256
certificate (with --rsa, an RSA 2048 one). Client processes (Python's ssl, OpenSSL) open one connection per request
(`Connection: close`), one after the other:

  full      no session offered: every connection a full handshake
  resumed   each connection offers the session of the one before (TLS 1.3 tickets are used
            once, so each connection's own new ticket is offered next)

For each: the server's CPU time per connection (user + system of its workers, from /proc),
connections per second, and the share of connections that resumed; the CPU each as a ratio to
nginx's in the same mode. (Needs nginx, openssl and target/release/wasmgate.)

usage: scripts/bench/handshakes.py [--workers 2] [--connections 3000] [--clients 2]
                                   [--rounds 2] [--tls13 | --tls12] [--rsa]
"""
import argparse
import multiprocessing
import os
import socket
import ssl
import subprocess
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import HZ, TLS_NAME, Bench, children, cpu_ticks, ppid  # noqa: E402

APISIX_SESSIONS = " ssl_session_cache shared:SSL:20m; ssl_session_timeout 10m; ssl_session_tickets off;"


class Handshakes(Bench):
    def __init__(self, a):
        super().__init__(a)
        if a.rsa:
            # The same names, an RSA 2048 key: signing one is what a resumed session saves.
            cert, key = self.tls
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                            "-days", "2", "-subj", f"/CN={TLS_NAME}",
                            "-addext", f"subjectAltName=DNS:{TLS_NAME},IP:127.0.0.1",
                            "-keyout", key, "-out", cert], check=True, capture_output=True)

    def nginx_tls(self):
        return super().nginx_tls() + APISIX_SESSIONS


def client(args):
    """`n` connections to `port`, one request each; returns (connections, resumed)."""
    port, n, resume, cafile, version = args
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ctx.maximum_version = version
    session, resumed = None, 0
    request = f"GET /none HTTP/1.1\r\nHost: {TLS_NAME}\r\nConnection: close\r\n\r\n".encode()
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port)) as raw:
            # Without it, TLS 1.2's resumed handshake (the client's Finished, then its
            # request) waits on the server's delayed ACK: 40 ms a connection, both servers.
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with ctx.wrap_socket(raw, server_hostname=TLS_NAME,
                                 session=session if resume else None) as s:
                s.sendall(request)
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
                if not answer.startswith(b"HTTP/1.1 200"):
                    sys.exit(f"port {port}: {answer[:80]!r}")
                resumed += s.session_reused
                session = s.session
    return n, resumed


def measure(pool, a, port, pids, resume, cafile):
    per = a.connections // a.clients
    job = (port, per, resume, cafile, a.version)
    pool.map(client, [(port, 50, resume, cafile, a.version)] * a.clients)  # warm-up
    c0, t0 = cpu_ticks(pids()), time.time()
    done = pool.map(client, [job] * a.clients)
    c1, t1 = cpu_ticks(pids()), time.time()
    n = sum(d[0] for d in done)
    return {
        "cpu_us": (c1 - c0) * 1e6 / HZ / n,
        "per_s": n / (t1 - t0),
        "resumed": sum(d[1] for d in done) / n,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--connections", type=int, default=3000)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rsa", action="store_true", help="an RSA 2048 certificate (ECDSA P-256 by default)")
    v = ap.add_mutually_exclusive_group()
    v.add_argument("--tls12", action="store_const", dest="version",
                   const=ssl.TLSVersion.TLSv1_2)
    v.add_argument("--tls13", action="store_const", dest="version",
                   const=ssl.TLSVersion.TLSv1_3)
    a = ap.parse_args()
    a.version = a.version or ssl.TLSVersion.TLSv1_3
    # What Bench reads: TLS on, no pinning (the clients need the cores too).
    a.tls, a.pin, a.callback_timeout = True, False, None
    b = Handshakes(a)
    try:
        b.start_nginx()
        _, gw_workers = b.start_gateway()
        base_master = b.procs[1].pid
        base_workers = lambda: [p for p in children("nginx: worker process")  # noqa: E731
                                if ppid(p) == base_master]
        cafile = b.tls[0]
        results = {}
        with multiprocessing.Pool(a.clients) as pool:
            for _ in range(a.rounds):
                for name, port, pids in (("nginx", b.base, base_workers),
                                         ("wasmgate", b.gw, gw_workers)):
                    for mode in ("full", "resumed"):
                        r = measure(pool, a, port, pids, mode == "resumed", cafile)
                        results.setdefault((name, mode), []).append(r)
                        print(f"  {name:9} {mode:8} {r['cpu_us']:7.1f} us/conn "
                              f"{r['per_s']:7.0f} conn/s  resumed {r['resumed']:.0%}",
                              file=sys.stderr)
    finally:
        b.cleanup()
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    print(f"\n{a.version.name}, {'RSA 2048' if a.rsa else 'ECDSA P-256'}, {a.workers} workers, {a.clients} clients × "
          f"{a.connections // a.clients} connections, {a.rounds} rounds (means)\n")
    print("| server | handshake | CPU µs per connection | × nginx | connections/s | resumed |")
    print("|---|---|---:|---:|---:|---:|")
    for (name, mode), rows in results.items():
        cpu = mean(rows, "cpu_us")
        base = mean(results[("nginx", mode)], "cpu_us")
        print(f"| {name} | {mode} | {cpu:.1f} | {cpu / base:.2f} | "
              f"{mean(rows, 'per_s'):.0f} | {mean(rows, 'resumed'):.0%} |")


if __name__ == "__main__":
    main()
