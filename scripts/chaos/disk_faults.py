#!/usr/bin/env python3
"""Fault: the object store cannot be written, or is corrupted.

Each unwritable case sends creates, replaces and deletes through the Admin API while the fault
lasts. Every one must be answered 503 `failed to persist the change: …` naming the path, and
afterwards memory (Admin API GET), disk (data/routes/*.json, also after `kill -9` + restart) and
workers (what the proxy serves) must still agree on the state from before the fault:

  * immutable:  `chattr +i data/routes` (objects cannot be written or removed);
  * revision:   `chattr +i data` (the revision file cannot be replaced; the objects could);
  * enotdir:    data/routes replaced by a plain file (works without chattr or root);
  * enospc:     data_dir on a 64 KiB tmpfs filled up (needs mount; skipped otherwise).

Corruption: a truncated data/routes/<id>.json, then a bad data/revision: `wasmgate start` must
refuse with a message naming the file, exit non-zero, and leave the file byte for byte as it was.

usage: scripts/chaos/disk_faults.py [--writes 30]
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gwlib import BIN, Gateway, Upstream, log, summary


def disk_state(gw):
    out = {}
    for f in glob.glob(os.path.join(gw.data_dir, "routes", "*.json")):
        with open(f) as fh:
            v = json.load(fh)["value"]
        out[os.path.basename(f)[:-5]] = v["plugins"]["rewrite"]["conf"]["response_set"]["x-ver"]
    return out


def memory_state(gw):
    st, v = gw.admin("GET", "/apisix/admin/routes")
    return {e["value"]["id"]: e["value"]["plugins"]["rewrite"]["conf"]["response_set"]["x-ver"]
            for e in v["list"]}


def worker_state(gw, ids):
    out = {}
    for rid in ids:
        st, h, _ = gw.url_get(f"/v/{rid}")
        if st == 200:
            out[rid] = h.get("x-ver")
        elif st != 404:
            out[rid] = f"status {st}"
    return out


def body(rid, ver, up):
    return {"uri": f"/v/{rid}", "upstream": {"nodes": {up.addr: 1}},
            "plugins": {"rewrite": {"conf": {"response_set": {"x-ver": ver}}}}}


def run_case(name, gw, up, inject, repair, writes):
    """Returns (sent, unexpected, lost, answered_503, note)."""
    ids = ["a", "b", "c"]
    for rid in ids[:2]:
        st, v = gw.admin("PUT", f"/apisix/admin/routes/{rid}", body(rid, f"{rid}-before", up))
        assert st in (200, 201), v
    gw.admin("DELETE", "/apisix/admin/routes/c")
    gw.wait_propagated()
    want = memory_state(gw)
    assert want == disk_state(gw) == worker_state(gw, ids), name
    inject()
    sent = unexpected = answered = 0
    note = ""
    try:
        for i in range(writes):
            rid = ids[i % 3]
            op = ["PUT", "PUT", "DELETE"][i % 3] if rid != "c" else "PUT"
            if op == "PUT":
                st, v = gw.admin("PUT", f"/apisix/admin/routes/{rid}", body(rid, f"{rid}-{i}", up))
            else:
                st, v = gw.admin("DELETE", f"/apisix/admin/routes/{rid}")
            sent += 1
            msg = v.get("error_msg", "") if isinstance(v, dict) else ""
            if st == 503 and msg.startswith("failed to persist the change: cannot write "):
                answered += 1
                note = note or msg
            else:
                unexpected += 1
                log(f"[{name}] {op} {rid}: {st} {v}")
        time.sleep(0.3)
        mem, wrk = memory_state(gw), worker_state(gw, ids)
    finally:
        repair()
    dsk = disk_state(gw)
    lost = 0
    for label, got in (("memory", mem), ("workers", wrk), ("disk", dsk)):
        if got != want:
            lost += 1
            log(f"[{name}] {label} {got} != before {want}")
    # The state on disk is what a restart serves.
    gw.kill9()
    gw.start()
    if memory_state(gw) != want or worker_state(gw, ids) != want:
        lost += 1
        log(f"[{name}] after restart: {memory_state(gw)} != {want}")
    # Writable again: writes go through.
    st, v = gw.admin("PUT", "/apisix/admin/routes/c", body("c", "c-after", up))
    if st not in (200, 201):
        unexpected += 1
        log(f"[{name}] write after repair: {st} {v}")
    return sent, unexpected, lost, answered, note


def corrupted_store(gw):
    """(unexpected, detail): start must refuse, name the file, keep its bytes."""
    gw.stop()
    problems = []
    for target, content in (("routes/a.json", None), ("revision", b"12x\n")):
        path = os.path.join(gw.data_dir, target)
        with open(path, "rb") as f:
            good = f.read()
        bad = good[: len(good) // 2] if content is None else content
        with open(path, "wb") as f:
            f.write(bad)
        r = subprocess.run([BIN, "start", "--foreground", "-p", gw.prefix],
                           capture_output=True, timeout=30)
        err = r.stderr.decode(errors="replace")
        with open(path, "rb") as f:
            now = f.read()
        if r.returncode == 0 or path not in err or now != bad:
            problems.append(f"{target}: rc {r.returncode}, named {path in err}, "
                            f"kept {now == bad}: {err.strip()[-200:]}")
        else:
            log(f"[corrupt] {target}: refused: {err.strip().splitlines()[-1]}")
        with open(path, "wb") as f:
            f.write(good)
    gw.start()
    return problems


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--writes", type=int, default=30)
    a = ap.parse_args()
    up = Upstream("u")
    results = {}
    have_chattr = shutil.which("chattr") is not None
    gw = Gateway(workers=2)
    try:
        routes = os.path.join(gw.data_dir, "routes")

        def chattr(flag, path):
            subprocess.run(["chattr", flag, path], check=True)

        if have_chattr:
            results["immutable"] = run_case(
                "immutable", gw, up, lambda: chattr("+i", routes),
                lambda: chattr("-i", routes), a.writes)
            results["revision"] = run_case(
                "revision", gw, up, lambda: chattr("+i", gw.data_dir),
                lambda: chattr("-i", gw.data_dir), a.writes)

        def to_file():
            os.rename(routes, routes + ".away")
            open(routes, "w").close()

        def back():
            os.remove(routes)
            os.rename(routes + ".away", routes)

        results["enotdir"] = run_case("enotdir", gw, up, to_file, back, a.writes)
        problems = corrupted_store(gw)
    finally:
        gw.cleanup()
    # ENOSPC: a gateway whose data_dir is a tiny tmpfs.
    mnt = tempfile.mkdtemp(prefix="wasmgate-tmpfs-")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", mnt],
                      stderr=subprocess.DEVNULL).returncode == 0:
        gw = Gateway(workers=2, data_dir=mnt)
        filler = os.path.join(mnt, "filler")
        try:
            def fill():
                fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
                try:
                    while os.write(fd, b"\0" * 512) > 0:
                        pass
                except OSError:
                    pass  # ENOSPC: full
                finally:
                    os.close(fd)

            results["enospc"] = run_case("enospc", gw, up, fill, lambda: os.remove(filler),
                                         a.writes)
        finally:
            gw.cleanup()
            subprocess.run(["umount", mnt])
    else:
        log("mount not permitted: ENOSPC case skipped")
    os.rmdir(mnt)
    up.close()
    sent = sum(r[0] for r in results.values())
    unexpected = sum(r[1] for r in results.values()) + len(problems)
    lost = sum(r[2] for r in results.values())
    for name, r in results.items():
        log(f"{name}: {r[0]} writes, {r[3]} answered 503, {r[1]} unexpected, {r[2]} disagreements"
            f"; e.g. {r[4]!r}")
    for p in problems:
        log(f"corrupted store: {p}")
    ok = unexpected == 0 and lost == 0 and all(r[3] == r[0] for r in results.values())
    return summary(
        "store unwritable / corrupted",
        "chattr +i data/routes, chattr +i data, data/routes→file, full tmpfs; truncated object "
        "and revision files", sent, unexpected, lost, ok, cases=",".join(results),
        answered_503=sum(r[3] for r in results.values()),
        corrupt_start_refused=f"{2 - len(problems)}/2")


if __name__ == "__main__":
    sys.exit(main())
