"""The index folder under faults, concurrency and hostile input (runtime.indexdir's write protocol),
with real processes on a tiny random model: what each case gives, and that nothing is left behind.

    python benchmarks/index_faults.py [--trials 50] [--waiting-trials 10] [--rebuilds 10] [--appends 10]
                                      [--hash-items 100000] [--hash-d 64] [--json OUT.json]

1. ``--trials`` times two ``runtime.index --append`` started together on one index (the default
   --wait 0), then ``--waiting-trials`` times with --wait 60: after each, every item of both is in
   the index exactly once, or the second was refused in one line and the index is the first's;
   ``--verify`` passes and the folder holds only the lock, the manifest and the files it lists.
2. A long-lived ``runtime.Index`` through ``--rebuilds`` rebuilds (--overwrite) and ``--appends``
   appends by other processes, alternating: after each it still answers exactly as before (its
   snapshot), and after ``reload()`` exactly as a fresh Index.
3. CLI searches (one process searching in a loop) during ``--search-rebuilds`` rebuilds: every search exits 0 and
   finds the old or the new index's answer.
4. One case per group of faults (two new builds into one folder, a killed build, a killed append,
   leftovers of killed writers, tampered parts, FIFOs, /dev/zero, bad .npy headers, NaN, a full
   disk): the command's exit status and its line, and the files left behind.
5. What checking the SHA-256 costs: a ``--hash-items`` x 36 regions x ``--hash-d`` float32 part,
   opened the first time in a process with every file hashed (as --verify) and again (cached),
   against opening unchecked; and as a search process does it (lazily): at open, then the first
   search's checks (global.npy whole, the embs.npy blocks of a 100-item shortlist).

Every process runs one thread (OMP_NUM_THREADS=1, --threads 1). Prints a summary; --json writes
every case's record.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from runtime import indexdir  # noqa: E402
from runtime.cli import ArgumentParser  # noqa: E402  (a bad flag or an existing --json: one error line, exit 2)
from runtime.index import build, verify  # noqa: E402
from runtime.search import Index  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
CPU = ["--device", "cpu", "--threads", "1"]
TIMEOUT = 300


def run(*args, wait: bool = True):
    """``python ARGS`` (one thread): the Popen, or with ``wait`` (exit status, stdout, stderr)."""
    p = subprocess.Popen([sys.executable, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV, cwd=ROOT)
    if not wait:
        return p
    out, err = p.communicate(timeout=TIMEOUT)
    return p.returncode, out, err


def finish(p):
    out, err = p.communicate(timeout=TIMEOUT)
    return p.returncode, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if not line.startswith("note: ")]


def one_line(err: str) -> bool:
    lines = error_lines(err)
    return len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err


def left_behind(index_dir: str) -> list[str]:
    """Files in INDEX_DIR the manifest does not list (besides the lock), and temporaries beside it."""
    parent = os.path.dirname(os.path.abspath(index_dir))
    beside = [f for f in os.listdir(parent) if f.endswith(".tmp")]
    if not os.path.isdir(index_dir):
        return beside
    try:
        m = indexdir.read_manifest(index_dir)
        listed = {f"{p['name']}.{s}" for p in m["parts"] for s in indexdir.part_suffixes(m)}
        listed |= {m["faiss"]["file"]} if m.get("faiss") else set()
    except indexdir.IndexDirError:
        listed = set()
    return sorted(set(os.listdir(index_dir)) - listed - {indexdir.LOCK_FILE, indexdir.MANIFEST_FILE}) + beside


def ids_of(index_dir: str) -> list[str]:
    return indexdir.read_ids(index_dir, indexdir.read_manifest(index_dir))


# --------------------------------------------------------------------------- the tiny model
def tiny_model_dir(work: str) -> tuple[str, str]:
    """(model dir, data dir): the tests' tiny synthetic data and random tiny model, exported."""
    from export.__main__ import main as export_main
    from fixtures import tiny_model
    from imram_min.engineering.checkpoint import save_checkpoint
    from imram_min.data import load_vocab
    from imram_min.data.synthetic import make_synthetic
    data = os.path.join(work, "data")
    make_synthetic(data, seed=3, n_train=12, n_dev=2, n_test=6, img_dim=24)
    vocab = load_vocab(data)
    ckpt = os.path.join(work, "best.pt")
    save_checkpoint(ckpt, tiny_model(seed=1, vocab_size=len(vocab)), vocab, meta={"note": "random tiny model"})
    model = os.path.join(work, "model")
    with contextlib.redirect_stdout(io.StringIO()):
        assert export_main([ckpt, "--out", model, "--no-verify"]) == 0
    return model, data


# --------------------------------------------------------------------------- 1. concurrent appends
def concurrent_appends(work: str, model: str, feats: dict, trials: int, wait: str) -> dict:
    base = os.path.join(work, "base_index")
    if not os.path.exists(base):
        build(base, np.load(feats["base"]), model, device="cpu", threads=1, ids=["base.npy:0", "base.npy:1"])
    outcomes, failures = {"both": 0, "second refused": 0}, []
    for t in range(trials):
        idx = os.path.join(work, f"append_trial_{wait}_{t}")
        shutil.copytree(base, idx)
        writers = [run("-m", "runtime.index", feats[x], "--out", idx, "--append", "--quiet", "--wait", wait, *CPU,
                       wait=False) for x in ("a", "b")]
        results = [finish(w) for w in writers]
        done = [x for x, r in zip("ab", results) if r[0] == 0]
        refused = [r for r in results if r[0] != 0]
        want = sorted(["base.npy:0", "base.npy:1"] + [f"{x}.npy:{i}" for x in done for i in range(len(feats[x + "_ids"]))])
        ok = sorted(ids_of(idx)) == want and all(r[0] == 2 and one_line(r[2]) and "being written" in r[2]
                                                 for r in refused) and bool(verify(idx)) and not left_behind(idx)
        if not ok or len(done) == 0:
            failures.append({"trial": t, "results": results, "ids": ids_of(idx), "left": left_behind(idx)})
        outcomes["both" if len(done) == 2 else "second refused"] += 1
        if refused and "line" not in outcomes:
            outcomes["line"] = error_lines(refused[0][2])[0]
        shutil.rmtree(idx)
    return {"trials": trials, "wait": wait, **outcomes, "failures": failures}


# --------------------------------------------------------------------------- 2. a long-lived Index
def long_lived(work: str, model: str, feats: dict, captions: list[str], rebuilds: int, appends: int) -> dict:
    idx = os.path.join(work, "long_lived")
    build(idx, np.load(feats["base"]), model, device="cpu", threads=1, ids=["base.npy:0", "base.npy:1"])
    index = Index(idx, device="cpu", threads=1)
    steps, right_before, right_after = [], 0, 0
    order = ["rebuild", "append"] * max(rebuilds, appends)
    done = {"rebuild": 0, "append": 0}
    for step in order:
        if done[step] >= (rebuilds if step == "rebuild" else appends):
            continue
        done[step] += 1
        snapshot = index.search(captions, top_k=2, shortlist=4)
        if step == "rebuild":
            x = "a" if done[step] % 2 else "b"
            code, _, err = run("-m", "runtime.index", feats[x], "--out", idx, "--overwrite", "--quiet", *CPU)
        else:
            extra = os.path.join(work, f"extra{done[step]}.npy")
            np.save(extra, np.load(feats["a"])[:1])
            code, _, err = run("-m", "runtime.index", extra, "--out", idx, "--append", "--quiet", *CPU)
        assert code == 0, err
        still = index.search(captions, top_k=2, shortlist=4)
        right_before += bool((still[0] == snapshot[0]).all() and (still[1] == snapshot[1]).all())
        index.reload()
        fresh = Index(idx, device="cpu", threads=1)
        mine, theirs = index.search(captions, top_k=2, shortlist=4), fresh.search(captions, top_k=2, shortlist=4)
        right_after += bool((mine[0] == theirs[0]).all() and (mine[1] == theirs[1]).all() and index.ids == fresh.ids)
        steps.append(step)
    return {"rebuilds": done["rebuild"], "appends": done["append"], "same as its snapshot before reload": right_before,
            "same as a fresh Index after reload": right_after, "steps": len(steps), "left": left_behind(idx)}


# --------------------------------------------------------------------------- 3. CLI searches during rebuilds
READER = """
import contextlib, io, json, os, sys
from runtime.search import main
queries, index, started, stop = sys.argv[1:5]
open(started, "w").close()
while not os.path.exists(stop):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([index, queries, "--json", "--quiet", "--top-k", "2", "--shortlist", "6", "--device", "cpu",
                     "--threads", "1"])
    matches = [[m["id"] for m in json.loads(line)["matches"]] for line in out.getvalue().splitlines()]
    print(json.dumps({"code": code, "err": err.getvalue()[-300:], "matches": matches}), flush=True)
"""
WRITER = """
import os, sys, time
from runtime.index import main
feats, index, rounds, started, stop = sys.argv[1:3], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6]
while not os.path.exists(started):
    time.sleep(0.01)
try:
    for r in range(rounds):
        assert main([feats[r % 2], "--out", index, "--overwrite", "--quiet", "--device", "cpu", "--threads", "1"]) == 0
finally:
    open(stop, "w").close()
"""


def searches_during_rebuilds(work: str, model: str, feats: dict, queries: str, rounds: int = 8) -> dict:
    idx, expected = os.path.join(work, "searched"), []
    captions = open(queries).read().splitlines()
    for x in ("a", "b"):
        build(idx, np.load(feats[x]), model, device="cpu", threads=1, overwrite=True, ids=feats[x + "_ids"])
        index = Index(idx, device="cpu", threads=1)
        rows, _ = index.search(captions, top_k=2, shortlist=6)
        expected.append([[index.ids[r] for r in row] for row in rows])
    started, stop = os.path.join(work, "started"), os.path.join(work, "stop")
    writer = run("-c", WRITER, feats["a"], feats["b"], idx, rounds, started, stop, wait=False)
    reader = run("-c", READER, queries, idx, started, stop, wait=False)
    code, out, err = finish(reader)
    wcode, _, werr = finish(writer)
    results = [json.loads(line) for line in out.splitlines()]
    return {"rebuilds": rounds, "writer exit": wcode, "searches": len(results),
            "failed": sum(r["code"] != 0 for r in results),
            "answer not the old or the new index's": sum(r["matches"] not in expected for r in results),
            "reader exit": code, "errors": sorted({r["err"] for r in results if r["code"]})[:3], "left": left_behind(idx)}


# --------------------------------------------------------------------------- 4. one case per group
def cases(work: str, model: str, feats: dict, queries: str) -> list[dict]:
    out = []

    def record(group: int, case: str, result, index_dir: str | None = None, **more):
        code, _, err = result
        entry = {"group": group, "case": case, "exit": code, "line": error_lines(err)[0] if error_lines(err) else "",
                 "one line": code == 0 or one_line(err), **more}
        if index_dir is not None:
            entry["left behind"] = left_behind(index_dir)
        out.append(entry)
        print(f"  [{group}] {case}: exit {code}; {entry['line'] or 'ok'}"
              + (f"; left behind: {entry['left behind']}" if entry.get("left behind") else ""), flush=True)

    def fresh(name: str) -> str:
        folder = os.path.join(work, "cases", name)
        os.makedirs(folder)
        idx = os.path.join(folder, "idx")
        build(idx, np.load(feats["a"])[:2], model, device="cpu", threads=1, ids=["a0", "a1"])
        build(idx, np.load(feats["b"])[:2], append=True, device="cpu", threads=1, ids=["b0", "b1"])
        return idx

    def search(idx: str):
        t0 = time.perf_counter()
        result = run("-m", "runtime.search", idx, queries, "--quiet", *CPU)
        return result, round(time.perf_counter() - t0, 2)

    def part(idx: str, k: int, suffix: str) -> str:
        return os.path.join(idx, f"{indexdir.read_manifest(idx)['parts'][k]['name']}.{suffix}")

    # group 1: writers
    folder = os.path.join(work, "cases", "two_new_builds")
    os.makedirs(folder)
    idx = os.path.join(folder, "new")
    ws = [run("-m", "runtime.index", feats[x], "--model", model, "--out", idx, "--quiet", "--wait", "60", *CPU,
              wait=False) for x in ("a", "b")]
    results = [finish(w) for w in ws]
    record(1, "two new builds into one new folder (--wait 60): the first", results[0], idx)
    record(1, "two new builds into one new folder (--wait 60): the second", results[1], idx)
    idx = fresh("leftovers")
    for name in (".manifest.json.k1l2e3d4.tmp", "part-0123456789ab.embs.npy", "part-0123456789ab.ids.txt"):
        with open(os.path.join(idx, name), "wb") as f:
            f.write(b"x" * 1000)
    os.makedirs(os.path.join(os.path.dirname(idx), ".idx.a1b2c3d4.tmp"))
    before = left_behind(idx)
    record(1, f"an --append after killed writers left {before}",
           run("-m", "runtime.index", feats["base"], "--out", idx, "--append", "--quiet", *CPU), idx)

    # group 3: tampered parts
    idx = fresh("listed_twice")
    m = indexdir.read_manifest(idx)
    m["parts"].append(m["parts"][0])
    m["n_items"] += m["parts"][0]["n_items"]
    with open(os.path.join(idx, "manifest.json"), "w") as f:
        json.dump(m, f)
    record(3, "a part listed twice in the manifest", search(idx)[0])
    idx = fresh("swapped")
    a, b = part(idx, 0, "embs.npy"), part(idx, 1, "embs.npy")
    os.rename(a, a + ".x")
    os.rename(b, a)
    os.rename(a + ".x", b)
    record(3, "embs.npy swapped between two parts", search(idx)[0])
    record(3, "the same: runtime.index --verify", run("-m", "runtime.index", "--verify", idx))
    idx = fresh("symlink")
    outside = os.path.join(work, "cases", "outside.npy")
    shutil.copy(part(idx, 0, "embs.npy"), outside)
    os.remove(part(idx, 0, "embs.npy"))
    os.symlink(outside, part(idx, 0, "embs.npy"))
    record(3, "embs.npy a symlink to a same-shape file outside", search(idx)[0])

    # group 4: hangs and unbounded memory
    for name, target in (("manifest.json", None), ("ids.txt", "ids.txt"), ("embs.npy", "embs.npy")):
        idx = fresh(f"fifo_{name}")
        path = os.path.join(idx, name) if target is None else part(idx, 0, target)
        os.remove(path)
        os.mkfifo(path)
        result, seconds = search(idx)
        record(4, f"a FIFO in place of {name}", result, seconds=seconds)
    for name in ("manifest.json", "ids.txt"):
        idx = fresh(f"zero_{name}")
        path = os.path.join(idx, name) if name == "manifest.json" else part(idx, 0, name)
        os.remove(path)
        os.symlink("/dev/zero", path)
        result, seconds = search(idx)
        record(4, f"{name} pointing at /dev/zero", result, seconds=seconds)

    # group 5: disk leaks
    for what in ("new build", "append"):
        folder = os.path.join(work, "cases", f"killed_{what.replace(' ', '_')}")
        os.makedirs(folder)
        idx, big = os.path.join(folder, "idx"), os.path.join(folder, "big.npy")
        np.save(big, np.random.default_rng(0).normal(0, 1, (20000,) + np.load(feats["a"]).shape[1:]).astype(np.float32))
        if what == "append":
            build(idx, np.load(feats["a"])[:2], model, device="cpu", threads=1, ids=["a0", "a1"])
        args = ["--append"] if what == "append" else ["--model", model]
        p = run("-m", "runtime.index", big, "--out", idx, "--quiet", *args, *CPU, wait=False)
        deadline = time.monotonic() + TIMEOUT
        while not (os.path.isdir(idx) and any(f.endswith(".embs.npy") and f.split(".")[0] not in
                                              json.dumps(_manifest_or_none(idx)) for f in os.listdir(idx))):
            if p.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        time.sleep(0.2)
        p.send_signal(signal.SIGKILL)
        p.communicate()
        size = sum(os.path.getsize(os.path.join(idx, f)) for f in os.listdir(idx)) if os.path.isdir(idx) else 0
        left = left_behind(idx)
        intact = what == "new build" or ids_of(idx) == ["a0", "a1"]
        args = ["--append"] if what == "append" else ["--model", model]
        record(5, f"kill -9 of a {what} (left {len(left)} files, {size / 1e6:.1f} MB, the index "
                  f"{'intact' if intact else 'BROKEN'}), then the next writer",
               run("-m", "runtime.index", feats["b"], "--out", idx, "--quiet", *args, *CPU), idx)
    idx = fresh("full_disk")
    code = ("import errno, sys\nfrom runtime import indexdir\nfrom runtime.index import main\n"
            "class Full:\n"
            "    def __init__(self, f): self.f, self.n = f, 0\n"
            "    def write(self, data):\n"
            "        self.n += 1\n"
            "        if self.n > 1: raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "        return self.f.write(data)\n"
            "    def close(self): self.f.close(); raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "real = indexdir._HashedFile.__init__\n"
            "def init(self, path, *args):\n"
            "    real(self, path, *args)\n"
            "    if path.endswith('global.npy'): self.file = Full(self.file)\n"
            "indexdir._HashedFile.__init__ = init\n"
            "sys.exit(main(sys.argv[1:]))\n")
    record(5, "an --append that fills the disk (simulated: writes and close raise ENOSPC)",
           run("-c", code, feats["base"], "--out", idx, "--append", "--quiet", *CPU), idx)

    # group 7: messages
    idx = fresh("not_npy")
    path = part(idx, 0, "global.npy")
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(b"x" * size)
    record(7, "global.npy that is not a .npy file", search(idx)[0])
    idx = fresh("huge_header")
    path = part(idx, 0, "global.npy")
    data = open(path, "rb").read()
    end = data.index(b"\n") + 1
    header = data[:end].decode("latin1").replace("(2,", "(100000000000,", 1).replace(" " * 11 + "\n", "\n", 1)
    with open(path, "wb") as f:
        f.write(header.encode("latin1") + data[end:])
    _rehash(idx, 0, "global.npy")
    record(7, "a .npy header claiming 10^11 rows (manifest re-hashed to match)", search(idx)[0])
    idx = fresh("nan")
    path = part(idx, 0, "global.npy")
    data = bytearray(open(path, "rb").read())
    data[-4:] = np.float32(np.nan).tobytes()
    with open(path, "wb") as f:
        f.write(bytes(data))
    _rehash(idx, 0, "global.npy")
    record(7, "NaN in global.npy (manifest re-hashed to match)", search(idx)[0])
    return out


def _manifest_or_none(idx: str):
    try:
        return indexdir.read_manifest(idx)
    except indexdir.IndexDirError:
        return None


def _rehash(idx: str, k: int, suffix: str) -> None:
    path = os.path.join(idx, indexdir.MANIFEST_FILE)
    m = json.load(open(path))
    m["parts"][k]["files"][suffix] = indexdir.hash_file(os.path.join(idx, f"{m['parts'][k]['name']}.{suffix}"))
    with open(path, "w") as f:
        json.dump(m, f)


# --------------------------------------------------------------------------- 5. hashing cost
HASH_PROBE = """
import json, sys, time
import numpy as np
from runtime import indexdir
idx, lazy = sys.argv[1], sys.argv[2] == "lazy"
m = indexdir.read_manifest(idx)
p, d = m["parts"][0], m["model"]["embed_size"]
out = {}
if lazy:  # as a search process: open, then check what a first search reads (global whole, 100 items' blocks)
    t0 = time.perf_counter()
    part = indexdir.open_part(idx, p, d, "float32", None, 0, lazy=True)
    out["open (offsets, ids hashed)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    part.check("global.npy")
    rows = np.sort(np.random.default_rng(0).choice(p["n_items"], 100, replace=False))
    part.check_rows("embs.npy", part["offsets"][rows], np.diff(part["offsets"])[rows])
    out["first search's checks (global.npy whole, embs.npy blocks of 100 items)"] = time.perf_counter() - t0
else:
    for what, verify in (("unchecked (cold)", False), ("first open, every file hashed", True),
                         ("second open (cached)", True), ("unchecked", False)):
        t0 = time.perf_counter()
        indexdir.open_part(idx, p, d, "float32", None, 0, verify=verify).close()
        out[what] = time.perf_counter() - t0
print(json.dumps(out))
"""


def hash_cost(work: str, n: int, d: int, n_region: int = 36) -> dict:
    idx = os.path.join(work, "hash_index")
    os.makedirs(idx)
    writer, rng = indexdir.PartWriter(idx, n, n * n_region, d, "float32", d), np.random.default_rng(0)
    block = rng.normal(0, 1, (1000 * n_region, d)).astype(np.float32)
    g = rng.normal(0, 1, (1000, d)).astype(np.float32)
    t0 = time.perf_counter()
    for i in range(0, n, 1000):
        k = min(1000, n - i)
        writer.add(block[:k * n_region], np.full(k, n_region), g[:k], [f"item {i + j}" for j in range(k)])
    entry = writer.close()
    write_s = time.perf_counter() - t0
    manifest = {"format": indexdir.FORMAT, "format_version": indexdir.FORMAT_VERSION, "kind": "images",
                "dtype": "float32", "n_region": n_region, "projection_size": 0,
                "model": {"dir": ".", "manifest_sha256": "0" * 64, "embed_size": d}, "parts": [entry], "n_items": n}
    indexdir.commit(idx, manifest)
    size = sum(f["size"] for f in entry["files"].values())
    times = {}
    for how in ("eager", "lazy"):
        code, out, err = run("-c", HASH_PROBE, idx, how)
        assert code == 0, err
        times.update(json.loads(out))
    shutil.rmtree(idx)
    return {"items": n, "d": d, "regions": n_region, "bytes": size, "write_s (hashing as it writes)": round(write_s, 2),
            **{k: round(v, 3) for k, v in times.items()},
            "hash MB/s": round(size / 1e6 / max(1e-9, times["first open, every file hashed"] - times["unchecked"]), 1)}


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--waiting-trials", type=int, default=10)
    p.add_argument("--rebuilds", type=int, default=10)
    p.add_argument("--appends", type=int, default=10)
    p.add_argument("--search-rebuilds", type=int, default=30, help="rebuilds while a process searches (3.)")
    p.add_argument("--hash-items", type=int, default=100000)
    p.add_argument("--hash-d", type=int, default=64)
    p.add_argument("--json", metavar="OUT.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file (else refused)")
    p.add_argument("--work", metavar="DIR", help="working folder (default: a temporary one, removed)")
    p.add_argument("--hash-only", action="store_true", help="only 5. (the SHA-256 check's cost)")
    args = p.parse_args(argv)
    p.check_output_file(args.json, "--json", args.overwrite)
    work = args.work or tempfile.mkdtemp(prefix="index_faults_")
    report = {}
    try:
        t0 = time.perf_counter()
        if args.hash_only:
            report["hash cost"] = r = hash_cost(work, args.hash_items, args.hash_d)
            print(f"5. SHA-256 check of a {args.hash_items} x 36 x {args.hash_d} float32 part\n   {r}", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(report, f, indent=1)
            return 0
        model, data = tiny_model_dir(work)
        ims = np.load(os.path.join(data, "test_ims.npy"))
        feats = {}
        for name, rows in (("base", ims[:2]), ("a", np.concatenate([ims[2:4]] * 100)), ("b", np.concatenate([ims[4:6]] * 100))):
            feats[name] = os.path.join(work, f"{name}.npy")
            np.save(feats[name], rows)
            feats[name + "_ids"] = [f"{name}.npy:{i}" for i in range(len(rows))]
        queries = os.path.join(data, "test_caps.txt")
        captions = open(queries).read().splitlines()
        print(f"1. two concurrent --append, {args.trials} trials (--wait 0) + {args.waiting_trials} (--wait 60)", flush=True)
        report["concurrent appends"] = [concurrent_appends(work, model, feats, args.trials, "0"),
                                        concurrent_appends(work, model, feats, args.waiting_trials, "60")]
        for r in report["concurrent appends"]:
            print(f"   --wait {r['wait']}: {r['trials']} trials: both appended {r['both']}, second refused in one line "
                  f"{r['second refused']}, failures {len(r['failures'])}" + (f"; the line: {r['line']}" if "line" in r else ""),
                  flush=True)
        print(f"2. a long-lived Index through {args.rebuilds} rebuilds and {args.appends} appends", flush=True)
        report["long-lived Index"] = r = long_lived(work, model, feats, captions, args.rebuilds, args.appends)
        print(f"   {r}", flush=True)
        print("3. CLI searches during rebuilds", flush=True)
        report["searches during rebuilds"] = r = searches_during_rebuilds(work, model, feats, queries,
                                                                          args.search_rebuilds)
        print(f"   {r}", flush=True)
        print("4. one case per group", flush=True)
        report["cases"] = cases(work, model, feats, queries)
        if args.hash_items:
            print(f"5. SHA-256 check of a {args.hash_items} x 36 x {args.hash_d} float32 part", flush=True)
            report["hash cost"] = r = hash_cost(work, args.hash_items, args.hash_d)
            print(f"   {r}", flush=True)
        report["wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"done in {report['wall_s']} s", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
