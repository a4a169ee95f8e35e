"""Specification of the index folder under concurrency (runtime.indexdir's write protocol), with real
processes: one writer at a time, readers that never break, what killed writers leave is removed by
the next one. Every process runs one thread (OMP_NUM_THREADS=1, --threads 1) and is bounded in time."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fixtures import ROOT, tiny_checkpoint, tiny_data, tiny_model_dir  # noqa: F401
from runtime import indexdir
from runtime.index import build, verify
from runtime.search import Index

TIMEOUT = 120  # seconds any one process may take (the 2-core machine, shared)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
CPU = ["--device", "cpu", "--threads", "1"]


def start(*args) -> subprocess.Popen:
    """``python ARGS...`` in the background (one thread): ("-m", module, ...) or ("-c", code, ...)."""
    return subprocess.Popen([sys.executable, *map(os.fspath, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return process.returncode, out, err


def one_error_line(err: str) -> bool:
    lines = [line for line in err.splitlines() if not line.startswith("note: ")]
    return len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err


def ids_of(index_dir) -> list[str]:
    return indexdir.read_ids(os.fspath(index_dir), indexdir.read_manifest(os.fspath(index_dir)))


def no_strays(index_dir) -> bool:
    """Only the lock, the manifest and the files it lists, and no temporary folder beside."""
    m = indexdir.read_manifest(os.fspath(index_dir))
    listed = {f"{p['name']}.{s}" for p in m["parts"] for s in indexdir.part_suffixes(m)}
    beside = [f for f in os.listdir(os.path.dirname(os.path.abspath(index_dir))) if f.endswith(".tmp")]
    return set(os.listdir(index_dir)) == listed | {indexdir.LOCK_FILE, indexdir.MANIFEST_FILE} and not beside


@pytest.fixture(scope="module")
def feats(tiny_data, tmp_path_factory):  # noqa: F811
    """Feature files: base.npy (2 images), a.npy and b.npy (2 each), all different images."""
    folder = tmp_path_factory.mktemp("feats")
    ims = np.load(tiny_data / "test_ims.npy")
    for name, rows in (("base", ims[:2]), ("a", ims[2:4]), ("b", ims[4:6])):
        np.save(folder / f"{name}.npy", rows)
    return folder


# --------------------------------------------------------------------------- one writer at a time
@pytest.mark.parametrize("wait", ["60"])  # --wait 0 (refused or both in): benchmarks/index_faults.py
def test_two_concurrent_appends_keep_every_item_once_or_refuse_the_second(wait, feats, tiny_model_dir,  # noqa: F811
                                                                          tmp_path):
    idx = tmp_path / "idx"
    build(idx, np.load(feats / "base.npy"), tiny_model_dir, device="cpu", threads=1,
          ids=["base.npy:0", "base.npy:1"])
    writers = [start("-m", "runtime.index", feats / f"{x}.npy", "--out", idx, "--append", "--quiet", "--wait", wait, *CPU)
               for x in ("a", "b")]
    results = [finish(w) for w in writers]
    done = [x for x, (code, _, _) in zip("ab", results) if code == 0]
    for code, _, err in results:
        assert code == 0 or (code == 2 and one_error_line(err) and "being written by another process" in err), err
    if wait == "60":
        assert done == ["a", "b"]
    want = ["base.npy:0", "base.npy:1"] + [f"{x}.npy:{i}" for x in "ab" for i in range(2)]
    got = ids_of(idx)
    assert sorted(got) == sorted(i for i in want if i.split(".")[0] in ["base"] + done)  # each once
    assert verify(idx) and no_strays(idx)


def test_two_new_builds_into_one_new_folder(feats, tiny_model_dir, tmp_path):  # noqa: F811
    idx = tmp_path / "new"
    writers = [start("-m", "runtime.index", feats / f"{x}.npy", "--model", tiny_model_dir, "--out", idx, "--quiet",
                     "--wait", "60", *CPU) for x in ("a", "b")]
    results = [finish(w) for w in writers]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    code, _, err = next(r for r in results if r[0] == 2)
    assert one_error_line(err) and "already exists" in err and "--overwrite" in err  # waited, then refused
    assert len(ids_of(idx)) == 2 and verify(idx) and no_strays(idx)


# --------------------------------------------------------------------------- readers that survive writers
READER = """
import contextlib, io, json, os, sys
from runtime.search import main
queries, index, started, stop = sys.argv[1:5]
open(started, "w").close()
for _ in range(1000):  # searches until the writer is done
    if os.path.exists(stop):
        break
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([index, queries, "--json", "--quiet", "--top-k", "2", "--shortlist", "6", "--device", "cpu",
                     "--threads", "1"])
    matches = [[m["id"] for m in json.loads(line)["matches"]] for line in out.getvalue().splitlines()]
    print(json.dumps({"code": code, "err": err.getvalue(), "matches": matches}), flush=True)
"""

WRITER = """
import sys
from runtime.index import main
import os, time
feats, index, rounds, started, stop = sys.argv[1:3], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6]
while not os.path.exists(started):  # the reader is searching
    time.sleep(0.01)
try:
    for r in range(rounds):
        assert main([feats[r % 2], "--out", index, "--overwrite", "--quiet", "--wait", "60", "--device", "cpu",
                     "--threads", "1"]) == 0
finally:
    open(stop, "w").close()
"""


def search_ids(index_dir, queries) -> list[list[str]]:
    index = Index(index_dir, device="cpu", threads=1)
    rows, _ = index.search(queries, top_k=2, shortlist=6)
    return [[index.ids[r] for r in row] for row in rows]


def test_cli_searches_during_rebuilds_finish_on_the_old_or_the_new_index(feats, tiny_model_dir, tiny_data,  # noqa: F811
                                                                         tmp_path):
    queries = tiny_data / "test_caps.txt"
    captions = queries.read_text().splitlines()
    idx, expected = tmp_path / "idx", []
    for x in ("a", "b"):
        build(idx, np.load(feats / f"{x}.npy"), tiny_model_dir, device="cpu", threads=1, overwrite=True,
              ids=[f"{x}.npy:{i}" for i in range(2)])
        expected.append(search_ids(idx, captions))
    started, stop = tmp_path / "started", tmp_path / "stop"
    writer = start("-c", WRITER, feats / "a.npy", feats / "b.npy", idx, "6", started, stop)
    reader = start("-c", READER, queries, idx, started, stop)
    code, out, err = finish(reader)
    assert finish(writer)[0] == 0 and code == 0, err
    assert len(out.splitlines()) >= 1  # searches started while the 6 rebuilds ran
    for line in out.splitlines():
        result = json.loads(line)
        assert result["code"] == 0 and result["matches"] in expected, result


def test_a_long_lived_index_answers_from_its_snapshot_through_rebuilds_and_appends(feats, tiny_model_dir,  # noqa: F811
                                                                                    tiny_data, tmp_path):
    captions = (tiny_data / "test_caps.txt").read_text().splitlines()
    idx = tmp_path / "idx"
    build(idx, np.load(feats / "base.npy"), tiny_model_dir, device="cpu", threads=1, ids=["base0", "base1"])
    index = Index(idx, device="cpu", threads=1)
    before = index.search(captions, top_k=2, shortlist=2)
    script = ("import sys; from runtime.index import main; f, idx = sys.argv[1:3]\n"
              "for args in ([f + 'a.npy', '--overwrite'], [f + 'b.npy', '--append'], [f + 'base.npy', '--overwrite'], "
              "[f + 'a.npy', '--append']):\n"
              "    assert main([args[0], '--out', idx, args[1], '--quiet', '--device', 'cpu', '--threads', '1']) == 0")
    assert finish(start("-c", script, f"{feats}/", idx))[0] == 0
    after = index.search(captions, top_k=2, shortlist=2)  # every part it opened was deleted meanwhile
    assert (after[0] == before[0]).all() and (after[1] == before[1]).all() and index.ids == ["base0", "base1"]
    assert index.reload() and index.ids == ["base.npy:0", "base.npy:1", "a.npy:0", "a.npy:1"]
    fresh = Index(idx, device="cpu", threads=1).search(captions, top_k=3, shortlist=4)
    mine = index.search(captions, top_k=3, shortlist=4)
    assert (mine[0] == fresh[0]).all() and np.abs(mine[1] - fresh[1]).max() == 0


# --------------------------------------------------------------------------- killed writers
def test_a_killed_append_leaves_the_index_intact_and_the_next_writer_removes_its_files(feats, tiny_model_dir,  # noqa: F811
                                                                                      tmp_path):
    idx, big = tmp_path / "idx", tmp_path / "big.npy"
    base = np.load(feats / "base.npy")
    build(idx, base, tiny_model_dir, device="cpu", threads=1, ids=["base0", "base1"])
    np.save(big, np.random.default_rng(0).normal(0, 1, (20000,) + base.shape[1:]).astype(np.float32))
    writer = start("-m", "runtime.index", big, "--out", idx, "--append", "--quiet", *CPU)
    deadline = time.monotonic() + TIMEOUT
    while not any(f.endswith(".embs.npy") and f.split(".")[0] not in json.dumps(indexdir.read_manifest(str(idx)))
                  for f in os.listdir(idx)):
        assert writer.poll() is None and time.monotonic() < deadline, "the append ended before it was killed"
        time.sleep(0.01)
    writer.send_signal(signal.SIGKILL)
    writer.communicate(timeout=TIMEOUT)
    assert not no_strays(idx)  # its part files are there, listed nowhere
    assert ids_of(idx) == ["base0", "base1"] and verify(idx)  # the index as it was
    code, _, err = finish(start("-m", "runtime.index", feats / "a.npy", "--out", idx, "--append", "--quiet", *CPU))
    assert code == 0, err
    assert ids_of(idx) == ["base0", "base1", "a.npy:0", "a.npy:1"] and no_strays(idx)
