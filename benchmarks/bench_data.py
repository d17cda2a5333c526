"""Images per second of the data pipelines, against a plain Pillow loop, on realistic generated JPEGs.

Generates N photo-like JPEGs (about 500x375, the size of the tutorial's ImageNet images) into a temporary
folder, then times one full pass of:

- `vit_ms` train pipeline (checked file list -> RandomCropDecodeResize, flip, Normalize, HWC2CHW, batch)
- `vit_ms` eval pipeline (Decode, Resize, CenterCrop, Normalize, HWC2CHW, batch)
- the same eval ops on a bare `ImageFolderDataset` (no bad-file check): the design `vit_ms` replaced
- Pillow: open, convert RGB, resize, centre crop, normalise with numpy, in a Python loop (1 thread)

with 1 and 2 workers. The pre-pass file check is timed separately. Example:

    python benchmarks/bench_data.py --images 200 --output outputs/bench_data.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mindspore as ms  # noqa: E402
import mindspore.dataset as ds  # noqa: E402

from vit_ms.config import Preprocess  # noqa: E402
from vit_ms.data import check_images, create_dataset, eval_transforms, list_images  # noqa: E402


def make_jpegs(folder: Path, count: int, classes: int = 4, seed: int = 0) -> None:
    """Smooth random photo-like JPEGs (quality 90) of about 500x375, varying orientation and size."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        width, height = (500, 375) if i % 3 else (375, 500)
        width, height = width + int(rng.integers(-40, 41)), height + int(rng.integers(-40, 41))
        coarse = rng.integers(0, 256, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 8, (height, width, 3))
        image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
        out = folder / "train" / f"class_{i % classes}"
        out.mkdir(parents=True, exist_ok=True)
        image.save(out / f"{i:05d}.jpg", quality=90)


def time_pass(dataset) -> float:
    start = time.perf_counter()
    for _ in dataset.create_tuple_iterator(output_numpy=True):
        pass
    return time.perf_counter() - start


def pillow_loop(paths, preprocess: Preprocess) -> float:
    mean, std = np.array(preprocess.mean) * 255, np.array(preprocess.std) * 255
    size, short = preprocess.image_size, preprocess.resize_size
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = short / min(image.size)
            w, h = max(short, round(image.width * scale)), max(short, round(image.height * scale))
            image = image.resize((w, h), Image.Resampling.BILINEAR)
            left, top = (w - size) // 2, (h - size) // 2
            array = np.asarray(image.crop((left, top, left + size, top + size)), np.float32)
            ((array - mean) / std).transpose(2, 0, 1)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="number of generated JPEGs (default 200)")
    parser.add_argument("--image-size", type=int, default=224, help="model input side (default 224)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size (default 16, as the tutorial)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument("--repeats", type=int, default=2, help="passes per setting; the best is kept")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    ms.set_device("CPU")
    preprocess = Preprocess(image_size=args.image_size)

    rows = []
    with tempfile.TemporaryDirectory(prefix="vit_ms_bench_data_") as tmp:
        root = Path(tmp)
        make_jpegs(root, args.images)
        paths = list_images(root / "train")
        n = len(paths)

        def add(name, workers, seconds):
            rows.append({"pipeline": name, "workers": workers, "seconds": round(seconds, 3),
                         "images_per_s": round(n / seconds, 1)})

        for workers in args.workers:
            start = time.perf_counter()
            check_images(paths, "full", workers)
            add("file check (Pillow, before epoch 1)", workers, time.perf_counter() - start)
            for name, training in (("vit_ms train", True), ("vit_ms eval", False)):
                best = min(time_pass(create_dataset(root, "train", preprocess, args.batch_size, training=training,
                                                    num_workers=workers, check="none")[0])
                           for _ in range(args.repeats))
                add(name, workers, best)
            folder = ds.ImageFolderDataset(str(root / "train"), shuffle=False, num_parallel_workers=workers)
            folder = folder.map(eval_transforms(preprocess), input_columns="image", num_parallel_workers=workers)
            folder = folder.batch(args.batch_size)
            add("ImageFolderDataset eval (no check)", workers, min(time_pass(folder) for _ in range(args.repeats)))
        add("Pillow loop eval (numpy normalise)", 1, min(pillow_loop(paths, preprocess) for _ in range(args.repeats)))

    lines = [f"{n} JPEGs ~500x375 -> {args.image_size}x{args.image_size}, batch {args.batch_size}, "
             f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
             "| pipeline | workers | images/s | seconds |", "|---|---|---|---|"]
    lines += [f"| {r['pipeline']} | {r['workers']} | {r['images_per_s']} | {r['seconds']} |" for r in rows]
    print("\n".join(lines))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"images": n, "image_size": args.image_size,
                                           "batch_size": args.batch_size, "cores": os.cpu_count(),
                                           "results": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
