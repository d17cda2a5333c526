"""Training: loss, learning-rate schedules, optimizer parameter groups, callbacks, resume and data
parallelism, all on `mindspore.train.Model.fit`.

`train(TrainConfig)` is the whole job: it resolves the data, builds the ViT (Dosovitskiy et al.,
ICLR 2021) and the optimizer, restores `last.ckpt` when resuming, trains with an evaluation on `val`
after every epoch, and writes into `output_dir`:

    config.json     the resolved TrainConfig
    train.log       everything logged on the console
    metrics.jsonl   one line per finished epoch: epoch, step, loss, top1, top5, val_loss, lr, time, ...
    last.ckpt       weights + optimizer state + metadata, rewritten atomically after every epoch
    best.ckpt       weights + metadata of the epoch with the best val top-1
    curves.png      loss and accuracy per epoch, drawn when training ends

Both checkpoints carry the model config, class names and preprocessing (`vit_ms.checkpoint`), so
eval.py, infer.py and export.py need nothing else. Under `msrun ... train.py --distributed` every rank
trains on its own shard with averaged gradients, and only rank 0 writes files.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

import mindspore as ms
from mindspore import nn, ops
from mindspore.train import Callback, Model
from mindspore.train.metrics import TopKCategoricalAccuracy

from . import checkpoint as ckpt
from . import data
from .config import Preprocess, TrainConfig, check_fields, get_config
from .model import ViT

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
LAST_CKPT = "last.ckpt"
BEST_CKPT = "best.ckpt"
CURVES_FILE = "curves.png"
# Never decayed by AdamW: 1-D tensors (norm gains and biases) and these embeddings, as in DeiT/timm.
NO_DECAY_NAMES = ("cls_token", "pos_embed")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped and the last good checkpoint was kept."""


@dataclasses.dataclass
class TrainResult:
    """What a finished `train` call produced."""

    output_dir: Path
    epochs_done: int  # epochs finished in total, including those before a resume
    best_top1: float  # best val top-1 in [0, 1]
    last_metrics: Optional[dict]  # the final metrics.jsonl line
    best_checkpoint: Path
    last_checkpoint: Path
    rank: int = 0  # this process's rank (0 without data parallelism); only rank 0 wrote files


# ---------------------------------------------------------------------------------------------------------
# Loss, schedules, optimizer
# ---------------------------------------------------------------------------------------------------------

class CrossEntropySmooth(nn.LossBase):
    """Cross entropy against smoothed one-hot targets: on = 1 - s, off = s / (C - 1) (the tutorial's).

    Args:
        num_classes: width of the logits.
        smoothing: probability mass s moved from the true class to the others.
    """

    def __init__(self, num_classes: int, smoothing: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.on_value = ms.Tensor(1.0 - smoothing, ms.float32)
        self.off_value = ms.Tensor(smoothing / max(num_classes - 1, 1), ms.float32)
        self.ce = nn.SoftmaxCrossEntropyWithLogits(sparse=False, reduction="mean")

    def construct(self, logits, label):
        target = ops.one_hot(label, self.num_classes, self.on_value, self.off_value)  # (B, C)
        # Under AMP O2 the logits arrive in float16; the softmax and the mean need float32.
        return self.ce(logits.astype(ms.float32), target)


def lr_schedule(cfg: TrainConfig, steps_per_epoch: int) -> List[float]:
    """The learning rate of every optimizer step of the run (index = global step).

    "cosine_epoch" is the tutorial's `nn.cosine_decay_lr(min_lr, lr, epochs * steps, steps, epochs)`:
    lr[i] = min_lr + (lr - min_lr) (1 + cos(pi floor(i / steps) / epochs)) / 2, constant within an epoch.
    "warmup_cosine" rises linearly to `lr` over `warmup_epochs`, then follows a per-step half cosine
    down to `min_lr`.

    Args:
        cfg: the run's settings (lr, min_lr, lr_schedule, warmup_epochs, epochs).
        steps_per_epoch: optimizer steps in one epoch on one device.
    """
    total = cfg.epochs * steps_per_epoch
    if cfg.lr_schedule == "cosine_epoch":
        # nn.cosine_decay_lr rejects min_lr == max_lr; a constant schedule is then the same thing.
        if cfg.min_lr == cfg.lr:
            return [float(cfg.lr)] * total
        return [float(v) for v in nn.cosine_decay_lr(float(cfg.min_lr), float(cfg.lr), total, steps_per_epoch,
                                                     cfg.epochs)]
    warmup = cfg.warmup_epochs * steps_per_epoch
    values = []
    for step in range(total):
        if step < warmup:
            values.append(cfg.lr * (step + 1) / warmup)
        else:
            progress = (step - warmup) / max(total - warmup, 1)
            values.append(cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress)))
    return values


def param_groups(net: nn.Cell, weight_decay: float) -> list:
    """AdamW groups: decay on weight matrices only; none on norms, biases, cls_token and pos_embed.

    Args:
        net: the model.
        weight_decay: decay of the first group.
    """
    decay, no_decay = [], []
    for param in net.trainable_params():
        if param.ndim <= 1 or param.name.split(".")[-1] in NO_DECAY_NAMES:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
            {"order_params": net.trainable_params()}]


def build_optimizer(net: nn.Cell, cfg: TrainConfig, lr: List[float]) -> nn.Optimizer:
    """`nn.Adam` (the tutorial's) or `nn.AdamWeightDecay` with `param_groups`, stepping through `lr`.

    Args:
        net: the model.
        cfg: optimizer, beta1, beta2, eps and weight_decay.
        lr: one learning rate per global step (see `lr_schedule`).
    """
    lr = ms.Tensor(np.asarray(lr, np.float32))
    if cfg.optimizer == "adam":
        return nn.Adam(net.trainable_params(), learning_rate=lr, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps,
                       weight_decay=cfg.weight_decay)
    return nn.AdamWeightDecay(param_groups(net, cfg.weight_decay), learning_rate=lr, beta1=cfg.beta1,
                              beta2=cfg.beta2, eps=cfg.eps)


# ---------------------------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------------------------

def _loss_value(outputs) -> float:
    # TrainOneStepCell returns the loss; the loss-scale variant returns (loss, overflow, scale).
    if isinstance(outputs, (tuple, list)):
        outputs = outputs[0]
    return float(np.asarray(outputs.asnumpy() if hasattr(outputs, "asnumpy") else outputs).mean())


@dataclasses.dataclass
class _RunState:
    """What the callbacks of one run share."""

    lr: List[float]
    start_step: int  # optimizer global step when this process started training
    batch_size: int  # images per step across all ranks
    best_top1: float = -1.0
    diverged: Optional[str] = None  # the divergence message once the loss is not finite
    epoch_losses: List[float] = dataclasses.field(default_factory=list)
    epoch_start: float = 0.0
    train_seconds: float = 0.0

    def global_step(self, cb_params) -> int:
        return self.start_step + cb_params.cur_step_num

    def current_lr(self, cb_params) -> float:
        step = self.global_step(cb_params)
        return self.lr[min(max(step - 1, 0), len(self.lr) - 1)]


class LossGuard(Callback):
    """Records every step's loss and stops the run at the first NaN/inf loss, before it is saved."""

    def __init__(self, state: _RunState):
        super().__init__()
        self.state = state

    def on_train_epoch_begin(self, run_context):
        self.state.epoch_losses = []
        self.state.epoch_start = time.perf_counter()

    def on_train_step_end(self, run_context):
        cb_params = run_context.original_args()
        loss = _loss_value(cb_params.net_outputs)
        if not math.isfinite(loss):
            self.state.diverged = (f"the training loss became {loss} at epoch {cb_params.cur_epoch_num}, global "
                                   f"step {self.state.global_step(cb_params)} (lr "
                                   f"{self.state.current_lr(cb_params):.3g}); training stopped")
            run_context.request_stop()
            return
        self.state.epoch_losses.append(loss)
        self.state.train_seconds = time.perf_counter() - self.state.epoch_start


class ProgressBar(Callback):
    """A tqdm bar per epoch showing loss, learning rate and images per second."""

    def __init__(self, state: _RunState, total_epochs: int):
        super().__init__()
        self.state = state
        self.total_epochs = total_epochs
        self.bar = None

    def on_train_epoch_begin(self, run_context):
        from tqdm import tqdm

        cb_params = run_context.original_args()
        self.bar = tqdm(total=cb_params.batch_num, desc=f"epoch {cb_params.cur_epoch_num}/{self.total_epochs}",
                        unit="step", leave=False, dynamic_ncols=True, file=sys.stderr)
        self.start = time.perf_counter()
        self.steps = 0

    def on_train_step_end(self, run_context):
        if self.bar is None:
            return
        cb_params = run_context.original_args()
        self.steps += 1
        losses = self.state.epoch_losses
        speed = self.steps * self.state.batch_size / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(loss=f"{losses[-1]:.4f}" if losses else "nan",
                             lr=f"{self.state.current_lr(cb_params):.3g}", img_s=f"{speed:.0f}", refresh=False)
        # In sink mode one "step" callback covers a whole sink of batches.
        self.bar.update(cb_params.batch_num if cb_params.dataset_sink_mode else 1)

    def on_train_epoch_end(self, run_context):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    on_train_end = on_train_epoch_end


class EpochRecorder(Callback):
    """Rank 0's epoch end: a metrics.jsonl line, best.ckpt when top-1 improved, last.ckpt, the curves.

    The order matters for resume: the metrics line goes first and last.ckpt last, and `train` drops
    metrics lines beyond last.ckpt's epoch on resume, so every epoch appears exactly once.
    """

    def __init__(self, state: _RunState, out: Path, net: nn.Cell, meta: dict, total_epochs: int,
                 steps_per_epoch: int):
        super().__init__()
        self.state = state
        self.out = out
        self.net = net
        self.meta = meta
        self.total_epochs = total_epochs
        self.steps_per_epoch = steps_per_epoch

    def on_train_epoch_end(self, run_context):
        if self.state.diverged:
            return  # keep the last good checkpoint and metrics untouched
        cb_params = run_context.original_args()
        epoch = cb_params.cur_epoch_num
        step = self.state.global_step(cb_params)
        results = cb_params.get("eval_results") or {}
        losses = self.state.epoch_losses
        record = {
            "epoch": epoch,
            "step": step,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "top1": float(results.get("top1", float("nan"))),
            "top5": float(results.get("top5", float("nan"))),
            "val_loss": float(results.get("eval_loss", float("nan"))),
            "lr": self.state.current_lr(cb_params),
            "time": round(time.perf_counter() - self.state.epoch_start, 3),
            "images_per_sec": round(len(losses) * self.state.batch_size / max(self.state.train_seconds, 1e-9), 1),
        }
        logger.info("epoch %d/%d: loss %.4f, val top-1 %.2f%%, top-5 %.2f%%, val loss %.4f, lr %.3g, %.1f s, "
                    "%.0f images/s", epoch, self.total_epochs, record["loss"], 100 * record["top1"],
                    100 * record["top5"], record["val_loss"], record["lr"], record["time"], record["images_per_sec"])
        with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        improved = record["top1"] > self.state.best_top1
        if improved:
            self.state.best_top1 = record["top1"]
        meta = dict(self.meta, epoch=epoch, global_step=step, metrics=record, best_top1=self.state.best_top1)
        if improved:
            ckpt.save_checkpoint(self.net, self.out / BEST_CKPT, meta)
            logger.info("new best val top-1 %.2f%%: wrote %s", 100 * record["top1"], self.out / BEST_CKPT)
        # last.ckpt holds the optimizer too (moments, global step, beta powers): all of the train network.
        ckpt.save_checkpoint(cb_params.train_network, self.out / LAST_CKPT, meta)

    def on_train_end(self, run_context):
        # Once per run, not per epoch: drawing costs about a second, a lot beside a small model's epoch.
        if (self.out / METRICS_FILE).is_file():
            _plot_curves(self.out)


class DebugRecorder(Callback):
    """Test hook: each rank writes the labels and per-image channel means of every batch it trained on,
    and its final weights, into `debug_dir`."""

    def __init__(self, debug_dir: Path, rank: int, net: nn.Cell):
        super().__init__()
        self.dir = debug_dir
        self.rank = rank
        self.net = net
        self.dir.mkdir(parents=True, exist_ok=True)

    def on_train_step_end(self, run_context):
        cb_params = run_context.original_args()
        element = cb_params.train_dataset_element
        if element is None:  # sink mode hands no batches to callbacks
            return
        images, labels = element[0].asnumpy(), element[1].asnumpy()
        line = {"epoch": cb_params.cur_epoch_num, "labels": labels.tolist(),
                "means": images.mean(axis=(2, 3)).round(4).tolist()}
        with open(self.dir / f"rank_{self.rank}_batches.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def on_train_end(self, run_context):
        ms.save_checkpoint(self.net, str(self.dir / f"rank_{self.rank}_final.ckpt"))


def _plot_curves(out: Path) -> None:
    from .viz import plot_training_curves  # matplotlib only when a curve is drawn

    try:
        plot_training_curves(out / METRICS_FILE, out / CURVES_FILE)
    except (OSError, ValueError) as error:  # a picture must never stop a training run
        logger.warning("could not draw %s: %s", out / CURVES_FILE, error)


# ---------------------------------------------------------------------------------------------------------
# Set-up helpers
# ---------------------------------------------------------------------------------------------------------

class _TqdmHandler(logging.StreamHandler):
    """Console logging that does not tear a progress bar apart."""

    def emit(self, record):
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging's contract: report a broken handler, never raise
            self.handleError(record)


def _setup_logging(out: Optional[Path], rank: Optional[int]) -> List[logging.Handler]:
    package = logging.getLogger("vit_ms")
    package.setLevel(logging.INFO)
    prefix = f"[rank {rank}] " if rank is not None else ""
    formatter = logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S")
    handlers: List[logging.Handler] = [_TqdmHandler()]
    if out is not None:
        handlers.append(logging.FileHandler(out / LOG_FILE, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        package.addHandler(handler)
    package.propagate = False  # the handlers above are the run's console and log file
    return handlers


def _teardown_logging(handlers: List[logging.Handler]) -> None:
    package = logging.getLogger("vit_ms")
    for handler in handlers:
        package.removeHandler(handler)
        handler.close()
    package.propagate = True


def _init_device(cfg: TrainConfig):
    """Device, execution mode, seed and (when distributed) the communication group: (rank, group size)."""
    ms.set_device(cfg.device_target)
    ms.set_context(mode=ms.GRAPH_MODE if cfg.mode == "graph" else ms.PYNATIVE_MODE)
    rank, size = 0, 1
    if cfg.distributed:
        from mindspore.communication import get_group_size, get_rank, init

        init()
        rank, size = get_rank(), get_group_size()
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                     device_num=size)
    # The same seed on every rank: identical initial weights, and each rank's shard is shuffled alike.
    ms.set_seed(cfg.seed)
    np.random.seed(cfg.seed)
    return rank, size


def resolve_data_root(cfg: TrainConfig) -> Path:
    """The ImageFolder root of the run: `data_path`, else the sample set or the tutorial's download.

    Args:
        cfg: dataset and data_path.
    """
    if cfg.data_path:
        root = Path(cfg.data_path).expanduser()
    elif cfg.dataset == "sample":
        root = data.ensure_sample_dataset()
    else:
        root = data.download_tutorial_dataset()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise data.DatasetError(f"{root / split} does not exist: --data_path must be an ImageFolder root "
                                    f"holding train/<class>/... and val/<class>/...")
    return root


def amp_level_for(cfg: TrainConfig) -> str:
    """The AMP level the run uses: "auto" means O2 on Ascend (the tutorial's) and O0 elsewhere."""
    if cfg.amp_level != "auto":
        return cfg.amp_level
    return "O2" if cfg.device_target == "Ascend" else "O0"


def sink_mode_for(cfg: TrainConfig) -> bool:
    """Data sink mode: on for Ascend unless set; MindSpore ignores it on CPU anyway."""
    return cfg.device_target == "Ascend" if cfg.dataset_sink_mode is None else bool(cfg.dataset_sink_mode)


def _write_json_atomic(path: Path, value) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; config.json is for everyone to read
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def read_metrics(path) -> List[dict]:
    """The records of a metrics.jsonl, in file order.

    Args:
        path: the metrics.jsonl file (or the run's output folder).
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _trim_metrics(out: Path, last_epoch: int) -> None:
    # A kill between the metrics line and last.ckpt leaves a line for an epoch that will be trained again.
    records = [r for r in read_metrics(out) if r["epoch"] <= last_epoch]
    fd, tmp = tempfile.mkstemp(prefix=f".{METRICS_FILE}.", suffix=".tmp", dir=out)
    os.chmod(tmp, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, out / METRICS_FILE)


def _restore(train_network: nn.Cell, path: Path) -> dict:
    """Load weights and optimizer state from last.ckpt into the train network; returns its metadata."""
    # The learning-rate table is rebuilt from the settings (which may extend the run); the position in it
    # is the restored global_step.
    params = ms.load_checkpoint(str(path), choice_func=lambda name: name != "learning_rate")
    raw = params.pop(ckpt.META_KEY, None)
    meta = ckpt.parse_metadata(path, raw) if raw is not None else None
    if meta is None or "epoch" not in meta:
        raise ckpt.CheckpointError(f"{path} is not a vit_ms training checkpoint (no epoch in its "
                                   f"metadata); start without --resume or point --output_dir at the run")
    not_loaded, _ = ms.load_param_into_net(train_network, params, strict_load=True)
    not_loaded = [name for name in not_loaded if name != "learning_rate"]
    if not_loaded:
        raise ckpt.CheckpointError(f"{path} lacks {len(not_loaded)} parameter(s) of this run's network and "
                                   f"optimizer (e.g. {not_loaded[:3]}); was it written with another model or "
                                   f"--optimizer?")
    return meta


# ---------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------

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
    from .config import PRESETS, get_train_config

    cfg = get_train_config(recipe or "scratch")
    if config_file:
        cfg = TrainConfig.from_dict({**cfg.to_dict(), **json.loads(Path(config_file).read_text(encoding="utf-8"))})
    if overrides.get("resume"):
        saved = Path(overrides.get("output_dir", cfg.output_dir)).expanduser() / CONFIG_FILE
        if saved.is_file():
            cfg = TrainConfig.from_dict(json.loads(saved.read_text(encoding="utf-8")))
    if "model_overrides" in overrides and "model" not in overrides:
        overrides["model_overrides"] = {**cfg.model_overrides, **overrides["model_overrides"]}
    if "model" in overrides:
        if overrides["model"] not in PRESETS:
            raise ValueError(f"unknown model preset {overrides['model']!r}; choose one of {sorted(PRESETS)}")
        overrides.setdefault("model_overrides", {})
        overrides.setdefault("image_size", PRESETS[overrides["model"]].image_size)
    check_fields(TrainConfig, overrides)
    return dataclasses.replace(cfg, **overrides)


def train(cfg: TrainConfig) -> TrainResult:
    """Run one training job as `cfg` describes (see the module docstring for what it writes).

    Args:
        cfg: the resolved settings (`vit_ms.config.get_train_config`).

    Returns:
        A `TrainResult` (also on rank > 0, whose paths then name rank 0's files).

    Raises:
        TrainingDiverged: the loss became NaN/inf; files hold the last good epoch.
        vit_ms.data.DatasetError: the data is missing (offline: the message says where to put the archive).
        vit_ms.checkpoint.CheckpointError: the pretrained weights are missing or do not fit the model.
    """
    rank, group_size = _init_device(cfg)
    out = Path(cfg.output_dir).expanduser()
    writer = rank == 0
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    handlers = _setup_logging(out if writer else None, rank if cfg.distributed else None)
    try:
        return _train(cfg, out, rank, group_size, writer)
    except (TrainingDiverged, data.DatasetError, ckpt.CheckpointError) as error:
        logger.error("%s", error)  # into train.log too, not only on the console
        raise
    finally:
        _teardown_logging(handlers)


def _train(cfg: TrainConfig, out: Path, rank: int, group_size: int, writer: bool) -> TrainResult:
    # Downloads first: offline, the run stops here with a message naming the file and where to put it.
    root = resolve_data_root(cfg)
    pretrained = None
    if cfg.pretrained:
        try:
            pretrained = ckpt.resolve_pretrained(cfg.pretrained)
        except RuntimeError as error:  # offline: the message names the file and where to put it
            raise ckpt.CheckpointError(str(error)) from error
    logger.info("recipe %s on %s (%s, %s mode, AMP %s, %d device(s)); data %s; output %s", cfg.recipe,
                cfg.device_target, "data parallel" if cfg.distributed else "single device", cfg.mode,
                amp_level_for(cfg), group_size, root, out)
    if writer:
        _write_json_atomic(out / CONFIG_FILE, cfg.to_dict())

    classes = data.class_names(root, "train")
    config = get_config(cfg.model, num_classes=len(classes), image_size=cfg.image_size,
                        drop_path_rate=cfg.drop_path_rate, **cfg.model_overrides)
    preprocess = Preprocess.for_model(config)
    shard = dict(num_shards=group_size, shard_id=rank) if cfg.distributed else {}
    train_ds, train_info = data.create_dataset(root, "train", preprocess, cfg.batch_size, training=cfg.augment, shuffle=True,
                                   drop_remainder=True, num_workers=cfg.num_workers, class_names=classes,
                                   crop_scale=(cfg.crop_min_scale, 1.0), **shard)
    val_ds, val_info = data.create_dataset(root, "val", preprocess, cfg.batch_size, training=False,
                                 num_workers=cfg.num_workers, class_names=classes)
    # create_dataset decodes every file before the first epoch, leaves out the unreadable ones and warns
    # with their count and names; here we only confirm a clean split.
    for info in (train_info, val_info):
        if not info.skipped:
            logger.info("%s: every image decodes (checked before the first epoch)", info.split)
    steps_per_epoch = train_ds.get_dataset_size()
    if steps_per_epoch == 0:
        raise data.DatasetError(f"{root / 'train'} has fewer images per device than one batch of "
                                f"{cfg.batch_size}; lower --batch_size")

    amp_level = amp_level_for(cfg)
    # The model's fast path (fused CPU kernels) is float32 CPU code; other devices and AMP use plain ops.
    net = ViT(config, fast=cfg.device_target == "CPU" and amp_level == "O0")
    if pretrained is not None:
        report = ckpt.load_weights(net, pretrained)
        logger.info("initial weights: %s", report.summary())
    loss_fn = CrossEntropySmooth(config.num_classes, cfg.label_smoothing)
    schedule = lr_schedule(cfg, steps_per_epoch)
    optimizer = build_optimizer(net, cfg, schedule)
    # The eval network sees the last, smaller val batch too: a dynamic batch dimension compiles it once.
    # Training uses drop_remainder, so its graph keeps a static shape (and sinks on Ascend).
    eval_net = nn.WithEvalCell(net, loss_fn, add_cast_fp32=amp_level in ("O2", "O3"))
    eval_net.set_inputs(ms.Tensor(shape=[None, 3, config.image_size, config.image_size], dtype=ms.float32),
                        ms.Tensor(shape=[None], dtype=ms.int32))
    amp_kwargs = {}
    if amp_level != "O0" and cfg.device_target == "CPU":
        amp_kwargs["loss_scale_manager"] = None  # CPU has no dynamic loss scaling (overflow checks)
    # Top-5 over fewer than five classes counts every prediction as a hit (MindSpore's metric would fail).
    metrics = {"top1": TopKCategoricalAccuracy(1), "top5": TopKCategoricalAccuracy(min(5, config.num_classes))}
    model = Model(net, loss_fn=loss_fn, optimizer=optimizer, metrics=metrics, eval_network=eval_net,
                  eval_indexes=[0, 1, 2], amp_level=amp_level, **amp_kwargs)

    meta = ckpt.make_metadata(config, classes, preprocess, train_config=cfg.to_dict())
    initial_epoch, best_top1 = 0, -1.0
    last_path = out / LAST_CKPT
    if cfg.resume:
        if not last_path.is_file():
            raise ckpt.CheckpointError(f"--resume: {last_path} does not exist; run without --resume to start, "
                                       f"or pass the --output_dir of the run to continue")
        saved = _restore(model.train_network, last_path)
        initial_epoch, best_top1 = int(saved["epoch"]), float(saved.get("best_top1", -1.0))
        if writer:
            _trim_metrics(out, initial_epoch)
        logger.info("resumed from %s: epoch %d done, global step %d, best val top-1 %.2f%%", last_path,
                    initial_epoch, int(optimizer.global_step.asnumpy().reshape(-1)[0]), 100 * best_top1)
        if cfg.debug_dir:
            Path(cfg.debug_dir).mkdir(parents=True, exist_ok=True)
            ms.save_checkpoint(model.train_network, str(Path(cfg.debug_dir) / f"rank_{rank}_resumed.ckpt"))
    start_step = int(optimizer.global_step.asnumpy().reshape(-1)[0])

    result = TrainResult(out, initial_epoch, max(best_top1, 0.0), (read_metrics(out) or [None])[-1],
                         out / BEST_CKPT, last_path, rank)
    if initial_epoch >= cfg.epochs:
        logger.info("%s already holds epoch %d of %d: nothing to train (raise --epochs to continue)",
                    last_path, initial_epoch, cfg.epochs)
        return result

    state = _RunState(lr=schedule, start_step=start_step, batch_size=cfg.batch_size * group_size,
                      best_top1=best_top1)
    callbacks: List[Callback] = [LossGuard(state)]
    if writer and cfg.progress_bar:
        callbacks.append(ProgressBar(state, cfg.epochs))
    if writer:
        callbacks.append(EpochRecorder(state, out, net, meta, cfg.epochs, steps_per_epoch))
    if cfg.debug_dir:
        callbacks.append(DebugRecorder(Path(cfg.debug_dir), rank, net))
    logger.info("model %s: %s, %d parameters; %d train steps of %d per epoch, %d val images, %d classes",
                cfg.model, {k: v for k, v in config.to_dict().items() if k != "num_classes"},
                sum(p.size for p in net.trainable_params()), steps_per_epoch, cfg.batch_size * group_size,
                len(data.list_images(root / "val")) - len(getattr(val_ds, "skipped", [])),
                len(classes))
    started = time.perf_counter()
    model.fit(cfg.epochs, train_ds, val_ds, valid_frequency=1, callbacks=callbacks,
              dataset_sink_mode=sink_mode_for(cfg), valid_dataset_sink_mode=False, initial_epoch=initial_epoch)
    if state.diverged:
        kept = (f"the last good checkpoint is {last_path} (epoch {ckpt.read_metadata(last_path)['epoch']})"
                if last_path.is_file() else "no epoch finished, so no checkpoint was written")
        raise TrainingDiverged(f"{state.diverged}; {kept}. Lower --lr (now {cfg.lr:g}) or check the data.")

    records = read_metrics(out)
    result.epochs_done = records[-1]["epoch"] if records else cfg.epochs
    result.best_top1 = max(state.best_top1, 0.0)
    result.last_metrics = records[-1] if records else None
    logger.info("finished %d epoch(s) in %.1f s: best val top-1 %.2f%%; checkpoints %s and %s",
                cfg.epochs - initial_epoch, time.perf_counter() - started, 100 * result.best_top1,
                out / BEST_CKPT, last_path)
    return result


def run_followups(cfg: TrainConfig, result: TrainResult, data_root: Optional[Path] = None) -> None:
    """The tutorial's steps after fine-tuning, on best.ckpt: evaluate on val, predict infer/, export MINDIR.

    Each step is the project's own command line (eval.py, infer.py, export.py beside train.py), run
    as a subprocess exactly as a user would type it; its results land in output_dir/{eval,infer} and
    output_dir/vit.mindir.

    Args:
        cfg: the run's settings (data location, device).
        result: what `train` returned.
        data_root: the ImageFolder root; default: resolved from `cfg` again.
    """
    root = Path(data_root) if data_root is not None else resolve_data_root(cfg)
    scripts = Path(__file__).resolve().parent.parent
    best = str(result.best_checkpoint)
    device = ["--device_target", cfg.device_target]
    steps = [
        ("evaluate", ["eval.py", "--checkpoint", best, "--data_path", str(root), "--split", "val",
                      "--output_dir", str(result.output_dir / "eval"), *device]),
        ("infer", ["infer.py", "--checkpoint", best, "--input", str(root / "infer"),
                   "--output_dir", str(result.output_dir / "infer"), *device]),
        ("export", ["export.py", "--checkpoint", best, "--output", str(result.output_dir / "vit.mindir"), *device]),
    ]
    for name, argv in steps:
        if not (scripts / argv[0]).is_file():
            raise FileNotFoundError(f"{scripts / argv[0]} not found: the {name} step needs the project's "
                                    f"command-line scripts beside train.py")
        logger.info("tutorial step %s: %s", name, " ".join(argv))
        done = subprocess.run([sys.executable, str(scripts / argv[0]), *argv[1:]])
        if done.returncode != 0:
            raise RuntimeError(f"the tutorial's {name} step failed (exit status {done.returncode}): "
                               f"{' '.join(argv)}")


__all__ = ["CrossEntropySmooth", "lr_schedule", "param_groups", "build_optimizer", "train", "run_followups",
           "resolve_train_config", "resolve_data_root", "read_metrics", "amp_level_for", "sink_mode_for", "TrainResult",
           "TrainingDiverged", "LossGuard", "ProgressBar", "EpochRecorder", "DebugRecorder"]
