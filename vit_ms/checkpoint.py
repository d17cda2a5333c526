"""Checkpoints: our own format, foreign formats and naming schemes, conversion, pos-embed resampling.

A vit_ms checkpoint is a MindSpore `.ckpt` whose weights use our parameter names and which carries one
extra string entry, `vit_ms_meta`: JSON with the model config, the preprocessing and the class names,
so that eval, infer and export need nothing but the file.

Foreign weights load in four steps, each a plain function, so the model never knows where its weights
came from (as timm's `checkpoint_filter_fn` and big_vision's `fix_old_checkpoints` do it):

1. `read_params(path)`: file format -> {name: numpy array} (`.ckpt`, `.safetensors`, `.pth/.pt/.bin`,
   `.npz`);
2. `detect_source(names)`: which naming scheme ("vit_ms", "tutorial", "timm", "torchvision", "jax");
3. `convert(params, source)`: rename and re-lay out into our names (JAX kernels transposed, JAX q/k/v
   fused into one qkv matrix);
4. `load_weights(net, path)`: validate every tensor against the net, drop a head with another class
   count, resample a position embedding for another grid, and only then assign, so a bad checkpoint
   raises one error and leaves the net untouched.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np

from .config import IMAGENET_MEAN, IMAGENET_STD, Preprocess, ViTConfig, get_config

logger = logging.getLogger(__name__)

META_KEY = "vit_ms_meta"
FORMAT_VERSION = 1
SOURCES = ("vit_ms", "tutorial", "timm", "torchvision", "jax")
FILE_TYPES = {".ckpt": "MindSpore", ".safetensors": "safetensors", ".pth": "PyTorch", ".pt": "PyTorch",
              ".bin": "PyTorch", ".npz": "NumPy (JAX)"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose weights do not fit the model."""


# ----------------------------------------------------------------------------------------------------
# Our format: metadata beside the weights
# ----------------------------------------------------------------------------------------------------

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
    _check_file(path)
    seen = []

    def only_metadata(name):
        seen.append(name)
        return name == META_KEY

    try:
        params = ms.load_checkpoint(str(path), choice_func=only_metadata)
    except Exception as error:  # MindSpore raises ValueError or RuntimeError for a damaged file
        # MindSpore parses the whole file before it offers the names, and raises when the filter keeps
        # none: names seen means a sound checkpoint that simply has no metadata (e.g. the tutorial's).
        if seen:
            return None
        raise _unreadable(path, error) from error
    return parse_metadata(path, params[META_KEY])


def config_from_metadata(meta: dict) -> tuple[ViTConfig, Preprocess]:
    """The (ViTConfig, Preprocess) a checkpoint's metadata describes."""
    config = ViTConfig.from_dict(meta["model"])
    return config, Preprocess.from_dict(meta["preprocess"])


def load_model(path):
    """Build the ViT a vit_ms checkpoint describes and load its weights: returns (net, metadata).

    The weights go through the same validation as `load_weights`, strictly: every parameter must be
    present with the shape the metadata's config implies.

    Args:
        path: a checkpoint written by `save_checkpoint` (e.g. by train.py or convert.py).
    """
    from .model import ViT  # checkpoint imports the model only to build one from metadata

    params, meta = read_params(path)
    if meta is None:
        raise CheckpointError(
            f"{path} has no vit_ms metadata, so the model it holds is unknown. Either build the model "
            f"yourself and call vit_ms.load_weights(net, {str(path)!r}), or convert it once with "
            f"`python convert.py {path} converted.ckpt` and load that")
    config, _ = config_from_metadata(meta)
    net = ViT(config)
    _load_params(net, params, str(path), "vit_ms", meta, strict=True)
    return net, meta


# ----------------------------------------------------------------------------------------------------
# Step 1: file formats
# ----------------------------------------------------------------------------------------------------

def _check_file(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (or is not a file)")
    return path


def _unreadable(path, error) -> CheckpointError:
    return CheckpointError(f"cannot read {path} as a {FILE_TYPES.get(Path(path).suffix.lower(), '')} "
                           f"checkpoint: the file is truncated or corrupt ({type(error).__name__}: {error}). "
                           f"Download or save it again.")


def parse_metadata(path, value) -> dict:
    """The metadata dict from a checkpoint's raw `vit_ms_meta` entry; `path` only names it in errors."""
    try:
        meta = json.loads(value if isinstance(value, str) else str(value))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: the {META_KEY} entry is not valid JSON ({error})") from error
    if not isinstance(meta, dict) or "model" not in meta or "preprocess" not in meta:
        raise CheckpointError(f"{path}: the {META_KEY} entry lacks 'model' or 'preprocess'")
    return meta


def read_params(path) -> Tuple[Dict[str, np.ndarray], Optional[dict]]:
    """Read a weights file into ({name: numpy array}, vit_ms metadata or None), names unchanged.

    Supported: MindSpore `.ckpt`; `.safetensors` (read with the safetensors NumPy API, no PyTorch
    needed); PyTorch `.pth`/`.pt`/`.bin` (needs torch; loaded with `weights_only=True`, never an
    unrestricted unpickle; a {"state_dict": ...} or {"model": ...} wrapper is unwrapped); JAX `.npz`
    (loaded with `allow_pickle=False`).

    Args:
        path: the weights file; its suffix selects the reader.
    """
    path = _check_file(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise CheckpointError(f"{path}: unknown weights file type {suffix!r}; supported: "
                              f"{', '.join(sorted(FILE_TYPES))}")
    meta = None
    try:
        if suffix == ".ckpt":
            raw = ms.load_checkpoint(str(path))
            if META_KEY in raw:
                meta = parse_metadata(path, raw.pop(META_KEY))
            params = {}
            for name, value in raw.items():
                if isinstance(value, str):  # other append_dict strings carry no weights
                    continue
                params[name] = value.asnumpy()
        elif suffix == ".safetensors":
            from safetensors.numpy import load_file

            params = load_file(str(path))
        elif suffix == ".npz":
            with np.load(str(path), allow_pickle=False) as archive:
                params = {name: archive[name] for name in archive.files}
        else:
            params = _read_torch(path)
    except (CheckpointError, ImportError):
        raise
    except Exception as error:  # each reader has its own exception types for a damaged file
        raise _unreadable(path, error) from error
    if not params:
        raise CheckpointError(f"{path} holds no tensors")
    return params, meta


def _read_torch(path: Path) -> Dict[str, np.ndarray]:
    try:
        import torch  # optional: only for PyTorch pickles; .safetensors needs no torch
    except ImportError as error:
        raise ImportError(f"reading {path} needs PyTorch (pip install torch); or save the state dict as "
                          f".safetensors, which loads without it") from error
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" not in str(error):
            raise
        raise CheckpointError(f"{path} holds Python objects besides tensors; refused to unpickle them "
                              f"(weights_only=True). Save only the state dict, or as .safetensors.") from error
    for key in ("state_dict", "model", "model_state_dict", "module"):  # training-checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    params = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        if value.dtype in (torch.bfloat16, torch.float16):  # NumPy has no bfloat16
            value = value.float()
        params[name] = value.numpy()
    if params and all(name.startswith("module.") for name in params):  # saved from DistributedDataParallel
        params = {name[len("module."):]: value for name, value in params.items()}
    return params


# ----------------------------------------------------------------------------------------------------
# Step 2: naming schemes
# ----------------------------------------------------------------------------------------------------

# What MindSpore optimizers and training loops store beside the weights (nn.Adam's moment1/moment2,
# AdamWeightDecay's adam_m/adam_v, Momentum's moments, loss scaling and step counters,
# SGD's accum/stat). Checked against what ms.save_checkpoint writes for TrainOneStep(WithLossScale)Cell.
_STATE_PREFIXES = ("moment1.", "moment2.", "adam_m.", "adam_v.", "moments.", "accum.", "stat.", "mean_grad.",
                   "mean_square.", "vhat.")
_STATE_NAMES = {"global_step", "beta1_power", "beta2_power", "learning_rate", "momentum", "weight_decay",
                "scale_sense", "loss_scale", "epoch_num", "step_num", "current_iterator_step",
                "last_overflow_iterator_step"}


def _is_training_state(name: str) -> bool:
    name = name[len("optimizer."):] if name.startswith("optimizer.") else name
    return name in _STATE_NAMES or name.startswith(_STATE_PREFIXES)


def detect_source(names) -> str:
    """Tell the naming scheme of a state dict from its parameter names.

    Args:
        names: the parameter names of a checkpoint, as `read_params` returns them.
    """
    names = set(names)
    if META_KEY in names:
        return "vit_ms"
    stripped = {n[len("params/"):] if n.startswith("params/") else n for n in names}
    if any(n.startswith("Transformer/") for n in stripped) or "embedding/kernel" in stripped:
        return "jax"
    if any(n.startswith("transformer.layers.") for n in names) or {"cls", "pos_embedding"} <= names:
        return "tutorial"
    if "class_token" in names or any(n.startswith(("encoder.layers.encoder_layer_", "conv_proj.")) for n in names):
        return "torchvision"
    if any(n.endswith(("norm1.gamma", "norm.gamma")) for n in names):
        return "vit_ms"
    if any(n.endswith(("norm1.weight", "norm.weight")) for n in names) or "patch_embed.proj.weight" in names:
        return "timm"
    raise CheckpointError(f"cannot tell the naming scheme of these weights (first names: "
                          f"{sorted(names)[:8]}); pass source= one of {SOURCES}")


# ----------------------------------------------------------------------------------------------------
# Step 3: conversion into our names
# ----------------------------------------------------------------------------------------------------

_LN = {"weight": "gamma", "bias": "beta", "scale": "gamma", "gamma": "gamma", "beta": "beta"}
_Rule = Tuple[str, Callable[[re.Match], str]]


def _ln(target: str) -> Callable[[re.Match], str]:
    """A LayerNorm rename: the last group is the parameter (weight/bias/scale), mapped to gamma/beta."""
    return lambda m: target.format(*m.groups()[:-1]) + "." + _LN[m.groups()[-1]]


def _same(target: str) -> Callable[[re.Match], str]:
    return lambda m: target.format(*m.groups())


_BLOCK = r"blocks\.(\d+)\."
_TUTORIAL_RULES: List[_Rule] = [
    (r"cls", _same("cls_token")),
    (r"pos_embedding", _same("pos_embed")),
    (r"patch_embedding\.conv\.(weight|bias)", _same("patch_embed.proj.{}")),
    (r"transformer\.layers\.(\d+)\.0\.cell\.0\.(gamma|beta)", _ln("blocks.{}.norm1")),
    (r"transformer\.layers\.(\d+)\.0\.cell\.1\.qkv\.(weight|bias)", _same("blocks.{}.attn.qkv.{}")),
    (r"transformer\.layers\.(\d+)\.0\.cell\.1\.out\.(weight|bias)", _same("blocks.{}.attn.proj.{}")),
    (r"transformer\.layers\.(\d+)\.1\.cell\.0\.(gamma|beta)", _ln("blocks.{}.norm2")),
    (r"transformer\.layers\.(\d+)\.1\.cell\.1\.dense1\.(weight|bias)", _same("blocks.{}.mlp.fc1.{}")),
    (r"transformer\.layers\.(\d+)\.1\.cell\.1\.dense2\.(weight|bias)", _same("blocks.{}.mlp.fc2.{}")),
    (r"norm\.(gamma|beta)", _ln("norm")),
    (r"dense\.(weight|bias)", _same("head.{}")),
]
_OURS_RULES: List[_Rule] = [
    (r"cls_token|pos_embed|patch_embed\.proj\.(?:weight|bias)|head\.(?:weight|bias)|norm\.(?:gamma|beta)",
     lambda m: m.group(0)),
    (_BLOCK + r"(norm[12]\.(?:gamma|beta)|attn\.(?:qkv|proj)\.(?:weight|bias)|mlp\.fc[12]\.(?:weight|bias))",
     _same("blocks.{}.{}")),
]
_TIMM_RULES: List[_Rule] = [
    (r"(cls_token|pos_embed|patch_embed\.proj\.weight|patch_embed\.proj\.bias)", _same("{}")),
    (_BLOCK + r"(norm[12])\.(weight|bias)", _ln("blocks.{}.{}")),
    (_BLOCK + r"(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", _same("blocks.{}.{}.{}")),
    (r"norm\.(weight|bias)", _ln("norm")),
    (r"head\.(weight|bias)", _same("head.{}")),
]
_TV_LAYER = r"encoder\.layers\.encoder_layer_(\d+)\."
_TORCHVISION_RULES: List[_Rule] = [
    (r"class_token", _same("cls_token")),
    (r"conv_proj\.(weight|bias)", _same("patch_embed.proj.{}")),
    (r"encoder\.pos_embedding", _same("pos_embed")),
    (_TV_LAYER + r"ln_1\.(weight|bias)", _ln("blocks.{}.norm1")),
    (_TV_LAYER + r"self_attention\.in_proj_(weight|bias)", _same("blocks.{}.attn.qkv.{}")),
    (_TV_LAYER + r"self_attention\.out_proj\.(weight|bias)", _same("blocks.{}.attn.proj.{}")),
    (_TV_LAYER + r"ln_2\.(weight|bias)", _ln("blocks.{}.norm2")),
    # torchvision >= 0.13 names the MLP Sequential's layers 0 and 3; older files say linear_1/linear_2.
    (_TV_LAYER + r"mlp\.(?:0|linear_1)\.(weight|bias)", _same("blocks.{}.mlp.fc1.{}")),
    (_TV_LAYER + r"mlp\.(?:3|linear_2)\.(weight|bias)", _same("blocks.{}.mlp.fc2.{}")),
    (r"encoder\.ln\.(weight|bias)", _ln("norm")),
    (r"heads\.head\.(weight|bias)", _same("head.{}")),
]
# Representation ("pre-logits") layers that some ImageNet-21k checkpoints put between the encoder and the
# head; this ViT has none (as in the paper's fine-tuning), so they and the head trained on them are dropped.
_PRE_LOGITS = re.compile(r"pre_logits[./]|heads\.pre_logits\.")


@dataclass
class _Converted:
    params: Dict[str, np.ndarray]
    dropped: Dict[str, str] = field(default_factory=dict)  # source name -> why it was not converted
    problems: List[str] = field(default_factory=list)  # lines for the error message
    num_heads: Optional[int] = None  # known only where the layout shows it (JAX)


def _shape(value) -> str:
    return str(tuple(np.shape(value)))


def _rename(params: Dict[str, np.ndarray], rules: List[_Rule]) -> _Converted:
    out = _Converted({})
    compiled = [(re.compile(pattern), target) for pattern, target in rules]
    for name, value in params.items():
        for pattern, target in compiled:
            match = pattern.fullmatch(name)
            if match:
                out.params[target(match)] = value
                break
        else:
            out.problems.append(f"unknown name {name} {_shape(value)}")
    return out


def _drop_pre_logits(params: Dict[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    pre = [name for name in params if _PRE_LOGITS.match(name)]
    if not pre:
        return params, {}
    dropped = {name: "pre-logits representation layer, which this ViT does not have" for name in pre}
    for name in params:
        if re.fullmatch(r"head[./](weight|bias|kernel)|heads\.head\.(weight|bias)|dense\.(weight|bias)", name):
            dropped[name] = "head trained on top of the dropped pre-logits layer"
    return {k: v for k, v in params.items() if k not in dropped}, dropped


def _split_training_state(params):
    state = {name: "optimizer / training state" for name in params if _is_training_state(name)}
    return {k: v for k, v in params.items() if k not in state}, state


def _convert_jax(params: Dict[str, np.ndarray]) -> _Converted:
    """google-research/vision_transformer and big_vision `.npz` (Flax names joined with '/')."""
    params = _unstack_scanned(params)
    # vision_transformer's pre-Linen names number modules globally within a block (LayerNorm_0,
    # MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3); big_vision numbers them per type.
    old_names = any("/MultiHeadDotProductAttention_1/" in name for name in params)
    attn, ln2, mlp = ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3") if old_names else \
        ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    out = _Converted({})
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
        p["norm." + _LN[name.rsplit("/", 1)[1]]] = value
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
            p[b + ("norm1." if parts[0] == "LayerNorm_0" else "norm2.") + _LN[parts[1]]] = value
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


def _convert(params: Dict[str, np.ndarray], source: str) -> _Converted:
    if source not in SOURCES:
        raise CheckpointError(f"unknown source {source!r}; choose one of {SOURCES} or 'auto'")
    params = {name: np.asarray(value) for name, value in params.items() if name != META_KEY}
    params, state = _split_training_state(params) if source in ("vit_ms", "tutorial") else (params, {})
    if source == "jax" and any(name.startswith("params/") for name in params):  # a big_vision train state
        state = {name: "optimizer / training state" for name in params if not name.startswith("params/")}
        params = {name[len("params/"):]: value for name, value in params.items() if name.startswith("params/")}
    params, pre_logits = _drop_pre_logits(params)
    if source == "jax":
        out = _convert_jax(params)
    else:
        rules = {"vit_ms": _OURS_RULES, "tutorial": _TUTORIAL_RULES, "timm": _TIMM_RULES,
                 "torchvision": _TORCHVISION_RULES}[source]
        out = _rename(params, rules)
    out.dropped.update(state)
    out.dropped.update(pre_logits)
    return out


def convert(params: Dict[str, np.ndarray], source: str) -> Dict[str, np.ndarray]:
    """Convert a state dict in a foreign naming scheme into our parameter names and layouts.

    A pure function: nothing is loaded. Optimizer state in MindSpore training checkpoints and
    pre-logits layers are left out (logged); any name the scheme does not know raises CheckpointError.

    Args:
        params: {name: array} as `read_params` returns it.
        source: "vit_ms", "tutorial", "timm", "torchvision" or "jax" (see `detect_source`).
    """
    out = _convert(params, source)
    if out.problems:
        raise CheckpointError(f"cannot convert these {source} weights:\n  " + "\n  ".join(out.problems))
    if out.dropped:
        logger.info("left out %d %s tensors: %s", len(out.dropped), source, _summarize_dropped(out.dropped))
    return out.params


def _summarize_dropped(dropped: Dict[str, str]) -> str:
    by_reason: Dict[str, List[str]] = {}
    for name, reason in dropped.items():
        by_reason.setdefault(reason, []).append(name)
    return "; ".join(f"{reason}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                     for reason, names in by_reason.items())


# ----------------------------------------------------------------------------------------------------
# Position-embedding resampling
# ----------------------------------------------------------------------------------------------------

def _linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D linear interpolation with half-pixel centres (align_corners=False)."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    matrix = np.zeros((n_out, n_in))
    np.add.at(matrix, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(matrix, (np.arange(n_out), hi), frac)
    return matrix


def _as_grid(grid) -> Tuple[int, int]:
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def resample_pos_embed(pos_embed: np.ndarray, new_grid, old_grid=None, num_prefix_tokens: int = 1) -> np.ndarray:
    """Resample a learned position embedding to another patch grid ("high-res fine-tuning", paper 3.2).

    The CLS row is kept as is; the patch rows are laid out on their 2-D grid and resized with bilinear
    interpolation, half-pixel centres, no antialiasing: the same numbers as PyTorch's
    `F.interpolate(mode="bilinear", align_corners=False)` (timm defaults to bicubic, big_vision to
    `scipy.ndimage.zoom(order=1)`; all three agree closely).

    Args:
        pos_embed: (1, num_prefix_tokens + gh * gw, D).
        new_grid: the target grid, an int (square) or (rows, cols).
        old_grid: the source grid; default: the square root of the patch-token count.
        num_prefix_tokens: leading non-patch tokens (1: the CLS token).
    """
    pos_embed = np.asarray(pos_embed)
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, tokens, D), got {pos_embed.shape}")
    n = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        if math.isqrt(n) ** 2 != n:
            raise ValueError(f"{n} patch tokens do not form a square grid; pass old_grid=(rows, cols)")
        old_grid = math.isqrt(n)
    (gh, gw), (nh, nw) = _as_grid(old_grid), _as_grid(new_grid)
    if gh * gw != n:
        raise ValueError(f"old_grid {gh}x{gw} does not hold the {n} patch tokens of pos_embed")
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[0, num_prefix_tokens:]
    grid = grid.reshape(gh, gw, -1).astype(np.float64)
    # Bilinear = linear along rows, then along columns.
    grid = np.einsum("ih,hwd,jw->ijd", _linear_resize_matrix(gh, nh), grid, _linear_resize_matrix(gw, nw))
    grid = grid.reshape(1, nh * nw, -1).astype(pos_embed.dtype)
    return np.concatenate([prefix, grid], axis=1)


# ----------------------------------------------------------------------------------------------------
# Step 4: validate, then load
# ----------------------------------------------------------------------------------------------------

@dataclass
class LoadReport:
    """What `load_weights` did: every tensor either loaded, dropped (with the reason) or resampled."""

    path: str
    source: str  # the naming scheme used ("tutorial", "timm", ...)
    loaded: List[str] = field(default_factory=list)  # our parameter names that received weights
    dropped: Dict[str, str] = field(default_factory=dict)  # checkpoint name -> why it was not loaded
    resampled: Dict[str, Tuple[Tuple[int, int], Tuple[int, int]]] = field(default_factory=dict)  # name -> grids
    initialised: List[str] = field(default_factory=list)  # model parameters the checkpoint lacked (kept)
    metadata: Optional[dict] = None  # vit_ms metadata, when the file has some

    def summary(self) -> str:
        text = f"loaded {len(self.loaded)} tensors from {self.path} ({self.source} names)"
        if self.resampled:
            text += "; " + ", ".join(f"{name} resampled {a[0]}x{a[1]} -> {b[0]}x{b[1]}"
                                     for name, (a, b) in self.resampled.items())
        if self.dropped:
            text += f"; dropped {len(self.dropped)} ({_summarize_dropped(self.dropped)})"
        if self.initialised:
            text += f"; kept the model's initial {', '.join(self.initialised)}"
        return text


def load_weights(net, path, source: str = "auto", strict: bool = False) -> LoadReport:
    """Load a weights file of any supported format and naming scheme into `net`, in place.

    Everything is checked before anything is assigned: on any error the net is left exactly as it was.
    Allowed differences (unless `strict`): a head with another class count is dropped with a warning
    (the model keeps its own head, as when fine-tuning), a headless checkpoint leaves the head as
    initialised, and a position embedding for another grid is resampled (`resample_pos_embed`). Any
    other mismatch (depth, width, unknown names, missing tensors) raises one CheckpointError listing
    every offending name and shape.

    Args:
        net: a `vit_ms.ViT` (or any Cell with our parameter names).
        path: a `.ckpt` (ours or the tutorial's), `.safetensors`, `.pth`/`.pt`/`.bin` or `.npz` file.
        source: "auto" (detect from the names) or one of `SOURCES`.
        strict: require an exact match: no head dropping, no resampling, nothing missing.
    """
    params, meta = read_params(path)
    return _load_params(net, params, str(path), source, meta, strict)


def _load_params(net, params, path: str, source: str, meta, strict: bool) -> LoadReport:
    if source == "auto":
        source = detect_source(list(params) + ([META_KEY] if meta is not None else []))
    converted = _convert(params, source)
    report, assignments = _plan(net, converted, path, source, strict)
    report.metadata = meta
    _assign(report, assignments)
    return report


def _assign(report: LoadReport, assignments):
    """Assign validated values (cast to each parameter's dtype) and log what differed."""
    for _, param, value in assignments:
        param.set_data(ms.Tensor(np.ascontiguousarray(value), dtype=param.dtype))
    path = report.path
    head = {k: v for k, v in report.dropped.items() if v.startswith("head")}
    if head:
        logger.warning("%s: %s not loaded: %s", path, " and ".join(head), next(iter(head.values())))
    for name, (old, new) in report.resampled.items():
        logger.info("%s: %s resampled from a %dx%d to a %dx%d patch grid (bilinear)", path, name, *old, *new)
    if report.initialised:
        logger.warning("%s has no %s: the model keeps its initial values", path, ", ".join(report.initialised))
    logger.info(report.summary())


def _plan(net, converted: _Converted, path: str, source: str, strict: bool):
    """Check every tensor against the net; return (report, [(name, parameter, value)]) or raise."""
    expected = {name: param for name, param in net.parameters_and_names()}
    problems = list(converted.problems)
    report = LoadReport(path=path, source=source, dropped=dict(converted.dropped))
    assignments = []
    values = dict(converted.params)

    head_w, head_b = values.get("head.weight"), values.get("head.bias")
    model_head = expected.get("head.weight")
    if (not strict and head_w is not None and model_head is not None and head_w.ndim == 2
            and head_w.shape[1] == model_head.shape[1] and head_w.shape[0] != model_head.shape[0]):
        reason = (f"head for {head_w.shape[0]} classes, the model has {model_head.shape[0]}: "
                  f"the model keeps its own head")
        for name in ("head.weight", "head.bias"):
            if name in values:
                values.pop(name)
                report.dropped[name] = reason

    for name, value in values.items():
        param = expected.get(name)
        if param is None:
            problems.append(f"unexpected {name} {_shape(value)}: the model has no such parameter")
            continue
        if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
            problems.append(f"{name} has dtype {value.dtype}, not a number")
            continue
        model_shape = tuple(param.shape)
        if value.shape != model_shape and name == "pos_embed" and not strict:
            resampled = _try_resample(value, model_shape)
            if resampled is not None:
                value, grids = resampled
                report.resampled[name] = grids
        if value.shape != model_shape:
            problems.append(f"shape of {name}: checkpoint {_shape(value)}, model {model_shape}")
            continue
        assignments.append((name, param, value))

    missing = [name for name in expected if name not in values and name not in report.dropped]
    head_only = set(missing) <= {"head.weight", "head.bias"}
    if missing and head_only and not strict:
        report.initialised = missing
    else:
        problems += [f"missing {name}: the model expects {tuple(expected[name].shape)}" for name in missing]

    if problems:
        raise CheckpointError(_mismatch_message(net, converted.params, path, source, problems))
    report.loaded = [name for name, _, _ in assignments]
    return report, assignments


def _try_resample(value: np.ndarray, model_shape):
    if value.ndim != 3 or len(model_shape) != 3 or value.shape[0] != 1 or value.shape[2] != model_shape[2]:
        return None
    old, new = value.shape[1] - 1, model_shape[1] - 1
    if math.isqrt(old) ** 2 != old or math.isqrt(new) ** 2 != new:
        return None
    old_grid, new_grid = math.isqrt(old), math.isqrt(new)
    return resample_pos_embed(value, new_grid), ((old_grid, old_grid), (new_grid, new_grid))


_MAX_LINES = 40


def _mismatch_message(net, params, path, source, problems) -> str:
    lines = problems[:_MAX_LINES]
    if len(problems) > _MAX_LINES:
        lines.append(f"... and {len(problems) - _MAX_LINES} more")
    text = (f"cannot load {path} ({source} names) into this model; nothing was loaded. "
            f"{len(problems)} problem(s):\n  " + "\n  ".join(lines))
    config = getattr(net, "config", None)
    try:
        found = infer_config(params)
    except CheckpointError:
        found = None
    if found and config is not None:
        differ = {k: v for k, v in found.items() if getattr(config, k) != v and k not in ("num_classes", "image_size")}
        if differ:
            text += ("\nThe checkpoint holds a model with " + ", ".join(f"{k}={v}" for k, v in differ.items())
                     + "; the model has " + ", ".join(f"{k}={getattr(config, k)}" for k in differ)
                     + ". Build the model with the checkpoint's config, e.g. create_model(preset, "
                     + ", ".join(f"{k}={v}" for k, v in differ.items()) + ").")
    return text


# ----------------------------------------------------------------------------------------------------
# Config from weights, and conversion to our format (convert.py)
# ----------------------------------------------------------------------------------------------------

# Heads per width in the paper and DeiT; fused qkv weights do not show the head count.
STANDARD_HEADS = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16}
# (norm_eps, gelu_approximate) each source was trained with: MindSpore's defaults for the tutorial,
# Flax's defaults (tanh GELU) for JAX, PyTorch's exact GELU for timm and torchvision.
SOURCE_NUMERICS = {"tutorial": (1e-7, True), "jax": (1e-6, True), "timm": (1e-6, False),
                   "torchvision": (1e-6, False), "vit_ms": (1e-6, False)}
# JAX ViTs take inputs scaled to [-1, 1].
SOURCE_MEAN_STD = {"jax": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def infer_config(params: Dict[str, np.ndarray]) -> dict:
    """The ViTConfig fields that weights in our names determine (all but heads, eps and GELU).

    Args:
        params: {our name: array}, e.g. `convert(...)`'s output.
    """
    needed = ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight")
    absent = [name for name in needed if name not in params]
    if absent:
        raise CheckpointError(f"cannot infer the model from these weights: they lack {absent}")
    out_dim, in_channels, patch, _ = params["patch_embed.proj.weight"].shape
    blocks = [int(m.group(1)) for m in (re.match(r"blocks\.(\d+)\.", n) for n in params) if m]
    depth = 1 + max(blocks)  # blocks.0 is present (checked above)
    tokens = params["pos_embed"].shape[1] - 1
    grid = math.isqrt(tokens)
    fields = {"embed_dim": int(out_dim), "in_channels": int(in_channels), "patch_size": int(patch),
              "depth": depth, "mlp_dim": int(params["blocks.0.mlp.fc1.weight"].shape[0])}
    if grid * grid == tokens:
        fields["image_size"] = grid * int(patch)
    if "head.weight" in params:
        fields["num_classes"] = int(params["head.weight"].shape[0])
    return fields


def convert_checkpoint(src, dst, source: str = "auto", model: Optional[str] = None,
                       num_classes: Optional[int] = None, image_size: Optional[int] = None,
                       num_heads: Optional[int] = None, mean=None, std=None):
    """Convert any supported weights file into a vit_ms checkpoint (weights + metadata).

    The config comes from the weights' shapes (width, depth, MLP width, patch, classes, image size);
    `model` (a preset) supplies the rest and its numerics, else the source's convention is used
    (`SOURCE_NUMERICS`) and the head count comes from `STANDARD_HEADS`. Returns (dst, report, config).

    Args:
        src: the weights file to convert.
        dst: the `.ckpt` to write.
        source: naming scheme, "auto" to detect.
        model: a preset name used as the base config; shape fields must agree with the weights.
        num_classes: a new head size (the checkpoint's head is then dropped; a zero head is written).
        image_size: a new input size (the position embedding is resampled).
        num_heads: attention heads, for widths outside `STANDARD_HEADS`.
        mean, std: preprocessing statistics in [0, 1] units (default: the source's convention).
    """
    from .model import ViT

    params, meta = read_params(src)
    if source == "auto":
        source = detect_source(list(params) + ([META_KEY] if meta is not None else []))
    converted = _convert(params, source)
    class_names = None
    if meta is not None:
        base, preprocess = config_from_metadata(meta)
        class_names = meta.get("class_names")
    else:
        base, preprocess = _config_from_weights(converted, source, model, num_heads, src), None
    overrides = {k: v for k, v in (("num_classes", num_classes), ("image_size", image_size),
                                   ("num_heads", num_heads)) if v is not None}
    config = dataclasses.replace(base, **overrides)
    if class_names is not None and len(class_names) != config.num_classes:
        class_names = None
    default_mean, default_std = SOURCE_MEAN_STD.get(source, (IMAGENET_MEAN, IMAGENET_STD))
    if preprocess is None:
        preprocess = Preprocess(image_size=config.image_size, mean=default_mean, std=default_std)
    preprocess = dataclasses.replace(preprocess, image_size=config.image_size,
                                     **({"mean": tuple(mean)} if mean else {}), **({"std": tuple(std)} if std else {}))
    net = ViT(config)
    report, assignments = _plan(net, converted, str(src), source, strict=False)
    _assign(report, assignments)
    extra = {"converted_from": Path(src).name, "source": source}
    save_checkpoint(net, dst, make_metadata(config, class_names, preprocess, **extra))
    return Path(dst), report, config


def _config_from_weights(converted: _Converted, source, model, num_heads, src) -> ViTConfig:
    fields = infer_config(converted.params)
    if model is not None:
        base = get_config(model)
        conflicts = {k: (v, getattr(base, k)) for k, v in fields.items()
                     if k not in ("num_classes", "image_size") and getattr(base, k) != v}
        if conflicts:
            raise CheckpointError(f"{src} does not hold a {model}: " + ", ".join(
                f"{k}={v} in the weights, {b} in the preset" for k, (v, b) in conflicts.items()))
        return dataclasses.replace(base, **fields)
    heads = num_heads or converted.num_heads or STANDARD_HEADS.get(fields["embed_dim"])
    if heads is None:
        raise CheckpointError(f"the weights of {src} have width {fields['embed_dim']}, which has no standard "
                              f"head count; pass num_heads (convert.py --num_heads) or a preset (--model)")
    if not (num_heads or converted.num_heads):
        logger.info("num_heads=%d: the standard count for width %d (pass num_heads if yours differs)",
                    heads, fields["embed_dim"])
    norm_eps, gelu_approximate = SOURCE_NUMERICS[source]
    return ViTConfig(num_heads=heads, norm_eps=norm_eps, gelu_approximate=gelu_approximate, **fields)


# ----------------------------------------------------------------------------------------------------
# Named pretrained weights
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PretrainedSource:
    """A downloadable checkpoint: where it lives, which preset it fits and its naming scheme."""

    url: str
    preset: str
    source: str


# The MindSpore tutorial's ImageNet-1k ViT-B/16 (346 MB, weights only, tutorial names).
PRETRAINED_BASE_URL = "https://download.mindspore.cn/vision/classification"
PRETRAINED = {
    "vit_b_16_224": PretrainedSource(url=f"{PRETRAINED_BASE_URL}/vit_b_16_224.ckpt", preset="tutorial",
                                     source="tutorial"),
}


def default_cache_dir() -> Path:
    """$VIT_MS_HOME if set, else ~/.cache/vit_ms."""
    return Path(os.environ.get("VIT_MS_HOME") or Path.home() / ".cache" / "vit_ms")


def resolve_pretrained(name_or_path, cache_dir=None, base_url: Optional[str] = None) -> Path:
    """A local file for a named pretrained checkpoint (downloaded once into the cache) or a path.

    Args:
        name_or_path: an existing file, or a key of `PRETRAINED` (e.g. "vit_b_16_224").
        cache_dir: where downloads go; default `default_cache_dir()` ($VIT_MS_HOME or ~/.cache/vit_ms).
        base_url: a mirror replacing `PRETRAINED_BASE_URL` (also read from $VIT_MS_PRETRAINED_URL).
    """
    path = Path(str(name_or_path)).expanduser()
    if path.is_file():
        return path
    if name_or_path not in PRETRAINED:
        raise FileNotFoundError(f"{name_or_path} is neither a file nor a named pretrained checkpoint "
                                f"({', '.join(sorted(PRETRAINED))})")
    url = PRETRAINED[name_or_path].url
    base_url = base_url or os.environ.get("VIT_MS_PRETRAINED_URL")
    if base_url:
        url = base_url.rstrip("/") + "/" + url.rsplit("/", 1)[1]
    target = Path(cache_dir or default_cache_dir()).expanduser() / url.rsplit("/", 1)[1]
    if target.is_file():
        logger.info("using cached %s", target)
        return target
    from download import download  # the tutorial's downloader

    logger.info("downloading %s to %s", url, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        download(url, str(target), replace=False, progressbar=True, verbose=False)
    except Exception as error:  # no network, HTTP error, disk full: the fix is the same
        raise RuntimeError(f"could not download {name_or_path} from {url} ({type(error).__name__}: {error}). "
                           f"Download it by hand and put it at {target} (or pass its path instead of the "
                           f"name).") from error
    if not target.is_file():
        raise RuntimeError(f"downloading {url} left no file at {target}; download it by hand and put it there")
    return target


__all__ = ["META_KEY", "SOURCES", "CheckpointError", "LoadReport", "make_metadata", "parse_metadata",
           "save_checkpoint", "read_metadata", "config_from_metadata", "load_model", "read_params", "detect_source", "convert",
           "resample_pos_embed", "load_weights", "infer_config", "convert_checkpoint", "PRETRAINED",
           "PretrainedSource", "default_cache_dir", "resolve_pretrained"]
