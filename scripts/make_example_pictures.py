"""A small real example of "your own pictures": 50 pictures and a TSV of 1-5 captions each.

    .venv/bin/python scripts/make_example_pictures.py --out examples/my_pictures [--overwrite]
    -> examples/my_pictures/pictures/{photos,crops,shapes}/*.png|jpg   (50 pictures)
       examples/my_pictures/captions.tsv                              (path<TAB>caption, 1-5 per picture)

The pictures: 18 of scikit-image's bundled sample photographs (skimage.data: astronaut, coffee,
chelsea, rocket, ...; no download), 12 crops of them, and 20 drawn shapes (Pillow). The captions
were written by hand for the photographs and crops, and are made from the drawing's colour, shape
and count for the shapes. Deterministic: the same files every run (--seed moves the shapes).
Then ``python -m imram_min.data prepare OUT/pictures OUT/captions.tsv --out DATA`` (README "Your own
pictures").
"""
from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image, ImageDraw

from runtime import cli

# name in skimage.data -> (file, captions). Grey pictures are saved as they are (the features take any mode).
PHOTOS = {
    "astronaut": ("astronaut.jpg", ["an astronaut in a white space suit with an american flag",
                                    "a smiling woman astronaut posing in front of a flag",
                                    "portrait of an astronaut holding a helmet"]),
    "coffee": ("coffee.jpg", ["a cup of coffee on a saucer with a spoon", "a red cup of coffee on a table",
                              "coffee in a cup seen from above", "a saucer with a cup and a spoon"]),
    "chelsea": ("chelsea.jpg", ["a tabby cat looking to the side", "a cat with green eyes",
                                "close up of an orange and grey cat", "a cat lying on a blanket",
                                "the face of a striped cat"]),
    "cat": ("cat.png", ["a cat with green eyes", "a striped cat"]),
    "rocket": ("rocket.jpg", ["a rocket on the launch pad", "a white rocket ready to launch under a blue sky",
                              "a space rocket standing on its tower"]),
    "stereo_motorcycle": ("motorcycle.jpg", ["a red motorcycle parked in a room",
                                             "a motorcycle in front of a wall with pictures",
                                             "a shiny red motorbike"]),
    "hubble_deep_field": ("hubble.jpg", ["many galaxies in the dark sky",
                                         "a deep view of space with stars and galaxies"]),
    "immunohistochemistry": ("cells.jpg", ["stained cells under a microscope",
                                           "brown and blue cells in a tissue sample"]),
    "retina": ("retina.jpg", ["an image of the back of a human eye", "the retina of an eye with red blood vessels",
                              "an orange circle with blood vessels"]),
    "colorwheel": ("colorwheel.png", ["a colour wheel with every colour", "a circle of rainbow colours"]),
    "logo": ("logo.png", ["the scikit image logo", "a snake logo with green and orange"]),
    "camera": ("camera.png", ["a man with a camera on a tripod", "a black and white photo of a photographer",
                              "a cameraman standing in a field"]),
    "coins": ("coins.png", ["many old coins on a table", "grey coins in rows"]),
    "clock": ("clock.png", ["a clock on a wall", "a black and white picture of a clock"]),
    "horse": ("horse.png", ["the black shape of a horse", "a horse silhouette on a white background"]),
    "moon": ("moon.png", ["the surface of the moon with craters", "a grey moon surface"]),
    "page": ("page.png", ["a page of printed text", "black text on a white page"]),
    "brick": ("brick.png", ["a brick wall", "a grey wall of bricks", "close up of bricks"]),
}
# (source, (top, left, bottom, right) as fractions, file, captions)
CROPS = [
    ("astronaut", (0.0, 0.3, 0.55, 0.8), "astronaut_face.jpg", ["the face of a smiling astronaut",
                                                                "a woman with short hair smiling"]),
    ("astronaut", (0.0, 0.0, 0.5, 0.35), "astronaut_flag.jpg", ["part of an american flag",
                                                                "a flag with red and white stripes"]),
    ("astronaut", (0.55, 0.45, 1.0, 1.0), "astronaut_helmet.jpg", ["a white space helmet"]),
    ("coffee", (0.05, 0.15, 0.85, 0.75), "coffee_cup.jpg", ["a red cup full of coffee", "a cup of coffee"]),
    ("coffee", (0.3, 0.6, 1.0, 1.0), "coffee_spoon.jpg", ["a spoon on a saucer", "a silver spoon"]),
    ("chelsea", (0.0, 0.3, 0.7, 0.9), "chelsea_face.jpg", ["the face of a cat", "a cat with green eyes looking left",
                                                           "close up of a tabby cat"]),
    ("rocket", (0.0, 0.3, 0.6, 0.7), "rocket_top.jpg", ["the top of a white rocket", "a rocket against the sky"]),
    ("rocket", (0.5, 0.0, 1.0, 0.5), "rocket_tower.jpg", ["the metal tower of a launch pad"]),
    ("stereo_motorcycle", (0.2, 0.1, 0.9, 0.6), "motorcycle_front.jpg", ["the front wheel of a red motorcycle",
                                                                        "a red motorbike"]),
    ("hubble_deep_field", (0.0, 0.0, 0.4, 0.4), "hubble_corner.jpg", ["a few galaxies in the dark",
                                                                     "bright stars in black space"]),
    ("coins", (0.0, 0.0, 0.5, 0.5), "coins_corner.png", ["a few old coins", "grey coins"]),
    ("camera", (0.0, 0.2, 0.6, 0.8), "camera_man.png", ["a man looking through a camera"]),
]
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 160, 50), "yellow": (240, 210, 20),
           "black": (20, 20, 20), "orange": (250, 140, 20), "purple": (140, 40, 170)}
SHAPES = ("circle", "square", "triangle", "star")
BACKGROUNDS = {"white": (255, 255, 255), "grey": (150, 150, 150), "light blue": (180, 210, 240)}
NUMBERS = {1: "one", 2: "two", 3: "three"}
N_SHAPES = 20


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    else:  # a five-pointed star
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        points = [(cx + (r if k % 2 == 0 else r / 2.5) * np.sin(np.pi * k / 5),
                   cy - (r if k % 2 == 0 else r / 2.5) * np.cos(np.pi * k / 5)) for k in range(10)]
        draw.polygon(points, fill=colour)


def shape_picture(rng: np.random.Generator, side: int = 256) -> tuple[Image.Image, list[str]]:
    """One drawing: 1-3 shapes of one kind and colour on a plain background -> (picture, 1-5 captions)."""
    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    background = str(rng.choice(list(BACKGROUNDS)))
    count = int(rng.integers(1, 4))
    picture = Image.new("RGB", (side, side), BACKGROUNDS[background])
    draw = ImageDraw.Draw(picture)
    cells = rng.permutation(4)[:count]  # distinct quadrants
    for cell in cells:
        size = int(rng.integers(side // 5, side // 2.5))
        left = (cell % 2) * side // 2 + int(rng.integers(0, side // 2 - size))
        top = (cell // 2) * side // 2 + int(rng.integers(0, side // 2 - size))
        draw_shape(draw, shape, (left, top, left + size, top + size), COLOURS[colour])
    plural = shape + "s" if count > 1 else shape
    article = "an" if colour[0] in "aeiou" else "a"
    what = f"{article} {colour} {shape}" if count == 1 else f"{NUMBERS[count]} {colour} {plural}"
    options = [f"{what} on a {background} background", f"{what}",
               f"a drawing of {what}", f"{colour} {plural} on {background}",
               f"{'a single' if count == 1 else NUMBERS[count]} {plural} in {colour}"]
    n_captions = int(rng.integers(1, 6))
    return picture, options[:n_captions]


def crop(image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    h, w = image.shape[:2]
    top, left, bottom, right = box
    return image[int(top * h):int(bottom * h), int(left * w):int(right * w)]


def as_picture(image: np.ndarray) -> Image.Image:
    if image.dtype == bool:
        image = np.where(image, 0, 255).astype(np.uint8)  # skimage's horse: True is the horse
    return Image.fromarray(image)


def save(picture: Image.Image, path: str) -> None:
    if path.endswith(".jpg"):
        picture.convert("RGB").save(path, quality=90)
    else:
        picture.save(path)


def make_example(out: str, seed: int = 0) -> tuple[int, int]:
    """Write OUT/pictures/... and OUT/captions.tsv; returns (pictures, captions)."""
    import skimage.data

    rows = []
    for sub in ("photos", "crops", "shapes"):
        os.makedirs(os.path.join(out, "pictures", sub), exist_ok=True)
    loaded = {}
    for name, (file, captions) in PHOTOS.items():
        image = getattr(skimage.data, name)()
        loaded[name] = image = image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: (left, right, disp)
        save(as_picture(image), os.path.join(out, "pictures", "photos", file))
        rows += [(f"photos/{file}", c) for c in captions]
    for name, box, file, captions in CROPS:
        save(as_picture(crop(loaded[name], box)), os.path.join(out, "pictures", "crops", file))
        rows += [(f"crops/{file}", c) for c in captions]
    rng = np.random.default_rng(seed)
    for k in range(N_SHAPES):
        picture, captions = shape_picture(rng)
        file = f"shape_{k:02d}.png"
        save(picture, os.path.join(out, "pictures", "shapes", file))
        rows += [(f"shapes/{file}", c) for c in captions]
    with open(os.path.join(out, "captions.tsv"), "w", encoding="utf-8") as f:
        f.write("".join(f"{path}\t{caption}\n" for path, caption in rows))
    return len(PHOTOS) + len(CROPS) + N_SHAPES, len(rows)


OUTPUTS = ["pictures", "captions.tsv"]  # in --out: refused when there, unless --overwrite


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)


def _main(argv: list[str] | None) -> int:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder to write (pictures/ and captions.tsv)")
    p.add_argument("--overwrite", action="store_true", help="replace the pictures/ and captions.tsv already in --out")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawn shapes (0)")
    args = p.parse_args(argv)
    cli.check_output_folder(args.out, "--out", overwrite=args.overwrite, outputs=OUTPUTS)
    n_pictures, n_captions = make_example(args.out, args.seed)
    print(f"wrote {n_pictures} pictures to {os.path.join(args.out, 'pictures')} and {n_captions} captions to "
          f"{os.path.join(args.out, 'captions.tsv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
