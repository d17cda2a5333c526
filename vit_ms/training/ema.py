"""Exponential moving average of model weights (Polyak averaging), as DeiT and timm's `ModelEmaV2` keep:
after every optimizer step, ema = decay * ema + (1 - decay) * weight.

The averages are MindSpore Parameters named "ema.<weight name>", so a train cell that holds a `ModelEMA`
saves them into last.ckpt with the weights and optimizer state and `load_param_into_net` restores them on
resume, by name. `copy_to(net)` puts the averages into a model (e.g. an evaluation copy), and
`ema_state()` returns them under the model's own names, ready for `ms.save_checkpoint` as ema.ckpt.
`EmaEvaluator` scores the averages on the val split once per epoch (the training loop's best.ckpt takes
them when they score higher than the trained weights).
"""
from __future__ import annotations

from typing import Dict

import mindspore as ms
from mindspore import nn, ops
from mindspore.train import Model

EMA_PREFIX = "ema"


class ModelEMA(nn.Cell):
    """Moving averages of every parameter of `net`; calling the cell updates them once.

    Args:
        net: the model being trained.
        decay: weight of the old average per update, in [0, 1) (DeiT: 0.99996 per step on ImageNet).
    """

    def __init__(self, net: nn.Cell, decay: float):
        super().__init__(auto_prefix=False)  # keep the "ema.<name>" names whatever cell holds this one
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay!r} (flag --ema_decay)")
        self.decay = float(decay)
        self.weights = ms.ParameterTuple(net.get_parameters())
        # Frozen weights are averaged too (they stay equal to the weights): the EMA is a whole model.
        self.averages = self.weights.clone(prefix=EMA_PREFIX, init="same")
        for average in self.averages:
            average.requires_grad = False
        self.keep = ms.Tensor(self.decay, ms.float32)
        self.take = ms.Tensor(1.0 - self.decay, ms.float32)

    def construct(self):
        for average, weight in zip(self.averages, self.weights):
            ops.assign(average, average * self.keep + weight * self.take)
        return True

    def ema_state(self) -> Dict[str, ms.Tensor]:
        """The averages under the model's parameter names (a fresh copy of each)."""
        prefix = EMA_PREFIX + "."
        return {average.name[len(prefix):]: ms.Tensor(average.asnumpy()) for average in self.averages}

    def copy_to(self, net: nn.Cell) -> nn.Cell:
        """Load the averages into `net` (same architecture), e.g. an evaluation copy of the model."""
        not_loaded, _ = ms.load_param_into_net(net, {k: ms.Parameter(v, name=k) for k, v in self.ema_state().items()},
                                               strict_load=True)
        if not_loaded:
            raise ValueError(f"the EMA has no average for {len(not_loaded)} parameter(s) of the network "
                             f"(e.g. {not_loaded[:3]}): was it built from another model?")
        return net

    def reset(self):
        """Start the averages again from the current weights."""
        for average, weight in zip(self.averages, self.weights):
            average.set_data(weight.value().copy())


class EmaEvaluator:
    """Evaluates a `ModelEMA`'s averages: copies them into a second model of the same architecture and runs
    `Model.eval` on a val pipeline of its own (the training `Model` keeps iterating its own).

    Args:
        ema: the averages.
        net: a second model (same config as the trained one), receiving the averages.
        eval_net: `net` with its loss, returning (loss, logits, labels).
        metrics: fresh metric objects, e.g. {"top1": TopKCategoricalAccuracy(1)}.
        val_dataset: batches of (image, int label).
    """

    def __init__(self, ema: ModelEMA, net: nn.Cell, eval_net: nn.Cell, metrics: dict, val_dataset):
        self.ema = ema
        self.net = net
        self.model = Model(net, eval_network=eval_net, eval_indexes=[0, 1, 2], metrics=metrics)
        self.val_dataset = val_dataset

    def evaluate(self) -> dict:
        """The metrics of the current averages, e.g. {"top1": 0.9, "eval_loss": 0.3}; `net` then holds them."""
        self.ema.copy_to(self.net)
        return self.model.eval(self.val_dataset, dataset_sink_mode=False)


__all__ = ["ModelEMA", "EMA_PREFIX", "EmaEvaluator"]
