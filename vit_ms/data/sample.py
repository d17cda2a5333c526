"""The embedded sample set: five classes of 64x64 shapes and textures, generated offline and deterministically.

Used by the README's first commands and by the tests, so vit_ms can be tried with no download. The classes
differ only by shape or texture (checkers, circles, crosses, stripes, triangles), never by colour.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..files import write_text_atomic
from .files import DatasetError, default_data_root

logger = logging.getLogger(__name__)

SAMPLE_CLASSES = ("checkers", "circles", "crosses", "stripes", "triangles")
SAMPLE_VERSION = 6  # bump when the generator changes, so stale copies are regenerated
_SAMPLE_SIZE = 64  # image side in pixels
_SAMPLE_SPLITS = {"train": 240, "val": 30}  # images per class
_SAMPLE_INFER = 2  # flat images per class in infer/
_SAMPLE_MARKER = "SAMPLE_VERSION"


def _two_colours(rng: np.random.Generator):
    """A light foreground and a dark background of random hues.

    Every class draws from the same colour distribution, so hue says nothing about the class; the fixed
    light-on-dark polarity keeps edges easy to see for a tiny model, and the brightness ranges are wide
    enough that mean brightness overlaps between classes.
    """
    light = rng.integers(0, 256, 3).astype(np.float64)
    dark = rng.integers(0, 256, 3).astype(np.float64)
    light = 140 + (255 - 140) * light / 255  # each channel in [140, 255]
    dark = 100 * dark / 255  # each channel in [0, 100]
    return tuple(int(x) for x in light), tuple(int(x) for x in dark)


def _regular_polygon(cx, cy, radius, sides, theta):
    return [(cx + radius * math.cos(theta + 2 * math.pi * k / sides),
             cy + radius * math.sin(theta + 2 * math.pi * k / sides)) for k in range(sides)]


def _draw_sample(label: str, rng: np.random.Generator) -> Image.Image:
    """One 64x64 RGB image of class `label`, drawn at 2x and box-downsampled (anti-aliased edges)."""
    fg, bg = _two_colours(rng)
    side = _SAMPLE_SIZE * 2
    if label in ("circles", "crosses", "triangles"):
        # One large shape near the centre, so the eval centre crop (and most training crops) hold it.
        image = Image.new("RGB", (side, side), bg)
        draw = ImageDraw.Draw(image)
        r = rng.uniform(0.25, 0.38) * side
        cx, cy = side / 2 + rng.uniform(-0.12, 0.12, 2) * side
        theta = rng.uniform(0, 2 * math.pi)
        if label == "circles":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        elif label == "crosses":  # a plus sign: two bars of width r/2 at a random angle
            for angle in (theta, theta + math.pi / 2):
                dx, dy = math.cos(angle), math.sin(angle)
                w = 0.25 * r
                draw.polygon([(cx + r * dx - w * dy, cy + r * dy + w * dx), (cx + r * dx + w * dy, cy + r * dy - w * dx),
                              (cx - r * dx + w * dy, cy - r * dy - w * dx), (cx - r * dx - w * dy, cy - r * dy + w * dx)],
                             fill=fg)
        else:
            draw.polygon(_regular_polygon(cx, cy, r * 1.25, 3, theta), fill=fg)
    else:
        period = rng.uniform(0.12, 0.3) * side
        theta = rng.uniform(0, math.pi)
        yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
        u = (xx * math.cos(theta) + yy * math.sin(theta)) / period + rng.uniform()
        v = (yy * math.cos(theta) - xx * math.sin(theta)) / period + rng.uniform()
        if label == "stripes":
            on = (u % 1.0) < rng.uniform(0.25, 0.5)  # light share of each period, overlapping the shapes'
        else:
            on = (np.floor(u) + np.floor(v)) % 2 == 0
        image = Image.fromarray(np.where(on[..., None], np.uint8(fg), np.uint8(bg)).astype(np.uint8))
    image = image.resize((_SAMPLE_SIZE, _SAMPLE_SIZE), Image.Resampling.BOX)
    noisy = np.asarray(image, np.int16) + rng.integers(-4, 5, (_SAMPLE_SIZE, _SAMPLE_SIZE, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _write_sample(target: Path) -> None:
    # One seeded generator per (split, class): the bytes of a file never depend on generation order.
    # PNG is lossless and Pillow's encoder is deterministic, so every generation writes the same bytes.
    for split_index, split in enumerate(("train", "val", "infer")):
        for class_index, label in enumerate(SAMPLE_CLASSES):
            rng = np.random.default_rng([SAMPLE_VERSION, split_index, class_index])
            if split == "infer":
                folder, count = target / "infer", _SAMPLE_INFER
            else:
                folder, count = target / split / label, _SAMPLE_SPLITS[split]
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                name = f"{label}_{i:02d}.png" if split == "infer" else f"{i:04d}.png"
                _draw_sample(label, rng).save(folder / name, format="PNG", compress_level=1)
    write_text_atomic(target / _SAMPLE_MARKER, f"{SAMPLE_VERSION}\n")  # written last: marks a complete set


def ensure_sample_dataset(root=None) -> Path:
    """Return the embedded sample set, generating it on first use (offline, deterministic, a few seconds).

    Five classes that differ only by shape or texture (checkers, circles, crosses, stripes, triangles),
    64x64 PNGs: 240 train and 30 val images per class in ROOT/{train,val}/<class>/, and 10 flat images
    in ROOT/infer/. It is written into a temporary folder and renamed into place when complete, so an
    interrupted generation never leaves a partial set, and concurrent callers (data-parallel ranks) agree.

    Args:
        root: where the set lives; default `<data root>/sample` (see `default_data_root`, $VIT_MS_DATA).

    Returns:
        The dataset root, holding train/, val/ and infer/.
    """
    target = Path(root).expanduser().resolve() if root is not None else default_data_root() / "sample"
    marker = target / _SAMPLE_MARKER
    if marker.is_file() and marker.read_text().strip() == str(SAMPLE_VERSION):
        return target
    if target.exists() and not marker.is_file() and any(target.iterdir()):
        raise DatasetError(f"{target} exists and is not a vit_ms sample set (no {_SAMPLE_MARKER} file); "
                              f"remove it or pass another root to ensure_sample_dataset")
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("generating the sample dataset into %s", target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the renamed dataset should read like any folder
        _write_sample(tmp)
        stale = None
        if target.exists():  # an older SAMPLE_VERSION (or an empty folder): move aside, then replace
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, stale / "old")
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process renamed its copy first; it holds the same bytes.
            if not marker.is_file():
                raise
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


__all__ = ["SAMPLE_CLASSES", "SAMPLE_VERSION", "ensure_sample_dataset"]
