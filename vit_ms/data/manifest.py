"""The image check at scale: each file's result cached in a manifest, and shared out between data-parallel ranks.

Checking every image before the first epoch costs a decode per file (about an hour for ImageNet-1k on 2
cores), so the result of `check_image` is kept per file, keyed by (relative path, size, mtime), in a JSON
manifest: a second start re-checks only new or changed files, and a result at a deeper check mode also
answers a shallower one ("full" answers "header"; a file found bad stays bad).

Where: `ROOT/.vit_ms-check/<split>.json` beside the split (hidden, so listings and class discovery ignore
it); when the data root is not writable, `$VIT_MS_HOME/datasets/checks/<hash of the split path>/<split>.json`.
Every write is atomic (`vit_ms.files.atomic_path`), so concurrent writers never leave a torn file; the
last complete one wins.

Under msrun (`num_shards` > 1) no file is decoded twice: each file needing a check belongs to exactly one
rank (a CRC of its relative path, modulo the shard count, so every rank agrees without talking), each rank
checks its own files and writes them to `<split>.part-<rank>-of-<n>.json`, and every rank then waits for
the other ranks' results (bounded: `$VIT_MS_CHECK_TIMEOUT` seconds, default max(600, 20x its own check time),
then a `DatasetError` naming the ranks it waited for). Rank 0 merges the parts into the manifest and
removes them. Parts left by a killed run are still valid results (each entry carries its size and mtime)
and are read like the manifest.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..files import cache_dir, write_text_atomic
from .files import CHECK_DEPTH, DatasetError, check_images, check_mode

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
MANIFEST_DIR = ".vit_ms-check"
TIMEOUT_ENV = "VIT_MS_CHECK_TIMEOUT"

Entry = list  # [size, mtime_ns, depth, reason or None]


def manifest_path(split_dir) -> Path:
    """Where the manifest of `split_dir` lives: beside it if its data root is writable, else in the cache."""
    split_dir = Path(split_dir).resolve()
    local = split_dir.parent / MANIFEST_DIR
    probe = local if local.is_dir() else split_dir.parent
    if os.access(probe, os.W_OK | os.X_OK):
        return local / f"{split_dir.name}.json"
    digest = hashlib.sha1(str(split_dir).encode()).hexdigest()[:16]
    return cache_dir("datasets") / "checks" / digest / f"{split_dir.name}.json"


def _part_path(manifest: Path, rank: int, shards: int) -> Path:
    return manifest.with_name(f"{manifest.stem}.part-{rank}-of-{shards}.json")


def _part_paths(manifest: Path) -> List[Path]:
    return sorted(manifest.parent.glob(f"{manifest.stem}.part-*-of-*.json")) if manifest.parent.is_dir() else []


def _read_entries(path: Path) -> Dict[str, Entry]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:  # a foreign or damaged file only costs a re-check
        logger.warning("ignoring unreadable check manifest %s (%s)", path, error)
        return {}
    if not isinstance(content, dict) or content.get("version") != MANIFEST_VERSION:
        return {}
    return content.get("entries", {})


def _write_entries(path: Path, entries: Dict[str, Entry]) -> None:
    text = json.dumps({"version": MANIFEST_VERSION, "entries": entries}, separators=(",", ":"))
    write_text_atomic(path, text)


def read_known(manifest: Path) -> Dict[str, Entry]:
    """The manifest's entries plus those of any part files beside it (a part is newer, so it wins)."""
    known = _read_entries(manifest)
    for part in _part_paths(manifest):
        known.update(_read_entries(part))
    return known


def _usable(entry: Optional[Entry], size: int, mtime_ns: int, depth: int) -> bool:
    return (entry is not None and entry[0] == size and entry[1] == mtime_ns
            and (entry[3] is not None or entry[2] >= depth))


def owner(relative: str, shards: int) -> int:
    """The rank that checks file `relative` (its path relative to the split folder)."""
    return zlib.crc32(relative.encode("utf-8")) % shards


def _signature(manifest: Path) -> Tuple:
    """What changes when another rank writes a result: the names and mtimes of the manifest and parts."""
    out = []
    for path in [manifest] + _part_paths(manifest):
        try:
            out.append((path.name, path.stat().st_mtime_ns))
        except FileNotFoundError:
            pass
    return tuple(out)


def check_split(split_dir, paths: Sequence[Path], mode: str = "full", num_workers: Optional[int] = None,
                num_shards: Optional[int] = None, shard_id: Optional[int] = None,
                timeout: Optional[float] = None) -> Tuple[List[Optional[str]], int]:
    """`check_image` of every path of one split, through the manifest and shared out between ranks.

    Args:
        split_dir: the split folder all `paths` lie under (the manifest's key is the path relative to it).
        paths: image files, e.g. from `scan_split`.
        mode: "full", "header" or "none" (nothing checked, no manifest touched).
        num_workers: checking threads.
        num_shards, shard_id: the data-parallel layout (every rank must call with the same files).
        timeout: seconds to wait for the other ranks (default `$VIT_MS_CHECK_TIMEOUT`, else
            max(600, 20 x this rank's own check time)).

    Returns:
        (the reason each path is unusable, or None; how many files this process checked itself).

    Raises:
        DatasetError: another rank's results did not arrive in time.
    """
    mode = check_mode(mode)
    if mode == "none" or not paths:
        return [None] * len(paths), 0
    depth = CHECK_DEPTH[mode]
    base = str(split_dir) + os.sep
    # String slicing, not Path.relative_to: 100,000 files cost milliseconds, not a second.
    relative = [str(p)[len(base):] if str(p).startswith(base) else _relative(p, split_dir) for p in paths]
    stats = []
    for p in paths:
        try:
            st = os.stat(p)
            stats.append((st.st_size, st.st_mtime_ns))
        except FileNotFoundError:  # deleted since the scan: matches no entry, and its check says why
            stats.append((-1, -1))
    manifest = manifest_path(split_dir)
    known = read_known(manifest)
    stale = len(known) > len(paths)  # entries of files since deleted (or of the parts): rewrite
    todo = [i for i, (rel, (size, mtime)) in enumerate(zip(relative, stats))
            if not _usable(known.get(rel), size, mtime, depth)]
    shards, rank = (num_shards or 1), (shard_id or 0)
    mine = [i for i in todo if owner(relative[i], shards) == rank]

    start = time.monotonic()
    reasons = check_images([Path(paths[i]) for i in mine], mode, num_workers)
    fresh = {relative[i]: [stats[i][0], stats[i][1], depth, reason] for i, reason in zip(mine, reasons)}
    elapsed = time.monotonic() - start
    if todo:
        logger.info("%s: %s-checked %d of %d files in %.1f s (%d cached in %s)", split_dir, mode, len(mine),
                    len(paths), elapsed, len(paths) - len(todo), manifest)
    known.update(fresh)
    if shards > 1 and fresh:  # even when this rank needs nothing more: the others wait for these results
        _write_or_fail(_part_path(manifest, rank, shards), fresh)
    if shards > 1 and len(mine) < len(todo):
        others = [i for i in todo if owner(relative[i], shards) != rank]
        known = _wait_for_ranks(manifest, known, others, relative, stats, depth,
                                rank, shards, timeout if timeout is not None else _default_timeout(elapsed))
    if rank == 0:
        _save(manifest, known, relative, bool(todo) or stale)
    return [known[rel][3] for rel in relative], len(mine)


def _relative(path, split_dir) -> str:
    return Path(path).resolve().relative_to(Path(split_dir).resolve()).as_posix()


def _default_timeout(own_seconds: float) -> float:
    if os.environ.get(TIMEOUT_ENV):
        return float(os.environ[TIMEOUT_ENV])
    return max(600.0, 20 * own_seconds)


def _write_or_fail(path: Path, entries: Dict[str, Entry]) -> None:
    try:
        _write_entries(path, entries)
    except OSError as error:
        raise DatasetError(f"cannot write the image check results to {path} ({error}); the other ranks wait "
                           f"for them. Free space there, point $VIT_MS_HOME to a writable folder, or start "
                           f"with check='none'") from error


def _wait_for_ranks(manifest: Path, known: Dict[str, Entry], waiting: List[int], relative, stats, depth: int,
                    rank: int, shards: int, timeout: float) -> Dict[str, Entry]:
    """Re-read the manifest and parts whenever they change until every file in `waiting` has a result."""
    deadline = time.monotonic() + timeout
    seen, pause = None, 0.05
    while True:
        signature = _signature(manifest)
        if signature != seen:
            seen = signature
            known.update(read_known(manifest))
            waiting = [i for i in waiting if not _usable(known.get(relative[i]), *stats[i], depth)]
            if not waiting:
                return known
        if time.monotonic() > deadline:
            owners = sorted({owner(relative[i], shards) for i in waiting})
            raise DatasetError(
                f"rank {rank} of {shards}: waited {timeout:.0f} s for the image check results of {len(waiting)} "
                f"file(s) (e.g. {relative[waiting[0]]}) from rank(s) {owners}, which should write them to "
                f"{manifest.parent}. Are all ranks running on the same data with the same shard count? "
                f"Set ${TIMEOUT_ENV}=SECONDS to wait longer, or start with check='none' to trust the files")
        time.sleep(pause)
        pause = min(pause * 1.5, 2.0)


def _save(manifest: Path, known: Dict[str, Entry], relative: Sequence[str], changed: bool) -> None:
    """Write the merged manifest (this split's current files only) and remove the parts it absorbed."""
    parts = _part_paths(manifest)
    if not (changed or parts):
        return
    current = {rel: known[rel] for rel in relative}
    try:
        _write_entries(manifest, current)
    except OSError as error:  # the cache is an optimisation: the next start re-checks instead
        logger.warning("could not save the image check manifest %s (%s); the next start checks again",
                       manifest, error)
        return
    for part in parts:
        part.unlink(missing_ok=True)


__all__ = ["MANIFEST_DIR", "TIMEOUT_ENV", "manifest_path", "read_known", "owner", "check_split"]
