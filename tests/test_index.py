"""Specification of the index folder and search (runtime.index, runtime.search, runtime.Index) and of
the two-stage evaluation (imram_min.search.shortlist): small inputs, one behaviour each."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from fixtures import (N_TEST_IMAGES, assert_error_line, assert_one_error_line, image_index, run_cli,  # noqa: F401
                      split, tiny_checkpoint, tiny_data, tiny_model_dir)
from runtime import indexdir
from runtime.index import build, main as index_main
from runtime.search import Index, TopK, main as search_main
from runtime.scorer import Scorer

TOL = 1e-5


@pytest.fixture(scope="module")
def exhaustive_sims(tiny_model_dir, split):  # noqa: F811
    return Scorer(tiny_model_dir, device="cpu", threads=1).score(split[2], split[3])  # (n_img, n_cap)


def index_files(path):
    """Every file of the index folder and its bytes (the writer lock's pid aside)."""
    return {f: (path / f).read_bytes() for f in sorted(os.listdir(path)) if f != indexdir.LOCK_FILE}


# --------------------------------------------------------------------------- round trips
def test_build_append_search_round_trip(tmp_path, tiny_model_dir, split, exhaustive_sims):  # noqa: F811
    feats, captions = split[2], split[3]
    out = tmp_path / "idx"
    build(out, feats[:4], tiny_model_dir, device="cpu", threads=1, ids=[f"a{i}" for i in range(4)])
    build(out, feats[4:], append=True, device="cpu", threads=1, ids=[f"b{i}" for i in range(2)])
    index = Index(out, device="cpu", threads=1)
    assert len(index) == N_TEST_IMAGES and index.ids == ["a0", "a1", "a2", "a3", "b0", "b1"]
    assert len(index.manifest["parts"]) == 2
    rows, scores = index.search(captions, top_k=3, shortlist=N_TEST_IMAGES)  # shortlist = all: exact
    want = np.argsort(-exhaustive_sims.T, axis=1, kind="stable")[:, :3]
    assert (rows == want).all()
    assert np.abs(scores - np.take_along_axis(exhaustive_sims.T, want, 1)).max() <= TOL


def test_exhaustive_equals_runtime_score(image_index, split, exhaustive_sims):
    rows, scores = Index(image_index, device="cpu", threads=1).search(split[3], top_k=N_TEST_IMAGES, exhaustive=True)
    got = np.zeros_like(exhaustive_sims.T)
    np.put_along_axis(got, rows, scores, 1)
    assert np.abs(got - exhaustive_sims.T).max() <= TOL


def test_caption_index_exhaustive_equals_runtime_score(tmp_path, tiny_model_dir, split, exhaustive_sims):  # noqa: F811
    build(tmp_path / "caps", split[3], tiny_model_dir, captions=True, device="cpu", threads=1)
    index = Index(tmp_path / "caps", device="cpu", threads=1)
    assert index.ids == split[3]
    rows, scores = index.search(split[2], top_k=len(split[3]), exhaustive=True)
    got = np.zeros_like(exhaustive_sims)
    np.put_along_axis(got, rows, scores, 1)
    assert np.abs(got - exhaustive_sims).max() <= TOL
    rows_s, scores_s = index.search(split[2], top_k=5, shortlist=len(split[3]))
    assert (rows_s == rows[:, :5]).all() and np.abs(scores_s - scores[:, :5]).max() <= TOL


def test_shortlist_is_reranked_first_stage(image_index, split):
    index = Index(image_index, device="cpu", threads=1)
    query = index.encode_queries(split[3][:1])
    cand, _ = index.first_stage(query["global"], 3)
    rows, scores = index.search(split[3][:1], top_k=2, shortlist=3)
    assert set(rows[0]) <= set(cand[0]) and scores[0, 0] >= scores[0, 1]


def test_float16_round_trip(tmp_path, tiny_model_dir, split, exhaustive_sims):  # noqa: F811
    build(tmp_path / "f16", split[2], tiny_model_dir, dtype="float16", device="cpu", threads=1)
    index = Index(tmp_path / "f16", device="cpu", threads=1)
    assert index.dtype == "float16" and index.parts[0]["embs"].dtype == np.float16
    rows, scores = index.search(split[3], top_k=N_TEST_IMAGES, exhaustive=True)
    got = np.zeros_like(exhaustive_sims.T)
    np.put_along_axis(got, rows, scores, 1)
    assert np.abs(got - exhaustive_sims.T).max() <= 2e-3  # float16 embeddings: ~1e-3 of a score
    embs = tmp_path / "f16" / f"{index.manifest['parts'][0]['name']}.embs.npy"
    assert os.path.getsize(embs) <= index.parts[0]["embs"].size * 2 + 128  # 2 bytes a value, + the header


def test_top_k_keeps_ties_by_lower_row():
    top = TopK(1, 2)
    top.update(np.array([[1.0, 3.0, 3.0]]), 0)
    top.update(np.array([[3.0, 2.0]]), 3)
    rows, scores = top.result()
    assert rows.tolist() == [[1, 2]] and scores.tolist() == [[3.0, 3.0]]


# --------------------------------------------------------------------------- stored projections
@pytest.fixture(scope="module")
def proj_index(tmp_path_factory, tiny_model_dir, split):  # noqa: F811
    out = tmp_path_factory.mktemp("idx") / "proj"
    build(out, split[2], tiny_model_dir, store_projections=True, device="cpu", threads=1)
    return out


def test_stored_projections_are_recorded_and_equal_recomputing(proj_index, image_index, split):
    stored, plain = Index(proj_index, device="cpu", threads=1), Index(image_index, device="cpu", threads=1)
    p = stored.scorer.projection_size
    assert p == 4 * 32  # mode full: 2d per direction, d = 32
    assert stored.manifest["projection_size"] == p and plain.manifest["projection_size"] == 0
    assert stored.parts[0]["proj"].shape == (N_TEST_IMAGES * stored.n_region, p) and plain.parts[0]["proj"] is None
    for how in ({"shortlist": 3}, {"exhaustive": True}):
        rows_s, scores_s = stored.search(split[3], top_k=N_TEST_IMAGES, **how)
        rows_p, scores_p = plain.search(split[3], top_k=N_TEST_IMAGES, **how)
        assert (rows_s == rows_p).all() and np.abs(scores_s - scores_p).max() <= TOL


def test_stored_projections_caption_index_float16_and_append(tmp_path, tiny_model_dir, split):  # noqa: F811
    caps = split[3]
    for store in (True, False):
        build(tmp_path / f"c{store}", caps[:20], tiny_model_dir, captions=True, dtype="float16",
              store_projections=store, device="cpu", threads=1)
        build(tmp_path / f"c{store}", caps[20:], captions=True, append=True, device="cpu", threads=1)
    stored, plain = (Index(tmp_path / f"c{s}", device="cpu", threads=1) for s in (True, False))
    assert [p["proj"].dtype for p in stored.parts] == [np.float16, np.float16]  # the appended part has them too
    assert sum(len(p["proj"]) for p in stored.parts) == sum(p["n_vectors"] for p in stored.manifest["parts"])
    rows_s, scores_s = stored.search(split[2], top_k=len(caps), exhaustive=True)
    rows_p, scores_p = plain.search(split[2], top_k=len(caps), exhaustive=True)
    got_s, got_p = np.zeros((len(split[2]), len(caps)), np.float32), np.zeros((len(split[2]), len(caps)), np.float32)
    np.put_along_axis(got_s, rows_s, scores_s, 1)
    np.put_along_axis(got_p, rows_p, scores_p, 1)
    assert np.abs(got_s - got_p).max() <= 2e-3  # float16 projections: ~1e-3 of a score, as float16 embeddings


def test_append_keeps_the_projection_choice(proj_index, image_index, tmp_path, split):
    import shutil
    for src, store in ((proj_index, False), (image_index, True)):
        copy = tmp_path / src.name
        shutil.copytree(src, copy)
        with pytest.raises(indexdir.IndexDirError, match="projections"):
            build(copy, split[2][:1], append=True, store_projections=store, device="cpu", threads=1)


# --------------------------------------------------------------------------- the FAISS first stage (optional)
def test_faiss_first_stage_equals_exact_and_extends_on_append(tmp_path, tiny_model_dir, split):  # noqa: F811
    pytest.importorskip("faiss")
    out = tmp_path / "idx"
    build(out, split[2][:4], tiny_model_dir, faiss="IVF2,Flat", faiss_params="nprobe=2", device="cpu", threads=1)
    first = json.loads((out / "manifest.json").read_text())["faiss"]["file"]
    m = build(out, split[2][4:], append=True, device="cpu", threads=1)
    assert m["faiss"]["factory"] == "IVF2,Flat" and m["faiss"]["params"] == "nprobe=2"
    assert m["faiss"]["file"] != first and not (out / first).exists()  # a new file, the old one removed
    exact, approx = Index(out, device="cpu", threads=1), Index(out, device="cpu", threads=1, first_stage="faiss")
    assert approx.faiss.ntotal == N_TEST_IMAGES
    rows_e, scores_e = exact.search(split[3], top_k=2, shortlist=3)
    rows_a, scores_a = approx.search(split[3], top_k=2, shortlist=3)  # every list probed: exact
    assert (rows_e == rows_a).all() and np.abs(scores_e - scores_a).max() <= TOL


def test_default_path_never_imports_faiss(tmp_path, tiny_model_dir, split):  # noqa: F811
    import subprocess
    import sys
    index = str(tmp_path / "idx")
    code = ("import sys; from runtime import index, search; "
            f"assert index.main([{str(split[0])!r}, '--model', {str(tiny_model_dir)!r}, '--out', {index!r}, "
            "'--quiet', '--store-projections']) == 0; "
            f"assert search.main([{index!r}, {str(split[1])!r}, '--quiet']) == 0; "
            "assert 'faiss' not in sys.modules, 'faiss imported'")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------- safety
def test_index_and_model_moved_together_still_find_each_other(tmp_path, tiny_model_dir, split):  # noqa: F811
    import shutil
    built = tmp_path / "built"
    shutil.copytree(tiny_model_dir, built / "model")
    build(built / "index", split[2], built / "model", device="cpu", threads=1)
    assert json.loads((built / "index" / "manifest.json").read_text())["model"]["dir"] == "../model"
    moved = shutil.move(str(built), str(tmp_path / "elsewhere"))
    rows, _ = Index(os.path.join(moved, "index"), device="cpu", threads=1).search(split[3][:1], top_k=2)
    assert rows.shape == (1, 2)


def test_an_absolute_model_dir_in_the_manifest_is_read_as_it_is(tmp_path, image_index, tiny_model_dir):  # noqa: F811
    manifest = json.loads((image_index / "manifest.json").read_text())
    manifest["model"]["dir"] = os.path.abspath(tiny_model_dir)  # as indexes built before relative paths record
    assert indexdir.model_dir_of(str(tmp_path), manifest) == os.path.abspath(tiny_model_dir)


def test_different_model_is_refused(image_index, tmp_path, split, tiny_checkpoint, capsys):  # noqa: F811
    import contextlib
    import io
    from export.__main__ import main as export_main
    other = tmp_path / "other"
    with contextlib.redirect_stdout(io.StringIO()):
        assert export_main([os.fspath(tiny_checkpoint), "--out", os.fspath(other), "--matcher", "plain"]) == 0
    captions = tmp_path / "q.txt"
    captions.write_text("\n".join(split[3][:2]) + "\n")
    code, out, err = run_cli(search_main, [image_index, captions, "--model", other], capsys)
    assert code == 2 and out == "" and err.startswith("error: ") and len(err.splitlines()) == 1
    assert "not the model" in err and "Traceback" not in err


def test_failed_append_leaves_the_index_intact(image_index, tmp_path, split, monkeypatch):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(image_index, copy)
    before = index_files(copy)

    def broken(self, *args, **kwargs):
        raise OSError(28, "No space left on device")  # as a full disk would, halfway through
    monkeypatch.setattr(indexdir.PartWriter, "close", broken)
    with pytest.raises(OSError):
        build(copy, split[2][:2], append=True, device="cpu", threads=1)
    assert index_files(copy) == before
    assert len(Index(copy, device="cpu", threads=1)) == N_TEST_IMAGES


def test_failed_build_leaves_nothing(tmp_path, tiny_model_dir, split, monkeypatch):  # noqa: F811
    def broken(self, *args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(indexdir.PartWriter, "close", broken)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "new", split[2], tiny_model_dir, device="cpu", threads=1)
    assert os.listdir(tmp_path) == []
    (tmp_path / "empty").mkdir()  # a folder made for the index stays, empty
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "empty", split[2], tiny_model_dir, device="cpu", threads=1)
    assert os.listdir(tmp_path) == ["empty"] and os.listdir(tmp_path / "empty") == []


def test_rebuild_replaces_the_old_parts(tmp_path, tiny_model_dir, split):  # noqa: F811
    build(tmp_path / "idx", split[2], tiny_model_dir, device="cpu", threads=1)
    build(tmp_path / "idx", split[2][:3], tiny_model_dir, device="cpu", threads=1, overwrite=True)
    assert len(Index(tmp_path / "idx", device="cpu", threads=1)) == 3
    assert sorted(os.listdir(tmp_path / "idx"))[:2] == [".lock", "manifest.json"]
    assert len(os.listdir(tmp_path / "idx")) == 2 + len(indexdir.SUFFIXES)  # the lock, the manifest, one part


# --------------------------------------------------------------------------- CLIs
def test_cli_json_format(tmp_path, tiny_model_dir, split, capsys):  # noqa: F811
    ims, caps = split[0], split[1]
    code, _, err = run_cli(index_main, [ims, "--model", tiny_model_dir, "--out", tmp_path / "idx", "--quiet",
                                        "--device", "cpu"], capsys)
    assert code == 0, err
    code, out, err = run_cli(search_main, [tmp_path / "idx", caps, "--top-k", "2", "--shortlist", "4", "--json",
                                           "--quiet", "--device", "cpu"], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [d["query"] for d in lines] == list(range(len(split[3])))
    assert [d["text"] for d in lines] == split[3]
    for d in lines:
        assert set(d) - {"unknown_words"} == {"query", "text", "matches"} and len(d["matches"]) == 2
        assert all(set(m) == {"row", "id", "score"} for m in d["matches"])
        assert d["matches"][0]["id"] == f"test_ims.npy:{d['matches'][0]['row']}"
        assert d["matches"][0]["score"] >= d["matches"][1]["score"]


@pytest.mark.parametrize("case", ["missing_index", "not_an_index", "features_to_image_index", "bad_top_k",
                                  "append_captions_to_images", "missing_model", "bad_manifest",
                                  "store_projections_plain_matcher", "append_with_projections",
                                  "altered_projection_size", "faiss_not_installed", "bad_faiss_factory",
                                  "faiss_params_without_faiss", "first_stage_faiss_without_faiss_index",
                                  "empty_query_file", "shortlist_zero", "shortlist_negative",
                                  "top_k_negative", "truncated_embeddings", "altered_embeddings_header",
                                  "wrong_feature_size_query", "wrong_feature_size_build",
                                  "append_another_region_count", "append_another_feature_size"])
def test_bad_inputs_one_line_exit_2(case, image_index, proj_index, tmp_path, tiny_model_dir,  # noqa: F811
                                    tiny_checkpoint, split, capsys, monkeypatch):  # noqa: F811
    ims, caps = split[0], split[1]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    broken = tmp_path / "broken"
    if case in ("bad_manifest", "altered_projection_size", "append_with_projections", "truncated_embeddings",
                "altered_embeddings_header"):
        import shutil
        shutil.copytree(proj_index if case == "altered_projection_size" else image_index, broken)
        m = json.loads((broken / "manifest.json").read_text())
        if case == "bad_manifest":  # a part said to hold one item more than its files do
            m["parts"][0]["n_items"] += 1
            m["n_items"] += 1
        elif case == "altered_projection_size":
            m["projection_size"] = 7
        (broken / "manifest.json").write_text(json.dumps(m))
        embs = broken / f"{m['parts'][0]['name']}.embs.npy"
        if case == "truncated_embeddings":
            embs.write_bytes(embs.read_bytes()[:-100])
        elif case == "altered_embeddings_header":
            embs.write_bytes(embs.read_bytes().replace(b"'<f4'", b"'<f8'", 1))
    feats = split[2]
    (tmp_path / "empty.txt").write_text("")
    np.save(tmp_path / "wide.npy", np.zeros((2, feats.shape[1], feats.shape[2] + 1), np.float32))
    np.save(tmp_path / "regions.npy", np.zeros((2, feats.shape[1] + 1, feats.shape[2]), np.float32))
    if case == "wrong_feature_size_query":
        build(tmp_path / "caption_index", split[3][:5], tiny_model_dir, captions=True, device="cpu", threads=1)
    if case.startswith("append_another"):
        import shutil
        shutil.copytree(image_index, broken)
    plain = tmp_path / "plain_model"
    if case == "store_projections_plain_matcher":
        import contextlib
        import io
        from export.__main__ import main as export_main
        with contextlib.redirect_stdout(io.StringIO()):
            assert export_main([os.fspath(tiny_checkpoint), "--out", os.fspath(plain), "--matcher", "plain"]) == 0
    if case == "faiss_not_installed":
        import sys
        monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    if case == "bad_faiss_factory":
        pytest.importorskip("faiss")
    main, args, words = {
        "missing_index": (search_main, [tmp_path / "nope", caps], ["nope", "no such index"]),
        "not_an_index": (index_main, [ims, "--model", tiny_model_dir, "--out", tmp_path / "junk"], ["not an index"]),
        "features_to_image_index": (search_main, [image_index, ims], ["captions"]),
        "bad_top_k": (search_main, [image_index, caps, "--top-k", "0"], ["--top-k"]),
        "append_captions_to_images": (index_main, [caps, "--captions", "--append", "--out", image_index],
                                      ["cannot append captions"]),
        "missing_model": (index_main, [ims, "--model", tmp_path / "nomodel", "--out", tmp_path / "new"], ["nomodel"]),
        "bad_manifest": (search_main, [broken, caps], ["global.npy", "manifest says"]),
        "store_projections_plain_matcher": (index_main, [ims, "--model", plain, "--out", tmp_path / "new",
                                                         "--store-projections"], ["takes no projections"]),
        "append_with_projections": (index_main, [ims, "--append", "--out", broken, "--store-projections"],
                                    ["does not store the projections"]),
        "altered_projection_size": (search_main, [broken, caps], ["projections of 7 values"]),
        "faiss_not_installed": (index_main, [ims, "--model", tiny_model_dir, "--out", tmp_path / "new",
                                             "--faiss", "Flat"], ["FAISS is not installed", "pip install"]),
        "bad_faiss_factory": (index_main, [ims, "--model", tiny_model_dir, "--out", tmp_path / "new",
                                           "--faiss", "NoSuchIndex9"], ["--faiss", "NoSuchIndex9"]),
        "faiss_params_without_faiss": (index_main, [ims, "--model", tiny_model_dir, "--out", tmp_path / "new",
                                                    "--faiss-params", "nprobe=4"], ["--faiss-params needs --faiss"]),
        "first_stage_faiss_without_faiss_index": (search_main, [image_index, caps, "--first-stage", "faiss"],
                                                  ["has no FAISS index"]),
        "empty_query_file": (search_main, [image_index, tmp_path / "empty.txt"], ["empty.txt", "no captions"]),
        "shortlist_zero": (search_main, [image_index, caps, "--shortlist", "0"], ["--shortlist", ">= 1"]),
        "shortlist_negative": (search_main, [image_index, caps, "--shortlist", "-3"], ["--shortlist", ">= 1"]),
        "top_k_negative": (search_main, [image_index, caps, "--top-k", "-1"], ["--top-k", ">= 1"]),
        "truncated_embeddings": (search_main, [broken, caps], ["embs.npy"]),
        "altered_embeddings_header": (search_main, [broken, caps], ["embs.npy"]),
        "wrong_feature_size_query": (search_main, [tmp_path / "caption_index", tmp_path / "wide.npy"],
                                     ["wide.npy", str(feats.shape[2])]),
        "wrong_feature_size_build": (index_main, [tmp_path / "wide.npy", "--model", tiny_model_dir, "--out",
                                                  tmp_path / "new"], ["wide.npy", str(feats.shape[2])]),
        "append_another_region_count": (index_main, [tmp_path / "regions.npy", "--append", "--out", broken],
                                        ["regions"]),
        "append_another_feature_size": (index_main, [tmp_path / "wide.npy", "--append", "--out", broken],
                                        ["wide.npy", str(feats.shape[2])]),
    }[case]
    code, out, err = run_cli(main, [*args, "--quiet"], capsys)
    assert_one_error_line(code, out, err, tmp_path / "new", words)


def test_top_k_and_shortlist_past_the_gallery_are_clamped_and_said_once(image_index, split, capsys):
    code, out, err = run_cli(search_main, [image_index, split[1], "--top-k", "50", "--shortlist", "80", "--json",
                                           "--quiet", "--device", "cpu"], capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if not line.startswith("note: query ")]  # not those of unknown words
    assert notes == [f"note: --top-k 50 is more than the index's {N_TEST_IMAGES} items; {N_TEST_IMAGES} used",
                     f"note: --shortlist 80 is more than the index's {N_TEST_IMAGES} items; {N_TEST_IMAGES} used"]
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == len(split[3]) and all(len(d["matches"]) == N_TEST_IMAGES for d in lines)


# --------------------------------------------------------------------------- one writer, snapshots, tampering
def copy_of(index_dir, tmp_path, name="copy"):
    import shutil
    shutil.copytree(index_dir, tmp_path / name)
    return tmp_path / name


def edit_manifest(index_dir, change) -> None:
    m = json.loads((index_dir / "manifest.json").read_text())
    change(m)
    (index_dir / "manifest.json").write_text(json.dumps(m))


def record(index_dir, part: int, suffix: str) -> None:
    """Make the manifest record the file as it now is (a consistent but altered index)."""
    def change(m):
        path = index_dir / f"{m['parts'][part]['name']}.{suffix}"
        m["parts"][part]["files"][suffix] = indexdir.hash_file(str(path))
    edit_manifest(index_dir, change)


def test_replacing_an_index_needs_overwrite(image_index, tmp_path, split, capsys):
    copy, few = copy_of(image_index, tmp_path), tmp_path / "few.npy"
    np.save(few, split[2][:3])
    before = index_files(copy)
    code, out, err = run_cli(index_main, [few, "--out", copy, "--quiet", "--device", "cpu"], capsys)
    assert_error_line(code, out, err, [f"--out {copy} already exists", "--overwrite"])
    assert index_files(copy) == before
    code, out, err = run_cli(index_main, [few, "--out", copy, "--overwrite", "--quiet", "--device", "cpu"], capsys)
    assert code == 0, err
    assert Index(copy, device="cpu", threads=1).ids == ["few.npy:0", "few.npy:1", "few.npy:2"]


def test_append_refuses_or_skips_ids_already_there(tmp_path, tiny_model_dir, split, capsys):  # noqa: F811
    copy = tmp_path / "idx"
    assert run_cli(index_main, [split[0], "--model", tiny_model_dir, "--out", copy, "--quiet", "--device", "cpu"],
                   capsys)[0] == 0  # ids test_ims.npy:0 .. :5
    before = index_files(copy)
    np.save(tmp_path / "test_ims.npy", np.concatenate([split[2], split[2][:2]]))  # rows 0-5 indexed, 6-7 new
    code, out, err = run_cli(index_main, [tmp_path / "test_ims.npy", "--out", copy, "--append", "--quiet"], capsys)
    assert_error_line(code, out, err, ["6 of the 8 items are already in", "'test_ims.npy:0' and more", "--skip-existing"])
    assert index_files(copy) == before
    code, out, err = run_cli(index_main, [tmp_path / "test_ims.npy", "--out", copy, "--append", "--skip-existing",
                                          "--quiet", "--device", "cpu"], capsys)
    assert code == 0 and err == f"note: skipped 6 of the 8 items: their ids are already in {copy}\n", err
    ids = Index(copy, device="cpu", threads=1).ids
    assert ids == [f"test_ims.npy:{i}" for i in range(8)]
    code, out, err = run_cli(index_main, [tmp_path / "test_ims.npy", "--out", copy, "--append", "--skip-existing",
                                          "--quiet", "--device", "cpu"], capsys)
    assert code == 0 and err.splitlines()[-1] == f"note: nothing to append to {copy}"
    assert len(Index(copy, device="cpu", threads=1)) == 8


def test_index_append_adds_items_and_reloads(image_index, tmp_path, split, exhaustive_sims):
    index = Index(copy_of(image_index, tmp_path), device="cpu", threads=1)
    assert index.append(split[2][:2], ids=["new0", "new1"]) == 2
    assert len(index) == N_TEST_IMAGES + 2 and index.ids[-2:] == ["new0", "new1"]
    rows, scores = index.search(split[3][:3], top_k=N_TEST_IMAGES + 2, exhaustive=True)
    got = np.zeros((3, N_TEST_IMAGES + 2), np.float32)
    np.put_along_axis(got, rows, scores, 1)
    assert np.abs(got[:, N_TEST_IMAGES:] - exhaustive_sims.T[:3, :2]).max() <= TOL  # the same images, scored alike
    with pytest.raises(indexdir.IndexDirError, match="already in"):
        index.append(split[2][:1], ids=["new0"])
    notes = []
    assert index.append(split[2][:2], ids=["new0", "new2"], skip_existing=True, note=notes.append) == 1
    assert notes == [f"skipped 1 of the 2 items: their ids are already in {index.index_dir}"]
    assert index.ids[-1] == "new2" and len(index.manifest["parts"]) == 3


def test_a_second_writer_is_refused_in_one_line_after_its_wait(image_index, tmp_path, split, capsys):
    copy = copy_of(image_index, tmp_path)
    before = index_files(copy)
    with indexdir.writer_lock(str(copy)):  # another writer
        code, out, err = run_cli(index_main, [split[0], "--out", copy, "--append", "--skip-existing", "--quiet",
                                              "--wait", "0.2"], capsys)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"note: waiting up to 0.2 s for the writer of {copy} (pid {os.getpid()})",
                                f"error: {copy}: being written by another process (pid {os.getpid()}); try again "
                                f"when it is done, or add --wait SECONDS"]
    assert index_files(copy) == before


def test_an_open_index_keeps_answering_from_its_snapshot_until_reload(tmp_path, tiny_model_dir, split):  # noqa: F811
    idx = tmp_path / "idx"
    build(idx, split[2], tiny_model_dir, device="cpu", threads=1)
    index = Index(idx, device="cpu", threads=1)
    before = [index.search(split[3], top_k=3, shortlist=4), index.search(split[3], top_k=3, exhaustive=True)]
    opened = [f.name for p in index.parts for f in p["files"].values()]
    build(idx, split[2][:3], device="cpu", threads=1, overwrite=True)  # a rebuild deletes every file it opened
    assert not any(os.path.exists(name) for name in opened)
    after = [index.search(split[3], top_k=3, shortlist=4), index.search(split[3], top_k=3, exhaustive=True)]
    for (rows_b, scores_b), (rows_a, scores_a) in zip(before, after):
        assert (rows_a == rows_b).all() and (scores_a == scores_b).all()
    assert index.reload() and len(index) == 3 and not index.reload()


def test_a_part_deleted_after_the_manifest_was_read_is_read_from_the_new_manifest(tmp_path, tiny_model_dir,  # noqa: F811
                                                                                   split, monkeypatch):
    import runtime.search as search
    idx = tmp_path / "idx"
    build(idx, split[2], tiny_model_dir, device="cpu", threads=1)
    stale = indexdir.read_manifest(str(idx))
    build(idx, split[2][:3], device="cpu", threads=1, overwrite=True)
    calls = []

    def stale_first(index_dir, *args):  # as if the rebuild committed between reading and opening
        calls.append(index_dir)
        return stale if len(calls) == 1 else indexdir.read_manifest(index_dir, *args)
    monkeypatch.setattr(search, "read_manifest", stale_first)
    assert len(Index(idx, device="cpu", threads=1)) == 3 and len(calls) == 2


def test_a_part_file_is_hashed_once_per_process(tmp_path, tiny_model_dir, split, monkeypatch):  # noqa: F811
    build(tmp_path / "idx", split[2], tiny_model_dir, device="cpu", threads=1)
    import hashlib
    import types
    hashed = []

    def counting(*args):
        hashed.append(1)
        return hashlib.sha256(*args)
    monkeypatch.setattr(indexdir, "hashlib", types.SimpleNamespace(sha256=counting))
    index = Index(tmp_path / "idx", device="cpu", threads=1)
    assert len(hashed) == 2  # offsets.npy and ids.txt, read whole at once
    index.search(split[3][:1], top_k=1, shortlist=2)
    assert len(hashed) == len(indexdir.SUFFIXES)  # global.npy and embs.npy when a search first reads them
    again = Index(tmp_path / "idx", device="cpu", threads=1)
    again.search(split[3][:1], top_k=1, shortlist=2)
    assert not again.reload() and len(hashed) == len(indexdir.SUFFIXES)  # each part file once per process


def test_the_next_writer_removes_what_killed_writers_left(image_index, tmp_path, split):
    copy = copy_of(image_index, tmp_path, "idx")
    strays = [copy / ".manifest.json.k1l2e3d4.tmp", copy / "part-0123456789ab.embs.npy",
              copy / "part-0123456789ab.ids.txt", copy / "faiss-0123456789ab.index"]
    for path in strays:
        path.write_bytes(b"left by a killed writer")
    old_protocol = tmp_path / ".idx.a1b2c3d4.tmp"  # a new build's temporary folder, before this protocol
    old_protocol.mkdir()
    (old_protocol / "part-0123456789ab.embs.npy").write_bytes(b"x")
    build(copy, split[2][:1], append=True, ids=["one"], device="cpu", threads=1)
    assert not any(p.exists() for p in strays + [old_protocol])
    assert len(Index(copy, device="cpu", threads=1)) == N_TEST_IMAGES + 1


def test_a_full_disk_during_an_append_leaves_no_part_file(image_index, tmp_path, split, capsys, monkeypatch):
    import errno
    copy = copy_of(image_index, tmp_path)
    before = index_files(copy)

    class FullDisk:  # buffered bytes that cannot be written: the write fails, and closing fails again
        def __init__(self, file):
            self.file, self.writes = file, 0

        def write(self, data):
            self.writes += 1
            if self.writes > 1:  # the header went through
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

        def close(self):
            self.file.close()
            raise OSError(errno.ENOSPC, "No space left on device")

    real_init = indexdir._HashedFile.__init__

    def init(self, path, *args):
        real_init(self, path, *args)
        if path.endswith("global.npy"):
            self.file = FullDisk(self.file)
    monkeypatch.setattr(indexdir._HashedFile, "__init__", init)
    np.save(tmp_path / "more.npy", split[2][:2])
    code, out, err = run_cli(index_main, [tmp_path / "more.npy", "--out", copy, "--append", "--quiet",
                                          "--device", "cpu"], capsys)
    assert_error_line(code, out, err, ["no space left on the device"])
    assert index_files(copy) == before


def test_a_search_checks_the_sha256_of_the_blocks_it_reads(tmp_path, tiny_model_dir, split, monkeypatch):  # noqa: F811
    monkeypatch.setattr(indexdir, "BLOCK_BYTES", 4096)  # several blocks in a tiny part
    idx = tmp_path / "idx"
    build(idx, split[2], tiny_model_dir, device="cpu", threads=1)
    entry = indexdir.read_manifest(str(idx))["parts"][0]["files"]["embs.npy"]
    assert entry["block_bytes"] == 4096 and len(entry["blocks"]) == -(-entry["size"] // 4096) > 2
    path = idx / f"{indexdir.read_manifest(str(idx))['parts'][0]['name']}.embs.npy"
    data = bytearray(path.read_bytes())
    data[-8:] = np.float32([1.5, 2.5]).tobytes()  # the last item's last values: the last block
    path.write_bytes(bytes(data))
    index = Index(idx, device="cpu", threads=1)
    assert index.gather(np.array([0]))[0].shape[0] == 1  # the first item's blocks are intact
    with pytest.raises(indexdir.IndexDirError, match=r"embs\.npy: block \d+'s SHA-256"):
        index.gather(np.array([N_TEST_IMAGES - 1]))

def test_file_digests_are_the_same_whatever_pieces_the_bytes_come_in(tmp_path, monkeypatch):
    monkeypatch.setattr(indexdir, "BLOCK_BYTES", 8)
    data = bytes(range(30))  # 3 whole blocks and a shorter last one
    want = {"size": 30, "sha256": hashlib.sha256(data).hexdigest(), "block_bytes": 8,
            "blocks": [hashlib.sha256(data[i:i + 8]).hexdigest() for i in (0, 8, 16, 24)]}
    for pieces in ([30], [1] * 30, [3, 5, 8, 9, 5], [8, 8, 8, 6]):
        digests, at = indexdir.Digests(blocks=True), 0
        for n in pieces:
            digests.update(data[at:at + n])
            at += n
        assert digests.entry() == want
    (tmp_path / "f").write_bytes(data)
    assert indexdir.hash_file(str(tmp_path / "f"), blocks=True) == want
    assert indexdir.hash_file(str(tmp_path / "f")) == {"size": 30, "sha256": want["sha256"]}


def test_a_search_of_an_index_being_built_says_so(tmp_path, split, capsys):
    with indexdir.writer_lock(str(tmp_path / "new")):  # a new build holds the lock, no manifest yet
        code, out, err = run_cli(search_main, [tmp_path / "new", split[1], "--quiet"], capsys)
    assert_error_line(code, out, err, ["manifest.json: missing; the index is being built, or its build was "
                                       "interrupted"])

@pytest.mark.parametrize("case", ["part_listed_twice", "embs_swapped", "embs_symlink_out", "manifest_fifo",
                                  "ids_fifo", "embs_fifo", "ids_dev_zero", "manifest_dev_zero", "manifest_too_big",
                                  "ids_longer", "not_npy", "huge_header", "nan_global", "pickle_npy", "format_1"])
def test_a_tampered_index_is_one_error_line(case, tmp_path, tiny_model_dir, split, capsys):  # noqa: F811
    import signal
    idx = tmp_path / "idx"
    build(idx, split[2][:3], tiny_model_dir, device="cpu", threads=1, ids=["a0", "a1", "a2"])
    build(idx, split[2][3:], append=True, device="cpu", threads=1, ids=["b0", "b1", "b2"])
    m = json.loads((idx / "manifest.json").read_text())
    first, second = (idx / p["name"] for p in m["parts"])

    def file(part, suffix):
        return idx / f"{part.name}.{suffix}"
    if case == "part_listed_twice":
        edit_manifest(idx, lambda m: (m["parts"].append(m["parts"][0]), m.update(n_items=9)))
    elif case == "embs_swapped":  # two parts of one shape: every file's size fits
        a, b = file(first, "embs.npy"), file(second, "embs.npy")
        a.rename(tmp_path / "swap")
        b.rename(a)
        (tmp_path / "swap").rename(b)
    elif case == "embs_symlink_out":
        (tmp_path / "outside.npy").write_bytes(file(first, "embs.npy").read_bytes())
        file(first, "embs.npy").unlink()
        file(first, "embs.npy").symlink_to(tmp_path / "outside.npy")
    elif case.endswith("_fifo"):
        path = idx / "manifest.json" if case == "manifest_fifo" else file(first, {"ids_fifo": "ids.txt",
                                                                                    "embs_fifo": "embs.npy"}[case])
        path.unlink()
        os.mkfifo(path)
    elif case.endswith("_dev_zero"):
        path = idx / "manifest.json" if case == "manifest_dev_zero" else file(first, "ids.txt")
        path.unlink()
        path.symlink_to("/dev/zero")
    elif case == "manifest_too_big":
        with open(idx / "manifest.json", "r+b") as f:
            f.truncate(indexdir.MAX_MANIFEST_BYTES + 1)
    elif case == "ids_longer":
        with open(file(first, "ids.txt"), "ab") as f:
            f.write(b'"one more"\n')
    elif case == "not_npy":
        path = file(first, "global.npy")
        path.write_bytes(b"x" * path.stat().st_size)
    elif case == "huge_header":
        path = file(first, "global.npy")
        data = path.read_bytes()
        header_end = data.index(b"\n") + 1
        header = data[:header_end].decode("latin1")
        claimed = header.replace("(3,", "(100000000000,", 1)
        claimed = claimed.replace(" " * 11 + "\n", "\n", 1)  # the same header length
        assert len(claimed) == len(header)
        path.write_bytes(claimed.encode("latin1") + data[header_end:])
        record(idx, 0, "global.npy")
    elif case == "nan_global":
        path = file(first, "global.npy")
        data = bytearray(path.read_bytes())
        data[-4:] = np.float32(np.nan).tobytes()
        path.write_bytes(bytes(data))
        record(idx, 0, "global.npy")  # the hash fits: the floats are checked too
    elif case == "pickle_npy":
        path = file(first, "offsets.npy")
        path.unlink()
        np.save(path, np.array([0, 1, 2, 3], dtype=object), allow_pickle=True)
        record(idx, 0, "offsets.npy")
    elif case == "format_1":
        edit_manifest(idx, lambda m: (m.update(format_version=1), [p.pop("files") for p in m["parts"]]))
    words = {"part_listed_twice": ["manifest.json", "listed 2 times"],
             "embs_swapped": ["embs.npy", "SHA-256"], "embs_symlink_out": ["embs.npy", "symbolic link"],
             "manifest_fifo": ["manifest.json", "not a regular file"], "ids_fifo": ["ids.txt", "not a regular file"],
             "embs_fifo": ["embs.npy", "not a regular file"], "ids_dev_zero": ["ids.txt", "symbolic link"],
             "manifest_dev_zero": ["manifest.json", "symbolic link"],
             "manifest_too_big": ["manifest.json", "more than"], "ids_longer": ["ids.txt", "the manifest says"],
             "not_npy": ["global.npy", "not a .npy file"],
             "huge_header": ["global.npy", "corrupt .npy header: claims 100000000000 rows"],
             "nan_global": ["global.npy", "NaN"], "pickle_npy": ["offsets.npy", "Python objects"],
             "format_1": ["format version 1", "python -m runtime.index --upgrade"]}[case]
    queries = tmp_path / "q.txt"
    queries.write_text(split[3][0] + "\n")
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("hung"))
    signal.alarm(60)
    try:
        for main, args in ((search_main, [idx, queries, "--quiet", "--device", "cpu"]),
                           (index_main, ["--verify", idx])):
            code, out, err = run_cli(main, args, capsys)
            assert_error_line(code, out, err, words)
    finally:
        signal.alarm(0)


def test_verify_and_upgrade(image_index, tmp_path, capsys):
    copy = copy_of(image_index, tmp_path)
    code, out, err = run_cli(index_main, ["--verify", copy], capsys)
    assert code == 0 and err == "" and out == (f"{copy}: {N_TEST_IMAGES} images in 1 part(s), 4 files: sizes and "
                                               f"SHA-256 as the manifest records, headers, shapes, offsets and ids "
                                               f"consistent, floats finite\n")
    now = json.loads((copy / "manifest.json").read_text())
    edit_manifest(copy, lambda m: (m.update(format_version=1), [p.pop("files") for p in m["parts"]]))
    code, out, err = run_cli(index_main, ["--upgrade", copy], capsys)
    assert code == 0 and out.startswith(f"{copy}: format 2") and err == ""
    assert json.loads((copy / "manifest.json").read_text()) == now
    assert run_cli(index_main, ["--verify", copy], capsys)[0] == 0


# --------------------------------------------------------------------------- two-stage evaluation (torch side)
def test_shortlist_of_the_whole_split_equals_exhaustive(tiny_checkpoint, tiny_data):  # noqa: F811
    from imram_min.engineering.checkpoint import load_model
    from imram_min.data import PrecompDataset
    from imram_min.evaluate import encode_split, evaluate_split
    from imram_min.search.shortlist import evaluate_shortlists, parse_shortlists
    model, vocab, _ = load_model(tiny_checkpoint)
    dataset = PrecompDataset(tiny_data, "test", vocab)
    exhaustive = evaluate_split(model, dataset)
    embs = encode_split(model, dataset)
    result = evaluate_shortlists(model, *embs, dataset.caps_per_image, parse_shortlists("100%,1", 6, 30))
    whole, one = result["shortlists"]
    assert whole["i2t"] == exhaustive["i2t"] and whole["t2i"] == exhaustive["t2i"]
    assert whole["hit_i2t"] == whole["hit_t2i"] == 100.0
    assert one["i2t"][:3] == result["first_stage"]["i2t"][:3]  # K = 1: the first stage's top 1 decides R@1
    assert one["t2i"][0] == result["first_stage"]["t2i"][0]
