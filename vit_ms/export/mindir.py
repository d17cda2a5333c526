"""MINDIR files: written with `mindspore.export` (dynamic batch by default), loaded back as a Cell."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import mindspore as ms
import numpy as np
from mindspore import nn


def load_mindir(path) -> nn.GraphCell:
    """A MINDIR file as a callable Cell: `load_mindir(path)(images) -> logits`."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"MINDIR file {path} not found")
    return nn.GraphCell(ms.load(str(path)))


def portable_network(net: nn.Cell) -> nn.Cell:
    """The same ViT built from standard operators only (`fast=False`), sharing `net`'s weights, in eval mode.

    The fast CPU path uses `ops.Custom` kernels that a MINDIR cannot reload and ONNX cannot express, so
    files are written from the plain computation (same parameters; logits within float32 rounding).
    """
    from ..model import ViT

    if isinstance(net, ViT) and getattr(net, "fast", False):
        plain = ViT(net.config, fast=False)
        not_loaded, _ = ms.load_param_into_net(plain, net.parameters_dict(), strict_load=True)
        if not_loaded:
            raise RuntimeError(f"could not copy parameters {not_loaded} into the portable network")
        net = plain
    net.set_train(False)
    return net


def write_mindir(net: nn.Cell, path, input_shape: Sequence[Optional[int]], dtype=ms.float32) -> None:
    """`mindspore.export` of `net` to exactly `path` (whose name must end in .mindir).

    Args:
        input_shape: the input's shape; a None first dimension exports a graph that runs any batch size.
        dtype: the input's dtype (uint8 for the preprocessing graph).
    """
    if input_shape[0] is None:
        example = ms.Tensor(shape=list(input_shape), dtype=dtype)
    else:
        example = ms.Tensor(np.zeros(input_shape, ms.dtype_to_nptype(dtype)))
    ms.export(net, example, file_name=str(path), file_format="MINDIR")


def run_mindir(path, inputs: np.ndarray) -> np.ndarray:
    return load_mindir(path)(ms.Tensor(inputs)).asnumpy()


__all__ = ["load_mindir", "portable_network", "write_mindir", "run_mindir"]
