"""The bad-input specification of the runtime (``python -m runtime.score`` and ``runtime.Scorer``).

No bad input crashes a command, corrupts a file or exhausts the machine. Every case below is a
user mistake or a hostile input; its outcome is one line ``error: ...`` on stderr naming the file
or flag and what was expected, exit status 2, no traceback, nothing on stdout, and no file
appeared or changed (the output, its temporary file, every input, the model folder). The checks
happen before any long work. The training-side commands have the same specification in
tests/test_bad_inputs.py.

CASES is the table: one row per case, its name saying the input and its value the words the
error line must contain; BAD_IMAGES and BAD_CAPTIONS (files that are not what they should be) and
the model folder cases at the end are tables of the same kind. Then the same limits through the Python API (``runtime.Scorer``), the
printing of user text (escaped, or exact JSON) and what only a real process shows (SIGTERM, a
file-size limit standing in for a full disk).
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from fixtures import (IMG_DIM, ROOT, assert_one_error_line, run_cli, tiny_checkpoint, tiny_data,  # noqa: F401
                      tiny_model_dir)
from runtime.images import MAX_PIXELS
from runtime.inputs import MAX_FEATURE, MAX_WORDS
from runtime.score import main
from runtime.engine import MAX_IMAGE_BATCH, MAX_SHARD, MAX_THREADS
from runtime.inputs import InputError
from runtime.scorer import Scorer

OUT = "sims.npy"  # the --output of every case, in the case's folder: it must never appear


# --------------------------------------------------------------------------- inputs
def feats(n=3, scale=1.0, dtype=np.float32) -> np.ndarray:
    return (np.random.default_rng(0).standard_normal((n, 4, IMG_DIM)) * scale).astype(dtype)


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height RGB pixels, with (almost) no pixel data: ~70 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@dataclass
class Ctx:
    """One case's folder: feats.npy, caps.txt and model/ (a copy of the tiny model) to misuse."""
    dir: Path
    monkeypatch: pytest.MonkeyPatch
    feats: Path = field(init=False)
    caps: Path = field(init=False)
    model: Path = field(init=False)

    def write(self, name: str, data: bytes | str) -> Path:
        path = self.dir / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def npy(self, name: str, array: np.ndarray) -> Path:
        np.save(self.dir / name, array)
        return self.dir / name

    def edit_manifest(self, edit: Callable[[dict], object]) -> Path:
        path = self.model / "manifest.json"
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))
        return self.model


def argv(ctx: Ctx, images=None, captions=None, *flags, output=OUT, model=None) -> list:
    """The command line of a case: IMAGES CAPTIONS --model MODEL --output OUTPUT FLAGS."""
    out = [] if output is None else ["--output", ctx.dir / output if isinstance(output, str) else output]
    return [images or ctx.feats, captions or ctx.caps, "--model", model or ctx.model, *out, *flags]


def set_key(path: str, value):
    """An edit of the manifest: set the value at a dotted path ("model_config.n_steps")."""
    def edit(manifest):
        *parents, last = path.split(".")
        node = manifest
        for key in parents:
            node = node[key]
        node[last] = value
    return edit


def nan_scores(ctx: Ctx):
    """A matcher that returns NaN (as overflowing arithmetic would): scores must never be kept."""
    ctx.monkeypatch.setattr(Scorer, "match", lambda self, r, w, lens, *a: np.full((len(r), len(lens)), np.nan, np.float32))
    return argv(ctx, None, None, "--quiet")  # found while scoring: after the device line otherwise


def disk_full(ctx: Ctx):
    def fallocate(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    ctx.monkeypatch.setattr(os, "posix_fallocate", fallocate)
    return argv(ctx)


def hard_link(ctx: Ctx, src: Path, name: str) -> Path:
    os.link(src, ctx.dir / name)
    return ctx.dir / name


def symlink(ctx: Ctx, src: Path, name: str) -> Path:
    os.symlink(src, ctx.dir / name)
    return ctx.dir / name


# --------------------------------------------------------------------------- the specification
CASES = {  # name: (argv(ctx) after making the bad input, words the error line must contain)
    # the output never aliases an input
    "output_is_the_features": (lambda c: argv(c, output=c.feats), ["--output", "is the input", "feats.npy"]),
    "output_is_the_captions": (lambda c: argv(c, output=c.caps), ["is the input", "caps.txt"]),
    "output_is_a_hard_link_to_the_features": (lambda c: argv(c, output=hard_link(c, c.feats, "h.npy")),
                                              ["h.npy", "is the input", "feats.npy"]),
    "output_is_a_symlink_to_the_captions": (lambda c: argv(c, output=symlink(c, c.caps, "s.npy")),
                                            ["s.npy", "is the input", "caps.txt"]),
    "output_is_a_model_file": (lambda c: argv(c, output=c.model / "matcher.onnx"), ["is the input", "matcher.onnx"]),
    # captions: at most MAX_WORDS words (tokens) a line
    "caption_of_100000_words": (lambda c: argv(c, captions=c.write("long.txt", "w1 w2\n" + "w3 " * 100_000 + "\n")),
                                ["long.txt", "line 2", "100000 words", f"at most {MAX_WORDS}"]),
    "caption_of_one_word_too_many": (lambda c: argv(c, captions=c.write("long.txt", "w1 " * (MAX_WORDS + 1))),
                                     ["line 1", f"{MAX_WORDS + 1} words"]),
    "caption_over_max_words_in_tokens": (  # 200 words, 400 tokens: found by the scorer's tokenisation
        lambda c: argv(c, captions=c.write("long.txt", "w1\n" + "w2, " * 200 + "\n")),
        ["long.txt", "line 2", "400 words (tokens)", f"at most {MAX_WORDS}"]),
    # pictures: at most MAX_PIXELS, refused from the header before anything is decoded
    "picture_declaring_12000x12000_pixels": (lambda c: argv(c, images=c.write("bomb.png", png_declaring(12000, 12000))),
                                             ["bomb.png", "12000 x 12000 pixels", "MAX_PIXELS"]),
    "picture_one_row_over_max_pixels": (
        lambda c: argv(c, images=c.write("big.png", png_declaring(10_000, MAX_PIXELS // 10_000 + 1))),
        ["big.png", "MAX_PIXELS"]),
    "folder_with_one_picture_over_max_pixels": (
        lambda c: argv(c, images=(c.dir / "pics").mkdir() or (c.write("pics/a.png", png_declaring(9000, 9000))
                                                                .parent)), ["a.png", "9000 x 9000"]),
    # features whose arithmetic overflows float32
    "features_of_3e38": (lambda c: argv(c, images=c.npy("big.npy", np.full((3, 4, IMG_DIM), 3e38, np.float32))),
                         ["big.npy", "image 0", "magnitude", "overflow"]),
    "features_just_over_max_feature": (lambda c: argv(c, images=c.npy("big.npy", np.where(
        np.arange(3)[:, None, None] == 2, MAX_FEATURE * 2, feats()).astype(np.float32))), ["image 2", "magnitude"]),
    "float64_features_overflowing_float32": (lambda c: argv(c, images=c.npy("f64.npy", feats(dtype=np.float64) * 1e300)),
                                             ["f64.npy", "NaN or Inf", "as float32"]),
    "scores_that_come_out_nan": (nan_scores, ["score of image 0", "nan", "no scores were kept"]),
    # the model folder: every manifest field the runtime reads is checked (type and range)
    "manifest_img_dim_edited": (lambda c: argv(c, model=c.edit_manifest(set_key("model_config.img_dim", IMG_DIM + 1))),
                                ["manifest.json", "img_dim", "image_encoder.onnx"]),
    "manifest_embed_size_edited": (lambda c: argv(c, model=c.edit_manifest(set_key("model_config.embed_size", 7))),
                                   ["manifest.json", "embed_size"]),
    "manifest_n_steps_a_string": (lambda c: argv(c, model=c.edit_manifest(set_key("model_config.n_steps", "3"))),
                                  ["manifest.json", "model_config.n_steps", "'3'"]),
    "manifest_n_steps_zero": (lambda c: argv(c, model=c.edit_manifest(set_key("model_config.n_steps", 0))),
                              ["model_config.n_steps", "integer"]),
    "manifest_vocab_size_true": (lambda c: argv(c, model=c.edit_manifest(set_key("model_config.vocab_size", True))),
                                 ["model_config.vocab_size"]),
    "manifest_mode_unknown": (lambda c: argv(c, model=c.edit_manifest(set_key("model_config.mode", "both"))),
                              ["model_config.mode", "'both'"]),
    "manifest_files_null": (lambda c: argv(c, model=c.edit_manifest(set_key("files", None))), ["manifest.json", "files"]),
    "manifest_sha256_not_hex": (lambda c: argv(c, model=c.edit_manifest(
        lambda m: m["files"].__setitem__("matcher.onnx", {"sha256": 5}))),
                                ["files.matcher.onnx.sha256"]),
    "manifest_graphs_a_list": (lambda c: argv(c, model=c.edit_manifest(set_key("graphs", []))), ["graphs"]),
    "manifest_matcher_file_null": (lambda c: argv(c, model=c.edit_manifest(set_key("graphs.matcher.file", None))),
                                   ["graphs.matcher.file"]),
    "manifest_input_shape_edited": (lambda c: argv(c, model=c.edit_manifest(
        lambda m: m["graphs"]["text_encoder"]["outputs"][0]["shape"].__setitem__(2, 5))), ["text_encoder.onnx", "shape"]),
    "manifest_format_version_a_string": (lambda c: argv(c, model=c.edit_manifest(set_key("format_version", "2"))),
                                         ["format version '2'"]),
    "manifest_a_json_list": (lambda c: argv(c, model=c.write("model/manifest.json", "[1, 2]").parent),
                             ["manifest.json", "not an imram-min-onnx manifest"]),
    "manifest_nested_100000_deep": (lambda c: argv(c, model=c.write("model/manifest.json", "[" * 100_000).parent),
                                    ["manifest.json", "cannot read"]),
    # flags out of range
    "threads_100000": (lambda c: argv(c, None, None, "--threads", "100000"), ["--threads", f"1..{MAX_THREADS}"]),
    "threads_0": (lambda c: argv(c, None, None, "--threads", "0"), ["--threads", "got 0"]),
    "shard_100000": (lambda c: argv(c, None, None, "--shard", "100000"), ["--shard", f"1..{MAX_SHARD}"]),
    "image_batch_100000": (lambda c: argv(c, None, None, "--image-batch", "100000"),
                           ["--image-batch", f"1..{MAX_IMAGE_BATCH}"]),
    "top_k_negative": (lambda c: argv(c, None, None, "--top-k", "-1"), ["--top-k"]),
    # --output: never replaces a file without --overwrite (refused before scoring)
    "output_exists_without_overwrite": (lambda c: argv(c, output=c.write("old.npy", "old")),
                                        ["--output", "old.npy", "already exists", "--overwrite"]),
    # --html: never replaces a file without --overwrite, never an input, never the --output
    "html_exists_without_overwrite": (lambda c: argv(c, None, None, "--html", c.write("page.html", "old")),
                                      ["--html", "page.html", "already exists", "--overwrite"]),
    "html_is_a_folder": (lambda c: argv(c, None, None, "--html", (c.dir / "pages").mkdir() or c.dir / "pages"),
                         ["--html", "is a folder"]),
    "html_in_a_missing_folder": (lambda c: argv(c, None, None, "--html", c.dir / "no" / "page.html"),
                                 ["--html", "does not exist"]),
    "html_is_the_captions": (lambda c: argv(c, None, None, "--html", c.caps, "--overwrite"),
                             ["--html", "is the input", "caps.txt"]),
    "html_is_the_output": (lambda c: argv(c, None, None, "--html", c.dir / OUT), ["--output and --html", "same file"]),
    "html_with_top_k_0": (lambda c: argv(c, None, None, "--html", c.dir / "page.html", "--top-k", "0"),
                          ["--html", "--top-k"]),
    # captions from standard input
    "captions_from_empty_stdin": (lambda c: c.monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
                                  or argv(c, None, "-"), ["standard input", "no captions", "empty"]),
    # the disk
    "disk_full_for_the_output": (disk_full, ["--output", "no space left", "nothing was written"]),
}


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (links not followed): its bytes' SHA-256, or where a link points."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            if path.is_symlink():
                out[path] = "-> " + os.readlink(path)
            elif path.is_file():
                out[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def ctx(tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    c = Ctx(tmp_path / "case", monkeypatch)
    c.dir.mkdir()
    c.feats = c.npy("feats.npy", feats())
    c.caps = c.write("caps.txt", "w1 w2 w3\nw4 w5\n")
    c.model = Path(shutil.copytree(tiny_model_dir, c.dir / "model"))
    return c


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line_and_changes_no_file(case, ctx, capsys):
    make, words = CASES[case]
    args = make(ctx)
    before = snapshot(ctx.dir)
    code, stdout, err = run_cli(main, args, capsys)
    assert_one_error_line(code, stdout, err, ctx.dir / OUT, words)  # no output, no temporaries
    assert snapshot(ctx.dir) == before  # no input changed, no file appeared


def test_an_existing_output_is_replaced_with_overwrite(ctx, capsys):
    old = ctx.write("old.npy", "old")
    code, _, err = run_cli(main, argv(ctx, None, None, "--overwrite", "--quiet", "--top-k", "0", output=old), capsys)
    assert code == 0 and "error" not in err
    assert np.load(old).shape == (3, 2)  # the 3 images x 2 captions, where the old bytes were
    assert sorted(p.name for p in ctx.dir.iterdir()) == ["caps.txt", "feats.npy", "model", "old.npy"]  # no temporary


# --------------------------------------------------------------------------- the same limits in the Python API
def test_scorer_refuses_an_over_long_caption_naming_it(tiny_model_dir):  # noqa: F811
    scorer = Scorer(tiny_model_dir, device="cpu", threads=1)
    with pytest.raises(InputError, match=r"captions: caption 1 \(line 2\) has more than 256 words"):
        scorer.score(feats(), ["w1", "w2 " * 100_000])
    with pytest.raises(InputError, match=r"caption 0 \(line 1\) has 300 words \(tokens\)"):
        scorer.encode_captions(["w1, " * 150])
    ok = scorer.score(feats(), ["w1 " * MAX_WORDS])  # the longest allowed caption is scored
    assert np.isfinite(ok).all()


def test_scorer_refuses_out_of_range_settings(tiny_model_dir):  # noqa: F811
    for kwargs in ({"threads": MAX_THREADS + 1}, {"threads": 0}, {"shard": MAX_SHARD + 1},
                   {"image_batch": MAX_IMAGE_BATCH + 1}, {"threads": 2.5}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            Scorer(tiny_model_dir, device="cpu", **kwargs)


def test_scorer_refuses_features_that_overflow(tiny_model_dir):  # noqa: F811
    with pytest.raises(InputError, match="magnitude"):
        Scorer(tiny_model_dir, device="cpu", threads=1).score(feats() * 3e37, ["w1"])


# --------------------------------------------------------------------------- printing user text
def test_control_characters_of_captions_are_printed_escaped(ctx, capsys):
    caption = "w1 \x1b[2J\x1b]0;owned\x07 w2 \x9b31m \r w3"
    ctx.write("caps.txt", caption + "\n")
    code, stdout, err = run_cli(main, argv(ctx, None, None, "--top-k", "1", "--quiet", output=None), capsys)
    assert code == 0 and len(err.splitlines()) == 1 and err.startswith("note: caption 0 ")  # its unknown words
    assert not any(ch in stdout + err for ch in "\x1b\x07\x9b\r")
    assert "\\x1b[2J" in stdout and "\\x9b" in stdout


def test_json_output_stays_exact_json_with_control_characters(ctx, capsys):
    caption = "w1 \x1b[31m w2 \x9b \u2028 w3"
    ctx.write("caps.txt", caption + "\n")
    code, stdout, _ = run_cli(main, argv(ctx, None, None, "--top-k", "1", "--json", "--quiet", output=None), capsys)
    assert code == 0 and not any(ch in stdout for ch in "\x1b\x9b\u2028")
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert rows[0]["top"][0]["text"] == caption and rows[-1]["text"] == caption


# --------------------------------------------------------------------------- real processes: signals, file size
def _score_process(ctx, *extra, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "runtime.score", *map(os.fspath, argv(ctx, *extra))], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_sigterm_while_scoring_removes_the_temporary_file(ctx):
    ctx.feats = ctx.npy("feats.npy", feats(3000))
    ctx.write("caps.txt", "".join(f"w{i % 30} w{i % 7} w{i % 11}\n" for i in range(3000)))
    proc = _score_process(ctx, None, None, "--quiet", "--top-k", "0", "--threads", "1")
    deadline = time.monotonic() + 60
    while not [p for p in os.listdir(ctx.dir) if p.endswith(".tmp")] and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.splitlines() == ["error: stopped by signal SIGTERM"] and stdout == ""
    assert sorted(os.listdir(ctx.dir)) == ["caps.txt", "feats.npy", "model"]


def test_output_over_the_file_size_limit_is_one_line_not_sigbus(ctx):
    """A file-size limit stands in for a full disk: the output's blocks are allocated up front."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    ctx.feats = ctx.npy("feats.npy", feats(40))
    ctx.write("caps.txt", "w1\n" * 100)  # 40 x 100 float32 scores: 16,000 bytes
    proc = _score_process(ctx, None, None, "--quiet", preexec_fn=limit)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: --output") and "no space left" in err
    assert sorted(os.listdir(ctx.dir)) == ["caps.txt", "feats.npy", "model"]


# --------------------------------------------------------------------------- files that are not what they should be
@pytest.fixture(scope="module")
def test_split(tiny_data):  # noqa: F811
    """(path of test_ims.npy, path of test_caps.txt) of the tiny data folder."""
    return tiny_data / "test_ims.npy", tiny_data / "test_caps.txt"


def _write_npy(path, array, allow_pickle=False):
    np.save(path, array, allow_pickle=allow_pickle)
    return path


def _write_bytes(path, data):
    path.write_bytes(data)
    return path


def _good_feats(n=3):
    return np.random.default_rng(0).standard_normal((n, 4, IMG_DIM)).astype(np.float32)


def _bad_feats(where, value):
    feats = _good_feats(5)
    feats[where] = value
    return feats


BAD_IMAGES = {  # name: (make(tmp_path) -> IMAGES path, words the message must contain)
    "missing": (lambda d: d / "nope.npy", ["no such file"]),
    "unreadable_folder": (lambda d: (d / "dir.npy").mkdir() or d / "dir.npy", ["folder"]),
    "not_numpy": (lambda d: _write_bytes(d / "x.npy", b"hello, not numpy"), ["not a .npy"]),
    "npz_archive": (lambda d: np.savez(d / "x.npz", a=_good_feats()) or d / "x.npz", [".npz"]),
    "pickled_objects": (lambda d: _write_npy(d / "o.npy", np.array([{"a": 1}, None], dtype=object), True),
                        ["pickled"]),
    "wrong_rank": (lambda d: _write_npy(d / "r.npy", _good_feats()[0]), ["expected shape", "2 dimensions"]),
    "wrong_feature_size": (lambda d: _write_npy(d / "s.npy", np.zeros((2, 4, IMG_DIM + 1), np.float32)),
                           [str(IMG_DIM + 1), f"expects {IMG_DIM}"]),
    "integer_dtype": (lambda d: _write_npy(d / "i.npy", np.zeros((2, 4, IMG_DIM), np.int32)), ["float", "int32"]),
    "nan": (lambda d: _write_npy(d / "n.npy", _bad_feats((3, 1, 2), np.nan)), ["image 3", "NaN"]),
    "inf": (lambda d: _write_npy(d / "f.npy", _bad_feats((1, 0, 0), -np.inf)), ["image 1", "Inf"]),
    "no_images": (lambda d: _write_npy(d / "e.npy", np.zeros((0, 4, IMG_DIM), np.float32)), ["no images"]),
}

BAD_CAPTIONS = {  # name: (bytes of CAPTIONS.txt or None for a missing file, words the message must contain)
    "missing": (None, ["no such file"]),
    "empty": (b"", ["empty"]),
    "not_utf8": (b"a red dog\na blue cat\nbad \xff\xfe byte\n", ["line 3", "UTF-8"]),
    "blank_lines": (b"a red dog\n\na blue cat\n   \nlast\n", ["blank lines 2, 4"]),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_images_file(case, tiny_model_dir, test_split, tmp_path, capsys):  # noqa: F811
    make, words = BAD_IMAGES[case]
    inputs = tmp_path / "in"
    inputs.mkdir()
    images = make(inputs)
    out = tmp_path / "sims.npy"
    code, stdout, err = run_cli(main, [images, test_split[1], "--model", tiny_model_dir, "--output", out], capsys)
    assert_one_error_line(code, stdout, err, out, words)


@pytest.mark.parametrize("case", list(BAD_CAPTIONS))
def test_bad_captions_file(case, tiny_model_dir, test_split, tmp_path, capsys):  # noqa: F811
    data, words = BAD_CAPTIONS[case]
    caps = tmp_path / "in" / "caps.txt"
    caps.parent.mkdir()
    if data is not None:
        caps.write_bytes(data)
    out = tmp_path / "sims.npy"
    code, stdout, err = run_cli(main, [test_split[0], caps, "--model", tiny_model_dir, "--output", out], capsys)
    assert_one_error_line(code, stdout, err, out, words)


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case", ["missing_file", "sha256_mismatch", "no_manifest", "no_folder"])
def test_bad_model_dir(case, tiny_model_dir, test_split, tmp_path, capsys):  # noqa: F811
    model = _copy_model(tiny_model_dir, tmp_path / "in" / "model")
    if case == "missing_file":
        os.remove(model / "matcher.onnx")
        words = ["matcher.onnx", "missing"]
    elif case == "sha256_mismatch":
        with open(model / "text_encoder.onnx", "ab") as f:
            f.write(b"\0")
        words = ["text_encoder.onnx", "SHA-256"]
    elif case == "no_manifest":
        os.remove(model / "manifest.json")
        words = ["manifest.json"]
    else:
        model = tmp_path / "in" / "elsewhere"
        words = ["no such model folder"]
    out = tmp_path / "sims.npy"
    code, stdout, err = run_cli(main, [test_split[0], test_split[1], "--model", model, "--output", out], capsys)
    assert_one_error_line(code, stdout, err, out, words)


@pytest.mark.parametrize("case", ["missing_folder", "is_a_folder"])
def test_unwritable_output_is_refused_before_scoring(case, tiny_model_dir, test_split, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "no" / "such" / "sims.npy" if case == "missing_folder" else tmp_path / "adir"
    if case == "is_a_folder":
        out.mkdir()
    code, stdout, err = run_cli(main, [test_split[0], test_split[1], "--model", tiny_model_dir, "--output", out], capsys)
    assert code == 2 and err.startswith("error: --output") and len(err.splitlines()) == 1
    assert stdout == "" and "device:" not in err  # refused before the model was even loaded
    assert not (tmp_path / "no").exists() and (case == "missing_folder" or os.listdir(out) == [])


def test_bad_input_in_a_real_process_is_one_line_exit_2(tiny_model_dir, test_split, tmp_path):  # noqa: F811
    images = _write_npy(tmp_path / "n.npy", _bad_feats((4, 2, 0), np.nan))
    out = tmp_path / "sims.npy"
    proc = subprocess.run([sys.executable, "-m", "runtime.score", images, test_split[1], "--model", tiny_model_dir,
                           "--output", out], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: {images}: image 4 has NaN or Inf features"]
    assert proc.stdout == "" and not out.exists()
