"""The ViT as an ONNX graph written straight from its config and weights, with a dynamic batch dimension.

MindSpore 2.10's ONNX exporter cannot serve the paper's models: it has no converter for Erf (the exact
GELU of every preset) and it bakes the batch size into its Reshapes. So this module spells the forward
pass of `vit_ms.model.ViT` (the plain `fast=False` path, Eq. 1-4 of Dosovitskiy et al., ICLR 2021) with
standard ONNX operators, using `onnx.helper` only: Conv for the patch embedding, LayerNormalization
(opset 17), MatMul + Add for every Dense, Softmax attention, and GELU spelled with Erf (exact) or Tanh.
Every Reshape keeps the batch with a 0 ("copy this dimension"), so one file serves any batch size.

`onnx` is an optional dependency (`pip install vit_ms[onnx]`); nothing else in vit_ms imports it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..config import ViTConfig

OPSET = 17  # the first opset with LayerNormalization
PROTOBUF_LIMIT = 2 ** 31 - 2 ** 24  # just under protobuf's 2 GB message limit
INPUT_NAME, OUTPUT_NAME = "images", "logits"
BATCH_DIM = "batch"


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError("writing ONNX needs the `onnx` package: pip install onnx "
                          "(or pip install 'vit_ms[onnx]')") from None
    return onnx


class _Graph:
    """Collects nodes and initializers; each method adds one step and returns its output name."""

    def __init__(self, onnx):
        self.onnx = onnx
        self.helper = onnx.helper
        self.nodes: List = []
        self.initializers: List = []
        self._count = 0

    def const(self, name: str, value) -> str:
        array = np.asarray(value)  # not ascontiguousarray, which turns a scalar into shape (1,)
        array = np.array(array, dtype=np.int64 if array.dtype.kind in "iu" else np.float32, order="C")
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs, name: str = "", **attributes) -> str:
        self._count += 1
        output = name or f"{op_type.lower()}_{self._count}"
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [output], name=f"{op_type}_{self._count}",
                                                **attributes))
        return output

    def dense(self, x: str, params: Dict[str, np.ndarray], prefix: str) -> str:
        # nn.Dense computes x W^T + b with W stored (out, in); ONNX MatMul wants (in, out).
        weight = self.const(f"{prefix}.weight_t", params[f"{prefix}.weight"].T)
        bias = self.const(f"{prefix}.bias", params[f"{prefix}.bias"])
        return self.op("Add", [self.op("MatMul", [x, weight]), bias])

    def layer_norm(self, x: str, params: Dict[str, np.ndarray], prefix: str, eps: float) -> str:
        gamma = self.const(f"{prefix}.gamma", params[f"{prefix}.gamma"])
        beta = self.const(f"{prefix}.beta", params[f"{prefix}.beta"])
        return self.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=float(eps))

    def gelu(self, x: str, approximate: bool) -> str:
        half, one = self.const_scalar(0.5), self.const_scalar(1.0)
        if approximate:  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as ops.gelu(approximate="tanh")
            cube = self.op("Mul", [self.op("Mul", [x, x]), x])
            inner = self.op("Add", [x, self.op("Mul", [cube, self.const_scalar(0.044715)])])
            t = self.op("Tanh", [self.op("Mul", [inner, self.const_scalar(math.sqrt(2.0 / math.pi))])])
        else:  # 0.5 x (1 + erf(x / sqrt(2))), the exact GELU
            t = self.op("Erf", [self.op("Mul", [x, self.const_scalar(1.0 / math.sqrt(2.0))])])
        return self.op("Mul", [self.op("Mul", [x, half]), self.op("Add", [t, one])])

    def const_scalar(self, value: float) -> str:
        self._count += 1
        return self.const(f"scalar_{self._count}", np.float32(value))


def _attention(g: _Graph, x: str, params, prefix: str, config: ViTConfig) -> str:
    heads, head_dim, d = config.num_heads, config.head_dim, config.embed_dim
    qkv = g.dense(x, params, f"{prefix}.qkv")  # (B, T, 3 D)
    qkv = g.op("Reshape", [qkv, g.const(f"{prefix}.qkv_shape", [0, 0, 3, heads, head_dim])])  # (B, T, 3, h, hd)
    qkv = g.op("Transpose", [qkv], perm=[2, 0, 3, 1, 4])  # -> (3, B, h, T, hd)
    q, k, v = (g.op("Gather", [qkv, g.const(f"{prefix}.index_{i}", np.int64(i))], axis=0) for i in range(3))
    q = g.op("Mul", [q, g.const_scalar(head_dim ** -0.5)])  # scaled before the product, as the model does
    scores = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])  # (B, h, T, T)
    probs = g.op("Softmax", [scores], axis=-1)
    out = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])  # (B, h, T, hd) -> (B, T, h, hd)
    out = g.op("Reshape", [out, g.const(f"{prefix}.merge_shape", [0, 0, d])])  # heads concatenated: (B, T, D)
    return g.dense(out, params, f"{prefix}.proj")


def build_onnx_model(config: ViTConfig, params: Dict[str, np.ndarray], batch_size: Optional[int] = None,
                     producer: str = "vit_ms"):
    """The ONNX ModelProto of a ViT with these weights; input "images" (batch, C, S, S), output "logits".

    Args:
        config: the architecture.
        params: parameter name -> float32 array, named as in `vit_ms.model.ViT` (checkpoint names,
            e.g. "blocks.0.attn.qkv.weight").
        batch_size: a fixed batch size; None (default) leaves the batch dimension dynamic ("batch").
        producer: written into the file's producer_name.

    Raises:
        KeyError: naming a parameter the config needs and `params` lacks.
    """
    onnx = _require_onnx()
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "head.weight"}
    missing = sorted(expected - set(params))
    if missing:
        raise KeyError(f"parameters {missing} missing: build_onnx_model needs a ViT's parameters by their "
                       f"checkpoint names")
    g = _Graph(onnx)
    d, p = config.embed_dim, config.patch_size

    # Eq. 1: patches projected by a stride-p convolution, CLS token in front, position embedding added.
    x = g.op("Conv", [INPUT_NAME, g.const("patch_embed.proj.weight", params["patch_embed.proj.weight"]),
                      g.const("patch_embed.proj.bias", params["patch_embed.proj.bias"])],
             kernel_shape=[p, p], strides=[p, p])  # (B, C, H, W) -> (B, D, H/p, W/p)
    x = g.op("Reshape", [x, g.const("patch_embed.flat_shape", [0, d, -1])])  # -> (B, D, N)
    x = g.op("Transpose", [x], perm=[0, 2, 1])  # -> (B, N, D)
    batch = g.op("Slice", [g.op("Shape", [INPUT_NAME]), g.const("slice_0", [0]), g.const("slice_1", [1])])
    cls_shape = g.op("Concat", [batch, g.const("cls_rest", [1, d])], axis=0)  # [B, 1, D]
    cls = g.op("Expand", [g.const("cls_token", params["cls_token"]), cls_shape])
    x = g.op("Concat", [cls, x], axis=1)  # (B, N + 1, D)
    x = g.op("Add", [x, g.const("pos_embed", params["pos_embed"])])

    for i in range(config.depth):  # Eq. 2 and 3, pre-norm blocks
        prefix = f"blocks.{i}"
        x = g.op("Add", [x, _attention(g, g.layer_norm(x, params, f"{prefix}.norm1", config.norm_eps), params,
                                       f"{prefix}.attn", config)])
        h = g.dense(g.layer_norm(x, params, f"{prefix}.norm2", config.norm_eps), params, f"{prefix}.mlp.fc1")
        x = g.op("Add", [x, g.dense(g.gelu(h, config.gelu_approximate), params, f"{prefix}.mlp.fc2")])

    x = g.layer_norm(x, params, "norm", config.norm_eps)  # Eq. 4
    x = g.op("Gather", [x, g.const("cls_index", np.int64(0))], axis=1)  # the CLS token: (B, D)
    g.dense(x, params, "head")
    g.nodes[-1].output[0] = OUTPUT_NAME  # the head's Add writes the graph output

    batch_dim = BATCH_DIM if batch_size is None else int(batch_size)
    image_shape = [batch_dim, config.in_channels, config.image_size, config.image_size]
    graph = onnx.helper.make_graph(
        g.nodes, "vit", [onnx.helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, image_shape)],
        [onnx.helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT, [batch_dim, config.num_classes])],
        initializer=g.initializers)
    model = onnx.helper.make_model(graph, producer_name=producer,
                                   opset_imports=[onnx.helper.make_opsetid("", OPSET)])
    model.ir_version = min(model.ir_version, 8)  # readable by onnxruntime >= 1.14, not only the newest
    if model.ByteSize() < PROTOBUF_LIMIT:  # larger models are checked from their file (write_onnx)
        onnx.checker.check_model(model, full_check=True)
    return model


def write_onnx(config: ViTConfig, params: Dict[str, np.ndarray], path, batch_size: Optional[int] = None,
               data_name: Optional[str] = None) -> Optional[Path]:
    """Write `build_onnx_model(config, params, batch_size)` to `path` (the caller makes it atomic).

    A protobuf holds at most 2 GB, so a model past that (ViT-H/14: 2.5 GB of float32 weights) keeps its
    weights in a second file beside `path`, named `data_name` (default: the file name plus ".data"),
    which must travel with it. Returns that file's path, or None when everything is in one file.
    """
    onnx = _require_onnx()
    model = build_onnx_model(config, params, batch_size)
    path = Path(path)
    if model.ByteSize() < PROTOBUF_LIMIT:
        onnx.save_model(model, str(path))
        return None
    data_name = data_name or path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    onnx.checker.check_model(str(path), full_check=True)
    return path.with_name(data_name)


def run_onnx(path, images: np.ndarray) -> np.ndarray:
    """Run an ONNX file with onnxruntime on the CPU; ImportError with the fix when it is not installed."""
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("checking an ONNX export needs onnxruntime: pip install onnxruntime "
                          "(or skip the check: export.py --no_check)") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


__all__ = ["OPSET", "INPUT_NAME", "OUTPUT_NAME", "BATCH_DIM", "build_onnx_model", "write_onnx", "run_onnx"]
