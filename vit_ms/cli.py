"""Command-line pieces shared by train.py, eval.py, infer.py, export.py and convert.py: exact flags, where
the model comes from, one console log format, and whether the installed MindSpore can use the device asked for.

Imports nothing heavy, so a script's `--help` answers before MindSpore is loaded.
"""
import argparse
import difflib
import logging
import re
import sys
from pathlib import Path
from typing import Callable, Optional

from . import interrupts

DEVICES = ("CPU", "GPU", "Ascend")


def run_script(main: Callable[[], int]) -> None:
    """Run a script's `main()` and exit with its status; Ctrl-C ends it with one line and status 130.

    The signals are routed to vit_ms's watcher thread first (`vit_ms.interrupts`): otherwise a Ctrl-C during
    a graph run reaches MindSpore's handler, which ends the process with SIGTERM and no message.
    """
    interrupts.route_to_watcher()
    try:
        status = main()
    except KeyboardInterrupt:
        print(f"{Path(sys.argv[0]).name}: interrupted (Ctrl-C)", file=sys.stderr)
        status = 130
    sys.exit(status)


# One console line format for every script, the one train.py's run log (vit_ms.training.rundir) writes.
LOG_FORMAT, LOG_DATE_FORMAT = "%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"


def log_to_console() -> None:
    """INFO and above on stderr, as "12:04:05 INFO message"."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT)


def quiet_mindspore() -> None:
    """MindSpore's console at the level a user reads; call before MindSpore is imported (it reads these
    once). A user's own settings win.

    GLOG_v=2: warnings and errors, no INFO. Two sub-modules report errors only (MS_SUBMODULE_LOG_v,
    MindSpore's per-module level, mindspore.cn/docs/en/r2.1/note/env_var_list.html "Log"): DISTRIBUTED,
    whose msrun rendezvous logs ~150 WARNING lines of connection retries per start on 2 CPU workers (the
    msrun console goes from 172 lines to 26), and PIPELINE, which warns on every graph compiled while
    `vit_ms.graph_cache` is on ("Check the consistency of dependency files hash failed", "Use the
    compilation cache ... Be aware of correctness risks"): the cache's key makes those checks ours.
    """
    import os

    os.environ.setdefault("GLOG_v", "2")
    os.environ.setdefault("MS_SUBMODULE_LOG_v", "{DISTRIBUTED:3,PIPELINE:3}")


class _SubCommands(argparse._SubParsersAction):
    """Sub-commands whose unknown flags are reported by the sub-command's own parser, so its usage line and
    the "did you mean" hint come from its flags (`verify --chek` -> `--check`), not the top level's."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        # argparse hands a sub-command's leftovers back to the top level under this attribute.
        unknown = getattr(namespace, argparse._UNRECOGNIZED_ARGS_ATTR, None)
        if unknown:
            self._name_parser_map[values[0]].error(f"unrecognized arguments: {' '.join(unknown)}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with exact flags: no prefix matching (`--epoch` is not `--epochs`), and an unknown flag is
    answered with the nearest valid one ("did you mean --epochs?"), exit status 2. Sub-commands are
    parsers of this class too, and answer for their own flags."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("parser_class", ArgumentParser)
        kwargs.setdefault("action", _SubCommands)
        return super().add_subparsers(**kwargs)

    def error(self, message):
        unknown = re.findall(r"(--?[A-Za-z][\w-]*)", message) if "unrecognized arguments" in message else []
        known = [opt for action in self._actions for opt in action.option_strings]
        hints = []
        for flag in unknown:
            close = difflib.get_close_matches(flag.split("=")[0], known, n=1, cutoff=0.6)
            if close:
                hints.append(f"{flag}: did you mean {close[0]}?")
        if hints:
            message = f"{message} ({'; '.join(hints)})"
        super().error(message)


# What to install for each device target (https://www.mindspore.cn/install lists the builds).
_INSTALL_HINT = {
    "GPU": "the GPU (CUDA) build of MindSpore on a machine with an NVIDIA GPU and CUDA",
    "Ascend": "the Ascend build of MindSpore with Huawei's CANN toolkit on a machine with an Ascend NPU",
    "CPU": "any MindSpore build",
}


def supported_device_targets() -> list:
    """The device targets the installed MindSpore can use, e.g. ["CPU"] for the CPU wheel."""
    import mindspore as ms

    try:
        # The plugin table MindSpore fills at import; `ms.hal.is_available` reads the same table but logs
        # two WARNING lines per unavailable target.
        from mindspore.hal.device import _context_handle

        return [t for t in DEVICES if _context_handle.is_pkg_support_device(t)]
    except (ImportError, AttributeError):
        return [t for t in DEVICES if ms.hal.is_available(t)]


def device_target_error(target: str) -> Optional[str]:
    """None when the installed MindSpore can use `target`; else one line saying what it supports and what
    to install."""
    supported = supported_device_targets()
    if target in supported:
        return None
    import mindspore as ms

    return (f"--device_target {target}: this MindSpore {ms.__version__} supports {', '.join(supported) or 'no'} "
            f"device target(s) only; install {_INSTALL_HINT[target]} (https://www.mindspore.cn/install), "
            f"or use --device_target {supported[0] if supported else 'CPU'}")


def require_device_target(parser: argparse.ArgumentParser, target: str) -> None:
    """`parser.error` (one line, exit status 2) when the installed MindSpore cannot use `target`.

    Every script calls this before building anything, instead of letting MindSpore fail deep inside
    `set_device` with a long traceback.
    """
    message = device_target_error(target)
    if message:
        parser.error(message)


def add_model_source_arguments(parser: argparse.ArgumentParser, mindir: bool = False) -> None:
    """--checkpoint | [--mindir] | --model with --pretrained [--num_classes], and --device_target.

    Args:
        parser: the script's parser.
        mindir: also offer --mindir (an exported file with its JSON sidecar).
    """
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="vit_ms checkpoint (weights + metadata), e.g. from train.py")
    if mindir:
        source.add_argument("--mindir", help="MINDIR from export.py; its sidecar FILE.json must lie beside it")
    source.add_argument("--model", help="preset (e.g. tutorial, vit_b_16) for --pretrained foreign weights")
    parser.add_argument("--pretrained", help="with --model: weights without vit_ms metadata (a path, or a name "
                                             "such as vit_b_16_224 for the tutorial's checkpoint)")
    parser.add_argument("--num_classes", type=int, default=None, help="with --model: head width (default 1000)")
    parser.add_argument("--device_target", default="CPU", choices=DEVICES,
                        help="where to run, as in train.py (default CPU)")


def check_model_source(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject, with parser.error (one line, exit status 2), what `add_model_source_arguments` let through:
    flag combinations argparse cannot express, and a --device_target the installed MindSpore cannot use
    (`require_device_target`, before the script loads anything)."""
    if args.model and not args.pretrained:
        parser.error("--model needs --pretrained")
    if args.pretrained and not args.model:
        parser.error("--pretrained goes with --model (a vit_ms checkpoint takes --checkpoint)")
    require_device_target(parser, args.device_target)
