"""The bad-input specification of the training-side commands.

    python -m imram_min.train | imram_min.evaluate | imram_min.engineering.convert | imram_min.data.features | export
              | imram_min.data.synthetic | imram_min.data synthetic / emoji

Every case below is a user error. Each must end with exit status 2, nothing on stdout, exactly
one line ``error: ...`` on stderr that names the file or flag and what was expected (no
traceback, never advice to load a checkpoint with weights_only=False), and must leave every
file of its workspace as it was: nothing written, replaced, removed or left behind (the
workspace's files, mtimes and hashes are compared before and after). All checks run before
any long work, so each case takes well under a second after the imports.

Run-folder policy (train): a run folder holds one run. --out must be new or empty, or the
folder of the --resume checkpoint, or --overwrite must be given; then the old run's files go
as a whole once every check has passed. Feature-file policy (features): --out and its order file
(images.txt, or {split}_images.txt for DIR/{split}_ims.npy) are not replaced without --overwrite;
features.json is shared by the feature files of a folder, and one of other settings is not
replaced without --overwrite.
"""
from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch

from fixtures import ROOT, assert_error_line, run_cli, tiny_checkpoint, tiny_data, write_picture  # noqa: F401

from export.__main__ import main as export_main
from imram_min import train
from imram_min.data import features, synthetic
from imram_min.engineering import convert
from imram_min.data.__main__ import main as data_main
from imram_min.evaluate.__main__ import main as evaluate_main
from runtime import atomic

CPU = ["--device", "cpu"]
_spec = importlib.util.spec_from_file_location("make_example_pictures", ROOT / "scripts" / "make_example_pictures.py")
make_example_pictures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_example_pictures)
TINY_TRAIN = ["--embed-size", "8", "--word-dim", "8", "--batch-size", "16", *CPU]
NO_CUDA = not torch.cuda.is_available()


# --------------------------------------------------------------------------- workspace
class Work:
    """A scratch folder with its own copy of the tiny data folder and checkpoint."""

    def __init__(self, root: pathlib.Path, data: pathlib.Path, ckpt: pathlib.Path):
        self.root = root
        self.data = root / "data"
        shutil.copytree(data, self.data)
        self.ckpt = root / "ckpt" / "best.pt"
        self.ckpt.parent.mkdir()
        shutil.copy(ckpt, self.ckpt)
        self.run = root / "run"

    def path(self, name: str) -> pathlib.Path:
        return self.root / name

    def write(self, name: str, content: str | bytes) -> pathlib.Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def truncated(self) -> pathlib.Path:
        data = self.ckpt.read_bytes()
        return self.write("trunc.pt", data[: len(data) // 2])

    def malicious(self, **extra) -> pathlib.Path:
        path = self.root / "evil.pt"
        torch.save({"model": {}, "payload": Payload(str(self.root / "payload-ran")), **extra}, path)
        return path

    def with_extra_keys(self) -> pathlib.Path:
        ckpt = torch.load(self.ckpt, weights_only=True)
        ckpt["model"]["extra.weight"] = torch.zeros(2)
        path = self.root / "extra.pt"
        torch.save(ckpt, path)
        return path

    def old_run(self) -> pathlib.Path:
        """A finished run's folder: config, log, checkpoints."""
        self.run.mkdir()
        shutil.copy(self.ckpt, self.run / "best.pt")
        shutil.copy(self.ckpt, self.run / "last.pt")
        (self.run / "config.json").write_text('{"model": {}, "train": {}}\n')
        (self.run / "log.jsonl").write_text('{"epoch": 1}\n')
        return self.run

    def captions(self, split: str, per_image: int) -> None:
        n_img = np.load(self.data / f"{split}_ims.npy", mmap_mode="r").shape[0]
        (self.data / f"{split}_caps.txt").write_text("".join("a caption\n" for _ in range(per_image * n_img)))

    def features(self, split: str, img_dim: int) -> None:
        n_img = np.load(self.data / f"{split}_ims.npy", mmap_mode="r").shape[0]
        np.save(self.data / f"{split}_ims.npy", np.zeros((n_img, 4, img_dim), np.float32))

    def vocab_without_unk(self) -> pathlib.Path:
        vocab = json.loads((self.data / "vocab.json").read_text())
        words = [w for w, _ in sorted(vocab["word2idx"].items(), key=lambda kv: kv[1]) if w != "<unk>"]
        vocab = {"word2idx": {w: i for i, w in enumerate(words)}, "idx2word": {str(i): w for i, w in enumerate(words)},
                 "idx": len(words)}
        (self.data / "vocab.json").write_text(json.dumps(vocab))
        return self.data / "vocab.json"

    def defaults(self, text: str) -> None:
        (self.data / "train_defaults.json").write_text(text)

    def picture(self, name: str = "pics/a.png") -> pathlib.Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_picture(path, size=(40, 30))


class Payload:
    """Pickled into a malicious checkpoint: unpickling it would create a file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def snapshot(root: pathlib.Path) -> dict:
    """{relative path: (mtime_ns, sha256)} of every file under root, hidden ones included."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = (os.stat(path).st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
            else:
                out[os.path.relpath(path, root)] = ("link" if os.path.islink(path) else "folder",)
    return out


# --------------------------------------------------------------------------- the cases
@dataclass
class Case:
    id: str
    main: Callable
    args: Callable[[Work], list]  # sets up the workspace, returns the command's arguments
    words: tuple[str, ...]  # each must appear in the error line
    skip: str | None = None


def t(w: Work, *more) -> list:
    return ["--data", w.data, "--out", w.run, *TINY_TRAIN, *more]


def ev(w: Work, *more, ckpt=None) -> list:
    return [ckpt or w.ckpt, "--data", w.data, *CPU, *more]


def setup(fn, result):
    """Run ``fn`` for its effect on the workspace, then give ``result``."""
    fn()
    return result


CASES = [
    # ---- train: data folder
    Case("train-missing-vocabulary", train.main,
         lambda w: setup(lambda: (w.data / "vocab.json").unlink(), t(w)), ("vocab",)),
    Case("train-vocabulary-without-unk", train.main,
         lambda w: setup(w.vocab_without_unk, t(w)), ("vocab.json", "<unk>")),
    Case("train-4-captions-per-image", train.main,
         lambda w: setup(lambda: w.captions("train", 4), t(w)), ("train_caps.txt", "5 or 1 captions per image")),
    Case("train-dev-feature-size-differs", train.main,
         lambda w: setup(lambda: w.features("dev", 7), t(w)), ("dev_ims.npy", "img_dim")),
    Case("train-dev-captions-missing", train.main,
         lambda w: setup(lambda: (w.data / "dev_caps.txt").unlink(), t(w)), ("dev_caps.txt",)),
    Case("train-data-folder-missing", train.main,
         lambda w: ["--data", w.path("nowhere"), "--out", w.run, *CPU], ("--data", "nowhere", "does not exist")),
    Case("train-no-data-no-out", train.main, lambda w: [*CPU], ("--data and --out are required",)),
    # ---- train: train_defaults.json
    Case("train-defaults-malformed-json", train.main,
         lambda w: setup(lambda: w.defaults("{not json"), t(w)), ("train_defaults.json", "not valid JSON")),
    Case("train-defaults-unknown-key", train.main,
         lambda w: setup(lambda: w.defaults('{"nosuch": 1}'), t(w)), ("train_defaults.json", "unknown", "nosuch")),
    Case("train-defaults-wrong-type", train.main,
         lambda w: setup(lambda: w.defaults('{"num_epochs": "4"}'), t(w)), ("train_defaults.json", "num_epochs", "int")),
    Case("train-defaults-not-an-object", train.main,
         lambda w: setup(lambda: w.defaults("[1, 2]"), t(w)), ("train_defaults.json", "JSON object")),
    Case("train-defaults-bad-mode", train.main,
         lambda w: setup(lambda: w.defaults('{"mode": "nosuch"}'), t(w)), ("train_defaults.json", "mode", "nosuch")),
    # ---- train: flags
    Case("train-batch-size-0", train.main, lambda w: t(w, "--batch-size", "0"), ("--batch-size", "got 0")),
    Case("train-workers-unbounded", train.main, lambda w: t(w, "--workers", "100000"), ("--workers", "100000")),
    Case("train-lr-update-0", train.main, lambda w: t(w, "--lr-update", "0"), ("--lr-update",)),
    Case("train-lr-nan", train.main, lambda w: t(w, "--lr", "nan"), ("--lr", "finite")),
    Case("train-seed-negative", train.main, lambda w: t(w, "--seed", "-1"), ("--seed",)),
    Case("train-max-dev-captions-not-whole-images", train.main, lambda w: t(w, "--max-dev-captions", "7"),
         ("--max-dev-captions", "multiple of 5")),
    Case("train-baseline-conflicts-with-mode", train.main, lambda w: t(w, "--baseline", "mean", "--mode", "full"),
         ("--baseline mean conflicts",)),
    Case("train-unknown-flag", train.main, lambda w: t(w, "--nosuch"), ("unrecognized arguments", "--nosuch")),
    Case("train-model-too-big-for-memory", train.main,
         lambda w: t(w, "--embed-size", "65536", "--word-dim", "65536", "--num-layers", "64"), ("GiB", "--embed-size")),
    Case("train-device-cuda-without-cuda", train.main, lambda w: t(w, "--device", "cuda"), ("--device", "CUDA"),
         skip=None if NO_CUDA else "this machine has CUDA"),
    Case("train-device-nosuch", train.main, lambda w: t(w, "--device", "nosuch"), ("--device", "nosuch")),
    # ---- train: run folder and resume
    Case("train-out-is-a-file", train.main,
         lambda w: ["--data", w.data, "--out", w.write("run", "x"), *TINY_TRAIN], ("--out", "is a file")),
    Case("train-out-holds-another-run", train.main,
         lambda w: setup(w.old_run, t(w)), ("--out", "not empty", "--overwrite")),
    Case("train-out-is-the-data-folder", train.main,
         lambda w: ["--data", w.data, "--out", w.data, *TINY_TRAIN, "--overwrite"], ("data folder",)),
    Case("train-resume-truncated-checkpoint", train.main,
         lambda w: ["--resume", w.truncated(), *CPU], ("trunc.pt", "truncated")),
    Case("train-resume-malicious-checkpoint", train.main,
         lambda w: ["--resume", w.malicious(), *CPU], ("evil.pt", "refused to load", "mkdir")),
    Case("train-resume-without-training-state", train.main,
         lambda w: ["--resume", w.ckpt, *CPU], ("best.pt", "no training state")),
    Case("train-resume-missing", train.main,
         lambda w: ["--resume", w.path("nosuch.pt"), *CPU], ("nosuch.pt", "no such checkpoint")),
    # ---- evaluate
    Case("evaluate-split-nosuch", evaluate_main, lambda w: ev(w, "--split", "nosuch"),
         ("--split nosuch", "splits there: dev, test, train")),
    Case("evaluate-json-is-a-folder", evaluate_main, lambda w: ev(w, "--json", w.data), ("--json", "folder")),
    Case("evaluate-json-folder-missing", evaluate_main, lambda w: ev(w, "--json", w.path("no/r.json")),
         ("--json", "does not exist")),
    Case("evaluate-json-is-the-checkpoint", evaluate_main, lambda w: ev(w, "--json", w.ckpt),
         ("--json", "refusing to overwrite an input")),
    Case("evaluate-sims-symlink-to-features", evaluate_main,
         lambda w: setup(lambda: os.symlink(w.data / "test_ims.npy", w.path("s.npy")), ev(w, "--save-sims", w.path("s.npy"))),
         ("--save-sims", "test_ims.npy", "is the input")),
    Case("evaluate-sims-hard-link-to-checkpoint", evaluate_main,
         lambda w: setup(lambda: os.link(w.ckpt, w.path("h.npy")), ev(w, "--save-sims", w.path("h.npy"))),
         ("--save-sims", "is the input")),
    Case("evaluate-json-exists", evaluate_main, lambda w: ev(w, "--json", w.write("r.json", "old")),
         ("--json", "r.json", "already exists: add --overwrite")),
    Case("evaluate-save-sims-exists", evaluate_main, lambda w: ev(w, "--save-sims", w.write("s.npy", "old")),
         ("--save-sims", "s.npy", "already exists: add --overwrite")),
    Case("evaluate-json-and-sims-same-file", evaluate_main,
         lambda w: ev(w, "--json", w.path("o"), "--save-sims", w.path("o")), ("--json and --save-sims", "same file")),
    Case("evaluate-truncated-checkpoint", evaluate_main, lambda w: ev(w, ckpt=w.truncated()),
         ("trunc.pt", "truncated")),
    Case("evaluate-malicious-checkpoint", evaluate_main, lambda w: ev(w, ckpt=w.malicious()),
         ("evil.pt", "refused to load", "mkdir", "not plain tensors/containers")),
    Case("evaluate-checkpoint-extra-state-keys", evaluate_main, lambda w: ev(w, ckpt=w.with_extra_keys()),
         ("extra.pt", "extra.weight")),
    Case("evaluate-checkpoint-missing", evaluate_main, lambda w: ev(w, ckpt=w.path("nosuch.pt")),
         ("nosuch.pt", "no such checkpoint")),
    Case("evaluate-random-file-as-checkpoint", evaluate_main, lambda w: ev(w, ckpt=w.write("r.pt", os.urandom(256))),
         ("r.pt", "cannot load")),
    Case("evaluate-4-captions-per-image", evaluate_main,
         lambda w: setup(lambda: w.captions("test", 4), ev(w)), ("test_caps.txt", "5 or 1 captions per image")),
    Case("evaluate-feature-size-differs-from-model", evaluate_main,
         lambda w: setup(lambda: w.features("test", 7), ev(w)), ("test_ims.npy", "img_dim")),
    Case("evaluate-fold5-not-5-equal-folds", evaluate_main, lambda w: ev(w, "--fold5"), ("--fold5", "5 equal folds")),
    Case("evaluate-batch-size-0", evaluate_main, lambda w: ev(w, "--batch-size", "0"), ("--batch-size",)),
    Case("evaluate-max-captions-not-whole-images", evaluate_main, lambda w: ev(w, "--max-captions", "3"),
         ("--max-captions", "multiple of 5")),
    Case("evaluate-device-cuda-without-cuda", evaluate_main, lambda w: ev(w, "--device", "cuda"),
         ("--device", "CUDA"), skip=None if NO_CUDA else "this machine has CUDA"),
    # ---- convert
    Case("convert-random-file", convert.main,
         lambda w: [w.write("r.pth.tar", os.urandom(256)), "--vocab", w.data / "vocab.json", "--out", w.path("c.pt")],
         ("r.pth.tar", "cannot load")),
    Case("convert-malicious-checkpoint", convert.main,
         lambda w: [w.malicious(), "--vocab", w.data / "vocab.json", "--out", w.path("c.pt")],
         ("evil.pt", "refused to load", "mkdir", "argparse.Namespace")),
    Case("convert-truncated-checkpoint", convert.main,
         lambda w: [w.truncated(), "--vocab", w.data / "vocab.json", "--out", w.path("c.pt")], ("trunc.pt", "truncated")),
    Case("convert-out-is-a-folder", convert.main,
         lambda w: [w.ckpt, "--vocab", w.data / "vocab.json", "--out", w.data], ("--out", "folder")),
    Case("convert-out-is-the-input", convert.main,
         lambda w: [w.ckpt, "--vocab", w.data / "vocab.json", "--out", w.ckpt], ("--out", "is the input")),
    Case("convert-out-is-the-vocabulary", convert.main,
         lambda w: [w.ckpt, "--vocab", w.data / "vocab.json", "--out", w.data / "vocab.json"],
         ("--out", "is the input")),
    Case("convert-out-exists", convert.main,
         lambda w: [w.ckpt, "--vocab", w.data / "vocab.json", "--out", w.write("c.pt", "old")],
         ("--out", "c.pt", "already exists: add --overwrite")),
    Case("convert-vocabulary-missing", convert.main,
         lambda w: [w.ckpt, "--vocab", w.path("nosuch.json"), "--out", w.path("c.pt")], ("--vocab", "nosuch.json")),
    Case("convert-vocabulary-without-unk", convert.main,
         lambda w: [w.ckpt, "--vocab", w.vocab_without_unk(), "--out", w.path("c.pt")], ("vocab.json", "<unk>")),
    # ---- features
    Case("features-grid-0", features.main, lambda w: [w.picture(), "--out", w.path("f.npy"), "--grid", "0"],
         ("--grid",)),
    Case("features-size-unbounded", features.main, lambda w: [w.picture(), "--out", w.path("f.npy"), "--size", "100000"],
         ("--size", "100000")),
    Case("features-batch-size-0", features.main, lambda w: [w.picture(), "--out", w.path("f.npy"), "--batch-size", "0"],
         ("--batch-size",)),
    Case("features-out-is-a-folder", features.main, lambda w: [w.picture(), "--out", w.data], ("--out", "folder")),
    Case("features-out-is-an-input-image", features.main, lambda w: [w.picture(), "--out", w.path("pics/a.png")],
         ("--out", "is the input")),
    Case("features-list-file-would-be-overwritten", features.main,
         lambda w: [setup(w.picture, w.write("pics/images.txt", "a.png\n")), "--out", w.path("pics/f.npy")],
         ("images.txt", "is the input")),
    Case("features-another-feature-set-in-the-folder", features.main,
         lambda w: setup(lambda: w.write("out/images.txt", "x.png\n"), [w.picture(), "--out", w.path("out/f.npy")]),
         ("already holds images.txt", "--overwrite")),
    Case("features-out-exists", features.main,
         lambda w: setup(lambda: w.write("out/f.npy", "old"), [w.picture(), "--out", w.path("out/f.npy")]),
         ("already holds f.npy", "--overwrite")),
    Case("features-not-an-image", features.main,
         lambda w: [w.picture(), w.write("pics/b.png", b"not a picture"), "--out", w.path("f.npy")],
         ("b.png", "not an image")),
    Case("features-missing-image", features.main, lambda w: [w.path("nosuch.png"), "--out", w.path("f.npy")],
         ("nosuch.png",)),
    Case("features-device-cuda-without-cuda", features.main,
         lambda w: [w.picture(), "--out", w.path("f.npy"), "--device", "cuda"], ("--device", "CUDA"),
         skip=None if NO_CUDA else "this machine has CUDA"),
    # ---- export
    Case("export-checkpoint-extra-state-keys", export_main, lambda w: [w.with_extra_keys(), "--out", w.path("m")],
         ("extra.pt", "extra.weight")),
    Case("export-out-is-a-file", export_main, lambda w: [w.ckpt, "--out", w.write("m", "x")], ("--out", "is a file")),
    Case("export-malicious-checkpoint", export_main, lambda w: [w.malicious(), "--out", w.path("m")],
         ("evil.pt", "refused to load", "mkdir")),
    Case("export-truncated-checkpoint", export_main, lambda w: [w.truncated(), "--out", w.path("m")],
         ("trunc.pt", "truncated")),
    Case("export-opset-out-of-range", export_main, lambda w: [w.ckpt, "--out", w.path("m"), "--opset", "99"],
         ("--opset",)),
    Case("export-would-overwrite-the-checkpoint", export_main,
         lambda w: [w.write("m/vocab.json", w.ckpt.read_bytes()), "--out", w.path("m")],
         ("vocab.json", "is the input")),
    Case("export-out-holds-a-model-dir", export_main,
         lambda w: setup(lambda: w.write("m/manifest.json", "{}"), [w.ckpt, "--out", w.path("m")]),
         ("--out", "already holds manifest.json", "--overwrite")),
    # ---- the data builders: a folder already holding their files
    Case("synthetic-out-holds-a-data-folder", synthetic.main, lambda w: ["--out", w.data, "--n-train", "5"],
         ("--out", "already holds train_ims.npy", "and 8 more", "--overwrite")),
    Case("data-synthetic-out-holds-its-vocab", data_main,
         lambda w: ["synthetic", "--out", w.write("d/vocab.json", "old").parent],
         ("--out", "already holds vocab.json", "--overwrite")),
    Case("data-emoji-out-holds-a-data-folder", data_main, lambda w: ["emoji", "--out", w.data],
         ("--out", "already holds train_ims.npy", "--overwrite")),
    Case("example-pictures-out-holds-captions", make_example_pictures.main,
         lambda w: ["--out", w.write("ex/captions.tsv", "old").parent],
         ("--out", "already holds captions.tsv", "--overwrite")),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.skip(c.skip)] if c.skip else [])
                                  for c in CASES])
def test_bad_input_is_one_error_line_and_changes_no_file(case, tmp_path, tiny_data, tiny_checkpoint, capsys):  # noqa: F811
    w = Work(tmp_path, tiny_data, tiny_checkpoint)
    args = case.args(w)
    capsys.readouterr()
    before = snapshot(tmp_path)
    code, out, err = run_cli(case.main, args, capsys)
    assert_error_line(code, out, err, case.words)
    assert "weights_only" not in err
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "payload-ran").exists()


# --------------------------------------------------------------------------- beyond the table
def test_overwrite_replaces_the_old_run_as_a_whole(tmp_path, tiny_data, tiny_checkpoint, capsys):  # noqa: F811
    w = Work(tmp_path, tiny_data, tiny_checkpoint)
    run = w.old_run()
    (run / "notes.txt").write_text("mine\n")
    assert train.main([os.fspath(a) for a in t(w, "--num-epochs", "0", "--overwrite")]) == {}
    assert sorted(os.listdir(run)) == ["config.json", "log.jsonl", "notes.txt"]  # old checkpoints gone, notes kept
    assert (run / "log.jsonl").read_text() == "" and json.loads((run / "config.json").read_text())["model"]


def test_overwrite_replaces_evaluate_outputs(tmp_path, tiny_data, tiny_checkpoint, capsys):  # noqa: F811
    w = Work(tmp_path, tiny_data, tiny_checkpoint)
    out_json, sims = w.write("r.json", "old"), w.write("s.npy", "old")
    result = evaluate_main([os.fspath(a) for a in ev(w, "--json", out_json, "--save-sims", sims, "--overwrite")])
    assert json.loads(out_json.read_text())["rsum"] == result["rsum"]
    assert np.load(sims).shape == (result["n_images"], result["n_captions"])


@pytest.mark.parametrize("command", ["synthetic", "data-synthetic"])
def test_overwrite_replaces_the_synthetic_data_files(command, tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "vocab.json").write_text("old")
    (folder / "mine.txt").write_text("mine\n")
    args = ["--out", os.fspath(folder), "--n-train", "5", "--n-dev", "1", "--n-test", "1", "--img-dim", "8",
            "--overwrite"]
    assert (synthetic.main(args) if command == "synthetic" else data_main(["synthetic", *args])) == 0
    assert json.loads((folder / "vocab.json").read_text())["word2idx"]["<unk>"] == 3
    assert (folder / "mine.txt").read_text() == "mine\n" and np.load(folder / "test_ims.npy").shape == (1, 36, 8)


def test_overwrite_replaces_the_example_pictures(tmp_path):
    (tmp_path / "captions.tsv").write_text("old")
    assert make_example_pictures.main(["--out", os.fspath(tmp_path), "--overwrite"]) == 0
    assert (tmp_path / "captions.tsv").read_text().startswith("photos/astronaut.jpg\t")
    assert len(list((tmp_path / "pictures").rglob("*.*"))) == 50


def test_a_full_disk_is_an_error_line(tmp_path, tiny_data, tiny_checkpoint, capsys, monkeypatch):  # noqa: F811
    w = Work(tmp_path, tiny_data, tiny_checkpoint)

    def full(path, *_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))

    monkeypatch.setattr(atomic, "write_json", full)
    code, out, err = run_cli(evaluate_main, ev(w, "--json", w.path("r.json")), capsys)
    last = err.splitlines()[-1].split("\r")[-1]  # after the progress lines of the evaluation
    assert code == 2 and last.startswith("error: no space left on the device") and "r.json" in last
    assert "Traceback" not in err
    assert not w.path("r.json").exists()


def test_sigterm_stops_training_with_one_line_and_the_run_resumes(tmp_path, tiny_data, tiny_checkpoint):  # noqa: F811
    w = Work(tmp_path, tiny_data, tiny_checkpoint)
    env = {**os.environ, "PYTHONPATH": os.fspath(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "imram_min.train", *map(os.fspath, t(w, "--num-epochs", "100000"))],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (w.run / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1].split("\r")[-1] == "error: stopped by signal SIGTERM"
    assert "Traceback" not in err
    assert not [p for p in os.listdir(w.run) if p.startswith(".")]  # no temporaries
    assert {"config.json", "log.jsonl", "best.pt", "last.pt"} <= set(os.listdir(w.run))
    done = torch.load(w.run / "last.pt", weights_only=True)["train_state"]["epoch"]
    entry = train.main(["--resume", os.fspath(w.run / "last.pt"), "--num-epochs", str(done + 1)])
    assert entry["epoch"] == done + 1
