"""Export a checkpoint to MINDIR (dynamic batch by default) or ONNX (static batch), with proven parity.

After writing the file, it is loaded back (mindspore.load + nn.GraphCell for MINDIR, onnxruntime for
ONNX) and its logits are compared with the network's on random batches; a difference above --atol
(default 1e-5 for MINDIR, 1e-4 for ONNX) removes the file and exits with status 2. A JSON sidecar,
FILE.json, carries the preprocessing, class names and model config that infer.py --mindir reads.

    python export.py --checkpoint outputs/train/best.ckpt --output outputs/vit.mindir
    python export.py --checkpoint tutorial.ckpt --output vit.onnx --file_format ONNX --batch_size 1

ONNX: MindSpore's exporter has no Erf operator, so models with exact GELU (the paper presets) export to
MINDIR only; tanh-GELU models (the tutorial preset) export to both.
"""
import argparse
import logging
import sys

from vit_ms.cli import add_model_source_arguments, check_model_source


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_arguments(parser)
    parser.add_argument("--output", required=True, help="file to write; .mindir / .onnx is added when missing")
    parser.add_argument("--file_format", default="MINDIR", type=str.upper, choices=("MINDIR", "ONNX"),
                        help="MINDIR (default) or ONNX")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="fixed batch size; default: dynamic for MINDIR, 1 for ONNX (always static)")
    parser.add_argument("--atol", type=float, default=None,
                        help="largest allowed logit difference in the parity check (default 1e-5 MINDIR, 1e-4 ONNX)")
    parser.add_argument("--no_check", action="store_true", help="skip the reload-and-compare parity check")
    args = parser.parse_args(argv)
    check_model_source(parser, args)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch_size must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import mindspore as ms

    from vit_ms.evaluate import load_classifier
    from vit_ms.export import ExportError, ParityError, export_model

    ms.set_device(args.device_target)
    ms.set_context(mode=ms.PYNATIVE_MODE)  # the reference forward passes need no graph compile
    try:
        classifier = load_classifier(args.checkpoint, model=args.model, pretrained=args.pretrained,
                                     num_classes=args.num_classes)
        report = export_model(classifier.net, args.output, classifier.metadata(), args.file_format,
                              args.batch_size, check=not args.no_check, atol=args.atol)
    except ParityError as error:
        logging.error("export FAILED the parity check, file removed: %s", error)
        return 2
    except (ExportError, ValueError, FileNotFoundError) as error:
        logging.error("%s", error)
        return 1
    batch = "dynamic batch" if report.batch_size is None else f"batch {report.batch_size}"
    if report.max_abs_diff is None:
        check = "not checked"
    else:
        sizes = ", ".join(map(str, report.checked_batch_sizes))
        check = f"reloaded and checked on batch sizes {sizes}: max |logit difference| {report.max_abs_diff:.3g}"
    print(f"wrote {report.path} ({report.file_format}, {batch}); {check}\nsidecar: {report.sidecar}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
