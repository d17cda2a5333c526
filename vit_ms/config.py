"""Model configuration: the `ViTConfig` dataclass, the paper's variants as named presets, and the
preprocessing that travels with a model.

Variants follow Table 1 of Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image
Recognition at Scale" (ICLR 2021), with Ti and S from DeiT (Touvron et al., 2021). Customise a preset
with `dataclasses.replace(PRESETS["vit_b_16"], num_classes=10)` or `create_model("vit_b_16",
num_classes=10)`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Tuple

# ImageNet statistics in [0, 1] units; the pipelines scale them to [0, 255] for `Normalize`.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Resize filters a checkpoint may ask for (PIL / MindSpore names).
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area", "lanczos")


def check_fields(cls, keys) -> None:
    """Raise ValueError naming any of `keys` that is not a field of the dataclass `cls`."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of one Vision Transformer. Field names are a public contract (checkpoints store them)."""

    image_size: int = 224  # input side in pixels (square images)
    patch_size: int = 16  # side of one patch; image_size must be a multiple of it
    in_channels: int = 3  # colour channels of the input
    num_classes: int = 1000  # width of the classification head
    embed_dim: int = 768  # token width D ("hidden size")
    depth: int = 12  # number of encoder blocks L
    num_heads: int = 12  # attention heads; embed_dim must be a multiple of it
    mlp_dim: int = 3072  # hidden width of the feed-forward block
    dropout: float = 0.0  # dropout after embeddings, in the MLP and before the head
    attention_dropout: float = 0.0  # dropout on the attention probabilities
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly from 0 to this at the last block
    norm_eps: float = 1e-6  # LayerNorm epsilon (JAX/timm use 1e-6, MindSpore's default is 1e-7)
    gelu_approximate: bool = False  # True: tanh GELU (MindSpore's nn.GELU default); False: exact erf
    # "token": the head reads the CLS token after the final norm (the paper); "avg": the mean of the patch
    # tokens, normalised after pooling by `fc_norm` while the final `norm` is dropped (timm 1.0.31
    # models/vision_transformer.py: `use_fc_norm = global_pool in ('avg', ...)`, `self.norm = ... if not
    # use_fc_norm else nn.Identity()`).
    global_pool: str = "token"
    # A CLS token in front of the patches; without it the position embedding covers the patches only
    # (timm: `embed_len = num_patches + num_prefix_tokens`). global_pool="token" needs it.
    class_token: bool = True

    def __post_init__(self):
        for name in ("image_size", "patch_size", "in_channels", "num_classes", "embed_dim", "depth",
                     "num_heads", "mlp_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ViTConfig.{name} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig.image_size ({self.image_size}) must be divisible by "
                             f"ViTConfig.patch_size ({self.patch_size})")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"ViTConfig.embed_dim ({self.embed_dim}) must be divisible by "
                             f"ViTConfig.num_heads ({self.num_heads})")
        for name in ("dropout", "attention_dropout", "drop_path_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"ViTConfig.{name} must be in [0, 1), got {value!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"ViTConfig.norm_eps must be positive, got {self.norm_eps!r}")
        if not isinstance(self.gelu_approximate, bool):
            raise ValueError(f"ViTConfig.gelu_approximate must be a bool, got {self.gelu_approximate!r}")
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"ViTConfig.global_pool must be 'token' or 'avg', got {self.global_pool!r}")
        if not isinstance(self.class_token, bool):
            raise ValueError(f"ViTConfig.class_token must be a bool, got {self.class_token!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("ViTConfig.global_pool='token' needs ViTConfig.class_token=True; "
                             "use global_pool='avg' for a model without a class token")

    @property
    def grid_size(self) -> int:
        """Patches along one side of the image."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ViTConfig":
        """Build from a dict (e.g. checkpoint metadata), rejecting unknown keys by name."""
        check_fields(cls, values)
        return cls(**values)


def _variant(width: int, depth: int, heads: int, mlp: int, patch: int) -> ViTConfig:
    return ViTConfig(patch_size=patch, embed_dim=width, depth=depth, num_heads=heads, mlp_dim=mlp)


# Table 1 of the paper (B, L, H) and DeiT (Ti, S): width, depth, heads, MLP width, patch size.
PRESETS = {
    "vit_ti_16": _variant(192, 12, 3, 768, 16),
    "vit_s_16": _variant(384, 12, 6, 1536, 16),
    "vit_s_32": _variant(384, 12, 6, 1536, 32),
    "vit_b_16": _variant(768, 12, 12, 3072, 16),
    "vit_b_32": _variant(768, 12, 12, 3072, 32),
    "vit_l_16": _variant(1024, 24, 16, 4096, 16),
    "vit_l_32": _variant(1024, 24, 16, 4096, 32),
    "vit_h_14": _variant(1280, 32, 16, 5120, 14),
}
# The MindSpore tutorial's ViT-B/16: MindSpore's default tanh GELU and LayerNorm epsilon, so that its
# pretrained vit_b_16_224.ckpt reproduces the tutorial's numbers exactly.
PRESETS["tutorial"] = dataclasses.replace(PRESETS["vit_b_16"], norm_eps=1e-7, gelu_approximate=True)


def get_config(name_or_config, **overrides) -> ViTConfig:
    """Resolve a preset name (or a `ViTConfig`) and apply field overrides."""
    if isinstance(name_or_config, ViTConfig):
        config = name_or_config
    elif name_or_config in PRESETS:
        config = PRESETS[name_or_config]
    else:
        raise ValueError(f"unknown model preset {name_or_config!r}; choose one of {sorted(PRESETS)}")
    check_fields(ViTConfig, overrides)
    return dataclasses.replace(config, **overrides)


def count_parameters(config: ViTConfig) -> int:
    """Number of trainable parameters, computed from the config alone (no tensors allocated)."""
    d, p, c = config.embed_dim, config.patch_size, config.in_channels
    patch_embed = c * p * p * d + d
    prefix = 1 if config.class_token else 0
    tokens = prefix * d + (config.num_patches + prefix) * d  # CLS token + position embedding
    block = (2 * d  # norm1
             + d * 3 * d + 3 * d  # fused qkv
             + d * d + d  # output projection
             + 2 * d  # norm2
             + d * config.mlp_dim + config.mlp_dim  # fc1
             + config.mlp_dim * d + d)  # fc2
    head = 2 * d + d * config.num_classes + config.num_classes  # final norm (or fc_norm) + classifier
    return patch_embed + tokens + config.depth * block + head


@dataclass(frozen=True)
class Preprocess:
    """How images are prepared for a model; stored in every checkpoint so train, eval and infer agree."""

    image_size: int = 224  # side of the square crop fed to the model
    mean: Tuple[float, ...] = IMAGENET_MEAN  # per-channel mean, [0, 1] units, one value per input channel
    std: Tuple[float, ...] = IMAGENET_STD  # per-channel std, [0, 1] units, one value per input channel
    crop_pct: float = 224 / 256  # eval: resize the short side to image_size / crop_pct, then center crop
    interpolation: str = "bilinear"  # resize filter

    def __post_init__(self):
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size <= 0:
            raise ValueError(f"Preprocess.image_size must be a positive integer, got {self.image_size!r}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"Preprocess.crop_pct must be in (0, 1], got {self.crop_pct!r}")
        if not self.mean or len(self.mean) != len(self.std):
            raise ValueError(f"Preprocess.mean and Preprocess.std need one value per input channel, the same "
                             f"number each; got {len(self.mean)} mean and {len(self.std)} std value(s)")
        if min(self.std) <= 0:
            raise ValueError(f"Preprocess.std values must be positive, got {tuple(self.std)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"Preprocess.interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        # Stored as tuples whatever was passed (lists from JSON, NumPy arrays), so instances compare equal.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def channels(self) -> int:
        return len(self.mean)

    @property
    def resize_size(self) -> int:
        """Short side before the eval center crop (256 for a 224 crop)."""
        return int(round(self.image_size / self.crop_pct))

    @classmethod
    def for_model(cls, config: ViTConfig, **overrides) -> "Preprocess":
        """The default preprocessing of a model: ImageNet statistics for RGB; for another channel count the
        channel average of ImageNet's, once per channel (a grayscale model gets (0.449,), (0.226,))."""
        if config.in_channels != len(IMAGENET_MEAN) and "mean" not in overrides:
            overrides = {"mean": (round(sum(IMAGENET_MEAN) / 3, 3),) * config.in_channels,
                         "std": (round(sum(IMAGENET_STD) / 3, 3),) * config.in_channels, **overrides}
        return cls(image_size=config.image_size, **overrides)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "Preprocess":
        check_fields(cls, values)
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**values)


__all__ = ["ViTConfig", "PRESETS", "Preprocess", "get_config", "count_parameters", "check_fields",
           "IMAGENET_MEAN", "IMAGENET_STD"]


def __getattr__(name):
    # TrainConfig and its recipes moved to vit_ms.training.config; the old import path keeps working
    # without importing the training package (or MindSpore) for users of ViTConfig alone.
    if name in ("TrainConfig", "RECIPES", "get_train_config"):
        from .training import config as training_config

        return getattr(training_config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
