"""Shipping a model for inference: MINDIR or ONNX, both with a dynamic batch, with a JSON sidecar and a
parity check.

- MINDIR (`mindir.py`): `mindspore.export` of the plain network (`fast=False`); with `with_preprocess`,
  a graph that takes uint8 images (B, H, W, C) of one size (C = 3, or 1 for a grayscale model) and
  resizes, crops and normalises inside (`preprocess_graph.py`).
- ONNX (`onnx_writer.py`): written from the config and weights with the `onnx` package, because
  MindSpore's own exporter has no Erf (the exact GELU of every paper preset) and fixes the batch.

Users have seen exported models quietly lose accuracy, so every export is proven: the file is written
under a temporary name, loaded back (`mindspore.load` + `nn.GraphCell`, or onnxruntime) and its logits
compared with the network's at batch sizes 1, 3 and 8 (dynamic batch) before it takes its final name.
A mismatch raises `ParityError` and leaves no file and no sidecar. The sidecar (`<file>.json`) carries
what a user of the file needs besides the graph: the preprocessing, the class names, the model config
and how the file was checked. An existing file is never replaced unless `overwrite=True`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import mindspore as ms
import numpy as np
from mindspore import nn

from ..config import Preprocess, ViTConfig
from ..files import atomic_path, write_text_atomic
from .common import (DEFAULT_ATOL, FORMATS, ExportError, ExportReport, ParityError, compare, output_path,
                     random_batch, read_sidecar, sidecar_path)
from .mindir import load_mindir, portable_network, run_mindir, write_mindir
from .onnx_writer import INPUT_NAME, OUTPUT_NAME, run_onnx, write_onnx
from .preprocess_graph import (WithPreprocess, check_input_size, pipeline_preprocess, reference_preprocess)

logger = logging.getLogger(__name__)

DYNAMIC_CHECK_BATCHES = (1, 3, 8)


def _run_exported(path: Path, file_format: str, inputs: np.ndarray) -> np.ndarray:
    return run_mindir(path, inputs) if file_format == "MINDIR" else run_onnx(path, inputs)


def check_parity(path, net: nn.Cell, config: ViTConfig, file_format: str = "MINDIR",
                 batch_sizes: Sequence[int] = DYNAMIC_CHECK_BATCHES, atol: Optional[float] = None,
                 seed: int = 0) -> float:
    """Compare an exported file's logits with `net`'s on random batches; raise `ParityError` on a mismatch.

    Args:
        path: the MINDIR or ONNX file (of normalised float32 images).
        net: the network it was exported from (put in eval mode here).
        config: the network's config (input shape).
        file_format: "MINDIR" or "ONNX".
        batch_sizes: one random batch of each size is compared.
        atol: allowed |difference| per unit of the largest |logit| (`common.compare`); defaults to
            DEFAULT_ATOL[file_format].
        seed: seed of the random batches.

    Returns:
        The largest |difference| seen.
    """
    file_format = file_format.upper()
    atol = DEFAULT_ATOL[file_format] if atol is None else atol
    net.set_train(False)
    worst = 0.0
    for i, batch_size in enumerate(batch_sizes):
        images = random_batch((batch_size, config.in_channels, config.image_size, config.image_size), seed + i)
        exported = _run_exported(Path(path), file_format, images)
        expected = net(ms.Tensor(images)).asnumpy()
        worst = max(worst, compare(exported, expected, atol, f"{path} ({file_format}, batch {batch_size})"))
    return worst


def _smooth_uint8_images(batch_size: int, size: Sequence[int], seed: int, channels: int = 3) -> np.ndarray:
    """Photo-like test images: smooth random colour fields plus mild noise (pure noise would make every
    pixel an edge, which no camera produces)."""
    rng = np.random.default_rng(seed)
    h, w = size
    coarse = rng.uniform(0, 255, (batch_size, 6, 6, channels))
    rows = np.linspace(0, 5, h)
    cols = np.linspace(0, 5, w)
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    r1, c1 = np.minimum(r0 + 1, 5), np.minimum(c0 + 1, 5)
    fr, fc = (rows - r0)[None, :, None, None], (cols - c0)[None, None, :, None]
    top = coarse[:, r0][:, :, c0] * (1 - fc) + coarse[:, r0][:, :, c1] * fc
    bottom = coarse[:, r1][:, :, c0] * (1 - fc) + coarse[:, r1][:, :, c1] * fc
    images = top * (1 - fr) + bottom * fr + rng.normal(0, 8, (batch_size, h, w, channels))
    return np.clip(np.round(images), 0, 255).astype(np.uint8)


def read_check_images(folder, input_size: Sequence[int], channels: int = 3, limit: int = 8) -> np.ndarray:
    """Up to `limit` photos of `folder` (recursively) as uint8 (N, H, W, C), resized to `input_size` (H, W):
    RGB for C = 3, the pipeline's luma for C = 1 (`vit_ms.data.pipeline` docstring).

    Raises:
        FileNotFoundError: the folder holds no images.
    """
    from PIL import Image

    from ..data import list_images, load_image, to_channels

    paths = list_images(folder)[:limit]
    if not paths:
        raise FileNotFoundError(f"--check_images {folder} holds no images")
    height, width = input_size
    images = [np.asarray(load_image(p).resize((width, height), Image.Resampling.BILINEAR), np.uint8) for p in paths]
    return np.stack([to_channels(image, channels) for image in images])


def check_preprocess_parity(path, net: nn.Cell, preprocess: Preprocess, input_size: Sequence[int],
                            batch_sizes: Sequence[int] = DYNAMIC_CHECK_BATCHES, atol: Optional[float] = None,
                            images: Optional[np.ndarray] = None, seed: int = 0):
    """Check a `with_preprocess` MINDIR against the network fed by `reference_preprocess` (what the graph
    is meant to compute); also measure it against the Python pipeline (`vit_ms.data.eval_transforms`).

    Args:
        path: the MINDIR (uint8 (B, H, W, C) in, logits out; C = preprocess.channels).
        net: the plain network.
        preprocess: the model's preprocessing.
        input_size: (H, W) of the graph's input.
        batch_sizes: batch sizes compared (the first rows of `images`, or generated images).
        atol: see `check_parity`; default DEFAULT_ATOL["MINDIR_PREPROCESS"].
        images: uint8 (N, H, W, C) real photos to compare on; None: generated photo-like images.
        seed: seed of the generated images.

    Returns:
        (max |difference| to the reference, max |difference| to the Python pipeline). The second is a
        measurement, not a check: the resize filters differ (`preprocess_graph` docstring).
    """
    atol = DEFAULT_ATOL["MINDIR_PREPROCESS"] if atol is None else atol
    height, width = check_input_size(input_size, preprocess)
    graph = load_mindir(path)
    net.set_train(False)
    worst = pipeline_worst = 0.0
    for i, batch_size in enumerate(batch_sizes):
        if images is not None:
            batch = np.resize(images, (batch_size,) + images.shape[1:])  # repeats rows when too few
        else:
            batch = _smooth_uint8_images(batch_size, (height, width), seed + i, preprocess.channels)
        if batch.shape[1:] != (height, width, preprocess.channels) or batch.dtype != np.uint8:
            raise ValueError(f"check images must be uint8 ({height}, {width}, {preprocess.channels}), got "
                             f"{batch.dtype} {batch.shape[1:]}")
        exported = graph(ms.Tensor(batch)).asnumpy()
        expected = net(ms.Tensor(reference_preprocess(batch, preprocess).astype(np.float32))).asnumpy()
        worst = max(worst, compare(exported, expected, atol, f"{path} (uint8 input, batch {batch_size})"))
        pipeline = net(ms.Tensor(pipeline_preprocess(batch, preprocess))).asnumpy()
        pipeline_worst = max(pipeline_worst, float(np.max(np.abs(exported.astype(np.float64) - pipeline))))
    logger.info("with_preprocess vs the Python pipeline (different resize filter): max |logit diff| %.3g",
                pipeline_worst)
    return worst, pipeline_worst


def _check_arguments(file_format: str, batch_size, with_preprocess: bool, input_size, preprocess) -> str:
    file_format = file_format.upper()
    if file_format not in FORMATS:
        raise ValueError(f"unknown file_format {file_format!r}; choose one of {sorted(FORMATS)}")
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size <= 0):
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if with_preprocess:
        if file_format != "MINDIR":
            raise ValueError("with_preprocess writes MINDIR only (file_format='MINDIR')")
        if input_size is None:
            raise ValueError("with_preprocess needs input_size (H, W): the one image size the graph accepts")
        try:
            check_input_size(input_size, preprocess)
        except ValueError as error:
            raise ExportError(str(error)) from None
    elif input_size is not None:
        raise ValueError("input_size is only used with with_preprocess")
    if file_format == "ONNX":
        try:
            import onnx  # noqa: F401  (fail before anything is written)
        except ImportError:
            raise ExportError("ONNX export needs the `onnx` package: pip install onnx "
                              "(or pip install 'vit_ms[onnx]')") from None
    return file_format


def export_model(net: nn.Cell, output, metadata: dict, file_format: str = "MINDIR",
                 batch_size: Optional[int] = None, check: bool = True, atol: Optional[float] = None,
                 check_batch_sizes: Optional[Sequence[int]] = None, *, with_preprocess: bool = False,
                 input_size: Optional[Sequence[int]] = None, check_images: Optional[np.ndarray] = None,
                 overwrite: bool = False) -> ExportReport:
    """Write `net` as MINDIR or ONNX plus a JSON sidecar, after proving the file matches the network.

    Args:
        net: a `ViT` (`net.config` gives the input shape); written via `portable_network`, which is
            also what the parity check compares against.
        output: file to write; the format's suffix (.mindir / .onnx) is added when missing.
        metadata: the checkpoint metadata (`vit_ms.checkpoint.make_metadata`); goes into the sidecar.
        file_format: "MINDIR" (default) or "ONNX".
        batch_size: fixed batch size; None (default): a dynamic batch dimension, for both formats.
        check: reload the file and compare logits before giving it its name.
        atol: parity tolerance per unit of the largest |logit| (`common.compare`); defaults to 1e-5 for
            MINDIR, 1e-4 for ONNX and for the preprocessing graph.
        check_batch_sizes: batch sizes compared; default 1, 3 and 8 for a dynamic batch, else the fixed one.
        with_preprocess: MINDIR taking uint8 (B, H, W, C) images of `input_size` (C = 1 for a grayscale
            model, else 3), preprocessing inside.
        input_size: (H, W), with `with_preprocess`.
        check_images: with `with_preprocess`, uint8 (N, H, W, C) photos to check on (default: generated).
        overwrite: replace an existing file and sidecar; otherwise `FileExistsError`.

    Raises:
        ValueError / FileExistsError: bad arguments or an existing output, before anything is written.
        ExportError: a missing optional package, or preprocessing the graph cannot express.
        ParityError: the written file disagrees with the network; nothing is left behind.
    """
    config: ViTConfig = net.config
    preprocess = Preprocess.from_dict(metadata["preprocess"]) if "preprocess" in metadata else \
        Preprocess.for_model(config)
    file_format = _check_arguments(file_format, batch_size, with_preprocess, input_size, preprocess)
    path = output_path(output, file_format, overwrite)
    sidecar = sidecar_path(path)
    net = portable_network(net)
    sizes = list(check_batch_sizes or (DYNAMIC_CHECK_BATCHES if batch_size is None else (batch_size,)))
    report = ExportReport(path=path, sidecar=sidecar, file_format=file_format, batch_size=batch_size)

    if with_preprocess:
        report.input_size = [int(v) for v in input_size]
        shape = [batch_size, *report.input_size, preprocess.channels]
    else:
        shape = [batch_size, config.in_channels, config.image_size, config.image_size]
    data_file = None
    try:
        # Written and checked under a temporary name: a failed check leaves nothing behind.
        with atomic_path(path, suffix=FORMATS[file_format]) as tmp:
            if file_format == "ONNX":
                params = {name: p.asnumpy() for name, p in net.parameters_dict().items()}
                data_file = write_onnx(config, params, tmp, batch_size, data_name=path.name + ".data")
            elif with_preprocess:
                write_mindir(WithPreprocess(net, preprocess, report.input_size), tmp, shape, ms.uint8)
            else:
                write_mindir(net, tmp, shape)
            if check:
                report.checked_batch_sizes = sizes
                if with_preprocess:
                    report.max_abs_diff, report.pipeline_max_abs_diff = check_preprocess_parity(
                        tmp, net, preprocess, report.input_size, sizes, atol, check_images)
                else:
                    report.max_abs_diff = check_parity(tmp, net, config, file_format, sizes, atol)
    except BaseException:
        if data_file is not None:  # the weights file of a >2 GB ONNX is written beside, under its name
            data_file.unlink(missing_ok=True)
        raise
    logger.info("wrote %s (%s, batch %s)", path, file_format, batch_size or "dynamic")

    sidecar_data = dict(metadata)
    sidecar_data["export"] = {
        "file": path.name, "file_format": file_format, "batch_size": batch_size,
        "input_name": INPUT_NAME, "output_name": OUTPUT_NAME, "input_shape": shape,
        "input_dtype": "uint8" if with_preprocess else "float32",
        "with_preprocess": with_preprocess,
        "input_layout": (f"NHWC, raw {'RGB' if preprocess.channels == 3 else 'grayscale'} pixels 0-255"
                         if with_preprocess else "NCHW, normalised"),
        "external_data": data_file.name if data_file is not None else None,
        "mindspore_version": ms.__version__,
        "checked_batch_sizes": report.checked_batch_sizes, "max_abs_diff": report.max_abs_diff,
    }
    if with_preprocess:
        sidecar_data["export"]["pipeline_max_abs_diff"] = report.pipeline_max_abs_diff
    write_text_atomic(sidecar, json.dumps(sidecar_data, indent=2))
    return report


__all__ = ["FORMATS", "DEFAULT_ATOL", "DYNAMIC_CHECK_BATCHES", "ExportError", "ParityError", "ExportReport",
           "sidecar_path", "read_sidecar", "load_mindir", "check_parity", "check_preprocess_parity",
           "read_check_images", "portable_network", "export_model", "WithPreprocess", "reference_preprocess", "pipeline_preprocess"]
