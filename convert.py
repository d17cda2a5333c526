"""Convert ViT weights into a vit_ms checkpoint, or a vit_ms checkpoint back out to timm or Hugging Face.

Into vit_ms (the default, --to vit_ms): weights from the MindSpore tutorial, mindcv, timm, torchvision,
JAX/big_vision or Hugging Face transformers become a MindSpore `.ckpt` with our parameter names plus
metadata (model config, preprocessing, class names), which `vit_ms.checkpoint.load_model`, eval.py,
infer.py and export.py load with nothing else. Out of vit_ms (--to timm / --to hf): a checkpoint trained
here becomes timm-named safetensors, or a transformers `save_pretrained` folder (config.json with the
class names), for use from PyTorch.

    python convert.py vit_b_16_224 vit_b_16_tutorial.ckpt
    python convert.py vit_base_patch16_224.safetensors vit_b_16_timm.ckpt --num_classes 5
    python convert.py ViT-B_16.npz vit_b_16_384.ckpt --image_size 384
    python convert.py hf_model_folder/ cifar.ckpt --crop_pct 1.0
    python convert.py mnist.safetensors mnist.ckpt --mean 0.1307 --std 0.3081 --class_names names.txt
    python convert.py outputs/train/best.ckpt exported_hf/ --to hf
"""
import argparse
import logging

from vit_ms.cli import ArgumentParser, log_to_console, run_script

# The naming schemes of vit_ms.checkpoint.SOURCES and the export targets of EXPORT_TARGETS, spelled out so
# that --help answers without importing MindSpore (tests/test_checkpoint_cli.py checks they agree).
SOURCES = ("hf", "jax", "mindcv", "timm", "torchvision", "tutorial", "vit_ms")
TARGETS = ("vit_ms", "hf", "timm")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area", "lanczos")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="weights to convert: .ckpt (ours, the tutorial's, mindcv's), .safetensors, "
                                    ".pth/.pt/.bin (needs torch), .npz (JAX), a Hugging Face save_pretrained "
                                    "folder; or a zoo name such as vit_b_16_224 (python -m vit_ms.checkpoint list)")
    parser.add_argument("dst", help="what to write: a vit_ms .ckpt; with --to timm a .safetensors file; with "
                                    "--to hf a folder")
    parser.add_argument("--to", default="vit_ms", choices=TARGETS,
                        help="vit_ms (default): SRC becomes a vit_ms checkpoint; timm / hf: a vit_ms checkpoint "
                             "SRC is written in timm's or transformers' names")
    parser.add_argument("--source", default="auto", choices=("auto",) + SOURCES,
                        help="naming scheme of SRC (default: detected from its parameter names; mindcv's "
                             "second generation has our names, so pass --source mindcv for it)")
    parser.add_argument("--model", default=None,
                        help="preset (e.g. vit_b_16, tutorial) to take what the weights cannot show "
                             "(heads, LayerNorm epsilon, GELU form) from; its shapes must match the weights. "
                             "Default: an HF config.json beside SRC, else the source's convention")
    parser.add_argument("--num_classes", type=int, default=None,
                        help="new head size; the checkpoint's head is dropped and a zero head written")
    parser.add_argument("--image_size", type=int, default=None,
                        help="new input size; the position embedding is resampled to the new patch grid")
    parser.add_argument("--num_heads", type=int, default=None,
                        help="attention heads, needed only for widths outside the paper's table")
    parser.add_argument("--mean", type=float, nargs="+", default=None, metavar="M",
                        help="preprocessing mean in [0, 1] units, one value per input channel (default: the "
                             "source's convention: 0.5 for JAX and HF, ImageNet's otherwise)")
    parser.add_argument("--std", type=float, nargs="+", default=None, metavar="S",
                        help="preprocessing std in [0, 1] units, one value per input channel")
    parser.add_argument("--crop_pct", type=float, default=None,
                        help="eval crop ratio: resize the short side to image_size / crop_pct, then center crop "
                             "(1.0: resize straight to image_size; default 0.875)")
    parser.add_argument("--interpolation", default=None, choices=INTERPOLATIONS,
                        help="resize filter used at eval (default bilinear)")
    parser.add_argument("--class_names", default=None, metavar="FILE",
                        help="a text file with one class name per line, in logit order (default: the names "
                             "in SRC's metadata or in an HF config.json's id2label)")
    args = parser.parse_args(argv)
    if (args.mean is None) != (args.std is None) or (args.mean and len(args.mean) != len(args.std)):
        parser.error("--mean and --std go together, with one value per input channel each")
    if args.to != "vit_ms":
        given = [flag for flag in ("source", "model", "num_classes", "image_size", "num_heads", "mean", "std",
                                   "crop_pct", "interpolation", "class_names") if getattr(args, flag) not in (None, "auto")]
        if given:
            parser.error(f"--to {args.to} writes a vit_ms checkpoint as it is; --{given[0]} applies only to "
                         f"--to vit_ms (convert first, then export)")
    return args


def read_class_names(path) -> list:
    """One class name per non-empty line of a UTF-8 text file."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def main(argv=None) -> int:
    args = parse_args(argv)
    log_to_console()
    from vit_ms.checkpoint import convert_checkpoint, export_checkpoint, resolve_pretrained

    try:
        src = resolve_pretrained(args.src)
        if args.to != "vit_ms":
            written = export_checkpoint(src, args.dst, args.to)
            print(f"wrote {written} ({args.to} names) from {src}")
            return 0
        class_names = read_class_names(args.class_names) if args.class_names else None
        dst, report, config = convert_checkpoint(
            src, args.dst, source=args.source, model=args.model, num_classes=args.num_classes,
            image_size=args.image_size, num_heads=args.num_heads, mean=args.mean, std=args.std,
            crop_pct=args.crop_pct, interpolation=args.interpolation, class_names=class_names)
    except (ValueError, OSError, RuntimeError, ImportError) as error:  # CheckpointError is a ValueError
        logging.error("%s", error)
        return 1
    print(f"wrote {dst}: {report.summary()}\nmodel: {config}")
    return 0


if __name__ == "__main__":
    run_script(main)
