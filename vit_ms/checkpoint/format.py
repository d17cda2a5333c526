"""Our own file format: a MindSpore `.ckpt` with our parameter names plus one string entry, `vit_ms_meta`.

The metadata is JSON: the model config, the preprocessing, the class names, run facts (epoch, step, ...)
and an integrity record, a SHA-256 digest of every tensor (name, dtype, shape, bytes) and of the metadata
itself. MindSpore's protobuf reader accepts a file whose tensor bytes were changed (a flipped bit on disk,
a bad copy), so without the digest such a file loads silently with a corrupted weight; every reader in
this package (`readers.read_params`, hence `load_weights`, `load_model`, `read_training_checkpoint`,
convert.py, eval.py, infer.py) recomputes it and refuses a mismatch.
"""
from __future__ import annotations

import hashlib
import json
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

from ..config import Preprocess, ViTConfig

META_KEY = "vit_ms_meta"
FORMAT_VERSION = 1
INTEGRITY_KEY = "integrity"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, fails its integrity check, or whose weights do not fit the model."""


def make_metadata(config: ViTConfig, class_names: Optional[Sequence[str]] = None,
                  preprocess: Optional[Preprocess] = None, **extra) -> dict:
    """The metadata dict stored in a checkpoint. `extra` holds JSON-able run facts (epoch, step, ...).

    Args:
        config: the model's architecture.
        class_names: one name per output class, in logit order, or None.
        preprocess: the input preprocessing; default `Preprocess.for_model(config)`.
    """
    preprocess = preprocess or Preprocess.for_model(config)
    if preprocess.image_size != config.image_size:
        raise ValueError(f"Preprocess.image_size ({preprocess.image_size}) differs from "
                         f"ViTConfig.image_size ({config.image_size})")
    if len(preprocess.mean) != config.in_channels:
        raise ValueError(f"Preprocess has {len(preprocess.mean)} mean/std values for a model with "
                         f"{config.in_channels} input channel(s); give one value per channel")
    if class_names is not None and len(class_names) != config.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {config.num_classes} classes")
    return {"format_version": FORMAT_VERSION, "model": config.to_dict(), "preprocess": preprocess.to_dict(),
            "class_names": list(class_names) if class_names is not None else None, **extra}


def config_from_metadata(meta: dict) -> Tuple[ViTConfig, Preprocess]:
    """The (ViTConfig, Preprocess) a checkpoint's metadata describes."""
    config = ViTConfig.from_dict(meta["model"])
    return config, Preprocess.from_dict(meta["preprocess"])


def parse_metadata(path, value) -> dict:
    """The metadata dict from a checkpoint's raw `vit_ms_meta` entry; `path` only names it in errors."""
    try:
        meta = json.loads(value if isinstance(value, str) else str(value))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: the {META_KEY} entry is not valid JSON ({error}); the file is "
                              f"corrupt. Save or download it again.") from error
    if not isinstance(meta, dict) or "model" not in meta or "preprocess" not in meta:
        raise CheckpointError(f"{path}: the {META_KEY} entry lacks 'model' or 'preprocess'")
    return meta


# ----------------------------------------------------------------------------------------------------
# Integrity
# ----------------------------------------------------------------------------------------------------

def tensor_digest(params: Iterable[Tuple[str, np.ndarray]], meta: dict) -> str:
    """SHA-256 over the metadata (minus its integrity record) and every (name, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    body = {k: v for k, v in meta.items() if k != INTEGRITY_KEY}
    digest.update(json.dumps(body, sort_keys=True).encode())
    for name, value in sorted(params, key=lambda item: item[0]):
        value = np.ascontiguousarray(value)
        digest.update(f"\0{name}\0{value.dtype.str}\0{value.shape}\0".encode())
        digest.update(value.reshape(-1).view(np.uint8))  # the bytes in place: tobytes() would copy them first
    return digest.hexdigest()


def with_integrity(meta: dict, params: Dict[str, np.ndarray]) -> dict:
    """`meta` plus the integrity record of `params` (what `save_checkpoint` stores)."""
    meta = {k: v for k, v in meta.items() if k != INTEGRITY_KEY}
    return {**meta, INTEGRITY_KEY: {"algorithm": "sha256", "tensors": len(params),
                                    "digest": tensor_digest(params.items(), meta)}}


def verify_integrity(path, params: Dict[str, np.ndarray], meta: dict) -> None:
    """Raise CheckpointError unless `params` and `meta` are what was saved (files without a record pass)."""
    record = meta.get(INTEGRITY_KEY)
    if record is None:  # written before integrity records existed
        return
    if not isinstance(record, dict) or record.get("algorithm") != "sha256":
        raise CheckpointError(f"{path}: unknown integrity record {record!r}")
    if record.get("tensors") != len(params):
        raise CheckpointError(f"{path} failed its integrity check: it holds {len(params)} tensors, "
                              f"{record.get('tensors')} were saved; the file is truncated or corrupt. "
                              f"Save or download it again.")
    if tensor_digest(params.items(), meta) != record.get("digest"):
        raise CheckpointError(f"{path} failed its integrity check (SHA-256 of the tensors differs from "
                              f"the one saved): the file is corrupt. Save or download it again.")


@contextmanager
def integrity_checked(path, params: Dict[str, np.ndarray], meta: Optional[dict]):
    """`verify_integrity` on another thread while the body runs; its CheckpointError is raised at the end.

    Hashing ViT-B/16's 346 MB takes ~0.2 s and hashlib releases the GIL while it hashes, so building the
    model meanwhile hides most of it (README, round 32). The body must not use `params` for anything that
    lasts: only after the block are they known to be what was saved. Where both fail, the integrity error
    is raised: a damaged file is the likelier cause of the body's error too.
    """
    errors = []

    def check():
        try:
            if meta is not None:
                verify_integrity(path, params, meta)
        except Exception as error:  # handed to the caller's thread below
            errors.append(error)

    thread = threading.Thread(target=check, name="vit_ms-integrity", daemon=True)
    thread.start()
    try:
        yield
    except Exception:
        thread.join()
        if errors:
            raise errors[0]
        raise
    finally:
        thread.join()
    if errors:
        raise errors[0]


def save_checkpoint(params, path, metadata: dict) -> Path:
    """Write `params` and `metadata` (plus an integrity record) atomically, readable by all (0644).

    The file appears under its final name only once complete (`vit_ms.files.atomic_path`), so a kill
    or a full disk at any instant leaves the previous file intact.

    Args:
        params: a Cell (all its parameters, e.g. a train network with its optimizer state), or a list
            of Parameters or of {"name": ..., "data": ...} dicts.
        path: the `.ckpt` to write.
        metadata: `make_metadata(...)`'s dict, with any extra run facts.
    """
    import mindspore as ms

    from ..files import atomic_path

    entries = _entries(params)
    values = {name: data.asnumpy() if hasattr(data, "asnumpy") else np.asarray(data) for name, data in entries}
    meta = with_integrity(metadata, values)
    # The tensors themselves are written (no second copy of a large train network); nothing changes them
    # between the digest and the write, which run back to back in this thread.
    save_list = [{"name": name, "data": data if isinstance(data, ms.Tensor) else ms.Tensor(values[name])}
                 for name, data in entries]
    # The suffix must be .ckpt: ms.save_checkpoint appends it to any name that lacks it.
    with atomic_path(path, suffix=".ckpt") as tmp:
        ms.save_checkpoint(save_list, str(tmp), append_dict={META_KEY: json.dumps(meta)})
    return Path(path)


def _entries(params) -> list:
    """[(name, tensor-like)] in the order and with the names `ms.save_checkpoint` would use."""
    if hasattr(params, "parameters_and_names"):  # a Cell: its parameters by their own (unique) names
        seen, out = set(), []
        for _, param in params.parameters_and_names():
            if param.name not in seen:
                seen.add(param.name)
                out.append((param.name, param))
        return out
    out = []
    for item in params:
        if isinstance(item, dict):
            out.append((item["name"], item["data"]))
        else:  # a Parameter
            out.append((item.name, item))
    return out


__all__ = ["META_KEY", "FORMAT_VERSION", "CheckpointError", "make_metadata", "config_from_metadata",
           "parse_metadata", "tensor_digest", "with_integrity", "verify_integrity", "save_checkpoint"]
