"""The run folder: what a training run writes, and the rules that keep runs apart.

    config.json     the resolved TrainConfig
    train.log       everything logged on the console (one line per epoch; no progress bars)
    metrics.jsonl   one line per finished epoch (see `EpochRecorder` for the fields)
    last.ckpt       weights + optimizer state + metadata, rewritten atomically after every epoch
    best.ckpt       weights + metadata of the epoch with the best val top-1 (trained or EMA weights)
    ema.ckpt        the model EMA's weights + metadata after the last epoch (with --ema_decay)
    curves.png      loss and accuracy per epoch, drawn when training ends

A new run never writes into a folder that holds another run: it is refused with a message naming
`--resume` (continue that run) and `--overwrite` (replace it), as Hugging Face's training scripts refuse
a non-empty `--output_dir` without `--overwrite_output_dir`: the folder a user names is the folder used. Nothing is created before the run's inputs are
checked (`check_run_folder` only reads), and log lines from before the folder exists are replayed into
train.log once it does.
"""
from __future__ import annotations

import json
import logging
import shlex
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from .. import files
from .config import CONFIG_FILE, TrainConfig

METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
LAST_CKPT = "last.ckpt"
BEST_CKPT = "best.ckpt"
EMA_CKPT = "ema.ckpt"
CURVES_FILE = "curves.png"
# What a run leaves in its folder (followups add eval/, infer/, vit.mindir); any of them marks a run.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, LOG_FILE, LAST_CKPT, BEST_CKPT, EMA_CKPT, CURVES_FILE, "vit.mindir",
             "vit.mindir.json")
RUN_FOLDERS = ("eval", "infer")


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (another run is there, nothing to resume, a write failed)."""


def resume_command(out: Path) -> str:
    """The exact command that continues the run in `out`."""
    return f"python train.py --resume --output_dir {shlex.quote(str(out))}"


def check_run_folder(cfg: TrainConfig, writer: bool = True) -> Path:
    """Check that `cfg.output_dir` may be used as asked, creating nothing; returns the folder.

    Args:
        cfg: output_dir, resume, overwrite.
        writer: whether this process writes the folder. Under msrun only rank 0 does, and may already
            have started the new run's files when another rank gets here, so only it checks for a run.

    Raises:
        RunFolderError: resuming a folder without last.ckpt, or starting a new run where one exists
            (neither --resume nor --overwrite given).
    """
    out = Path(cfg.output_dir).expanduser()
    if cfg.resume:
        if not (out / LAST_CKPT).is_file():
            raise RunFolderError(f"--resume: {out / LAST_CKPT} does not exist; run without --resume to start, "
                                 f"or pass the --output_dir of the run to continue")
        return out
    if not writer:
        return out
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--output_dir {out} is a file, not a folder")
    held = existing_run_files(out)
    if held and not cfg.overwrite:
        raise RunFolderError(f"{out} already holds a run ({', '.join(p.name for p in held)}); continue it with "
                             f"--resume, replace it with --overwrite, or choose another --output_dir")
    return out


def existing_run_files(out: Path) -> List[Path]:
    """The files and folders of a run that `out` holds, in `RUN_FILES` order."""
    names = [*RUN_FILES, *RUN_FOLDERS]
    return [out / name for name in names if (out / name).exists()]


def prepare_run_folder(cfg: TrainConfig, out: Path) -> List[Path]:
    """Create the folder; with --overwrite delete the earlier run's files; remove temporaries a killed
    writer left. Returns the stale temporaries removed. Call only after the inputs are checked."""
    out.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite and not cfg.resume:
        for path in existing_run_files(out):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return files.remove_stale_temporaries(out)


def write_config(out: Path, cfg: TrainConfig) -> Path:
    """config.json: the resolved settings (atomically)."""
    return files.write_text_atomic(out / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------
# metrics.jsonl: the one reader and the one writer
# ---------------------------------------------------------------------------------------------------------

def read_metrics(path) -> List[dict]:
    """The records of a metrics.jsonl, in file order ([] when there is none).

    Args:
        path: the metrics.jsonl file, or the run's folder.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_metrics(out: Path, records: List[dict]) -> Path:
    """Replace metrics.jsonl with `records` atomically: a kill leaves the old file or the new one."""
    return files.write_text_atomic(out / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records))


def append_metrics(out: Path, record: dict) -> Path:
    """Add one epoch's line (the whole file is rewritten atomically; it holds one short line per epoch)."""
    return write_metrics(out, read_metrics(out) + [record])


def trim_metrics(out: Path, last_epoch: int) -> None:
    """Drop lines beyond `last_epoch`: a kill between an epoch's line and its last.ckpt leaves a line for
    an epoch that will be trained again."""
    records = read_metrics(out)
    kept = [r for r in records if r["epoch"] <= last_epoch]
    if len(kept) != len(records):
        write_metrics(out, kept)


# ---------------------------------------------------------------------------------------------------------
# Logging: the console from the start, train.log once the folder may be written
# ---------------------------------------------------------------------------------------------------------

class _TqdmHandler(logging.StreamHandler):
    """Console logging that does not tear a progress bar apart."""

    def emit(self, record):
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging's contract: report a broken handler, never raise
            self.handleError(record)


class _Buffer(logging.Handler):
    """Keeps the records logged before train.log may be opened, to replay them into it."""

    def __init__(self):
        super().__init__()
        self.records: List[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


class RunLogging:
    """The `vit_ms` logger's handlers for one run: the console (WARNING and up only on ranks > 0, so one
    rank speaks for a data-parallel job), and train.log on the writing rank once `open_file` is called."""

    def __init__(self, rank: Optional[int], quiet: bool = False):
        prefix = f"[rank {rank}] " if rank is not None else ""
        self.formatter = logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S")
        console = _TqdmHandler()
        console.setLevel(logging.WARNING if quiet else logging.INFO)
        self.buffer = _Buffer()
        self.handlers: List[logging.Handler] = [console, self.buffer]
        self.package = logging.getLogger("vit_ms")
        self.previous_level = self.package.level
        self.package.setLevel(logging.INFO)
        for handler in self.handlers:
            handler.setFormatter(self.formatter)
            self.package.addHandler(handler)
        self.package.propagate = False  # the handlers above are the run's console and log file

    def open_file(self, path: Path) -> None:
        """Append to `path` from now on, starting with the lines logged so far."""
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(self.formatter)
        for record in self.buffer.records:
            handler.handle(record)
        self._remove(self.buffer)
        self.handlers.append(handler)
        self.package.addHandler(handler)

    def _remove(self, handler: logging.Handler) -> None:
        self.package.removeHandler(handler)
        handler.close()
        self.handlers.remove(handler)

    def close(self) -> None:
        for handler in list(self.handlers):
            self._remove(handler)
        self.package.setLevel(self.previous_level)
        self.package.propagate = True


__all__ = ["METRICS_FILE", "LOG_FILE", "LAST_CKPT", "BEST_CKPT", "EMA_CKPT", "CURVES_FILE", "RunFolderError",
           "resume_command", "check_run_folder", "existing_run_files", "prepare_run_folder", "write_config",
           "read_metrics", "write_metrics", "append_metrics", "trim_metrics", "RunLogging"]
