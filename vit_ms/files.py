"""Where vit_ms keeps files, and how it writes them: one cache root and one atomic write.

Every cache lives under one root, `$VIT_MS_HOME` (default `~/.cache/vit_ms`): `weights/` for downloaded
checkpoints, `kernels/` for compiled CPU kernels, `datasets/` for data when no checkout is around,
`graphs/` for compiled graphs. Every file vit_ms writes for a user (checkpoints, config.json, metrics,
pictures) appears under its final name only once complete, so a kill or a full disk at any instant
leaves the previous file intact, and it is readable by everyone (0644), like a file a user writes.

Imports nothing heavy: the scripts' `--help` uses it before MindSpore is loaded.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

HOME_ENV = "VIT_MS_HOME"
FILE_MODE = 0o644
TMP_MARK = ".vit_ms-tmp"  # in every temporary name, so `remove_stale_temporaries` finds only ours


def home() -> Path:
    """The cache root: `$VIT_MS_HOME` if set, else `~/.cache/vit_ms`."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "vit_ms").expanduser()


def cache_dir(kind: str) -> Path:
    """`home()/kind` (e.g. "weights", "kernels", "datasets", "graphs"); not created here."""
    return home() / kind


@contextlib.contextmanager
def atomic_path(path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path` to write; renamed onto `path` if the block ends without error.

    On any error (a full disk, a kill signal turned into an exception) the temporary file is removed and
    `path` keeps its previous content. The file ends up with mode 0644.

    Args:
        path: the final file.
        suffix: the temporary name's ending, for writers that insist on one (`ms.save_checkpoint` appends
            `.ckpt` to any name without it; matplotlib picks the format from it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{TMP_MARK}{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)  # mkstemp makes 0600, ms.save_checkpoint 0400
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text_atomic(path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def remove_stale_temporaries(folder) -> list:
    """Delete the temporary files a killed writer left in `folder`; returns their paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_file() and p.name.startswith(".") and TMP_MARK in p.name]
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale


__all__ = ["HOME_ENV", "FILE_MODE", "home", "cache_dir", "atomic_path", "write_text_atomic",
           "remove_stale_temporaries"]
