"""Shapes: a small image-folder data set made on the spot, for trying tl_dist without a download and for
its tests. `python -m tl_dist.shapes DIR` writes it and prints the command that trains on it (the README's
quick start without network).

Each class is one shape in one colour (`red_circle`, `green_square`, ...) drawn at a random place, size and
angle on a noisy grey background, so a small network learns it from random weights in seconds. The files
have the real data's quirks: of every ten images of a class one is a plain RGB JPEG and each of the others
has one quirk (QUIRKS): grayscale (as about a tenth of Caltech-101 is), a palette PNG with a transparent
colour, a CMYK JPEG (with an upper-case extension), a 16-bit PNG, an RGBA PNG, a GIF, a BMP, a TIFF, a WebP.
Every image has its own size and aspect ratio. The same arguments give the same pixels.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tl_dist.console import CommandParser

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (40, 60, 230), "yellow": (235, 220, 30),
           "magenta": (220, 40, 200), "cyan": (40, 210, 220), "orange": (245, 140, 20), "purple": (120, 40, 170),
           "white": (250, 250, 250), "pink": (250, 160, 190), "brown": (120, 70, 30), "lime": (160, 240, 60),
           "navy": (20, 30, 110), "teal": (20, 120, 120), "olive": (120, 120, 20), "maroon": (120, 20, 40),
           "black": (10, 10, 10)}
MAX_CLASSES = len(SHAPES) * len(COLOURS)  # 102, as many as Caltech-101 has
# How image i of a class is saved, by i modulo 10 (0: a plain RGB JPEG).
QUIRKS = {1: "grayscale", 2: "palette", 3: "cmyk", 4: "16bit", 5: "rgba", 6: "gif", 7: "bmp", 8: "tiff",
          9: "webp"}
# The quick start without network: a network that learns the shapes from random weights (ImageNet weights
# would be a download too), with the whole workflow of a run (its frozen backbone's features included).
TRAIN_OPTIONS = ("--model", "resnet18", "--weights", "none", "--image-size", "64", "--batch-size", "16",
                 "--lr", "0.005", "--epochs", "10")


def class_names(classes: int) -> list[str]:
    """The first `classes` (shape, colour) pairs: class i is shape i mod 6 in colour i mod 17, so that any
    few classes differ in both, and all 102 pairs occur once (6 and 17 have no common divisor)."""
    if not 1 <= classes <= MAX_CLASSES:
        raise ValueError(f"classes must be 1 to {MAX_CLASSES}, not {classes}")
    colours = list(COLOURS)
    return [f"{colours[i % len(colours)]}_{SHAPES[i % len(SHAPES)]}" for i in range(classes)]


def draw(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One picture of class `name` (`<colour>_<shape>`), each side 0.7 to 1.3 times `size` px."""
    colour, shape = name.rsplit("_", 1)
    width, height = (max(12, int(size * f)) for f in rng.uniform(0.7, 1.3, 2))
    grey = rng.integers(100, 160)
    background = np.clip(grey + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(background)
    radius = min(width, height) * rng.uniform(0.28, 0.45)
    cx, cy = (rng.uniform(radius, side - radius) for side in (width, height))
    fill = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in COLOURS[colour])
    _draw_shape(ImageDraw.Draw(img), shape, (cx, cy), radius, rng.uniform(0, math.pi / 2), fill)
    return img


def _draw_shape(canvas: ImageDraw.ImageDraw, shape: str, centre, radius: float, angle: float, fill) -> None:
    cx, cy = centre

    def polygon(corners: int, start: float) -> list[tuple[float, float]]:
        return [(cx + radius * math.cos(start + angle + 2 * math.pi * k / corners),
                 cy + radius * math.sin(start + angle + 2 * math.pi * k / corners)) for k in range(corners)]

    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        canvas.ellipse(box, fill=fill)
    elif shape == "ring":
        canvas.ellipse(box, outline=fill, width=max(2, int(radius / 3)))
    elif shape == "square":
        canvas.polygon(polygon(4, math.pi / 4), fill=fill)
    elif shape == "diamond":
        canvas.polygon([(cx, cy - radius), (cx + radius * 0.6, cy), (cx, cy + radius), (cx - radius * 0.6, cy)],
                       fill=fill)
    elif shape == "triangle":
        canvas.polygon(polygon(3, -math.pi / 2), fill=fill)
    elif shape == "cross":
        arm = max(2, int(radius / 2.5))
        for a in (angle, angle + math.pi / 2):
            dx, dy = radius * math.cos(a), radius * math.sin(a)
            canvas.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=fill, width=arm)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def save(img: Image.Image, stem: Path, quirk: str | None) -> Path:
    """Save `img` as the given quirk of the real data (None: an RGB JPEG). Returns the file written."""
    if quirk == "grayscale":
        path = stem.with_suffix(".jpg")
        img.convert("L").save(path, quality=90)
    elif quirk == "palette":  # a palette PNG whose colour 0 is transparent
        path = stem.with_suffix(".png")
        img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(path, transparency=0)
    elif quirk == "cmyk":
        path = stem.with_suffix(".JPG")
        img.convert("CMYK").save(path, quality=90)
    elif quirk == "16bit":  # 16-bit grayscale, as scanners write
        path = stem.with_suffix(".png")
        Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257).save(path)
    elif quirk == "rgba":
        path = stem.with_suffix(".png")
        rgba = img.convert("RGBA")
        rgba.putalpha(200)
        rgba.save(path)
    else:
        suffix = {"gif": ".gif", "bmp": ".bmp", "tiff": ".tiff", "webp": ".webp", None: ".jpg"}[quirk]
        path = stem.with_suffix(suffix)
        img.save(path, **({"quality": 90} if suffix in (".jpg", ".webp") else {}))
    return path


def make_shapes(root: Path, classes: int = 10, per_class: int = 60, size: int = 64, seed: int = 0,
                quirks: bool = True) -> Path:
    """Write `classes` class folders of `per_class` images each under `root` (created; it must not hold
    them already). `quirks`: nine images in ten in the real data's odd formats (QUIRKS), else all RGB JPEGs.
    Returns `root`."""
    root = Path(root)
    for c, name in enumerate(class_names(classes)):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, c, i])
            save(draw(name, size, rng), folder / f"{name}_{i:04d}", QUIRKS.get(i % 10) if quirks else None)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="tl_dist.shapes", description="Write a small generated image-folder data set "
                           "(coloured shapes) and print how to train on it.")
    parser.add_argument("dir", type=Path, help="the folder to write (must not exist, or be empty)")
    parser.add_argument("--classes", type=int, default=10, help=f"how many classes, 1 to {MAX_CLASSES}")
    parser.add_argument("--per-class", type=int, default=60, help="images per class")
    parser.add_argument("--size", type=int, default=64, help="about how many pixels an image's sides have")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same images")
    args = parser.parse_args(argv)
    if not 1 <= args.classes <= MAX_CLASSES:
        parser.error(f"argument --classes: must be 1 to {MAX_CLASSES}")
    if args.per_class < 1 or args.size < 16:
        parser.error("argument --per-class must be at least 1 and --size at least 16")
    if args.dir.exists() and (not args.dir.is_dir() or any(args.dir.iterdir())):
        parser.error(f"argument dir: {args.dir} exists and is not an empty folder; name a new one")
    make_shapes(args.dir, args.classes, args.per_class, args.size, args.seed)
    print(f"wrote {args.classes} classes x {args.per_class} images to {args.dir}; train on them from random "
          f"weights (nothing to download):\n  accelerate launch -q tl_dist/train.py --data-dir {args.dir} "
          + " ".join(TRAIN_OPTIONS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
