"""Fused CPU kernels for the steps of a ViT that MindSpore's CPU backend runs slowly or holds memory for.

- Dense layers and the attention products on oneDNN's JIT sgemm, which ships inside the MindSpore
  wheel (`mindspore/lib/libdnnl.so.3`) but which MindSpore's own CPU MatMul does not use. The attention
  kernels read each head's q, k and v in place in the qkv projection's output, so no head split or
  Transpose is needed: MindSpore's CPU Transpose keeps a 2x-the-tensor offset table for the graph's life.
- Softmax, GELU (exact erf and tanh) and LayerNorm in one vectorised OpenMP pass each, forward and
  backward. Eigen's float32 rational erf and Cephes' exp are each accurate to a few ulp.
- The patch embedding's permutation, again without Transpose's table.
- For eval, a whole encoder block in one kernel (those kernels in a row): one graph op per block instead of
  seven, which MindSpore's dynamic-batch graphs re-infer at every call.
- AdamW's update of a parameter and its moments in one vectorised pass, in place (MindSpore's CPU
  AdamWeightDecay is a scalar double-precision loop).

Each factory below returns an `ops.Custom(func_type="aot")` op with its backward, or None when the
kernel is unavailable (no compiler, or no oneDNN for the sgemm ones): the caller then uses MindSpore's
built-in op. Sources live in `csrc/*.cc`; `builder.KernelBuilder` compiles them lazily, at the first
factory call (never at import), into `vit_ms.files.cache_dir("kernels")`, or ahead of time with
`python -m vit_ms.ops build`. Whether a network uses these kernels at all is decided in one place,
`vit_ms.layers.use_fused_kernels`.

Environment:
    VIT_MS_KERNEL_ISA   auto (default: the best this CPU runs) | avx512 | avx2 | baseline. Forces the
                        compiled variant; a variant the CPU lacks is refused with the list it has.
    VIT_MS_FUSED_KERNELS  0 disables the fused kernels altogether (read by `vit_ms.layers`).
    VIT_MS_HOME         the cache root (`$VIT_MS_HOME/kernels` holds the libraries).
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Optional

from .builder import ISAS, KernelBuildError, KernelBuilder, cpu_isas

logger = logging.getLogger(__name__)

ISA_ENV = "VIT_MS_KERNEL_ISA"
_libraries: dict = {}  # isa -> built library path, or None after a failed build (not retried)


def selected_isa() -> str:
    """The variant `$VIT_MS_KERNEL_ISA` asks for ("auto" or unset: the best this CPU runs)."""
    value = (os.environ.get(ISA_ENV) or "auto").strip().lower()
    supported = cpu_isas()
    if value == "auto":
        return supported[0]
    if value not in ISAS:
        raise ValueError(f"{ISA_ENV}={value!r} is not a kernel variant; use one of {['auto', *ISAS]}")
    if value not in supported:
        raise ValueError(f"{ISA_ENV}={value!r}: this CPU cannot run that variant (it runs {list(supported)}); "
                         f"unset {ISA_ENV} to pick the best one")
    return value


@functools.lru_cache(maxsize=None)
def dnnl_library() -> Optional[Path]:
    """The oneDNN library inside the MindSpore wheel (`mindspore/lib/libdnnl.so.3`), or None."""
    import mindspore as ms

    path = Path(ms.__file__).parent / "lib" / "libdnnl.so.3"
    if not path.is_file():
        logger.warning("%s not found: vit_ms runs Dense layers and attention on MindSpore's slower MatMul", path)
        return None
    return path


def library(isa: Optional[str] = None) -> Optional[str]:
    """The kernel library for `isa` (default `selected_isa()`), built on first use; None if it cannot be.

    A failed build is logged once (with the compiler's output) and not retried in this process.
    """
    isa = isa or selected_isa()
    if isa not in cpu_isas():
        raise ValueError(f"this CPU cannot run the {isa!r} kernels (it runs {list(cpu_isas())})")
    if isa not in _libraries:
        try:
            _libraries[isa] = str(KernelBuilder(isa, dnnl_library()).build())
        except KernelBuildError as err:
            logger.warning("could not build the vit_ms CPU kernels (%s), using MindSpore's built-in ops: %s",
                           isa, err)
            _libraries[isa] = None
    return _libraries[isa]


def build_all_for(isas) -> dict:
    """Build the library of each variant in `isas` now (ahead of time, e.g. into a container image; a
    variant this CPU cannot run may be built, not loaded); {isa: path}. Raises KernelBuildError with the
    compiler's output."""
    built = {isa: KernelBuilder(isa, dnnl_library()).build() for isa in isas}
    _libraries.update({isa: str(path) for isa, path in built.items()})
    return built


def _same(x, *_):
    return x


def _reg_info(name: str, num_inputs: int):
    """The CPU registration of AOT kernel `name`. With it MindSpore calls the library's C++
    `<name>InferShape` (out_shape=None below), which, unlike a Python function, also runs for a dynamic batch."""
    from mindspore.ops import CustomRegOp, DataType

    reg = CustomRegOp(f"vit_ms_{name}_cpu")
    for i in range(num_inputs):
        reg = reg.input(i, f"x{i}")
    return reg.output(0, "y").dtype_format(*[DataType.None_None] * (num_inputs + 1)).target("CPU").get_op_info()


def _custom(path: str, name: str, num_inputs: int, bprop=None):
    from mindspore import ops

    return ops.Custom(f"{path}:{name}", out_shape=None, out_dtype=_same, func_type="aot", bprop=bprop,
                      reg_info=_reg_info(name, num_inputs))


def _in_place_custom(path: str, name: str, written: int, num_inputs: int):
    """An AOT op whose first `written` inputs are Parameters the kernel updates in place.

    Declared as MindSpore's own optimizer primitives declare theirs (`sig_rw.RW_WRITE` inputs and the
    `side_effect_mem` attribute, as `ops.AdamWeightDecay` does): the graph then orders every read of those
    Parameters in the step (the backward's included) before the update, and keeps the op although nothing
    uses its one-float output."""
    from mindspore import ops
    from mindspore.ops import signature as sig

    class InPlace(ops.Custom):
        __mindspore_signature__ = tuple(
            sig.make_sig(f"x{i}", sig.sig_rw.RW_WRITE if i < written else sig.sig_rw.RW_READ)
            for i in range(num_inputs))

    op = InPlace(f"{path}:{name}", out_shape=None, out_dtype=_same, func_type="aot",
                 reg_info=_reg_info(name, num_inputs))
    op.add_prim_attr("side_effect_mem", True)
    return op


def adamw_update(isa: Optional[str] = None):
    """`op(param, m, v, grad, lr, beta1, beta2, eps, weight_decay)`: `nn.AdamWeightDecay`'s update of one
    parameter and its two moments, in place, in one vectorised pass (the five hyper-parameters are
    one-element float32 tensors, of shape () or (1,)); None if unavailable. Used by `vit_ms.training.optim.FusedAdamWeightDecay`."""
    path = library(isa)
    if path is None:
        return None
    return _in_place_custom(path, "AdamWUpdate", 3, 9)


def gelu(approximate: bool, isa: Optional[str] = None):
    """GELU `op(x) -> y` with its backward, or None if unavailable.

    Args:
        approximate: True for the tanh form, False for the exact erf form.
        isa: the compiled variant (default `$VIT_MS_KERNEL_ISA`).
    """
    path = library(isa)
    if path is None:
        return None
    name = "GeluTanh" if approximate else "GeluErf"
    grad = _custom(path, name + "Grad", 2)

    def bprop(x, out, dout):
        return (grad(x, dout),)

    return _custom(path, name, 1, bprop)


def layer_norm(isa: Optional[str] = None):
    """LayerNorm over the last axis, `op(x, gamma, beta, eps) -> y` with `eps` a float32 tensor of shape
    (1,), and a fused backward; None if unavailable."""
    from mindspore import ops

    path = library(isa)
    if path is None:
        return None
    grad_x = _custom(path, "LayerNormGrad", 4)
    grad_params = _custom(path, "LayerNormParamGrad", 3)

    def bprop(x, gamma, beta, eps, out, dout):
        params = grad_params(x, dout, eps)  # (2, D): d gamma, d beta
        return grad_x(x, gamma, dout, eps), params[0], params[1], ops.zeros_like(eps)

    return _custom(path, "LayerNorm", 4, bprop)


def add_bias(isa: Optional[str] = None):
    """`op(x, b) -> x + b` over the last axis with a fused bias gradient (column sum); None if unavailable."""
    path = library(isa)
    if path is None:
        return None
    grad_b = _custom(path, "BiasGrad", 1)

    def bprop(x, b, out, dout):
        return dout, grad_b(dout)

    return _custom(path, "AddBias", 2, bprop)


def _dense_backward(path: str):
    """A Dense layer's backward kernels: dx = dy w, dw = dy^T x (summed over all rows), db = sum of dy."""
    return _custom(path, "LinearGradInput", 2), _custom(path, "LinearGradWeight", 2), _custom(path, "BiasGrad", 1)


def linear(isa: Optional[str] = None):
    """`op(x, w, b) -> x w^T + b` for x (..., in) and w (out, in), like `nn.Dense`, on oneDNN's sgemm,
    with its backward on the same sgemm; None where the MindSpore wheel has no oneDNN or no compiler."""
    path = library(isa)
    if path is None or dnnl_library() is None:
        return None
    grad_x, grad_w, grad_b = _dense_backward(path)

    def bprop(x, w, b, out, dout):
        return grad_x(dout, w), grad_w(dout, x), grad_b(dout)

    return _custom(path, "Linear", 3, bprop)


def linear_residual(isa: Optional[str] = None):
    """`op(x, w, b, r) -> r + x w^T + b` in one kernel: a Dense layer whose output is added to the residual
    stream while each thread's block is written (no Add op of its own): how `encoder_block` ends each of its
    two branches. Its backward is the Dense layer's, and the residual's gradient is the incoming one. None
    where `linear()` would be None."""
    path = library(isa)
    if path is None or dnnl_library() is None:
        return None
    grad_x, grad_w, grad_b = _dense_backward(path)

    def bprop(x, w, b, r, out, dout):
        return grad_x(dout, w), grad_w(dout, x), grad_b(dout), dout

    return _custom(path, "LinearResidual", 4, bprop)


def linear_gelu(approximate: bool, isa: Optional[str] = None):
    """`op(x, w, b) -> GELU(x w^T + b)` in one kernel, GELU applied to each thread's block of the product
    while it is in cache, so the product is never a tensor of its own: for networks in eval mode. Its
    backward recomputes the product (for gradients of a network in eval mode, e.g. saliency maps; training
    runs `linear()` and `gelu()` apart, keeping the product). None where `linear()` would be None.

    Args:
        approximate: True for the tanh form, False for the exact erf form.
        isa: the compiled variant (default `$VIT_MS_KERNEL_ISA`).
    """
    path = library(isa)
    if path is None or dnnl_library() is None:
        return None
    name = "GeluTanh" if approximate else "GeluErf"
    product = _custom(path, "Linear", 3)
    gelu_grad = _custom(path, name + "Grad", 2)
    grad_x, grad_w, grad_b = _dense_backward(path)

    def bprop(x, w, b, out, dout):
        dy = gelu_grad(product(x, w, b), dout)
        return grad_x(dy, w), grad_w(dy, x), grad_b(dy)

    return _custom(path, "Linear" + name, 3, bprop)


def linear_packed(isa: Optional[str] = None):
    """`op(x, w_packed, b) -> x w^T + b` on a weight packed once (`vit_ms.packing.pack_dense_weight`), on the
    kernels' own GEMM (`csrc/packed.cc`), forward only: networks run it inside the packed encoder block
    (`encoder_block(..., packed=True)`); this op is the tests' and benchmarks' handle on it. None where
    `linear()` would be None (it is built beside the Dense kernels)."""
    path = library(isa)
    return None if path is None or dnnl_library() is None else _custom(path, "LinearPacked", 3)


def encoder_block(num_heads: int, norm_eps: float, approximate: bool, isa: Optional[str] = None,
                  packed: bool = False):
    """A whole pre-norm encoder block in one kernel, for networks in eval mode (Eq. 2 and 3, drop-path the
    identity): `op(z, ln1_gamma, ln1_beta, qkv_w, qkv_b, proj_w, proj_b, ln2_gamma, ln2_beta, fc1_w, fc1_b,
    fc2_w, fc2_b, settings) -> z_out`, z (B, N, D), `settings` float32 [num_heads, norm_eps, head_dim ** -0.5].
    It runs the kernels of `layer_norm`, `linear`, `fused_attention`, `linear_residual` and `linear_gelu` in
    the order the block's separate ops would, so it computes exactly what they compute. Its backward (for
    gradients of a network in eval mode, e.g. saliency maps) recomputes the block's intermediates with those
    kernels and runs their backward kernels. None where `linear()` would be None.

    Args:
        num_heads, norm_eps: the block's; the backward is built for them (the settings tensor must agree).
        approximate: the MLP's GELU: True for the tanh form, False for the exact erf form.
        isa: the compiled variant (default `$VIT_MS_KERNEL_ISA`).
        packed: the four weights come packed (`vit_ms.packing`; the settings tensor then carries a fourth
            value, 1): a forward-only op, whose backward raises.
    """
    import mindspore as ms
    from mindspore import ops

    path = library(isa)
    if path is None or dnnl_library() is None:
        return None
    name = "EncoderBlock" + ("Tanh" if approximate else "Erf")
    if packed:
        def no_bprop(z, g1, b1, w_qkv, b_qkv, w_proj, b_proj, g2, b2, w1, bias1, w2, bias2, settings, out, dout):
            raise RuntimeError("a network packed for inference (vit_ms.packing) has no gradients; load the "
                               "weights into an unpacked network to differentiate it")

        return _custom(path, name, 14, no_bprop)
    gelu_name = "GeluTanh" if approximate else "GeluErf"
    norm, norm_grad = _custom(path, "LayerNorm", 4), _custom(path, "LayerNormGrad", 4)
    norm_param_grad = _custom(path, "LayerNormParamGrad", 3)
    dense, dense_residual = _custom(path, "Linear", 3), _custom(path, "LinearResidual", 4)
    attend, attend_grad = _custom(path, "Attention", 2), _custom(path, "AttentionGrad", 3)
    gelu, gelu_grad = _custom(path, gelu_name, 1), _custom(path, gelu_name + "Grad", 2)
    grad_x, grad_w, grad_b = _dense_backward(path)
    eps = ms.Tensor([norm_eps], ms.float32)

    def bprop(z, g1, b1, w_qkv, b_qkv, w_proj, b_proj, g2, b2, w1, bias1, w2, bias2, settings, out, dout):
        _, n, d = z.shape
        # Forward again, keeping what the backward kernels read.
        h1 = norm(z, g1, b1, eps)
        qkv = dense(h1, w_qkv, b_qkv).reshape(-1, n, 3, num_heads, d // num_heads)
        scale = settings[2:3]
        att = attend(qkv, scale).reshape(-1, n, d)
        z1 = dense_residual(att, w_proj, b_proj, z)  # Eq. 2
        h2 = norm(z1, g2, b2, eps)
        pre = dense(h2, w1, bias1)
        act = gelu(pre)
        # Eq. 3 backward: z_out = z1 + fc2(GELU(fc1(LN2(z1))))
        d_pre = gelu_grad(pre, grad_x(dout, w2))
        d_h2 = grad_x(d_pre, w1)
        ln2_grads = norm_param_grad(z1, d_h2, eps)
        dz1 = dout + norm_grad(z1, g2, d_h2, eps)
        # Eq. 2 backward: z1 = z + proj(attention(qkv(LN1(z))))
        d_qkv = attend_grad(grad_x(dz1, w_proj).reshape(-1, n, num_heads, d // num_heads), qkv, scale)
        d_qkv = d_qkv.reshape(-1, n, 3 * d)
        d_h1 = grad_x(d_qkv, w_qkv)
        ln1_grads = norm_param_grad(z, d_h1, eps)
        dz = dz1 + norm_grad(z, g1, d_h1, eps)
        return (dz, ln1_grads[0], ln1_grads[1], grad_w(d_qkv, h1), grad_b(d_qkv), grad_w(dz1, att), grad_b(dz1),
                ln2_grads[0], ln2_grads[1], grad_w(d_pre, h2), grad_b(d_pre), grad_w(dout, act), grad_b(dout),
                ops.zeros_like(settings))

    return _custom(path, name, 14, bprop)


def attention(isa: Optional[str] = None):
    """`(scores, values)` on the qkv projection's output viewed as (B, N, 3, heads, head_dim), in place:
    `scores(qkv, scale) -> scale q k^T` (B, heads, N, N), with `scale` a float32 tensor of shape (1,), and
    `values(probs, qkv) -> probs v` as (B, N, heads, head_dim), the heads already merged. oneDNN's sgemm,
    with their backward; None where the MindSpore wheel has no oneDNN or no compiler."""
    from mindspore import ops

    path = library(isa)
    if path is None or dnnl_library() is None:
        return None
    scores_grad = _custom(path, "AttentionScoresGrad", 3)
    values_grad_probs = _custom(path, "AttentionValuesGradProbs", 2)
    values_grad_qkv = _custom(path, "AttentionValuesGradQKV", 2)

    def scores_bprop(qkv, scale, out, dout):
        return scores_grad(dout, qkv, scale), ops.zeros_like(scale)

    def values_bprop(probs, qkv, out, dout):
        return values_grad_probs(dout, qkv), values_grad_qkv(probs, dout)

    return (_custom(path, "AttentionScores", 2, scores_bprop),
            _custom(path, "AttentionValues", 2, values_bprop))


def fused_attention(isa: Optional[str] = None):
    """`op(qkv, scale) -> softmax(scale q k^T) v` as (B, N, heads, head_dim), in one kernel, with a one-kernel
    backward that recomputes the probabilities per head instead of keeping them (as flash attention does):
    what `attention()`'s two products and `softmax()` compute, with no (B, heads, N, N) tensor in either
    direction. None where `attention()` would be None."""
    from mindspore import ops

    path = library(isa)
    if path is None or dnnl_library() is None:
        return None
    grad = _custom(path, "AttentionGrad", 3)

    def bprop(qkv, scale, out, dout):
        return grad(dout, qkv, scale), ops.zeros_like(scale)

    return _custom(path, "Attention", 2, bprop)


def softmax(isa: Optional[str] = None):
    """Softmax over the last axis, `op(x) -> y`, with a one-pass backward from y; None if unavailable."""
    path = library(isa)
    if path is None:
        return None
    grad = _custom(path, "SoftmaxGrad", 2)

    def bprop(x, out, dout):
        return (grad(out, dout),)

    return _custom(path, "Softmax", 1, bprop)


def patchify(isa: Optional[str] = None):
    """`op(x) -> x.transpose(0, 2, 4, 1, 3, 5)` for a (B, C, H/p, p, W/p, p) float32 image view: each
    patch's pixels in the conv weight's (C, p, p) order. None if unavailable."""
    path = library(isa)
    if path is None:
        return None
    grad = _custom(path, "Unpatchify", 1)

    def bprop(x, out, dout):
        return (grad(dout),)

    return _custom(path, "Patchify", 1, bprop)


__all__ = ["ISA_ENV", "ISAS", "KernelBuildError", "KernelBuilder", "cpu_isas", "selected_isa", "dnnl_library",
           "library", "build_all_for", "gelu", "layer_norm", "add_bias", "linear", "linear_residual",
           "linear_gelu", "linear_packed", "encoder_block", "attention", "fused_attention", "softmax", "patchify",
           "adamw_update"]
