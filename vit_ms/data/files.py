"""Image files on disk: what counts as one, where datasets live, how they are listed, and the per-file check.

One predicate decides what an image file is (`is_image_file`: a visible file whose extension, any case, is in
`IMAGE_EXTENSIONS`); every listing in vit_ms goes through it. `check_image` says why a file cannot be fed to
the pipelines, at one of three depths (`CHECK_MODES`):

- "full": Pillow sniffs the format from the bytes and decodes the whole file (JPEG at 1/8 scale, which still
  reads every entropy-coded byte; PNG after checking every chunk's CRC up to IEND), so a truncated download
  or a GIF named .jpg is caught. Measured to be at least as strict as MindSpore's decoder.
- "header": Pillow reads the header and runs `Image.verify()` (PNG: every chunk's CRC, so a truncated PNG is
  caught; JPEG: the markers only, so a truncated JPEG passes and fails later in MindSpore's decoder).
- "none": nothing is opened.

Every depth above "none" refuses a decompression bomb (an image declaring more than `MAX_IMAGE_PIXELS`)
from its header alone, before any decoder allocates its pixels. Results are cached per file by
`vit_ms.data.manifest`.

Imports neither MindSpore nor the pipelines: `python -m vit_ms.data verify` and the check use only Pillow.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from PIL import Image

from ..files import cache_dir

# What MindSpore's Decode reads (measured: WebP and GIF fail there, so they are not image files here).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
# Formats as Pillow names them after sniffing the bytes (MPO: multi-picture JPEGs from cameras).
DECODABLE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF"})
# Pillow's own refusal threshold (2 x Image.MAX_IMAGE_PIXELS as shipped): about 13,400 x 13,400, whose RGB
# buffer is 0.5 GB. A 108 MP phone photo passes; a PNG declaring 40000 x 40000 (4.8 GB as RGB) does not.
MAX_IMAGE_PIXELS = 178_956_970
CHECK_MODES = ("full", "header", "none")
CHECK_DEPTH = {"none": 0, "header": 1, "full": 2}  # a result at a depth also answers every shallower one
DATA_ENV = "VIT_MS_DATA"  # overrides the data root (where the sample set and downloads land)


class DatasetError(ValueError):
    """A dataset folder does not have the layout the pipelines need; the message says what to fix."""


class UnreadableImageError(ValueError):
    """An image file cannot be decoded; the message names the file and the reason."""


def default_data_root() -> Path:
    """The data root, where the sample set and the tutorial download land and relative names resolve.

    In order: `$VIT_MS_DATA` if set; else `./datasets` if the current directory has one (a checkout of
    vit_ms has it, so the README's commands, run from the checkout, use the repository's data folder);
    else the cache, `vit_ms.files.cache_dir("datasets")` (`$VIT_MS_HOME/datasets`, default
    `~/.cache/vit_ms/datasets`), which is where an installed package run from anywhere else keeps data.
    Nothing is created here.
    """
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser().resolve()
    local = Path.cwd() / "datasets"
    if local.is_dir():
        return local
    return cache_dir("datasets")


def is_image_file(path) -> bool:
    """True for a visible file whose extension (any case) is in `IMAGE_EXTENSIONS`."""
    name = os.fspath(path)
    return _is_image_name(name[name.rfind(os.sep) + 1:])


def _is_image_name(name: str) -> bool:
    # Called once per file of a 1.28 M-file scan: two C-level string calls (every extension has one dot, so
    # endswith is "the extension after the last dot is one of them"); a name starting with "." is hidden.
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def count_images(folder, limit: int) -> int:
    """How many image files lie under `folder` (hidden folders skipped), counting no further than `limit`:
    a question like "fewer than one batch?" then costs one class folder, not a scan of the whole split."""
    count = 0
    for _, dirnames, filenames in os.walk(os.fspath(folder)):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        count += sum(1 for f in filenames if _is_image_name(f))
        if count >= limit:
            return limit
    return count


def list_image_paths(folder) -> List[str]:
    """`list_images` as plain strings: pathlib costs seconds per 100,000 files, strings milliseconds."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise DatasetError(f"image folder {folder} does not exist")
    found, nested = [], False
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        nested = nested or bool(dirnames)
        found += [f"{dirpath}{os.sep}{f}" for f in filenames if _is_image_name(f)]
    # Path order (part by part); one flat folder, the usual class folder, is plain name order.
    return sorted(found, key=lambda p: p.split(os.sep)) if nested else sorted(found)


def list_images(folder) -> List[Path]:
    """Sorted image files under `folder` (recursive, hidden folders skipped), e.g. an infer/ split."""
    return [Path(p) for p in list_image_paths(folder)]


def check_mode(check) -> str:
    """`check` as one of `CHECK_MODES`; True and False are accepted as "full" and "none"."""
    if check is True:
        return "full"
    if check is False or check is None:
        return "none"
    if check not in CHECK_MODES:
        raise ValueError(f"check must be one of {CHECK_MODES} (or True/False), got {check!r}")
    return check


def bomb_reason(width: int, height: int) -> Optional[str]:
    """Why an image of this declared size is refused, or None."""
    if width * height > MAX_IMAGE_PIXELS:
        return (f"declares {width}x{height} = {width * height / 1e6:.0f} M pixels, above the "
                f"{MAX_IMAGE_PIXELS / 1e6:.0f} M pixel limit (a decompression bomb?); if the image is genuine, "
                f"raise vit_ms.data.files.MAX_IMAGE_PIXELS")
    return None


def check_image(path, mode: str = "full") -> Optional[str]:
    """Why `path` cannot be used as an image, or None if it passes the check at depth `mode`.

    Args:
        path: the image file.
        mode: "full" (decode), "header" (open + verify, no pixel decode except for a JPEG that does not
            end with its end-of-image marker) or "none" (always None).
    """
    mode = check_mode(mode)
    if mode == "none":
        return None
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with warnings.catch_warnings():
            # Pillow warns between MAX_IMAGE_PIXELS and its hard limit; bomb_reason decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.format not in DECODABLE_FORMATS:
                    return f"{image.format} data, which MindSpore cannot decode (convert it to JPEG or PNG)"
                if image.width < 1 or image.height < 1:
                    return f"empty image ({image.width}x{image.height})"
                too_big = bomb_reason(image.width, image.height)
                if too_big:
                    return too_big
                if image.format != "PNG" and (mode == "full" or not _ends_with_jpeg_eoi(image)):
                    # Header mode decodes a JPEG only when its end-of-image marker is not at the end: a
                    # truncated file (the usual damage), or data appended after the image (phone cameras).
                    image.draft("RGB", (1, 1))
                    image.load()
                    return None
                # PNG: verify() reads every chunk's CRC up to IEND. Pillow's load() accepts a PNG cut after
                # its pixel data, which MindSpore's decoder (libpng) rejects ("input buffer is incomplete").
                image.verify()
            if mode == "full":  # verify() leaves the image unusable: decode from a fresh open
                with Image.open(path) as image:
                    image.load()
    except Image.DecompressionBombError as error:  # Pillow refuses in open(), before our size test
        return f"decompression bomb refused by Pillow: {error}"
    except Exception as error:  # any decoder failure means "unreadable": report it, never crash the scan
        reason = str(error) or type(error).__name__
        if "cannot identify image file" in reason:
            return "not an image (unknown file format)"
        return f"{type(error).__name__}: {reason}"
    return None


def _ends_with_jpeg_eoi(image) -> bool:
    """A JPEG whose file ends with the end-of-image marker FF D9 (zero padding allowed); other formats: True."""
    if image.format not in ("JPEG", "MPO"):
        return True
    stream = image.fp
    stream.seek(0, os.SEEK_END)
    stream.seek(max(0, stream.tell() - 64))
    return stream.read().rstrip(b"\x00").endswith(b"\xff\xd9")


def available_cores() -> int:
    """The CPUs this process may run on: its affinity mask where the OS keeps one (`taskset`, a container's
    cpuset, `msrun --bind_core True`, which gives each rank its own cores), else every core of the machine."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity masks (macOS, Windows)
        return os.cpu_count() or 1


def worker_count(num_workers: Optional[int]) -> int:
    """`num_workers` capped at the cores this process may use (default: all of them), at least 1."""
    cores = available_cores()
    return max(1, min(num_workers or cores, cores))


def check_images(paths: Sequence[Path], mode: str = "full", num_workers: Optional[int] = None
                 ) -> List[Optional[str]]:
    """`check_image` of each path, in order, on a thread pool (Pillow releases the GIL while decoding)."""
    if len(paths) < 64:
        return [check_image(p, mode) for p in paths]
    with ThreadPoolExecutor(worker_count(num_workers)) as pool:
        return list(pool.map(lambda p: check_image(p, mode), paths, chunksize=32))


def verify_images(root, num_workers: Optional[int] = None, mode: str = "full") -> List[Tuple[Path, str]]:
    """Check every image file under `root` (recursively, uncached) and return the unreadable ones.

    Args:
        root: a dataset root, a split folder or any folder of images.
        num_workers: checking threads, capped at the core count.
        mode: "full" or "header" (see the module docstring).

    Returns:
        Sorted (path, reason) pairs; empty when every image passes.
    """
    paths = list_images(root)
    return [(p, reason) for p, reason in zip(paths, check_images(paths, mode, num_workers)) if reason]


__all__ = ["IMAGE_EXTENSIONS", "MAX_IMAGE_PIXELS", "CHECK_MODES", "DATA_ENV", "DatasetError",
           "UnreadableImageError", "default_data_root", "is_image_file", "count_images", "list_images",
           "list_image_paths", "check_mode", "check_image", "check_images", "verify_images"]
