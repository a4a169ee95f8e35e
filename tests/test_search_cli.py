"""Specification of ``python -m runtime.search``'s command line: where queries come from (a file,
--query, standard input), one rule for unknown words, queries read and answered a batch at a
time, the JSON lines, and one error line for every bad input. Small inputs: the tiny model and
the tiny data folder's test split (tests/fixtures.py)."""
from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
import pytest

from fixtures import assert_error_line, image_index, run_cli, split, tiny_checkpoint, tiny_data, tiny_model_dir  # noqa: F401
from runtime import search as search_module
from runtime.index import build
from runtime.search import Index, main
from runtime.scorer import Scorer

UNKNOWN = "zzzqx qqqzv"  # no word of it is in the tiny vocabulary


@pytest.fixture(scope="module")
def caption_index(tmp_path_factory, tiny_model_dir, split):  # noqa: F811
    out = tmp_path_factory.mktemp("search_cli") / "captions"
    build(out, split[3][:8], tiny_model_dir, captions=True, device="cpu", threads=1)
    return out


def search(args, capsys, stdin: bytes | None = None, monkeypatch=None):
    """runtime.search in-process -> (exit status, stdout, stderr)."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    return run_cli(main, [*args, "--device", "cpu", "--threads", "1"], capsys)


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


# --------------------------------------------------------------------------- unknown words
def test_unknown_words_are_noted_once_per_query_and_every_query_is_answered(image_index, split, tmp_path, capsys):
    captions = [split[3][0], split[3][0] + " " + UNKNOWN, UNKNOWN, split[3][2]]  # 0 and 2: every word known
    (tmp_path / "q.txt").write_text("\n".join(captions) + "\n")
    code, out, err = search([image_index, tmp_path / "q.txt", "--json", "--quiet", "--top-k", "2"], capsys)
    assert code == 0, err
    assert err.splitlines() == [f"note: query 1 ({captions[1]!r}): the model's vocabulary lacks zzzqx, qqqzv; "
                                f"read as <unk>",
                                f"note: query 2 ({UNKNOWN!r}): the model's vocabulary lacks zzzqx, qqqzv; "
                                f"read as <unk>"]
    lines = json_lines(out)
    assert [d["query"] for d in lines] == [0, 1, 2, 3] and [d["text"] for d in lines] == captions
    assert [d.get("unknown_words") for d in lines] == [None, ["zzzqx", "qqqzv"], ["zzzqx", "qqqzv"], None]
    assert all(len(d["matches"]) == 2 for d in lines)


def test_a_caption_of_only_unknown_words_scores_as_the_model_sees_it(image_index, tiny_model_dir, split,  # noqa: F811
                                                                     capsys):
    code, out, err = search([image_index, "--query", UNKNOWN, "--exhaustive", "--top-k", "6", "--json", "--quiet"],
                            capsys)
    assert code == 0, err
    matches = json_lines(out)[0]["matches"]
    scorer = Scorer(tiny_model_dir, device="cpu", threads=1)
    expected = scorer.score(split[2], [UNKNOWN])[:, 0]  # as <start> <unk> <unk> <end>
    assert [m["row"] for m in matches] == np.lexsort((np.arange(6), -expected)).tolist()
    np.testing.assert_allclose([m["score"] for m in matches], np.sort(expected)[::-1], rtol=0, atol=1e-5)


def test_scorer_names_the_unknown_words(tiny_model_dir, split):  # noqa: F811
    scorer = Scorer(tiny_model_dir, device="cpu", threads=1)
    assert scorer.unknown_words([split[3][0], f"zzzqx {split[3][0]} zzzqx qqqzv", UNKNOWN]) == {
        1: ["zzzqx", "qqqzv"], 2: ["zzzqx", "qqqzv"]}


# --------------------------------------------------------------------------- where the queries come from
def test_query_flags_and_stdin_give_the_file_s_results(image_index, split, tmp_path, capsys, monkeypatch):
    captions = split[3][:3]
    (tmp_path / "q.txt").write_text("\n".join(captions) + "\n")
    common = ["--json", "--quiet", "--top-k", "3"]
    code, from_file, err = search([image_index, tmp_path / "q.txt", *common], capsys)
    assert code == 0, err
    code, from_flags, err = search([image_index, *[a for c in captions for a in ("--query", c)], *common], capsys)
    assert code == 0, err
    code, from_stdin, err = search([image_index, "-", *common], capsys, ("\n".join(captions) + "\n").encode(),
                                   monkeypatch)
    assert code == 0, err
    assert from_flags == from_file == from_stdin
    assert [d["text"] for d in json_lines(from_file)] == captions


def test_queries_from_a_pipe_are_read_once_and_answered(image_index, split, tmp_path, capsys):
    import threading
    captions = split[3][:3]
    (tmp_path / "q.txt").write_text("\n".join(captions) + "\n")
    os.mkfifo(tmp_path / "q.fifo")  # as a shell's <(...) gives: a path that can be read only once
    writer = threading.Thread(target=lambda: (tmp_path / "q.fifo").write_text("\n".join(captions) + "\n"))
    writer.start()
    code, from_pipe, err = search([image_index, tmp_path / "q.fifo", "--json", "--quiet"], capsys)
    writer.join(timeout=10)
    assert code == 0, err
    code, from_file, err = search([image_index, tmp_path / "q.txt", "--json", "--quiet"], capsys)
    assert from_pipe == from_file and len(from_file.splitlines()) == 3


def test_text_output_names_each_query(image_index, capsys):
    code, out, err = search([image_index, "--query", "  a red dog  ", "--top-k", "2", "--quiet"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "query 0: a red dog" and len(lines) == 3
    assert lines[1].startswith("  1. row ") and lines[2].startswith("  2. row ")


def test_picture_queries_carry_their_file_name(caption_index, split, tmp_path, capsys):
    np.save(tmp_path / "q.npy", split[2][:2])
    code, out, err = search([caption_index, tmp_path / "q.npy", "--json", "--quiet", "--top-k", "2"], capsys)
    assert code == 0, err
    assert [(d["query"], d["file"]) for d in json_lines(out)] == [(0, "q.npy:0"), (1, "q.npy:1")]


# --------------------------------------------------------------------------- a batch at a time
def test_queries_are_searched_a_batch_at_a_time_with_the_same_results(image_index, split, tmp_path, capsys,
                                                                      monkeypatch):
    (tmp_path / "q.txt").write_text("\n".join(split[3][:5]) + "\n")
    args = [image_index, tmp_path / "q.txt", "--json", "--quiet", "--top-k", "3"]
    code, whole, err = search(args, capsys)
    assert code == 0, err
    sizes, printed_before = [], []
    real_search = Index.search

    def spy(self, queries, *a, **k):
        sizes.append(len(queries))
        printed_before.append(sys.stdout.getvalue().count("\n"))  # capsys's capture
        return real_search(self, queries, *a, **k)
    monkeypatch.setattr(Index, "search", spy)
    code, batched, err = search([*args, "--batch", "2"], capsys)
    assert code == 0, err
    assert sizes == [2, 2, 1] and batched == whole
    assert printed_before == [0, 2, 4]  # each batch is printed before the next one is searched
    sizes.clear()
    code, _, err = search([image_index, split[1], "--quiet", "--batch", "20"], capsys)  # 30 queries
    assert code == 0, err
    assert sizes == [search_module.FIRST_BATCH, 2 * search_module.FIRST_BATCH, 30 - 3 * search_module.FIRST_BATCH]


def test_a_bad_line_anywhere_is_found_before_any_result(image_index, split, tmp_path, capsys):
    (tmp_path / "q.txt").write_bytes(("\n".join(split[3][:5]) + "\n\nlast\n").encode())
    code, out, err = search([image_index, tmp_path / "q.txt", "--batch", "1", "--quiet"], capsys)
    assert_error_line(code, out, err, ["q.txt", "blank line 6"])


def test_read_queries_returns_every_query(image_index, split):
    queries, texts = search_module.read_queries(os.fspath(split[1]), "images")
    assert queries == texts == split[3]


# --------------------------------------------------------------------------- bad input: one line, exit 2
@pytest.mark.parametrize("case", ["no_queries", "queries_and_query", "blank_query", "empty_stdin",
                                  "stdin_of_blank_lines", "query_for_a_caption_index", "stdin_for_a_caption_index",
                                  "batch_0", "npy_for_image_index",
                                  "html_exists", "html_missing_folder", "html_is_the_queries", "pictures_without_html",
                                  "pictures_missing", "overwrite_without_html", "nan_feature_query", "text_instead_of_a_file"])
def test_bad_input_is_one_line_and_writes_nothing(case, image_index, caption_index, split, tmp_path, capsys,
                                                  monkeypatch):
    q = tmp_path / "q.txt"
    q.write_text(split[3][0] + "\n")
    (tmp_path / "old.html").write_text("old")
    bad = split[2][:3].copy()
    bad[2, 1, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    page = tmp_path / "page.html"
    stdin = {"empty_stdin": b"", "stdin_of_blank_lines": b"\n \n", "stdin_for_a_caption_index": b"a dog\n"}.get(case)
    args, words = {
        "no_queries": ([image_index], ["no queries", "--query"]),
        "queries_and_query": ([image_index, q, "--query", "a dog"], ["QUERIES or --query"]),
        "blank_query": ([image_index, "--query", "a dog", "--query", " "], ["--query 2", "blank"]),
        "empty_stdin": ([image_index, "-"], ["standard input", "no captions"]),
        "stdin_of_blank_lines": ([image_index, "-"], ["standard input", "blank lines 1, 2"]),
        "query_for_a_caption_index": ([caption_index, "--query", "a dog"], ["--query", "index of captions"]),
        "stdin_for_a_caption_index": ([caption_index, "-"], ["standard input", "index of captions"]),
        "batch_0": ([image_index, q, "--batch", "0"], ["--batch", "got 0"]),
        "npy_for_image_index": ([image_index, tmp_path / "nan.npy"], ["nan.npy", "captions"]),
        "html_exists": ([image_index, q, "--html", tmp_path / "old.html"], ["--html", "already exists", "--overwrite"]),
        "html_missing_folder": ([image_index, q, "--html", tmp_path / "no" / "p.html"], ["--html", "does not exist"]),
        "html_is_the_queries": ([image_index, q, "--html", q, "--overwrite"], ["--html", "is the input"]),
        "pictures_without_html": ([image_index, q, "--pictures", tmp_path], ["--pictures", "--html"]),
        "pictures_missing": ([image_index, q, "--html", page, "--pictures", tmp_path / "nope"],
                             ["--pictures", "no such folder"]),
        "overwrite_without_html": ([image_index, q, "--overwrite"], ["--overwrite", "--html"]),
        "nan_feature_query": ([caption_index, tmp_path / "nan.npy", "--batch", "1", "--html", page],
                              ["nan.npy", "image 2", "NaN"]),
        "text_instead_of_a_file": ([image_index, "a red dog"], ["a red dog: no such file", "--query 'a red dog'"]),
    }[case]
    before = sorted(os.listdir(tmp_path))
    code, out, err = search(args, capsys, stdin, monkeypatch)
    assert_error_line(code, out, err, words)
    assert sorted(os.listdir(tmp_path)) == before and (tmp_path / "old.html").read_text() == "old"
    assert q.read_text() == split[3][0] + "\n"
