"""infer.py's work end to end on a folder of real photos vs the model alone on pre-decoded tensors.

Same process, same model object, same batch size, same execution mode as infer.py (graph):

- model:           forward passes over the images already decoded and preprocessed into (B, 3, S, S)
                   arrays; measured before and after the end-to-end runs, the mean is the reference.
- end to end:      `vit_ms.evaluate.run_inference` + `write_predictions`, which is what infer.py runs
                   after loading the model: check every file, decode and transform in the
                   `mindspore.dataset` pipeline, run the model, write predictions.json/.csv.
- + pictures:      the same, also drawing every annotated picture (thread pool, JPEG for photos).

Process start-up and model loading (a few seconds, once per command) are left out of all three. Targets
(issue 15): end to end >= 80% of the model's images/s, >= 60% with pictures. With --process, infer.py is
also run as a command (`--no-annotate`, then with pictures) and its wall time, start-up and model load
included, is shown as well.

    python benchmarks/bench_infer.py --data ../shared/data/hymenoptera            # all splits, ViT-Ti/16
    python benchmarks/bench_infer.py --data ../shared/data/hymenoptera --limit 40 # a quick check
    python benchmarks/bench_infer.py --data DIR --checkpoint outputs/train/best.ckpt --batch_size 32 --process
"""
import argparse
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vit_ms.cli import ArgumentParser  # noqa: E402


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder of photos, searched recursively (all splits)")
    parser.add_argument("--checkpoint", default=None, help="vit_ms checkpoint (default: a random --model)")
    parser.add_argument("--model", default="vit_ti_16", help="preset when no --checkpoint (default vit_ti_16)")
    parser.add_argument("--batch_size", type=int, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--num_workers", type=int, default=None, help="decode/drawing threads (default: all cores)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images (quick check)")
    parser.add_argument("--device_target", default="CPU", choices=("CPU", "GPU", "Ascend"))
    parser.add_argument("--process", action="store_true",
                        help="also time infer.py as a command (wall time, start-up and model load included)")
    return parser.parse_args(argv)


def process_seconds(checkpoint, paths, args, pictures: bool) -> float:
    """Wall time of `python infer.py --checkpoint ... --input FILES --output_dir TMP` as a user runs it."""
    script = Path(__file__).resolve().parent.parent / "infer.py"
    with tempfile.TemporaryDirectory(prefix="bench_infer-") as tmp:
        command = [sys.executable, str(script), "--checkpoint", str(checkpoint), "--batch_size",
                   str(args.batch_size), "--device_target", args.device_target, "--output_dir",
                   str(Path(tmp) / "out"), "--input", *map(str, paths)]
        if args.num_workers:
            command += ["--num_workers", str(args.num_workers)]
        if not pictures:
            command.append("--no-annotate")
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - start


def random_classifier(preset: str, class_names):
    """A randomly initialised model named like the data's class folders (speed does not need weights)."""
    from vit_ms import Preprocess, create_model, get_config, set_dynamic_batch
    from vit_ms.evaluate import Classifier, readable_class_names

    config = get_config(preset, num_classes=len(class_names))
    net = create_model(config)
    net.set_train(False)
    set_dynamic_batch(net, config)
    return Classifier(net=net, config=config, preprocess=Preprocess.for_model(config),
                      class_names=list(class_names), labels=readable_class_names(class_names, len(class_names)),
                      source=f"random {preset}")


def model_images_per_second(classifier, batches) -> float:
    from vit_ms.evaluate import run_batch

    run_batch(classifier, batches[0])  # warm-up: kernel selection, caches
    start = time.perf_counter()
    count = 0
    for images in batches:
        run_batch(classifier, images)
        count += len(images)
    return count / (time.perf_counter() - start)


def end_to_end_seconds(classifier, paths, args, pictures: bool) -> float:
    from vit_ms.evaluate import run_inference, write_predictions

    with tempfile.TemporaryDirectory(prefix="bench_infer-") as out:
        start = time.perf_counter()
        result = run_inference(classifier, paths, top_k=5, batch_size=args.batch_size,
                               num_workers=args.num_workers, out_dir=out, annotate=pictures)
        write_predictions(result, out)
        seconds = time.perf_counter() - start
    if len(result.predictions) != len(paths):
        raise SystemExit(f"{len(paths) - len(result.predictions)} image(s) were skipped: {result.skipped[:3]}")
    return seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import mindspore as ms
    import numpy as np

    from vit_ms import data
    from vit_ms.evaluate import find_images, load_classifier

    ms.set_device(args.device_target)
    ms.set_context(mode=ms.GRAPH_MODE)  # as infer.py
    paths, _ = find_images([args.data])
    paths = paths[:args.limit] if args.limit else paths
    if not paths:
        raise SystemExit(f"no images under {args.data}")
    if args.checkpoint:
        classifier = load_classifier(args.checkpoint)
    else:
        classes = sorted({p.parent.name for p in paths})
        classifier = random_classifier(args.model, classes)

    # Pre-decoded tensors for the model-only rate (Pillow + the same eval transforms).
    arrays = [data.preprocess_image(data.load_image(p), classifier.preprocess) for p in paths]
    batches = [np.stack(arrays[i:i + args.batch_size]) for i in range(0, len(arrays), args.batch_size)]

    model_before = model_images_per_second(classifier, batches)
    end_to_end_seconds(classifier, paths[:args.batch_size], args, pictures=True)  # warm the pipeline and pools
    plain = end_to_end_seconds(classifier, paths, args, pictures=False)
    drawn = end_to_end_seconds(classifier, paths, args, pictures=True)
    model_after = model_images_per_second(classifier, batches)
    model = (model_before + model_after) / 2
    rows = [("end to end, predictions only", plain, 0.8), ("end to end, + annotated pictures", drawn, 0.6)]
    if args.process:
        with tempfile.TemporaryDirectory(prefix="bench_infer-") as tmp:
            checkpoint = args.checkpoint
            if checkpoint is None:
                from vit_ms.checkpoint import make_metadata, save_checkpoint

                checkpoint = save_checkpoint(classifier.net, Path(tmp) / "model.ckpt", make_metadata(
                    classifier.config, classifier.class_names, classifier.preprocess))
            rows += [("infer.py command, --no-annotate", process_seconds(checkpoint, paths, args, False), None),
                     ("infer.py command, + pictures", process_seconds(checkpoint, paths, args, True), None)]

    n = len(paths)
    print(f"{n} images from {args.data}, {classifier.source}, {classifier.config.image_size}px, "
          f"batch {args.batch_size}, {ms.get_context('device_target')}, graph mode")
    print(f"model alone: {model_before:.2f} images/s before, {model_after:.2f} after the end-to-end runs\n")
    print(f"| {'what':<36} | {'seconds':>8} | {'images/s':>9} | {'of model':>8} | target |")
    print(f"|{'-' * 38}|{'-' * 10}|{'-' * 11}|{'-' * 10}|--------|")
    print(f"| {'model alone (pre-decoded tensors)':<36} | {n / model:>8.2f} | {model:>9.2f} | {'100%':>8} |        |")
    for label, seconds, target in rows:
        rate = n / seconds
        goal = f">= {int(100 * target)}%" if target else ""
        print(f"| {label:<36} | {seconds:>8.2f} | {rate:>9.2f} | {100 * rate / model:>7.0f}% | {goal:>6} |")
    if args.process:
        print("\n(the infer.py command rows include process start-up, imports and model loading)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
