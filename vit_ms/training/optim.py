"""What the optimizer steps with: the label-smoothed loss, the learning-rate schedules (one value per
global step), AdamW parameter groups, and the optimizer itself."""
from __future__ import annotations

import math
from typing import List

import numpy as np

import mindspore as ms
from mindspore import nn, ops

from .config import TrainConfig

# Never decayed by AdamW: 1-D tensors (norm gains and biases) and these embeddings, as in DeiT/timm.
NO_DECAY_NAMES = ("cls_token", "pos_embed")


class CrossEntropySmooth(nn.LossBase):
    """Cross entropy against smoothed one-hot targets: on = 1 - s, off = s / (C - 1) (the tutorial's).

    With s = 0 this is plain cross-entropy, the loss eval.py reports.

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


__all__ = ["CrossEntropySmooth", "lr_schedule", "param_groups", "build_optimizer", "NO_DECAY_NAMES"]
