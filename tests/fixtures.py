"""Shared test fixtures: tiny random models, a tiny synthetic data folder, its checkpoint and export.

Import the fixtures into a test module (``from fixtures import tiny_data, tiny_checkpoint,
tiny_model_dir  # noqa: F401``). They are session-scoped and cached in this module, so the data,
the checkpoint and the export are made once per test session whichever modules use them.
"""
from __future__ import annotations

import contextlib
import io
import os
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from imram_min.model import IMRAM, IMRAMConfig  # noqa: E402
from runtime.text import PAD, Vocabulary  # noqa: E402

IMG_DIM = 24  # region feature size of the tiny models and of the tiny data folder
TINY = dict(img_dim=IMG_DIM, word_dim=12, embed_size=32, n_steps=2)  # a small, fast IMRAMConfig
N_TEST_IMAGES = 6  # test split of the tiny data folder (5 captions each)
_CACHE: dict = {}


def _once(key: str, make):
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


# --------------------------------------------------------------------------- models and batches
def tiny_vocab(n_words: int = 36) -> Vocabulary:
    """The 4 specials + words w0, w1, ...: len == n_words + 4."""
    return Vocabulary(f"w{i}" for i in range(n_words))


def tiny_model(seed: int = 0, vocab_size: int = 40, **overrides) -> IMRAM:
    """A randomly initialised IMRAM (eval mode, CPU, float32) with the TINY config plus ``overrides``."""
    torch.manual_seed(seed)
    model = IMRAM(IMRAMConfig(vocab_size=vocab_size, **{**TINY, **overrides})).eval()
    with torch.no_grad():  # fresh biases are zero or tiny; random ones exercise the graphs better
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
    return model


def random_tokens(lengths, vocab_size: int, n_word: int | None = None, seed: int = 0):
    """tokens (n_cap, n_word) int64 with random word ids (no specials) inside each length and <pad>
    after it, lengths (n_cap,) int64. n_word defaults to max(lengths)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    n_word = int(lengths.max()) if n_word is None else n_word
    tokens = torch.randint(4, vocab_size, (len(lengths), n_word), generator=g)
    tokens[torch.arange(n_word)[None, :] >= lengths[:, None]] = PAD
    return tokens, lengths


def random_feats(n_img: int, n_region: int, img_dim: int = IMG_DIM, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_img, n_region, img_dim, generator=g)


def lengths_1_to_40(seed: int = 0) -> list[int]:
    """The 40 lengths 1..40 in a shuffled order (longest neither first nor last)."""
    order = np.random.default_rng(seed).permutation(np.arange(1, 41))
    return [int(x) for x in order]


# --------------------------------------------------------------------------- session fixtures
@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> pathlib.Path:
    """A synthetic data folder (imram_min.data): train 12 / dev 2 / test N_TEST_IMAGES images, img_dim IMG_DIM."""
    def make():
        from imram_min.data.synthetic import make_synthetic
        out = tmp_path_factory.mktemp("tiny_data")
        make_synthetic(out, seed=3, n_train=12, n_dev=2, n_test=N_TEST_IMAGES, img_dim=IMG_DIM)
        return out
    return _once("data", make)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_data, tmp_path_factory) -> pathlib.Path:
    """A project checkpoint (imram_min.engineering.checkpoint) of a random tiny model with the data folder's vocabulary."""
    def make():
        from imram_min.engineering.checkpoint import save_checkpoint
        from imram_min.data import load_vocab
        vocab = load_vocab(tiny_data)
        path = tmp_path_factory.mktemp("tiny_ckpt") / "best.pt"
        save_checkpoint(path, tiny_model(seed=1, vocab_size=len(vocab)), vocab, meta={"note": "random tiny model"})
        return path
    return _once("checkpoint", make)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_checkpoint, tmp_path_factory) -> pathlib.Path:
    """The tiny checkpoint exported by the CLI entry point (``python -m export CKPT --out DIR``, in-process)."""
    def make():
        from export.__main__ import main
        out = tmp_path_factory.mktemp("tiny_export") / "model"
        with contextlib.redirect_stdout(io.StringIO()):
            assert main([os.fspath(tiny_checkpoint), "--out", os.fspath(out)]) == 0
        return out
    return _once("model_dir", make)


OPTIONAL_GRAPHS = dict(feature_size=96, grid=2, head_hidden=16, head_out=8)  # optional_graphs_model_dir's


@pytest.fixture(scope="session")
def optional_graphs_model_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny model folder with every optional graph and its conformance stages: a random TINY model
    with img_dim 1280 exported with feature_extractor.onnx (the packaged EfficientNet-Lite0 weights,
    96 px, grid 2: adaptive pooling of a 3 x 3 map), then a random global head's image_global.onnx
    and text_global.onnx with their conformance stages (export.global_head.add_global_head, as python -m
    export adds them). Verified by runtime.check at export."""
    def make():
        from export.global_head import add_global_head
        from export.onnx_export import export_model
        from imram_min.data.features import EfficientNetLite0
        from imram_min.search.global_head import GlobalHead
        out = tmp_path_factory.mktemp("optional_graphs_export") / "model"
        export_model(tiny_model(seed=3, img_dim=1280), tiny_vocab(), out, feature_extractor=True,
                     feature_size=OPTIONAL_GRAPHS["feature_size"], grid=OPTIONAL_GRAPHS["grid"],
                     feature_network=EfficientNetLite0.pretrained())
        torch.manual_seed(3)
        head = GlobalHead(TINY["embed_size"], OPTIONAL_GRAPHS["head_hidden"], OPTIONAL_GRAPHS["head_out"]).eval()
        add_global_head(out, head)
        return out
    return _once("optional_graphs_model_dir", make)


@pytest.fixture(scope="module")
def split(tiny_data) -> tuple:
    """(test_ims.npy path, test_caps.txt path, features, captions) of the tiny data's test split."""
    import numpy as np
    ims, caps = tiny_data / "test_ims.npy", tiny_data / "test_caps.txt"
    return ims, caps, np.load(ims), caps.read_text().splitlines()


@pytest.fixture(scope="module")
def image_index(tmp_path_factory, tiny_model_dir, split) -> pathlib.Path:
    """An image index (runtime.index) of the tiny test split's features, made with the tiny model dir."""
    from runtime.index import build
    out = tmp_path_factory.mktemp("index") / "images"
    build(out, split[2], tiny_model_dir, device="cpu", threads=1)
    return out


# --------------------------------------------------------------------------- shared helpers
def run_cli(main, args, capsys):
    """A command's ``main`` in-process on ``args`` (paths allowed) -> (exit status, stdout, stderr)."""
    try:
        code = main([os.fspath(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_error_line(code, stdout, err, words):
    """A refused command: exit 2, nothing on stdout, one "error: " line on stderr naming ``words``."""
    assert code == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and stdout == "", (stdout, err)
    for word in words:
        assert word in err, (word, err)


def assert_one_error_line(code, stdout, err, out_path, words):
    """A refused command: exit 2, one "error: " line naming ``words``, no output file, no temporaries."""
    assert_error_line(code, stdout, err, words)
    assert not out_path.exists()
    assert [p for p in os.listdir(out_path.parent) if p.startswith(".")] == []  # no temporaries


def rehash(model_dir, name) -> None:
    """Put the SHA-256 of MODEL_DIR/name back into the manifest (as an edit made on purpose would)."""
    import json

    from runtime.modeldir import sha256_file
    path = os.path.join(model_dir, "manifest.json")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["files"][name]["sha256"] = sha256_file(os.path.join(model_dir, name))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f)


def alter_array(model_dir, name, change) -> None:
    """Apply ``change`` to array ``name`` of MODEL_DIR's conformance.bin in place and re-hash the file."""
    import json

    from runtime.check import DTYPES
    with open(os.path.join(model_dir, "conformance.json"), encoding="utf-8") as f:
        spec = json.load(f)["arrays"][name]
    path = os.path.join(model_dir, "conformance.bin")
    with open(path, "rb") as f:
        blob = bytearray(f.read())
    array = np.frombuffer(bytes(blob), DTYPES[spec["dtype"]], int(np.prod(spec["shape"])), spec["offset"]).copy()
    change(array)
    blob[spec["offset"]:spec["offset"] + array.nbytes] = array.tobytes()
    with open(path, "wb") as f:
        f.write(bytes(blob))
    rehash(model_dir, "conformance.bin")


def write_picture(path, size=(40, 30), mode="RGB", seed=0, **save_args):
    """A random picture of ``size`` (w, h) in ``mode``, saved with Pillow (format from the suffix)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path, **save_args)
    return path


def spawn_processes(worker, args: tuple, nprocs: int, seconds: float = 240.0) -> None:
    """torch.multiprocessing.start_processes(worker, args, nprocs, "spawn"), bounded in time: processes
    still running after ``seconds`` (a gloo hang) are killed and the test fails, instead of hanging the run."""
    import time
    import torch.multiprocessing as mp
    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, start_method="spawn", join=False)
    deadline = time.monotonic() + seconds
    while not ctx.join(timeout=1.0):  # raises if a process failed
        if time.monotonic() > deadline:
            for process in ctx.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{nprocs} processes of {worker.__name__} still running after {seconds:.0f} s: killed")
