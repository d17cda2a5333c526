"""Export a checkpoint to MINDIR or ONNX, both with a dynamic batch, with proven parity.

The file is written under a temporary name, loaded back (mindspore.load + nn.GraphCell for MINDIR,
onnxruntime for ONNX) and its logits compared with the network's at batch sizes 1, 3 and 8; only then
does it take its name. A difference above the tolerance leaves no file and exits with status 2. A JSON
sidecar, FILE.json, carries the preprocessing, class names and model config that infer.py --mindir reads.
An existing FILE is never replaced unless --overwrite is given.

    python export.py --checkpoint outputs/train/best.ckpt --output outputs/vit.mindir
    python export.py --checkpoint best.ckpt --output vit.onnx --file_format ONNX
    python export.py --checkpoint best.ckpt --output vit_uint8.mindir --with_preprocess --input_size 480 640

ONNX is written from the weights with the `onnx` package (pip install onnx), for every model including
the paper's exact-GELU presets. --with_preprocess writes a MINDIR that takes uint8 images of the one
size --input_size H W, (batch, H, W, 3) RGB, or (batch, H, W, 1) grayscale for a 1-channel model, and
resizes, crops and normalises inside the graph.
"""
import logging
from pathlib import Path

from vit_ms.cli import (ArgumentParser, add_model_source_arguments, check_model_source, log_to_console,
                        quiet_mindspore, run_script)


def parse_args(argv=None):
    import argparse

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_arguments(parser)
    parser.add_argument("--output", required=True, help="file to write; .mindir / .onnx is added when missing")
    parser.add_argument("--file_format", default="MINDIR", type=str.upper, choices=("MINDIR", "ONNX"),
                        help="MINDIR (default) or ONNX")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="fixed batch size; default: a dynamic batch dimension")
    parser.add_argument("--with_preprocess", action="store_true",
                        help="MINDIR taking uint8 (batch, H, W, C) images (C = 3, 1 for a grayscale model); "
                             "resize, crop, normalise inside")
    parser.add_argument("--input_size", type=int, nargs=2, metavar=("H", "W"),
                        help="with --with_preprocess: the image size the graph accepts")
    parser.add_argument("--check_images", metavar="FOLDER",
                        help="with --with_preprocess: photos (resized to --input_size) for the parity check; "
                             "default: generated images")
    parser.add_argument("--atol", type=float, default=None,
                        help="parity tolerance per unit of the largest |logit| (default 1e-5 MINDIR, 1e-4 ONNX "
                             "and --with_preprocess)")
    parser.add_argument("--no_check", action="store_true", help="skip the reload-and-compare parity check")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file and sidecar")
    args = parser.parse_args(argv)
    check_model_source(parser, args)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch_size must be positive")
    if args.with_preprocess and args.file_format != "MINDIR":
        parser.error("--with_preprocess writes MINDIR only (drop --file_format ONNX)")
    if args.with_preprocess != (args.input_size is not None):
        parser.error("--with_preprocess and --input_size H W go together")
    if args.input_size and min(args.input_size) < 1:
        parser.error("--input_size needs two positive integers H W")
    if args.check_images and not args.with_preprocess:
        parser.error("--check_images goes with --with_preprocess")
    if args.check_images and not Path(args.check_images).is_dir():
        parser.error(f"--check_images {args.check_images} is not a folder")
    if args.atol is not None and not args.atol > 0:
        parser.error("--atol must be positive")
    return args


def main(argv=None) -> int:
    quiet_mindspore()
    args = parse_args(argv)
    log_to_console()
    import mindspore as ms

    from vit_ms.evaluate import load_classifier
    from vit_ms.export import ExportError, ParityError, export_model, output_path, read_check_images

    ms.set_device(args.device_target)
    ms.set_context(mode=ms.PYNATIVE_MODE)  # the reference forward passes need no graph compile
    try:
        output_path(args.output, args.file_format, args.overwrite)  # refuse before loading anything
        classifier = load_classifier(args.checkpoint, model=args.model, pretrained=args.pretrained,
                                     num_classes=args.num_classes)
        images = (read_check_images(args.check_images, args.input_size, classifier.preprocess.channels)
                  if args.check_images else None)
        report = export_model(classifier.net, args.output, classifier.metadata(), args.file_format,
                              args.batch_size, check=not args.no_check, atol=args.atol,
                              with_preprocess=args.with_preprocess, input_size=args.input_size,
                              check_images=images, overwrite=args.overwrite)
    except ParityError as error:
        logging.error("export FAILED the parity check, nothing written: %s", error)
        return 2
    except (ExportError, ValueError, FileNotFoundError, FileExistsError, ImportError) as error:
        logging.error("%s", error)
        return 1
    batch = "dynamic batch" if report.batch_size is None else f"batch {report.batch_size}"
    if report.input_size:
        batch += f", uint8 input {report.input_size[0]}x{report.input_size[1]} with preprocessing inside"
    if report.max_abs_diff is None:
        check = "not checked"
    else:
        sizes = ", ".join(map(str, report.checked_batch_sizes))
        check = f"reloaded and checked on batch sizes {sizes}: max |logit difference| {report.max_abs_diff:.3g}"
        if report.pipeline_max_abs_diff is not None:
            check += (f" (vs the Python pipeline, whose resize filter differs: "
                      f"{report.pipeline_max_abs_diff:.3g})")
    print(f"wrote {report.path} ({report.file_format}, {batch}); {check}\nsidecar: {report.sidecar}")
    return 0


if __name__ == "__main__":
    run_script(main)
