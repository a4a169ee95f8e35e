"""Any number of captions per picture (DIR/{split}_cap2img.txt), and the SCAN layout read as it always was.

Data: the sidecar gives each caption's image; one that describes 5 (or 1) per image is the SCAN
layout. Evaluation: i2t ranks the best of an image's own captions, t2i a caption's own image;
the SCAN layout gives exactly the numbers it always did. Training: a batch item is a caption and
its image; in a sidecar layout pairs of one picture are no negatives, in the SCAN layout the loss
is the original's.
"""
import os

import numpy as np
import pytest
import torch

from fixtures import random_feats, random_tokens, spawn_processes, tiny_model
from test_train import TINY, WORDS, make_data

from imram_min.engineering import distributed as D
from imram_min import loss as L
from imram_min import evaluate, train
from imram_min.engineering import tiling
from imram_min.evaluate.__main__ import main as evaluate_main
from imram_min.engineering.checkpoint import load_checkpoint, save_checkpoint
from imram_min.data import DataError, PrecompDataset, caption_layout
from imram_min.loss import contrastive_loss
from imram_min.model import IMRAM, IMRAMConfig
from runtime.text import Vocabulary


def write_sidecar(folder, split, rows):
    with open(os.path.join(folder, f"{split}_cap2img.txt"), "w") as f:
        f.write("".join(f"{r}\n" for r in rows))


def make_variable_split(folder, split, counts, img_dim=12, n_region=3, seed=0):
    """A split of len(counts) images, image i with counts[i] captions, and its sidecar."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, f"{split}_ims.npy"), rng.random((len(counts), n_region, img_dim), dtype=np.float32))
    rows = np.repeat(np.arange(len(counts)), counts)
    caps = [" ".join(rng.choice(WORDS, rng.integers(2, 7))) for _ in rows]
    with open(os.path.join(folder, f"{split}_caps.txt"), "w") as f:
        f.write("\n".join(caps) + "\n")
    write_sidecar(folder, split, rows)
    Vocabulary(WORDS).save(os.path.join(folder, "vocab.json"))
    return rows


# --------------------------------------------------------------------------- reading the layout
def test_sidecar_gives_each_caption_its_image(tmp_path):
    make_variable_split(tmp_path, "test", [2, 1, 3])
    ds = PrecompDataset(tmp_path, "test", Vocabulary(WORDS))
    assert len(ds) == 6 and ds.n_images == 3 and ds.caps_per_image is None
    assert [ds[j][3] for j in range(6)] == [0, 0, 1, 2, 2, 2]
    assert torch.equal(ds[3][0], torch.from_numpy(np.load(tmp_path / "test_ims.npy")[2]))


@pytest.mark.parametrize("cpi", [5, 1])
def test_a_sidecar_of_the_scan_layout_is_the_scan_layout(tmp_path, cpi):
    make_variable_split(tmp_path, "test", [cpi] * 4)
    rows, found = caption_layout(4, ["a"] * 4 * cpi, tmp_path / "test_caps.txt")
    assert found == cpi and rows.tolist() == [j // cpi for j in range(4 * cpi)]


def test_other_counts_without_sidecar_say_to_add_one_naming_the_counts(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    make_variable_split(data, "train", [2, 3, 1, 4, 2, 2, 3, 1])
    os.remove(os.path.join(data, "train_cap2img.txt"))
    with pytest.raises(SystemExit) as e:
        train.main(["--data", data, "--out", str(tmp_path / "run"), *TINY])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "got 18 captions for 8 images" in err and "train_cap2img.txt" in err
    assert "python -m imram_min.data prepare" in err and not os.path.exists(tmp_path / "run")


def test_a_trailing_blank_line_is_named(tmp_path):
    make_variable_split(tmp_path, "test", [5, 5])
    os.remove(tmp_path / "test_cap2img.txt")
    with open(tmp_path / "test_caps.txt", "a") as f:
        f.write("\n")
    with pytest.raises(DataError, match=r"test_caps\.txt: line 11 \(the last line\) is blank"):
        PrecompDataset(tmp_path, "test", Vocabulary(WORDS))


@pytest.mark.parametrize("lines, message", [
    (["0", "0", "1"], r"3 lines for the 4 captions"),
    (["0", "1", "0", "1"], r"line 3: image row 0 after 1: captions must be grouped by image"),
    (["0", "0", "0", "2"], r"image row 1 has no caption"),
    (["0", "0", "1", "1"], r"image row 2 has no caption"),
    (["0", "x", "1", "2"], r"line 2: expected the 0-based row of an image \(0 to 2\), got 'x'"),
    (["0", "1", "2", "3"], r"line 4: image row 3, but the split has 3 images"),
], ids=["count", "order", "gap", "last", "text", "range"])
def test_a_bad_sidecar_is_refused_naming_the_line(tmp_path, lines, message):
    make_variable_split(tmp_path, "test", [2, 1, 1])
    (tmp_path / "test_cap2img.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"test_cap2img\.txt: .*" + message):
        PrecompDataset(tmp_path, "test", Vocabulary(WORDS))


def test_max_captions_keeps_whole_images_of_a_sidecar_layout(tmp_path):
    make_variable_split(tmp_path, "dev", [2, 3, 1, 4])
    ds = PrecompDataset(tmp_path, "dev", Vocabulary(WORDS), max_captions=5)  # images 0 and 1: 5 captions
    assert len(ds) == 5 and ds.n_images == 2 and ds.images.shape[0] == 2
    ds = PrecompDataset(tmp_path, "dev", Vocabulary(WORDS), max_captions=8)  # cut back to 6: images 0-2
    assert len(ds) == 6 and ds.n_images == 3


# --------------------------------------------------------------------------- evaluation
# 3 images with 2, 1, 2 captions (caption rows 0 0 1 2 2).
SIMS_V = np.array([[0.5, 0.9, 0.8, 0.1, 0.0],    # image 0: best own 0.9 -> rank 0
                   [0.6, 0.2, 0.3, 0.7, 0.1],    # image 1: own 0.3, beaten by 0.6 and 0.7 -> rank 2
                   [0.4, 0.3, 0.9, 0.2, 0.35]],  # image 2: best own 0.35, beaten by 0.4 and 0.9 -> rank 2
                  dtype=np.float32)
ROWS_V = np.array([0, 0, 1, 2, 2])


def test_i2t_ranks_the_best_of_the_images_own_captions_and_t2i_the_captions_image():
    assert evaluate.i2t_ranks(SIMS_V, ROWS_V).tolist() == [0, 2, 2]
    # caption 0 (own 0.5): 0.6 higher -> 1; caption 1 (0.9) -> 0; caption 2 (own 0.3): 0.8, 0.9 -> 2;
    # caption 3 (own 0.2): 0.7 -> 1; caption 4 (own 0.35) -> 0
    assert evaluate.t2i_ranks(SIMS_V, ROWS_V).tolist() == [1, 0, 2, 1, 0]
    m = evaluate.metrics_from_sims(SIMS_V, ROWS_V)
    assert m["i2t"][0] == pytest.approx(100 / 3) and m["t2i"][0] == pytest.approx(40.0)
    assert (m["n_images"], m["n_captions"]) == (3, 5)


@pytest.mark.parametrize("cpi", [5, 1])
def test_image_rows_of_the_scan_layout_give_exactly_the_scan_ranks(cpi):
    sims = np.random.default_rng(cpi).random((40, 40 * cpi)).astype(np.float32)
    sims[3, 3 * cpi] = sims[3, 7]  # a tie, counted in favour of the ground truth either way
    rows = np.arange(40 * cpi) // cpi
    assert np.array_equal(evaluate.i2t_ranks(sims, rows), evaluate.i2t_ranks(sims, cpi))
    assert np.array_equal(evaluate.t2i_ranks(sims, rows), evaluate.t2i_ranks(sims, cpi))


def checkpoint(path, vocab):
    torch.manual_seed(0)
    save_checkpoint(path, IMRAM(IMRAMConfig(vocab_size=len(vocab), img_dim=12, word_dim=8, embed_size=8)), vocab)
    return str(path)


@pytest.mark.parametrize("fold5", [False, True])
def test_evaluate_on_the_scan_layout_is_the_same_with_or_without_a_sidecar(tmp_path, fold5):
    make_variable_split(tmp_path, "test", [5] * 10)
    ckpt = checkpoint(tmp_path / "m.pt", Vocabulary(WORDS))
    args = [ckpt, "--data", str(tmp_path), "--device", "cpu", *(["--fold5"] if fold5 else [])]
    with_sidecar = evaluate_main(args)
    os.remove(tmp_path / "test_cap2img.txt")
    without = evaluate_main(args)
    assert with_sidecar == without and without["caps_per_image"] == 5 and without["n_captions"] == 50


def test_evaluate_a_sidecar_layout_counts_every_caption_once(tmp_path):
    make_variable_split(tmp_path, "test", [2, 1, 3, 5, 1, 4, 2, 2, 1, 3])
    ckpt = checkpoint(tmp_path / "m.pt", Vocabulary(WORDS))
    sims_path = tmp_path / "sims.npy"
    result = evaluate_main([ckpt, "--data", str(tmp_path), "--device", "cpu", "--save-sims", str(sims_path)])
    sims = np.load(sims_path)
    assert sims.shape == (10, 24) and result["n_captions"] == 24 and result["caps_per_image"] is None
    rows = np.loadtxt(tmp_path / "test_cap2img.txt", dtype=np.int64)
    want_i2t = [int((sims[i] > sims[i, rows == i].max()).sum()) for i in range(10)]
    want_t2i = [int((sims[:, j] > sims[rows[j], j]).sum()) for j in range(24)]
    assert result["i2t"] == pytest.approx(list(evaluate.rank_metrics(want_i2t)))
    assert result["t2i"] == pytest.approx(list(evaluate.rank_metrics(want_t2i)))


def test_fold5_of_a_sidecar_layout_gives_each_fold_its_images_own_captions():
    rows = np.repeat(np.arange(10), [2, 1, 3, 5, 1, 4, 2, 2, 1, 3])
    folds = evaluate.fold_slices(10, rows)
    assert [(im.start, im.stop, ca.start, ca.stop) for im, ca in folds] == \
        [(0, 2, 0, 3), (2, 4, 3, 11), (4, 6, 11, 16), (6, 8, 16, 20), (8, 10, 20, 24)]
    assert evaluate.fold_layout(rows, folds[1][1]).tolist() == [0, 0, 0, 1, 1, 1, 1, 1]


# --------------------------------------------------------------------------- the training loss
def masked_reference(sims: torch.Tensor, ids: list[int], margin: float, max_violation: bool) -> float:
    """The hinge loss over the pairs of different pictures only, term by term."""
    n, total = len(ids), 0.0
    for k in range(n):
        cap = [max(0.0, margin - float(sims[k, k]) + float(sims[k, j])) for j in range(n) if ids[j] != ids[k]]
        img = [max(0.0, margin - float(sims[k, k]) + float(sims[i, k])) for i in range(n) if ids[i] != ids[k]]
        total += (max(cap, default=0.0) + max(img, default=0.0)) if max_violation else sum(cap) + sum(img)
    return total


@pytest.mark.parametrize("max_violation", [True, False])
def test_pairs_of_one_picture_are_no_negatives_in_the_loss_and_its_slices(max_violation):
    sims = torch.randn(7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    whole = float(L.hinge_terms(sims, sims, 0, 0.2, max_violation, ids))
    assert whole == pytest.approx(masked_reference(sims, ids.tolist(), 0.2, max_violation), abs=1e-12)
    parts = sum(float(L.hinge_terms(sims[own], sims[:, own], own.start, 0.2, max_violation, ids))
                for own in (D.rank_slice(7, 3, r) for r in range(3)))
    assert parts == pytest.approx(whole, abs=1e-12)
    distinct = float(L.hinge_terms(sims, sims, 0, 0.2, max_violation, torch.arange(7)))  # every item its own picture
    assert distinct == pytest.approx(float(contrastive_loss(sims, 0.2, max_violation)), abs=1e-12)


def test_the_support_loss_with_pictures_gives_the_dense_loss_and_gradients():  # (F10) with the mask
    feats = random_feats(8, 5).double()
    tokens, lengths = random_tokens([3 + (7 * i) % 6 for i in range(8)], vocab_size=40, seed=0)
    with torch.no_grad():  # make image 0's hardest negative caption one of its own picture's
        model = tiny_model(seed=0, n_steps=3).double()
        sims = tiling.score_pairs(model, model.encode_images(feats), model.encode_captions(tokens, lengths), lengths)
        hardest = int((sims[0] - 1e9 * torch.eye(8, dtype=sims.dtype)[0]).argmax())
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    ids[hardest] = 0
    out = []
    for support, image_ids in ((False, ids), (True, ids), (True, None)):
        model = tiny_model(seed=0, n_steps=3).double().train()
        loss = L.BatchLoss(model, tiling.score_pairs, support=support)(feats, tokens, lengths, True, image_ids)
        loss.backward()
        out.append((float(loss.detach()), {n: p.grad for n, p in model.named_parameters()}))
    (dense, dense_grads), (sparse, grads), (original, _) = out
    assert dense > 0 and abs(sparse - dense) <= 1e-12 * dense
    assert original > dense  # the mask took image 0's hardest negative away
    assert max(float((grads[k] - g).abs().max()) for k, g in dense_grads.items()) <= 1e-10


def weights(path):
    return load_checkpoint(path)["model"]


def test_training_on_the_scan_layout_is_the_same_with_or_without_a_sidecar(tmp_path):
    data = make_data(tmp_path / "data")
    train.main(["--data", data, "--out", str(tmp_path / "a"), "--num-epochs", "1", *TINY])
    for split, n in (("train", 8), ("dev", 4)):
        write_sidecar(data, split, np.arange(5 * n) // 5)
    train.main(["--data", data, "--out", str(tmp_path / "b"), "--num-epochs", "1", *TINY])
    a, b = weights(tmp_path / "a" / "last.pt"), weights(tmp_path / "b" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_on_a_sidecar_layout_passes_the_pictures_to_the_loss(tmp_path, monkeypatch):
    data = make_data(tmp_path / "data")
    rows = make_variable_split(data, "train", [2, 3, 1, 4, 2, 2, 3, 1], seed=1)
    seen = []
    forward = L.BatchLoss.forward

    def spy(self, region_feats, tokens, lengths, max_violation, image_ids=None):
        seen.append(image_ids)
        return forward(self, region_feats, tokens, lengths, max_violation, image_ids)
    monkeypatch.setattr(L.BatchLoss, "forward", spy)
    entry = train.main(["--data", data, "--out", str(tmp_path / "run"), "--num-epochs", "1", *TINY])
    assert len(seen) == 2 and sorted(torch.cat(seen).tolist()) == sorted(rows.tolist())  # 18 captions, batches of 10
    assert np.isfinite(entry["train_loss"]) and entry["rsum"] >= 0


def test_a_full_shortlist_of_a_sidecar_layout_gives_the_exhaustive_metrics(tmp_path):
    make_variable_split(tmp_path, "test", [2, 1, 3, 5, 1, 4])
    ckpt = checkpoint(tmp_path / "m.pt", Vocabulary(WORDS))
    result = evaluate_main([ckpt, "--data", str(tmp_path), "--device", "cpu", "--shortlist", "100%"])
    (full,) = result["shortlists"]
    assert result["n_captions"] == 16 and full["hit_i2t"] == full["hit_t2i"] == 100.0
    assert full["i2t"] == pytest.approx(result["exhaustive"]["i2t"]) and full["rsum"] > 0
    assert full["t2i"] == pytest.approx(result["exhaustive"]["t2i"])


def _masked_worker(rank: int, world: int, folder: str) -> None:
    from test_distributed import batch, double_model
    torch.set_num_threads(1)
    ctx = D.join(rank, world, f"file://{folder}/rendezvous")
    try:
        feats, tokens, lengths = batch(6)
        own = D.rank_slice(6, world, rank)
        model = double_model()
        ddp = torch.nn.parallel.DistributedDataParallel(L.BatchLoss(model, tiling.score_pairs, ctx))
        loss = ddp(feats[own], tokens[own, :int(lengths[own].max())], lengths[own], True, PICTURES[own])
        loss.backward()
        total = D.all_reduce_sum(float(loss) / world, ctx)
        torch.save({"loss": total, "grads": {n: p.grad.detach() for n, p in model.named_parameters()}},
                   os.path.join(folder, f"rank{rank}.pt"))
    finally:
        D.teardown(ctx)


PICTURES = torch.tensor([0, 1, 1, 2, 0, 3])  # pictures 0 and 1 each in both processes' slices


def test_two_processes_give_the_single_process_loss_with_pictures(tmp_path):
    from test_distributed import batch, double_model
    spawn_processes(_masked_worker, (2, str(tmp_path)), 2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    feats, tokens, lengths = batch(6)
    model = double_model()
    loss = L.BatchLoss(model, tiling.score_pairs, support=False)(feats, tokens, lengths, True, PICTURES)
    loss.backward()
    assert all(abs(r["loss"] - float(loss.detach())) <= 1e-12 * float(loss.detach()) for r in ranks)
    original = L.BatchLoss(double_model(), tiling.score_pairs, support=False)(feats, tokens, lengths, True)
    assert float(original.detach()) > float(loss.detach())  # the pictures matter in this batch
    for name, p in model.named_parameters():
        assert all(float((r["grads"][name] - p.grad).abs().max()) <= 1e-10 for r in ranks), name


# --------------------------------------------------------------------------- the search head (imram_min.search.global_head)
def test_the_search_head_trains_alike_on_the_image_rows_of_the_scan_layout():
    from imram_min.search.global_head import train_head
    torch.manual_seed(0)
    model = IMRAM(IMRAMConfig(vocab_size=len(WORDS) + 4, img_dim=12, word_dim=8, embed_size=8)).eval()
    regions = torch.randn(12, 3, 8)
    words, lengths = torch.randn(60, 6, 8), torch.tensor([3, 4, 5, 6, 2] * 12)
    small = dict(epochs=2, batch=4, distill=1.0, progress=False, hidden=16, out_size=8)
    by_count, _ = train_head(model, regions, words, lengths, 5, **small)
    by_rows, _ = train_head(model, regions, words, lengths, np.arange(60) // 5, **small)
    a, b = by_count.state_dict(), by_rows.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_search_head_command_takes_a_sidecar_layout(tmp_path, capsys):
    from imram_min.search import global_head
    make_variable_split(tmp_path, "train", [2, 1, 3, 5, 1, 4, 2, 2])
    ckpt = checkpoint(tmp_path / "m.pt", Vocabulary(WORDS))
    out = global_head.main([ckpt, "--data", str(tmp_path), "--out", str(tmp_path / "head.pt"), "--epochs", "2",
                            "--batch-size", "3", "--hidden", "16", "--out-size", "8"])
    assert os.path.isfile(tmp_path / "head.pt") and len(out["loss"]) == 2 and np.isfinite(out["loss"]).all()
    assert "8 images, 20 captions" in capsys.readouterr().out
