"""`python -m vit_ms.data {verify,shrink,sample,download}`: list unreadable images, shrink large photos, or
prepare a dataset."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from ..cli import ArgumentParser, log_to_console
from .download import TUTORIAL_URL, download_tutorial_dataset
from .files import DatasetError, list_images, verify_images
from .sample import ensure_sample_dataset


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`verify ROOT` lists unreadable images (exit 1 if any); `shrink SRC DST` copies an image folder with large
    photos made smaller; `sample` and `download` prepare datasets."""
    parser = ArgumentParser(prog="python -m vit_ms.data", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="decode every image under ROOT and list the unreadable ones")
    verify.add_argument("root", help="dataset root, split folder or any folder of images (searched recursively)")
    verify.add_argument("--workers", type=int, default=None, help="checking threads (default: all cores)")
    verify.add_argument("--check", choices=("full", "header"), default="full",
                        help="full: decode every file (default); header: open and verify without decoding")
    about = ("copy an image folder, large photos resized to a short side of --short_side px (decoding "
             "12-megapixel photos is slower than a ViT at 224 px); a second run only does what changed")
    shrink = commands.add_parser("shrink", help=about, description=about)
    shrink.add_argument("src", help="dataset root (train/, val/, ...) or any folder of images")
    shrink.add_argument("dst", help="where the copy goes (created or brought up to date; not inside SRC)")
    shrink.add_argument("--short_side", type=int, default=800,
                        help="largest short side kept, in pixels (default 800: the smallest random crop of "
                             "the finetune recipe, 8%% of the area, still has 224 px; about 3.6x the image "
                             "size in general)")
    shrink.add_argument("--workers", type=int, default=None, help="threads (default: all cores)")
    sample = commands.add_parser("sample", help="generate the offline sample set (deterministic)")
    sample.add_argument("--root", default=None, help="where to write it (default: <data root>/sample)")
    download = commands.add_parser("download", help="download and extract the tutorial's ImageNet subset")
    download.add_argument("--root", default=None,
                          help="data root (default: $VIT_MS_DATA, else ./datasets if present, else the cache)")
    download.add_argument("--url", default=TUTORIAL_URL, help="archive URL (default: the tutorial's)")
    args = parser.parse_args(argv)
    log_to_console()
    try:
        if args.command == "verify":
            total = len(list_images(args.root))
            bad = verify_images(args.root, args.workers, args.check)
            for path, reason in bad:
                print(f"{path}: {reason}")
            print(f"{total - len(bad)} of {total} images readable, {len(bad)} unreadable under {args.root}")
            return 1 if bad else 0
        if args.command == "shrink":
            from .shrink import shrink_images

            report = shrink_images(args.src, args.dst, args.short_side, args.workers)
            for path, reason in report.unreadable:
                print(f"{path}: {reason}")
            print(f"{args.dst}: {report.summary()}")
            return 0
        if args.command == "sample":
            print(ensure_sample_dataset(args.root))
        else:
            print(download_tutorial_dataset(args.root, url=args.url))
    except (DatasetError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
