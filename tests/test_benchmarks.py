"""Smoke tests of the benchmark scripts at tiny sizes: they run, and every scorer is exact.

No timing is asserted (the scripts measure speed themselves, on a quiet machine). The two scripts
run side by side, each in its own process (they set torch's thread count).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_MODEL = ["--embed-size", "16", "--img-dim", "24", "--word-dim", "12", "--vocab-size", "40", "--threads", "1"]
CPU_SCORERS = ("loop", "plain", "fast", "onnx-cpu")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{script: (exit status, output, JSON report)} of score.py in 2 rounds and train_step.py, at tiny sizes,
    each replacing an old --json file (--overwrite)."""
    tmp = tmp_path_factory.mktemp("bench")
    args = {"score.py": ["--size", "small", "--n-img", "3", "--n-cap", "4", "--scorers", ",".join(CPU_SCORERS),
                         "--rounds", "2"],
            "train_step.py": ["--device", "cpu", "--batch-size", "4", "--iters", "1",
                              "--scorers", "original,fast,fast-nockpt,fast-bf16,ddp-2"]}
    for script in args:
        (tmp / f"{script}.json").write_text("old")
    procs = {script: subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / script), *extra, *TINY_MODEL,
                                       "--json", str(tmp / f"{script}.json"), "--overwrite"], cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for script, extra in args.items()}
    out = {script: p.communicate(timeout=600)[0] for script, p in procs.items()}
    return {script: (procs[script].returncode, out[script], json.loads((tmp / f"{script}.json").read_text()))
            for script in procs}


def test_score_runs_every_cpu_scorer_in_every_round_and_each_matches_the_loop(runs):
    status, output, report = runs["score.py"]
    assert status == 0 and report["verdict"] == "PASS", output
    scorers = report["sizes"]["small"]["scorers"]
    assert list(scorers) == list(CPU_SCORERS)
    assert scorers["loop"]["check"] == "ref"
    for name in CPU_SCORERS[1:]:
        assert scorers[name]["check"] == "PASS" and scorers[name]["max_abs_diff"] <= 1e-5, output
    for res in scorers.values():
        assert res["pairs"] == 12 and len(res["times"]) == 2 and len(res["x_loop_rounds"]) == 2
        assert res["pairs_per_s"] == max(res["round_pps"]) and res["x_loop"] > 0


def test_score_prints_ratios_to_the_loop_of_each_round(runs):
    _status, output, _report = runs["score.py"]
    assert "x loop within each round: loop 1.00, 1.00; plain " in output
    assert "ideal speed-up original / fast" in output and "plain / fast" in output


def test_train_step_gradients_of_the_fast_forms_match_the_original(runs):
    status, output, report = runs["train_step.py"]
    assert status == 0, output
    results = report["scorers"]
    assert list(results) == ["original", "fast", "fast-nockpt", "fast-bf16", "ddp-2"]
    assert results["fast-bf16"]["grad_check"] in ("PASS", "bf16")  # reported, not required
    for name in ("fast", "fast-nockpt", "ddp-2"):  # ddp-2: 2 processes, the global batch's gradients
        assert results[name]["grad_check"] == "PASS", output
        assert results[name]["grad_max_abs_diff"] <= 1e-4 * results[name]["grad_max_abs"]
    assert all(r["status"] == "ok" and r["samples_per_s"] > 0 for r in results.values())


def test_search_benchmark_runs_end_to_end_at_a_tiny_size(tmp_path):
    """benchmarks/search.py: build, grow, timed queries, the paired baseline and the exhaustive slice,
    for a float32 index and a float16 one with stored projections; every row reported, torch never
    loaded by the query processes. No timing asserted."""
    captions = tmp_path / "captions.txt"  # words of the synthetic vocabulary and of the made-up one
    captions.write_text("a red dog w1 w2\na blue ball w3\na green cup w4 w5 w6\n")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "search.py"), "--configs",
                          "default,default+proj:float16", "--sizes", "150", "--queries", "2", "--build", "60",
                          "--slice", "40", "--threads", "1", "--captions", str(captions), "--work", str(tmp_path),
                          "--json", str(tmp_path / "search.json")], cwd=ROOT, text=True, capture_output=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = json.loads((tmp_path / "search.json").read_text())
    assert [(r["config"], r["images"], r["dtype"], r["projections_stored"]) for r in rows] == \
        [("default", 150, "float32", False), ("default+proj:float16", 150, "float16", True)]
    for r in rows:
        assert not r["torch_loaded"] and r["size_mb"] > 0 and r["peak_rss_mb"] > 0
        assert 0 < r["p50_ms"] <= r["p95_ms"] and r["exhaustive_ms"] > 0
        assert all(r["paired_p50_ms"][k] > 0 for k in ("onnxruntime", "numpy"))
        assert (r["steps_ms"]["projections"] is None) == r["projections_stored"]
    assert "| default+proj:float16 d = 64 float16" in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.txt", "search.json"]  # its scratch removed


@pytest.mark.parametrize("nudge", [False, True])
def test_process_parity_compares_two_runs_of_the_same_flags(tmp_path, nudge):
    """benchmarks/process_parity.py on tiny data, one epoch: 1 vs 2 processes, or (--nudge) 1 process vs
    itself with one weight 1 ulp up, which must end with different weights: the nudge is made."""
    from test_train import TINY, make_data
    data = make_data(tmp_path / "data")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "process_parity.py"), "--data", data, "--epochs", "1",
                          "--json", str(tmp_path / "parity.json"), *(["--nudge"] if nudge else []), *TINY],
                         cwd=ROOT, text=True, capture_output=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["processes"] == ("1+ulp" if nudge else 2)
    assert [len(log) for log in report["logs"].values()] == [1, 1]
    assert 0 <= report["rsum_gap"] <= 600 and report["weights_max_abs"] > 0
    if nudge:
        assert report["weights_max_abs_diff"] > 0
    assert "final dev rsum gap" in out.stdout


def test_first_stage_benchmark_sweeps_faiss_up_to_the_exact_top_n(tmp_path):
    """benchmarks/first_stage.py at a tiny size: an IVF index probing more lists returns a superset, so its
    recall of the exact top-N never falls, and the sweep ends at recall >= 0.99."""
    pytest.importorskip("faiss")
    (tmp_path / "first_stage.json").write_text("old")  # replaced: --overwrite
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "first_stage.py"), "--dims", "16", "--sizes", "3000",
                          "--factories", "IVF", "--queries", "5", "--shortlist", "10", "--work", str(tmp_path),
                          "--json", str(tmp_path / "first_stage.json"), "--overwrite"], cwd=ROOT, text=True,
                         capture_output=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    (row,) = json.loads((tmp_path / "first_stage.json").read_text())
    assert (row["d"], row["n"], row["queries"], row["shortlist"]) == (16, 3000, 5, 10)
    recalls = [r["recall"] for r in row["faiss"]]
    assert recalls == sorted(recalls) and recalls[-1] >= 0.99 and all(r["ms"] > 0 for r in row["faiss"])
    assert "| 16 | 3,000 |" in out.stdout


@pytest.mark.parametrize("script, args", [
    ("search.py", ["--captions", "no_such_captions.txt"]),
    ("search.py", ["--sizes", "10,x"]),
    ("search.py", ["--build", "0"]),
    ("process_parity.py", ["--data", "x", "--epochs", "two"]),
])
def test_benchmark_bad_flags_are_one_error_line_and_exit_2(tmp_path, script, args):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=tmp_path, text=True,
                         capture_output=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith(f"error: {script}: ")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("script, args", [
    ("score.py", ["--json", "old.json"]),
    ("train_step.py", ["--json", "old.json"]),
    ("search.py", ["--json", "old.json"]),
    ("first_stage.py", ["--json", "old.json"]),
    ("index_faults.py", ["--json", "old.json"]),
    ("process_parity.py", ["--data", "x", "--json", "old.json"]),
    ("process_parity.py", ["--data", "x", "--out", "."]),
], ids=["score", "train_step", "search", "first_stage", "index_faults", "process_parity-json", "process_parity-out"])
def test_benchmark_refuses_to_replace_its_outputs_without_overwrite(tmp_path, script, args):
    (tmp_path / "old.json").write_text("old")
    (tmp_path / "1proc").mkdir()
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=tmp_path, text=True,
                         capture_output=True, timeout=120)
    assert out.returncode == 2 and out.stdout == "", out.stderr
    held = "--json old.json already exists" if "--json" in args else "--out . already holds 1proc"
    assert out.stderr.startswith(f"error: {script}: {held}") and "--overwrite" in out.stderr
    assert len(out.stderr.splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["1proc", "old.json"] and (tmp_path / "old.json").read_text() == "old"
