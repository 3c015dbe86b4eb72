#!/usr/bin/env python3
"""Fault: Admin API write storm under proxy load, then `kill -9` of the master.

Writer threads create, replace (PUT), patch (PATCH) and delete routes /s/<id> at random, each
route version answering with its own `x-ver` header (plugin `rewrite`) and one of two upstreams,
plus some invalid writes (refused with 400, never to be served). Each writer owns its route ids,
so the model of acknowledged writes is exact per id. Proxy clients meanwhile GET /s/<id>:

  * every proxied answer must be a state of that route that was acknowledged (or whose write was
    in flight) during the request, and never older than the last state acknowledged before the
    request was sent (200 with the right x-ver and upstream, or 404 when the route was absent);
  * after the storm, GET of every route equals the model, and so does the proxy;
  * after `kill -9` of the master and a restart, still equal (nothing acknowledged lost);
  * then a second storm is cut by `kill -9` of the master mid-write: after the restart each
    route is in its last acknowledged state, or in the state of the write that was in flight.

usage: scripts/chaos/admin_storm.py [--duration 30] [--writers 3] [--routes 12] [--readers 4]
"""
import argparse
import http.client
import os
import random
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gwlib import Gateway, Upstream, log, summary

NEG = float("-inf")


class Model:
    """Per route id: the acknowledged states in order, each {ver, up, sent, acked}; ver None =
    absent. `pending` holds a write whose answer never came (master killed)."""

    def __init__(self, ids):
        self.hist = {r: [{"ver": None, "up": None, "sent": NEG, "acked": NEG}] for r in ids}
        self.pending = {}
        self.refused_versions = set()
        self.acked = 0
        self.errors = []


def writer(gw, model, ids, stop, seed, counters):
    rnd = random.Random(seed)
    seq = 0
    while not stop.is_set():
        rid = rnd.choice(ids)
        cur = model.hist[rid][-1]
        seq += 1
        ver = f"{rid}-{seed}-{seq}"
        up = rnd.choice(["u1", "u2"])
        roll = rnd.random()
        if roll < 0.05:
            op, path = "PUT", f"/apisix/admin/routes/{rid}"
            body = {"uri": f"/s/{rid}", "upstream_id": up,
                    "plugins": {"no_such_plugin": {"conf": ver}}}
            new = None
        elif cur["ver"] is None or roll < 0.55:
            op, path = "PUT", f"/apisix/admin/routes/{rid}"
            body = {"uri": f"/s/{rid}", "upstream_id": up,
                    "plugins": {"rewrite": {"conf": {"response_set": {"x-ver": ver}}}}}
            new = {"ver": ver, "up": up}
        elif roll < 0.75:
            op, path = "PATCH", f"/apisix/admin/routes/{rid}"
            body = {"plugins": {"rewrite": {"conf": {"response_set": {"x-ver": ver}}}}}
            new = {"ver": ver, "up": cur["up"]}
        else:
            op, path, body = "DELETE", f"/apisix/admin/routes/{rid}", None
            new = {"ver": None, "up": None}
        sent = time.monotonic()
        model.pending[rid] = dict(new or {"ver": "refused"}, sent=sent)
        try:
            st, v = gw.admin(op, path, body, timeout=10)
        except (OSError, http.client.HTTPException):
            # The master went away mid-write: the outcome is unknown, the write stays pending.
            return
        acked = time.monotonic()
        del model.pending[rid]
        counters["writes"] += 1
        if new is None:
            model.refused_versions.add(ver)
            if st != 400:
                model.errors.append(f"invalid write answered {st}: {v}")
            continue
        if st in (200, 201):
            model.hist[rid].append(dict(new, sent=sent, acked=acked))
            model.acked += 1
        else:
            model.errors.append(f"{op} {path} answered {st}: {v}")


def reader(gw, ids, stop, seed, out):
    rnd = random.Random(seed)
    conn = None
    while not stop.is_set():
        rid = rnd.choice(ids)
        t0 = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", gw.proxy_port, timeout=10)
            conn.request("GET", f"/s/{rid}")
            r = conn.getresponse()
            r.read()
            res = (r.status, r.getheader("x-ver"), r.getheader("x-upstream"))
            if r.getheader("connection", "").lower() == "close":
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as e:
            res = ("error", str(e), None)
            if conn is not None:
                conn.close()
            conn = None
        out.append((rid, t0, time.monotonic(), res))


def verify_reads(model, reads):
    """Answers that match no acknowledged (or in-flight) state in their window."""
    bad = []
    for rid, t0, t1, (st, ver, up) in reads:
        hist = model.hist[rid]
        i = max(k for k, h in enumerate(hist) if h["acked"] < t0)
        allowed = [hist[i]] + [h for h in hist[i + 1:] if h["sent"] < t1]
        if st == 404:
            good = any(h["ver"] is None for h in allowed)
        elif st == 200:
            good = any(h["ver"] == ver and h["up"] == up for h in allowed)
        else:
            good = False
        if not good:
            bad.append((rid, st, ver, up, [h["ver"] for h in allowed]))
    return bad


def state_via_admin(gw, rid):
    st, v = gw.admin("GET", f"/apisix/admin/routes/{rid}")
    if st == 404:
        return {"ver": None, "up": None}
    val = v["value"]
    return {"ver": val["plugins"]["rewrite"]["conf"]["response_set"]["x-ver"],
            "up": val["upstream_id"]}


def state_via_proxy(gw, rid):
    st, h, _ = gw.url_get(f"/s/{rid}")
    if st == 404:
        return {"ver": None, "up": None}
    return {"ver": h.get("x-ver"), "up": h.get("x-upstream")}


def compare(gw, model, ids, allow_pending=False):
    """Routes whose admin or proxy state is not the model's (or, with allow_pending, not the
    state of the write in flight when the master died)."""
    lost = []
    for rid in ids:
        want = model.hist[rid][-1]
        ok_states = [(want["ver"], want["up"])]
        p = model.pending.get(rid)
        if allow_pending and p is not None and p["ver"] != "refused":
            ok_states.append((p["ver"], p["up"]))
        a, pr = state_via_admin(gw, rid), state_via_proxy(gw, rid)
        if (a["ver"], a["up"]) not in ok_states or (pr["ver"], pr["up"]) not in ok_states:
            lost.append((rid, ok_states, a, pr))
    st, v = gw.admin("GET", "/apisix/admin/routes")
    return lost, v["total"]


def storm(gw, model, ids, writers, readers, duration, kill_after=None):
    stop = threading.Event()
    counters = {"writes": 0}
    reads = []
    parts = [ids[i::writers] for i in range(writers)]
    ts = [threading.Thread(target=writer, args=(gw, model, parts[i], stop, i + 1, counters))
          for i in range(writers)]
    ts += [threading.Thread(target=reader, args=(gw, ids, stop, 100 + i, reads))
           for i in range(readers)]
    for t in ts:
        t.start()
    killed_at = None
    if kill_after is not None:
        time.sleep(kill_after)
        killed_at = time.monotonic()
        gw.kill9()  # mid-write: writers see the connection die
        time.sleep(0.2)
    else:
        time.sleep(duration)
    stop.set()
    for t in ts:
        t.join(15)
    if killed_at is not None:
        # Requests sent after the kill meet a stopped gateway: not part of the check.
        reads = [r for r in reads if r[1] < killed_at]
    return counters["writes"], reads


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=30)
    ap.add_argument("--writers", type=int, default=3)
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--routes", type=int, default=12)
    a = ap.parse_args()
    u1, u2 = Upstream("u1"), Upstream("u2")
    gw = Gateway(workers=2)
    try:
        for name, u in (("u1", u1), ("u2", u2)):
            st, v = gw.admin("PUT", f"/apisix/admin/upstreams/{name}", {"nodes": {u.addr: 1}})
            assert st in (200, 201), v
        ids = [f"r{i}" for i in range(a.routes)]
        model = Model(ids)
        writes, reads = storm(gw, model, ids, a.writers, a.readers, a.duration)
        bad = verify_reads(model, reads)
        failed = sum(1 for r in reads if r[3][0] not in (200, 404))
        log(f"storm 1: {writes} writes ({model.acked} acknowledged), {len(reads)} proxied, "
            f"{len(bad)} answers matching no acknowledged state, {failed} failed")
        for b in bad[:5]:
            log(f"  bad answer: {b}")
        for e in model.errors[:5]:
            log(f"  write error: {e}")
        gw.wait_propagated()
        lost1, total = compare(gw, model, ids)
        present = sum(1 for r in ids if model.hist[r][-1]["ver"] is not None)
        log(f"after storm 1: {len(lost1)} routes differ from the model; total {total}/{present}")
        gw.kill9()
        gw.start()
        lost2, total2 = compare(gw, model, ids)
        log(f"after kill -9 + restart: {len(lost2)} routes differ; total {total2}/{present}")
        # Storm 2, cut by kill -9 of the master in the middle of writes.
        writes2, reads2 = storm(gw, model, ids, a.writers, a.readers, None,
                                kill_after=min(5.0, a.duration / 3))
        pending = len(model.pending)
        gw.start()
        # A request in flight when the master died may lose its connection (PDEATHSIG kills
        # the workers); the others must match the model.
        cut = sum(1 for r in reads2 if r[3][0] == "error")
        bad2 = verify_reads(model, [r for r in reads2 if r[3][0] != "error"])
        lost3, _ = compare(gw, model, ids, allow_pending=True)
        resolved = sum(1 for rid, p in model.pending.items()
                       if state_via_admin(gw, rid)["ver"] == p["ver"])
        log(f"storm 2 cut by kill -9: {writes2} writes, {pending} in flight at the kill "
            f"({resolved} of them applied), {len(lost3)} routes lost an acknowledged state")
        for l in (lost1 + lost2 + lost3)[:5]:
            log(f"  lost: {l}")
        refused_seen = sum(1 for r in reads + reads2 if r[3][1] in model.refused_versions)
        data_lost = len(lost1) + len(lost2) + len(lost3)
        ok = (not bad and not bad2 and failed == 0 and data_lost == 0 and not model.errors
              and total == present and total2 == present and refused_seen == 0)
        return summary(
            "Admin API write storm + master kill -9",
            f"{a.writers} writers × {a.duration:.0f}s random PUT/PATCH/DELETE, proxy readers, "
            "kill -9 master after, and during, writes",
            len(reads) + len(reads2), failed + len(bad) + len(bad2), data_lost, ok,
            writes=writes + writes2, acknowledged=model.acked, cut_by_master_kill=cut,
            answers_not_matching_model=len(bad) + len(bad2), refused_versions_served=refused_seen,
            in_flight_at_kill=pending, write_errors=len(model.errors))
    finally:
        gw.cleanup()
        u1.close()
        u2.close()


if __name__ == "__main__":
    sys.exit(main())
