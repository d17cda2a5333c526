"""Predict the classes of images with a vit_ms checkpoint, an exported MINDIR, or foreign weights.

Inputs may be files, folders (searched recursively for image files) and glob patterns. Each image gets
its top-k class indices, names and probabilities; an unreadable file is reported and skipped. With
--output_dir, each image is saved with its predictions drawn on it, plus predictions.json.

    python infer.py --checkpoint outputs/train/best.ckpt --input datasets/sample/infer --output_dir outputs/infer
    python infer.py --mindir vit.mindir --input 'photos/**/*.jpg' --top_k 3 --json
    python infer.py --model tutorial --pretrained vit_b_16_224 --input datasets/imagenet_subset/infer --output_dir out --attention

Exit status: 0 when at least one image was predicted, 1 when none was (all unreadable or none found).
"""
import argparse
import json
import logging
import sys
from pathlib import Path

from vit_ms.cli import add_model_source_arguments, check_model_source


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_arguments(parser, mindir=True)
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="image files, folders (recursive, image extensions only) or glob patterns "
                             "(quote them so the shell does not expand them)")
    parser.add_argument("--top_k", type=int, default=5, help="classes reported per image (default 5)")
    parser.add_argument("--batch_size", type=int, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--output_dir", default=None,
                        help="write annotated images (NAME_pred.png) and predictions.json here")
    parser.add_argument("--attention", action="store_true",
                        help="also save an attention-rollout map per image (NAME_attention.png) in --output_dir; "
                             "needs --checkpoint or --model (a MINDIR hides the attention)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    check_model_source(parser, args)
    if args.attention and not args.output_dir:
        parser.error("--attention writes PNG files: give --output_dir")
    if args.attention and args.mindir:
        parser.error("--attention needs the model's blocks: use --checkpoint or --model, not --mindir")
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top_k and --batch_size must be positive")
    return args


def _unique_name(stem: str, suffix: str, used: set) -> str:
    name, i = f"{stem}{suffix}", 1
    while name in used:  # same file name in two input folders
        name, i = f"{stem}_{i}{suffix}", i + 1
    used.add(name)
    return name


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import mindspore as ms

    from vit_ms import data, viz
    from vit_ms.evaluate import find_images, load_classifier, predict_images

    ms.set_device(args.device_target)
    ms.set_context(mode=ms.PYNATIVE_MODE)  # a handful of images: no graph compile to wait for
    try:
        classifier = load_classifier(args.checkpoint, mindir=args.mindir, model=args.model,
                                     pretrained=args.pretrained, num_classes=args.num_classes)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        logging.error("%s", error)
        return 1
    paths, missing = find_images(args.input)
    for item, reason in missing:
        logging.warning("%s: %s", item, reason)
    predictions, unreadable = predict_images(classifier, paths, args.top_k, args.batch_size)
    skipped = missing + unreadable

    records = [p.to_dict() for p in predictions]
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        used = set()
        for prediction, record in zip(predictions, records):
            image = data.load_image(prediction.path)
            stem = Path(prediction.path).stem
            lines = [f"{i}: {name} {100 * p:.1f}%" for i, name, p in
                     zip(prediction.indices, prediction.names, prediction.probabilities)]
            record["annotated"] = str(viz.annotate_image(image, lines, out / _unique_name(stem, "_pred.png", used)))
            if args.attention:
                array = data.preprocess_image(image, classifier.preprocess)[None]
                heat = viz.rollout_map(viz.attention_rollout(classifier.net, array))[0]
                record["attention"] = str(viz.save_attention_overlay(
                    image, heat, classifier.preprocess, out / _unique_name(stem, "_attention.png", used)))
    result = {"model": classifier.source, "predictions": records,
              "skipped": [{"path": path, "reason": reason} for path, reason in skipped]}
    if args.output_dir:
        (Path(args.output_dir) / "predictions.json").write_text(json.dumps(result, indent=2), encoding="utf-8")

    if args.json:
        print(json.dumps(result))
    else:
        for prediction in predictions:
            print(prediction.path)
            for rank, (i, name, p) in enumerate(zip(prediction.indices, prediction.names,
                                                    prediction.probabilities), 1):
                print(f"  {rank}. {i:>4}  {name}  {p:.4f}")
        for path, reason in skipped:
            print(f"skipped {path}: {reason}")
        print(f"{len(predictions)} image(s) predicted, {len(skipped)} skipped"
              + (f"; results in {args.output_dir}" if args.output_dir else ""))
    return 0 if predictions else 1


if __name__ == "__main__":
    sys.exit(main())
