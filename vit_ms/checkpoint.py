"""Checkpoints: our own format (weights + metadata), and building a model from one.

A vit_ms checkpoint is a MindSpore `.ckpt` whose weights use our parameter names and which carries one
extra string entry, `vit_ms_meta`: JSON with the model config, the preprocessing and the class names,
so that eval, infer and export need nothing but the file.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import mindspore as ms

from .config import Preprocess, ViTConfig

logger = logging.getLogger(__name__)

META_KEY = "vit_ms_meta"
FORMAT_VERSION = 1


def make_metadata(config: ViTConfig, class_names: Optional[Sequence[str]] = None,
                  preprocess: Optional[Preprocess] = None, **extra) -> dict:
    """The metadata dict stored in a checkpoint. `extra` holds JSON-able run facts (epoch, step, ...)."""
    preprocess = preprocess or Preprocess.for_model(config)
    if preprocess.image_size != config.image_size:
        raise ValueError(f"Preprocess.image_size ({preprocess.image_size}) differs from "
                         f"ViTConfig.image_size ({config.image_size})")
    if class_names is not None and len(class_names) != config.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {config.num_classes} classes")
    return {"format_version": FORMAT_VERSION, "model": config.to_dict(), "preprocess": preprocess.to_dict(),
            "class_names": list(class_names) if class_names is not None else None, **extra}


def save_checkpoint(params, path, metadata: dict) -> Path:
    """Write `params` (a Cell or a list of Parameters / name-value dicts) and `metadata` atomically.

    The file appears under its final name only once complete, so a kill at any instant leaves the
    previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The suffix must be .ckpt: ms.save_checkpoint appends it to any name that lacks it.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.ckpt", dir=path.parent)
    os.close(fd)
    try:
        ms.save_checkpoint(params, tmp, append_dict={META_KEY: json.dumps(metadata)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_metadata(path) -> Optional[dict]:
    """The `vit_ms_meta` dict of a checkpoint, or None for a checkpoint that has none."""
    params = ms.load_checkpoint(str(path), choice_func=lambda name: name == META_KEY)
    if META_KEY not in params:
        return None
    value = params[META_KEY]
    return json.loads(value if isinstance(value, str) else str(value))


def config_from_metadata(meta: dict) -> tuple[ViTConfig, Preprocess]:
    config = ViTConfig.from_dict(meta["model"])
    return config, Preprocess.from_dict(meta["preprocess"])


def load_model(path):
    """Build the ViT a vit_ms checkpoint describes and load its weights: returns (net, metadata)."""
    from .model import ViT  # checkpoint imports the model only to build one from metadata

    meta = read_metadata(path)
    if meta is None:
        raise ValueError(f"{path} has no vit_ms metadata; build the model yourself and use "
                         f"vit_ms.checkpoint.load_weights(net, {str(path)!r}) instead")
    config, _ = config_from_metadata(meta)
    net = ViT(config)
    params = ms.load_checkpoint(str(path), choice_func=lambda name: name != META_KEY)
    not_loaded, _ = ms.load_param_into_net(net, params, strict_load=True)
    if not_loaded:
        raise ValueError(f"{path} lacks parameters {not_loaded}")
    return net, meta


__all__ = ["META_KEY", "make_metadata", "save_checkpoint", "read_metadata", "config_from_metadata", "load_model"]
