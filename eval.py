"""Evaluate a checkpoint on an image folder: top-1, top-5, loss, per-class accuracy and a confusion matrix.

Uses `mindspore.Model.eval` with the tutorial's metrics; the preprocessing (resize, center crop, mean,
std) and class order come from the checkpoint's metadata. DATA_PATH/SPLIT/<class>/* holds the images.

    python eval.py --checkpoint outputs/train/best.ckpt --data_path datasets/sample
    python eval.py --model tutorial --pretrained vit_b_16_224 --data_path datasets/imagenet_subset --json

Writes metrics.json, confusion_matrix.csv and confusion_matrix.png into --output_dir.
"""
import argparse
import csv
import json
import logging
import sys
from pathlib import Path

from vit_ms.cli import add_model_source_arguments, check_model_source


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_arguments(parser)
    parser.add_argument("--data_path", required=True, help="dataset root holding SPLIT/<class>/ folders")
    parser.add_argument("--split", default="val", help="split folder to evaluate (default val)")
    parser.add_argument("--batch_size", type=int, default=16, help="images per batch (default 16, as the tutorial)")
    parser.add_argument("--num_workers", type=int, default=None, help="decode workers (default: all cores)")
    parser.add_argument("--output_dir", default="outputs/eval",
                        help="where metrics.json and the confusion matrix go (default outputs/eval)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    check_model_source(parser, args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import mindspore as ms

    from vit_ms import viz
    from vit_ms.evaluate import evaluate_folder, load_classifier

    ms.set_device(args.device_target)
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        classifier = load_classifier(args.checkpoint, model=args.model, pretrained=args.pretrained,
                                     num_classes=args.num_classes)
        result = evaluate_folder(classifier, args.data_path, args.split, args.batch_size, args.num_workers)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        logging.error("%s", error)
        return 1

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    top_5 = f", top-5 {result.top_5:.4f}" if result.top_5 is not None else ""
    png = viz.plot_confusion_matrix(result.confusion_matrix, result.labels, out / "confusion_matrix.png",
                                    title=f"{args.split}: top-1 {result.top_1:.4f}{top_5} ({result.num_images} images)")
    with open(out / "confusion_matrix.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)  # rows: true class, columns: predicted class
        writer.writerow(["true \\ predicted"] + result.labels)
        writer.writerows([name] + row for name, row in zip(result.labels, result.confusion_matrix.tolist()))
    report = {"model": classifier.source, "data_path": str(args.data_path), "split": args.split,
              **result.to_dict(), "confusion_matrix_png": str(png),
              "confusion_matrix_csv": str(out / "confusion_matrix.csv")}
    (out / "metrics.json").write_text(json.dumps(report, indent=2), encoding="utf-8")

    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{args.split}: {result.num_images} images, top-1 {result.top_1:.4f}{top_5}, loss {result.loss:.4f}")
    per_class = [c for c in report["per_class"] if c["accuracy"] is not None]
    if len(per_class) > 20:  # ImageNet: the classes that need attention, not a 1000-line table
        print("worst classes:")
        per_class = sorted(per_class, key=lambda c: c["accuracy"])[:10]
    for c in per_class:
        print(f"  {c['index']:>4}  {c['name']:<24} {c['accuracy']:.4f}  ({c['images']} images)")
    print(f"confusion matrix: {png}; metrics: {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
