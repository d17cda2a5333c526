"""Compiled graphs cached across processes, under a key that a stale graph can never match.

MindSpore's graph mode spends seconds compiling each network before its first step (a ViT training
step: ~10 s on 2 cores). MindSpore can save what its front end compiled and load it in the next process
(`MS_COMPILER_CACHE_ENABLE` / `MS_COMPILER_CACHE_PATH`, see
https://www.mindspore.cn/docs/en/r2.3.1/note/env_var_list.html), but it files the graphs by the order
they were compiled in (`compile_cache_0.mindir`, `_1`, ...) and checks only the entry script's
dependencies: a graph compiled by other vit_ms code, another MindSpore, another CPU's kernels or another
model would be loaded as if it were this one ("Be aware of correctness risks", it warns).

So every use gets its own folder, `$VIT_MS_HOME/graphs/<key>`, where the key is a digest of everything
that shapes the graphs: the vit_ms sources (Python and C++), the MindSpore version, the CPU (model and
instruction-set flags), the `VIT_MS_*` switches that pick kernels, and the caller's own settings (which
script, which model config, batch size...). Change any of these and the key changes, so the old graphs
are simply not found. Weights are not part of a graph: a cached graph runs whatever parameters the
network holds (tested).

`VIT_MS_GRAPH_CACHE=0` turns the cache off. The newest `KEEP` folders are kept, older ones removed.
"""
from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Mapping, Optional

from .files import cache_dir

logger = logging.getLogger(__name__)

SWITCH_ENV = "VIT_MS_GRAPH_CACHE"
KEEP = 32  # cache folders kept; each holds a few hundred KB to a few MB of graphs
_SOURCE_SUFFIXES = (".py", ".cc", ".h", ".json")
# Environment that changes what the graphs contain; VIT_MS_HOME (where the cache lives) does not.
_IGNORED_ENV = {"VIT_MS_HOME", SWITCH_ENV}


def source_digest(package_dir: Optional[str] = None) -> str:
    """SHA-256 over the names and bytes of the vit_ms sources (Python, C++ and JSON files).

    Args:
        package_dir: another copy of the package to digest; default this one (digested once per process).
    """
    return _digest(package_dir) if package_dir else _own_digest(str(Path(__file__).resolve().parent))


@functools.lru_cache(maxsize=1)
def _own_digest(root: str) -> str:
    return _digest(root)


def _digest(package_dir: str) -> str:
    root = Path(package_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in _SOURCE_SUFFIXES and p.is_file()
                       and "__pycache__" not in p.parts):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def cpu_description() -> str:
    """The CPU as the kernels see it: model name and instruction-set flags (Linux), else the platform."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    first = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        first[key.strip()] = value.strip()
    return f"{platform.machine()} {first.get('model name', '')} {first.get('flags', '')}"


def _mindspore_version() -> str:
    import mindspore  # noqa: PLC0415 (heavy; imported only when a graph is about to be compiled)
    return mindspore.__version__


def cache_key(purpose: str, settings: Optional[Mapping] = None) -> str:
    """A short digest naming one cache folder.

    Args:
        purpose: what compiles the graphs, e.g. "train", "infer", "eval".
        settings: anything else that shapes them (the model config, batch size, mode...); JSON-able.
    """
    switches = {k: v for k, v in os.environ.items() if k.startswith("VIT_MS_") and k not in _IGNORED_ENV}
    parts = {
        "purpose": purpose,
        "settings": settings or {},
        "vit_ms": source_digest(),
        "mindspore": _mindspore_version(),
        "cpu": cpu_description(),
        "switches": switches,
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def enabled() -> bool:
    """False when `VIT_MS_GRAPH_CACHE` is 0/false/off."""
    return os.environ.get(SWITCH_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def enable(purpose: str, settings: Optional[Mapping] = None) -> Optional[Path]:
    """Turn MindSpore's compile cache on for this process, in the folder for this key.

    Call before the first graph compiles (building a network does not compile it; its first call does).
    Returns the folder, or None when the cache is switched off. With the cache on, the objects alive at the
    first call are also taken out of the garbage collector's walks (`_freeze_collected_objects`), which
    MindSpore makes before every compile.

    Args:
        purpose: what compiles the graphs, e.g. "train", "infer".
        settings: what else shapes the graphs (see `cache_key`).
    """
    if not enabled():
        return None
    if not Path(sys.argv[0] if sys.argv else "").is_file():
        # MindSpore hashes the entry script to validate its cache and fails on `python -c`, a REPL or a
        # notebook (FileNotFoundError for '-c'): no cache there.
        logger.debug("no compiled-graph cache: the entry point %r is not a script file", sys.argv[:1])
        return None
    root = cache_dir("graphs")
    folder = root / cache_key(purpose, settings)
    folder.mkdir(parents=True, exist_ok=True)
    os.utime(folder)  # newest first when pruning
    _prune(root, keep=KEEP)
    os.environ["MS_COMPILER_CACHE_ENABLE"] = "1"
    os.environ["MS_COMPILER_CACHE_PATH"] = str(folder)
    logger.debug("compiled graphs cached in %s", folder)
    _freeze_collected_objects()
    return folder


@functools.lru_cache(maxsize=None)  # once per process
def _freeze_collected_objects() -> None:
    """Take the objects alive now out of Python's cyclic garbage collector's walks (`gc.freeze()`).

    MindSpore runs a full `gc.collect()` before every graph it compiles (`mindspore/graph/api.py`), a walk
    over every object the imports made: 86 ms of a 0.21 s ViT-B/16 compile loaded from this cache (cProfile,
    AMD EPYC). Frozen objects are still freed by reference counting; only a reference cycle among them
    that is already garbage would now stay, once. Done here, with the cache, because this is the fast-start
    path scripts opt into.
    """
    gc.freeze()


def _prune(root: Path, keep: int) -> None:
    folders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in folders[keep:]:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["SWITCH_ENV", "cache_key", "enable", "enabled", "source_digest", "cpu_description"]
