"""Shipping a model for inference: MINDIR (dynamic batch) or ONNX (static batch), with a JSON sidecar and
a parity check.

Users have seen exported models quietly lose accuracy, so every export is proven: after writing the file
we load it back (`mindspore.load` + `nn.GraphCell` for MINDIR, `onnxruntime` for ONNX) and compare its
logits with the network's on random batches. A mismatch raises `ParityError`, removes the file and writes
no sidecar. The sidecar (`<file>.json`) carries what a user of the file needs besides the graph: the
preprocessing, the class names, the model config and how the file was checked.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import mindspore as ms
import numpy as np
from mindspore import nn

from .config import ViTConfig

logger = logging.getLogger(__name__)

FORMATS = {"MINDIR": ".mindir", "ONNX": ".onnx"}
# Largest |difference| between the reloaded file's logits and the network's that counts as equal.
# MINDIR runs the same kernels (measured: exactly 0); onnxruntime uses its own kernels.
DEFAULT_ATOL = {"MINDIR": 1e-5, "ONNX": 1e-4}
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class ExportError(RuntimeError):
    """MindSpore cannot write this model in the requested format."""


class ParityError(RuntimeError):
    """The exported file's outputs differ from the network's."""


@dataclass
class ExportReport:
    path: Path  # the model file
    sidecar: Path  # its JSON sidecar
    file_format: str
    batch_size: Optional[int]  # None: dynamic batch
    checked_batch_sizes: List[int] = field(default_factory=list)
    max_abs_diff: Optional[float] = None  # None: not checked (no onnxruntime)


def sidecar_path(model_file) -> Path:
    """Where the JSON sidecar of `model_file` lives: the file name plus `.json`."""
    model_file = Path(model_file)
    return model_file.with_name(model_file.name + ".json")


def read_sidecar(model_file) -> dict:
    """The sidecar dict of an exported file; a clear error when it is missing."""
    path = sidecar_path(model_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the preprocessing and class names of {model_file} live in "
                                f"this sidecar, written by export.py beside the file; keep them together")
    return json.loads(path.read_text(encoding="utf-8"))


def load_mindir(path) -> nn.GraphCell:
    """A MINDIR file as a callable Cell: `load_mindir(path)(images) -> logits`."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"MINDIR file {path} not found")
    return nn.GraphCell(ms.load(str(path)))


def _output_path(output, file_format: str) -> Path:
    suffix = FORMATS[file_format]
    output = Path(output)
    if output.suffix.lower() == suffix:
        return output
    if output.suffix.lower() in FORMATS.values():
        raise ValueError(f"output {output} ends in {output.suffix} but file_format is {file_format}; "
                         f"name it *{suffix} or pass the matching file_format")
    return output.with_name(output.name + suffix)


def _random_batch(config: ViTConfig, batch_size: int, seed: int) -> np.ndarray:
    # Normalised images are roughly standard normal per pixel.
    shape = (batch_size, config.in_channels, config.image_size, config.image_size)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _onnx_export(net: nn.Cell, example: ms.Tensor, path: Path) -> None:
    try:
        if hasattr(ms, "onnx") and hasattr(ms.onnx, "export"):
            ms.onnx.export(net, example, file_name=str(path), input_names=[INPUT_NAME],
                           output_names=[OUTPUT_NAME])
        else:  # MindSpore before ms.onnx
            ms.export(net, example, file_name=str(path), file_format="ONNX")
    except RuntimeError as error:
        match = re.search(r"Can not find key (\w+) in convert map", str(error))
        if not match:
            raise
        op = match.group(1)
        why = (" (the exact erf GELU of this model, ViTConfig.gelu_approximate=False)" if op == "Erf" else "")
        raise ExportError(
            f"MindSpore {ms.__version__} cannot export this model to ONNX: its ONNX exporter has no converter "
            f"for the {op} operator{why}. Export MINDIR instead (file_format='MINDIR', the default; it also "
            f"keeps a dynamic batch), or use a model with tanh GELU (gelu_approximate=True, as in the "
            f"'tutorial' preset); switching a trained model's GELU changes its outputs.") from None


def _run_exported(path: Path, file_format: str, images: np.ndarray) -> Optional[np.ndarray]:
    if file_format == "MINDIR":
        return load_mindir(path)(ms.Tensor(images)).asnumpy()
    try:
        import onnxruntime  # test-time dependency, not needed to export
    except ImportError:
        logger.warning("onnxruntime is not installed, so %s was not checked; `pip install onnxruntime` "
                       "to have every ONNX export verified", path)
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def check_parity(path, net: nn.Cell, config: ViTConfig, file_format: str = "MINDIR",
                 batch_sizes: Sequence[int] = (1, 4), atol: Optional[float] = None, seed: int = 0) -> Optional[float]:
    """Compare an exported file's logits with `net`'s on random batches; raise `ParityError` on a mismatch.

    Args:
        path: the MINDIR or ONNX file.
        net: the network it was exported from (put in eval mode here).
        config: the network's config (input shape).
        file_format: "MINDIR" or "ONNX".
        batch_sizes: one random batch of each size is compared.
        atol: largest allowed |difference|; defaults to DEFAULT_ATOL[file_format].
        seed: seed of the random batches.

    Returns:
        The largest |difference| seen, or None when ONNX could not be checked (no onnxruntime).
    """
    atol = DEFAULT_ATOL[file_format] if atol is None else atol
    net.set_train(False)
    worst = 0.0
    for i, batch_size in enumerate(batch_sizes):
        images = _random_batch(config, batch_size, seed + i)
        exported = _run_exported(Path(path), file_format, images)
        if exported is None:
            return None
        expected = net(ms.Tensor(images)).asnumpy()
        if exported.shape != expected.shape:
            raise ParityError(f"{path} returned logits of shape {exported.shape} for a batch of {batch_size}; "
                              f"the network returns {expected.shape}")
        diff = float(np.max(np.abs(exported.astype(np.float64) - expected)))
        logger.info("parity %s batch %d: max |diff| %.3g", file_format, batch_size, diff)
        if not diff <= atol:  # also catches NaN
            raise ParityError(f"{path} disagrees with the network: max |logit difference| {diff:.3g} > {atol:g} "
                              f"on a random batch of {batch_size}")
        worst = max(worst, diff)
    return worst


def portable_network(net: nn.Cell) -> nn.Cell:
    """The same ViT built from standard operators only (`fast=False`), sharing `net`'s weights, in eval mode.

    The fast CPU path uses `ops.Custom` kernels (`vit_ms.kernels`) that a MINDIR cannot reload and ONNX
    cannot express, so files are written from the plain computation (same parameters; logits within
    float32 rounding of the fast path).
    """
    from .model import ViT

    if isinstance(net, ViT) and getattr(net, "fast", False):
        plain = ViT(net.config, fast=False)
        not_loaded, _ = ms.load_param_into_net(plain, net.parameters_dict(), strict_load=True)
        if not_loaded:
            raise RuntimeError(f"could not copy parameters {not_loaded} into the portable network")
        net = plain
    net.set_train(False)
    return net


def export_model(net: nn.Cell, output, metadata: dict, file_format: str = "MINDIR",
                 batch_size: Optional[int] = None, check: bool = True, atol: Optional[float] = None,
                 check_batch_sizes: Optional[Sequence[int]] = None) -> ExportReport:
    """Write `net` as MINDIR or ONNX plus a JSON sidecar, then prove the file matches the network.

    Args:
        net: a `ViT` (`net.config` gives the input shape); written via `portable_network`, which is
            also what the parity check compares against.
        output: file to write; the format's suffix (.mindir / .onnx) is added when missing.
        metadata: the checkpoint metadata (`vit_ms.checkpoint.make_metadata`); goes into the sidecar.
        file_format: "MINDIR" (default) or "ONNX".
        batch_size: fixed batch size; None gives MINDIR a dynamic batch dimension. ONNX is always static
            (MindSpore's exporter bakes the batch into reshapes), batch 1 when None.
        check: reload the file and compare logits (`check_parity`).
        atol: parity tolerance; defaults to 1e-5 for MINDIR and 1e-4 for ONNX.
        check_batch_sizes: batch sizes compared; defaults to (1, 4) for a dynamic batch, else the fixed one.

    Raises:
        ExportError: MindSpore cannot export the model to this format (e.g. ONNX and exact GELU).
        ParityError: the reloaded file disagrees with the network; the file is removed.
    """
    file_format = file_format.upper()
    if file_format not in FORMATS:
        raise ValueError(f"unknown file_format {file_format!r}; choose one of {sorted(FORMATS)}")
    if batch_size is not None and batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if file_format == "ONNX" and batch_size is None:
        logger.info("ONNX export has a static batch dimension; using batch size 1 (set batch_size to change)")
        batch_size = 1
    config: ViTConfig = net.config
    path = _output_path(output, file_format)
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = sidecar_path(path)
    sidecar.unlink(missing_ok=True)  # a sidecar from an earlier export must not outlive a failed one
    net = portable_network(net)

    shape = [batch_size, config.in_channels, config.image_size, config.image_size]
    if file_format == "MINDIR":
        # A None dimension exports a graph that runs any batch size (checked below).
        example = ms.Tensor(shape=shape, dtype=ms.float32) if batch_size is None else \
            ms.Tensor(np.zeros(shape, np.float32))
        ms.export(net, example, file_name=str(path), file_format="MINDIR")
    else:
        _onnx_export(net, ms.Tensor(np.zeros(shape, np.float32)), path)
    logger.info("wrote %s (%s, batch %s)", path, file_format, batch_size or "dynamic")

    report = ExportReport(path=path, sidecar=sidecar, file_format=file_format, batch_size=batch_size)
    if check:
        report.checked_batch_sizes = list(check_batch_sizes or ((1, 4) if batch_size is None else (batch_size,)))
        try:
            report.max_abs_diff = check_parity(path, net, config, file_format, report.checked_batch_sizes, atol)
        except ParityError:
            path.unlink(missing_ok=True)
            raise
        if report.max_abs_diff is None:
            report.checked_batch_sizes = []

    sidecar_data = dict(metadata)
    sidecar_data["export"] = {
        "file": path.name, "file_format": file_format, "batch_size": batch_size,
        "input_name": INPUT_NAME, "input_shape": shape, "mindspore_version": ms.__version__,
        "checked_batch_sizes": report.checked_batch_sizes, "max_abs_diff": report.max_abs_diff,
    }
    sidecar.write_text(json.dumps(sidecar_data, indent=2), encoding="utf-8")
    return report


__all__ = ["FORMATS", "DEFAULT_ATOL", "ExportError", "ParityError", "ExportReport", "sidecar_path",
           "read_sidecar", "load_mindir", "check_parity", "portable_network", "export_model"]
