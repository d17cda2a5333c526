"""File to file: any supported weights into a vit_ms checkpoint (convert.py), and ours back out to timm or HF.

The config of foreign weights comes from their shapes (`naming.infer_config`), from files beside them (an HF
config.json, through the scheme's `read_hints`), from a preset, and from the scheme's training numerics.
Shapes are checked on a network built with `fast=False`, so converting never compiles a kernel.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional, Sequence, Tuple

from ..config import Preprocess, ViTConfig, get_config
from .format import META_KEY, CheckpointError, config_from_metadata, make_metadata, save_checkpoint
from .formats import FORMATS, Hints
from .loading import assign, plan
from .naming import Converted, convert, convert_detailed, detect_source, infer_config
from .readers import read_params

logger = logging.getLogger(__name__)

# Heads per width in the paper and DeiT; fused qkv weights do not show the head count.
STANDARD_HEADS = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16}


def _plain_net(config: ViTConfig):
    from ..model import create_model

    return create_model(config, fast=False)  # plain ops: no fused-kernel build just to check shapes


def convert_checkpoint(src, dst, source: str = "auto", model: Optional[str] = None,
                       num_classes: Optional[int] = None, image_size: Optional[int] = None,
                       num_heads: Optional[int] = None, mean: Optional[Sequence[float]] = None,
                       std: Optional[Sequence[float]] = None, crop_pct: Optional[float] = None,
                       interpolation: Optional[str] = None, class_names: Optional[Sequence[str]] = None):
    """Convert any supported weights file into a vit_ms checkpoint (weights + metadata).

    The config comes from the weights' shapes (width, depth, MLP width, patch, channels, classes, image
    size, pooling); then from what the scheme's companion files say (an HF config.json: heads, epsilon,
    GELU, labels); `model` (a preset) supplies the rest, else the scheme's convention (`WeightFormat.norm_eps`,
    `gelu_approximate`) and `STANDARD_HEADS`. Returns (dst, report, config).

    Args:
        src: the weights file (or HF save_pretrained folder) to convert.
        dst: the `.ckpt` to write.
        source: naming scheme, "auto" to detect.
        model: a preset name used as the base config; shape fields must agree with the weights.
        num_classes: a new head size (the checkpoint's head is then dropped; a zero head is written).
        image_size: a new input size (the position embedding is resampled).
        num_heads: attention heads, for widths outside `STANDARD_HEADS`.
        mean, std: preprocessing statistics in [0, 1] units, one value per input channel
            (default: the scheme's convention, e.g. 0.5 for JAX and HF, ImageNet's otherwise).
        crop_pct: eval resize-then-crop ratio (1.0: resize straight to image_size, no crop).
        interpolation: resize filter ("bilinear", "bicubic", ...).
        class_names: one name per class, in logit order (default: the checkpoint's or config.json's).
    """
    weights = describe_weights(src, source, model, num_heads)
    converted, source, names = weights.converted, weights.source, weights.class_names
    overrides = {k: v for k, v in (("num_classes", num_classes), ("image_size", image_size),
                                   ("num_heads", num_heads)) if v is not None}
    config = dataclasses.replace(weights.config, **overrides)
    names = list(class_names) if class_names is not None else names
    if class_names is not None and len(names) != config.num_classes:
        raise CheckpointError(f"{len(names)} class names for a model with {config.num_classes} classes")
    if names is not None and len(names) != config.num_classes:
        names = None  # a new head: the old names do not apply
    preprocess = weights.preprocess
    changes = {"image_size": config.image_size, "mean": tuple(mean) if mean else None,
               "std": tuple(std) if std else None, "crop_pct": crop_pct, "interpolation": interpolation}
    preprocess = dataclasses.replace(preprocess, **{k: v for k, v in changes.items() if v is not None})
    metadata = make_metadata(config, names, preprocess, converted_from=Path(src).name, source=source)
    net = _plain_net(config)
    report, assignments = plan(net, converted, str(src), source, strict=False)
    assign(report, assignments)
    save_checkpoint(net, dst, metadata)
    return Path(dst), report, config


@dataclasses.dataclass
class WeightsDescription:
    """What a weights file is, as `describe_weights` reads it."""

    config: ViTConfig  # from the metadata (a vit_ms checkpoint), else from the shapes, hints and conventions
    preprocess: Preprocess  # the metadata's, else the scheme's convention (and an HF preprocessor_config.json)
    source: str  # the naming scheme, a key of FORMATS
    converted: Converted  # the tensors in our names
    class_names: Optional[list] = None
    preset: Optional[str] = None  # the `model` preset the config was built on (None: read off the weights)


def describe_weights(src, source: str = "auto", model: Optional[str] = None, num_heads: Optional[int] = None,
                     model_must_fit: bool = True) -> WeightsDescription:
    """The model and preprocessing a weights file holds, as `convert_checkpoint` would write them (nothing
    is written). See `convert_checkpoint` for `source`, `model` and `num_heads`; with `model_must_fit=False`
    a `model` whose shapes are not the weights' is passed over (`preset` None) instead of raising."""
    params, meta = read_params(src)
    if source == "auto":
        source = detect_source(list(params) + ([META_KEY] if meta is not None else []))
    converted = convert_detailed(params, source)
    if meta is not None:
        config, preprocess = config_from_metadata(meta)
        return WeightsDescription(config, preprocess, source, converted, meta.get("class_names"))
    fmt = FORMATS[source]
    hints = fmt.read_hints(Path(src)) if fmt.read_hints else Hints()
    config, preset = _config_from_weights(converted, source, model, num_heads, src, hints, model_must_fit)
    mean, std = tuple(hints.preprocess.get("mean", fmt.mean)), tuple(hints.preprocess.get("std", fmt.std))
    fits = len(mean) == config.in_channels  # else Preprocess's per-channel-count default
    others = {k: v for k, v in hints.preprocess.items() if k in ("crop_pct", "interpolation")}
    preprocess = Preprocess.for_model(config, **({"mean": mean, "std": std} if fits else {}), **others)
    return WeightsDescription(config, preprocess, source, converted, hints.class_names, preset)


def _config_from_weights(converted: Converted, source, model, num_heads, src, hints: Hints,
                         model_must_fit: bool = True) -> Tuple[ViTConfig, Optional[str]]:
    """(config, the preset it was built on or None)."""
    fields = infer_config(converted.params)
    shape_fields = dict(fields)
    for name in ("image_size", "patch_size", "in_channels"):  # config.json's, where the shapes say nothing
        if name in hints.config and name not in fields:
            fields[name] = hints.config[name]
    if model is not None:
        base = get_config(model)
        conflicts = {k: (v, getattr(base, k, None)) for k, v in shape_fields.items()
                     if k not in ("num_classes", "image_size") and getattr(base, k, None) != v}
        if not conflicts:
            return dataclasses.replace(base, **fields), model
        if model_must_fit:
            raise CheckpointError(f"{src} does not hold a {model}: " + ", ".join(
                f"{k}={v} in the weights, {b} in the preset" for k, (v, b) in conflicts.items()))
    fmt = FORMATS[source]
    heads = num_heads or hints.config.get("num_heads") or converted.num_heads or STANDARD_HEADS.get(fields["embed_dim"])
    if heads is None:
        raise CheckpointError(f"the weights of {src} have width {fields['embed_dim']}, which has no standard "
                              f"head count; pass num_heads (convert.py --num_heads; train.py --model_override "
                              f"num_heads=N) or a preset with these shapes (--model)")
    if not (num_heads or hints.config.get("num_heads") or converted.num_heads):
        logger.info("num_heads=%d: the standard count for width %d (pass num_heads if yours differs)",
                    heads, fields["embed_dim"])
    numerics = {"norm_eps": hints.config.get("norm_eps", fmt.norm_eps),
                "gelu_approximate": hints.config.get("gelu_approximate", fmt.gelu_approximate)}
    return ViTConfig(num_heads=int(heads), **numerics, **fields), None


EXPORT_TARGETS = ("vit_ms",) + tuple(name for name, fmt in FORMATS.items() if fmt.export is not None)


def export_checkpoint(src, dst, to: str):
    """Write a vit_ms checkpoint's weights in another scheme's names: returns the path written.

    "timm": one `.safetensors` file in timm's names; "hf": a `save_pretrained`-style folder (model.safetensors,
    config.json with `id2label`, preprocessor_config.json) that `transformers.ViTForImageClassification.
    from_pretrained` loads. The tensors are the checkpoint's, bit for bit (q/k/v split out of qkv for HF).

    Args:
        src: a vit_ms checkpoint (with metadata), e.g. best.ckpt from train.py.
        dst: the file (timm) or folder (hf) to write.
        to: "timm" or "hf" (for "vit_ms" use `convert_checkpoint`).
    """
    if to not in FORMATS or FORMATS[to].export is None:
        raise CheckpointError(f"cannot export to {to!r}; choose one of {EXPORT_TARGETS}")
    params, meta = read_params(src)
    if meta is None:
        raise CheckpointError(f"{src} is not a vit_ms checkpoint; convert it first (python convert.py {src} "
                              f"model.ckpt), then export that")
    config, preprocess = config_from_metadata(meta)
    ours = convert(params, "vit_ms")  # leaves optimizer state out
    try:
        return FORMATS[to].export(ours, config, preprocess, meta.get("class_names"), dst)
    except ValueError as error:
        raise CheckpointError(f"cannot export {src} to {to}: {error}") from error


__all__ = ["STANDARD_HEADS", "EXPORT_TARGETS", "WeightsDescription", "describe_weights", "convert_checkpoint",
           "export_checkpoint"]
