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
    tokens = d + (config.num_patches + 1) * d  # CLS token + position embedding
    block = (2 * d  # norm1
             + d * 3 * d + 3 * d  # fused qkv
             + d * d + d  # output projection
             + 2 * d  # norm2
             + d * config.mlp_dim + config.mlp_dim  # fc1
             + config.mlp_dim * d + d)  # fc2
    head = 2 * d + d * config.num_classes + config.num_classes  # final norm + classifier
    return patch_embed + tokens + config.depth * block + head


@dataclass(frozen=True)
class Preprocess:
    """How images are prepared for a model; stored in every checkpoint so train, eval and infer agree."""

    image_size: int = 224  # side of the square crop fed to the model
    mean: Tuple[float, float, float] = IMAGENET_MEAN  # per-channel mean, [0, 1] units
    std: Tuple[float, float, float] = IMAGENET_STD  # per-channel std, [0, 1] units
    crop_pct: float = 224 / 256  # eval: resize the short side to image_size / crop_pct, then center crop
    interpolation: str = "bilinear"  # resize filter

    def __post_init__(self):
        if self.image_size <= 0:
            raise ValueError(f"Preprocess.image_size must be positive, got {self.image_size!r}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"Preprocess.crop_pct must be in (0, 1], got {self.crop_pct!r}")
        if not len(self.mean) == len(self.std) >= 1 or min(self.std) <= 0:
            raise ValueError("Preprocess.mean and Preprocess.std need one value per channel (as many means as "
                             "stds), std positive")

    @property
    def resize_size(self) -> int:
        """Short side before the eval center crop (256 for a 224 crop)."""
        return int(round(self.image_size / self.crop_pct))

    @classmethod
    def for_model(cls, config: ViTConfig, **overrides) -> "Preprocess":
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


# ---------------------------------------------------------------------------------------------------------
# Training settings and named recipes (used by vit_ms.training and train.py)
# ---------------------------------------------------------------------------------------------------------

DATASETS = ("sample", "imagenet_subset")
DEVICE_TARGETS = ("CPU", "GPU", "Ascend")
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("cosine_epoch", "warmup_cosine")
AMP_LEVELS = ("auto", "O0", "O1", "O2", "O3")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of one training run. `train.py` maps its flags onto these fields, a recipe in
    `RECIPES` supplies their defaults, and the resolved values are saved as config.json beside the
    checkpoints."""

    recipe: str = "scratch"  # the RECIPES entry these settings started from
    # data
    dataset: str = "sample"  # "sample": the embedded offline set; "imagenet_subset": the tutorial's download
    data_path: str = ""  # ImageFolder root holding train/ and val/; empty: the dataset's default location
    augment: bool = True  # train with random-resized-crop + flip (the tutorial's); False: the eval transform
    crop_min_scale: float = 0.08  # smallest area fraction of the random training crop (the tutorial's 0.08)
    num_workers: int = 2  # parallel decode workers per pipeline
    # model
    model: str = "vit_ti_16"  # a PRESETS name; num_classes always comes from the data's class folders
    image_size: int = 224  # input side in pixels, replacing the preset's
    model_overrides: dict = dataclasses.field(default_factory=dict)  # other ViTConfig fields, e.g. {"depth": 4}
    drop_path_rate: float = 0.1  # stochastic depth at the last block (rising linearly from 0)
    pretrained: str = ""  # start weights: a checkpoint path or a named source ("vit_b_16_224"); empty: random
    # optimisation
    epochs: int = 10  # passes over the train split
    batch_size: int = 16  # images per step on each device
    optimizer: str = "adamw"  # "adam": nn.Adam; "adamw": nn.AdamWeightDecay, no decay on norms/biases/CLS/pos
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 0.0  # learning rate the cosine ends at
    lr_schedule: str = "warmup_cosine"  # "cosine_epoch": nn.cosine_decay_lr, one value per epoch (the
    #                                     tutorial's); "warmup_cosine": linear warmup, then a per-step cosine
    warmup_epochs: int = 0  # epochs of linear warmup ("warmup_cosine" only)
    beta1: float = 0.9  # Adam first-moment decay
    beta2: float = 0.999  # Adam second-moment decay
    eps: float = 1e-8  # Adam denominator epsilon
    weight_decay: float = 0.05  # decoupled weight decay on matrices only ("adamw"); L2 on all ("adam")
    label_smoothing: float = 0.1  # target on = 1 - s, off = s / (C - 1), as in the tutorial
    # runtime
    device_target: str = "CPU"  # "CPU", "GPU" or "Ascend", set with ms.set_device
    mode: str = "graph"  # "graph" (compiled, fast) or "pynative" (eager, for debugging)
    amp_level: str = "auto"  # "auto": O2 on Ascend, O0 elsewhere; or an explicit O0..O3
    dataset_sink_mode: "bool | None" = None  # None: on for Ascend (its fast path), off elsewhere
    seed: int = 0  # one seed for weights, shuffling and augmentation; the same on every rank
    output_dir: str = "outputs/train"  # checkpoints, metrics.jsonl, train.log, curves, config.json
    resume: bool = False  # continue from output_dir/last.ckpt
    distributed: bool = False  # data parallel under msrun: one process per device
    progress_bar: bool = True  # a tqdm bar per epoch with loss, learning rate and images/s
    followups: bool = False  # after training, evaluate, infer and export best.ckpt (the tutorial's last steps)
    debug_dir: str = ""  # test hook: each rank records the batches it saw and its weights here

    def __post_init__(self):
        choices = {"dataset": DATASETS, "device_target": DEVICE_TARGETS, "optimizer": OPTIMIZERS,
                   "lr_schedule": LR_SCHEDULES, "amp_level": AMP_LEVELS, "mode": ("graph", "pynative")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "image_size", "num_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if not 0 <= self.warmup_epochs < self.epochs or self.warmup_epochs and self.lr_schedule != "warmup_cosine":
            raise ValueError(f"TrainConfig.warmup_epochs ({self.warmup_epochs}) must be below epochs "
                             f"({self.epochs}), and is only used by lr_schedule 'warmup_cosine'")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"TrainConfig needs lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if not 0.0 < self.crop_min_scale <= 1.0:
            raise ValueError(f"TrainConfig.crop_min_scale must be in (0, 1], got {self.crop_min_scale!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"TrainConfig.label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        known = {f.name for f in dataclasses.fields(ViTConfig)} - {"num_classes", "image_size", "drop_path_rate"}
        unknown = sorted(set(self.model_overrides) - known)
        if unknown:
            raise ValueError(f"TrainConfig.model_overrides has unknown or reserved field(s) {unknown}; allowed: "
                             f"{sorted(known)} (num_classes comes from the data; image_size and drop_path_rate "
                             f"are TrainConfig fields)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a dict (e.g. a saved config.json), rejecting unknown keys by name."""
        check_fields(cls, values)
        return cls(**values)


RECIPES = {
    # The default `python train.py`: a small ViT from scratch on the embedded sample set, sized so that
    # two CPU cores reach >= 90% val top-1 in a few minutes. AdamW, warmup + cosine, label smoothing and
    # stochastic depth, as DeiT trains ViTs from scratch.
    "scratch": TrainConfig(
        recipe="scratch", dataset="sample", augment=True, crop_min_scale=0.5, model="vit_ti_16", image_size=32,
        model_overrides={"patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_dim": 192},
        drop_path_rate=0.05, epochs=15, batch_size=32, optimizer="adamw", lr=1e-3, min_lr=1e-5,
        lr_schedule="warmup_cosine", warmup_epochs=1, weight_decay=0.05, label_smoothing=0.1,
        output_dir="outputs/train"),
    # The MindSpore tutorial's fine-tuning, exactly: pretrained ViT-B/16, nn.Adam(lr, beta1=0.9),
    # nn.cosine_decay_lr(0, 5e-5) over 10 epochs stepping once per epoch, label smoothing 0.1, batch 16,
    # on the ImageNet subset at 224 pixels; then evaluate, infer and export.
    "tutorial": TrainConfig(
        recipe="tutorial", dataset="imagenet_subset", augment=True, crop_min_scale=0.08, model="tutorial",
        image_size=224, model_overrides={},
        drop_path_rate=0.0, pretrained="vit_b_16_224", epochs=10, batch_size=16, optimizer="adam", lr=5e-5,
        min_lr=0.0, lr_schedule="cosine_epoch", warmup_epochs=0, beta1=0.9, beta2=0.999, eps=1e-8,
        weight_decay=0.0, label_smoothing=0.1, output_dir="outputs/tutorial", followups=True),
}


def get_train_config(recipe: str = "scratch", **overrides) -> TrainConfig:
    """The named recipe's settings with `overrides` (TrainConfig field names) applied.

    Args:
        recipe: a key of `RECIPES`.
        **overrides: field values replacing the recipe's, e.g. `epochs=3, lr=1e-4`.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    check_fields(TrainConfig, overrides)
    return dataclasses.replace(RECIPES[recipe], **overrides)


__all__ += ["TrainConfig", "RECIPES", "get_train_config"]
