"""Images per second of the data pipelines, against a plain Pillow loop, on realistic generated JPEGs.

Generates N photo-like JPEGs (about 500x375, the size of the tutorial's ImageNet images) into a temporary
folder, then times one full pass of:

- `vit_ms` train pipeline (checked file list -> RandomCropDecodeResize, flip, Normalize, HWC2CHW, batch)
- `vit_ms` eval pipeline (Decode, Resize, CenterCrop, Normalize, HWC2CHW, batch)
- the same eval ops on a bare `ImageFolderDataset` (no bad-file check): the design `vit_ms` replaced
- Pillow: open, convert RGB, resize, centre crop, normalise with numpy, in a Python loop (1 thread)

with 1 and 2 workers. The pre-pass file check is timed separately. Example:

    python benchmarks/bench_data.py --images 200 --output outputs/bench_data.json

`--mode photos` times the same train and eval pipelines on camera-sized JPEGs (about 4000x3000) against the
copy `python -m vit_ms.data shrink` makes of them (800 px short side, `--short-side`), in alternating
rounds, and the shrinking itself (README, "Large photos"). Example (about 3 minutes on 2 cores):

    python benchmarks/bench_data.py --mode photos --images 40 --repeats 3

`--mode scale` measures the start of a run on a large ImageFolder instead (issue 11): a synthetic set of
`--files` small JPEGs (default 100,000, 100 classes, a few bad files), generated once and cached under
`$VIT_MS_HOME/datasets/bench-scale-<N>`. Each setting runs in fresh processes, as a training start does:
cold (no check manifest) and warm (manifest present), 1 rank and 2 ranks (two processes with num_shards=2
started together), and reports the time `create_dataset` takes (scan + check) and the time from process
launch to the first training batch, plus the memory of the file index (the scanned file list and the
loaded manifest, by tracemalloc). Example (the issue's figure, about 20 minutes on 2 cores):

    python benchmarks/bench_data.py --mode scale --files 100000 --output outputs/bench_data_scale.json
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mindspore as ms  # noqa: E402
import mindspore.dataset as ds  # noqa: E402

from vit_ms.cli import ArgumentParser  # noqa: E402
from vit_ms.config import Preprocess  # noqa: E402
from vit_ms.data import check_images, create_dataset, eval_transforms, list_images  # noqa: E402
from vit_ms.data.manifest import MANIFEST_DIR  # noqa: E402
from vit_ms.data.pipeline import scan_split_paths  # noqa: E402
from vit_ms.files import cache_dir  # noqa: E402


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


def make_photos(folder: Path, count: int, long_side: int = 4000, classes: int = 4, seed: int = 0) -> None:
    """Camera-sized photo-like JPEGs (quality 90): `make_jpegs`' texture at about `long_side` x 3/4 of it."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        width, height = (long_side, long_side * 3 // 4) if i % 3 else (long_side * 3 // 4, long_side)
        coarse = rng.integers(0, 256, (height // 200 + 1, width // 200 + 1, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.int16)
        image += rng.integers(-8, 9, (height, width, 3), dtype=np.int16)  # sensor-like grain
        out = folder / "train" / f"class_{i % classes}"
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(out / f"{i:05d}.jpg", quality=90)


def photos_main(args) -> int:
    """The train and eval pipelines on camera-sized photos and on their shrunk copy, alternating rounds."""
    from vit_ms.data.shrink import short_side_for, shrink_images

    preprocess = Preprocess(image_size=args.image_size)
    short_side = args.short_side or short_side_for(args.image_size)
    workers = max(args.workers)
    timings = {}
    with tempfile.TemporaryDirectory(prefix="vit_ms_bench_photos_") as tmp:
        big, small = Path(tmp) / "photos", Path(tmp) / "shrunk"
        make_photos(big, args.images)
        start = time.perf_counter()
        report = shrink_images(big, small, short_side, workers)
        shrink_s = time.perf_counter() - start
        size_mb = {"photos": sum(p.stat().st_size for p in list_images(big)) / 1e6, "shrunk": report.bytes_out / 1e6}
        for round_ in range(args.repeats):
            order = (("photos", big), ("shrunk", small))
            for name, root in (order if round_ % 2 == 0 else order[::-1]):
                for pipeline, training in (("train", True), ("eval", False)):
                    dataset, _ = create_dataset(root, "train", preprocess, args.batch_size, training=training,
                                                num_workers=workers, check="none")
                    timings.setdefault((name, pipeline), []).append(args.images / time_pass(dataset))
    lines = [f"{args.images} photo-like JPEGs about 4000x3000 -> {args.image_size}x{args.image_size}, batch "
             f"{args.batch_size}, {workers} workers, {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
             f"shrink to a {short_side} px short side: {shrink_s:.1f} s ({report.summary()})",
             f"| images | MB | pipeline | images/s (median of {args.repeats} rounds) | spread |", "|---|---|---|---|---|"]
    rows = []
    for (name, pipeline), values in timings.items():
        median = float(np.median(values))
        spread = (max(values) - min(values)) / median
        rows.append({"images": name, "pipeline": pipeline, "images_per_s": round(median, 1), "spread": round(spread, 3)})
        lines.append(f"| {name} | {size_mb[name]:.0f} | {pipeline} | {median:.1f} | {100 * spread:.0f}% |")
    for pipeline in ("train", "eval"):
        ratio = timings[("shrunk", pipeline)], timings[("photos", pipeline)]
        lines.append(f"{pipeline}: shrunk / photos = {np.median(ratio[0]) / np.median(ratio[1]):.2f}x")
    print("\n".join(lines))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"images": args.images, "short_side": short_side, "shrink_s": shrink_s,
                                           "results": rows}, indent=2) + "\n")
    return 0


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


# ---------------------------------------------------------------------------------------------------------
# Scale mode: time to the first training batch on a large ImageFolder, cold and warm, 1 and 2 ranks
# ---------------------------------------------------------------------------------------------------------

SCALE_CLASSES = 100
SCALE_SIDE = 48  # small JPEGs: the check's cost per file is what is measured, not decoding big photos


def make_scale_set(files: int, root: Path = None) -> Path:
    """ROOT/train/class_XXX/NNNNNN.jpg: `files` small JPEGs, 1 in 20,000 bad (at least 3); generated once."""
    root = root or cache_dir("datasets") / f"bench-scale-{files}"
    marker = root / "COMPLETE"
    if marker.is_file() and marker.read_text().strip() == str(files):
        return root
    shutil.rmtree(root, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent if root.parent.is_dir() else None))
    rng = np.random.default_rng(0)
    # 64 encoded variants, written round-robin: generation is bound by file writes, not by the encoder.
    variants = []
    for _ in range(64):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((SCALE_SIDE, SCALE_SIDE), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        variants.append(buffer.getvalue())
    bad = max(3, files // 20000)
    bad_at = set(np.linspace(0, files - 1, bad).astype(int).tolist())
    tmp.chmod(0o755)  # mkdtemp makes it private; the set should read like any folder
    for k in range(SCALE_CLASSES):
        (tmp / "train" / f"class_{k:03d}").mkdir(parents=True)
    for i in range(files):
        payload = variants[i % len(variants)]
        if i in bad_at:  # a truncated download, an empty file, a text file, in turn
            payload = [payload[: len(payload) // 2], b"", b"not an image\n"][len(bad_at & set(range(i))) % 3]
        (tmp / "train" / f"class_{i % SCALE_CLASSES:03d}" / f"{i:06d}.jpg").write_bytes(payload)
    (tmp / "COMPLETE").write_text(f"{files}\n")
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, root)
    return root


def scale_child(root: Path, launched: float, shards: int, rank: int, image_size: int, batch_size: int) -> dict:
    """One training start: create_dataset (scan + check) and the first batch; times from process launch."""
    start = time.time()
    shard = dict(num_shards=shards, shard_id=rank) if shards > 1 else {}
    dataset, info = create_dataset(root, "train", Preprocess(image_size=image_size), batch_size, training=True,
                                   **shard)
    created = time.time()
    next(dataset.create_tuple_iterator(output_numpy=True))
    first = time.time()
    return {"rank": rank, "create_dataset_s": round(created - start, 2), "first_batch_after_launch_s":
            round(first - launched, 2), "imports_s": round(start - launched, 2), "checked": info.checked,
            "skipped": len(info.skipped), "images": info.num_images}


def index_memory(root: Path) -> dict:
    """Bytes held by the file index of a warm start: the scanned paths and labels, and the manifest's
    columns (what `check_split` reads when the listing is unchanged)."""
    from vit_ms.data.manifest import manifest_path, read_columns

    tracemalloc.start()
    samples, _, _ = scan_split_paths(root, "train", None)
    listed = tracemalloc.get_traced_memory()[0]
    columns = read_columns(manifest_path(root / "train"))
    total = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(columns["paths"]) == len(samples)
    return {"file_list_MB": round(listed / 2**20, 1), "manifest_MB": round((total - listed) / 2**20, 1)}


def _run_ranks(root: Path, shards: int, args) -> list:
    """Start `shards` rank processes together; if one fails, stop the others and show its error."""
    launched = time.time()
    with tempfile.TemporaryDirectory(prefix="vit_ms_bench_ranks_") as logs:
        children = []
        for rank in range(shards):
            command = [sys.executable, __file__, "--mode", "child", "--data", str(root), "--launched", repr(launched),
                       "--shards", str(shards), "--rank", str(rank), "--image-size", str(args.image_size),
                       "--batch-size", str(args.batch_size)]
            with open(Path(logs) / f"{rank}.out", "w") as out, open(Path(logs) / f"{rank}.err", "w") as err:
                children.append(subprocess.Popen(command, stdout=out, stderr=err))
        while any(child.poll() is None for child in children):
            failed = [rank for rank, child in enumerate(children) if child.poll() not in (None, 0)]
            if failed:
                break
            time.sleep(0.2)
        failed = [rank for rank, child in enumerate(children) if child.poll() not in (None, 0)]
        if failed:
            for child in children:
                if child.poll() is None:
                    child.terminate()
                    child.wait()
            error = (Path(logs) / f"{failed[0]}.err").read_text().strip().splitlines()[-15:]
            raise SystemExit(f"benchmark rank {failed[0]} of {shards} failed (exit {children[failed[0]].returncode}):\n"
                             + "\n".join(error))
        return [json.loads((Path(logs) / f"{rank}.out").read_text().strip().splitlines()[-1]) for rank in range(shards)]


def scale_main(args) -> int:
    t0 = time.time()
    root = make_scale_set(args.files, args.data)
    generated = time.time() - t0
    rows = []
    for shards in (1, 2):
        shutil.rmtree(root / MANIFEST_DIR, ignore_errors=True)
        for start in ("cold", "warm"):
            ranks = _run_ranks(root, shards, args)
            rows.append({"start": start, "ranks": shards,
                         "create_dataset_s": max(r["create_dataset_s"] for r in ranks),
                         "first_batch_after_launch_s": max(r["first_batch_after_launch_s"] for r in ranks),
                         "imports_s": max(r["imports_s"] for r in ranks),
                         "checked_per_rank": [r["checked"] for r in ranks], "skipped": ranks[0]["skipped"]})
    memory = index_memory(root)
    cold = {r["ranks"]: r["create_dataset_s"] for r in rows if r["start"] == "cold"}
    lines = [f"{args.files} JPEGs {SCALE_SIDE}x{SCALE_SIDE} in {SCALE_CLASSES} classes ({rows[0]['skipped']} bad), "
             f"check=full, {os.cpu_count()} cores, {platform.processor() or platform.machine()}; set generated "
             f"or reused in {generated:.0f} s",
             "| start | ranks | create_dataset (scan + check) s | % of cold | first batch after launch s | "
             "files checked per rank |", "|---|---|---|---|---|---|"]
    for r in rows:
        share = 100 * r["create_dataset_s"] / max(cold[r["ranks"]], 1e-9)
        lines.append(f"| {r['start']} | {r['ranks']} | {r['create_dataset_s']} | {share:.1f}% | "
                     f"{r['first_batch_after_launch_s']} | {r['checked_per_rank']} |")
    lines.append(f"file index of a warm start: file list {memory['file_list_MB']} MB + manifest "
                 f"{memory['manifest_MB']} MB (tracemalloc)")
    print("\n".join(lines))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"files": args.files, "cores": os.cpu_count(), "results": rows,
                                           "index_memory": memory}, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("throughput", "photos", "scale", "child"), default="throughput",
                        help="throughput: images/s of each pipeline (default); photos: the pipelines on "
                             "camera-sized JPEGs and on their shrunk copy; scale: start-up time on a large "
                             "ImageFolder, cold and warm, 1 and 2 ranks (child: one rank of it, internal)")
    parser.add_argument("--short-side", type=int, default=None,
                        help="photos: the shrunk copy's short side (default: short_side_for(--image-size), 800)")
    parser.add_argument("--files", type=int, default=100_000, help="scale: files in the synthetic set (default 100000)")
    parser.add_argument("--data", type=Path, default=None,
                        help="scale: where the synthetic set lives (default $VIT_MS_HOME/datasets/bench-scale-N)")
    parser.add_argument("--launched", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=200, help="number of generated JPEGs (default 200)")
    parser.add_argument("--image-size", type=int, default=224, help="model input side (default 224)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size (default 16, as the tutorial; scale mode 64)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument("--repeats", type=int, default=2, help="passes per setting; the best is kept")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    ms.set_device("CPU")
    if args.mode == "child":
        print(json.dumps(scale_child(args.data, args.launched, args.shards, args.rank, args.image_size,
                                     args.batch_size)))
        return 0
    if args.mode == "scale":
        args.batch_size = args.batch_size or 64
        return scale_main(args)
    if args.mode == "photos":
        args.batch_size = args.batch_size or 16
        return photos_main(args)
    args.batch_size = args.batch_size or 16
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
