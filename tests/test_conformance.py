"""Conformance vectors (export/conformance.py) and their check (python -m runtime.check)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from fixtures import (alter_array, assert_error_line, optional_graphs_model_dir, rehash, run_cli,  # noqa: F401
                      tiny_checkpoint, tiny_data, tiny_model, tiny_model_dir)

from export import conformance
from runtime import check
from runtime.modeldir import sha256_file


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    """A copy of the tiny model folder that a test may alter."""
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def alter_document(model_dir, change):
    path = os.path.join(model_dir, "conformance.json")
    doc = read_json(path)
    change(doc)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    rehash(model_dir, "conformance.json")


# --------------------------------------------------------------------------- what export writes
def test_export_writes_vectors_listed_in_the_manifest(tiny_model_dir):
    manifest = read_json(tiny_model_dir / "manifest.json")
    for name in ("conformance.json", "conformance.bin"):
        assert manifest["files"][name]["sha256"] == sha256_file(tiny_model_dir / name)
    entry = manifest["conformance"]
    assert (entry["file"], entry["data"], entry["format_version"]) == ("conformance.json", "conformance.bin", 1)
    assert entry["verified"]["onnxruntime"] == ort.__version__ == manifest["versions"]["onnxruntime"]
    assert entry["verified"]["provider"] == "CPUExecutionProvider"
    assert set(entry["verified"]["max_abs_diff"]) == {"region_embs", "word_embs", "region_proj", "word_proj",
                                                      "sims", "pipeline"}


def test_vectors_hold_every_awkward_caption_and_at_least_1000_captions(tiny_model_dir):
    doc = read_json(tiny_model_dir / "conformance.json")
    captions = [c["caption"] for c in doc["captions"]]
    assert len(captions) >= 1000 and len(set(captions)) == len(captions)
    awkward = read_json(conformance.AWKWARD_FILE)
    assert awkward and set(awkward) <= set(captions)
    assert {c["source"] for c in doc["captions"]} == {"awkward", "synthetic", "emoji", "vocab", "fuzz"}
    vocab = read_json(tiny_model_dir / "vocab.json")["word2idx"]
    for c in doc["captions"]:  # ids are the tokens through the folder's vocabulary, between <start> and <end>
        assert c["ids"] == [1] + [vocab.get(t, 3) for t in c["tokens"]] + [2]


def test_stages_tolerances_and_array_shapes(tiny_model_dir):
    doc = read_json(tiny_model_dir / "conformance.json")
    assert [s["name"] for s in doc["stages"]] == ["tokens", "ids", "region_embs", "word_embs", "region_proj",
                                                  "word_proj", "sims", "pipeline"]
    shapes = {name: spec["shape"] for name, spec in doc["arrays"].items()}
    n_cap, n_word = shapes["tokens"]
    assert shapes["region_feats"] == [conformance.N_IMG, conformance.N_REGION, 24]
    assert shapes["word_embs"] == [n_cap, n_word, 32] and shapes["word_proj"] == [n_cap, n_word, 128]
    assert shapes["sims"] == [conformance.N_IMG, n_cap]
    assert shapes["pipeline_feats"] == [conformance.PIPELINE_IMG, conformance.PIPELINE_REGION, 24]
    assert shapes["pipeline_sims"] == [conformance.PIPELINE_IMG, len(doc["score_captions"])]
    _, arrays = check.load_vectors(os.fspath(tiny_model_dir), read_json(tiny_model_dir / "manifest.json"))
    for stage in doc["stages"][2:]:
        rel = conformance.REL_TOL[stage["name"]]
        scale = max(1.0, float(np.abs(arrays[stage["output"]]).max()))
        assert rel * scale <= stage["tolerance"] <= 1.1 * rel * scale
    assert sorted(arrays["lengths"].tolist()) == sorted(conformance.EMBEDDING_LENGTHS)


def test_captions_with_control_characters_are_exact_and_the_file_shows_none(tmp_path):
    doc = {"captions": [{"caption": "a\nb\r\x00\x1b[31m\u2028\x85\ufeff\U000e0001 é 👍", "tokens": [], "ids": []}]}
    text = conformance.dumps_document(doc)
    assert json.loads(text) == doc
    assert all(c.isprintable() or c in " \n" for c in text)
    assert len(text.splitlines()) == 5  # {, "captions":[, the caption, ], }: nothing else breaks a line


def test_vectors_are_reproducible(tiny_model_dir, tmp_path):
    """The tiny model (the checkpoint fixture's seed) written again gives byte-identical vectors."""
    from runtime.text import Vocabulary
    manifest = read_json(tiny_model_dir / "manifest.json")
    signatures = {g: {k: v for k, v in spec.items() if k != "file"} for g, spec in manifest["graphs"].items()}
    vocab = Vocabulary.load(tiny_model_dir / "vocab.json")
    if (tiny_model_dir / "tokenizer.json").exists():  # the folder's rules, as export writes them first
        shutil.copyfile(tiny_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    conformance.write_conformance(tiny_model(seed=1, vocab_size=len(vocab)), vocab, os.fspath(tmp_path), signatures)
    for name in ("conformance.json", "conformance.bin"):
        assert (tmp_path / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


@pytest.mark.parametrize("form, mode, n_steps", [("plain", "full", 2), ("fast", "mean", 1)])
def test_a_matcher_without_projections_has_no_projection_stages(tmp_path, form, mode, n_steps):
    from export.onnx_export import export_model
    from fixtures import tiny_vocab
    manifest = export_model(tiny_model(vocab_size=40, mode=mode, n_steps=n_steps), tiny_vocab(), tmp_path / "m",
                            matcher=form)  # verify=True: export ran runtime.check on the folder
    assert set(manifest["conformance"]["verified"]["max_abs_diff"]) == {"region_embs", "word_embs", "sims",
                                                                        "pipeline"}
    doc = read_json(tmp_path / "m" / "conformance.json")
    assert "region_proj" not in doc["arrays"] and [s["name"] for s in doc["stages"]] == [
        "tokens", "ids", "region_embs", "word_embs", "sims", "pipeline"]


def test_no_verify_still_writes_the_vectors_unverified(tmp_path):
    from export.onnx_export import export_model
    from fixtures import tiny_vocab
    manifest = export_model(tiny_model(vocab_size=40), tiny_vocab(), tmp_path / "m", verify=False)
    assert manifest["conformance"]["verified"] is None
    assert {"conformance.json", "conformance.bin"} <= set(manifest["files"])
    _, results = check.check_model_dir(os.fspath(tmp_path / "m"), "cpu")
    assert [r.ok for r in results] == [True] * 8


# --------------------------------------------------------------------------- python -m runtime.check
def test_check_passes_on_a_fresh_export(tiny_model_dir, capsys):
    code, out, err = run_cli(check.main, [tiny_model_dir, "--device", "cpu"], capsys)
    assert code == 0 and err == "", err
    lines = out.splitlines()
    labels = ["tokens", "ids", "region embeddings", "word embeddings", "region projections", "word projections",
              "scores", "pipeline scores"]
    assert [line[:check.LABEL_WIDTH].strip() for line in lines[:-1]] == labels
    assert all(line[check.LABEL_WIDTH:].startswith("ok ") for line in lines[:-1])
    assert "max |diff|" in lines[2] and "<=" in lines[2]
    assert lines[-1].startswith("ok: ") and ort.__version__ in lines[-1]


@pytest.mark.parametrize("array, labels", [
    ("sims", ["scores"]), ("pipeline_sims", ["pipeline scores"]),
    # an expected array that later stages are fed fails them too (the altered value is their input)
    ("region_embs", ["region embeddings", "region projections", "scores"]),
])
def test_a_changed_expected_value_fails_its_stage_with_exit_2(model_copy, capsys, array, labels):
    alter_array(model_copy, array, lambda a: a.__setitem__(1, a[1] + 1e-3))
    code, out, err = run_cli(check.main, [model_copy, "--device", "cpu"], capsys)
    assert code == 2
    failed = [line for line in out.splitlines() if line[check.LABEL_WIDTH:].startswith("FAIL")]
    assert [line[:check.LABEL_WIDTH].strip() for line in failed] == labels, out
    assert all("max |diff|" in line and " > " in line for line in failed)
    assert err.startswith(f"error: {len(labels)} of 8 stages failed ({', '.join(labels)})"), err
    assert len(err.splitlines()) == 1


def test_a_changed_token_fails_the_tokens_stage_naming_the_caption(model_copy, capsys):
    def change(doc):
        doc["captions"][5]["tokens"][0] = "xyz"
    alter_document(model_copy, change)
    code, out, err = run_cli(check.main, [model_copy, "--device", "cpu"], capsys)
    assert code == 2 and "tokens" in err
    line = next(line for line in out.splitlines() if line.startswith("tokens "))
    assert "FAIL" in line and "1/" in line and "caption 5" in line and '"xyz"' in line
    assert next(line for line in out.splitlines() if line.startswith("ids ")).split()[1] == "ok"


def test_a_runtime_that_computes_otherwise_fails(tiny_model_dir, monkeypatch):
    from runtime.scorer import Scorer
    monkeypatch.setattr(Scorer, "project", lambda self, side, embs: None if not self.projected else
                        self._run(f"{side}_projection", **{f"{side}_embs": self.float32(embs)}) * 1.01)
    _, results = check.check_model_dir(os.fspath(tiny_model_dir), "cpu")
    assert {r.name for r in results if not r.ok} == {"region_proj", "word_proj", "pipeline"}


# --------------------------------------------------------------------------- bad input: one error line, exit 2
def test_missing_folder(tmp_path, capsys):
    code, out, err = run_cli(check.main, [tmp_path / "nope"], capsys)
    assert_error_line(code, out, err, ["nope", "no such model folder"])


def test_folder_exported_before_the_vectors(model_copy, capsys):
    path = model_copy / "manifest.json"
    manifest = read_json(path)
    del manifest["conformance"], manifest["files"]["conformance.json"], manifest["files"]["conformance.bin"]
    path.write_text(json.dumps(manifest))
    code, out, err = run_cli(check.main, [model_copy], capsys)
    assert_error_line(code, out, err, ["no conformance vectors", "re-export", "python -m export"])


def test_vectors_changed_without_the_manifest(model_copy, capsys):
    with open(model_copy / "conformance.bin", "r+b") as f:
        f.write(b"\1")
    code, out, err = run_cli(check.main, [model_copy], capsys)
    assert_error_line(code, out, err, ["conformance.bin", "SHA-256"])


@pytest.mark.parametrize("change, words", [
    (lambda doc: doc.update(format_version=99), ["conformance.json", "format version 99"]),
    (lambda doc: doc["arrays"]["sims"].update(offset=10 ** 9), ["conformance.bin", "array sims ends at byte"]),
    (lambda doc: doc["stages"][2].update(tolerance=-1), ["conformance.json", "tolerance"]),
    (lambda doc: doc["captions"][0].update(ids="1 2"), ["conformance.json", "captions[0]"]),
])
def test_malformed_vectors(model_copy, capsys, change, words):
    alter_document(model_copy, change)
    code, out, err = run_cli(check.main, [model_copy], capsys)
    assert_error_line(code, out, err, words)


def test_bad_flag(tiny_model_dir, capsys):
    code, out, err = run_cli(check.main, [tiny_model_dir, "--device", "tpu"], capsys)
    assert_error_line(code, out, err, ["--device", "tpu"])


def test_vectors_the_runtime_cannot_run_fail_their_stages_without_a_traceback(model_copy, capsys):
    alter_array(model_copy, "lengths", lambda a: a.__setitem__(slice(None), 99))  # past n_word
    code, out, err = run_cli(check.main, [model_copy, "--device", "cpu"], capsys)
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    line = next(line for line in out.splitlines() if line.startswith("word embeddings "))
    assert "FAIL" in line and "the runtime raised" in line


def test_an_array_shape_larger_than_the_file_is_one_error_line(model_copy, capsys):
    alter_document(model_copy, lambda doc: doc["arrays"]["sims"].update(shape=[1 << 24] * 4))  # 2^96 values
    code, out, err = run_cli(check.main, [model_copy], capsys)
    assert_error_line(code, out, err, ["conformance.bin", "array sims ends at byte"])


# --------------------------------------------------------------------------- the optional graphs' stages
OPTIONAL_LABELS = ["tokens", "ids", "region embeddings", "word embeddings", "region projections", "word projections",
                   "image global head", "text global head", "scores", "pipeline scores", "picture features"]


@pytest.fixture
def optional_copy(optional_graphs_model_dir, tmp_path):
    """A copy of the folder with the global head and the feature extractor that a test may alter."""
    return shutil.copytree(optional_graphs_model_dir, tmp_path / "model")


def test_a_folder_with_the_global_head_and_the_feature_extractor_passes_runtime_check(optional_graphs_model_dir,
                                                                                      capsys):
    from fixtures import OPTIONAL_GRAPHS
    code, out, err = run_cli(check.main, [optional_graphs_model_dir, "--device", "cpu"], capsys)
    assert code == 0 and err == "", err
    lines = out.splitlines()
    assert [line[:check.LABEL_WIDTH].strip() for line in lines[:-1]] == OPTIONAL_LABELS
    assert all(line[check.LABEL_WIDTH:].startswith("ok    max |diff| ") for line in lines[2:-1]), out
    doc = read_json(optional_graphs_model_dir / "conformance.json")
    manifest = read_json(optional_graphs_model_dir / "manifest.json")
    assert doc["format_version"] == manifest["conformance"]["format_version"] == 2
    assert {"image_global", "text_global", "picture_feats"} <= set(manifest["conformance"]["verified"]["max_abs_diff"])
    stages = {s["name"]: s for s in doc["stages"]}
    assert stages["picture_feats"]["requires"] == "pictures" and "requires" not in stages["image_global"]
    assert (stages["image_global"]["graph"], stages["image_global"]["inputs"]) == ("image_global",
                                                                                   {"region_embs": "region_embs"})
    assert stages["text_global"]["inputs"] == {"word_embs": "word_embs", "lengths": "lengths"}
    shapes = {name: spec["shape"] for name, spec in doc["arrays"].items()}
    size, grid, g = OPTIONAL_GRAPHS["feature_size"], OPTIONAL_GRAPHS["grid"], OPTIONAL_GRAPHS["head_out"]
    assert shapes["images"] == [conformance.N_PICTURES, 3, size, size]
    assert shapes["picture_feats"] == [conformance.N_PICTURES, grid * grid, 1280]
    assert shapes["image_global"] == [conformance.N_IMG, g] and shapes["text_global"] == [shapes["tokens"][0], g]
    _, arrays = check.load_vectors(os.fspath(optional_graphs_model_dir), manifest)
    pixels = arrays["images"] * 128 + 127  # preprocessed uint8 pixels: (x - 127) / 128, exactly
    assert np.array_equal(pixels, np.round(pixels)) and pixels.min() >= 0 and pixels.max() <= 255


def test_a_folder_without_optional_graphs_stays_format_version_1(tiny_model_dir):
    doc = read_json(tiny_model_dir / "conformance.json")
    assert doc["format_version"] == 1 and conformance.document_version(doc["stages"]) == 1
    assert conformance.document_version(doc["stages"] + [{"kind": "graph", "graph": "image_global"}]) == 2


@pytest.mark.parametrize("array, label", [("image_global", "image global head"), ("text_global", "text global head"),
                                          ("picture_feats", "picture features")])
def test_a_changed_expected_value_of_an_optional_graph_fails_exactly_its_stage(optional_copy, capsys, array, label):
    alter_array(optional_copy, array, lambda a: a.__setitem__(1, a[1] + 1e-2))
    code, out, err = run_cli(check.main, [optional_copy, "--device", "cpu"], capsys)
    assert code == 2
    failed = [line for line in out.splitlines() if line[check.LABEL_WIDTH:].startswith("FAIL")]
    assert [line[:check.LABEL_WIDTH].strip() for line in failed] == [label], out
    assert "max |diff| 1.0e-02 > " in failed[0]
    assert err == f"error: 1 of {len(OPTIONAL_LABELS)} stages failed ({label}): this runtime does not compute what " \
                  f"{optional_copy} expects\n"


def test_adding_a_head_again_replaces_its_stages(optional_copy):
    from imram_min.search.global_head import GlobalHead
    before = read_json(optional_copy / "conformance.json")
    head = GlobalHead(32, 16, 8).eval()  # another random head: the folder's graphs no longer match the vectors
    manifest = conformance.add_global_head_vectors(os.fspath(optional_copy), head, verify=False)
    after = read_json(optional_copy / "conformance.json")
    assert [s["name"] for s in after["stages"]] == [s["name"] for s in before["stages"]]
    assert after["arrays"]["image_global"]["shape"] == before["arrays"]["image_global"]["shape"]
    assert manifest["files"]["conformance.bin"]["sha256"] == sha256_file(optional_copy / "conformance.bin")
    _, results = check.check_model_dir(os.fspath(optional_copy), "cpu")
    assert {r.name for r in results if not r.ok} == {"image_global", "text_global"}


def test_extract_features_refuses_pictures_of_another_size(optional_graphs_model_dir):
    from runtime.engine import Engine
    from runtime.inputs import InputError
    engine = Engine(optional_graphs_model_dir, device="cpu", threads=1)
    with pytest.raises(InputError, match=r"images: expected \(n, 3, 96, 96\), got \(1, 3, 32, 32\)"):
        engine.extract_features(np.zeros((1, 3, 32, 32), np.float32))


def test_export_with_a_global_head_writes_and_verifies_its_stages(tiny_checkpoint, tmp_path, capsys):  # noqa: F811
    from export.__main__ import main as export_main
    from imram_min.search.global_head import GlobalHead, save_head
    save_head(GlobalHead(32, 16, 8), tmp_path / "head.pt")
    code, out, err = run_cli(export_main, [tiny_checkpoint, "--out", tmp_path / "m", "--global-head",
                                           tmp_path / "head.pt"], capsys)
    assert code == 0 and "conformance vectors pass (10 stages" in out, out + err
    doc = read_json(tmp_path / "m" / "conformance.json")
    assert [s["name"] for s in doc["stages"]][6:8] == ["image_global", "text_global"] and doc["format_version"] == 2
    verified = read_json(tmp_path / "m" / "manifest.json")["conformance"]["verified"]["max_abs_diff"]
    assert verified["image_global"] <= 1e-6 and verified["text_global"] <= 1e-6
