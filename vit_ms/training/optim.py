"""What the optimizer steps with: the loss (int labels or soft targets), the learning-rate schedules (one
value per optimizer step), parameter groups with layer-wise learning-rate decay, the optimizer (Adam,
AdamW, SGD), a frozen backbone, and activation recomputation per encoder block.

Layer-wise lr decay follows BEiT (Bao et al., ICLR 2022) as MAE fine-tunes (He et al., CVPR 2022;
facebookresearch/mae `util/lr_decay.py`): with L blocks, the patch embedding, CLS token and position
embedding are layer 0, block i is layer i + 1, and everything after the blocks (final norm, head) is
layer L + 1; a parameter of layer l learns at lr * D^(L + 1 - l), so the head gets the full rate and the
embeddings the smallest. Norm gains, biases, the CLS token and the position embedding get no weight decay
(AdamW, SGD), as in DeiT/timm/MAE.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Sequence

import numpy as np

import mindspore as ms
from mindspore import nn, ops

from ..ops import adamw_update
from .config import OPTIMIZERS, TrainConfig

logger = logging.getLogger(__name__)

# Never decayed: 1-D tensors (norm gains, biases) and these embeddings, as in DeiT/timm/MAE.
NO_DECAY_NAMES = ("cls_token", "pos_embed")
EMBEDDING_PREFIXES = ("cls_token", "pos_embed", "patch_embed")


class SoftCrossEntropy(nn.LossBase):
    """Cross entropy for int labels (B,) or soft targets (B, C), e.g. from `vit_ms.data.MixupCutmix`.

    Int labels are smoothed with the tutorial's convention (on = 1 - s, off = s / (C - 1)); with s = 0 this
    is plain cross-entropy, the loss eval.py reports. Soft targets are used as given (Mixup already
    smoothed them). The loss is the batch mean of -sum_c t_c log softmax(logits)_c, in float32.

    Args:
        num_classes: width of the logits.
        smoothing: label smoothing s for int labels.
    """

    def __init__(self, num_classes: int, smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r} (flag --label_smoothing)")
        self.num_classes = num_classes
        self.on_value = ms.Tensor(1.0 - smoothing, ms.float32)
        self.off_value = ms.Tensor(smoothing / max(num_classes - 1, 1), ms.float32)

    def construct(self, logits, label):
        if label.ndim == 1:  # decided when the graph is compiled: int labels or soft targets
            target = ops.one_hot(label, self.num_classes, self.on_value, self.off_value)
        else:
            target = label.astype(ms.float32)
        # Under AMP the logits may arrive in float16; the log-softmax and the mean need float32.
        log_probs = ops.log_softmax(logits.astype(ms.float32), axis=-1)
        return -(target * log_probs).sum(axis=-1).mean()


# The tutorial's name for the same loss (int labels only there).
CrossEntropySmooth = SoftCrossEntropy


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


# ---------------------------------------------------------------------------------------------------------
# Parameter groups and the optimizer
# ---------------------------------------------------------------------------------------------------------

def layer_id(name: str, depth: int) -> int:
    """Layer of a parameter for layer-wise decay: embeddings 0, `blocks.i.*` i + 1, the rest depth + 1."""
    if name.startswith(EMBEDDING_PREFIXES):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_scale(name: str, depth: int, layer_decay: float) -> float:
    """Learning-rate multiplier D^(depth + 1 - layer) of a parameter; 1.0 for the head and final norm."""
    return _layer_scale(layer_id(name, depth), depth, layer_decay)


def _layer_scale(layer: int, depth: int, layer_decay: float) -> float:
    return float(layer_decay ** (depth + 1 - layer))


def _no_decay(param) -> bool:
    return param.ndim <= 1 or param.name.split(".")[-1] in NO_DECAY_NAMES


def param_groups(net: nn.Cell, lr_schedule: Sequence[float], layer_decay: float = 1.0,
                       weight_decay: float = 0.0, decay_all: bool = False) -> list:
    """Optimizer parameter groups of `net`'s trainable parameters: one per (layer, decay or not).

    Each group's "lr" is `lr_schedule` (one value per optimizer step) times the layer's scale (see the
    module docstring); "weight_decay" is `weight_decay`, or 0 for norms, biases, cls_token and pos_embed.
    The last entry fixes the parameter order to the network's (checkpoints keep their layout).

    Args:
        net: the ViT (its parameters named as `vit_ms.model.ViT` names them); needs `net.config.depth`
            or `net.blocks`.
        lr_schedule: the base learning rate of every optimizer step.
        layer_decay: D in (0, 1]; 1.0 gives every layer the base rate.
        weight_decay: decay of the matrices.
        decay_all: decay every parameter (nn.Adam's L2 convention in the tutorial recipe).
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay!r} (flag --layer_decay)")
    depth = len(net.blocks)
    schedule = np.asarray(lr_schedule, dtype=np.float32).reshape(-1)
    groups: Dict[tuple, List] = {}
    for param in net.trainable_params():
        lid = layer_id(param.name, depth)
        decayed = decay_all or not _no_decay(param)
        groups.setdefault((lid, decayed), []).append(param)
    result = []
    for (lid, decayed), params in sorted(groups.items()):
        scale = _layer_scale(lid, depth, layer_decay)
        result.append({"params": params, "lr": ms.Tensor(schedule * np.float32(scale)),
                       "weight_decay": float(weight_decay) if decayed else 0.0})
    result.append({"order_params": net.trainable_params()})
    return result


_adamw_step = ops.MultitypeFuncGraph("vit_ms_adamw_step")
# A graph constant, so a parameter without decay costs no extra node per step. The kernel reads the first
# float of each hyper-parameter, so lr and weight_decay go in as the optimizer holds them (shape ()).
_NO_DECAY = ms.Tensor(np.zeros(1, np.float32))


@_adamw_step.register("Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                      "Tensor", "Bool", "Bool")
def _adamw_step_one(kernel, beta1, beta2, eps, lr, weight_decay, param, m, v, gradient, decay_flag, optim_filter):
    """One parameter's update, as `nn.AdamWeightDecay`'s fused path runs it (decay only where flagged)."""
    if optim_filter:
        kernel(param, m, v, gradient, lr, beta1, beta2, eps, weight_decay if decay_flag else _NO_DECAY)
    return True


class FusedAdamWeightDecay(nn.AdamWeightDecay):
    """`nn.AdamWeightDecay`, same arguments, state (`adam_m.*`, `adam_v.*`: checkpoints move between the
    two) and update, with each parameter's update in one vectorised pass (`vit_ms.ops.adamw_update`)
    instead of MindSpore's CPU kernel, a scalar double-precision loop (4x slower; 21 % of a ViT-B/16
    batch-1 training step). Float32 CPU parameters only: `create_optimizer(..., fused=True)` picks it
    where the model runs on the fused kernels, and falls back to `nn.AdamWeightDecay` without them."""

    def __init__(self, params, learning_rate=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0,
                 kernel=None):
        super().__init__(params, learning_rate, beta1, beta2, eps, weight_decay)
        if kernel is None:
            raise ValueError("FusedAdamWeightDecay needs the vit_ms.ops.adamw_update kernel; use "
                             "create_optimizer(..., fused=True), which falls back to nn.AdamWeightDecay")
        not_float32 = [p.name for p in self._parameters if p.dtype != ms.float32]
        if not_float32:
            raise ValueError(f"FusedAdamWeightDecay updates float32 parameters only; {not_float32[:3]} are not")
        self.kernel = kernel

    @ms.jit(backend="ms_backend")
    def construct(self, gradients):
        weight_decay = self.get_weight_decay()
        lr = self.get_lr()
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        # One partial per branch, spelt out, as nn.AdamWeightDecay builds them: graph mode fails to compile a
        # partial of a partial, or one applied to an unpacked tuple.
        state = (self._parameters, self.moments1, self.moments2, gradients, self.decay_flags, self.optim_filter)
        if self.is_group and self.is_group_lr:
            step = ops.partial(_adamw_step, self.kernel, self.beta1, self.beta2, self.eps)
            result = self.hyper_map(step, lr, weight_decay, *state)
        elif self.is_group:
            step = ops.partial(_adamw_step, self.kernel, self.beta1, self.beta2, self.eps, lr)
            result = self.hyper_map(step, weight_decay, *state)
        else:
            step = ops.partial(_adamw_step, self.kernel, self.beta1, self.beta2, self.eps, lr, weight_decay)
            result = self.hyper_map(step, *state)
        if self.use_parallel:
            self.broadcast_params(result)
        return result


def adamw(params, *, fused: bool, **hyper) -> nn.Optimizer:
    """`FusedAdamWeightDecay(params, **hyper)` if `fused` and its kernel builds, else `nn.AdamWeightDecay`
    (with a WARNING where the kernel was asked for and could not build)."""
    kernel = adamw_update() if fused else None
    if fused and kernel is None:
        logger.warning("the fused AdamW kernel is unavailable: nn.AdamWeightDecay updates the weights")
    if kernel is not None:
        return FusedAdamWeightDecay(params, **hyper, kernel=kernel)
    return nn.AdamWeightDecay(params, **hyper)


def create_optimizer(net: nn.Cell, name: str, lr_schedule: Sequence[float], *, weight_decay: float = 0.0,
                     layer_decay: float = 1.0, momentum: float = 0.9, nesterov: bool = False,
                     beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                     fused: bool = False) -> nn.Optimizer:
    """The optimizer over `param_groups(net, ...)`, stepping through `lr_schedule`.

    "adam": `nn.Adam` (L2 decay on every parameter, the tutorial's); "adamw": `nn.AdamWeightDecay`
    (decoupled, none on norms/biases/cls/pos); "sgd": `nn.SGD` with momentum (and Nesterov), L2 decay
    none on norms/biases/cls/pos, as torchvision's and timm's SGD recipes.

    Args:
        net: the ViT.
        name: one of `OPTIMIZERS`.
        lr_schedule: the base learning rate per optimizer step.
        weight_decay, layer_decay: see `param_groups`.
        momentum, nesterov: SGD only.
        beta1, beta2, eps: Adam/AdamW only.
        fused: AdamW's update on the fused CPU kernel (`FusedAdamWeightDecay`) where it builds; pass
            what `vit_ms.layers.use_fused_kernels` decided for the model (CPU, float32).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is not one of {list(OPTIMIZERS)} (flag --optimizer)")
    groups = param_groups(net, lr_schedule, layer_decay, weight_decay, decay_all=name == "adam")
    base = ms.Tensor(np.asarray(lr_schedule, np.float32))  # every group overrides it
    if name == "adam":
        return nn.Adam(groups, learning_rate=base, beta1=beta1, beta2=beta2, eps=eps)
    if name == "adamw":
        return adamw(groups, fused=fused, learning_rate=base, beta1=beta1, beta2=beta2, eps=eps)
    if nesterov and momentum <= 0:
        raise ValueError("nesterov needs momentum > 0 (flags --nesterov, --momentum)")
    return nn.SGD(groups, learning_rate=base, momentum=momentum, nesterov=nesterov)


# ---------------------------------------------------------------------------------------------------------
# Frozen backbone and recomputation
# ---------------------------------------------------------------------------------------------------------

def freeze_backbone(net: nn.Cell, train_final_norm: bool = False) -> List[str]:
    """Make only the head (and optionally the final norm) trainable: a linear probe.

    Build the optimizer afterwards: it takes `net.trainable_params()`. Returns the trainable names.

    Args:
        net: the ViT.
        train_final_norm: also train `norm.gamma` / `norm.beta`.
    """
    trainable = ("head.", "norm.") if train_final_norm else ("head.",)
    names = []
    for param in net.get_parameters():
        param.requires_grad = param.name.startswith(trainable)
        if param.requires_grad:
            names.append(param.name)
    if not names:
        raise ValueError("freeze_backbone found no parameter named head.* to train; is this a vit_ms ViT?")
    logger.info("frozen backbone: training %s only", ", ".join(names))
    return names


def apply_recompute(net: nn.Cell) -> nn.Cell:
    """Recompute each encoder block's activations in the backward pass instead of keeping them.

    `Cell.recompute()` per block (graph mode): only each block's input stays alive between forward and
    backward, the memory of its attention maps and MLP activations is traded for a second forward pass.
    """
    for block in net.blocks:
        block.recompute()
    return net


__all__ = ["SoftCrossEntropy", "CrossEntropySmooth", "lr_schedule", "layer_id", "layer_scale", "param_groups",
           "create_optimizer", "adamw", "FusedAdamWeightDecay", "freeze_backbone", "apply_recompute", "NO_DECAY_NAMES"]
