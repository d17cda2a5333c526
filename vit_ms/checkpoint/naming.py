"""Name-level conversion, pure functions over {name: numpy array}: which scheme, into our names, and back.

`detect_source(names)` asks each scheme of `formats.FORMATS` in turn; `convert(params, source)` renames and
re-lays out into our names, leaving out what no ViT of ours has (optimizer state, pre-logits layers);
`infer_config(params)` reads the architecture off our names' shapes. The model never knows where its
weights came from (as timm's `checkpoint_filter_fn` and big_vision's `fix_old_checkpoints` do it).
"""
from __future__ import annotations

import logging
import math
import re
from typing import Dict, List

import numpy as np

from .format import META_KEY, CheckpointError
from .formats import FORMATS, SOURCES, Converted

logger = logging.getLogger(__name__)

# What MindSpore optimizers and training loops store beside the weights (nn.Adam's moment1/moment2,
# AdamWeightDecay's adam_m/adam_v, Momentum's moments, loss scaling and step counters,
# SGD's accum/stat). Checked against what ms.save_checkpoint writes for TrainOneStep(WithLossScale)Cell.
_STATE_PREFIXES = ("moment1.", "moment2.", "adam_m.", "adam_v.", "moments.", "accum.", "stat.", "mean_grad.",
                   "mean_square.", "vhat.")
_STATE_NAMES = {"global_step", "beta1_power", "beta2_power", "learning_rate", "momentum", "weight_decay",
                "scale_sense", "loss_scale", "epoch_num", "step_num", "current_iterator_step",
                "last_overflow_iterator_step"}
# Representation ("pre-logits") layers that some ImageNet-21k checkpoints put between the encoder and the
# head; this ViT has none (as in the paper's fine-tuning), so they and the head trained on them are dropped.
# (A big_vision train state nests everything under `params/`.)
_PRE_LOGITS = re.compile(r"(?:params/)?(?:pre_logits[./]|heads\.pre_logits\.)")
_HEADS = re.compile(r"(?:params/)?(?:head[./](weight|bias|kernel)|heads\.head\.(weight|bias)|dense\.(weight|bias))")


def is_training_state(name: str) -> bool:
    name = name[len("optimizer."):] if name.startswith("optimizer.") else name
    return name in _STATE_NAMES or name.startswith(_STATE_PREFIXES)


def detect_source(names) -> str:
    """Tell the naming scheme of a state dict from its parameter names (a key of `FORMATS`).

    Args:
        names: the parameter names of a checkpoint, as `read_params` returns them.
    """
    names = set(names)
    if META_KEY in names:
        return "vit_ms"
    for name, fmt in FORMATS.items():
        if fmt.recognise(names):
            return name
    raise CheckpointError(f"cannot tell the naming scheme of these weights (first names: "
                          f"{sorted(names)[:8]}); pass source= one of {SOURCES}")


def convert_detailed(params: Dict[str, np.ndarray], source: str) -> Converted:
    """`convert` without raising: our names plus what was dropped and every problem found."""
    if source not in FORMATS:
        raise CheckpointError(f"unknown source {source!r}; choose one of {SOURCES} or 'auto'")
    fmt = FORMATS[source]
    params = {name: np.asarray(value) for name, value in params.items() if name != META_KEY}
    state = {}
    if fmt.training_state:
        state = {name: "optimizer / training state" for name in params if is_training_state(name)}
        params = {k: v for k, v in params.items() if k not in state}
    pre = [name for name in params if _PRE_LOGITS.match(name)]
    pre_logits = {}
    if pre:
        pre_logits = {name: "pre-logits representation layer, which this ViT does not have" for name in pre}
        pre_logits.update({name: "head trained on top of the dropped pre-logits layer" for name in params
                           if _HEADS.fullmatch(name)})
        params = {k: v for k, v in params.items() if k not in pre_logits}
    out = fmt.to_vit_ms(params)
    out.dropped.update(state)
    out.dropped.update(pre_logits)
    return out


def convert(params: Dict[str, np.ndarray], source: str) -> Dict[str, np.ndarray]:
    """Convert a state dict in a foreign naming scheme into our parameter names and layouts.

    A pure function: nothing is loaded. Optimizer state in MindSpore training checkpoints and
    pre-logits layers are left out (logged); any name the scheme does not know raises CheckpointError.

    Args:
        params: {name: array} as `read_params` returns it.
        source: a key of `FORMATS` ("vit_ms", "tutorial", "timm", "torchvision", "jax", "hf", "mindcv").
    """
    out = convert_detailed(params, source)
    if out.problems:
        raise CheckpointError(f"cannot convert these {source} weights:\n  " + "\n  ".join(out.problems))
    if out.dropped:
        logger.info("left out %d %s tensors: %s", len(out.dropped), source, summarize_dropped(out.dropped))
    return out.params


def summarize_dropped(dropped: Dict[str, str]) -> str:
    by_reason: Dict[str, List[str]] = {}
    for name, reason in dropped.items():
        by_reason.setdefault(reason, []).append(name)
    return "; ".join(f"{reason}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                     for reason, names in by_reason.items())


def infer_config(params: Dict[str, np.ndarray]) -> dict:
    """The ViTConfig fields that weights in our names determine (all but heads, eps and GELU).

    Pooling fields appear only where they differ from the defaults: `class_token=False` without a
    `cls_token`, `global_pool="avg"` with an `fc_norm` (timm's GAP models).

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
    prefix = 1 if "cls_token" in params else 0
    tokens = params["pos_embed"].shape[1] - prefix
    grid = math.isqrt(tokens)
    fields = {"embed_dim": int(out_dim), "in_channels": int(in_channels), "patch_size": int(patch),
              "depth": depth, "mlp_dim": int(params["blocks.0.mlp.fc1.weight"].shape[0])}
    if grid * grid == tokens:
        fields["image_size"] = grid * int(patch)
    if "head.weight" in params:
        fields["num_classes"] = int(params["head.weight"].shape[0])
    if not prefix:
        fields["class_token"] = False
    if "fc_norm.gamma" in params:
        fields["global_pool"] = "avg"
    return fields


def prefix_tokens(names) -> int:
    """Leading non-patch rows of the position embedding: 1 with a CLS token, else 0."""
    return 1 if "cls_token" in names else 0


__all__ = ["detect_source", "convert", "convert_detailed", "infer_config", "is_training_state",
           "summarize_dropped", "prefix_tokens"]
