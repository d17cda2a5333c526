"""Hugging Face transformers ViT (`ViTForImageClassification`, `ViTModel`), both ways.

Names checked against transformers 5.23 (`models/vit/modeling_vit.py` and what its `save_pretrained`
writes): the hub layout `[vit.]encoder.layer.N.attention.attention.{query,key,value}.*`,
`attention.output.dense.*`, `intermediate.dense.*`, `output.dense.*`, `layernorm_before/after.*`,
`[vit.]layernorm.*`, `classifier.*` (ViTForImageClassification prefixes the backbone with `vit.`); and the
in-memory layout of transformers >= 5 (`layers.N.attention.{q,k,v,o}_proj.*`, `layers.N.mlp.fc1/fc2.*`),
which a `torch.save(model.state_dict())` file holds. Separate q/k/v matrices are stacked into our fused
qkv (rows q, k, v, each head-major, as timm's). ViTModel's `pooler.*` (a tanh layer no classifier uses)
and `mask_token` are left out. `config.json` beside the weights gives heads, epsilon (transformers'
default is 1e-12), GELU form, image size, channels and the labels (`id2label`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..format import CheckpointError
from ..readers import companion_config
from . import Hints, WeightFormat
from ._rules import LN, Converted, shape, write_safetensors

# (pattern over the name without "vit.", our name template) for tensors that map one to one.
_ONE_TO_ONE = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", "patch_embed.proj.{0}"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", "blocks.{0}.attn.proj.{1}"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", "blocks.{0}.mlp.fc1.{1}"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", "blocks.{0}.mlp.fc2.{1}"),
    (r"layers\.(\d+)\.attention\.o_proj\.(weight|bias)", "blocks.{0}.attn.proj.{1}"),
    (r"layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", "blocks.{0}.mlp.{1}.{2}"),
]
_NORMS = [
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_before\.(weight|bias)", "blocks.{0}.norm1"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_after\.(weight|bias)", "blocks.{0}.norm2"),
    (r"layernorm\.(weight|bias)", "norm"),
]
_QKV = re.compile(r"(?:encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)"
                  r"|layers\.(\d+)\.attention\.(q|k|v)_proj)\.(weight|bias)")
_PART = {"q": "query", "k": "key", "v": "value"}
_DROP = {r"pooler\.dense\.(weight|bias)": "ViTModel's pooler (tanh layer), which no classifier here uses",
         r"embeddings\.mask_token": "ViTModel's mask token (masked image modelling only)"}


def recognise(names) -> bool:
    return any(n.startswith(("vit.embeddings.", "embeddings.patch_embeddings.")) for n in names)


def to_vit_ms(params) -> Converted:
    out = Converted({})
    qkv = {}  # (block, kind) -> {part: array}
    for name, value in params.items():
        if name in ("classifier.weight", "classifier.bias"):
            out.params["head." + name.split(".")[1]] = value
            continue
        short = name[len("vit."):] if name.startswith("vit.") else name
        if _convert_one(short, value, out):
            continue
        match = _QKV.fullmatch(short)
        if match:
            block = match.group(1) or match.group(3)
            part = match.group(2) or _PART[match.group(4)]
            qkv.setdefault((int(block), match.group(5)), {})[part] = value
            continue
        reason = next((why for pattern, why in _DROP.items() if re.fullmatch(pattern, short)), None)
        if reason:
            out.dropped[name] = reason
        else:
            out.problems.append(f"unknown name {name} {shape(value)}")
    for (block, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            out.problems.append(f"incomplete attention in layer {block}: {kind} of {sorted(parts)} only; "
                                f"needs query, key and value")
            continue
        out.params[f"blocks.{block}.attn.qkv.{kind}"] = np.concatenate(
            [parts["query"], parts["key"], parts["value"]], axis=0)
    return out


def _convert_one(short, value, out) -> bool:
    for pattern, target in _ONE_TO_ONE:
        match = re.fullmatch(pattern, short)
        if match:
            out.params[target.format(*match.groups())] = value
            return True
    for pattern, target in _NORMS:
        match = re.fullmatch(pattern, short)
        if match:
            *index, kind = match.groups()
            out.params[target.format(*index) + "." + LN[kind]] = value
            return True
    return False


def from_vit_ms(params, with_head: bool = True):
    """Our names -> the hub layout of ViTForImageClassification (what `from_pretrained` reads)."""
    out = {}
    for name, value in params.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma|beta)", name)
        kind = {"gamma": "weight", "beta": "bias"}.get(name.rsplit(".", 1)[-1], name.rsplit(".", 1)[-1])
        if m:
            i, layer = m.group(1), m.group(2)
            base = f"vit.encoder.layer.{i}."
            if layer == "attn.qkv":
                for part, chunk in zip(("query", "key", "value"), np.split(value, 3, axis=0)):
                    out[f"{base}attention.attention.{part}.{kind}"] = chunk
                continue
            target = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
                      "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}[layer]
            out[f"{base}{target}.{kind}"] = value
        elif name == "cls_token":
            out["vit.embeddings.cls_token"] = value
        elif name == "pos_embed":
            out["vit.embeddings.position_embeddings"] = value
        elif name.startswith("patch_embed.proj."):
            out[f"vit.embeddings.patch_embeddings.projection.{kind}"] = value
        elif name.startswith("norm."):
            out[f"vit.layernorm.{kind}"] = value
        elif name.startswith("head.") and with_head:
            out[f"classifier.{kind}"] = value
        else:
            raise ValueError(f"{name} has no place in a transformers ViT (it has no fc_norm or average pooling)")
    return out


def hf_config(config, class_names=None) -> dict:
    """The transformers `config.json` of a ViTForImageClassification with our architecture."""
    names = list(class_names) if class_names else [f"LABEL_{i}" for i in range(config.num_classes)]
    return {
        "architectures": ["ViTForImageClassification"], "model_type": "vit",
        "hidden_size": config.embed_dim, "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads, "intermediate_size": config.mlp_dim,
        # transformers' "gelu" is exact (erf); "gelu_pytorch_tanh" is the tanh form.
        "hidden_act": "gelu_pytorch_tanh" if config.gelu_approximate else "gelu",
        "layer_norm_eps": config.norm_eps, "image_size": config.image_size, "patch_size": config.patch_size,
        "num_channels": config.in_channels, "qkv_bias": True, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "encoder_stride": config.patch_size,
        "id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)},
    }


def export(params, config, preprocess, class_names, dst):
    """Write a `save_pretrained`-style folder: model.safetensors, config.json, preprocessor_config.json."""
    from ...files import write_text_atomic

    if getattr(config, "global_pool", "token") != "token" or not getattr(config, "class_token", True):
        raise ValueError("transformers' ViT classifies from the CLS token; a model with average pooling or "
                         "without a class token cannot be exported to it (export to timm instead)")
    dst = Path(dst)
    write_safetensors(from_vit_ms(params), dst / "model.safetensors", metadata={"format": "pt"})
    write_text_atomic(dst / "config.json", json.dumps(hf_config(config, class_names), indent=2))
    # ViTImageProcessor settings, so transformers' pipelines preprocess as this model expects (no crop:
    # the processor resizes straight to image_size).
    processor = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "do_rescale": True,
                 "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(preprocess.mean),
                 "image_std": list(preprocess.std),
                 "resample": {"nearest": 0, "lanczos": 1, "bicubic": 3}.get(preprocess.interpolation, 2),
                 "size": {"height": config.image_size, "width": config.image_size}}
    write_text_atomic(dst / "preprocessor_config.json", json.dumps(processor, indent=2))
    return dst


def read_hints(path) -> Hints:
    """What `config.json` (and `preprocessor_config.json`) beside the weights say."""
    hints = Hints()
    config = companion_config(path)
    if config is None:
        return hints
    fields = {"num_heads": "num_attention_heads", "norm_eps": "layer_norm_eps", "image_size": "image_size",
              "patch_size": "patch_size", "in_channels": "num_channels"}
    hints.config = {ours: config[theirs] for ours, theirs in fields.items() if theirs in config}
    if "hidden_act" in config:
        hints.config["gelu_approximate"] = config["hidden_act"] in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
    labels = config.get("id2label") or {}
    names = [labels[k] for k in sorted(labels, key=int)] if labels else None
    if names and not all(re.fullmatch(r"LABEL_\d+", n) for n in names):  # transformers' placeholders
        hints.class_names = names
    # ViTImageProcessor resizes the whole image to the model's size, without a center crop: the nearest
    # of our eval transforms is crop_pct 1.0 (short side to image_size, then the central square).
    hints.preprocess = {"crop_pct": 1.0}
    processor_file = (Path(path) if Path(path).is_dir() else Path(path).parent) / "preprocessor_config.json"
    if processor_file.is_file():
        try:
            processor = json.loads(processor_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"cannot read {processor_file}: {error}") from error
        if processor.get("image_mean") and processor.get("image_std"):
            hints.preprocess.update(mean=tuple(processor["image_mean"]), std=tuple(processor["image_std"]))
        # PIL's resample codes, as transformers stores them.
        resample = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}.get(processor.get("resample"))
        if resample:
            hints.preprocess["interpolation"] = resample
    return hints


FORMAT = WeightFormat(
    name="hf", description="Hugging Face transformers ViTForImageClassification / ViTModel "
                           "(save_pretrained folder, model.safetensors, pytorch_model.bin)",
    detected_by="`vit.embeddings.*` or `embeddings.patch_embeddings.*`; config.json beside it read when present",
    recognise=recognise, to_vit_ms=to_vit_ms, export=export,
    # transformers' ViTConfig defaults; ViTImageProcessor normalises with 0.5 / 0.5.
    norm_eps=1e-12, gelu_approximate=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), read_hints=read_hints)
