"""One training step as a Cell for `mindspore.train.Model`: gradients of a loss network, optionally
accumulated over K micro-batches, clipped by their global norm, applied by the optimizer, then the
model EMA updated; float32, no loss scaling.

Wiring (the loop keeps `Model.fit` with its callbacks and evaluation)::

    loss_net = nn.WithLossCell(net, SoftCrossEntropy(num_classes, smoothing))
    step = TrainStep(loss_net, optimizer, clip_grad=1.0, accum_steps=K, ema=ModelEMA(net, 0.9999))
    model = Model(step, eval_network=nn.WithEvalCell(net, loss_fn), eval_indexes=[0, 1, 2], metrics=...)
    model.fit(epochs, train_ds, val_ds, ...)

Each call of the cell is one micro-batch and returns its loss; the optimizer steps (and its global step,
which indexes the learning-rate table, advances) on every K-th call, with the mean of the K gradients, so
K micro-batches of B images step like one batch of K*B. Build the schedule with
`steps_per_epoch = batches_per_epoch // K`, and keep the batch count a multiple of K (drop_remainder and
an epoch size divisible by K), or the last micro-batches of an epoch carry over into the next.
Checkpoint `model.train_network` (this cell): it holds the weights, the optimizer state, the EMA
("ema.*"), the accumulated gradients ("accum_grad.*") and the micro-step counter, all restored by name.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops, Parameter

from .ema import ModelEMA


class TrainStep(nn.Cell):
    """loss_net(*inputs) -> loss; one call trains on one micro-batch.

    Args:
        network: the network with its loss (e.g. `nn.WithLossCell(net, loss)`).
        optimizer: steps the trainable parameters (`optimizer.parameters`).
        clip_grad: clip the (accumulated) gradient to this global L2 norm; 0 turns clipping off.
        accum_steps: micro-batches per optimizer step (K).
        ema: a `ModelEMA` of the model, updated after every optimizer step; None: no EMA.
    """

    def __init__(self, network: nn.Cell, optimizer: nn.Optimizer, *, clip_grad: float = 0.0, accum_steps: int = 1,
                 ema: ModelEMA = None):
        super().__init__(auto_prefix=False)  # parameter names stay the model's
        if clip_grad < 0:
            raise ValueError(f"clip_grad must be >= 0 (0: off), got {clip_grad!r} (flag --clip_grad)")
        if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
            raise ValueError(f"accum_steps must be a positive integer, got {accum_steps!r} (flag --accum_steps)")
        self.network = network
        self.network.set_grad()
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.grad_fn = ops.value_and_grad(network, None, self.weights)
        self.clip_grad = float(clip_grad)
        self.accum_steps = accum_steps
        self.ema = ema
        # Data parallel (msrun ... --distributed): average each micro-batch's gradients over the devices,
        # as nn.TrainOneStepCell does (untested here: no msrun test on this branch); nothing on one device.
        self.parallel = ms.get_auto_parallel_context("parallel_mode") in ("data_parallel", "hybrid_parallel")
        if self.parallel:
            self.grad_reducer = nn.DistributedGradReducer(self.weights, ms.get_auto_parallel_context("gradients_mean"),
                                                          ms.get_auto_parallel_context("device_num"))
        if accum_steps > 1:
            self.accumulated = self.weights.clone(prefix="accum_grad", init="zeros")
            self.micro_step = Parameter(ms.Tensor(0, ms.int32), name="accum_micro_step", requires_grad=False)
            self.inv_steps = ms.Tensor(1.0 / accum_steps, ms.float32)

    def apply(self, grads):
        """Clip, step the optimizer, then update the EMA."""
        if self.clip_grad > 0:
            grads = ops.clip_by_global_norm(grads, self.clip_grad)
        done = self.optimizer(grads)
        if self.ema is not None:
            done = ops.depend(self.ema(), done)  # average the weights the optimizer just wrote
        return done

    def construct(self, *inputs):
        loss, grads = self.grad_fn(*inputs)
        if self.parallel:
            grads = self.grad_reducer(grads)
        if self.accum_steps == 1:
            return ops.depend(loss, self.apply(grads))
        for total, grad in zip(self.accumulated, grads):
            ops.assign_add(total, grad)
        step = self.micro_step + 1
        ops.assign(self.micro_step, step)
        if step % self.accum_steps == 0:
            mean = tuple(total * self.inv_steps for total in self.accumulated)
            done = self.apply(mean)
            for total in self.accumulated:
                ops.assign(total, ops.depend(ops.zeros_like(total), done))
        return loss


__all__ = ["TrainStep"]
