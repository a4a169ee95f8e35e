"""imram_min.train: outputs, exact resumption, settings precedence, the mean baseline."""
import contextlib
import errno
import io
import json
import os

import numpy as np
import pytest
import torch

from imram_min import train
from imram_min.engineering import checkpoint
from imram_min.engineering.checkpoint import load_checkpoint, load_model
from runtime.text import Vocabulary

WORDS = ["a", "red", "blue", "green", "dog", "cat", "ball", "big", "small", "on", "the", "left"]
TINY = ["--embed-size", "8", "--word-dim", "8", "--batch-size", "10", "--seed", "3", "--device", "cpu"]


def make_data(folder, n_train=8, n_dev=4, img_dim=12, n_region=3, seed=0, defaults=None):
    """A tiny precomp data folder: random features, 5 random captions per image (lengths 2-6), a vocab."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_dev)):
        np.save(os.path.join(folder, f"{split}_ims.npy"), rng.random((n, n_region, img_dim), dtype=np.float32))
        caps = [" ".join(rng.choice(WORDS, rng.integers(2, 7))) for _ in range(5 * n)]
        with open(os.path.join(folder, f"{split}_caps.txt"), "w") as f:
            f.write("\n".join(caps) + "\n")
    Vocabulary(WORDS).save(os.path.join(folder, "vocab.json"))
    if defaults is not None:
        with open(os.path.join(folder, "train_defaults.json"), "w") as f:
            json.dump(defaults, f)
    return str(folder)


def read_log(run):
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_one_epoch_writes_checkpoints_log_and_config(tmp_path):
    data, run = make_data(tmp_path / "data"), str(tmp_path / "run")
    train.main(["--data", data, "--out", run, "--num-epochs", "1", *TINY])
    assert sorted(os.listdir(run)) == ["best.pt", "config.json", "last.pt", "log.jsonl"]
    (entry,) = read_log(run)
    assert set(entry) == {"epoch", "lr", "train_loss", "i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
                          "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr", "rsum", "seconds"}
    assert entry["epoch"] == 1 and entry["lr"] == pytest.approx(2e-4) and np.isfinite(entry["train_loss"])
    model, vocab, meta = load_model(os.path.join(run, "best.pt"))
    assert len(vocab) == len(WORDS) + 4 and model.cfg.img_dim == 12 and model.cfg.embed_size == 8
    assert meta["dev"]["rsum"] == pytest.approx(entry["rsum"])
    assert "train_state" in load_checkpoint(os.path.join(run, "last.pt"))
    assert "train_state" not in load_checkpoint(os.path.join(run, "best.pt"))
    assert json.load(open(os.path.join(run, "config.json")))["model"]["mode"] == "full"


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_resume_gives_the_same_weights_as_training_straight_through(tmp_path, precision):
    data = make_data(tmp_path / "data")
    common = ["--data", data, *TINY, "--lr-update", "1", "--precision", precision]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train.main([*common, "--out", straight, "--num-epochs", "2"])
    train.main([*common, "--out", split, "--num-epochs", "1"])
    train.main(["--resume", os.path.join(split, "last.pt"), "--num-epochs", "2"])
    a, b = (load_checkpoint(os.path.join(r, "last.pt")) for r in (straight, split))
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert a["model"][k].dtype == (torch.float64 if precision == "fp64" else torch.float32) or \
            not a["model"][k].is_floating_point()
    drop = lambda log: [{k: v for k, v in e.items() if k != "seconds"} for e in log]  # noqa: E731
    assert drop(read_log(straight)) == drop(read_log(split))
    assert [e["lr"] for e in read_log(split)] == pytest.approx([2e-4, 2e-5])


def test_flags_beat_train_defaults_json_which_beats_paper_defaults(tmp_path, capsys):
    data = make_data(tmp_path / "data", defaults={"embed_size": 12, "batch_size": 7, "lr": 1e-3})
    run = str(tmp_path / "run")
    train.main(["--data", data, "--out", run, "--num-epochs", "0", "--embed-size", "8"])
    cfg = json.load(open(os.path.join(run, "config.json")))
    assert cfg["model"]["embed_size"] == 8  # flag
    assert cfg["train"]["batch_size"] == 7 and cfg["train"]["lr"] == 1e-3  # file
    assert cfg["model"]["word_dim"] == 300 and cfg["train"]["lr_update"] == 15  # paper
    assert cfg["from_defaults_file"] == ["batch_size", "lr"]
    assert "train_defaults.json: batch_size=7, lr=0.001" in capsys.readouterr().out


def test_every_model_flag_reaches_the_config(tmp_path):
    data, run = make_data(tmp_path / "data"), str(tmp_path / "run")
    train.main(["--data", data, "--out", run, "--num-epochs", "0", "--embed-size", "6", "--word-dim", "5",
                "--num-layers", "2", "--no-bi-gru", "--img-encoder", "weight_norm", "--no-imgnorm", "--no-txtnorm",
                "--raw-feature-norm", "softmax", "--lambda-softmax", "4", "--mode", "text", "--iteration-step", "2",
                "--no-imram-norm", "--margin", "0.1", "--no-max-violation"])
    model = json.load(open(os.path.join(run, "config.json")))["model"]
    assert model == {"vocab_size": 16, "img_dim": 12, "word_dim": 5, "embed_size": 6, "num_layers": 2, "bi_gru": False,
                     "img_encoder": "weight_norm", "no_imgnorm": True, "no_txtnorm": True,
                     "raw_feature_norm": "softmax", "lambda_softmax": 4.0, "mode": "text", "n_steps": 2,
                     "no_IMRAM_norm": True, "margin": 0.1, "max_violation": False}


def test_baseline_mean_trains_the_mean_pooled_model(tmp_path):
    data, run = make_data(tmp_path / "data"), str(tmp_path / "run")
    train.main(["--data", data, "--out", run, "--num-epochs", "1", "--baseline", "mean", *TINY])
    model, _, _ = load_model(os.path.join(run, "best.pt"))
    assert model.cfg.mode == "mean" and model.text_mdu is None and model.image_mdu is None
    with pytest.raises(SystemExit):
        train.main(["--data", data, "--out", run, "--num-epochs", "0", "--baseline", "mean", "--mode", "full"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_with_a_finite_loss(tmp_path, precision):
    data, run = make_data(tmp_path / "data"), str(tmp_path / "run")
    entry = train.main(["--data", data, "--out", run, "--num-epochs", "1", "--precision", precision, *TINY])
    assert np.isfinite(entry["train_loss"]) and entry["train_loss"] > 0
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["train"]["precision"] == precision


def test_a_checkpoint_from_before_precision_resumes_in_fp32(tmp_path):
    data, run = make_data(tmp_path / "data"), str(tmp_path / "run")
    train.main(["--data", data, "--out", run, "--num-epochs", "1", *TINY])
    ckpt = load_checkpoint(os.path.join(run, "last.pt"))
    del ckpt["train_state"]["train_config"]["precision"]  # as written before the setting existed
    torch.save(ckpt, os.path.join(run, "last.pt"))
    entry = train.main(["--resume", os.path.join(run, "last.pt"), "--num-epochs", "2"])
    assert entry["epoch"] == 2
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["train"]["precision"] == "fp32"


# --------------------------------------------------------------------------- bad input found early, saves that fail
def one_error_line(capsys) -> str:
    """The one error line, last on stderr (after the progress bar of the epoch, if one ran), no traceback."""
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    assert [line for line in err if line.startswith("error: ")] == err[-1:] and "Traceback" not in "".join(err)
    return err[-1]


@pytest.mark.parametrize("split, row, value", [("train", 5, np.nan), ("dev", 2, np.inf)])
def test_non_finite_features_are_refused_before_epoch_1_naming_file_and_row(tmp_path, capsys, split, row, value):
    data, run = make_data(tmp_path / "data"), str(tmp_path / "run")
    path = os.path.join(data, f"{split}_ims.npy")
    feats = np.load(path)
    feats[row, 1, 7] = value
    np.save(path, feats)
    with pytest.raises(SystemExit) as e:
        train.main(["--data", data, "--out", run, "--num-epochs", "1", *TINY])
    assert e.value.code == 2 and not os.path.exists(run)
    assert f"{split}_ims.npy: image {row} has NaN or Inf features" in one_error_line(capsys)


class FullDisk(io.RawIOBase):
    """A file whose writes fail with ENOSPC once ``budget`` bytes are written (a disk that fills up)."""

    def __init__(self, file, budget: int):
        self.file, self.budget = file, budget

    def writable(self):
        return True

    def write(self, data):
        n = memoryview(data).nbytes
        if n > self.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= n
        return self.file.write(data)


def fill_disk_after(monkeypatch, budget: int) -> None:
    """Checkpoint saves write through a FullDisk (into the real temporary file of runtime.atomic)."""
    real = checkpoint.atomic_open

    @contextlib.contextmanager
    def full_open(path, mode="wb"):
        with real(path, mode) as f:
            yield FullDisk(f, budget)
    monkeypatch.setattr(checkpoint, "atomic_open", full_open)


# budget 0: the first write's OSError reaches torch.save's caller; 4096: torch's writer is past its
# first record, and its __exit__ raises RuntimeError("... unexpected pos ...") over the OSError
@pytest.mark.parametrize("budget", [0, 4096])
def test_a_full_disk_during_a_save_names_the_device_and_keeps_the_old_file(tmp_path, monkeypatch, budget):
    path = tmp_path / "last.pt"
    path.write_bytes(b"the previous checkpoint")
    fill_disk_after(monkeypatch, budget)
    with pytest.raises(checkpoint.DiskFullError) as e:
        checkpoint.atomic_torch_save({"weights": torch.zeros(10000)}, path)
    assert str(e.value).startswith(f"{path}: no space left on device ")
    assert "(mounted at /" in str(e.value) and "the previous file is kept" in str(e.value)
    assert os.listdir(tmp_path) == ["last.pt"] and path.read_bytes() == b"the previous checkpoint"


def test_a_full_disk_during_training_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    data, run = make_data(tmp_path / "data"), str(tmp_path / "run")
    fill_disk_after(monkeypatch, 4096)
    with pytest.raises(SystemExit) as e:
        train.main(["--data", data, "--out", run, "--num-epochs", "1", *TINY])
    line = one_error_line(capsys)
    best = os.path.join(run, "best.pt")
    assert e.value.code == 2 and f"epoch 1 was not saved: {best}: no space left on device" in line
    assert sorted(os.listdir(run)) == ["config.json", "log.jsonl"]


def test_resume_after_a_torn_last_log_line_drops_it_with_a_note(tmp_path, capsys):
    data, run = make_data(tmp_path / "data"), str(tmp_path / "run")
    train.main(["--data", data, "--out", run, "--num-epochs", "1", *TINY])
    with open(os.path.join(run, "log.jsonl"), "a") as f:
        f.write('{"epoch": 2, "lr": 0.000')  # killed while appending epoch 2's line
    capsys.readouterr()
    entry = train.main(["--resume", os.path.join(run, "last.pt"), "--num-epochs", "2"])
    assert "dropped its last line 2 (torn" in capsys.readouterr().err
    assert [e["epoch"] for e in read_log(run)] == [1, 2] and read_log(run)[1] == entry


def test_temporary_files_of_a_killed_save_are_removed_at_the_next_start(tmp_path):
    data, run = make_data(tmp_path / "data"), str(tmp_path / "run")
    train.main(["--data", data, "--out", run, "--num-epochs", "1", *TINY])
    stale = [".best.pt.k2j4_x9a.tmp", ".last.pt.0a1b2c3d.tmp"]  # mkstemp's names, as runtime.atomic makes them
    kept = [".best.pt.mine.tmp", "notes.tmp"]
    for name in stale + kept:
        with open(os.path.join(run, name), "w") as f:
            f.write("x")
    train.main(["--resume", os.path.join(run, "last.pt"), "--num-epochs", "1"])  # nothing left to train
    assert sorted(os.listdir(run)) == sorted(["best.pt", "config.json", "last.pt", "log.jsonl", *kept])


def test_a_save_removes_its_files_stale_temporary_files(tmp_path):
    (tmp_path / ".last.pt.abcd1234.tmp").write_bytes(b"x")
    (tmp_path / ".best.pt.abcd1234.tmp").write_bytes(b"x")  # another file's: not this save's to remove
    checkpoint.atomic_torch_save({"a": 1}, tmp_path / "last.pt")
    assert sorted(os.listdir(tmp_path)) == [".best.pt.abcd1234.tmp", "last.pt"]
