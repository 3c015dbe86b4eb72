#!/usr/bin/env python3
"""Fault: reload storm — SIGHUP to the master every --interval seconds while clients load the
gateway (keep-alive and one connection per request). Every reload starts a new set of workers
and drains the old one; not a single request may fail, and once the storm is over exactly
`worker_processes` worker processes remain (children of the master), every other one exited.

usage: scripts/chaos/sighup_storm.py [--duration 30] [--interval 0.1] [--workers 2]
                                     [--concurrency 8]
"""
import argparse
import os
import signal
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gwlib import Gateway, Load, Upstream, alive, log, pct, summary, wait_for, worker_children


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=30)
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=8)
    a = ap.parse_args()
    up = Upstream("u")
    gw = Gateway(workers=a.workers)
    try:
        gw.route("1", {"uri": "/*", "plugins": {"wasm_log": {"conf": "c"}}}, up)
        before = gw.admin("GET", "/apisix/admin/routes")[1]
        load = Load(gw.proxy_port, ["/h/a", "/h/b"], a.concurrency).start()
        seen, hups, peak = set(), 0, 0
        end = time.time() + a.duration
        while time.time() < end:
            gw.signal(signal.SIGHUP)
            hups += 1
            kids = worker_children(gw.pid)
            seen.update(kids)
            peak = max(peak, len(kids))
            time.sleep(a.interval)
        load.stop()
        log(f"load: sent {load.sent} ok {load.ok} failed {load.failed}; {hups} SIGHUP")
        for e in load.errors[:5]:
            log(f"  failure: {e}")
        # Let the last reload finish and the draining workers exit (1 s grace + in-flight).
        epoch = [0]

        def settled():
            s = gw.status()
            epoch[0] = s["master"]["epoch"]
            return (len(worker_children(gw.pid)) == a.workers and len(s["workers"]) == a.workers
                    and all(w["state"] == "running" for w in s["workers"]))

        t0 = time.time()
        wait_for(settled, 30, "draining workers gone")
        settle_s = time.time() - t0
        time.sleep(1)
        children = worker_children(gw.pid)
        current = gw.worker_pids()
        leaked = [p for p in seen if p not in current and alive(p)]
        after_ok = sum(1 for _ in range(50) if gw.url_get("/h/after")[0] == 200)
        lost = 0 if gw.admin("GET", "/apisix/admin/routes")[1] == before else 1
        ok = (load.failed == 0 and len(children) == a.workers and not leaked and after_ok == 50
              and lost == 0 and epoch[0] > 0)
        return summary(
            "reload storm", f"SIGHUP every {a.interval}s for {a.duration:.0f}s", load.sent,
            load.failed, lost, ok, sighups=hups, reloads_applied=epoch[0],
            workers_seen=len(seen), peak_workers=peak, settle_s=f"{settle_s:.1f}",
            workers_after=f"{len(children)}/{a.workers}", leaked=len(leaked),
            after_ok=f"{after_ok}/50", p50_ms=f"{pct(load.latencies, 50) * 1000:.0f}",
            p99_ms=f"{pct(load.latencies, 99) * 1000:.0f}",
            max_ms=f"{max(load.latencies or [0]) * 1000:.0f}")
    finally:
        gw.cleanup()
        up.close()


if __name__ == "__main__":
    sys.exit(main())
