"""Eval-mode attention on the fused kernels: three kernels (scores, softmax, values: what training runs)
against the one kernel eval runs (`vit_ms.ops.fused_attention`), side by side in one process.

Each form runs as a compiled graph of 12 attention calls (a ViT's depth), each on its own input so no
call is folded into another; the two forms alternate round by round and each figure is the median.

    python benchmarks/bench_attention.py                      # ViT-Ti/S/B shapes, batch 1 and 16
    python benchmarks/bench_attention.py --batches 4 --tokens 577   # ViT-B at 384 px
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from vit_ms import get_config  # first: the OpenMP spin default must precede MindSpore's import


def build(form: str, scale: float):
    import mindspore as ms
    from mindspore import nn

    from vit_ms import ops as kernels

    scores, values = kernels.attention()
    softmax, fused = kernels.softmax(), kernels.fused_attention()
    scale_t = ms.Tensor([scale], ms.float32)

    class Twelve(nn.Cell):
        def construct(self, qkv):
            total = 0
            for i in range(12):
                q = qkv * (1.0 + 0.001 * i)  # a new input per call
                out = fused(q, scale_t) if form == "one kernel" else values(softmax(scores(q, scale_t)), q)
                total = total + out
            return total

    return Twelve()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="vit_ti_16,vit_s_16,vit_b_16", help="comma-separated (default: Ti,S,B)")
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes (default: 1,16)")
    p.add_argument("--tokens", type=int, default=197, help="sequence length (default 197: 224 px, patch 16)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per form (default 5)")
    p.add_argument("--iters", type=int, default=10, help="timed calls per round (default 10)")
    args = p.parse_args(argv)
    import mindspore as ms

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    forms = ("three kernels", "one kernel")
    print("| model | batch | heads | tokens | three kernels ms | one kernel ms | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        config = get_config(preset)
        heads, dim = config.num_heads, config.head_dim
        for batch in map(int, args.batches.split(",")):
            x = ms.Tensor(np.random.default_rng(0).standard_normal((batch, args.tokens, 3, heads, dim), np.float32))
            nets = {form: build(form, dim ** -0.5) for form in forms}
            for net in nets.values():
                net(x).asnumpy()  # compile + first call
            times = {form: [] for form in forms}
            for r in range(args.rounds):
                for form in (forms if r % 2 == 0 else forms[::-1]):
                    t = time.perf_counter()
                    for _ in range(args.iters):
                        nets[form](x).asnumpy()
                    times[form].append((time.perf_counter() - t) / args.iters * 1000)
            a, b = (statistics.median(times[f]) for f in forms)
            print(f"| {preset} | {batch} | {heads} | {args.tokens} | {a:.2f} | {b:.2f} | {a / b:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
