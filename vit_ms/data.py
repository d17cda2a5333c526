"""Input pipelines on MindSpore's C++ image ops, shared by training, evaluation and inference; the checks
that keep bad files out of them; the tutorial's dataset download; and the embedded sample set.

Layout (ImageFolder): ROOT/{train,val}/<class>/<image>, classes are the sorted folder names, and
ROOT/infer/ holds loose images (flat or in sub-folders). Images are matched by extension, case-
insensitively (`IMAGE_EXTENSIONS`); every other file (`.DS_Store`, `README.txt`, hidden files) is ignored.

Why not `ImageFolderDataset` directly: it cannot exclude files, so one GIF named `.jpg` or one truncated
download kills the epoch, and its error-samples mode dumps the bad images into the working directory.
Here each split is scanned and checked with Pillow first (the check is stricter than MindSpore's
decoder), and the pipeline is a random-access source over the good files only that yields the encoded
bytes; decoding, cropping, resizing and normalising are MindSpore's C++ vision ops, as in the tutorial.
`benchmarks/bench_data.py` measures both designs. MindSpore's decoder always returns 3-channel RGB
(grayscale, CMYK, RGBA and palette images included); `load_image` gives the same for inference.

Run `python -m vit_ms.data verify ROOT` to list unreadable images, or `python -m vit_ms.data sample`
and `python -m vit_ms.data download` to prepare a dataset.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import stat
import sys
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

import mindspore.dataset as ds
import mindspore.dataset.vision as vision

from .config import Preprocess

logger = logging.getLogger(__name__)

# What MindSpore's Decode reads (measured: WebP and GIF fail there, so they are not image files here).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
# Formats as Pillow names them after sniffing the bytes (MPO: multi-picture JPEGs from cameras).
_DECODABLE_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "TIFF"}
_INTERPOLATIONS = {"nearest": vision.Inter.NEAREST, "bilinear": vision.Inter.BILINEAR,
                   "bicubic": vision.Inter.BICUBIC, "area": vision.Inter.AREA,
                   "lanczos": vision.Inter.ANTIALIAS}


@dataclass(frozen=True)
class DatasetInfo:
    """What `create_dataset` found: the label order, the images it reads and the files it left out."""

    root: Path  # the dataset root
    split: str  # "train", "val", ...
    class_names: Tuple[str, ...]  # label i is class_names[i]
    num_images: int  # readable images in this split (all shards together)
    skipped: Tuple[Tuple[Path, str], ...] = ()  # (file, reason) of each unreadable image left out


class DatasetError(ValueError):
    """A dataset folder does not have the layout the pipelines need; the message says what to fix."""


class UnreadableImageError(ValueError):
    """An image file cannot be decoded; the message names the file and the reason."""


# ---------------------------------------------------------------------------------------------------------
# Finding and checking image files
# ---------------------------------------------------------------------------------------------------------

def is_image_file(path) -> bool:
    """True for a visible file whose extension (any case) is in `IMAGE_EXTENSIONS`."""
    path = Path(path)
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder) -> List[Path]:
    """Sorted image files under `folder` (recursive, hidden folders skipped), e.g. an infer/ split."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"image folder {folder} does not exist")
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames if is_image_file(f)]
    return sorted(found)


def check_image(path) -> Optional[str]:
    """Why `path` cannot be used as an image, or None if it decodes.

    Pillow sniffs the format from the bytes (a GIF named .jpg is caught) and then decodes the whole file;
    for JPEG at 1/8 scale, which still reads every entropy-coded byte, so a truncated file is caught at
    a quarter of the cost of a full decode. Measured to be at least as strict as MindSpore's decoder.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as image:
            if image.format not in _DECODABLE_FORMATS:
                return f"{image.format} data, which MindSpore cannot decode (convert it to JPEG or PNG)"
            if image.width < 1 or image.height < 1:
                return f"empty image ({image.width}x{image.height})"
            image.draft("RGB", (1, 1))
            image.load()
    except Exception as error:  # any decoder failure means "unreadable": report it, never crash the scan
        reason = str(error) or type(error).__name__
        if "cannot identify image file" in reason:
            return "not an image (unknown file format)"
        return f"{type(error).__name__}: {reason}"
    return None


def _worker_count(num_workers: Optional[int]) -> int:
    cores = os.cpu_count() or 1
    return max(1, min(num_workers or cores, cores))


def _check_all(paths: Sequence[Path], num_workers: Optional[int] = None) -> List[Optional[str]]:
    # Pillow releases the GIL while decoding, so threads overlap; results keep the input order.
    if len(paths) < 64:
        return [check_image(p) for p in paths]
    with ThreadPoolExecutor(_worker_count(num_workers)) as pool:
        return list(pool.map(check_image, paths, chunksize=32))


def verify_images(root, num_workers: Optional[int] = None) -> List[Tuple[Path, str]]:
    """Decode every image file under `root` (recursively) and return the unreadable ones.

    Args:
        root: a dataset root, a split folder or any folder of images.
        num_workers: checking threads, capped at the core count.

    Returns:
        Sorted (path, reason) pairs; empty when every image decodes.
    """
    paths = list_images(root)
    return [(p, reason) for p, reason in zip(paths, _check_all(paths, num_workers)) if reason]


def load_image(path) -> Image.Image:
    """Open one image as 3-channel RGB (grayscale, CMYK, RGBA and palette images converted).

    Raises:
        UnreadableImageError: naming the file and why it cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise UnreadableImageError(f"image file {path} does not exist")
    reason = check_image(path)
    if reason:
        raise UnreadableImageError(f"cannot read image {path}: {reason}")
    with Image.open(path) as image:
        # Like MindSpore's Decode: alpha dropped (not composited), EXIF orientation not applied.
        return image.convert("RGB")


# ---------------------------------------------------------------------------------------------------------
# Transforms and pipelines
# ---------------------------------------------------------------------------------------------------------

def _interpolation(preprocess: Preprocess):
    try:
        return _INTERPOLATIONS[preprocess.interpolation]
    except KeyError:
        raise ValueError(f"Preprocess.interpolation {preprocess.interpolation!r} is not supported; "
                         f"choose one of {sorted(_INTERPOLATIONS)}") from None


def _normalize(preprocess: Preprocess) -> list:
    # Normalize works on [0, 255] pixels; Preprocess keeps mean/std in [0, 1] units.
    return [vision.Normalize(mean=[255 * m for m in preprocess.mean], std=[255 * s for s in preprocess.std]),
            vision.HWC2CHW()]


def eval_transforms(preprocess: Preprocess, decode: bool = True) -> list:
    """Decode, resize the short side to `resize_size`, centre-crop `image_size`, normalise, HWC -> CHW."""
    ops = [vision.Decode()] if decode else []
    ops += [vision.Resize(preprocess.resize_size, interpolation=_interpolation(preprocess)),
            vision.CenterCrop(preprocess.image_size)]
    return ops + _normalize(preprocess)


def train_transforms(preprocess: Preprocess, crop_scale=(0.08, 1.0), crop_ratio=(0.75, 1.333)) -> list:
    """Inception-style random crop decoded and resized in one op, horizontal flip, normalise, HWC -> CHW."""
    return [vision.RandomCropDecodeResize(preprocess.image_size, scale=tuple(crop_scale),
                                          ratio=tuple(crop_ratio), interpolation=_interpolation(preprocess)),
            vision.RandomHorizontalFlip(prob=0.5)] + _normalize(preprocess)


def preprocess_image(image: Image.Image, preprocess: Preprocess) -> np.ndarray:
    """The eval transform on one RGB image (as `load_image` returns it) -> float32 (3, S, S).

    The same MindSpore ops as the eval pipeline, so infer and eval cannot drift apart.
    """
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    for op in eval_transforms(preprocess, decode=False):
        array = op(array)
    return np.ascontiguousarray(array, dtype=np.float32)  # (3, S, S)


def _split_dir(root, split: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist; prepare one with "
                           f"`python -m vit_ms.data sample` (offline) or `python -m vit_ms.data download`, "
                           f"or point to a folder laid out as ROOT/{{train,val}}/<class>/<image>")
    split_dir = root / split
    if not split_dir.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise DatasetError(f"split folder {split_dir} does not exist (folders in {root}: {present}); "
                           f"expected ROOT/{split}/<class>/<image>")
    return split_dir


def class_names(root, split: str = "train") -> List[str]:
    """Sorted class folder names of ROOT/split (hidden folders ignored).

    Raises:
        DatasetError: when ROOT or ROOT/split is missing or holds no class folders.
    """
    split_dir = _split_dir(root, split)
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        loose = sum(1 for p in split_dir.iterdir() if is_image_file(p))
        hint = f" (it holds {loose} loose images; put each class in its own sub-folder)" if loose else ""
        raise DatasetError(f"split folder {split_dir} has no class folders{hint}; "
                           f"expected {split_dir}/<class>/<image>")
    return names


def scan_split(root, split: str, classes: Optional[Sequence[str]] = None
               ) -> Tuple[List[Tuple[Path, int]], List[str]]:
    """(path, label) of every image file of ROOT/split, and the class names; no decoding.

    Args:
        root: dataset root.
        split: split folder name.
        classes: the classes the labels must refer to (e.g. the train split's, or a checkpoint's);
            the split's folders must be exactly these. Default: the split's own folders.

    Raises:
        DatasetError: missing folders, no classes, an empty class folder, or a different class set.
    """
    found = class_names(root, split)
    split_dir = Path(root).expanduser() / split
    if classes is not None:
        names = list(classes)
        if sorted(names) != found:
            missing, extra = sorted(set(names) - set(found)), sorted(set(found) - set(names))
            raise DatasetError(f"classes of {split_dir} differ from the expected {len(names)} classes: "
                               f"missing {missing[:10]}, unexpected {extra[:10]}; every split needs the same "
                               f"class folders as the training split")
    else:
        names = found
    samples = []
    for label, name in enumerate(names):
        files = list_images(split_dir / name)
        if not files:
            raise DatasetError(f"class folder {split_dir / name} has no image files ({', '.join(IMAGE_EXTENSIONS)}"
                               f", any case); add images or remove the folder")
        samples += [(path, label) for path in files]
    return samples, names


class _EncodedImages:
    """Random-access source: (encoded image bytes uint8 (n,), label int32 ()) per good file."""

    def __init__(self, samples: Sequence[Tuple[Path, int]]):
        self.paths = [str(p) for p, _ in samples]
        self.labels = np.array([label for _, label in samples], dtype=np.int32)

    def __getitem__(self, index):
        return np.fromfile(self.paths[index], dtype=np.uint8), self.labels[index]

    def __len__(self):
        return len(self.paths)


def create_dataset(root, split: str, preprocess: Preprocess, batch_size: int, *, training: Optional[bool] = None,
                   num_workers: Optional[int] = None, num_shards: Optional[int] = None,
                   shard_id: Optional[int] = None, shuffle: Optional[bool] = None,
                   drop_remainder: Optional[bool] = None, class_names: Optional[Sequence[str]] = None,
                   check: bool = True, crop_scale=(0.08, 1.0), crop_ratio=(0.75, 1.333)
                   ) -> Tuple[ds.Dataset, DatasetInfo]:
    """Batches of ("image" float32 (B, 3, S, S), "label" int32 (B,)) from ROOT/split.

    Every image file is checked first (see `check_image`); unreadable ones are skipped and counted in a
    warning, so a bad file never stops an epoch. Returns the dataset and a `DatasetInfo` (label order,
    image count, the files left out).

    Args:
        root: dataset root holding one folder per split.
        split: "train", "val", ...
        preprocess: image size, mean, std, crop ratio and interpolation (from the model's config or
            checkpoint metadata).
        batch_size: images per batch.
        training: random-crop/flip augmentation; defaults to `split == "train"`.
        num_workers: parallel decode workers, capped at the core count (default: all cores).
        num_shards, shard_id: data-parallel sharding; each shard gets a disjoint part of the files.
        shuffle, drop_remainder: default to `training`.
        class_names: the label order to use (pass the train split's or the checkpoint's to evaluate);
            the split must hold exactly these class folders.
        check: decode-check every file first (a few ms per image); False trusts the files.
        crop_scale, crop_ratio: area and aspect ranges of the training random crop.

    Raises:
        DatasetError: missing root/split, no classes, an empty class folder, different class sets, or no
            readable image at all.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if (num_shards is None) != (shard_id is None):
        raise ValueError("pass both num_shards and shard_id, or neither")
    training = split == "train" if training is None else training
    shuffle = training if shuffle is None else shuffle
    drop_remainder = training if drop_remainder is None else drop_remainder
    workers = _worker_count(num_workers)

    samples, names = scan_split(root, split, class_names)
    skipped = []
    if check:
        reasons = _check_all([p for p, _ in samples], workers)
        skipped = [(p, r) for (p, _), r in zip(samples, reasons) if r]
        samples = [s for s, r in zip(samples, reasons) if not r]
        if skipped:
            shown = "; ".join(f"{p}: {r}" for p, r in skipped[:5])
            logger.warning("%s/%s: skipping %d unreadable image file(s) of %d (%s%s); list them all with "
                           "`python -m vit_ms.data verify %s`", root, split, len(skipped),
                           len(samples) + len(skipped), shown, "; ..." if len(skipped) > 5 else "", root)
    if not samples:
        raise DatasetError(f"{Path(root) / split} has no readable images ({len(skipped)} unreadable); run "
                           f"`python -m vit_ms.data verify {root}` to see why")
    if num_shards is not None and len(samples) < num_shards:
        raise DatasetError(f"{Path(root) / split} has {len(samples)} images, fewer than {num_shards} shards")

    # One thread: the source only reads bytes and the C++ map below does the real work. Two source
    # threads fight over the GIL with the map's workers: 3-10x slower epochs with 2 map workers
    # (measured with benchmarks/bench_data.py on 2 cores).
    dataset = ds.GeneratorDataset(_EncodedImages(samples), column_names=["image", "label"], shuffle=shuffle,
                                  num_shards=num_shards, shard_id=shard_id, num_parallel_workers=1,
                                  python_multiprocessing=False)
    transforms = (train_transforms(preprocess, crop_scale, crop_ratio) if training
                  else eval_transforms(preprocess))
    dataset = dataset.map(transforms, input_columns="image", num_parallel_workers=workers)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    info = DatasetInfo(root=Path(root), split=split, class_names=tuple(names), num_images=len(samples),
                       skipped=tuple((Path(p), r) for p, r in skipped))
    return dataset, info


# ---------------------------------------------------------------------------------------------------------
# Data root and the embedded sample set
# ---------------------------------------------------------------------------------------------------------

DATA_ENV = "VIT_MS_DATA"  # overrides the data root (where the sample set and downloads land)
SAMPLE_CLASSES = ("checkers", "circles", "crosses", "stripes", "triangles")
SAMPLE_VERSION = 6  # bump when the generator changes, so stale copies are regenerated
_SAMPLE_SIZE = 64  # image side in pixels
_SAMPLE_SPLITS = {"train": 240, "val": 30}  # images per class
_SAMPLE_INFER = 2  # flat images per class in infer/
_SAMPLE_MARKER = "SAMPLE_VERSION"


def default_data_root() -> Path:
    """The data root: $VIT_MS_DATA if set, else `datasets/` of the source checkout.

    An installed (non-editable) package has no checkout beside it; it then uses ~/.cache/vit_ms/datasets.
    """
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser().resolve()
    repo = Path(__file__).resolve().parent.parent
    if (repo / "setup.py").is_file() or (repo / "datasets").is_dir():
        return repo / "datasets"
    return Path.home() / ".cache" / "vit_ms" / "datasets"


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
    (target / _SAMPLE_MARKER).write_text(f"{SAMPLE_VERSION}\n")


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


# ---------------------------------------------------------------------------------------------------------
# The tutorial's dataset
# ---------------------------------------------------------------------------------------------------------

TUTORIAL_URL = ("https://mindspore-website.obs.cn-north-4.myhuaweicloud.com/notebook/datasets/"
                "vit_imagenet_dataset.zip")
TUTORIAL_ARCHIVE = "vit_imagenet_dataset.zip"
TUTORIAL_DIR = "imagenet_subset"


def _safe_members(archive: zipfile.ZipFile, archive_path: Path) -> List[zipfile.ZipInfo]:
    """All members, after rejecting any that could write outside the extraction folder."""
    members = archive.infolist()
    for info in members:
        name = info.filename.replace("\\", "/")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        mode = info.external_attr >> 16
        if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts:
            raise DatasetError(f"{archive_path} member {info.filename!r} would be written outside the target "
                               f"folder; refusing to extract this archive")
        kind = stat.S_IFMT(mode)  # 0 when the archiver stored no Unix file type (plain files)
        if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise DatasetError(f"{archive_path} member {info.filename!r} is a link or special file; refusing "
                               f"to extract this archive")
    return members


def _extract_zip(archive_path: Path, dest: Path) -> None:
    """Extract into `dest` (which must exist) after checking every member, then verify every CRC."""
    try:
        with zipfile.ZipFile(archive_path) as archive:
            members = _safe_members(archive, archive_path)  # all checked before anything is written
            for info in members:
                parts = [p for p in info.filename.replace("\\", "/").split("/") if p not in ("", ".")]
                if not parts:
                    continue
                out = dest.joinpath(*parts)
                if info.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(out, "wb") as dst:  # open() checks the CRC at EOF
                    shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as error:
        raise DatasetError(f"{archive_path} is not a complete zip archive ({error}); delete it and run again, "
                           f"or place a complete copy of {TUTORIAL_URL} there") from error


def download_tutorial_dataset(root=None, url: str = TUTORIAL_URL, timeout: float = 30.0,
                              progressbar: bool = True) -> Path:
    """The MindSpore ViT tutorial's ImageNet subset, downloaded and extracted once into ROOT/imagenet_subset.

    The archive is fetched with the `download` package into ROOT/vit_imagenet_dataset.zip (the package
    writes a `.part` file and renames it when the size matches), every member is checked (no `..`,
    absolute paths or links), the archive is extracted into a hidden temporary folder beside the target,
    and the {train,val,infer} folder is renamed into place only when extraction is complete. An archive
    placed there by hand is used without any network access.

    Args:
        root: the data root (default: `default_data_root()`, i.e. datasets/ or $VIT_MS_DATA).
        url: where to fetch the archive (a mirror, or a local server in tests).
        timeout: seconds to wait for the server to answer.
        progressbar: show a download progress bar.

    Returns:
        ROOT/imagenet_subset, holding train/, val/ and infer/.

    Raises:
        DatasetError: the download failed (the message says where to place the archive by hand), or the
            archive is incomplete or unsafe.
    """
    root = Path(root).expanduser().resolve() if root is not None else default_data_root()
    target = root / TUTORIAL_DIR
    if (target / "train").is_dir():
        return target
    if target.exists():
        raise DatasetError(f"{target} exists but has no train/ folder; remove it and run again")
    root.mkdir(parents=True, exist_ok=True)
    archive = root / TUTORIAL_ARCHIVE
    downloaded = False
    if not archive.is_file():
        from download import download  # imported here: only this function needs it

        logger.info("downloading %s into %s", url, archive)
        try:
            download(url, str(archive), kind="file", replace=True, timeout=timeout, progressbar=progressbar,
                     verbose=progressbar)
        except Exception as error:  # the package wraps every failure in RuntimeError; name the fix
            raise DatasetError(f"could not download {url} ({str(error).splitlines()[-1]}). Without network, "
                               f"download it elsewhere and place it at {archive}, then run again") from error
        if not archive.is_file():
            raise DatasetError(f"download of {url} did not produce {archive}; place the archive there by hand")
        downloaded = True
    tmp = Path(tempfile.mkdtemp(prefix=f".{TUTORIAL_DIR}.tmp-", dir=root))
    try:
        logger.info("extracting %s", archive)
        tmp.chmod(0o755)
        _extract_zip(archive, tmp)
        # The archive holds dataset/{train,val,infer}; accept the splits at the top level too.
        candidates = [tmp] + sorted(p for p in tmp.iterdir() if p.is_dir())
        source = next((c for c in candidates if (c / "train").is_dir()), None)
        if source is None:
            raise DatasetError(f"{archive} has no train/ folder (top level: "
                               f"{sorted(p.name for p in tmp.iterdir())}); is it the tutorial's archive?")
        os.rename(source, target)
    except DatasetError:
        if downloaded:  # a broken download is useless; a hand-placed archive is the user's to delete
            archive.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if downloaded:
        archive.unlink()  # the extracted copy is what the pipelines read; keep the disk usage single
    logger.info("tutorial dataset ready in %s", target)
    return target


# ---------------------------------------------------------------------------------------------------------
# Command line: python -m vit_ms.data {verify,sample,download}
# ---------------------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    """`verify ROOT` lists unreadable images (exit 1 if any); `sample` and `download` prepare datasets."""
    parser = argparse.ArgumentParser(prog="python -m vit_ms.data", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="decode every image under ROOT and list the unreadable ones")
    verify.add_argument("root", help="dataset root, split folder or any folder of images (searched recursively)")
    verify.add_argument("--workers", type=int, default=None, help="checking threads (default: all cores)")
    sample = commands.add_parser("sample", help="generate the offline sample set (deterministic)")
    sample.add_argument("--root", default=None, help="where to write it (default: <data root>/sample)")
    download = commands.add_parser("download", help="download and extract the tutorial's ImageNet subset")
    download.add_argument("--root", default=None, help="data root (default: datasets/ or $VIT_MS_DATA)")
    download.add_argument("--url", default=TUTORIAL_URL, help="archive URL (default: the tutorial's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "verify":
            total = len(list_images(args.root))
            bad = verify_images(args.root, args.workers)
            for path, reason in bad:
                print(f"{path}: {reason}")
            print(f"{total - len(bad)} of {total} images readable, {len(bad)} unreadable under {args.root}")
            return 1 if bad else 0
        if args.command == "sample":
            print(ensure_sample_dataset(args.root))
        else:
            print(download_tutorial_dataset(args.root, url=args.url))
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


__all__ = ["DatasetInfo", "IMAGE_EXTENSIONS", "SAMPLE_CLASSES", "TUTORIAL_URL", "DatasetError", "UnreadableImageError",
           "class_names", "create_dataset", "scan_split", "check_image", "verify_images", "list_images",
           "is_image_file", "load_image", "preprocess_image", "eval_transforms", "train_transforms",
           "default_data_root", "ensure_sample_dataset", "download_tutorial_dataset"]

if __name__ == "__main__":
    sys.exit(main())
