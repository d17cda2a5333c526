"""Training a ViT on `mindspore.train.Model.fit`, one concept per module:

    config.py       TrainConfig, the named RECIPES, resolve_train_config (no MindSpore import)
    optim.py        the loss (int or soft targets), lr schedules, parameter groups with layer-wise decay,
                    the optimizer (adam, adamw, sgd), frozen backbone, recomputation
    train_step.py   TrainStep: gradient clipping, accumulation over micro-batches, the EMA update
    ema.py          ModelEMA (the averaged weights) and EmaEvaluator
    callbacks.py    loss guard, Ctrl-C/SIGTERM handling, progress bar, epoch recorder (metrics + checkpoints)
    rundir.py       the run folder: what it holds, the no-clobber rule, metrics.jsonl, train.log
    distributed.py  device, mode, seed, and the msrun group
    loop.py         train(cfg, callbacks=()): check inputs, build data and model, open the folder, fit
    followups.py    the tutorial's evaluate / infer / export steps, in-process

Names are imported on first use, so `vit_ms.training.config` (and `train.py --help`) needs no MindSpore.
"""
from .._lazy import lazy_exports

_EXPORTS = {
    "config": ["TrainConfig", "RECIPES", "get_train_config", "resolve_train_config"],
    "optim": ["SoftCrossEntropy", "CrossEntropySmooth", "lr_schedule", "param_groups", "create_optimizer",
              "adamw", "FusedAdamWeightDecay", "layer_scale", "freeze_backbone", "apply_recompute"],
    "train_step": ["TrainStep"],
    "ema": ["ModelEMA", "EmaEvaluator"],
    "callbacks": ["TrainingDiverged", "TrainingInterrupted", "LossGuard", "StopOnSignal", "ProgressBar",
                  "EpochRecorder"],
    "rundir": ["RunFolderError", "read_metrics", "resume_command"],
    "distributed": ["amp_level_for", "sink_mode_for"],
    "loop": ["TrainResult", "train", "resolve_data_root"],
    "followups": ["run_followups"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
