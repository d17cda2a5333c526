"""Loading weights into a network: validate everything, then assign, so a bad file changes nothing.

`load_weights(net, path)` reads any supported file (`readers`), converts its names (`naming`), checks
every tensor against the net (dropping a head with another class count, resampling a position embedding
for another grid) and only then assigns. `load_model(path)` builds the ViT a vit_ms checkpoint describes.
`read_training_checkpoint(path)` is what training's `--resume` reads last.ckpt with: weights, optimizer
state and metadata, integrity-checked.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from .format import META_KEY, CheckpointError, config_from_metadata, integrity_checked
from .naming import Converted, convert_detailed, detect_source, infer_config, prefix_tokens, summarize_dropped
from .posembed import resample_pos_embed
from .readers import read_params

logger = logging.getLogger(__name__)


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
            text += f"; dropped {len(self.dropped)} ({summarize_dropped(self.dropped)})"
        if self.initialised:
            text += f"; kept the model's initial {', '.join(self.initialised)}"
        return text


NEW_HEAD = "a new head for the model's classes"  # why load_weights(new_head=True) leaves the head out
_HEAD = ("head.weight", "head.bias")


def load_weights(net, path, source: str = "auto", strict: bool = False, new_head: bool = False) -> LoadReport:
    """Load a weights file of any supported format and naming scheme into `net`, in place.

    Everything is checked before anything is assigned: on any error the net is left exactly as it was.
    Allowed differences (unless `strict`): a head with another class count is dropped with a warning
    (the model keeps its own head, as when fine-tuning), a headless checkpoint leaves the head as
    initialised, and a position embedding for another grid is resampled (`resample_pos_embed`). Any
    other mismatch (depth, width, unknown names, missing tensors) raises one CheckpointError listing
    every offending name and shape.

    Args:
        net: a `vit_ms.ViT` (or any Cell with our parameter names).
        path: a `.ckpt` (ours, the tutorial's, mindcv's), `.safetensors`, `.pth`/`.pt`/`.bin`, `.npz`
            file, or a Hugging Face `save_pretrained` folder.
        source: "auto" (detect from the names) or a key of `vit_ms.checkpoint.FORMATS`.
        strict: require an exact match: no head dropping, no resampling, nothing missing.
        new_head: leave the file's classifier (head.weight, head.bias) out whatever its shape, as fine-tuning
            onto other classes does: the model keeps its own head (vit_ms's: zero-initialised).
    """
    params, meta = read_params(path)
    return load_params(net, params, str(path), source, meta, strict, owned=True, new_head=new_head)


def load_params(net, params, path: str, source: str, meta, strict: bool, owned: bool = False,
                new_head: bool = False) -> LoadReport:
    """`load_weights` for tensors already read; `path` names them in messages; `owned` as for `assign`."""
    if source == "auto":
        source = detect_source(list(params) + ([META_KEY] if meta is not None else []))
    converted = convert_detailed(params, source)
    report, assignments = plan(net, converted, path, source, strict, new_head)
    report.metadata = meta
    assign(report, assignments, owned)
    return report


def load_model(path):
    """Build the ViT a vit_ms checkpoint describes and load its weights: returns (net, metadata).

    The weights go through the same validation as `load_weights`, strictly: every parameter must be
    present with the shape the metadata's config implies.

    Args:
        path: a checkpoint written by `save_checkpoint` (e.g. by train.py or convert.py).
    """
    from ..layers import weights_to_be_loaded
    from ..model import ViT  # checkpoint imports the model only to build one from metadata

    params, meta = read_params(path, verify=False)
    if meta is None:
        raise CheckpointError(
            f"{path} has no vit_ms metadata, so the model it holds is unknown. Either build the model "
            f"yourself and call vit_ms.load_weights(net, {str(path)!r}), or convert it once with "
            f"`python convert.py {path} converted.ckpt` and load that")
    with integrity_checked(path, params, meta):  # hashed on another core while the net is built
        try:
            config, _ = config_from_metadata(meta)
        except (ValueError, TypeError, KeyError) as error:
            raise CheckpointError(f"{path}: its metadata does not describe a model this vit_ms can build "
                                  f"({error})") from error
        with weights_to_be_loaded():  # strict loading overwrites every parameter: no random draws first
            net = ViT(config)
    load_params(net, params, str(path), "vit_ms", meta, strict=True, owned=True)
    return net, meta


def read_training_checkpoint(path, skip=("learning_rate",)):
    """Read a training checkpoint (last.ckpt) for `--resume`: ({name: ms.Parameter}, metadata).

    Weights and optimizer state (moments, global step, beta powers, loss scale) under the names
    `ms.load_param_into_net(train_network, ...)` expects, after the integrity check; raises
    CheckpointError naming the file for a damaged file or one without the metadata of a run.

    Args:
        path: the checkpoint, e.g. `output_dir/last.ckpt`.
        skip: names left out (the learning-rate table is rebuilt from the run's settings).
    """
    import mindspore as ms

    params, meta = read_params(path)
    if meta is None or "epoch" not in meta:
        raise CheckpointError(f"{path} is not a vit_ms training checkpoint (no epoch in its metadata); "
                              f"start without --resume or point --output_dir at the run")
    return {name: ms.Parameter(ms.Tensor(value), name=name) for name, value in params.items()
            if name not in skip}, meta


def assign(report: LoadReport, assignments, owned: bool = False):
    """Assign validated values (cast to each parameter's dtype) and log what differed.

    `owned`: the values were read for this load and nothing else holds them, so a parameter may take an
    array over instead of copying it, where no other value shares its memory and no cast is needed. A
    copy of ViT-B/16's 346 MB took ~0.2 s, most of it the kernel handing out fresh pages (README, round 32).
    """
    import mindspore as ms

    roots = [_root(value) for _, _, value in assignments]
    sharers = Counter(id(root) for root in roots)
    for (_, param, value), root in zip(assignments, roots):
        if (owned and sharers[id(root)] == 1 and root.flags.owndata and value.flags.c_contiguous
                and value.flags.aligned and value.flags.writeable
                and value.dtype == np.float32 and param.dtype == ms.float32):
            param.set_data(ms.Tensor.from_numpy(value))  # the Tensor keeps the array alive
        else:
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


def _root(value: np.ndarray) -> np.ndarray:
    """The array that owns `value`'s memory (or the last array before a non-NumPy owner)."""
    while isinstance(value.base, np.ndarray):
        value = value.base
    return value


def plan(net, converted: Converted, path: str, source: str, strict: bool, new_head: bool = False):
    """Check every tensor against the net; return (report, [(name, parameter, value)]) or raise.
    `new_head`: as for `load_weights`."""
    expected = {name: param for name, param in net.parameters_and_names()}
    problems = list(converted.problems)
    report = LoadReport(path=path, source=source, dropped=dict(converted.dropped))
    assignments = []
    values = dict(converted.params)

    head_w = values.get("head.weight")
    model_head = expected.get("head.weight")
    reason = NEW_HEAD if new_head else None
    if (reason is None and not strict and head_w is not None and model_head is not None and head_w.ndim == 2
            and head_w.shape[1] == model_head.shape[1] and head_w.shape[0] != model_head.shape[0]):
        reason = (f"head for {head_w.shape[0]} classes, the model has {model_head.shape[0]}: "
                  f"the model keeps its own head")
    for name in _HEAD if reason else ():
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
            resampled = _try_resample(value, model_shape, prefix_tokens(expected))
            if resampled is not None:
                value, grids = resampled
                report.resampled[name] = grids
        if value.shape != model_shape:
            problems.append(f"shape of {name}: checkpoint {_shape(value)}, model {model_shape}")
            continue
        assignments.append((name, param, value))

    # With new_head the model's own head is what is wanted: a file without one lacks nothing.
    missing = [name for name in expected if name not in values and name not in report.dropped
               and not (new_head and name in _HEAD)]
    head_only = set(missing) <= set(_HEAD)
    if missing and head_only and not strict:
        report.initialised = missing
    else:
        problems += [f"missing {name}: the model expects {tuple(expected[name].shape)}" for name in missing]

    if problems:
        raise CheckpointError(_mismatch_message(net, converted.params, path, source, problems))
    report.loaded = [name for name, _, _ in assignments]
    return report, assignments


def _shape(value) -> str:
    return str(tuple(np.shape(value)))


def _try_resample(value: np.ndarray, model_shape, prefix: int):
    if value.ndim != 3 or len(model_shape) != 3 or value.shape[0] != 1 or value.shape[2] != model_shape[2]:
        return None
    old, new = value.shape[1] - prefix, model_shape[1] - prefix
    if old <= 0 or new <= 0 or math.isqrt(old) ** 2 != old or math.isqrt(new) ** 2 != new:
        return None
    old_grid, new_grid = math.isqrt(old), math.isqrt(new)
    return (resample_pos_embed(value, new_grid, num_prefix_tokens=prefix),
            ((old_grid, old_grid), (new_grid, new_grid)))


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
        differ = {k: v for k, v in found.items()
                  if getattr(config, k, None) != v and k not in ("num_classes", "image_size")}
        if differ:
            text += ("\nThe checkpoint holds a model with " + ", ".join(f"{k}={v}" for k, v in differ.items())
                     + "; the model has " + ", ".join(f"{k}={getattr(config, k, None)}" for k in differ)
                     + ". Build the model with the checkpoint's config, e.g. create_model(preset, "
                     + ", ".join(f"{k}={v!r}" for k, v in differ.items()) + ").")
    return text


__all__ = ["LoadReport", "load_weights", "load_model", "load_params", "read_training_checkpoint"]
