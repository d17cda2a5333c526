"""Naming schemes: one module per source of ViT weights, registered in one table, `FORMATS`.

Each module defines `FORMAT`, a `WeightFormat` saying what the source is, how its parameter names are
recognised, how they convert to ours (`to_vit_ms`, a pure function over {name: numpy array}), and, where
it makes sense, how ours convert back (`export`). To add a source, add one module here and one line to
the table below; `detect_source`, `convert`, convert.py and the tests enumerate `FORMATS`.

Detection tries the formats in table order, so a scheme whose names are a special case of another's
comes first (mindcv's first generation before the tutorial's; ours, with MindSpore's gamma/beta, before
timm's).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Set, Tuple

import numpy as np

from ...config import IMAGENET_MEAN, IMAGENET_STD
from ._rules import Converted


@dataclass
class Hints:
    """What files beside the weights tell (e.g. an HF config.json): ViTConfig fields, labels, preprocessing."""

    config: Dict[str, object] = field(default_factory=dict)  # ViTConfig field -> value
    class_names: Optional[list] = None
    preprocess: Dict[str, object] = field(default_factory=dict)  # Preprocess field -> value


@dataclass(frozen=True)
class WeightFormat:
    """One naming scheme of ViT weights."""

    name: str  # the `source=` / `--source` value
    description: str  # what the source is
    detected_by: str  # how `recognise` tells it, in words (README table, `python -m vit_ms.checkpoint formats`)
    recognise: Callable[[Set[str]], bool]  # names -> is this the scheme
    to_vit_ms: Callable[[Dict[str, np.ndarray]], Converted]
    # (ours, config, preprocess, class_names, dst) -> written path; None: no export to this scheme.
    export: Optional[Callable] = None
    norm_eps: float = 1e-6  # what the source trained with, used when the weights alone are converted
    gelu_approximate: bool = False
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    training_state: bool = False  # MindSpore training checkpoints: optimizer state beside the weights
    read_hints: Optional[Callable[[Path], Hints]] = None  # what companion files (config.json) say


def _table() -> Dict[str, WeightFormat]:
    from . import hf, jax, mindcv, timm, torchvision, tutorial, vit_ms

    order = (jax, hf, mindcv, tutorial, torchvision, vit_ms, timm)  # detection order, see the docstring
    return {module.FORMAT.name: module.FORMAT for module in order}


FORMATS: Dict[str, WeightFormat] = _table()
SOURCES = tuple(sorted(FORMATS))

__all__ = ["FORMATS", "SOURCES", "WeightFormat", "Hints", "Converted"]
