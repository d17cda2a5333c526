"""Benchmark vit_ms against PyTorch and onnxruntime on this machine: images/s, GFLOP/s, first call, peak RSS.

Inference and one training step (cross-entropy + AdamW) for each preset and batch size, side by side:

- `mindspore`: graph mode, compiled for the batch size it is given (as training with `drop_remainder`);
  `mindspore-dynamic` declares a dynamic batch dimension (`vit_ms.set_dynamic_batch`: one graph for
  every batch size, what eval.py runs); `mindspore-packed` (inference only) is that with its weights
  packed for inference (`vit_ms.packing`), and `mindspore-packed-fixed` packed and compiled for its batch
  size (what infer.py runs where every batch is small and of one size, e.g. one image; a dynamic batch
  costs MindSpore's shape work at every step); `mindspore-pynative` is the same network in
  PyNative mode (no graph compile); `mindspore-plain` is `fast=False` (MindSpore's built-in ops);
  `mindspore-longspin` is `mindspore` with libgomp's own spin (GOMP_SPINCOUNT=300000, no OMP_WAIT_POLICY)
  instead of vit_ms's defaults (`vit_ms.threads`), for an A/B of those defaults in one run.
- `torch`: the tests' PyTorch reference ViT (`tests/torch_reference.py`), eager.
- `onnxruntime` (inference only): that same PyTorch model exported with `torch.onnx.export` (so the same
  weights as `torch`), run by onnxruntime's CPU provider with its default threads.

Every measurement runs in its own subprocess, so peak RSS (`ru_maxrss`) is that framework's alone; it is
split into what importing the framework costs and what the model, its activations and compiled graphs add.
The frameworks alternate round by round (the order reversed every other round), so a noisy machine slows
all alike; each figure is the median over rounds, and "spread" is (max - min) / median of images/s over
them. GFLOP/s counts the model's matrix products (forward 1x, training 3x) against the float32 GEMM
peak NumPy reaches, measured in the same run. Each table names the CPU and its widest vector ISA (AVX2 or
AVX-512, from /proc/cpuinfo): the fused kernels take different paths on each. MindSpore's "compile" is
the graph compile alone (`Cell.compile`); "first call" adds the first step to it. With
`--compile-cache DIR` a second run of the same command times a warm start.

    python benchmarks/bench_model.py                                   # Ti/S/B at 224, batch 1 and 16
    python benchmarks/bench_model.py --presets vit_s_16 --batches 16 --tasks infer --repeats 1
    python benchmarks/bench_model.py --tasks infer --frameworks mindspore,torch,onnxruntime
    python benchmarks/bench_model.py --presets vit_b_16 --image-size 384 --batches 8   # 577 tokens
    python benchmarks/bench_model.py --profile --presets vit_s_16 --batches 16 --tasks train  # time per op

PyTorch, onnx and onnxruntime are benchmark-time dependencies only; vit_ms never imports them.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("bench_model")
FRAMEWORKS = ("mindspore", "mindspore-dynamic", "mindspore-packed", "mindspore-packed-fixed", "mindspore-pynative",
              "mindspore-plain", "mindspore-longspin", "torch", "onnxruntime")
# the export has no training graph; packed weights no gradients
INFER_ONLY = ("onnxruntime", "mindspore-packed", "mindspore-packed-fixed")
# the frameworks that compile a graph (the compile column): every MindSpore one but PyNative
COMPILED = tuple(fw for fw in FRAMEWORKS if fw.startswith("mindspore") and fw != "mindspore-pynative")
ROOT = Path(__file__).resolve().parent.parent


# --- what a ViT costs ----------------------------------------------------------------------------

def forward_flops(config) -> int:
    """Multiply-adds x 2 of one image's forward pass (matrix products only; the rest is < 1 %)."""
    d, m, n = config.embed_dim, config.mlp_dim, config.num_patches + 1
    patch = 2 * config.num_patches * config.in_channels * config.patch_size ** 2 * d
    block = 2 * n * d * (3 * d + d + 2 * m) + 2 * 2 * n * n * d  # qkv, proj, fc1, fc2; q k^T and probs v
    return patch + config.depth * block + 2 * d * config.num_classes


def sgemm_peak_gflops(size: int = 1024, seconds: float = 1.0) -> float:
    """Best float32 GEMM rate NumPy reaches here: the ceiling for both frameworks."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    a @ b
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * size ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def cpu_label() -> str:
    """The CPU's model name and widest vector ISA the fused kernels can use, e.g. "AMD EPYC (AVX2, no AVX-512)"."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    name, flags = platform.machine(), set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name == platform.machine():
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2, no AVX-512" if "avx2" in flags else "no AVX2"
    return f"{name} ({isa}), {os.cpu_count()} logical CPUs"


# --- one measurement, in a fresh process ---------------------------------------------------------

def _torch_vit(config):
    """The same ViT from torch.nn parts: the tests' reference (`tests/torch_reference.py`), with
    torch.nn.MultiheadAttention doing the attention."""
    sys.path.insert(0, str(ROOT / "tests"))
    from torch_reference import TorchViT

    return TorchViT(config)


def _torch_step(config, task):
    import torch
    torch.manual_seed(0)
    net = _torch_vit(config)
    if task == "infer":
        net.eval()

        def step(x, y):
            with torch.no_grad():
                return net(x)
    else:
        loss_fn = torch.nn.CrossEntropyLoss()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.05)

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            return loss
    return step, lambda a: torch.from_numpy(a), lambda out: out.detach().numpy(), None


def export_onnx(config, path: Path) -> Path:
    """The PyTorch model (seed 0, as `torch` runs it) as ONNX with a dynamic batch, once per config."""
    import torch

    if path.is_file():
        return path
    torch.manual_seed(0)
    net = _torch_vit(config).eval()
    x = torch.zeros(1, config.in_channels, config.image_size, config.image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # dynamo=False: the TorchScript exporter, which needs only the `onnx` package (the dynamo one also
    # needs onnxscript). https://docs.pytorch.org/docs/stable/onnx_torchscript.html
    torch.onnx.export(net, (x,), str(tmp), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                      dynamo=False)
    tmp.rename(path)
    return path


def _onnx_step(model_path: str):
    import onnxruntime as ort

    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])

    def step(x, y):
        return session.run(None, {"images": x})[0]

    return step, (lambda a: a), (lambda out: out), None


def _mindspore_step(config, task, fast, dynamic, memory, compile_cache, pynative=False, packed=False):
    import mindspore as ms
    from mindspore import nn
    from vit_ms import create_model, set_dynamic_batch
    from vit_ms.training import adamw

    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE if pynative else ms.GRAPH_MODE)
    if memory:
        ms.set_context(memory_optimize_level="O1")
    if compile_cache:
        ms.set_context(enable_compile_cache=True, compile_cache_path=compile_cache)
    ms.set_seed(0)
    net = create_model(config, fast=fast)
    if task == "infer":
        net.set_train(False)
        if packed:
            from vit_ms.packing import pack_for_inference

            pack_for_inference(net)
        run = set_dynamic_batch(net, config) if dynamic else net
    else:
        # What train.py steps with: AdamW's update on the fused kernel wherever the model is fused.
        opt = adamw(net.trainable_params(), fused=fast, learning_rate=1e-4, weight_decay=0.05)
        step = nn.TrainOneStepCell(nn.WithLossCell(net, nn.CrossEntropyLoss()), opt)
        step.set_train(True)
        run = set_dynamic_batch(step, config, labels=True) if dynamic else step
    if task == "infer":
        compile_step = None if pynative else (lambda x, y: run.compile(x))
        return (lambda x, y: run(x)), (lambda a: ms.Tensor(a)), (lambda out: out.asnumpy()), compile_step
    return run, (lambda a: ms.Tensor(a)), (lambda out: out.asnumpy()), None if pynative else run.compile


def worker(args) -> dict:
    """Time one framework on one preset/batch/task; the caller runs this in a fresh process."""
    from vit_ms import get_config

    config = get_config(args.preset, image_size=args.image_size)
    # Peak RSS right after importing the framework: what the import alone costs, before any model exists.
    if args.framework == "torch":
        import torch
    elif args.framework == "onnxruntime":
        import onnxruntime  # noqa: F401
    else:
        import mindspore  # noqa: F401
    import_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.framework == "torch":
        if args.threads:
            torch.set_num_threads(args.threads)
        step, to_tensor, to_numpy, compile_step = _torch_step(config, args.task)
    elif args.framework == "onnxruntime":
        step, to_tensor, to_numpy, compile_step = _onnx_step(args.onnx_model)
    else:
        cache = None
        if args.compile_cache:
            cache = str(Path(args.compile_cache) / f"{args.framework}_{args.preset}_b{args.batch}_{args.task}")
        step, to_tensor, to_numpy, compile_step = _mindspore_step(
            config, args.task, args.framework != "mindspore-plain",
            args.framework in ("mindspore-dynamic", "mindspore-packed"), args.memory_optimize, cache,
            pynative=args.framework == "mindspore-pynative", packed=args.framework.startswith("mindspore-packed"))
    rng = np.random.default_rng(0)

    def batch(size):
        x = rng.standard_normal((size, config.in_channels, config.image_size, config.image_size), dtype=np.float32)
        y = rng.integers(0, config.num_classes, size).astype(np.int64 if args.framework == "torch" else np.int32)
        if args.framework == "onnxruntime":
            return x, y
        return to_tensor(x), to_tensor(y)

    x, y = batch(args.batch)
    t = time.perf_counter()
    if compile_step is not None:  # MindSpore: the graph compile alone, then the first step
        compile_step(x, y)
    compile_s = time.perf_counter() - t
    to_numpy(step(x, y))
    first_call = time.perf_counter() - t
    for _ in range(args.warmup):
        to_numpy(step(x, y))
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        to_numpy(step(x, y))
        times.append(time.perf_counter() - t)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before a second graph exists
    # A different batch size: a plain step with a dynamic batch dimension, a recompile without one.
    other = max(1, args.batch // 2) if args.batch > 1 else 2
    rebatch = float("nan")
    if not args.skip_rebatch:
        x2, y2 = batch(other)
        t = time.perf_counter()
        to_numpy(step(x2, y2))
        rebatch = time.perf_counter() - t
    step_s = statistics.median(times)
    return {"images_per_s": args.batch / step_s, "step_s": step_s, "first_call_s": first_call, "compile_s": compile_s,
            "rebatch_call_s": rebatch, "rebatch_size": other,
            "peak_rss_mb": peak_rss_mb, "import_rss_mb": import_rss_mb, "rebatch_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# --- where a MindSpore step's time goes ----------------------------------------------------------

_PARTS = (  # (substring of MindSpore's full op name, part), first match wins
    ("FusedLinear", "Dense layers (oneDNN sgemm + bias), forward and backward"),
    ("PatchProjection/Custom-op1", "Dense layers (oneDNN sgemm + bias), forward and backward"),
    ("Gradients/", None),  # the backward of the parts below: matched again without the prefix
    ("AttentionCore/Custom-op0", "attention products q k^T, probs v (sgemm), forward"),
    ("AttentionCore/Custom-op2", "attention products q k^T, probs v (sgemm), forward"),
    ("AttentionCore/Custom-op1", "softmax, forward"),
    ("AttentionCore", "attention products and softmax, backward"),
    ("LayerNorm", "LayerNorm"),
    ("GELU", "GELU"),
    ("AddN", "AddN (gradient sums)"),
    ("_loss_fn", "loss"),
    ("Adam", "AdamWeightDecay"),
    ("Assign", "AdamWeightDecay"),
)


def _part(name: str) -> str:
    for key, part in _PARTS:
        if key in name:
            if part is None:
                continue
            return part
    last = name.split("/")[-1].split("-")[0]
    return "Add (residuals, position embedding)" if last == "Add" else f"other ({last})"


def profile(args) -> str:
    """Time per part of one MindSpore step (MindSpore's profiler, 2 steps after 2 untimed ones), as Markdown."""
    import csv
    import glob
    import tempfile

    import mindspore as ms
    from vit_ms import get_config

    config = get_config(args.presets[0], image_size=args.image_size)
    step, to_tensor, to_numpy, _ = _mindspore_step(config, args.tasks[0], True, False, False, None)
    rng = np.random.default_rng(0)
    batch = args.batches[0]
    x = to_tensor(rng.standard_normal((batch, config.in_channels, config.image_size, config.image_size),
                                      dtype=np.float32))
    y = to_tensor(rng.integers(0, config.num_classes, batch).astype(np.int32))
    for _ in range(2):
        to_numpy(step(x, y))
    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    out = tempfile.mkdtemp(prefix="bench_profile_", dir=args.scratch)
    profiler = ms.Profiler(output_path=out)
    t = time.perf_counter()
    for _ in range(2):
        to_numpy(step(x, y))
    wall = (time.perf_counter() - t) / 2
    profiler.analyse()
    parts: dict = {}
    for path in glob.glob(f"{out}/**/cpu_op_detail_info_0.csv", recursive=True):
        for row in csv.DictReader(open(path)):
            part = _part(row["full_op_name"])
            parts[part] = parts.get(part, 0.0) + float(row["op_total_time(ms)"]) / 2
    total = sum(parts.values())
    lines = [f"{args.presets[0]} {args.tasks[0]} batch {batch}, {cpu_label()}: {total:.0f} ms of op time per "
             f"step, {wall * 1000:.0f} ms wall", "", "| part | ms per step | share |", "|---|---|---|"]
    lines += [f"| {part} | {ms_:.0f} | {100 * ms_ / total:.1f} % |"
              for part, ms_ in sorted(parts.items(), key=lambda kv: -kv[1]) if ms_ >= 1]
    return "\n".join(lines)


# --- the interleaved driver ----------------------------------------------------------------------

def measure(args, framework, preset, batch, task) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--framework", framework, "--presets", preset,
           "--batches", str(batch), "--tasks", task, "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--image-size", str(args.image_size), "--threads", str(args.threads)]
    if args.memory_optimize:
        cmd.append("--memory-optimize")
    if args.skip_rebatch:
        cmd.append("--skip-rebatch")
    if args.compile_cache:
        cmd += ["--compile-cache", str(args.compile_cache)]
    if framework == "onnxruntime":
        onnx_model = Path(args.scratch) / "onnx" / f"{preset}_{args.image_size}.onnx"
        if not onnx_model.is_file():
            # In its own process: a child inherits its parent's peak RSS (Linux keeps ru_maxrss across
            # fork and exec), so the driver must stay small for the workers' figures to be their own.
            subprocess.run([sys.executable, __file__, "--export-onnx", str(onnx_model), "--presets", preset,
                            "--image-size", str(args.image_size)], check=True, timeout=args.timeout)
        cmd += ["--onnx-model", str(onnx_model)]
    from vit_ms import threads

    # PyTorch at its own OpenMP defaults, not vit_ms's shorter spin (vit_ms.threads).
    env = dict(os.environ) if framework.startswith("mindspore") else threads.foreign_environment()
    if framework == "mindspore-longspin":  # libgomp's own: its default spin, no wait policy
        env[threads.SPIN_ENV] = threads.LIBGOMP_DEFAULT
        env.pop(threads.WAIT_ENV, None)
    env["GLOG_v"] = os.environ.get("GLOG_v", "3")
    # The worker runs in a scratch dir: MindSpore's graph compiler drops rank_0/ and kernel_meta/ there.
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=scratch,
                          timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{framework} {preset} batch {batch} {task} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def run(args) -> dict:
    from vit_ms import get_config

    peak = sgemm_peak_gflops()
    logger.info("float32 GEMM peak (NumPy, %d threads visible): %.1f GFLOP/s", os.cpu_count(), peak)
    rows = []
    for preset in args.presets:
        config = get_config(preset, image_size=args.image_size)
        for batch in args.batches:
            for task in args.tasks:
                frameworks = [fw for fw in args.frameworks if task == "infer" or fw not in INFER_ONLY]
                samples = {fw: [] for fw in frameworks}
                for rep in range(args.repeats):
                    # Alternate which framework goes first, so neither always gets the quieter slot.
                    order = frameworks if rep % 2 == 0 else frameworks[::-1]
                    for fw in order:
                        result = measure(args, fw, preset, batch, task)
                        samples[fw].append(result)
                        logger.info("%s %s b%d %s rep %d: %.2f img/s, compile %.1f s, first call %.1f s, "
                                    "peak RSS %.0f MB", preset, task, batch, fw, rep, result["images_per_s"],
                                    result["compile_s"], result["first_call_s"], result["peak_rss_mb"])
                flops = forward_flops(config) * (3 if task == "train" else 1)
                for fw, results in samples.items():
                    rates = [r["images_per_s"] for r in results]
                    ips = statistics.median(rates)
                    rows.append({
                        "preset": preset, "image_size": args.image_size, "batch": batch, "task": task,
                        "framework": fw, "images_per_s": ips, "spread": (max(rates) - min(rates)) / ips,
                        "gflop_per_s": ips * flops / 1e9,
                        "peak_fraction": ips * flops / 1e9 / peak,
                        "first_call_s": statistics.median(r["first_call_s"] for r in results),
                        "compile_s": statistics.median(r["compile_s"] for r in results),
                        "rebatch_call_s": statistics.median(r["rebatch_call_s"] for r in results),
                        "step_s": statistics.median(r["step_s"] for r in results),
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
                        "import_rss_mb": statistics.median(r["import_rss_mb"] for r in results),
                        "samples": results,
                    })
    return {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_label(),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                           "python": platform.python_version()},
            "sgemm_peak_gflops": peak, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
            "rows": rows}


def format_table(report: dict) -> str:
    """A Markdown table, one line per preset/batch/task/framework, with its ratio to PyTorch's line."""
    rows = report["rows"]
    peak = report["sgemm_peak_gflops"]
    lines = [f"CPU: {report['cpu']}; float32 GEMM peak (NumPy, same run): {peak:.0f} GFLOP/s; "
             f"medians of {report['settings']['repeats']} interleaved rounds",
             "",
             "| model | px | batch | task | framework | img/s | spread | vs torch | GFLOP/s | % of GEMM peak "
             "| compile s | first call s | RSS after import MB | peak RSS MB | held beyond import MB |",
             "|" + "---|" * 15]
    torch_rows = {(r["preset"], r["image_size"], r["batch"], r["task"]): r for r in rows if r["framework"] == "torch"}
    for r in rows:
        ref = torch_rows.get((r["preset"], r["image_size"], r["batch"], r["task"]))
        ratio = f"{r['images_per_s'] / ref['images_per_s']:.2f}x" if ref else ""
        spread = f"{100 * r['spread']:.0f}%" if len(r["samples"]) > 1 else "1 round"
        compile_s = f"{r['compile_s']:.1f}" if r["framework"] in COMPILED else ""
        lines.append(f"| {r['preset']} | {r['image_size']} | {r['batch']} | {r['task']} | {r['framework']} | "
                     f"{r['images_per_s']:.2f} | {spread} | {ratio} | {r['gflop_per_s']:.1f} | "
                     f"{100 * r['peak_fraction']:.0f}% | {compile_s} | {r['first_call_s']:.1f} | "
                     f"{r['import_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_rss_mb'] - r['import_rss_mb']:.0f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    def csv(kind):
        return lambda text: [kind(v) for v in text.split(",") if v]

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", type=csv(str), default=["vit_ti_16", "vit_s_16", "vit_b_16"],
                   help="comma-separated vit_ms preset names (default: vit_ti_16,vit_s_16,vit_b_16)")
    p.add_argument("--batches", type=csv(int), default=[1, 16], help="comma-separated batch sizes (default: 1,16)")
    p.add_argument("--tasks", type=csv(str), default=["infer", "train"],
                   help="infer (forward, no grad) and/or train (forward, backward, AdamW step); default both")
    p.add_argument("--frameworks", type=csv(str), default=["mindspore", "torch"],
                   help=f"any of {', '.join(FRAMEWORKS)}: mindspore compiles per batch size, "
                        "mindspore-dynamic once for all (set_dynamic_batch), mindspore-packed that with its "
                        "weights packed for inference, mindspore-packed-fixed packed and compiled per batch "
                        "size (infer.py's small batches of one size), mindspore-pynative without a "
                        "graph, mindspore-plain is fast=False, mindspore-longspin runs with libgomp's own "
                        "spin count, onnxruntime runs the PyTorch model's ONNX export "
                        "(inference only) (default: mindspore,torch)")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved rounds per measurement, each in a fresh process; the median counts (default 3)")
    p.add_argument("--iters", type=int, default=3, help="timed steps per process; the median counts (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first call (default 1)")
    p.add_argument("--image-size", type=int, default=224, help="input side in pixels (default 224)")
    p.add_argument("--threads", type=int, default=0,
                   help="PyTorch intra-op threads; 0 keeps PyTorch's default (all cores)")
    p.add_argument("--compile-cache", type=Path,
                   help="MindSpore's graph compile cache under this dir (one subdir per measurement): a second "
                        "run of the same command loads the compiled graphs, so its compile column is a warm start")
    p.add_argument("--memory-optimize", action="store_true",
                   help="MindSpore memory_optimize_level=O1 (memory reuse across the graph)")
    p.add_argument("--skip-rebatch", action="store_true",
                   help="leave out the extra call at another batch size (saves a step on big models)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds before one measurement is abandoned")
    p.add_argument("--scratch", default="outputs/bench_scratch",
                   help="working dir for the worker processes (MindSpore writes compiler files there)")
    p.add_argument("--output", type=Path, help="write the full report (every sample) as JSON here")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing: MindSpore's profiler on one vit_ms step of the first preset/batch/task, "
                        "time per part (Dense sgemm, attention, LayerNorm, ...)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--onnx-model", help=argparse.SUPPRESS)
    p.add_argument("--export-onnx", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--framework", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = sorted(set(args.frameworks) - set(FRAMEWORKS))
    if unknown:
        p.error(f"unknown framework(s) {unknown}; choose from {', '.join(FRAMEWORKS)}")
    unknown = sorted(set(args.tasks) - {"infer", "train"})
    if unknown:
        p.error(f"unknown task(s) {unknown}; choose infer and/or train")
    args.scratch = str(Path(args.scratch).resolve())
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.export_onnx:
        from vit_ms import get_config
        export_onnx(get_config(args.presets[0], image_size=args.image_size), args.export_onnx)
        return
    if args.profile:
        print(profile(args))
        return
    if args.worker:
        args.preset, args.batch, args.task = args.presets[0], args.batches[0], args.tasks[0]
        print(json.dumps(worker(args)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    report = run(args)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))
        logger.info("wrote %s", args.output)
    print(format_table(report))


if __name__ == "__main__":
    main()
