"""Convert ViT weights from the MindSpore tutorial, timm, torchvision or JAX into a vit_ms checkpoint.

The result is a MindSpore `.ckpt` with our parameter names plus metadata (model config, preprocessing),
which `vit_ms.checkpoint.load_model`, eval.py, infer.py and export.py load with nothing else.

    python convert.py vit_b_16_224.ckpt vit_b_16_tutorial.ckpt
    python convert.py vit_base_patch16_224.safetensors vit_b_16_timm.ckpt --num_classes 5
    python convert.py ViT-B_16.npz vit_b_16_384.ckpt --image_size 384
"""
import argparse
import logging
import sys


# The naming schemes of vit_ms.checkpoint.SOURCES, spelled out so that --help answers without importing
# MindSpore (tests/test_checkpoint.py checks the two agree).
SOURCES = ("vit_ms", "tutorial", "timm", "torchvision", "jax")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="weights to convert: .ckpt (ours or the tutorial's), .safetensors, "
                                    ".pth/.pt/.bin (needs torch), .npz (JAX); or a named pretrained "
                                    "checkpoint such as vit_b_16_224 (downloaded into the cache)")
    parser.add_argument("dst", help="the vit_ms .ckpt to write")
    parser.add_argument("--source", default="auto", choices=("auto",) + SOURCES,
                        help="naming scheme of SRC (default: detected from its parameter names)")
    parser.add_argument("--model", default=None,
                        help="preset (e.g. vit_b_16, tutorial) to take what the weights cannot show "
                             "(heads, LayerNorm epsilon, GELU form) from; its shapes must match the weights. "
                             "Default: shapes from the weights, numerics from the source's convention")
    parser.add_argument("--num_classes", type=int, default=None,
                        help="new head size; the checkpoint's head is dropped and a zero head written")
    parser.add_argument("--image_size", type=int, default=None,
                        help="new input size; the position embedding is resampled to the new patch grid")
    parser.add_argument("--num_heads", type=int, default=None,
                        help="attention heads, needed only for widths outside the paper's table")
    parser.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                        help="preprocessing mean in [0, 1] units (default: 0.5 for JAX, ImageNet's otherwise)")
    parser.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                        help="preprocessing std in [0, 1] units (default: 0.5 for JAX, ImageNet's otherwise)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from vit_ms.checkpoint import convert_checkpoint, resolve_pretrained

    try:
        src = resolve_pretrained(args.src)
        dst, report, config = convert_checkpoint(
            src, args.dst, source=args.source, model=args.model, num_classes=args.num_classes,
            image_size=args.image_size, num_heads=args.num_heads, mean=args.mean, std=args.std)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as error:  # CheckpointError is a ValueError
        logging.error("%s", error)
        return 1
    print(f"wrote {dst}: {report.summary()}\nmodel: {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
