"""Smoke test of the benchmark scripts at tiny sizes: they run, every CPU scorer is exact.

No timing is asserted (speed is measured by the scripts themselves, on a quiet machine). Both
scripts run at once, each in its own subprocess (they spawn one process per scorer).
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_MODEL = ["--embed-size", "16", "--img-dim", "24", "--word-dim", "12", "--vocab-size", "40", "--threads", "1"]
CPU_SCORERS = ("loop", "plain", "fast", "onnx-cpu")


def _start(script: str, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _table_rows(output: str, names) -> dict:
    """{scorer: the words of its table row} (the row: the scorer's name first, then numbers)."""
    rows = {}
    for line in output.splitlines():
        words = line.split()
        if words and words[0] in names and len(words) > 2 and not line.startswith("  "):
            rows[words[0]] = words
    return rows


def test_score_and_train_step_run_and_are_exact(tmp_path):
    """score.py in 2 rounds (every scorer twice, in turn), train_step.py once."""
    score_json, train_json = tmp_path / "score.json", tmp_path / "train.json"
    score = _start("score.py", ["--size", "small", "--n-img", "3", "--n-cap", "4", "--scorers", ",".join(CPU_SCORERS),
                                "--rounds", "2", "--json", str(score_json), *TINY_MODEL])
    train = _start("train_step.py", ["--device", "cpu", "--batch-size", "4", "--iters", "1",
                                     "--json", str(train_json), *TINY_MODEL])
    score_out, _ = score.communicate(timeout=300)
    train_out, _ = train.communicate(timeout=300)

    assert score.returncode == 0, score_out
    rows = _table_rows(score_out, CPU_SCORERS)
    assert set(rows) == set(CPU_SCORERS), score_out
    assert rows["loop"][5] == "ref", score_out
    for name in CPU_SCORERS[1:]:
        assert rows[name][5] == "PASS", score_out
    assert "exactness: PASS" in score_out
    assert "ideal speed-up original / fast" in score_out
    report = json.loads(score_json.read_text())["sizes"]["small"]
    assert report["config"]["embed_size"] == 16 and report["config"]["n_img"] == 3 and report["config"]["n_cap"] == 4
    for name in CPU_SCORERS:
        res = report["scorers"][name]
        assert res["status"] == "ok" and res["pairs"] == 12 and res["pairs_per_s"] > 0 and res["mem_peak_mb"] > 0
        assert res["max_abs_diff"] <= 1e-5
        assert len(res["times"]) == 2 and res["seconds"] == min(res["times"])  # one time per round, the best shown
        if name != "loop":
            assert len(res["x_loop_rounds"]) == 2
    assert "x loop within each round" in score_out
    assert report["flops_per_pair"]["fast"] < report["flops_per_pair"]["original"]

    assert train.returncode == 0, train_out
    rows = _table_rows(train_out, ("original", "fast", "fast-nockpt"))
    assert set(rows) == {"original", "fast", "fast-nockpt"}, train_out
    assert all(r[1] == "OK" for r in rows.values()), train_out
    assert rows["fast"][7] == "PASS" and rows["fast-nockpt"][7] == "PASS", train_out
    results = json.loads(train_json.read_text())["scorers"]
    for name in ("original", "fast", "fast-nockpt"):
        assert results[name]["samples_per_s"] > 0 and results[name]["grads_saved"]
    assert results["fast"]["grad_max_abs_diff"] <= 1e-4 * results["fast"]["grad_max_abs"]


def test_rounds_keep_the_fastest_time_the_highest_memory_and_the_worst_check():
    sys.path.insert(0, str(ROOT))
    from benchmarks.score import merge_rounds
    first = {"status": "ok", "pairs_per_s": 10.0, "times": [2.0], "mem_peak_mb": 50.0, "max_abs_diff": 1e-7,
             "check": "PASS"}
    second = {"status": "ok", "pairs_per_s": 20.0, "times": [1.0], "mem_peak_mb": 40.0, "max_abs_diff": 2e-5,
              "check": "FAIL"}
    merged = merge_rounds(merge_rounds(None, first), second)
    assert merged["pairs_per_s"] == 20.0 and merged["times"] == [2.0, 1.0] and merged["mem_peak_mb"] == 50.0
    assert merged["max_abs_diff"] == 2e-5 and merged["check"] == "FAIL"
    failed = {"status": "error", "error": "boom"}
    assert merge_rounds(merged, failed) is failed
