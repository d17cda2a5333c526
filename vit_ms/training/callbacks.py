"""Callbacks of a training run on `mindspore.train.Model.fit`: the loss guard, interrupt handling, the
progress bar, and the epoch recorder that writes metrics and checkpoints. Tests and users add their own
through `train(cfg, callbacks=[...])`."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from mindspore import nn
from mindspore.train import Callback

from .. import checkpoint as ckpt
from .. import files, interrupts
from . import rundir

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped and the last good checkpoint was kept."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after a finished step; nothing of the unfinished epoch was saved.

    Attributes:
        signum: the signal received.
        last_epoch: the last epoch whose checkpoint is on disk (0: none).
    """

    def __init__(self, signum: int, last_epoch: int = 0):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.last_epoch = last_epoch

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # what a shell reports for a process ended by this signal: 130, 143


def _loss_value(outputs) -> float:
    # TrainOneStepCell returns the loss; the loss-scale variant returns (loss, overflow, scale).
    if isinstance(outputs, (tuple, list)):
        outputs = outputs[0]
    return float(np.asarray(outputs.asnumpy() if hasattr(outputs, "asnumpy") else outputs).mean())


@dataclasses.dataclass
class RunState:
    """What the callbacks of one run share."""

    lr: List[float]
    start_step: int  # optimizer global step when this process started training
    batch_size: int  # images per step across all ranks
    best_top1: float = -1.0
    diverged: Optional[str] = None  # the divergence message once the loss is not finite
    epoch_losses: List[float] = dataclasses.field(default_factory=list)
    epoch_start: float = 0.0
    train_seconds: float = 0.0
    stop_signal: Optional[int] = None  # set by the first SIGINT/SIGTERM
    accum_steps: int = 1  # micro-batches (callback steps) per optimizer step

    def global_step(self, cb_params) -> int:
        """The optimizer's global step (the lr table's index) after this callback step."""
        return self.start_step + cb_params.cur_step_num // self.accum_steps

    def current_lr(self, cb_params) -> float:
        step = self.global_step(cb_params)
        return self.lr[min(max(step - 1, 0), len(self.lr) - 1)]


class LossGuard(Callback):
    """Records every step's loss and stops the run at the first NaN/inf loss, before it is saved."""

    def __init__(self, state: RunState):
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


class StopOnSignal(Callback):
    """SIGINT (Ctrl-C) and SIGTERM: the first ends the run after the current step, before anything of the
    unfinished epoch is written (an epoch being saved is finished first); a second exits at once.

    Active for the duration of `Model.fit` only. Where the script routed the signals to a watcher thread
    (`vit_ms.interrupts`, as train.py does), this listens there, and a Ctrl-C is reported as SIGINT even when
    it lands inside a graph run. Otherwise it installs Python handlers and puts them back at every step and
    evaluation, since MindSpore replaces the SIGINT handler around every graph run with one that turns the
    Ctrl-C into SIGTERM (see `vit_ms.interrupts`): such a Ctrl-C is then reported as SIGTERM.
    """

    SIGNALS = interrupts.SIGNALS

    def __init__(self, state: RunState):
        super().__init__()
        self.state = state
        self.previous = {}  # Python handlers replaced (signals not routed)
        self.listening: Optional[contextlib.ExitStack] = None  # while listening to the watcher thread

    def install(self) -> None:
        if interrupts.is_routed():
            if self.listening is None:
                self.listening = contextlib.ExitStack()
                self.listening.enter_context(interrupts.listening(lambda signum: self._handle(signum, None)))
            return
        for signum in self.SIGNALS:
            previous = signal.signal(signum, self._handle)
            self.previous.setdefault(signum, previous)

    def on_train_begin(self, run_context):
        self.install()

    on_train_epoch_begin = on_train_step_begin = on_train_epoch_end = on_train_begin
    on_eval_begin = on_eval_step_end = on_eval_end = on_train_begin

    def uninstall(self) -> None:
        if self.listening is not None:
            self.listening.close()
            self.listening = None
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        if self.state.stop_signal is not None:
            sys.stderr.write(f"\n{signal.Signals(signum).name} again: exiting at once\n")
            sys.stderr.flush()
            os._exit(128 + signum)  # a temporary file this leaves is removed by the next start
        self.state.stop_signal = signum
        sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping after the current step "
                         f"(again to exit at once)\n")
        sys.stderr.flush()

    def on_train_step_end(self, run_context):
        if self.state.stop_signal is not None:
            # Leave fit at once: its own stop request would still run the epoch's evaluation.
            raise TrainingInterrupted(self.state.stop_signal)


class ProgressBar(Callback):
    """A tqdm bar per epoch showing loss, learning rate and images per second (terminal only)."""

    def __init__(self, state: RunState, total_epochs: int):
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
    """The writing rank's epoch end: a metrics.jsonl line, best.ckpt when top-1 improved, ema.ckpt (with an
    EMA), last.ckpt.

    With an `EmaEvaluator` the EMA weights are evaluated too (`ema_top1`, `ema_val_loss_smoothed` in the
    metrics line), and best.ckpt takes whichever of the trained and the EMA weights scores the higher
    top-1 when that beats the best so far; the log says which.

    metrics.jsonl fields: epoch, step (global), train_loss_smoothed (mean label-smoothed training loss,
    what the optimizer minimises), top1 and top5 (val accuracy; top5 only with more than 5 classes),
    val_loss_smoothed
    (the same label-smoothed loss on val; eval.py's "loss" is plain cross-entropy), lr, time, images_per_sec.

    The order matters for resume: the metrics line goes first and last.ckpt last, and resuming drops
    metrics lines beyond last.ckpt's epoch, so every epoch appears exactly once.
    """

    def __init__(self, state: RunState, out: Path, net: nn.Cell, meta: dict, total_epochs: int,
                 top5: bool, ema=None):
        super().__init__()
        self.ema = ema
        self.state = state
        self.out = out
        self.net = net
        self.meta = meta
        self.total_epochs = total_epochs
        self.top5 = top5

    def on_train_epoch_end(self, run_context):
        if self.state.diverged:
            return  # keep the last good checkpoint and metrics untouched
        cb_params = run_context.original_args()
        epoch = cb_params.cur_epoch_num
        step = self.state.global_step(cb_params)
        results = cb_params.get("eval_results") or {}
        losses = self.state.epoch_losses
        record = {"epoch": epoch, "step": step,
                  "train_loss_smoothed": float(np.mean(losses)) if losses else float("nan"),
                  "top1": float(results.get("top1", float("nan")))}
        if self.top5:
            record["top5"] = float(results.get("top5", float("nan")))
        ema_results = self.ema.evaluate() if self.ema is not None else None
        if ema_results is not None:
            record["ema_top1"] = float(ema_results.get("top1", float("nan")))
        record.update({
            "val_loss_smoothed": float(results.get("eval_loss", float("nan"))),
            "lr": self.state.current_lr(cb_params),
            "time": round(time.perf_counter() - self.state.epoch_start, 3),
            "images_per_sec": round(len(losses) * self.state.batch_size / max(self.state.train_seconds, 1e-9), 1),
        })
        if ema_results is not None:
            record["ema_val_loss_smoothed"] = float(ema_results.get("eval_loss", float("nan")))
        top5 = f", top-5 {100 * record['top5']:.2f}%" if self.top5 else ""
        ema = f", EMA top-1 {100 * record['ema_top1']:.2f}%" if ema_results is not None else ""
        logger.info("epoch %d/%d: train loss (label-smoothed) %.4f, val top-1 %.2f%%%s%s, val loss (label-smoothed) "
                    "%.4f, lr %.3g, %.1f s, %.0f images/s", epoch, self.total_epochs, record["train_loss_smoothed"],
                    100 * record["top1"], top5, ema, record["val_loss_smoothed"], record["lr"], record["time"],
                    record["images_per_sec"])
        rundir.append_metrics(self.out, record)
        use_ema = ema_results is not None and record["ema_top1"] > record["top1"]
        top1 = record["ema_top1"] if use_ema else record["top1"]
        improved = top1 > self.state.best_top1
        if improved:
            self.state.best_top1 = top1
        meta = dict(self.meta, epoch=epoch, global_step=step, metrics=record, best_top1=self.state.best_top1)
        if improved:
            self._save(self.ema.net if use_ema else self.net, self.out / rundir.BEST_CKPT,
                       dict(meta, weights="ema" if use_ema else "trained"))
            if ema_results is None:
                logger.info("new best val top-1 %.2f%%: wrote %s", 100 * top1, self.out / rundir.BEST_CKPT)
            elif use_ema:
                logger.info("new best val top-1 %.2f%%: wrote %s from the EMA weights (top-1 %.2f%% vs %.2f%% "
                            "trained)", 100 * top1, self.out / rundir.BEST_CKPT, 100 * record["ema_top1"],
                            100 * record["top1"])
            else:
                logger.info("new best val top-1 %.2f%%: wrote %s from the trained weights (top-1 %.2f%% vs "
                            "%.2f%% EMA)", 100 * top1, self.out / rundir.BEST_CKPT, 100 * record["top1"],
                            100 * record["ema_top1"])
        if ema_results is not None:  # the EMA net holds the averages since evaluate()
            self._save(self.ema.net, self.out / rundir.EMA_CKPT, dict(meta, weights="ema"))
        # last.ckpt holds the optimizer too (moments, global step, beta powers): all of the train network.
        self._save(cb_params.train_network, self.out / rundir.LAST_CKPT, meta)

    @staticmethod
    def _save(params, path: Path, meta: dict) -> None:
        try:
            ckpt.save_checkpoint(params, path, meta)
        except (OSError, RuntimeError, ValueError) as error:  # a full disk surfaces as any of these
            # ms.save_checkpoint leaves its own "<temporary>.tmp" behind when a write fails; only this rank
            # writes into the folder, so every temporary in it is ours to remove.
            files.remove_stale_temporaries(path.parent)
            kept = f"the previous {path.name} is kept" if path.is_file() else f"no {path.name} was written"
            raise rundir.RunFolderError(f"could not write {path} ({error}); {kept}. Free disk space, then "
                                        f"continue with: {rundir.resume_command(path.parent)}") from error


__all__ = ["TrainingDiverged", "TrainingInterrupted", "RunState", "LossGuard", "StopOnSignal", "ProgressBar",
           "EpochRecorder"]
