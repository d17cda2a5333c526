"""Peak memory of a training step with and without activation recomputation (`--recompute`).

Each configuration runs in its own process (two SGD steps through the fine-tuning `TrainStep`, 224 px,
graph mode, the fused CPU kernels) and reports the process's peak RSS, and its RSS before the first step
(weights, optimizer state, imports), so the difference is what the step itself holds: activations and
gradients. `--recompute` keeps only each encoder block's input between the forward and the backward pass
(MindSpore's `Cell.recompute()`) and recomputes the rest during the backward pass.

    python benchmarks/bench_recompute.py                                  # ViT-B/16 and ViT-L/16, batch 8
    python benchmarks/bench_recompute.py --presets vit_h_14 --batch 4
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, resource, sys
import numpy as np
import mindspore as ms
from mindspore import nn
from vit_ms.model import create_model
from vit_ms.training.optim import SoftCrossEntropy, apply_recompute, create_optimizer
from vit_ms.training.train_step import TrainStep
preset, recompute, batch = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
ms.set_device("CPU")
ms.set_context(mode=ms.GRAPH_MODE)
ms.set_seed(0)  # the same weights with and without recomputation
net = create_model(preset, num_classes=10)
if recompute:
    apply_recompute(net)
step = TrainStep(nn.WithLossCell(net, SoftCrossEntropy(10)), create_optimizer(net, "sgd", [1e-3] * 4))
step.set_train()
x = ms.Tensor(np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32))
y = ms.Tensor(np.arange(batch, dtype=np.int32) % 10)
before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
for _ in range(2):
    loss = step(x, y)
print(json.dumps({"before": before, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "loss": float(loss.asnumpy())}))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--presets", default="vit_b_16,vit_l_16", help="comma-separated model presets")
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    args = parser.parse_args(argv)
    env = {**os.environ, "GLOG_v": "3", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    rows = []
    for preset in args.presets.split(","):
        for recompute in (False, True):
            done = subprocess.run([sys.executable, "-c", _CHILD, preset, "1" if recompute else "0", str(args.batch)],
                                  env=env, capture_output=True, text=True, timeout=1800)
            if done.returncode:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            rows.append((preset, recompute, json.loads(done.stdout.strip().splitlines()[-1])))
    gib = 2 ** 30
    print(f"\nbatch {args.batch}, 224 px, 2 SGD steps, graph mode, CPU\n")
    print("| model | recompute | RSS before the first step | peak RSS | held by the step | loss after 2 steps |")
    print("|---|---|---|---|---|---|")
    for preset, recompute, r in rows:
        print(f"| {preset} | {'on' if recompute else 'off'} | {r['before'] / gib:.2f} GiB | {r['peak'] / gib:.2f} GiB "
              f"| {(r['peak'] - r['before']) / gib:.2f} GiB | {r['loss']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
