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
    python benchmarks/bench_kernels.py --preset vit_s_16 --copies 12 --kernels 'EncoderBlockErf packed' --onnxruntime

With --onnxruntime the Dense rows (`Linear ...`) and the whole-block rows (`EncoderBlockErf`) get one more
column: the same work as onnxruntime runs it, alternating with the kernels in this process. A Dense row is a
MatMul + Add on a constant weight (MLAS packs it once, as it does for a model's constant weights), its threads
told not to spin after each run (which would take a core from the next kernel); a block row is the block's
graph as PyTorch's ONNX export writes it (LayerNormalization, MatMul + Add, the heads by Reshape/Transpose/
Split, Softmax, GELU from Erf), with onnxruntime's own spin between its ~30 nodes. One session per row holds
every input set; the packed rows (`LinearPacked ...`, `... packed`) get their plain twin's session, the same
weights. Each session's output is checked against the kernel's first. `onnx` and `onnxruntime` are
benchmark-time needs only.
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
    b_qkv, b_proj, b_fc1, b_fc2 = arr(3 * d), arr(d), arr(mlp), arr(d)  # shared by the plain and packed rows
    rows, hidden_rows = tokens.reshape(batch * n, d), hidden.reshape(batch * n, mlp)
    settings = np.array([heads, 1e-6, hd ** -0.5], np.float32)
    block = [tokens, gamma, beta, w_qkv, b_qkv, w_proj, b_proj, gamma, beta, w_fc1, b_fc1, w_fc2, b_fc2, settings]
    packed_block = [pack(a) if a.ndim == 2 else a for a in block[:-1]] + [np.append(settings, 1).astype(np.float32)]
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
        ("Linear qkv", [rows, w_qkv, b_qkv], [(batch * n, 3 * d)]),
        ("Linear proj", [rows, w_proj, b_proj], [(batch * n, d)]),
        ("Linear fc1", [rows, w_fc1, b_fc1], [(batch * n, mlp)]),
        ("Linear fc2", [hidden_rows, w_fc2, b_fc2], [(batch * n, d)]),
        ("LinearGradInput fc1", [hidden_rows, w_fc1], [(batch * n, d)]),
        ("LinearGradWeight qkv", [np.ascontiguousarray(np.tile(rows, (1, 3))), rows], [(3 * d, d)]),
        ("LinearGradWeight fc1", [hidden_rows, rows], [(mlp, d)]),
        ("LinearGradWeight fc2", [rows, hidden_rows], [(d, mlp)]),
        # The whole eval block (block.cc: the kernels above in a row); with --copies set to the model's depth,
        # its time x depth is the encoder's share of an inference step with no graph around it.
        ("EncoderBlockErf", block, [tokens.shape]),
        # The same on weights packed for inference (vit_ms.packing; infer.py's small batches).
        ("LinearPacked qkv", [rows, pack(w_qkv), b_qkv], [(batch * n, 3 * d)]),
        ("LinearPacked fc2", [hidden_rows, pack(w_fc2), b_fc2], [(batch * n, d)]),
        ("EncoderBlockErf packed", packed_block, [tokens.shape]),
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


class OnnxRuntime:
    """The same work as onnxruntime runs it, for the Dense rows and the whole-block rows: one session per row
    holding one copy of the work per input set (so one thread pool, one node at a time), weights as
    initializers, so that MLAS packs them once at load, as it does for a model's constant weights. A row on
    packed weights (`LinearPacked ...`, `... packed`) gets the session of its plain twin: the same weights."""

    label = "onnxruntime"

    def __init__(self, threads: int):
        import onnx  # noqa: F401  (both fail here, early, with the missing package's name)
        import onnxruntime

        self.threads, self.version = threads, onnxruntime.__version__

    @staticmethod
    def plain_row(name: str) -> str:
        """The row holding the same weights unpacked ("LinearPacked qkv" -> "Linear qkv")."""
        return name.replace("LinearPacked ", "Linear ").replace(" packed", "")

    def prepare_all(self, name: str, copies: list):
        """One callable running every input set's work once, or None for a row with no such twin here.
        `copies`: the plain row's inputs per input set."""
        from onnx import TensorProto, helper, numpy_helper

        if name.startswith("Linear ") and len(copies[0]) == 3:
            build, spin = self._dense, False
        elif name == "EncoderBlockErf":
            build, spin = self._block, True
        else:
            return None
        nodes, weights, feeds, ins, outs = [], [], {}, [], []
        for i, inputs in enumerate(copies):
            x = inputs[0]
            nodes_i, weights_i, out_shape = build(i, inputs, helper, numpy_helper)
            nodes += nodes_i
            weights += weights_i
            ins.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, list(x.shape)))
            outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, list(out_shape)))
            feeds[f"x{i}"] = x
        model = helper.make_model(helper.make_graph(nodes, name.replace(" ", "_"), ins, outs, weights),
                                  opset_imports=[helper.make_opsetid("", 17)])
        session = self._session(model.SerializeToString(), spin)
        return session, feeds

    def _session(self, model: bytes, spin: bool):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if not spin:
            # told not to spin after a run: a spinning thread took a core from the next kernel (vit_ms's Dense
            # kernels measured 0.71-0.81x of their time with it). A block's graph runs some 30 small nodes one
            # after another, and without the spin between them its time grew by half (ViT-S b1): it spins.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    @staticmethod
    def _dense(i, inputs, helper, numpy_helper):
        x, w, b = inputs
        nodes = [helper.make_node("MatMul", [f"x{i}", f"wt{i}"], [f"t{i}"]),
                 helper.make_node("Add", [f"t{i}", f"b{i}"], [f"y{i}"])]
        weights = [numpy_helper.from_array(np.ascontiguousarray(w.T), f"wt{i}"), numpy_helper.from_array(b, f"b{i}")]
        return nodes, weights, (x.shape[0], w.shape[0])

    @staticmethod
    def _block(i, inputs, helper, numpy_helper):
        """The eval block as PyTorch's ONNX export writes it (LayerNormalization, MatMul + Add, heads by
        Reshape/Transpose/Split, Softmax, GELU from Erf, which onnxruntime fuses into its Gelu)."""
        x, g1, b1, w_qkv, b_qkv, w_proj, b_proj, g2, b2, w_fc1, b_fc1, w_fc2, b_fc2, settings = inputs
        batch, n, d = x.shape
        heads, eps, scale = int(settings[0]), float(settings[1]), float(settings[2])
        hd = d // heads
        consts = {"g1": g1, "b1": b1, "wqkv": w_qkv.T, "bqkv": b_qkv, "wproj": w_proj.T, "bproj": b_proj,
                  "g2": g2, "b2": b2, "wfc1": w_fc1.T, "bfc1": b_fc1, "wfc2": w_fc2.T, "bfc2": b_fc2,
                  "heads_shape": np.array([batch, n, 3, heads, hd], np.int64),
                  "merged_shape": np.array([batch, n, d], np.int64), "split": np.array([1, 1, 1], np.int64),
                  "axis0": np.array([0], np.int64), "scale": np.array(scale, np.float32),
                  "sqrt2": np.array(np.sqrt(2.0), np.float32), "one": np.array(1.0, np.float32),
                  "half": np.array(0.5, np.float32)}

        def t(name):  # this input set's tensor names: x0, y0 (the graph's input and output), ln1_0, ...
            return f"{name}{i}" if name in ("x", "y") else f"{name}_{i}"

        weights = [numpy_helper.from_array(np.ascontiguousarray(v), t(k)) for k, v in consts.items()]
        node = helper.make_node
        nodes = [
            node("LayerNormalization", [t("x"), t("g1"), t("b1")], [t("ln1")], axis=-1, epsilon=eps),
            node("MatMul", [t("ln1"), t("wqkv")], [t("qkv0")]), node("Add", [t("qkv0"), t("bqkv")], [t("qkv")]),
            node("Reshape", [t("qkv"), t("heads_shape")], [t("qkv5")]),
            node("Transpose", [t("qkv5")], [t("qkvt")], perm=[2, 0, 3, 1, 4]),  # (3, B, heads, N, hd)
            node("Split", [t("qkvt"), t("split")], [t("q1"), t("k1"), t("v1")], axis=0),
            node("Squeeze", [t("q1"), t("axis0")], [t("q")]), node("Squeeze", [t("k1"), t("axis0")], [t("k")]),
            node("Squeeze", [t("v1"), t("axis0")], [t("v")]),
            node("Transpose", [t("k")], [t("kt")], perm=[0, 1, 3, 2]),
            node("MatMul", [t("q"), t("kt")], [t("s0")]), node("Mul", [t("s0"), t("scale")], [t("s")]),
            node("Softmax", [t("s")], [t("p")], axis=-1),
            node("MatMul", [t("p"), t("v")], [t("o")]),
            node("Transpose", [t("o")], [t("ot")], perm=[0, 2, 1, 3]),
            node("Reshape", [t("ot"), t("merged_shape")], [t("att")]),
            node("MatMul", [t("att"), t("wproj")], [t("pr0")]), node("Add", [t("pr0"), t("bproj")], [t("pr")]),
            node("Add", [t("x"), t("pr")], [t("z")]),
            node("LayerNormalization", [t("z"), t("g2"), t("b2")], [t("ln2")], axis=-1, epsilon=eps),
            node("MatMul", [t("ln2"), t("wfc1")], [t("h0")]), node("Add", [t("h0"), t("bfc1")], [t("h")]),
            node("Div", [t("h"), t("sqrt2")], [t("hs")]), node("Erf", [t("hs")], [t("he")]),
            node("Add", [t("he"), t("one")], [t("h1")]), node("Mul", [t("h"), t("h1")], [t("hh")]),
            node("Mul", [t("hh"), t("half")], [t("g")]),
            node("MatMul", [t("g"), t("wfc2")], [t("f0")]), node("Add", [t("f0"), t("bfc2")], [t("f")]),
            node("Add", [t("z"), t("f")], [t("y")]),
        ]
        return nodes, weights, x.shape


def check_onnxruntime(name: str, session, feeds: dict, calls: dict, output_shapes) -> None:
    """onnxruntime's first output against this checkout's kernel on the same inputs: a sanity check that the
    session computes the row's work (float32 sums in their own orders, hence the loose tolerance)."""
    got = session.run(["y0"], feeds)[0]
    ours = next(iter(calls.values()))[0]
    ours()
    expected = ours._keep[0][-len(output_shapes)]
    if not np.allclose(got, expected, rtol=1e-4, atol=1e-3):
        raise RuntimeError(f"onnxruntime's {name} disagrees with the kernel (max |diff| "
                           f"{np.abs(got - expected).max():.3g})")


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
                   help="add onnxruntime's time for the same work beside the Dense and whole-block rows, in this process")
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
    onnx_runtime = None
    if args.onnxruntime:
        try:
            onnx_runtime = OnnxRuntime(threads=_omp_threads())
        except ImportError as err:
            p.error(f"--onnxruntime needs the onnx and onnxruntime packages (pip install onnx onnxruntime): {err}")
    labels = list(libraries) + ([OnnxRuntime.label] if onnx_runtime else [])
    print(f"{args.preset}, batch {args.batch}, {args.copies} input set(s) in turn: microseconds per call, "
          f"median of {args.rounds} rounds "
          f"({', '.join(f'{k}: {Path(v.path).name}' for k, v in libraries.items())}"
          f"{f', onnxruntime {onnx_runtime.version}, {onnx_runtime.threads} threads' if onnx_runtime else ''})\n")
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
        if onnx_runtime is not None and calls:  # (a row no library here has: nothing to check it against)
            twin = OnnxRuntime.plain_row(name)  # every packed row has its plain twin in kernel_cases
            prepared = onnx_runtime.prepare_all(twin, [copy[names.index(twin)][1] for copy in cases])
            if prepared is not None:
                session, feeds = prepared
                check_onnxruntime(name, session, feeds, calls, outputs)
                # one session.run covers every input set: counted as that many calls
                calls[OnnxRuntime.label] = [lambda: session.run(None, feeds)] + [lambda: None] * (len(cases) - 1)
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
