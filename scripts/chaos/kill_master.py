#!/usr/bin/env python3
"""Fault: the master dies (`kill -9`), --cycles times, under proxy load.

Each cycle: the workers must exit by themselves (PR_SET_PDEATHSIG) — none may survive its
master — then `wasmgate start` on the same prefix (stale pid file left behind) must recover every
object exactly as acknowledged (routes, services, upstreams, global rules, with their indexes),
serve every route, and keep the revision counter growing. Requests fail only while no master
runs (between the kill and the restart); data lost must be 0.

usage: scripts/chaos/kill_master.py [--cycles 10] [--routes 40] [--concurrency 4]
"""
import argparse
import os
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gwlib import Gateway, Load, Upstream, alive, log, summary, wait_for, worker_children


def everything(gw):
    out = {}
    for kind in ("routes", "services", "upstreams", "plugin_configs", "global_rules"):
        st, v = gw.admin("GET", f"/apisix/admin/{kind}")
        assert st == 200, v
        out[kind] = v
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--routes", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=4)
    a = ap.parse_args()
    up = Upstream("persisted")
    gw = Gateway(workers=2)
    try:
        assert gw.admin("PUT", "/apisix/admin/upstreams/u1", {"nodes": {up.addr: 1}})[0] == 201
        assert gw.admin("PUT", "/apisix/admin/services/s1",
                        {"upstream_id": "u1",
                         "plugins": {"wasm_log": {"conf": "svc"}}})[0] == 201
        assert gw.admin("PUT", "/apisix/admin/global_rules/g1",
                        {"plugins": {"rewrite": {"conf": {"response_set": {"x-g": "1"}}}}})[0] == 201
        for i in range(a.routes):
            body = {"uri": f"/r{i}", "service_id": "s1"}
            if i % 3 == 0:
                body["plugins"] = {"rewrite": {"conf": {"response_set": {"x-r": str(i)}}}}
            assert gw.admin("PUT", f"/apisix/admin/routes/{i}", body)[0] == 201
        gw.wait_propagated()
        paths = [f"/r{i}" for i in range(a.routes)]

        def check(st, h, b, p):
            if st != 200 or h.get("x-upstream") != "persisted" or h.get("x-g") != "1":
                return f"status {st} {h.get('x-upstream')} {h.get('x-g')}"
            return None

        load = Load(gw.proxy_port, paths, a.concurrency, timeout=5, check=check, pace=0.002,
                    fail_pause=0.1)
        load.start()
        lost, survivors, exit_ms, restart_ms, downtime = 0, 0, [], [], []
        for cycle in range(a.cycles):
            time.sleep(1.0)
            before = everything(gw)
            workers = worker_children(gw.pid)
            t_kill = time.monotonic()
            gw.kill9()
            try:
                wait_for(lambda: not any(alive(p) for p in workers), 5, "workers exit")
            except RuntimeError:
                pass
            exit_ms.append((time.monotonic() - t_kill) * 1000)
            survivors += sum(1 for p in workers if alive(p))
            t0 = time.monotonic()
            gw.start()
            t_up = time.monotonic()
            restart_ms.append((t_up - t0) * 1000)
            downtime.append((t_kill, t_up))
            after = everything(gw)
            if after != before:
                lost += 1
                log(f"cycle {cycle}: objects differ after restart")
            # The revision only grows: a new write gets a larger modifiedIndex than any before.
            top = max(e["modifiedIndex"] for k in before.values() for e in k["list"])
            st, v = gw.admin("PATCH", "/apisix/admin/routes/0", {"desc": f"cycle {cycle}"})
            if st != 200 or not (gw.admin("GET", "/apisix/admin/routes/0")[1]["modifiedIndex"] > top):
                lost += 1
                log(f"cycle {cycle}: revision went back: {st} {v}")
            gw.wait_propagated()
        time.sleep(1.0)
        load.stop()
        # Failures outside [kill, restart] windows are not explained by the outage.
        unexplained = 0
        for s, e in load.fail_spans:
            if not any(s <= b + 0.05 and e >= k - 0.05 for k, b in downtime):
                unexplained += 1
        served = sum(1 for p in paths if gw.url_get(p)[0] == 200)
        log(f"load: sent {load.sent} ok {load.ok} failed {load.failed} "
            f"(unexplained by the outage: {unexplained})")
        for e in load.errors[:3]:
            log(f"  failure: {e}")
        ok = lost == 0 and survivors == 0 and unexplained == 0 and served == len(paths)
        return summary(
            "master killed", f"kill -9 master ×{a.cycles} under load, then wasmgate start",
            load.sent, load.failed, lost, ok, objects=a.routes + 3, worker_survivors=survivors,
            workers_gone_ms_max=f"{max(exit_ms):.0f}", restart_ms_max=f"{max(restart_ms):.0f}",
            failed_outside_outage=unexplained, routes_served_after=f"{served}/{len(paths)}")
    finally:
        gw.cleanup()
        up.close()


if __name__ == "__main__":
    sys.exit(main())
