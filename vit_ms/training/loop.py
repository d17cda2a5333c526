"""`train(cfg)`: one training run of a ViT (Dosovitskiy et al., ICLR 2021) on `mindspore.train.Model.fit`,
as a few named steps: check the inputs, build data and model, open the run folder, restore when
resuming, fit, report. What the run folder holds is described in `vit_ms.training.rundir`.

The train network is a `TrainStep` (gradient clipping, accumulation over `accum_steps` micro-batches,
the model EMA) over the network with its loss; the optimizer (and its learning-rate table) counts
optimizer steps, i.e. batches // accum_steps. Only an AMP run without clip/accumulation/EMA keeps
MindSpore's own mixed-precision train cell (with its loss scaling on Ascend/GPU).
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import mindspore as ms
from mindspore import nn
from mindspore.train import Callback, Model
from mindspore.train.metrics import TopKCategoricalAccuracy

from .. import checkpoint as ckpt
from .. import data, graph_cache, interrupts
from ..config import PRESETS, Preprocess, ViTConfig, get_config
from ..evaluate import imagenet_classes
from ..layers import use_fused_kernels
from ..model import ViT, set_dynamic_batch
from . import rundir
from .callbacks import (EpochRecorder, LossGuard, ProgressBar, RunState, StopOnSignal, TrainingDiverged,
                        TrainingInterrupted)
from .config import TrainConfig, graph_settings
from .distributed import amp_level_for, init_device, rank_seed, seed_rank_streams, sink_mode_for
from .ema import EmaEvaluator, ModelEMA
from .optim import SoftCrossEntropy, apply_recompute, create_optimizer, freeze_backbone, lr_schedule
from .train_step import TrainStep

logger = logging.getLogger(__name__)


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


@dataclasses.dataclass
class _Inputs:
    out: Path  # the run folder (not created yet)
    root: Path  # the ImageFolder root
    pretrained: Optional[Path]  # the resolved --pretrained file; None when resuming (the weights are in `saved`)
    saved: Optional[Path] = None  # resuming: the run's last.ckpt, which names its model and preprocessing


@dataclasses.dataclass
class _Data:
    classes: list
    config: ViTConfig
    preprocess: Preprocess
    train: object  # mindspore.dataset.Dataset
    val: object
    steps_per_epoch: int  # batches per epoch on one device
    val_images: int
    optimizer_steps: int  # optimizer steps per epoch: steps_per_epoch // accum_steps
    ema_val: object = None  # a second val pipeline for evaluating the EMA weights (None: no EMA)
    head: Optional[tuple] = None  # (classes, names or None) of the pretrained weights' head; None: no weights


@dataclasses.dataclass
class _Trainer:
    net: ViT
    model: Model
    optimizer: nn.Optimizer
    schedule: list
    ema: Optional[EmaEvaluator] = None


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


def train(cfg: TrainConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Run one training job as `cfg` describes, writing into `cfg.output_dir` (see `rundir`).

    Args:
        cfg: the resolved settings (`resolve_train_config`).
        callbacks: extra `mindspore.train.Callback`s, run after the run's own (e.g. to record batches).

    Returns:
        A `TrainResult` (also on rank > 0, whose paths then name rank 0's files).

    Raises:
        TrainingDiverged: the loss became NaN/inf; files hold the last good epoch.
        TrainingInterrupted: SIGINT/SIGTERM; files hold the last finished epoch, `--resume` continues.
        RunFolderError: the output folder holds another run, has nothing to resume, or a write failed.
        vit_ms.data.DatasetError: the data is missing (offline: the message says where to put the archive).
        vit_ms.checkpoint.CheckpointError: the pretrained weights are missing or do not fit the model.
    """
    rank, group_size = init_device(cfg)
    writer = rank == 0
    logs = rundir.RunLogging(rank if cfg.distributed else None, quiet=not writer)
    try:
        inputs = _check_inputs(cfg, writer)
        cfg = _fit_batch_size(cfg, inputs.root, group_size)
        batches = _build_data(cfg, inputs, rank, group_size)
        # The size the weights brought: config.json, the graph cache key and a resume then name it.
        cfg = dataclasses.replace(cfg, image_size=batches.config.image_size)
        # Before the first graph compiles: a second run with the same graph-shaping settings loads them.
        # The lr tables are graph parameters whose length (every optimizer step of the run) is a shape.
        key = dict(graph_settings(cfg), model_config=batches.config.to_dict(), rank=rank, group_size=group_size,
                   lr_steps=cfg.epochs * batches.optimizer_steps)
        if _draws_in_graph(batches.config):
            # DropPath's and Dropout's seeds are attributes of their primitives, compiled into the graph: a
            # graph cached under another seed would drop by that seed's masks.
            key["stream_seed"] = rank_seed(cfg.seed, rank)
        graph_cache.enable("train", key)
        trainer = _build_trainer(cfg, batches, inputs.pretrained, writer)
        seed_rank_streams(cfg.seed, rank, trainer.net)  # shared weights and shuffle drawn; augment per rank
        if writer:
            _open_run_folder(cfg, inputs.out, logs)
        return _fit(cfg, inputs.out, batches, trainer, rank, group_size, list(callbacks))
    except (TrainingDiverged, rundir.RunFolderError, data.DatasetError, ckpt.CheckpointError) as error:
        logger.error("%s", error)  # into train.log too once it is open, not only on the console
        raise
    finally:
        logs.close()


def _check_inputs(cfg: TrainConfig, writer: bool) -> _Inputs:
    """Everything that can fail before a file is written: the run folder's state, the data, the weights.
    Downloads happen here: offline, the run stops with a message naming the file and where to put it."""
    out = rundir.check_run_folder(cfg, writer)
    root = resolve_data_root(cfg)
    pretrained = saved = None
    if cfg.resume:
        # last.ckpt holds every weight and names the model: a resumed run needs its --pretrained file no
        # more (it may be gone, be a download the machine cannot make, or be a path relative to elsewhere).
        saved = out / rundir.LAST_CKPT
    elif cfg.pretrained:
        try:
            pretrained = ckpt.resolve_pretrained(cfg.pretrained)
        except FileNotFoundError as error:
            raise ckpt.CheckpointError(f"--pretrained: {error}; `python -m vit_ms.checkpoint list` describes "
                                       f"the names") from error
        except RuntimeError as error:  # offline: the message names the file and where to put it
            raise ckpt.CheckpointError(str(error)) from error
    logger.info("recipe %s on %s (%s, %s mode, AMP %s); data %s; output %s", cfg.recipe, cfg.device_target,
                "data parallel" if cfg.distributed else "single device", cfg.mode, amp_level_for(cfg), root, out)
    return _Inputs(out, root, pretrained, saved)


def _fit_batch_size(cfg: TrainConfig, root: Path, group_size: int) -> TrainConfig:
    """A batch larger than the train split (per device) is shrunk to fit, with a warning: a recipe's
    default batch must not stop a run on a small folder."""
    # A bounded count, not a scan: _build_data scans the split next (1.28 M files for ImageNet).
    needed = cfg.batch_size * cfg.accum_steps
    images = 0
    for name in data.class_names(root, "train"):
        images += data.count_images(root / "train" / name, needed * group_size - images)
        if images >= needed * group_size:
            break
    images //= group_size
    if 0 < images < needed:
        batch = max(images // cfg.accum_steps, 1)
        logger.warning("--batch_size %d x --accum_steps %d is more than the %d training image(s) per device: "
                       "using --batch_size %d", cfg.batch_size, cfg.accum_steps, images, batch)
        cfg = dataclasses.replace(cfg, batch_size=batch)
    return cfg


def _model_config(cfg: TrainConfig, num_classes: int, pretrained: Optional[Path] = None,
                  saved: Optional[Path] = None) -> tuple:
    """(ViTConfig, Preprocess, head) of the run; head: (classes, class names or None) of the --pretrained
    weights' classifier, None without weights to load (`_keeps_head`).

    --pretrained brings its architecture and preprocessing (mean, std,
    interpolation; the image size unless the run sets one), so eval and infer read the weights' own from the
    checkpoint metadata: a ZOO name its entry's; a vit_ms checkpoint (`pretrained`, the resolved file: one of
    our runs, or what `convert.py` wrote) its metadata's; another file (timm, HF, torchvision, JAX ...) what
    `convert.py` would write for it, --model's preset where the shapes are that preset's. Without weights,
    --model with --model_override and the preset's. A resumed run (`saved`: its last.ckpt) takes both from
    what it saved, whatever --pretrained names."""
    entry = ckpt.ZOO.get(cfg.pretrained)
    # A vit_ms .ckpt carries its model and preprocessing (vit_ms.checkpoint.format); other files do not.
    own = entry is None and pretrained is not None and pretrained.suffix.lower() == ".ckpt"
    meta = ckpt.read_metadata(pretrained) if own else None
    preprocess = head = None  # the preset's, for the config built
    if saved is not None:
        (source, preprocess), origin = ckpt.config_from_metadata(ckpt.read_metadata(saved)), "the run's own"
    elif entry is not None:
        source, preprocess, origin = entry.config(), entry.preprocess(), f"the {cfg.pretrained} weights' own"
        head = (source.num_classes, None)
        if entry.preset != cfg.model:
            logger.info("--pretrained %s holds a %s: training that architecture (not --model %s)", cfg.pretrained,
                        entry.preset, cfg.model)
    elif meta is not None:
        (source, preprocess), origin = ckpt.config_from_metadata(meta), f"{pretrained}'s own"
        head = (source.num_classes, meta.get("class_names"))
        logger.info("--pretrained %s is a vit_ms checkpoint of a ViT with width %d, depth %d, %d heads, patch %d: "
                    "training that architecture (--model %s not used)", pretrained, source.embed_dim, source.depth,
                    source.num_heads, source.patch_size, cfg.model)
    elif pretrained is not None:  # timm, HF, torchvision, JAX, mindcv, the tutorial's: read as convert.py reads it
        # --model where the weights' shapes are its preset's (its heads and numerics, as before); else the
        # weights' own architecture with the standard heads and the scheme's numerics. The file is read once.
        weights = ckpt.describe_weights(pretrained, model=cfg.model, model_must_fit=False,
                                        num_heads=cfg.model_overrides.get("num_heads"))
        if weights.preset != cfg.model:
            logger.info("--pretrained %s holds a ViT with width %d, depth %d, %d heads, patch %d (%s names): "
                        "training that architecture (not --model %s)", pretrained, weights.config.embed_dim,
                        weights.config.depth, weights.config.num_heads, weights.config.patch_size, weights.source,
                        cfg.model)
        source, preprocess, origin = weights.config, weights.preprocess, f"{pretrained}'s own"
        head = (source.num_classes, weights.class_names)
    else:
        source, origin = cfg.model, f"the {cfg.model} preset's"
    settings = dict(num_classes=num_classes, drop_path_rate=cfg.drop_path_rate)
    if cfg.image_size is not None:
        settings["image_size"] = cfg.image_size
    config = get_config(source, **settings, **cfg.model_overrides)
    if cfg.image_size is None:
        logger.info("image size %d px: %s (--image_size sets another)", config.image_size, origin)
    if preprocess is None:
        return config, Preprocess.for_model(config), head
    return config, dataclasses.replace(preprocess, image_size=config.image_size), head


def _names(names: Sequence[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def _head_text(head: tuple) -> str:
    rows, names = head
    if names is not None:
        return f"{rows} other classes ({_names(list(names))})"
    return f"ImageNet-1k's {rows} classes" if rows == len(imagenet_classes()) else f"{rows} unnamed classes"


def _keeps_head(head: Optional[tuple], classes: Sequence[str]) -> bool:
    """Whether the pretrained classifier's rows are the data's classes, one for one, so that the run goes on
    training it. Otherwise the run starts from a new zero-initialised head, as the ViT paper fine-tunes
    (Sec. 3.2: "remove the pre-trained prediction head and attach a zero-initialized D x K feedforward
    layer"; big_vision's transfer configs never load it). A head of the same size is not enough: two
    classes of ants and bees are not two classes of cats and dogs. A head without class names with 1000
    rows is ImageNet-1k's in the standard order (as eval.py and infer.py read it), whose folders are the
    wnids: the tutorial fine-tunes its ImageNet head on such folders."""
    if head is None:
        return False
    rows, names = head
    if names is None and rows == len(imagenet_classes()):
        names = [wnid for wnid, _ in imagenet_classes()]
    return names is not None and list(names) == list(classes)


def _augmentation(cfg: TrainConfig) -> Optional[dict]:
    """create_dataset's per-image augmentation options; None: its plain random crop + flip."""
    if cfg.auto_augment == "none" and not cfg.color_jitter and not cfg.random_erasing:
        return None
    return dict(auto_augment=cfg.auto_augment, ra_num_ops=cfg.ra_num_ops, ra_magnitude=cfg.ra_magnitude,
                color_jitter=cfg.color_jitter, random_erasing=cfg.random_erasing)


def _build_data(cfg: TrainConfig, inputs: _Inputs, rank: int, group_size: int) -> _Data:
    """Class names, the model config they imply, and the train (sharded under msrun, augmented, mixed)
    and val pipelines."""
    root = inputs.root
    classes = data.class_names(root, "train")
    config, preprocess, head = _model_config(cfg, len(classes), inputs.pretrained, inputs.saved)
    shard = dict(num_shards=group_size, shard_id=rank) if cfg.distributed else {}
    # check: "full" decodes every file, "header" only opens it, "none" trusts the files.
    common = dict(num_workers=cfg.num_workers, class_names=classes, check=cfg.data_check)
    train_ds, train_info = data.create_dataset(root, "train", preprocess, cfg.batch_size, training=cfg.augment,
                                               shuffle=True, drop_remainder=True,
                                               crop_scale=(cfg.crop_min_scale, 1.0),
                                               augmentation=_augmentation(cfg) if cfg.augment else None,
                                               **shard, **common)
    # Every rank evaluates all of val, but each file is checked by one rank only.
    group = dict(check_group=(rank, group_size)) if cfg.distributed else {}
    val_ds, val_info = data.create_dataset(root, "val", preprocess, cfg.batch_size, training=False, **group,
                                           **common)
    steps_per_epoch = train_ds.get_dataset_size()
    if steps_per_epoch == 0:
        raise data.DatasetError(f"{root / 'train'} has fewer images per device than one batch of "
                                f"{cfg.batch_size}; lower --batch_size")
    whole = steps_per_epoch - steps_per_epoch % cfg.accum_steps
    if whole == 0:
        raise data.DatasetError(f"{root / 'train'} gives {steps_per_epoch} batch(es) of {cfg.batch_size} per epoch, "
                                f"fewer than one optimizer step of --accum_steps {cfg.accum_steps}; lower either")
    if whole < steps_per_epoch:
        # An epoch is whole optimizer steps, so the lr table and the epoch ends line up.
        logger.info("using %d of %d batches per epoch: a multiple of --accum_steps %d", whole, steps_per_epoch,
                    cfg.accum_steps)
        train_ds, steps_per_epoch = train_ds.take(whole), whole
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixer = data.MixupCutmix(len(classes), cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob,
                                 cfg.label_smoothing, seed=rank_seed(cfg.seed, rank))
        train_ds = data.add_batch_mixup(train_ds, mixer)  # labels become soft targets (B, classes)
    ema_val = None
    if cfg.ema_decay > 0 and rank == 0:  # only the writing rank evaluates the EMA
        ema_val, _ = data.create_dataset(root, "val", preprocess, cfg.batch_size, training=False,
                                         **dict(common, check="none"))  # checked above
    return _Data(classes, config, preprocess, train_ds, val_ds, steps_per_epoch, val_info.num_images,
                 steps_per_epoch // cfg.accum_steps, ema_val, head)


def _build_trainer(cfg: TrainConfig, batches: _Data, pretrained: Optional[Path], writer: bool) -> _Trainer:
    """The network (with pretrained weights), loss, schedule, optimizer, the train step and `Model` with its
    eval network, and the EMA's evaluation."""
    amp_level = amp_level_for(cfg)
    fast = use_fused_kernels(device_target=cfg.device_target, amp_level=amp_level)
    # The one fused-kernel policy, told what only training knows: the device and the AMP level to come.
    net = ViT(batches.config, fast=fast)
    if pretrained is not None:
        new_head = not _keeps_head(batches.head, batches.classes)
        report = ckpt.load_weights(net, pretrained, new_head=new_head)  # logs what it loaded, dropped, resampled
        if new_head:
            logger.info("a new zero-initialised head for the %d classes of the data (%s); %s", len(batches.classes),
                        _names(batches.classes), f"the weights' head is for {_head_text(batches.head)}"
                        if "head.weight" in report.dropped else "the weights have no head")
    if cfg.freeze_backbone:
        freeze_backbone(net, cfg.train_final_norm)  # before the optimizer takes the trainable parameters
    if cfg.recompute:
        apply_recompute(net)
        if cfg.mode != "graph":
            logger.warning("--recompute works in graph mode only; --mode %s keeps every activation", cfg.mode)
    loss_fn = SoftCrossEntropy(batches.config.num_classes, cfg.label_smoothing)  # int labels or soft targets
    schedule = lr_schedule(cfg, batches.optimizer_steps)
    optimizer = create_optimizer(net, cfg.optimizer, schedule, weight_decay=cfg.weight_decay,
                                 layer_decay=cfg.layer_decay, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                 beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps, fused=fast)
    eval_net = _eval_network(net, loss_fn, batches.config, amp_level)
    model_kwargs = dict(metrics=_metrics(batches.config), eval_network=eval_net, eval_indexes=[0, 1, 2])
    fine_tuning = cfg.clip_grad > 0 or cfg.accum_steps > 1 or cfg.ema_decay > 0
    if amp_level != "O0" and not fine_tuning:
        amp_kwargs = {}
        if cfg.device_target == "CPU":
            amp_kwargs["loss_scale_manager"] = None  # CPU has no dynamic loss scaling (overflow checks)
        model = Model(net, loss_fn=loss_fn, optimizer=optimizer, amp_level=amp_level, **model_kwargs, **amp_kwargs)
        return _Trainer(net, model, optimizer, schedule)
    if amp_level != "O0":
        # Only --amp_level auto gets here (explicit O1-O3 with these options is refused by TrainConfig).
        logger.warning("AMP %s with clip/accumulation/EMA: the network is cast, the step has no loss scaling",
                       amp_level)
        ms.amp.auto_mixed_precision(net, amp_level)
    ema = ModelEMA(net, cfg.ema_decay) if cfg.ema_decay > 0 else None
    step = TrainStep(nn.WithLossCell(net, loss_fn), optimizer, clip_grad=cfg.clip_grad,
                     accum_steps=cfg.accum_steps, ema=ema)
    model = Model(step, **model_kwargs)
    evaluator = None
    if ema is not None and writer:
        # A second model receives the averages before each evaluation; the trained one is never touched.
        ema_net = ViT(batches.config, fast=fast)
        evaluator = EmaEvaluator(ema, ema_net, _eval_network(ema_net, loss_fn, batches.config, amp_level),
                                 _metrics(batches.config), batches.ema_val)
    return _Trainer(net, model, optimizer, schedule, evaluator)


def _eval_network(net: nn.Cell, loss_fn: nn.Cell, config: ViTConfig, amp_level: str) -> nn.Cell:
    # The eval network sees the last, smaller val batch too: a dynamic batch dimension compiles it once
    # (as `set_dynamic_batch` declares for a bare net; this cell also takes the labels). Training uses
    # drop_remainder, so its graph keeps a static shape (and sinks on Ascend).
    eval_net = nn.WithEvalCell(net, loss_fn, add_cast_fp32=amp_level in ("O2", "O3"))
    set_dynamic_batch(eval_net, config, labels=True)
    return eval_net


def _metrics(config: ViTConfig) -> dict:
    metrics = {"top1": TopKCategoricalAccuracy(1)}
    if config.num_classes > 5:  # top-5 of five or fewer classes is always 100%
        metrics["top5"] = TopKCategoricalAccuracy(5)
    return metrics


def _open_run_folder(cfg: TrainConfig, out: Path, logs: rundir.RunLogging) -> None:
    """The inputs are sound: create the folder (clearing it with --overwrite), write config.json, and
    start train.log with the lines logged so far."""
    stale = rundir.prepare_run_folder(cfg, out)
    rundir.write_config(out, cfg)
    logs.open_file(out / rundir.LOG_FILE)
    if stale:
        logger.info("removed %d temporary file(s) an interrupted save left: %s", len(stale),
                    ", ".join(p.name for p in stale))


def _restore(train_network: nn.Cell, path: Path) -> dict:
    """Load weights and optimizer state from last.ckpt into the train network; returns its metadata."""
    # The learning-rate table is rebuilt from the settings (which may extend the run); the position in it
    # is the restored global_step.
    params, meta = ckpt.read_training_checkpoint(path)  # integrity-checked; raises CheckpointError
    # The lr tables (one per parameter group) come from the settings, not the file: the network's own stand
    # in for the saved ones, so MindSpore finds nothing missing (it logs a WARNING for each missing name).
    params = {name: value for name, value in params.items() if not name.startswith("learning_rate")}
    params.update({p.name: p for p in train_network.get_parameters() if p.name.startswith("learning_rate")})
    not_loaded, _ = ms.load_param_into_net(train_network, params, strict_load=True)
    if not_loaded:
        raise ckpt.CheckpointError(f"{path} lacks {len(not_loaded)} parameter(s) of this run's network and "
                                   f"optimizer (e.g. {not_loaded[:3]}); was it written with another model or "
                                   f"--optimizer, --accum_steps or --ema_decay?")
    return meta


def _global_step(optimizer: nn.Optimizer) -> int:
    return int(optimizer.global_step.asnumpy().reshape(-1)[0])


def _fit(cfg: TrainConfig, out: Path, batches: _Data, trainer: _Trainer, rank: int, group_size: int,
         extra: list) -> TrainResult:
    """Restore when resuming, run `Model.fit` with the run's callbacks, and report."""
    writer = rank == 0
    last_path, best_path = out / rundir.LAST_CKPT, out / rundir.BEST_CKPT
    initial_epoch, best_top1 = 0, -1.0
    if cfg.resume:
        saved = _restore(trainer.model.train_network, last_path)
        initial_epoch, best_top1 = int(saved["epoch"]), float(saved.get("best_top1", -1.0))
        if writer:
            rundir.trim_metrics(out, initial_epoch)
        logger.info("resumed from %s: epoch %d done, global step %d, best val top-1 %.2f%%", last_path,
                    initial_epoch, _global_step(trainer.optimizer), 100 * best_top1)
        _skip_finished_epochs(batches.train, initial_epoch, batches.steps_per_epoch, sink_mode_for(cfg))
    result = TrainResult(out, initial_epoch, max(best_top1, 0.0), (rundir.read_metrics(out) or [None])[-1],
                         best_path, last_path, rank)
    if initial_epoch >= cfg.epochs:
        logger.info("%s already holds epoch %d of %d: nothing to train (raise --epochs to continue)",
                    last_path, initial_epoch, cfg.epochs)
        return result

    state = RunState(lr=trainer.schedule, start_step=_global_step(trainer.optimizer),
                     batch_size=cfg.batch_size * group_size, best_top1=best_top1, accum_steps=cfg.accum_steps)
    stopper = StopOnSignal(state)
    callbacks = [LossGuard(state), stopper]
    if writer and cfg.progress_bar and sys.stderr.isatty():  # a log file gets the epoch lines only
        callbacks.append(ProgressBar(state, cfg.epochs))
    if writer:
        callbacks.append(EpochRecorder(state, out, trainer.net, _metadata(cfg, batches), cfg.epochs,
                                       top5=batches.config.num_classes > 5, ema=trainer.ema))
    logger.info("model%s: %s, %d trainable parameters; %d train steps of %d per epoch (%d optimizer steps), "
                "%d val images, %d classes", _preset_name(cfg.model, batches.config),
                {k: v for k, v in batches.config.to_dict().items() if k != "num_classes"},
                sum(p.size for p in trainer.net.trainable_params()), batches.steps_per_epoch,
                cfg.batch_size * group_size, batches.optimizer_steps, batches.val_images, len(batches.classes))
    started = time.perf_counter()
    stopper.install()
    try:
        trainer.model.fit(cfg.epochs, batches.train, batches.val, valid_frequency=1,
                          callbacks=callbacks + extra, dataset_sink_mode=sink_mode_for(cfg),
                          valid_dataset_sink_mode=False, initial_epoch=initial_epoch)
    except TrainingInterrupted as stop:
        stop.last_epoch = _saved_epoch(last_path)
        if writer:
            logger.warning("%s: stopped after epoch %d of %d (files consistent); continue with: %s",
                           stop, stop.last_epoch, cfg.epochs, rundir.resume_command(out))
        raise
    finally:
        if state.stop_signal is not None and not interrupts.is_routed():
            # Stopping, with Python handlers: MindSpore's runtime can deliver the same Ctrl-C a second time
            # once its own handler hands it on; during this last write that is no request to exit at once.
            for signum in StopOnSignal.SIGNALS:
                signal.signal(signum, signal.SIG_IGN)
        if writer:
            _plot_curves(out)
        stopper.uninstall()
    if state.diverged:
        epoch = _saved_epoch(last_path)
        kept = (f"the last good checkpoint is {last_path} (epoch {epoch})" if epoch
                else "no epoch finished, so no checkpoint was written")
        raise TrainingDiverged(f"{state.diverged}; {kept}. Lower --lr (now {cfg.lr:g}) or check the data.")

    records = rundir.read_metrics(out)
    result.epochs_done = records[-1]["epoch"] if records else cfg.epochs
    result.best_top1 = max(state.best_top1, 0.0)
    result.last_metrics = records[-1] if records else None
    if writer:
        logger.info("finished %d epoch(s) in %.1f s: best val top-1 %.2f%%; checkpoints %s and %s",
                    cfg.epochs - initial_epoch, time.perf_counter() - started, 100 * result.best_top1,
                    best_path, last_path)
    return result


def _draws_in_graph(config: ViTConfig) -> bool:
    """Whether training the model draws random numbers inside its graph (stochastic depth, dropout)."""
    return max(config.drop_path_rate, config.dropout, config.attention_dropout) > 0


def _preset_name(model: str, config: ViTConfig) -> str:
    """" vit_ti_16": the preset whose architecture `config` has (--model's first); "" for none (e.g. after
    --model_override), so that the log never names a model the run does not train."""
    shape = ("embed_dim", "depth", "num_heads", "mlp_dim", "patch_size")
    for name in [model] + [name for name in PRESETS if name != model]:
        preset = PRESETS.get(name)
        if preset is not None and all(getattr(preset, k) == getattr(config, k) for k in shape):
            return f" {name}"
    return ""


def _skip_finished_epochs(dataset, epochs_done: int, steps_per_epoch: int, sink_mode: bool) -> None:
    """Start the train pipeline where an uninterrupted run would be after `epochs_done` epochs.

    The shuffle order of every later epoch is then the uninterrupted run's (tested); random crops, flips
    and stochastic depth draw new numbers (MindSpore's fast recovery skips without replaying the random
    ops). The unit is MindSpore's own in `mindspore.train.model._calc_cb_initial_step`: epochs in sink
    mode, steps otherwise.
    """
    if epochs_done:
        dataset.set_init_step(epochs_done if sink_mode else epochs_done * steps_per_epoch)


def _metadata(cfg: TrainConfig, batches: _Data) -> dict:
    return ckpt.make_metadata(batches.config, batches.classes, batches.preprocess, train_config=cfg.to_dict())


def _saved_epoch(last_path: Path) -> int:
    """The epoch last.ckpt holds (0 when there is none)."""
    if not last_path.is_file():
        return 0
    return int((ckpt.read_metadata(last_path) or {}).get("epoch", 0))


def _plot_curves(out: Path) -> None:
    # Once per run, not per epoch: drawing costs about a second, a lot beside a small model's epoch.
    if not (out / rundir.METRICS_FILE).is_file():
        return
    from ..viz import plot_training_curves  # matplotlib only when a curve is drawn

    try:
        plot_training_curves(out / rundir.METRICS_FILE, out / rundir.CURVES_FILE)
    except (OSError, ValueError, KeyError) as error:  # a picture must never stop a training run
        logger.warning("could not draw %s: %s", out / rundir.CURVES_FILE, error)


__all__ = ["TrainResult", "train", "resolve_data_root"]
