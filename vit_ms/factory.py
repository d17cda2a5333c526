"""`vit_ms.create_model`: a ViT from a preset, optionally with pretrained weights.

The model itself (`vit_ms.model`) knows nothing of checkpoints; this is the one place where a model name
and a weights name meet, as timm's `create_model(name, pretrained=True)` and torchvision's
`vit_b_16(weights=...)` do.
"""
from __future__ import annotations

from typing import Optional


def create_model(name_or_config, *, pretrained: Optional[str] = None, fast: Optional[bool] = None,
                 **overrides):
    """Build a ViT, with pretrained weights if asked.

    Args:
        name_or_config: a key of `vit_ms.PRESETS` (e.g. "vit_b_16") or a `ViTConfig`. With a zoo name in
            `pretrained`, None takes the zoo entry's architecture.
        pretrained: a `vit_ms.checkpoint.ZOO` name (downloaded once into `$VIT_MS_HOME/weights`, hash
            verified; the entry brings its architecture, see `ZOO[name].preprocess()` for its
            preprocessing), or a weights file any `load_weights` reader takes. A head of another class
            count (`num_classes=...`) is replaced, a position embedding of another grid resampled.
        fast: None lets `vit_ms.layers.use_fused_kernels` decide; True/False force.
        **overrides: ViTConfig fields, e.g. `num_classes=10`.
    """
    from . import model

    if pretrained is None:
        return model.create_model(name_or_config, fast=fast, **overrides)
    from .checkpoint import ZOO, create_pretrained, load_weights, resolve_pretrained

    entry = ZOO.get(str(pretrained))
    if entry is not None:
        if name_or_config not in (None, entry.preset):
            raise ValueError(f"pretrained weights {pretrained!r} are a {entry.preset}, not {name_or_config!r}; "
                             f"pass create_model({entry.preset!r}, pretrained={pretrained!r}) or "
                             f"create_model(None, pretrained={pretrained!r})")
        return create_pretrained(str(pretrained), fast=fast, **overrides)
    if name_or_config is None:
        raise ValueError(f"{pretrained!r} is not a zoo name, so name the architecture: create_model('vit_b_16', "
                         f"pretrained=...); zoo names: {sorted(ZOO)}")
    net = model.create_model(name_or_config, fast=fast, **overrides)
    load_weights(net, resolve_pretrained(pretrained))
    return net


__all__ = ["create_model"]
