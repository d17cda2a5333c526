"""Evaluate a checkpoint on an image folder: top-1, top-5, cross-entropy, per-class accuracy, a confusion
matrix, and with --report a self-contained HTML page of what the model gets wrong.

The images go through a parallel `mindspore.dataset` pipeline with the eval transforms (resize, center
crop, mean, std) and the class order stored in the checkpoint's metadata; DATA_PATH/SPLIT/<class>/*
holds the images. Unreadable files are reported and left out. The loss reported is the plain
cross-entropy (training's "val loss" is label-smoothed, so it is larger for the same checkpoint).

    python eval.py --checkpoint outputs/train/best.ckpt --data_path datasets/sample --report
    python eval.py --model tutorial --pretrained vit_b_16_224 --data_path datasets/imagenet_subset --json

Writes metrics.json, confusion_matrix.csv, confusion_matrix.png (and report.html with --report) into
--output_dir, which must be new or empty unless --overwrite is given.
"""
import argparse
import csv
import io
import json
import logging
from pathlib import Path

from vit_ms.cli import (ArgumentParser, add_model_source_arguments, check_model_source, log_to_console,
                        quiet_mindspore, run_script)

OUTPUTS = ("metrics.json", "confusion_matrix.csv", "confusion_matrix.png", "report.html")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_arguments(parser)
    parser.add_argument("--data_path", required=True, help="dataset root holding SPLIT/<class>/ folders")
    parser.add_argument("--split", default="val", help="split folder to evaluate (default val)")
    parser.add_argument("--batch_size", type=int, default=16, help="images per batch (default 16, as the tutorial)")
    parser.add_argument("--num_workers", type=int, default=None, help="decode workers (default: all cores)")
    parser.add_argument("--output_dir", default="outputs/eval",
                        help="where metrics.json and the confusion matrix go (default outputs/eval)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier evaluation in --output_dir")
    parser.add_argument("--report", action="store_true",
                        help="also write report.html: per-class precision/recall/F1, most-confused pairs, the "
                             "most confidently wrong images with their attention, calibration")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    check_model_source(parser, args)
    if args.batch_size < 1:
        parser.error("--batch_size must be positive")
    return parser, args


def confusion_csv(labels, matrix) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")  # rows: true class, columns: predicted class
    writer.writerow(["true \\ predicted"] + list(labels))
    writer.writerows([name] + row for name, row in zip(labels, matrix.tolist()))
    return buffer.getvalue()


def main(argv=None) -> int:
    quiet_mindspore()
    parser, args = parse_args(argv)
    log_to_console()
    import mindspore as ms

    from vit_ms import viz
    from vit_ms.data import DatasetError
    from vit_ms.evaluate import check_output_dir, evaluate_folder, load_classifier
    from vit_ms.files import write_text_atomic

    out = Path(args.output_dir)
    refusal = check_output_dir(out, args.overwrite, "eval.py")
    if refusal:
        parser.error(refusal)
    ms.set_device(args.device_target)
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        classifier = load_classifier(args.checkpoint, model=args.model, pretrained=args.pretrained,
                                     num_classes=args.num_classes, cache_graphs=True)
        result = evaluate_folder(classifier, args.data_path, args.split, args.batch_size, args.num_workers)
    except (ValueError, FileNotFoundError, RuntimeError, DatasetError) as error:
        logging.error("%s", error)
        return 1

    # Inputs are valid and measured: only now is anything written.
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # --overwrite: no file of the earlier evaluation survives beside the new ones
        (out / name).unlink(missing_ok=True)
    top_5 = f", top-5 {result.top_5:.4f}" if result.top_5 is not None else ""
    png = viz.plot_confusion_matrix(result.confusion_matrix, result.labels, out / "confusion_matrix.png",
                                    title=f"{args.split}: top-1 {result.top_1:.4f}{top_5} ({result.num_images} images)")
    csv_path = write_text_atomic(out / "confusion_matrix.csv", confusion_csv(result.labels, result.confusion_matrix))
    report = {"model": classifier.source, "data_path": str(args.data_path), "split": args.split,
              **result.to_dict(), "confusion_matrix_png": str(png), "confusion_matrix_csv": str(csv_path)}
    if args.report:
        from vit_ms.report import write_report

        meta = [("model", classifier.source), ("data", f"{args.data_path} ({args.split} split)"),
                ("images", f"{result.num_images} evaluated, {len(result.skipped)} unreadable left out")]
        report["report_html"] = str(write_report(out / "report.html", classifier, result, meta=meta,
                                                 title=f"{Path(classifier.source).name} on {args.split}",
                                                 confusion_png=png))
    write_text_atomic(out / "metrics.json", json.dumps(report, indent=2))

    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{args.split}: {result.num_images} images, top-1 {result.top_1:.4f}{top_5}, "
          f"cross-entropy {result.cross_entropy:.4f}")
    per_class = [c for c in report["per_class"] if c["accuracy"] is not None]
    if len(per_class) > 20:  # ImageNet: the classes that need attention, not a 1000-line table
        print("worst classes:")
        per_class = sorted(per_class, key=lambda c: c["accuracy"])[:10]
    for c in per_class:
        print(f"  {c['index']:>4}  {c['name']:<24} {c['accuracy']:.4f}  ({c['images']} images)")
    for path, reason in result.skipped:
        print(f"skipped {path}: {reason}")
    print(f"confusion matrix: {png}; metrics: {out / 'metrics.json'}"
          + (f"; report: {report['report_html']}" if args.report else ""))
    return 0


if __name__ == "__main__":
    run_script(main)
