"""imram_min.train: outputs, exact resumption, settings precedence, the mean baseline."""
import json
import os

import numpy as np
import pytest
import torch

from imram_min import train
from imram_min.checkpoint import load_checkpoint, load_model
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
