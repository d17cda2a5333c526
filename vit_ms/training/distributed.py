"""Device set-up for a run: device target, execution mode, seeds, and under `msrun` the communication
group (rank and group size) for data parallelism with averaged gradients."""
from __future__ import annotations

import os
from typing import Tuple

import numpy as np

import mindspore as ms
import mindspore.dataset as ds
from mindspore import nn

from ..layers import DropPath
from .config import TrainConfig


class DistributedJobError(RuntimeError):
    """The msrun job lost a process (a worker died or timed out); --resume continues from the last epoch."""


def init_device(cfg: TrainConfig) -> Tuple[int, int]:
    """Set device, mode and seed; under `cfg.distributed` join the msrun group. Returns (rank, group size)."""
    ms.set_device(cfg.device_target)
    ms.set_context(mode=ms.GRAPH_MODE if cfg.mode == "graph" else ms.PYNATIVE_MODE)
    rank, size = 0, 1
    if cfg.distributed:
        from mindspore.communication import get_group_size, get_rank, init

        try:
            init()
        except RuntimeError as error:
            # msrun's scheduler process runs this script too and waits in init() for the whole job; when a
            # worker dies, MindSpore's heartbeat times it out (about 30 s) and init() raises with a long
            # C++ trace. One line instead; msrun's own log names the worker process that exited.
            role = "scheduler" if os.environ.get("MS_ROLE") == "MS_SCHED" else "worker"
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DistributedJobError(f"the msrun job stopped ({role} process: {first}); msrun's 'Worker "
                                      f"process ... exit' line names the process that died. Continue with "
                                      f"the same msrun command plus --resume") from error
        rank, size = get_rank(), get_group_size()
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                     device_num=size)
    # The same seed on every rank for what they must draw alike: the initial weights, and each epoch's
    # shuffle of the file list that the shards are cut from. `seed_rank_streams` parts them afterwards.
    ms.set_seed(cfg.seed)
    np.random.seed(cfg.seed)
    return rank, size


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s own random streams: seed + rank (rank 0, and a single process: `seed`)."""
    return seed + rank


def seed_rank_streams(seed: int, rank: int, net: nn.Cell) -> None:
    """Give this rank its own augmentation and stochastic-depth streams, once the shared draws are made.

    `init_device` seeds every rank alike so that the initial weights are the same and every rank cuts its
    shard from the same shuffle of the file list (MindSpore's DistributedSampler takes the dataset seed
    when the dataset is built: `self.seed = ds.config.get_seed()` in `mindspore/dataset/engine/samplers.py`).
    With nothing else, every rank would then also crop, flip, RandAugment, erase and drop the i-th sample of
    its shard exactly as every other rank does with its own i-th sample, so the ranks' augmentations repeat
    one another (measured: two shards of one image, pixel-equal batches). Call this after the datasets and
    the network are built and before training starts; from then on rank r draws from seed + r, as open_lm
    and open_clip reseed with `random_seed(args.seed, args.rank)` after creating the model (timm seeds
    seed + rank before it, and DDP then copies rank 0's weights).

    - the pipelines' C++ random ops read the dataset seed when the pipeline starts (`Model.fit` creates the
      iterator), not when they are built; `ds.config.set_seed` also seeds `random` and `numpy.random`,
      which MindSpore's RandomErasing draws from;
    - every DropPath of `net` (`DropPath.reseed`), before its graph compiles;
    - Mixup/CutMix has a generator of its own: build it with `rank_seed` too.
    """
    own = rank_seed(seed, rank)
    ds.config.set_seed(own)
    for _, cell in net.cells_and_names():
        if isinstance(cell, DropPath):
            cell.reseed(own)


def amp_level_for(cfg: TrainConfig) -> str:
    """The AMP level the run uses: "auto" means O2 on Ascend (the tutorial's) and O0 elsewhere."""
    if cfg.amp_level != "auto":
        return cfg.amp_level
    return "O2" if cfg.device_target == "Ascend" else "O0"


def sink_mode_for(cfg: TrainConfig) -> bool:
    """Data sink mode: on for Ascend unless set; MindSpore ignores it on CPU anyway."""
    return cfg.device_target == "Ascend" if cfg.dataset_sink_mode is None else bool(cfg.dataset_sink_mode)


__all__ = ["DistributedJobError", "init_device", "rank_seed", "seed_rank_streams", "amp_level_for",
           "sink_mode_for"]
