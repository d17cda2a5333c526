"""`shrink_images(src, dst)`: a copy of an image folder whose images are no larger than training needs.

Camera and phone photos (12 megapixels and up) cost far more to decode than a ViT at 224 px can use: on
this project's 2-core machine MindSpore's `Decode` + `Resize` (the eval pipeline) took 113 ms and
`RandomCropDecodeResize` (training) 67 ms for one 4000x3000 JPEG, so evaluation of such photos waits on the
decoder, not on the model (README, "Large photos"). Shrinking them once is the usual remedy; this does it
as the pipelines would read the files:

- an image whose short side is above `short_side` is decoded as `load_image` decodes it (8-bit RGB, alpha
  dropped, EXIF orientation not applied; a JPEG straight at the smallest DCT scale that keeps at least
  `short_side`, Pillow's draft mode, which is several times cheaper than a full decode), resized with
  Pillow's antialiasing filter (Lanczos) to `short_side`, and written in its own format (JPEG at quality
  95; PNG, BMP and TIFF stay lossless);
- every other image is copied byte for byte; unreadable images are left out and listed (the pipelines'
  check would leave them out too); other files are not copied;
- the folder tree is kept (`train/<class>/...`), and a file already in `dst` that is newer than its source
  is kept, so a second run only does what changed.

The default short side, 800 px, keeps `RandomResizedCrop` honest at 224 px: its smallest crop, 8 % of the
area (DeiT's and the finetune recipe's scale 0.08), is still sqrt(0.08) x 800 = 226 px on a square photo's
side, so even that crop is not upsampled. For `--image_size S` use about 3.6 x S.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median
from typing import List, Optional, Sequence, Tuple

from PIL import Image

from ..files import atomic_path
from .files import DatasetError, check_image, list_images, worker_count

RANDOM_CROP_MIN_AREA = 0.08  # DeiT's and timm's RandomResizedCrop scale floor, the finetune recipe's
JPEG_QUALITY = 95


def short_side_for(image_size: int) -> int:
    """The short side (a multiple of 100) at which the smallest random crop still has `image_size` pixels."""
    return 100 * math.ceil(image_size / math.sqrt(RANDOM_CROP_MIN_AREA) / 100)


@dataclasses.dataclass
class ShrinkReport:
    """What `shrink_images` did; `bytes_in` / `bytes_out` count the images it wrote or copied."""

    shrunk: int = 0
    copied: int = 0
    kept: int = 0  # already up to date in dst
    unreadable: List[Tuple[Path, str]] = dataclasses.field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        parts = [f"{self.shrunk} shrunk", f"{self.copied} copied unchanged", f"{self.kept} already up to date"]
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} unreadable left out")
        return (f"{', '.join(parts)}; {self.bytes_in / 1e6:.1f} MB -> {self.bytes_out / 1e6:.1f} MB in "
                f"{self.seconds:.1f} s")


def _shrink_one(src: Path, dst: Path, short_side: int, to_rgb) -> Tuple[str, int, int, Optional[str]]:
    """("shrunk" | "copied" | "kept" | "unreadable", bytes in, bytes out, reason)."""
    if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime:
        return "kept", 0, 0, None
    reason = check_image(src, "full")
    if reason:
        return "unreadable", 0, 0, reason
    size_in = src.stat().st_size
    with Image.open(src) as image:
        scale, kind = short_side / min(image.size), image.format
        if scale >= 1:
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
            return "copied", size_in, size_in, None
        width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        image.draft("RGB", (width, height))  # JPEG: decode at 1/2, 1/4 or 1/8 scale, never below the target
        small = to_rgb(image).resize((width, height), Image.LANCZOS)
    with atomic_path(dst) as tmp:
        small.save(tmp, format=kind, **({"quality": JPEG_QUALITY} if kind == "JPEG" else {}))
    return "shrunk", size_in, dst.stat().st_size, None


def shrink_images(src, dst, short_side: int = 800, num_workers: Optional[int] = None) -> ShrinkReport:
    """Write a copy of the image folder `src` into `dst` with every image's short side at most `short_side`.

    Args:
        src: a dataset root (`train/`, `val/`, ...), a split, or any folder of images (searched recursively).
        dst: where the copy goes; created, or brought up to date. Not inside `src`.
        short_side: the largest short side kept, in pixels (`short_side_for(image_size)` gives the default 800
            for 224 px models).
        num_workers: threads (Pillow decodes, resizes and encodes without the GIL); default all cores.

    See the module docstring for what is decoded, resized, copied and left out.
    """
    from .pipeline import to_rgb  # the pipelines' decoding convention (loads MindSpore's vision ops)

    src, dst = Path(src).expanduser().resolve(), Path(dst).expanduser().resolve()
    if not src.is_dir():
        raise DatasetError(f"{src} is not a folder of images")
    if dst == src or src in dst.parents:
        raise DatasetError(f"the copy {dst} would be inside {src}: choose a folder outside it")
    if short_side < 1:
        raise ValueError(f"short_side must be a positive number of pixels, got {short_side}")
    paths = list_images(src)
    if not paths:
        raise DatasetError(f"{src} holds no image files")
    started, report = time.perf_counter(), ShrinkReport()

    def one(path: Path):
        return path, _shrink_one(path, dst / path.relative_to(src), short_side, to_rgb)

    with ThreadPoolExecutor(worker_count(num_workers)) as pool:
        for path, (what, size_in, size_out, reason) in _progress(pool.map(one, paths), len(paths)):
            if what == "unreadable":
                report.unreadable.append((path, reason))
                continue
            setattr(report, what, getattr(report, what) + 1)
            report.bytes_in += size_in
            report.bytes_out += size_out
    report.seconds = time.perf_counter() - started
    return report


def _progress(results, total: int):
    from tqdm import tqdm

    return tqdm(results, total=total, unit="image", desc="shrinking", disable=not os.isatty(2), leave=False)


def large_photo_hint(paths: Sequence, image_size: int, sample: int = 16) -> Optional[str]:
    """A line suggesting `shrink` when the median short side of a sample of `paths` (headers only) is at
    least twice `short_side_for(image_size)`, i.e. decoding costs 4x the pixels or more; else None."""
    picked = list(paths)[:: max(1, len(paths) // sample)][:sample]
    sides = []
    for path in picked:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    target = short_side_for(image_size)
    if not sides or median(sides) < 2 * target:
        return None
    folder = Path(os.path.commonpath([str(p) for p in picked])) if len(picked) > 1 else Path(picked[0]).parent
    return (f"the images under {folder} are large (median short side {median(sides):.0f} px of {len(sides)} "
            f"sampled): decoding them takes longer than the model at {image_size} px; a copy with its short "
            f"side at {target} px decodes several times faster: python -m vit_ms.data shrink SRC DST "
            f"--short_side {target} (README, \"Large photos\")")


__all__ = ["ShrinkReport", "shrink_images", "short_side_for", "large_photo_hint"]
