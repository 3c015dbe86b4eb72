#!/usr/bin/env python3
"""Fault: worker processes die (`kill -9` of a random live worker every --interval seconds)
while clients load the gateway. Only requests in flight on the killed worker may fail; the
master respawns a worker that was serving at once, the listening sockets it owns keep new
connections in the backlog, and at the end every worker slot is running again with no stray
process.

usage: scripts/chaos/kill_workers.py [--duration 30] [--interval 0.2] [--workers 2]
                                     [--concurrency 8]
"""
import argparse
import os
import random
import signal
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gwlib import Gateway, Load, Upstream, alive, log, pct, summary, wait_for, worker_children


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=30)
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=8)
    a = ap.parse_args()
    up = Upstream("u")
    gw = Gateway(workers=a.workers)
    try:
        gw.route("1", {"uri": "/*", "plugins": {"wasm_log": {"conf": "c"}}}, up)
        before = gw.admin("GET", "/apisix/admin/routes")[1]
        load = Load(gw.proxy_port, ["/k/a", "/k/b"], a.concurrency).start()
        kills, skipped, killed, kill_times = 0, 0, [], []
        rnd = random.Random(42)
        end = time.time() + a.duration
        while time.time() < end:
            live = worker_children(gw.pid)
            if live:
                victim = rnd.choice(live)
                try:
                    kill_times.append(time.monotonic())
                    os.kill(victim, signal.SIGKILL)
                    kills += 1
                    killed.append(victim)
                except ProcessLookupError:
                    skipped += 1
            else:
                skipped += 1
            time.sleep(a.interval)
        load.stop()
        log(f"load: sent {load.sent} ok {load.ok} failed {load.failed}; kills {kills}, "
            f"ticks with no live worker {skipped}")
        for e in load.errors[:5]:
            log(f"  failure: {e}")
        # Respawn backoff is at most 5 s; then every slot serves again.
        t0 = time.time()
        wait_for(lambda: all(w["state"] == "running" for w in gw.status()["workers"])
                 and len(worker_children(gw.pid)) == a.workers, 20, "workers back")
        recovered = time.time() - t0
        after_ok = sum(1 for _ in range(50) if gw.url_get("/k/after")[0] == 200)
        children = len(worker_children(gw.pid))
        stray = [p for p in killed if alive(p)]
        after = gw.admin("GET", "/apisix/admin/routes")[1]
        lost = 0 if after == before else 1
        restarts = sum(w["restarts"] for w in gw.status()["workers"])
        unexplained = load.unexplained(kill_times)
        ok = (load.failed <= kills * a.concurrency and unexplained == 0 and after_ok == 50
              and children == a.workers
              and not stray and lost == 0 and load.ok > 0)
        return summary(
            "worker killed", f"kill -9 random worker every {a.interval}s for {a.duration:.0f}s",
            load.sent, load.failed, lost, ok, kills=kills, bound=kills * a.concurrency,
            failed_without_kill_in_flight=unexplained, no_live_worker_ticks=skipped,
            restarts=restarts, recovered_s=f"{recovered:.1f}", after_ok=f"{after_ok}/50",
            workers=f"{children}/{a.workers}", stray=len(stray),
            longest_stall_s=f"{load.longest_stall():.1f}",
            p99_ms=f"{pct(load.latencies, 99) * 1000:.0f}",
            max_ms=f"{max(load.latencies or [0]) * 1000:.0f}")
    finally:
        gw.cleanup()
        up.close()


if __name__ == "__main__":
    sys.exit(main())
