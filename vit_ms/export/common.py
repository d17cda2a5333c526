"""What every export shares: errors, the report, the JSON sidecar, output paths, the parity comparison.

Parity tolerance, from float32 error analysis rather than from one machine's figures. A ViT's logits pass
through ~8 rounded steps per block (LayerNorm, three Dense products, softmax, attention products, GELU),
each a dot product of length K <= mlp_dim; a float32 dot product's relative error grows like sqrt(K) * u
in practice (u = 2^-24 = 6e-8), so ~3e-6 per step at K = 3072, and LayerNorm renormalises each block's
input, so errors add across blocks rather than multiply: 12 blocks * 8 steps * 3e-6 ~ 3e-4 relative in
the worst case, ~1e-5 typically (different summation order in onnxruntime's or another CPU's kernels,
AVX2 vs AVX-512). We therefore allow |exported - network| <= atol * max(1, max |logit|), atol 1e-4 for
files run by another runtime (ONNX) and for the preprocessing graph; MINDIR reloads run MindSpore's own
kernels (measured: identical), so 1e-5.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

logger = logging.getLogger(__name__)

FORMATS = {"MINDIR": ".mindir", "ONNX": ".onnx"}
DEFAULT_ATOL = {"MINDIR": 1e-5, "ONNX": 1e-4, "MINDIR_PREPROCESS": 1e-4}


class ExportError(RuntimeError):
    """The model cannot be written as asked (missing optional package, unsupported preprocessing)."""


class ParityError(RuntimeError):
    """The exported file's outputs differ from the network's."""


@dataclass
class ExportReport:
    path: Path  # the model file
    sidecar: Path  # its JSON sidecar
    file_format: str
    batch_size: Optional[int]  # None: dynamic batch
    checked_batch_sizes: List[int] = field(default_factory=list)
    max_abs_diff: Optional[float] = None  # None: not checked
    input_size: Optional[List[int]] = None  # with_preprocess: the (H, W) of the uint8 input
    pipeline_max_abs_diff: Optional[float] = None  # with_preprocess: logits vs the dataset pipeline's


def sidecar_path(model_file) -> Path:
    """Where the JSON sidecar of `model_file` lives: the file name plus `.json`."""
    model_file = Path(model_file)
    return model_file.with_name(model_file.name + ".json")


def read_sidecar(model_file) -> dict:
    """The sidecar dict of an exported file; a clear error when it (or the model file) is missing."""
    model_file = Path(model_file)
    if not model_file.is_file():
        raise FileNotFoundError(f"exported model {model_file} not found")
    path = sidecar_path(model_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the preprocessing and class names of {model_file} live in "
                                f"this sidecar, written by export.py beside the file; keep them together")
    return json.loads(path.read_text(encoding="utf-8"))


def output_path(output, file_format: str, overwrite: bool = False) -> Path:
    """The file to write: `output` with the format's suffix added when missing.

    Raises:
        ValueError: `output` carries the other format's suffix.
        FileExistsError: the file or its sidecar exists and `overwrite` is False.
    """
    suffix = FORMATS[file_format]
    output = Path(output)
    if output.suffix.lower() != suffix:
        if output.suffix.lower() in FORMATS.values():
            raise ValueError(f"output {output} ends in {output.suffix} but the format is {file_format}; "
                             f"name it *{suffix} or pass the matching format")
        output = output.with_name(output.name + suffix)
    if not overwrite:
        existing = [p for p in (output, sidecar_path(output)) if p.exists()]
        if existing:
            raise FileExistsError(f"{existing[0]} already exists; export never replaces a file silently: "
                                  f"choose another --output or pass --overwrite (overwrite=True)")
    if output.exists() and not output.is_file():
        raise FileExistsError(f"{output} exists and is not a file")
    return output


def random_batch(shape, seed: int) -> np.ndarray:
    """Normalised images are roughly standard normal per pixel."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def compare(exported: np.ndarray, expected: np.ndarray, atol: float, what: str) -> float:
    """max |exported - expected|; raises `ParityError` above atol * max(1, max |expected|) (see the module
    docstring) or on a shape mismatch. NaN fails too."""
    if exported.shape != expected.shape:
        raise ParityError(f"{what}: the file returned logits of shape {exported.shape}, the network "
                          f"{expected.shape}")
    diff = float(np.max(np.abs(exported.astype(np.float64) - expected)))
    bound = atol * max(1.0, float(np.max(np.abs(expected))))
    logger.info("parity %s: max |diff| %.3g (bound %.3g)", what, diff, bound)
    if not diff <= bound:
        raise ParityError(f"{what} disagrees with the network: max |logit difference| {diff:.3g} > {bound:.3g} "
                          f"(atol {atol:g} times the largest |logit|, at least 1)")
    return diff


__all__ = ["FORMATS", "DEFAULT_ATOL", "ExportError", "ParityError", "ExportReport", "sidecar_path",
           "read_sidecar", "output_path", "random_batch", "compare"]
