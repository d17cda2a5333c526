"""Predict the classes of images with a vit_ms checkpoint, an exported MINDIR, or foreign weights.

Inputs may be files, folders (searched recursively for image files) and glob patterns. The images are
decoded and preprocessed by a parallel `mindspore.dataset` pipeline (the same ops as eval.py) while the
model runs; each gets its top-k class indices, names and probabilities, and an unreadable file is
reported with its reason and skipped. With --output_dir, predictions.json and predictions.csv are written
there, and each image is drawn with its predictions (NAME_pred.jpg, or .png for PNG inputs) by a pool of
threads that never holds up the model; --no-annotate skips the pictures. An image inside a folder named
like one of the model's classes (e.g. val/ants/1.jpg) is marked right or wrong.

    python infer.py --checkpoint outputs/train/best.ckpt --input datasets/sample/infer --output_dir outputs/infer
    python infer.py --mindir vit.mindir --input 'photos/**/*.jpg' --top_k 3 --json
    python infer.py --model tutorial --pretrained vit_b_16_224 --input datasets/imagenet_subset/infer --output_dir out --attention

An --output_dir that already holds files is refused unless --overwrite is given (which replaces the
earlier run's predictions and pictures). Exit status: 0 when at least one image was predicted, 1 when
none was (all unreadable or none found), 2 for bad flags or a refused --output_dir.
"""
import argparse
import logging

from vit_ms.cli import (ArgumentParser, add_model_source_arguments, check_model_source, log_to_console,
                        quiet_mindspore, run_script)


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_arguments(parser, mindir=True)
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="image files, folders (recursive, image extensions only) or glob patterns "
                             "(quote them so the shell does not expand them)")
    parser.add_argument("--top_k", type=int, default=5, help="classes reported per image (default 5)")
    parser.add_argument("--batch_size", type=int, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="decode and drawing threads (default: all cores)")
    parser.add_argument("--output_dir", default=None,
                        help="write predictions.json, predictions.csv and annotated images here")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier run in --output_dir")
    parser.add_argument("--no-annotate", dest="annotate", action="store_false",
                        help="with --output_dir: write predictions.json/.csv only, no pictures")
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
    if args.overwrite and not args.output_dir:
        parser.error("--overwrite replaces the results in --output_dir: give --output_dir")
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top_k and --batch_size must be positive")
    return parser, args


def main(argv=None) -> int:
    quiet_mindspore()
    parser, args = parse_args(argv)
    log_to_console()
    import json

    import mindspore as ms

    from vit_ms.evaluate import (check_output_dir, find_images, load_classifier, remove_earlier_pictures,
                                 run_inference, write_predictions)
    from vit_ms.packing import SMALL_BATCH

    if args.output_dir:
        refusal = check_output_dir(args.output_dir, args.overwrite, "infer.py")
        if refusal:
            parser.error(refusal)

    ms.set_device(args.device_target)
    # Graph mode: 1.5-5.6x PyNative's images/s on CPU (README, "Performance on CPU"), and load_classifier keeps the
    # compiled graph for the next run (vit_ms.graph_cache), so a repeated command barely compiles.
    ms.set_context(mode=ms.GRAPH_MODE)
    # The inputs are listed now, reported after the model has loaded (a broken model is the news): packing the
    # weights for inference (vit_ms.packing) pays where every batch is small, not at 16; attention maps need
    # the plain weights, and a MINDIR holds its own graph.
    paths, missing = find_images(args.input)
    largest = min(args.batch_size, len(paths))  # the largest batch this run makes
    pack = not (args.attention or args.mindir) and largest <= SMALL_BATCH
    # Where every batch has the same small size (one batch, or a count the batch size divides), a graph compiled
    # for that size skips the dynamic batch's shape work at every step (ViT-Ti/16 and ViT-S/16 batch 1: 1.11x and
    # 1.23x the images/s, README round 30). Small only: each size is a graph of its own to compile and cache, and
    # a batch-16 step hardly notices the shape work.
    one_size = len(paths) <= args.batch_size or len(paths) % args.batch_size == 0
    batch_size = largest if paths and one_size and largest <= SMALL_BATCH else None
    try:
        classifier = load_classifier(args.checkpoint, mindir=args.mindir, model=args.model,
                                     pretrained=args.pretrained, num_classes=args.num_classes,
                                     cache_graphs=True,  # this process compiles only the classifier's graphs
                                     pack_weights=pack, batch_size=batch_size)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        logging.error("%s", error)
        return 1
    for item, reason in missing:
        logging.warning("%s: %s", item, reason)
    if not paths:
        logging.error("no image files found in %s; nothing written", " ".join(args.input))
        return 1
    if args.output_dir and args.overwrite:
        for path in remove_earlier_pictures(args.output_dir):
            logging.info("--overwrite: removed %s of the earlier run", path)
    result = run_inference(classifier, paths, top_k=args.top_k, batch_size=args.batch_size,
                           num_workers=args.num_workers, out_dir=args.output_dir, annotate=args.annotate,
                           attention=args.attention)
    result.skipped[:0] = missing
    if args.output_dir:
        write_predictions(result, args.output_dir)

    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        for prediction in result.predictions:
            truth = f"  (true: {prediction.true_label})" if prediction.true_label is not None else ""
            print(f"{prediction.path}{truth}")
            for rank, (i, name, p) in enumerate(zip(prediction.indices, prediction.names,
                                                    prediction.probabilities), 1):
                print(f"  {rank}. {i:>4}  {name}  {p:.4f}")
        for path, reason in result.skipped:
            print(f"skipped {path}: {reason}")
        print(f"{len(result.predictions)} image(s) predicted, {len(result.skipped)} skipped"
              + (f"; results in {args.output_dir}" if args.output_dir else ""))
    return 0 if result.predictions else 1


if __name__ == "__main__":
    run_script(main)
