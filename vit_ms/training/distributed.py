"""Device set-up for a run: device target, execution mode, seed, and under `msrun` the communication
group (rank and group size) for data parallelism with averaged gradients."""
from __future__ import annotations

import os
from typing import Tuple

import numpy as np

import mindspore as ms

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
    # The same seed on every rank: identical initial weights, and each rank's shard is shuffled alike.
    ms.set_seed(cfg.seed)
    np.random.seed(cfg.seed)
    return rank, size


def amp_level_for(cfg: TrainConfig) -> str:
    """The AMP level the run uses: "auto" means O2 on Ascend (the tutorial's) and O0 elsewhere."""
    if cfg.amp_level != "auto":
        return cfg.amp_level
    return "O2" if cfg.device_target == "Ascend" else "O0"


def sink_mode_for(cfg: TrainConfig) -> bool:
    """Data sink mode: on for Ascend unless set; MindSpore ignores it on CPU anyway."""
    return cfg.device_target == "Ascend" if cfg.dataset_sink_mode is None else bool(cfg.dataset_sink_mode)


__all__ = ["DistributedJobError", "init_device", "amp_level_for", "sink_mode_for"]
