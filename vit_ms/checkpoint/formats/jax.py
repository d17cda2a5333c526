"""JAX ViTs: google-research/vision_transformer and big_vision `.npz` (Flax names joined with '/').

Kernels are transposed into PyTorch/MindSpore layout, per-head q/k/v kernels fused into one qkv matrix;
big_vision's `scan=True` stacked blocks are split; a big_vision train state (`params/...`) is unwrapped.
Flax's defaults: tanh GELU, epsilon 1e-6; inputs scaled to [-1, 1] (mean = std = 0.5).
"""
from __future__ import annotations

import math
import re
from typing import Dict, Tuple

import numpy as np

from . import WeightFormat
from ._rules import LN, Converted
from ._rules import shape as _shape


def recognise(names) -> bool:
    stripped = {n[len("params/"):] if n.startswith("params/") else n for n in names}
    return any(n.startswith("Transformer/") for n in stripped) or "embedding/kernel" in stripped


def to_vit_ms(params) -> Converted:
    dropped = {}
    if any(name.startswith("params/") for name in params):  # a big_vision train state
        dropped = {name: "optimizer / training state" for name in params if not name.startswith("params/")}
        params = {name[len("params/"):]: value for name, value in params.items() if name.startswith("params/")}
    out = _convert_jax(params)
    out.dropped.update(dropped)
    return out


def _convert_jax(params: Dict[str, np.ndarray]) -> Converted:
    """google-research/vision_transformer and big_vision `.npz` (Flax names joined with '/')."""
    params = _unstack_scanned(params)
    # vision_transformer's pre-Linen names number modules globally within a block (LayerNorm_0,
    # MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3); big_vision numbers them per type.
    old_names = any("/MultiHeadDotProductAttention_1/" in name for name in params)
    attn, ln2, mlp = ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3") if old_names else \
        ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    out = Converted({})
    qkv: Dict[Tuple[int, str, str], np.ndarray] = {}  # (block, query|key|value, kernel|bias) -> array
    block_re = re.compile(r"Transformer/encoderblock_(\d+)/(.+)")
    for name, value in params.items():
        try:
            known = _jax_entry(name, value, block_re, attn, ln2, mlp, qkv, out)
        except ValueError as error:
            out.problems.append(f"cannot convert {name} {_shape(value)}: {error}")
            continue
        if not known:
            out.problems.append(f"unknown name {name} {_shape(value)}")
    for (i, part, kind), value in list(qkv.items()):
        if part != "query":
            continue
        parts = [(i, p, kind) for p in ("query", "key", "value")]
        if not all(p in qkv for p in parts):
            continue
        arrays = [qkv.pop(p) for p in parts]
        if kind == "kernel":  # (D, heads, head_dim) -> (heads * head_dim, D), q, k, v stacked as our rows
            out.num_heads = arrays[0].shape[1]
            out.params[f"blocks.{i}.attn.qkv.weight"] = np.concatenate(
                [a.reshape(a.shape[0], -1).T for a in arrays], axis=0)
        else:  # (heads, head_dim) -> (3 * D,)
            out.params[f"blocks.{i}.attn.qkv.bias"] = np.concatenate([a.reshape(-1) for a in arrays])
    for (i, part, kind), value in qkv.items():  # a query without its key or value
        out.problems.append(f"incomplete attention Transformer/encoderblock_{i}/{attn}/{part}/{kind} "
                            f"{_shape(value)}: needs all of query, key and value")
    return out


def _jax_entry(name, value, block_re, attn, ln2, mlp, qkv, out) -> bool:
    """Convert one JAX entry into `out` (or stash q/k/v in `qkv`); False for an unknown name."""
    p = out.params
    if name == "cls":
        p["cls_token"] = value
    elif name == "embedding/kernel":
        _expect_ndim(value, 4, "HWIO convolution kernel")
        p["patch_embed.proj.weight"] = value.transpose(3, 2, 0, 1)  # (p, p, C, D) -> (D, C, p, p)
    elif name == "embedding/bias":
        p["patch_embed.proj.bias"] = value
    elif name in ("Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding", "pos_embedding"):
        _expect_ndim(value, 3, "position embedding (1, tokens, D)")
        n = value.shape[1]
        if math.isqrt(n) ** 2 == n:
            # big_vision adds the position embedding before prepending [cls]: the CLS token has no
            # position row, which for our add-after-concat layout is a zero row.
            value = np.concatenate([np.zeros_like(value[:, :1]), value], axis=1)
        p["pos_embed"] = value
    elif name in ("Transformer/encoder_norm/scale", "Transformer/encoder_norm/bias"):
        p["norm." + LN[name.rsplit("/", 1)[1]]] = value
    elif name == "head/kernel":
        _expect_ndim(value, 2, "Dense kernel (in, out)")
        p["head.weight"] = value.T
    elif name == "head/bias":
        p["head.bias"] = value
    else:
        match = block_re.fullmatch(name)
        if not match:
            return False
        i, rest = match.groups()
        b = f"blocks.{i}."
        parts = rest.split("/")
        if len(parts) == 2 and parts[0] in ("LayerNorm_0", ln2) and parts[1] in ("scale", "bias"):
            p[b + ("norm1." if parts[0] == "LayerNorm_0" else "norm2.") + LN[parts[1]]] = value
        elif len(parts) == 3 and parts[0] == attn and parts[1] in ("query", "key", "value"):
            if parts[2] not in ("kernel", "bias"):
                return False
            _expect_ndim(value, 3 if parts[2] == "kernel" else 2, f"{parts[1]} {parts[2]} (split heads)")
            qkv[(int(i), parts[1], parts[2])] = value
        elif len(parts) == 3 and parts[0] == attn and parts[1] == "out":
            if parts[2] == "kernel":
                _expect_ndim(value, 3, "out kernel (heads, head_dim, D)")
                p[b + "attn.proj.weight"] = value.reshape(-1, value.shape[-1]).T
            elif parts[2] == "bias":
                p[b + "attn.proj.bias"] = value
            else:
                return False
        elif len(parts) == 3 and parts[0] == mlp and parts[1] in ("Dense_0", "Dense_1"):
            fc = "fc1" if parts[1] == "Dense_0" else "fc2"
            if parts[2] == "kernel":
                _expect_ndim(value, 2, "Dense kernel (in, out)")
                p[b + f"mlp.{fc}.weight"] = value.T
            elif parts[2] == "bias":
                p[b + f"mlp.{fc}.bias"] = value
            else:
                return False
        else:
            return False
    return True


def _expect_ndim(value, ndim: int, what: str):
    if np.ndim(value) != ndim:
        raise ValueError(f"expected a {ndim}-D {what}")


def _unstack_scanned(params: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """big_vision with `scan=True` stores all blocks in one `Transformer/encoderblock/...` tree whose
    arrays carry the depth as a leading axis; split it into encoderblock_{i}."""
    out = {}
    for name, value in params.items():
        prefix = "Transformer/encoderblock/"
        if name.startswith(prefix):
            for i in range(value.shape[0]):
                out[f"Transformer/encoderblock_{i}/{name[len(prefix):]}"] = value[i]
        else:
            out[name] = value
    return out



FORMAT = WeightFormat(
    name="jax", description="google-research/vision_transformer and big_vision .npz (incl. AugReg)",
    detected_by="`Transformer/...` or `embedding/kernel` (optionally under `params/`)",
    recognise=recognise, to_vit_ms=to_vit_ms, gelu_approximate=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
