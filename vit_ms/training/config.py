"""Training settings: the `TrainConfig` dataclass, the named recipes, and how a run's settings are resolved
from a recipe, a JSON file, a resumed run's config.json and command-line flags.

Imports nothing heavy (no MindSpore), so `train.py --help` and `--dry_run` answer at once.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import PRESETS, ViTConfig, check_fields

logger = logging.getLogger(__name__)

DATASETS = ("sample", "imagenet_subset")
DEVICE_TARGETS = ("CPU", "GPU", "Ascend")
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("cosine_epoch", "warmup_cosine")
AMP_LEVELS = ("auto", "O0", "O1", "O2", "O3")
DATA_CHECKS = ("full", "header", "none")
CONFIG_FILE = "config.json"  # the resolved TrainConfig, in every run folder


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of one training run. `train.py` maps its flags onto these fields, a recipe in
    `RECIPES` supplies their defaults, and the resolved values are saved as config.json beside the
    checkpoints."""

    recipe: str = "scratch"  # the RECIPES entry these settings started from
    # data
    dataset: str = "sample"  # "sample": the embedded offline set; "imagenet_subset": the tutorial's download
    data_path: str = ""  # ImageFolder root holding train/ and val/; empty: the dataset's default location
    data_check: str = "full"  # image check before the first epoch: "full" decode, "header" only, or "none"
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
    output_dir: str = "outputs/train"  # the run folder: checkpoints, metrics.jsonl, train.log, curves, config.json
    resume: bool = False  # continue the run in output_dir from its last.ckpt
    overwrite: bool = False  # replace the run that output_dir holds (its files are deleted first)
    distributed: bool = False  # data parallel under msrun: one process per device
    progress_bar: bool = True  # a tqdm bar per epoch (drawn only when stderr is a terminal)
    followups: bool = False  # after training, evaluate, infer and export best.ckpt (the tutorial's last steps)

    def __post_init__(self):
        choices = {"dataset": DATASETS, "device_target": DEVICE_TARGETS, "optimizer": OPTIMIZERS,
                   "lr_schedule": LR_SCHEDULES, "amp_level": AMP_LEVELS, "mode": ("graph", "pynative"),
                   "data_check": DATA_CHECKS}
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
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in output_dir and --overwrite deletes it: give one")
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

    A warmup the recipe sets (not one in `overrides`) that would not fit a shorter run is shortened to
    `epochs - 1`, with an INFO line: a default the user never typed must not reject a flag they did.

    Args:
        recipe: a key of `RECIPES`.
        **overrides: field values replacing the recipe's, e.g. `epochs=3, lr=1e-4`.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    return _replace(RECIPES[recipe], overrides)


def _replace(cfg: TrainConfig, overrides: dict) -> TrainConfig:
    check_fields(TrainConfig, overrides)
    epochs = overrides.get("epochs", cfg.epochs)
    if "warmup_epochs" not in overrides and isinstance(epochs, int) and 0 < epochs <= cfg.warmup_epochs:
        logger.info("warmup shortened from the recipe's %d epoch(s) to %d to fit --epochs %d",
                    cfg.warmup_epochs, epochs - 1, epochs)
        overrides = dict(overrides, warmup_epochs=epochs - 1)
    return dataclasses.replace(cfg, **overrides)


def resolve_train_config(recipe: Optional[str] = None, config_file=None, **overrides) -> TrainConfig:
    """The settings of a run, each layer overriding the one before:

    1. the recipe (`RECIPES`, default "scratch");
    2. a JSON file of TrainConfig fields (`config_file`);
    3. when `resume` is set, the config.json that run saved in its output_dir (so a resumed run keeps
       its own settings);
    4. `overrides`, e.g. the flags given on the command line.

    `model_overrides` are merged into the recipe's; choosing another `model` instead drops the recipe's
    `model_overrides` and takes the preset's image size, unless those are given too. Unknown keys raise
    ValueError at every layer.

    Args:
        recipe: a key of `RECIPES`.
        config_file: a JSON object of TrainConfig fields.
        **overrides: TrainConfig fields.
    """
    cfg = get_train_config(recipe or "scratch")
    if config_file:
        cfg = _replace(cfg, json.loads(Path(config_file).read_text(encoding="utf-8")))
    if overrides.get("resume"):
        saved = Path(overrides.get("output_dir", cfg.output_dir)).expanduser() / CONFIG_FILE
        if saved.is_file():
            values = json.loads(saved.read_text(encoding="utf-8"))
            values.pop("debug_dir", None)  # a test hook of earlier versions, no longer a setting
            cfg = TrainConfig.from_dict(values)
            # A resumed run is never an overwrite, whatever the saved run was started with.
            cfg = dataclasses.replace(cfg, overwrite=False)
    if "model_overrides" in overrides and "model" not in overrides:
        overrides["model_overrides"] = {**cfg.model_overrides, **overrides["model_overrides"]}
    if "model" in overrides:
        if overrides["model"] not in PRESETS:
            raise ValueError(f"unknown model preset {overrides['model']!r}; choose one of {sorted(PRESETS)}")
        overrides.setdefault("model_overrides", {})
        overrides.setdefault("image_size", PRESETS[overrides["model"]].image_size)
    return _replace(cfg, overrides)


__all__ = ["TrainConfig", "RECIPES", "get_train_config", "resolve_train_config", "CONFIG_FILE", "DATA_CHECKS"]
