"""The fused CPU kernels one by one, called straight from their library (ctypes), outside any graph: what
each kernel itself costs at a ViT's shapes, without MindSpore's per-op launch, for every compiled variant
this CPU runs, and side by side with other builds of the library given with --library (e.g. one built
from an older checkout: `python -m vit_ms.ops build` there prints its path).

Each kernel runs on the same inputs in every library; libraries alternate round by round, and each figure
is the median over the rounds of the mean time per call (microseconds); "A vs B" is B's time over A's
(above 1: A is faster).

    python benchmarks/bench_kernels.py                                  # ViT-Ti/16, batch 1
    python benchmarks/bench_kernels.py --preset vit_b_16 --batch 16
    python benchmarks/bench_kernels.py --copies 12         # 12 layers' inputs and weights in turn: colder caches
    python benchmarks/bench_kernels.py --preset vit_s_16 --copies 12 --kernels EncoderBlockErf   # x 12: the encoder
    python benchmarks/bench_kernels.py --isas avx512 --library before=/tmp/old/vit_ms_kernels_avx512_....so
    python benchmarks/bench_kernels.py --preset vit_b_16 --copies 12 --kernels 'Linear qkv,Linear fc2' --onnxruntime
    python benchmarks/bench_kernels.py --preset vit_b_16 --copies 12 --kernels 'EncoderBlockErf,EncoderBlockErf packed'

With --onnxruntime the Dense rows (`Linear ...`) get one more column: the same x w^T + b as onnxruntime runs it
(one session holding a MatMul + Add per input set, weights as initializers, so MLAS packs them once, as it does
for a model's constant weights), alternating with the kernels in this process (onnxruntime's threads told not
to spin after each run, which would take a core from the next kernel; `onnx` and `onnxruntime` are
benchmark-time needs only).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time
from pathlib import Path

import numpy as np

from vit_ms import get_config  # first: the OpenMP spin default must precede libgomp's loading


def kernel_cases(config, batch: int, seed: int = 0) -> list:
    """(kernel name, [input arrays], [output shapes]) at `config`'s shapes for `batch` images."""
    from vit_ms.packing import pack_dense_weight as pack

    rng = np.random.default_rng(seed)
    n, d, heads, hd, mlp = config.num_patches + 1, config.embed_dim, config.num_heads, config.head_dim, config.mlp_dim

    def arr(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    tokens, hidden, eps = arr(batch, n, d), arr(batch, n, mlp), np.array([1e-6], np.float32)
    scores = arr(batch, heads, n, n, scale=3.0)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
    qkv, scale = arr(batch, n, 3, heads, hd), np.array([hd ** -0.5], np.float32)
    w_qkv, w_proj = arr(3 * d, d, scale=d ** -0.5), arr(d, d, scale=d ** -0.5)
    w_fc1, w_fc2 = arr(mlp, d, scale=d ** -0.5), arr(d, mlp, scale=mlp ** -0.5)
    gamma, beta = 1 + arr(d, scale=0.1), arr(d, scale=0.1)
    rows, hidden_rows = tokens.reshape(batch * n, d), hidden.reshape(batch * n, mlp)
    return [
        ("LayerNorm", [tokens, gamma, beta, eps], [tokens.shape]),
        ("LayerNormGrad", [tokens, gamma, tokens, eps], [tokens.shape]),
        ("LayerNormParamGrad", [tokens, tokens, eps], [(2, d)]),
        ("Softmax", [scores], [scores.shape]),
        ("SoftmaxGrad", [probs, scores], [scores.shape]),
        ("Attention", [qkv, scale], [(batch, n, heads, hd)]),
        ("AttentionGrad", [tokens.reshape(batch, n, heads, hd), qkv, scale], [qkv.shape]),
        ("GeluErf", [hidden], [hidden.shape]),
        ("GeluErfGrad", [hidden, hidden], [hidden.shape]),
        # Dense kernels on 2-D rows (batch * tokens, features), which every build of the library takes.
        ("Linear qkv", [rows, w_qkv, arr(3 * d)], [(batch * n, 3 * d)]),
        ("Linear proj", [rows, w_proj, arr(d)], [(batch * n, d)]),
        ("Linear fc1", [rows, w_fc1, arr(mlp)], [(batch * n, mlp)]),
        ("Linear fc2", [hidden_rows, w_fc2, arr(d)], [(batch * n, d)]),
        ("LinearGradInput fc1", [hidden_rows, w_fc1], [(batch * n, d)]),
        ("LinearGradWeight qkv", [np.ascontiguousarray(np.tile(rows, (1, 3))), rows], [(3 * d, d)]),
        ("LinearGradWeight fc1", [hidden_rows, rows], [(mlp, d)]),
        ("LinearGradWeight fc2", [rows, hidden_rows], [(d, mlp)]),
        # The whole eval block (block.cc: the kernels above in a row); with --copies set to the model's depth,
        # its time x depth is the encoder's share of an inference step with no graph around it.
        ("EncoderBlockErf", [tokens, gamma, beta, w_qkv, arr(3 * d), w_proj, arr(d), gamma, beta, w_fc1, arr(mlp),
                             w_fc2, arr(d), np.array([heads, 1e-6, hd ** -0.5], np.float32)], [tokens.shape]),
        # The same on weights packed for inference (vit_ms.packing; infer.py's small batches).
        ("LinearPacked qkv", [rows, pack(w_qkv), arr(3 * d)], [(batch * n, 3 * d)]),
        ("LinearPacked fc2", [hidden_rows, pack(w_fc2), arr(d)], [(batch * n, d)]),
        ("EncoderBlockErf packed", [tokens, gamma, beta, pack(w_qkv), arr(3 * d), pack(w_proj), arr(d), gamma, beta,
                                    pack(w_fc1), arr(mlp), pack(w_fc2), arr(d),
                                    np.array([heads, 1e-6, hd ** -0.5, 1], np.float32)], [tokens.shape]),
    ]


class Library:
    """One kernel library, its functions called with MindSpore's AOT convention."""

    SIGNATURE = [ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int),
                 ctypes.POINTER(ctypes.POINTER(ctypes.c_int64)), ctypes.POINTER(ctypes.c_char_p),
                 ctypes.c_void_p, ctypes.c_void_p]

    def __init__(self, path: str):
        self.path = path
        self.lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)

    def prepare(self, name: str, inputs, output_shapes):
        """A zero-argument callable running kernel `name` once (raises if it reports an error), or None
        where this build has no such kernel (an older one)."""
        symbol = name.split()[0]
        if not hasattr(self.lib, symbol):
            return None
        fn = getattr(self.lib, symbol)
        fn.restype, fn.argtypes = ctypes.c_int, self.SIGNATURE
        arrays = list(inputs) + [np.empty(shape, np.float32) for shape in output_shapes]
        count = len(arrays)
        shapes = [(ctypes.c_int64 * a.ndim)(*a.shape) for a in arrays]
        args = (count, (ctypes.c_void_p * count)(*[a.ctypes.data for a in arrays]),
                (ctypes.c_int * count)(*[a.ndim for a in arrays]),
                (ctypes.POINTER(ctypes.c_int64) * count)(*[ctypes.cast(s, ctypes.POINTER(ctypes.c_int64)) for s in shapes]),
                (ctypes.c_char_p * count)(*[b"float32"] * count), None, None)

        def call():
            if fn(*args) != 0:
                raise RuntimeError(f"{name} in {self.path} returned an error")

        call._keep = (arrays, shapes)  # the buffers must outlive the pointers
        return call


def _omp_threads() -> int:
    """The thread count the kernels' OpenMP regions use (OMP_NUM_THREADS, else the CPUs this process may run on)."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0]
    return int(value) if value.isdigit() and int(value) > 0 else len(os.sched_getaffinity(0))


class OnnxDense:
    """x w^T + b for every input set in turn, as onnxruntime runs a model's Dense layer (MatMul + Add on a
    constant weight, which its MLAS packs once at load): one session holding one MatMul + Add per input set,
    so one thread pool, run one node at a time."""

    label = "onnxruntime"

    def __init__(self, threads: int):
        import onnx  # noqa: F401  (both fail here, early, with the missing package's name)
        import onnxruntime

        self.threads, self.version = threads, onnxruntime.__version__

    def prepare_all(self, name: str, copies: list):
        """One callable running every input set's Dense layer once, or None for a row that is not a Dense one."""
        if not name.startswith("Linear ") or len(copies[0]) != 3:
            return None
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        # onnxruntime's threads: as many as the OpenMP team's, told not to spin after a run (a spinning thread
        # took a core from the next kernel: vit_ms's Dense kernels measured 0.71-0.81x of their time with it)
        nodes, weights, feeds, ins, outs = [], [], {}, [], []
        for i, (x, w, b) in enumerate(copies):
            nodes += [helper.make_node("MatMul", [f"x{i}", f"wt{i}"], [f"t{i}"]),
                      helper.make_node("Add", [f"t{i}", f"b{i}"], [f"y{i}"])]
            weights += [numpy_helper.from_array(np.ascontiguousarray(w.T), f"wt{i}"), numpy_helper.from_array(b, f"b{i}")]
            ins.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, list(x.shape)))
            outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [x.shape[0], w.shape[0]]))
            feeds[f"x{i}"] = x
        model = helper.make_model(helper.make_graph(nodes, "dense", ins, outs, weights),
                                  opset_imports=[helper.make_opsetid("", 17)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        # a sanity check that the session computes this product (float32 sums in its own order)
        expected = copies[0][0] @ copies[0][1].T + copies[0][2]
        got = session.run(["y0"], feeds)[0]
        if not np.allclose(got, expected, rtol=1e-4, atol=1e-3):
            raise RuntimeError(f"onnxruntime's {name} disagrees with x w^T + b")
        return lambda: session.run(None, feeds)


def time_call(calls, iters: int) -> float:
    """Mean microseconds per call over `iters` passes through `calls` (one kernel on each set of inputs)."""
    start = time.perf_counter()
    for _ in range(iters):
        for call in calls:
            call()
    return (time.perf_counter() - start) / (iters * len(calls)) * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="vit_ti_16", help="model whose shapes to use (default vit_ti_16)")
    p.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    p.add_argument("--library", action="append", default=[], metavar="[LABEL=]PATH",
                   help="another build of the kernel library to time beside this checkout's (repeatable)")
    p.add_argument("--isas", default=None,
                   help="comma-separated compiled variants of this checkout (default: every one this CPU runs)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per library (default 5)")
    p.add_argument("--seconds", type=float, default=0.05, help="time per kernel per round (default 0.05)")
    p.add_argument("--kernels", default=None, metavar="NAME[,NAME...]",
                   help="only these rows, e.g. 'EncoderBlockErf' or 'Linear qkv,Linear fc1' (default: every kernel)")
    p.add_argument("--copies", type=int, default=1,
                   help="distinct input and weight sets, called in turn (default 1: the same, cache-resident "
                        "data every call; a model's depth, e.g. 12, is closer to what a step sees)")
    p.add_argument("--onnxruntime", action="store_true",
                   help="add onnxruntime's MatMul + Add (weights packed once) beside the Dense rows, in this process")
    args = p.parse_args(argv)

    from vit_ms import ops as kernels

    isas = args.isas.split(",") if args.isas else list(kernels.cpu_isas())
    libraries = {isa: Library(kernels.library(isa)) for isa in isas}
    for value in args.library:
        label, _, path = value.rpartition("=")
        if not Path(path).is_file():
            p.error(f"--library {value}: no such file {path}")
        libraries[label or Path(path).stem] = Library(path)
    config = get_config(args.preset)
    onnx_dense = None
    if args.onnxruntime:
        try:
            onnx_dense = OnnxDense(threads=_omp_threads())
        except ImportError as err:
            p.error(f"--onnxruntime needs the onnx and onnxruntime packages (pip install onnx onnxruntime): {err}")
    labels = list(libraries) + ([OnnxDense.label] if onnx_dense else [])
    print(f"{args.preset}, batch {args.batch}, {args.copies} input set(s) in turn: microseconds per call, "
          f"median of {args.rounds} rounds "
          f"({', '.join(f'{k}: {Path(v.path).name}' for k, v in libraries.items())}"
          f"{f', onnxruntime {onnx_dense.version}, {onnx_dense.threads} threads' if onnx_dense else ''})\n")
    columns = ["kernel", *labels, *(f"{labels[0]} vs {k}" for k in labels[1:])]
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    cases = [kernel_cases(config, args.batch, seed) for seed in range(args.copies)]
    names = [name for name, _, _ in cases[0]]
    wanted = [k.strip() for k in args.kernels.split(",")] if args.kernels else names
    unknown = [k for k in wanted if k not in names]
    if unknown:
        p.error(f"--kernels: no kernel row {unknown}; the rows are {names}")
    for index, (name, _, outputs) in enumerate(cases[0]):
        if name not in wanted:
            continue
        calls = {label: [lib.prepare(name, copy[index][1], outputs) for copy in cases]
                 for label, lib in libraries.items()}
        calls = {label: label_calls for label, label_calls in calls.items() if None not in label_calls}
        if onnx_dense is not None:
            run_all = onnx_dense.prepare_all(name, [copy[index][1] for copy in cases])
            if run_all is not None:
                # one session.run covers every input set: counted as that many calls
                calls[OnnxDense.label] = [run_all] + [lambda: None] * (len(cases) - 1)
        iters = {}
        for label, label_calls in calls.items():
            time_call(label_calls, 1)  # first touch of the outputs, the library's one-time setup
            iters[label] = max(1, int(args.seconds * 1e6 / (time_call(label_calls, 3) * len(label_calls))))
        present = [label for label in labels if label in calls]  # "-" for a build without this kernel
        times = {label: [] for label in present}
        for r in range(args.rounds):
            for label in (present if r % 2 == 0 else present[::-1]):
                times[label].append(time_call(calls[label], iters[label]))
        med = {label: statistics.median(t) for label, t in times.items()}

        def ratio(k):
            return f"{med[k] / med[labels[0]]:.2f}x" if k in med and labels[0] in med else "-"

        cells = [name, *(f"{med[k]:.1f}" if k in med else "-" for k in labels), *(ratio(k) for k in labels[1:])]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
