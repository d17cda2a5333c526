"""Input pipelines on MindSpore's C++ image ops, shared by training, evaluation and inference.

Layout (ImageFolder): ROOT/{train,val}/<class>/<image>; classes are the sorted folder names.

Why not `ImageFolderDataset` directly: it cannot exclude files, so one GIF named `.jpg` or one truncated
download kills the epoch, and its error-samples mode dumps the bad images into the working directory.
Here each split is scanned, checked (`vit_ms.data.files.check_image`, cached per file by
`vit_ms.data.manifest`), and the pipeline is a random-access source over the good files only that yields
the encoded bytes; decoding, cropping, resizing and normalising are MindSpore's C++ vision ops, as in the
tutorial. `benchmarks/bench_data.py` measures both designs.

How pixels are read, identically in `create_dataset` (train and eval) and in `load_image` +
`preprocess_image` (infer), each case measured against MindSpore's `Decode` (tests/test_data_decode.py):

- EXIF orientation is ignored: pixels stay in stored order, as MindSpore's C++ `Decode` and
  `RandomCropDecodeResize` return them and as torchvision's and timm's Pillow loaders read them, so a
  model sees at inference what it saw in training.
- Alpha is dropped, not composited (RGBA, LA, palette PNG with transparency: the palette colour of
  transparent pixels is kept); animated PNG: the first frame; CMYK and grayscale: converted to RGB.
- 16-bit samples (e.g. a 16-bit grayscale PNG) keep their high byte (value >> 8), as MindSpore's decoder
  does; Pillow's own `convert("RGB")` would saturate them to 255, so `load_image` converts them itself.
- Channels: a model gets C = len(preprocess.mean) channels. C = 3: RGB (a grayscale image is replicated).
  C = 1: ITU-R 601 luma of the RGB image (0.299 R + 0.587 G + 0.114 B, rounded to uint8 by OpenCV's
  `cvtColor`, within 0.5 of the exact value), so a grayscale image passes unchanged.
"""
from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

import mindspore.dataset as ds
import mindspore.dataset.vision as vision

from ..config import Preprocess
from .files import (IMAGE_EXTENSIONS, DatasetError, UnreadableImageError, bomb_reason, check_image, check_mode,
                    is_image_file, list_image_paths, worker_count)
from .manifest import check_split

logger = logging.getLogger(__name__)

_INTERPOLATIONS = {"nearest": vision.Inter.NEAREST, "bilinear": vision.Inter.BILINEAR,
                   "bicubic": vision.Inter.BICUBIC, "area": vision.Inter.AREA,
                   "lanczos": vision.Inter.ANTIALIAS}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True)
class DatasetInfo:
    """What `create_dataset` found: the label order, the images it reads and the files it left out."""

    root: Path  # the dataset root
    split: str  # "train", "val", ...
    class_names: Tuple[str, ...]  # label i is class_names[i]
    num_images: int  # readable images in this split (all shards together)
    skipped: Tuple[Tuple[Path, str], ...] = ()  # (file, reason) of each unreadable image left out
    checked: int = 0  # files this process checked itself (the others came from the manifest or other ranks)


# ---------------------------------------------------------------------------------------------------------
# Single images (inference)
# ---------------------------------------------------------------------------------------------------------

def to_rgb(image: Image.Image) -> Image.Image:
    """A Pillow image as 8-bit RGB, the way MindSpore's `Decode` reads the same file (module docstring)."""
    if image.mode in _SIXTEEN_BIT_MODES:  # keep the high byte, as the decoder does; convert() would saturate
        high = np.asarray(image).astype(np.int64) >> 8
        image = Image.fromarray(high.clip(0, 255).astype(np.uint8), "L")
    with warnings.catch_warnings():  # "Palette images with Transparency ...": dropping alpha is the point
        warnings.simplefilter("ignore", UserWarning)
        return image.convert("RGB")


def load_image(path) -> Image.Image:
    """Open one image as 8-bit RGB, pixel for pixel as the pipelines decode it (see the module docstring).

    Raises:
        UnreadableImageError: naming the file and why it cannot be read (a decompression bomb included).
    """
    path = Path(path)
    if not path.is_file():
        raise UnreadableImageError(f"image file {path} does not exist")
    reason = check_image(path, "full")
    if reason:
        raise UnreadableImageError(f"cannot read image {path}: {reason}")
    with Image.open(path) as image:
        return to_rgb(image)


# ---------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------

def channels(preprocess: Preprocess) -> int:
    """The channel count the model takes: len(preprocess.mean), 1 (grayscale) or 3 (RGB)."""
    count = len(preprocess.mean)
    if count not in (1, 3):
        raise ValueError(f"image files give 1 (grayscale) or 3 (RGB) channels, but Preprocess.mean has {count} "
                         f"values; a {count}-channel model needs its own input pipeline")
    return count


def _interpolation(preprocess: Preprocess):
    try:
        return _INTERPOLATIONS[preprocess.interpolation]
    except KeyError:
        raise ValueError(f"Preprocess.interpolation {preprocess.interpolation!r} is not supported; "
                         f"choose one of {sorted(_INTERPOLATIONS)}") from None


def _to_channels(preprocess: Preprocess) -> list:
    # Decode always gives RGB (H, W, 3); a 1-channel model gets the luma, (H, W).
    return [vision.ConvertColor(vision.ConvertMode.COLOR_RGB2GRAY)] if channels(preprocess) == 1 else []


def to_channels(image: np.ndarray, count: int) -> np.ndarray:
    """uint8 RGB pixels (H, W, 3) as a `count`-channel model sees them before normalising: (H, W, 3) for
    count 3, the pipeline's luma (H, W, 1) for count 1."""
    if count == 3:
        return image
    if count != 1:
        raise ValueError(f"image files give 1 (grayscale) or 3 (RGB) channels, not {count}")
    return vision.ConvertColor(vision.ConvertMode.COLOR_RGB2GRAY)(image)[:, :, None]


def _normalize(preprocess: Preprocess) -> list:
    if channels(preprocess) == 1:
        # (H, W) uint8 -> (1, H, W) float in [0, 1] (HWC2CHW would not add the channel axis).
        return [vision.ToTensor(), vision.Normalize(mean=list(preprocess.mean), std=list(preprocess.std),
                                                    is_hwc=False)]
    # Normalize works on [0, 255] pixels; Preprocess keeps mean/std in [0, 1] units.
    return [vision.Normalize(mean=[255 * m for m in preprocess.mean], std=[255 * s for s in preprocess.std]),
            vision.HWC2CHW()]


def eval_transforms(preprocess: Preprocess, decode: bool = True) -> list:
    """Decode, [luma], resize the short side to `resize_size`, centre-crop `image_size`, normalise -> (C, S, S)."""
    ops = [vision.Decode()] if decode else []
    ops += _to_channels(preprocess)
    ops += [vision.Resize(preprocess.resize_size, interpolation=_interpolation(preprocess)),
            vision.CenterCrop(preprocess.image_size)]
    return ops + _normalize(preprocess)


def train_transforms(preprocess: Preprocess, crop_scale=(0.08, 1.0), crop_ratio=(0.75, 1.333)) -> list:
    """Inception-style random crop decoded and resized in one op, [luma], horizontal flip, normalise -> (C, S, S)."""
    return ([vision.RandomCropDecodeResize(preprocess.image_size, scale=tuple(crop_scale), ratio=tuple(crop_ratio),
                                           interpolation=_interpolation(preprocess))]
            + _to_channels(preprocess) + [vision.RandomHorizontalFlip(prob=0.5)] + _normalize(preprocess))


def preprocess_image(image: Image.Image, preprocess: Preprocess) -> np.ndarray:
    """The eval transform on one image (as `load_image` returns it) -> float32 (C, S, S).

    The same MindSpore ops as the eval pipeline, so infer and eval cannot drift apart.
    """
    array = np.asarray(to_rgb(image), dtype=np.uint8)  # (H, W, 3)
    for op in eval_transforms(preprocess, decode=False):
        array = op(array)
    return np.ascontiguousarray(array, dtype=np.float32)  # (C, S, S)


# ---------------------------------------------------------------------------------------------------------
# Splits and the pipeline
# ---------------------------------------------------------------------------------------------------------

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
    paths, labels, names = scan_split_paths(root, split, classes)
    return [(Path(p), label) for p, label in zip(paths, labels)], names


def scan_split_paths(root, split: str, classes: Optional[Sequence[str]] = None
                     ) -> Tuple[List[str], List[int], List[str]]:
    """`scan_split` as (paths as strings, labels, class names): what create_dataset keeps (pathlib would cost
    seconds per 100,000 files)."""
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
    paths, labels = [], []
    for label, name in enumerate(names):
        files = list_image_paths(split_dir / name)
        if not files:
            raise DatasetError(f"class folder {split_dir / name} has no image files ({', '.join(IMAGE_EXTENSIONS)}"
                               f", any case); add images or remove the folder")
        paths += files
        labels += [label] * len(files)
    return paths, labels, names


class _EncodedImages:
    """Random-access source: (encoded image bytes uint8 (n,), label int32 ()) per good file.

    With `guard`, each file's header is read before its bytes go to MindSpore's decoder, so an unchecked
    decompression bomb stops the epoch with a message instead of a multi-GB allocation.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], guard: bool = False):
        self.paths = list(paths)
        self.labels = np.array(labels, dtype=np.int32)
        self.guard = guard

    def __getitem__(self, index):
        encoded = np.fromfile(self.paths[index], dtype=np.uint8)
        if self.guard:
            self._refuse_bomb(index, encoded)
        return encoded, self.labels[index]

    def _refuse_bomb(self, index, encoded) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(encoded.tobytes())) as image:
                    reason = bomb_reason(image.width, image.height)
        except Image.DecompressionBombError as error:
            reason = f"decompression bomb refused by Pillow: {error}"
        except Exception:  # not ours to judge with check="none": the decoder reports it
            return
        if reason:
            raise UnreadableImageError(f"{self.paths[index]}: {reason}; check='none' trusts the files, so "
                                       f"this stops the epoch; use check='header' to leave such files out")

    def __len__(self):
        return len(self.paths)


_HINTED_ROOTS = set()


def _hint_large_photos(root, paths: Sequence[str], image_size: int, shard_id: Optional[int]) -> None:
    """Once per data root and process (rank 0 only): suggest `python -m vit_ms.data shrink` for big photos."""
    key = Path(root).expanduser().resolve()
    if shard_id in (None, 0) and key not in _HINTED_ROOTS:
        _HINTED_ROOTS.add(key)
        from .shrink import large_photo_hint

        hint = large_photo_hint(paths, image_size)
        if hint:
            logger.info(hint)


def create_dataset(root, split: str, preprocess: Preprocess, batch_size: int, *, training: Optional[bool] = None,
                   num_workers: Optional[int] = None, num_shards: Optional[int] = None,
                   shard_id: Optional[int] = None, shuffle: Optional[bool] = None,
                   drop_remainder: Optional[bool] = None, class_names: Optional[Sequence[str]] = None,
                   check="full", check_group: Optional[Tuple[int, int]] = None,
                   crop_scale=(0.08, 1.0), crop_ratio=(0.75, 1.333),
                   augmentation: Optional[dict] = None) -> Tuple[ds.Dataset, DatasetInfo]:
    """Batches of ("image" float32 (B, C, S, S), "label" int32 (B,)) from ROOT/split.

    Every image file is checked first at depth `check`, through the per-file manifest (a second start
    re-checks only new or changed files; under msrun each file is checked by one rank only, see
    `vit_ms.data.manifest`); unreadable ones are skipped and counted in a warning, so a bad file never
    stops an epoch. C = len(preprocess.mean): 3 gives RGB, 1 the luma (module docstring). Returns the
    dataset and a `DatasetInfo` (label order, image count, the files left out).

    Args:
        root: dataset root holding one folder per split.
        split: "train", "val", ...
        preprocess: image size, mean, std, crop ratio and interpolation (from the model's config or
            checkpoint metadata); len(mean) is the channel count.
        batch_size: images per batch.
        training: random-crop/flip augmentation; defaults to `split == "train"`.
        num_workers: parallel decode workers, capped at the cores this process may run on (default: all).
        num_shards, shard_id: data-parallel sharding; each shard gets a disjoint part of the files, and
            the check is shared out between the shards.
        shuffle, drop_remainder: default to `training`.
        class_names: the label order to use (pass the train split's or the checkpoint's to evaluate);
            the split must hold exactly these class folders.
        check: "full" decodes every file once (a few ms per image, cached); "header" only opens and
            verifies each file (catches wrong formats, empty files, bombs and damaged PNGs, not a truncated
            JPEG, which then stops the epoch in MindSpore's decoder); "none" trusts the files: any bad file
            stops the epoch, and a decompression bomb is still refused from its header by the source, with
            an `UnreadableImageError` naming it (the epoch stops; nothing is allocated). True/False mean
            "full"/"none".
        check_group: (rank, ranks) of processes that call this concurrently and share the check (each
            checks 1/ranks of the files, then waits for the others); default (shard_id, num_shards). Pass
            it for a split every rank reads whole (e.g. val under msrun), so it is still checked once.
            Sharded calls made one after another in one process would wait for each other: check the
            split unsharded first (it is then cached) or use check="none".
        crop_scale, crop_ratio: area and aspect ranges of the training random crop.
        augmentation: options of `vit_ms.data.augment.train_augmentations` (auto_augment, ra_num_ops,
            ra_magnitude, color_jitter, random_erasing) for a training split; None or {}: the plain
            random crop + flip of `train_transforms`. RGB models only.

    Raises:
        DatasetError: missing root/split, no classes, an empty class folder, different class sets, no
            readable image at all, or (with shards) another rank's check results never arrived.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if (num_shards is None) != (shard_id is None):
        raise ValueError("pass both num_shards and shard_id, or neither")
    mode = check_mode(check)
    channels(preprocess)  # reject an unsupported channel count before any work
    training = split == "train" if training is None else training
    shuffle = training if shuffle is None else shuffle
    drop_remainder = training if drop_remainder is None else drop_remainder
    workers = worker_count(num_workers)

    paths, labels, names = scan_split_paths(root, split, class_names)
    rank, ranks = check_group if check_group is not None else (shard_id, num_shards)
    reasons, checked = check_split(Path(root).expanduser() / split, paths, mode, workers, ranks, rank)
    skipped = [(Path(p), r) for p, r in zip(paths, reasons) if r]
    if skipped:
        keep = [i for i, r in enumerate(reasons) if not r]
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        shown = "; ".join(f"{p}: {r}" for p, r in skipped[:5])
        logger.warning("%s/%s: skipping %d unreadable image file(s) of %d (%s%s); list them all with "
                       "`python -m vit_ms.data verify %s`", root, split, len(skipped),
                       len(paths) + len(skipped), shown, "; ..." if len(skipped) > 5 else "", root)
    if not paths:
        raise DatasetError(f"{Path(root) / split} has no readable images ({len(skipped)} unreadable); run "
                           f"`python -m vit_ms.data verify {root}` to see why")
    if num_shards is not None and len(paths) < num_shards:
        raise DatasetError(f"{Path(root) / split} has {len(paths)} images, fewer than {num_shards} shards")
    _hint_large_photos(root, paths, preprocess.image_size, shard_id)

    # One thread: the source only reads bytes and the C++ map below does the real work. Two source
    # threads fight over the GIL with the map's workers: 3-10x slower epochs with 2 map workers
    # (measured with benchmarks/bench_data.py on 2 cores).
    dataset = ds.GeneratorDataset(_EncodedImages(paths, labels, guard=mode == "none"), column_names=["image", "label"],
                                  shuffle=shuffle, num_shards=num_shards, shard_id=shard_id,
                                  num_parallel_workers=1, python_multiprocessing=False)
    if training and augmentation:
        if channels(preprocess) != 3:
            raise ValueError(f"augmentation options {sorted(augmentation)} need an RGB model (3 channels)")
        from .augment import train_augmentations  # augment imports this module

        transforms = train_augmentations(preprocess, crop_scale=crop_scale, crop_ratio=crop_ratio, **augmentation)
    elif training:
        transforms = train_transforms(preprocess, crop_scale, crop_ratio)
    else:
        transforms = eval_transforms(preprocess)
    # MindSpore's RandomErasing is Python code drawing from the `random` and `numpy.random` modules (seeded
    # by ms.set_seed): two workers would take the draws in whatever order their threads run, so a run would
    # not repeat. It and what follows it run in a map of their own with one worker, which takes the rows in order.
    cut = next((i for i, op in enumerate(transforms) if isinstance(op, vision.RandomErasing)), len(transforms))
    dataset = dataset.map(transforms[:cut], input_columns="image", num_parallel_workers=workers)
    if cut < len(transforms):
        dataset = dataset.map(transforms[cut:], input_columns="image", num_parallel_workers=1,
                              python_multiprocessing=False)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    info = DatasetInfo(root=Path(root), split=split, class_names=tuple(names), num_images=len(paths),
                       skipped=tuple(skipped), checked=checked)
    return dataset, info


__all__ = ["DatasetInfo", "to_rgb", "load_image", "channels", "to_channels", "eval_transforms", "train_transforms",
           "preprocess_image", "class_names", "scan_split", "scan_split_paths", "create_dataset"]
