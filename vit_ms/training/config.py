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
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("cosine_epoch", "warmup_cosine")
AMP_LEVELS = ("auto", "O0", "O1", "O2", "O3")
DATA_CHECKS = ("full", "header", "none")
AUTO_AUGMENT_POLICIES = ("none", "randaugment", "trivialaugment", "autoaugment")  # vit_ms.data.augment's
# Recipes that start from pretrained weights and cannot run without them.
NEEDS_PRETRAINED = ("finetune", "linear_probe")
# Fields that do not change any compiled graph: left out of the graph-cache key (vit_ms.graph_cache). The
# lr table's length, which epochs sets, is a graph shape: the loop adds it to the key, and the seed where
# the model draws in its graph (stochastic depth, dropout: the seeds are the primitives' attributes).
NOT_GRAPH_FIELDS = ("recipe", "dataset", "data_path", "data_check", "num_workers", "pretrained", "epochs", "seed",
                    "output_dir", "resume", "overwrite", "progress_bar", "followups", "lr", "min_lr",
                    "warmup_epochs")
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
    auto_augment: str = "none"  # per-image policy: "none", "randaugment", "trivialaugment", "autoaugment"
    ra_num_ops: int = 2  # RandAugment: ops per image (timm's n)
    ra_magnitude: int = 9  # RandAugment: strength on timm's 0..10 scale (timm's m)
    color_jitter: float = 0.0  # brightness/contrast/saturation factors drawn from [1 - s, 1 + s]; 0: off
    random_erasing: float = 0.0  # probability of erasing one box with N(0, 1) noise after normalising
    mixup: float = 0.0  # Mixup Beta alpha on whole batches; 0: off
    cutmix: float = 0.0  # CutMix Beta alpha on whole batches; 0: off
    mixup_prob: float = 1.0  # probability that a batch is mixed (Mixup or CutMix)
    mixup_switch_prob: float = 0.5  # probability of CutMix rather than Mixup when both are on
    # model
    model: str = "vit_ti_16"  # a PRESETS name; num_classes always comes from the data's class folders
    # Input side in pixels, replacing the preset's. None: the weights' own, as timm's resolve_data_config
    # takes the pretrained config's input size unless one is given (timm/data/config.py): a --pretrained zoo
    # name's or vit_ms checkpoint's, else the --model preset's. train() resolves it before anything is written.
    image_size: Optional[int] = 224
    model_overrides: dict = dataclasses.field(default_factory=dict)  # other ViTConfig fields, e.g. {"depth": 4}
    drop_path_rate: float = 0.1  # stochastic depth at the last block (rising linearly from 0)
    pretrained: str = ""  # start weights: a checkpoint path or a vit_ms.checkpoint.ZOO name; empty: random
    #                       (a ZOO name or a vit_ms checkpoint also brings its architecture and preprocessing)
    freeze_backbone: bool = False  # train the head only (a linear probe)
    train_final_norm: bool = False  # with freeze_backbone: train the final LayerNorm too
    recompute: bool = False  # recompute each encoder block's activations in the backward pass (less memory)
    # optimisation
    epochs: int = 10  # passes over the train split
    batch_size: int = 16  # images per step on each device
    optimizer: str = "adamw"  # "adam": nn.Adam; "adamw": nn.AdamWeightDecay, no decay on norms/biases/CLS/pos;
    #                            "sgd": nn.SGD with momentum, no decay on norms/biases/CLS/pos
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = False  # SGD Nesterov momentum
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
    layer_decay: float = 1.0  # layer-wise lr scale D^(depth + 1 - layer), head 1.0; 1.0: off
    clip_grad: float = 0.0  # clip the gradient to this global L2 norm; 0: off
    accum_steps: int = 1  # micro-batches per optimizer step (K batches of B step like one of K*B)
    ema_decay: float = 0.0  # model EMA per optimizer step, saved as ema.ckpt; 0: off
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
                   "data_check": DATA_CHECKS, "auto_augment": AUTO_AUGMENT_POLICIES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "image_size", "num_workers", "accum_steps", "ra_num_ops"):
            value = getattr(self, name)
            if value is None and name == "image_size":
                continue
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
        self._check_finetuning()
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in output_dir and --overwrite deletes it: give one")
        known = {f.name for f in dataclasses.fields(ViTConfig)} - {"num_classes", "image_size", "drop_path_rate"}
        unknown = sorted(set(self.model_overrides) - known)
        if unknown:
            raise ValueError(f"TrainConfig.model_overrides has unknown or reserved field(s) {unknown}; allowed: "
                             f"{sorted(known)} (num_classes comes from the data; image_size and drop_path_rate "
                             f"are TrainConfig fields)")

    def _check_finetuning(self) -> None:
        """The augmentation and optimisation fields of fine-tuning, each error naming its flag."""
        def require(ok, flag, rule, value):
            if not ok:
                raise ValueError(f"--{flag} must be {rule}, got {value!r}")

        require(isinstance(self.ra_magnitude, int) and 0 <= self.ra_magnitude <= 10, "ra_magnitude",
                "an integer in [0, 10] (timm's scale)", self.ra_magnitude)
        require(0.0 <= self.color_jitter < 1.0, "color_jitter", "in [0, 1)", self.color_jitter)
        for name in ("random_erasing", "mixup_prob", "mixup_switch_prob"):
            require(0.0 <= getattr(self, name) <= 1.0, name, "a probability in [0, 1]", getattr(self, name))
        for name in ("mixup", "cutmix", "clip_grad", "momentum"):
            require(getattr(self, name) >= 0.0, name, ">= 0 (0: off)", getattr(self, name))
        require(0.0 < self.layer_decay <= 1.0, "layer_decay", "in (0, 1] (1: off)", self.layer_decay)
        require(0.0 <= self.ema_decay < 1.0, "ema_decay", "in [0, 1) (0: off)", self.ema_decay)
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise ValueError(f"--nesterov needs --optimizer sgd with --momentum > 0 (got --optimizer "
                             f"{self.optimizer}, --momentum {self.momentum})")
        if self.train_final_norm and not self.freeze_backbone:
            raise ValueError("--train_final_norm only applies with --freeze_backbone (everything trains otherwise)")
        if self.amp_level in ("O1", "O2", "O3") and (self.clip_grad or self.accum_steps > 1 or self.ema_decay):
            raise ValueError(f"--clip_grad, --accum_steps and --ema_decay train in float32: use --amp_level O0 "
                             f"(got {self.amp_level})")

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
    # Fine-tuning a pretrained ViT on any ImageFolder (--data_path, --pretrained required), the published
    # recipe of DeiT (Touvron et al. 2021, facebookresearch/deit main.py) and MAE's fine-tuning (He et al.
    # 2022, facebookresearch/mae main_finetune.py), studied for ViTs by AugReg (Steiner et al. 2021). The
    # head is replaced by a zero-initialised one for the data's classes (ViT paper Sec. 3.2).
    "finetune": TrainConfig(
        recipe="finetune", dataset="sample", augment=True,
        crop_min_scale=0.08,  # DeiT/MAE RandomResizedCrop scale (0.08, 1)
        auto_augment="randaugment", ra_num_ops=2, ra_magnitude=9,  # DeiT/MAE --aa rand-m9-mstd0.5-inc1
        color_jitter=0.0,  # timm/MAE leave colour jitter off when RandAugment is on
        random_erasing=0.25,  # DeiT/MAE --reprob 0.25 --remode pixel
        mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5,  # DeiT defaults; MAE FINETUNE.md
        model="vit_ti_16", model_overrides={},
        image_size=None,  # the pretrained weights' own (timm's resolve_data_config); 224 for most
        drop_path_rate=0.1,  # DeiT --drop-path 0.1, MAE --drop_path 0.1
        epochs=10, batch_size=32,  # fits a CPU; MAE fine-tunes 50-100 ImageNet epochs
        optimizer="adamw", beta1=0.9, beta2=0.999, eps=1e-8,  # DeiT --opt adamw, MAE AdamW (0.9, 0.999)
        weight_decay=0.05,  # DeiT --weight-decay 0.05, MAE --weight_decay 0.05
        lr=5e-4 * 32 / 512,  # DeiT --lr 5e-4 scaled by batch / 512
        min_lr=1e-6,  # DeiT/MAE --min_lr 1e-6
        lr_schedule="warmup_cosine", warmup_epochs=5,  # DeiT --warmup-epochs 5 --sched cosine; MAE 5
        label_smoothing=0.1,  # DeiT --smoothing 0.1, MAE --smoothing 0.1
        layer_decay=0.75,  # BEiT via MAE main_finetune.py --layer_decay 0.75 (MAE uses 0.65 for ViT-B)
        clip_grad=1.0,  # ViT paper App. B.1.1; big_vision configs/transfer.py grad_clip_norm = 1.0
        accum_steps=1,  # MAE --accum_iter 1
        ema_decay=0.9998,  # DeiT's model EMA (0.99996 over ~375k steps) scaled to a few thousand steps
        output_dir="outputs/finetune"),
    # A linear probe: the pretrained backbone frozen, only a new head trained; no heavy augmentation and
    # no Mixup, as MAE's main_linprobe.py (RandomResizedCrop + flip only, no weight decay, no drop path,
    # no label smoothing). MAE uses LARS at batch 16384 for 90 epochs; for a few hundred photos on a CPU
    # plain AdamW at 1e-3 fits the head in a few epochs (our choice, not a published number).
    "linear_probe": TrainConfig(
        recipe="linear_probe", dataset="sample", augment=True, crop_min_scale=0.08, model="vit_ti_16",
        image_size=None, model_overrides={}, drop_path_rate=0.0, freeze_backbone=True, epochs=5, batch_size=32,
        optimizer="adamw", lr=1e-3, min_lr=0.0, lr_schedule="warmup_cosine", warmup_epochs=0, weight_decay=0.0,
        label_smoothing=0.0, output_dir="outputs/linear_probe"),
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
    `model_overrides` and takes the preset's image size, unless those are given too (a recipe whose image
    size comes from the pretrained weights keeps None). Unknown keys raise ValueError at every layer.

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
        if cfg.image_size is not None:
            overrides.setdefault("image_size", PRESETS[overrides["model"]].image_size)
    cfg = _replace(cfg, overrides)
    if cfg.recipe in NEEDS_PRETRAINED and not cfg.pretrained:
        raise ValueError(f"the {cfg.recipe} recipe needs --pretrained: a checkpoint file (ours, timm, torchvision, "
                         f"JAX .npz, the tutorial's) or a zoo name such as augreg_vit_ti_16_224, downloaded on first "
                         f"use on a machine with internet (list them with `python -m vit_ms.checkpoint list`)")
    return cfg


def graph_settings(cfg: TrainConfig) -> dict:
    """The settings that shape the compiled graphs: `cfg` without `NOT_GRAPH_FIELDS` (the graph-cache key)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in NOT_GRAPH_FIELDS}


__all__ = ["TrainConfig", "RECIPES", "get_train_config", "resolve_train_config", "graph_settings", "CONFIG_FILE",
           "DATA_CHECKS", "OPTIMIZERS", "AUTO_AUGMENT_POLICIES", "NEEDS_PRETRAINED"]
