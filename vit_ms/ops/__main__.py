"""Build the fused CPU kernels ahead of time: `python -m vit_ms.ops build [--isa auto|all|avx512|avx2|baseline]`.

Useful in a container image or before a multi-process run, so no process compiles at its first step.
"""
from __future__ import annotations

import logging
import sys

from ..cli import ArgumentParser
from . import ISAS, KernelBuildError, build_all_for, cpu_isas, selected_isa


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m vit_ms.ops", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="compile the kernels into $VIT_MS_HOME/kernels")
    build.add_argument("--isa", default="auto", choices=["auto", "all", *ISAS],
                       help="auto: $VIT_MS_KERNEL_ISA or the best this CPU runs; all: every variant it runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        isas = cpu_isas() if args.isa == "all" else [selected_isa() if args.isa == "auto" else args.isa]
        built = build_all_for(isas)
    except (KernelBuildError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for isa, path in built.items():
        print(f"{isa}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
