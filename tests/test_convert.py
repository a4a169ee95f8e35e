"""imram_min.engineering.convert: original IMRAM checkpoints -> imram-min checkpoints, and what it refuses."""
import argparse

import numpy as np
import pytest
import torch

from imram_min.engineering import convert
from imram_min.evaluate.__main__ import main as evaluate_main
from imram_min.engineering.checkpoint import load_model
from imram_min.model import IMRAM, IMRAMConfig
from runtime.text import Vocabulary

WORDS = ["a", "red", "blue", "green", "dog", "cat", "ball", "big", "small", "on", "the", "left"]
ORIGINAL_MEMORY = {"text_mdu.update": "linear_t2i", "text_mdu.gate": "gate_t2i",
                   "image_mdu.update": "linear_i2t", "image_mdu.gate": "gate_i2t"}


class Payload:
    """Unpickling this would call open(marker, "w"), i.e. create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def make_model(mode="full", img_encoder="basic", seed=0) -> IMRAM:
    torch.manual_seed(seed)
    model = IMRAM(IMRAMConfig(vocab_size=len(WORDS) + 4, img_dim=12, word_dim=8, embed_size=8, mode=mode,
                              img_encoder=img_encoder, n_steps=2, lambda_softmax=4.0))
    with torch.no_grad():  # no zero biases: a mapping mistake must show in the scores
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def original_layout(model: IMRAM, layout: str, fc_name: str = "fc") -> dict:
    """The model's weights as the original code saves them: a list of state dicts or one flat dict."""
    sd = model.state_dict()
    parts = {"img_enc": {k.replace("img_enc.fc.", f"{fc_name}."): v for k, v in sd.items() if k.startswith("img_enc.")},
             "txt_enc": {k[len("txt_enc."):]: v for k, v in sd.items() if k.startswith("txt_enc.")}}
    for ours, theirs in ORIGINAL_MEMORY.items():
        if f"{ours}.weight" in sd:
            parts[theirs] = {"weight": sd[f"{ours}.weight"], "bias": sd[f"{ours}.bias"]}
    if layout == "list":  # DataParallel-wrapped encoders: module. inside the encoder dicts
        return [{f"module.{k}": v for k, v in parts["img_enc"].items()}, parts["txt_enc"],
                *[parts[n] for n in ("linear_t2i", "gate_t2i", "linear_i2t", "gate_i2t") if n in parts]]
    return {f"module.{name}.{k}": v for name, sd_ in parts.items() for k, v in sd_.items()}


def original_opt(model: IMRAM, **changes) -> argparse.Namespace:
    c = model.cfg
    opt = dict(model_mode={"full": "full_IMRAM", "text": "text_IMRAM", "image": "image_IMRAM"}[c.mode],
               iteration_step=c.n_steps, lambda_softmax=c.lambda_softmax, raw_feature_norm=c.raw_feature_norm,
               no_IMRAM_norm=c.no_IMRAM_norm, embed_size=c.embed_size, word_dim=c.word_dim, img_dim=c.img_dim,
               num_layers=c.num_layers, bi_gru=c.bi_gru, precomp_enc_type=c.img_encoder, no_imgnorm=c.no_imgnorm,
               no_txtnorm=c.no_txtnorm, margin=0.2, max_violation=True, data_path="/data", batch_size=128)
    opt.update(changes)
    return argparse.Namespace(**opt)


def save_original(path, model_entry, opt):
    torch.save({"model": model_entry, "opt": opt, "epoch": 7, "best_rsum": 512.5}, path)
    return str(path)


def write_vocab(tmp_path, words=WORDS):
    path = tmp_path / "vocab.json"
    Vocabulary(words).save(path)
    return str(path)


def scores(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    feats = torch.rand(3, 4, 12, generator=g)
    lengths = torch.tensor([6, 3, 4, 2])
    tokens = torch.randint(4, len(WORDS) + 4, (4, 6), generator=g) * (torch.arange(6) < lengths[:, None])
    with torch.no_grad():
        return model(feats, tokens, lengths)


@pytest.mark.parametrize("layout,mode,img_encoder,fc_name", [
    ("list", "full", "basic", "fc"),
    ("flat", "full", "basic", "fc"),
    ("flat", "text", "weight_norm", "fc_local"),
])
def test_converted_checkpoint_scores_exactly_as_the_mapped_model(tmp_path, layout, mode, img_encoder, fc_name):
    model = make_model(mode, img_encoder)
    entry = original_layout(model, layout, fc_name)
    if mode == "text":  # the original builds all four memory layers whatever the mode: i2t ones are dropped
        entry |= {f"module.{n}.{k}": torch.randn(8, 16) if k == "weight" else torch.randn(8)
                  for n in ("linear_i2t", "gate_i2t") for k in ("weight", "bias")}
    src = save_original(tmp_path / "model_best.pth.tar", entry, original_opt(model))
    meta = convert.main([src, "--vocab", write_vocab(tmp_path), "--out", str(tmp_path / "c.pt")])
    loaded, vocab, meta = load_model(tmp_path / "c.pt")
    assert loaded.cfg == model.cfg
    assert len(vocab) == len(WORDS) + 4 and meta["original_epoch"] == 7 and meta["original_best_rsum"] == 512.5
    assert torch.equal(scores(loaded), scores(model))


def test_an_existing_out_is_replaced_only_with_overwrite(tmp_path, capsys):
    model = make_model()
    src = save_original(tmp_path / "model_best.pth.tar", original_layout(model, "list"), original_opt(model))
    out = tmp_path / "c.pt"
    out.write_text("old")
    args = [src, "--vocab", write_vocab(tmp_path), "--out", str(out)]
    with pytest.raises(SystemExit) as stop:
        convert.main(args)
    assert stop.value.code == 2 and out.read_text() == "old"
    assert capsys.readouterr().err == f"error: --out {out} already exists: add --overwrite to replace it\n"
    convert.main([*args, "--overwrite"])
    assert torch.equal(scores(load_model(out)[0]), scores(model))


def test_missing_options_are_read_off_the_weights_or_take_the_original_defaults(tmp_path):
    model = make_model()
    opt = argparse.Namespace(model_mode="full_IMRAM", iteration_step=2, lambda_softmax=4.0)
    src = save_original(tmp_path / "o.pth.tar", original_layout(model, "list"), opt)
    convert.convert(src, write_vocab(tmp_path), tmp_path / "c.pt")
    loaded, _, _ = load_model(tmp_path / "c.pt")
    assert (loaded.cfg.embed_size, loaded.cfg.word_dim, loaded.cfg.img_dim, loaded.cfg.bi_gru) == (8, 8, 12, True)
    assert loaded.cfg.max_violation is False and loaded.cfg.raw_feature_norm == "clipped_l2norm"
    assert torch.equal(scores(loaded), scores(model))


def test_converted_checkpoint_is_accepted_by_evaluate(tmp_path):
    model = make_model()
    src = save_original(tmp_path / "o.pth.tar", original_layout(model, "flat"), original_opt(model))
    convert.convert(src, write_vocab(tmp_path), tmp_path / "c.pt")
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.save(data / "test_ims.npy", rng.random((2, 4, 12), dtype=np.float32))
    (data / "test_caps.txt").write_text("".join(" ".join(rng.choice(WORDS, 4)) + "\n" for _ in range(10)))
    result = evaluate_main([str(tmp_path / "c.pt"), "--data", str(data), "--device", "cpu"])
    assert result["n_images"] == 2 and np.isfinite(result["rsum"])


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.pop("module.gate_i2t.bias"), r"missing keys.*image_mdu\.gate\.bias"),
    (lambda sd: sd.update({"module.txt_enc.extra.weight": torch.zeros(2)}), r"unexpected keys.*txt_enc\.extra\.weight"),
    (lambda sd: sd.update({"module.linear_t2i.weight": torch.zeros(8, 15)}),
     r"shape mismatches.*text_mdu\.update\.weight.*\(8, 15\)"),
])
def test_weights_that_do_not_fit_are_a_clear_error(tmp_path, edit, message):
    model = make_model()
    entry = original_layout(model, "flat")
    edit(entry)
    src = save_original(tmp_path / "o.pth.tar", entry, original_opt(model))
    with pytest.raises(convert.ConvertError, match=message):
        convert.convert(src, write_vocab(tmp_path), tmp_path / "c.pt")
    assert not (tmp_path / "c.pt").exists()


def test_a_vocabulary_of_another_size_is_a_clear_error(tmp_path):
    model = make_model()
    src = save_original(tmp_path / "o.pth.tar", original_layout(model, "list"), original_opt(model))
    with pytest.raises(convert.ConvertError, match=r"has 15 words but .* has 16 rows"):
        convert.convert(src, write_vocab(tmp_path, WORDS[:-1]), tmp_path / "c.pt")


def test_a_checkpoint_pickling_another_class_is_refused_unrun(tmp_path):
    model = make_model()
    marker = tmp_path / "payload-ran"
    torch.save({"model": original_layout(model, "list"), "opt": original_opt(model), "extra": Payload(str(marker))},
               tmp_path / "evil.pth.tar")
    with pytest.raises(convert.ConvertError, match="refused"):
        convert.convert(tmp_path / "evil.pth.tar", write_vocab(tmp_path), tmp_path / "c.pt")
    assert not marker.exists() and not (tmp_path / "c.pt").exists()
