"""The fused CPU kernels (`vit_ms.ops`) against PyTorch in float64, on every compiled variant this CPU runs
(AVX-512, AVX2, baseline x86-64): forward values and the gradients their hand-written backward kernels
give for a random upstream gradient.

Only the variants this CPU supports are collected (`vit_ms.ops.cpu_isas()`): a variant the CPU lacks
cannot be loaded here at all (its instructions would fault), so it is not a gap in this run but a test
for another machine; listing it as skipped would make every AVX2-only run look incomplete. Which
variants ran shows in the test ids (`[avx2]`, `[baseline]`, ...).

Tolerances are float32 rounding bounds computed from the data (`float32_bounds`), never constants tuned
on one machine. A float32 sum of K products, in any order or blocking (what differs between sgemm paths
and between ISAs), is within gamma_K * sum |a_i b_i| of the exact sum. For the matrix-product kernels
and their gradients, which are all such sums, `sum |a_i b_i|` is the same computation on absolute
values, done in float64 by PyTorch.
"""
import math
import shutil

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from float32_bounds import U, assert_within as _assert_within, gamma
from torch_reference import torch
from vit_ms import ops as kernels

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="the fused kernels need a C++ compiler (g++) on this machine")

@pytest.fixture(params=kernels.cpu_isas())
def isa(request):
    return request.param


class _Weighted(nn.Cell):
    """sum(op(*inputs) * upstream): its gradient is the op's backward applied to `upstream`."""

    def __init__(self, op, upstream):
        super().__init__()
        self.op = op
        self.upstream = ms.Tensor(upstream)

    def construct(self, *inputs):
        return (self.op(*inputs) * self.upstream).sum()


def _ours(op, inputs, upstream, wrt):
    """op's output and the gradients of its first `wrt` inputs for `upstream`, in float32."""
    out = op(*(ms.Tensor(a) for a in inputs)).asnumpy()
    grads = ms.grad(_Weighted(op, upstream), grad_position=tuple(range(wrt)))(*(ms.Tensor(a) for a in inputs))
    grads = grads if isinstance(grads, tuple) else (grads,)  # one input: ms.grad returns the tensor itself
    return out, [g.asnumpy() for g in grads]


def _torch(torch_op, inputs, upstream, wrt):
    """The same in float64 with PyTorch."""
    ref_inputs = [torch.from_numpy(np.asarray(a, np.float64)).requires_grad_() for a in inputs]
    out = torch_op(*ref_inputs)
    (out * torch.from_numpy(np.asarray(upstream, np.float64))).sum().backward()
    return out.detach().numpy(), [t.grad.numpy() for t in ref_inputs[:wrt]]


def _check_sums(op, torch_op, inputs, k, wrt=None):
    """A kernel whose output and gradients are sums of at most k products each: errors within gamma_k
    times the same sums over absolute values (plus one rounding of the result, counted in k)."""
    wrt = len(inputs) if wrt is None else wrt
    upstream = np.random.default_rng(3).standard_normal(torch_op(*map(torch.from_numpy, inputs)).shape)
    upstream = upstream.astype(np.float32)
    out, grads = _ours(op, inputs, upstream, wrt)
    ref_out, ref_grads = _torch(torch_op, inputs, upstream, wrt)
    abs_out, abs_grads = _torch(torch_op, [np.abs(a) for a in inputs], np.abs(upstream), wrt)
    _assert_within(out, ref_out, gamma(k) * abs_out, "output")
    for i, (grad, ref, magnitude) in enumerate(zip(grads, ref_grads, abs_grads)):
        _assert_within(grad, ref, gamma(k) * magnitude, f"gradient of input {i}")


def _normal(*shape, seed=0):
    return np.random.default_rng(seed + len(shape)).standard_normal(shape).astype(np.float32)


def test_dense_kernel_is_x_wt_plus_b(isa, mode):
    linear = kernels.linear(isa)
    assert linear is not None, "the MindSpore wheel here ships oneDNN: the Dense kernel must build"
    rows, k, n = 37, 24, 16  # 37 rows: an odd count, split unevenly over the threads
    # Longest sum: the weight gradient over the 37 rows; +2 for the bias add and the final rounding.
    _check_sums(linear, lambda x, w, b: x @ w.T + b, [_normal(rows, k), _normal(n, k, seed=1), _normal(n, seed=2)],
                k=max(rows, k, n) + 2)
    # Leading axes are rows, as in nn.Dense: (3, 13, K) -> (3, 13, N), the weight gradient sums all 39.
    _check_sums(linear, lambda x, w, b: x @ w.T + b, [_normal(3, 13, k), _normal(n, k, seed=1), _normal(n, seed=2)],
                k=max(39, k, n) + 2)


def test_dense_weight_gradient_over_many_rows_sums_slices_of_rows(isa, mode):
    """2085 rows (a batch of ~11 ViT/16 images' tokens): on 2 or more threads the weight gradient is formed as
    one partial per slice of 1024+ rows, added up after (dense.cc, `row_slices`); a float32 sum in any
    grouping is within the same gamma bound."""
    rows, k, n = 2 * 1024 + 37, 24, 16
    _check_sums(kernels.linear(isa), lambda x, w, b: x @ w.T + b,
                [_normal(rows, k), _normal(n, k, seed=1), _normal(n, seed=2)], k=max(rows, k, n) + 2)


def test_dense_kernel_with_a_weight_beyond_l2_splits_columns(isa, mode):
    """A batch-1 shape: 5 rows, a 2050 x 640 weight (5.2 MB, more than any x86 core's L2), so the forward
    and the input gradient split the output's columns over the threads (2050 columns: blocks of 16 and a
    remainder), the weight gradient its rows."""
    rows, k, n = 5, 640, 2050
    _check_sums(kernels.linear(isa), lambda x, w, b: x @ w.T + b,
                [_normal(rows, k), _normal(n, k, seed=1), _normal(n, seed=2)], k=max(rows, k, n) + 2)


def test_dense_kernel_with_residual_is_r_plus_x_wt_plus_b(isa, mode):
    """Eval's projection that ends a residual branch: r + x w^T + b in one kernel, rows split over the
    threads (37) and, with a weight beyond L2, columns (5 rows, 2050 columns); its backward is the Dense
    layer's, and r's gradient the upstream one. One more term than the Dense sum: k + 3."""
    op = kernels.linear_residual(isa)
    for rows, k, n in ((37, 24, 16), (5, 640, 2050)):
        _check_sums(op, lambda x, w, b, r: r + x @ w.T + b,
                    [_normal(rows, k), _normal(n, k, seed=1), _normal(n, seed=2), _normal(rows, n, seed=3)],
                    k=max(rows, k, n) + 3)


def test_dense_kernel_on_a_packed_weight_is_x_wt_plus_b(isa, mode):
    """The kernels' own GEMM on a weight packed once (`vit_ms.packing`, csrc/packed.cc), forward only:
    rows not a multiple of its 6-row micro-kernel (37); k beyond one 256-deep block (300 = 256 + 44); more
    rows than one 192-row block of a thread (430 rows, 2 threads: 215 each); the packed layout's columns
    in panels of 16 (48). A sum of k products plus the bias: within gamma_(k + 2) of the float64 value."""
    from vit_ms.packing import pack_dense_weight

    op = kernels.linear_packed(isa)
    for rows, k, n in ((37, 300, 48), (430, 40, 32), (1, 16, 16)):
        x, w, b = _normal(rows, k), _normal(n, k, seed=1), _normal(n, seed=2)
        out = op(ms.Tensor(x), ms.Tensor(pack_dense_weight(w)), ms.Tensor(b)).asnumpy()
        x64, w64, b64 = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
        _assert_within(out, x64 @ w64.T + b64, gamma(k + 2) * (np.abs(x64) @ np.abs(w64).T + np.abs(b64)),
                       f"packed product {rows} x {k} x {n}")


def test_every_variant_gives_the_same_packed_product_bit_for_bit():
    """The packed GEMM's micro-kernels differ by variant (csrc/packed.cc: two 16-column panels at once in
    ZMM registers in the AVX-512 library, one in YMM registers otherwise), but every lane adds the same
    FMA products in the same k order, so on a CPU with FMA every variant it runs returns the same floats:
    48 columns take a pair of panels and a single one, 430 rows more than one row block."""
    from vit_ms.packing import pack_dense_weight

    variants = [isa for isa in kernels.cpu_isas() if kernels.linear_packed(isa) is not None]
    assert len(variants) >= 2, f"this test needs two kernel variants; this CPU runs {variants}"
    for rows, k, n in ((37, 300, 48), (430, 40, 32), (5, 520, 80)):
        x, w, b = _normal(rows, k), _normal(n, k, seed=1), _normal(n, seed=2)
        args = ms.Tensor(x), ms.Tensor(pack_dense_weight(w)), ms.Tensor(b)
        outs = {isa: kernels.linear_packed(isa)(*args).asnumpy() for isa in variants}
        for isa in variants[1:]:
            np.testing.assert_array_equal(outs[isa], outs[variants[0]], f"{isa} vs {variants[0]}, {rows} x {k} x {n}")


@pytest.mark.parametrize("approximate", [False, True], ids=["erf", "tanh"])
def test_dense_kernel_with_gelu_is_gelu_of_x_wt_plus_b(isa, approximate):
    """Eval's fc1 + GELU in one kernel, rows split over the threads (37) and, with a weight beyond L2,
    columns (5 rows, 2050 columns: GELU on each thread's column block)."""
    op = kernels.linear_gelu(approximate, isa)
    for rows, k, n in ((37, 24, 16), (5, 640, 2050)):
        x, w, b = _normal(rows, k), _normal(n, k, seed=1), _normal(n, seed=2)
        out = op(ms.Tensor(x), ms.Tensor(w), ms.Tensor(b)).asnumpy()
        x64, w64, b64 = (a.astype(np.float64) for a in (x, w, b))
        y = x64 @ w64.T + b64
        expected = torch.nn.functional.gelu(torch.from_numpy(y), approximate="tanh" if approximate else "none").numpy()
        # The product is off by e_y <= gamma(k + 2) (|x| |w|^T + |b|) (test_dense_kernel_is_x_wt_plus_b); GELU's
        # slope is at most 1.13 (Phi(x) + x phi(x) peaks at 1.129, at x = sqrt 2; the tanh form within 1e-3 of
        # it), so that moves the output by <= 1.13 e_y; GELU's own error is test_gelu_kernel's 8 u (|GELU| + |y| / 2).
        e_y = gamma(k + 2) * (np.abs(x64) @ np.abs(w64).T + np.abs(b64))
        bound = 1.13 * e_y + 8 * U * (np.abs(expected) + 0.5 * np.abs(y) + 1.13 * e_y)
        _assert_within(out, expected, bound, f"GELU(x w^T + b), {rows} x {k} x {n}")
    # Its backward recomputes the product and runs the Dense and GELU backward kernels (each checked against
    # float64 above and in test_gelu_kernel): the same float32 operations as the two layers apart.
    linear, gelu = kernels.linear(isa), kernels.gelu(approximate, isa)
    inputs, upstream = [_normal(37, 24), _normal(16, 24, seed=1), _normal(16, seed=2)], _normal(37, 16, seed=4)
    _, grads = _ours(op, inputs, upstream, 3)
    _, apart = _ours(lambda x, w, b: gelu(linear(x, w, b)), inputs, upstream, 3)
    for name, grad, expected in zip(("x", "w", "b"), grads, apart):
        np.testing.assert_array_equal(grad, expected, err_msg=f"gradient of {name}")


def _block_apart(isa, heads, eps, approximate):
    """A pre-norm encoder block in eval as the seven separate kernels (LayerNorm, Linear, Attention,
    LinearResidual, LayerNorm, LinearGelu, LinearResidual), each tested against float64 in this file."""
    norm, linear, attend = kernels.layer_norm(isa), kernels.linear(isa), kernels.fused_attention(isa)
    residual, linear_gelu = kernels.linear_residual(isa), kernels.linear_gelu(approximate, isa)
    eps = ms.Tensor([eps], ms.float32)

    def block(z, g1, b1, w_qkv, b_qkv, w_proj, b_proj, g2, b2, w1, c1, w2, c2):
        _, n, d = z.shape
        qkv = linear(norm(z, g1, b1, eps), w_qkv, b_qkv).reshape(-1, n, 3, heads, d // heads)
        z1 = residual(attend(qkv, ms.Tensor([(d // heads) ** -0.5], ms.float32)).reshape(-1, n, d), w_proj, b_proj, z)
        return residual(linear_gelu(norm(z1, g2, b2, eps), w1, c1), w2, c2, z1)

    return block


def _block_inputs(batch, n, d, hidden, seed):
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def norm_params():
        return [1 + normal(d, scale=0.1), normal(d, scale=0.1)]

    def dense(out, inp):
        return [normal(out, inp, scale=inp ** -0.5), normal(out, scale=0.1)]

    return ([normal(batch, n, d)] + norm_params() + dense(3 * d, d) + dense(d, d) + norm_params()
            + dense(hidden, d) + dense(d, hidden))


@pytest.mark.parametrize("approximate", [False, True], ids=["erf", "tanh"])
def test_encoder_block_kernel_is_the_blocks_kernels_in_order(isa, approximate):
    """Eval's whole encoder block in one kernel runs the same kernels as the block's separate ops, in the same
    order, on buffers of its own: the same float32 numbers, forward and backward (its backward recomputes the
    intermediates and runs their backward kernels). Batch 3, then 1 (the buffer kept from the larger call),
    then an MLP wider than 4 D (the buffer sized by it) and 5 query rows over 2 heads."""
    eps = 1e-6
    for seed, (batch, n, d, hidden, heads) in enumerate(((3, 7, 32, 128, 4), (1, 7, 32, 128, 4), (2, 5, 16, 96, 2))):
        op = kernels.encoder_block(heads, eps, approximate, isa)
        settings = np.array([heads, eps, (d // heads) ** -0.5], np.float32)
        inputs = _block_inputs(batch, n, d, hidden, seed)
        upstream = _normal(batch, n, d, seed=seed + 7)
        out, grads = _ours(lambda *a: op(*a, ms.Tensor(settings)), inputs, upstream, len(inputs))
        apart_out, apart_grads = _ours(_block_apart(isa, heads, eps, approximate), inputs, upstream, len(inputs))
        assert np.abs(out - inputs[0]).max() > 0.1  # both branches add something
        np.testing.assert_array_equal(out, apart_out, err_msg=f"block output, {batch} x {n} x {d}, MLP {hidden}")
        for i, (grad, expected) in enumerate(zip(grads, apart_grads)):
            assert np.abs(expected).max() > 0, i
            np.testing.assert_array_equal(grad, expected, err_msg=f"gradient of input {i}, {batch} x {n} x {d}")


def test_add_bias_kernel(isa, mode):
    # x + b is one rounding; the bias gradient sums 37 rows.
    _check_sums(kernels.add_bias(isa), lambda x, b: x + b, [_normal(37, 16), _normal(16, seed=1)], k=37 + 1)


def test_attention_kernels_read_heads_in_place(isa, mode):
    scores, values = kernels.attention(isa)
    b, n, heads, dim = 2, 7, 3, 5
    qkv = _normal(b, n, 3, heads, dim)  # the qkv projection's output, viewed per head
    probs = _normal(b, heads, n, n, seed=2)
    scale = np.array([dim ** -0.5], np.float32)

    def torch_scores(t, s):
        q, k = t[:, :, 0].transpose(1, 2), t[:, :, 1].transpose(1, 2)  # (B, heads, N, head_dim)
        return s * q @ k.transpose(-1, -2)

    def torch_values(p, t):
        return (p @ t[:, :, 2].transpose(1, 2)).transpose(1, 2)  # (B, N, heads, head_dim)

    # Sums over head_dim (forward) or N (backward); +2 for the scale product and the final rounding.
    _check_sums(scores, torch_scores, [qkv, scale], k=max(n, dim) + 2, wrt=1)  # the scale is a constant
    _check_sums(values, torch_values, [probs, qkv], k=max(n, dim) + 1)


class _FusedAttention(nn.Cell):
    """The one-kernel attention with its scale tensor bound: op(qkv)."""

    def __init__(self, op, scale):
        super().__init__()
        self.op = op
        self.scale = ms.Tensor([scale], ms.float32)

    def construct(self, qkv):
        return self.op(qkv, self.scale)


@pytest.mark.parametrize("b", [2, 1])
def test_fused_attention_and_its_backward(isa, mode, b):
    """The one-kernel attention and its one-kernel backward (probabilities recomputed) against float64,
    with query rows split into blocks in the forward (131 tokens: 3 blocks of 44) over 3 heads. With 2
    samples the backward runs one (sample, head) pair per work item; with 1 sample on 2 threads (3 pairs,
    uneven) each pair is split into row blocks and column blocks of shared P and dS
    (`attention_grad_split`)."""
    n, heads, dim = 131, 3, 8
    qkv = _normal(b, n, 3, heads, dim)
    scale = np.float32(dim ** -0.5)
    upstream = _normal(b, n, heads, dim, seed=4)
    out, (dqkv,) = _ours(_FusedAttention(kernels.fused_attention(isa), scale), [qkv], upstream, 1)

    def torch_attention(t):
        t = t.permute(0, 3, 2, 1, 4)  # (B, heads, 3, N, head_dim)
        p = torch.softmax(float(scale) * t[:, :, 0] @ t[:, :, 1].transpose(-1, -2), dim=-1)
        return (p @ t[:, :, 2]).transpose(1, 2)  # (B, N, heads, head_dim)

    expected, (expected_dqkv,) = _torch(torch_attention, [qkv], upstream, 1)

    # Magnitudes and exact intermediates in float64, per (sample, head): (B, heads, N, ...).
    t = qkv.astype(np.float64).transpose(0, 3, 2, 1, 4)
    q, k, v = t[:, :, 0], t[:, :, 1], t[:, :, 2]
    d_out = upstream.astype(np.float64).transpose(0, 2, 1, 3)
    s = float(scale) * q @ k.swapaxes(-1, -2)
    m = s.max(axis=-1, keepdims=True)
    p = np.exp(s - m)
    p /= p.sum(axis=-1, keepdims=True)
    # Forward. Each score is a float32 sum of head_dim products times the scale: off by at most
    # e_s = gamma(dim + 2) scale |q| |k|^T. Scores off by at most e in a row move each probability by a factor
    # within exp(+-2e) (numerator and denominator); the softmax itself rounds as in test_softmax_kernel. The
    # output sums N products of those probabilities and v: gamma(N + 1) more, relative to P |v|.
    e_s = gamma(dim + 2) * float(scale) * np.abs(q) @ np.abs(k).swapaxes(-1, -2)
    e_max = e_s.max(axis=-1, keepdims=True)
    rel_p = np.expm1(2 * e_max) + U * (np.abs(s - m).max(axis=-1, keepdims=True) + 2 * e_max) + gamma(n + 4)
    bound = (rel_p + gamma(n + 1) * (1 + rel_p)) * (p @ np.abs(v))
    _assert_within(out, expected, bound.transpose(0, 2, 1, 3), "fused attention")

    # Backward, first order in u, step by step as the kernel computes it (P recomputed as above, e_p):
    #   dP = dO v^T            head_dim products and a rounding:    e_dp = gamma(dim + 1) |dO| |v|^T
    #   r = sum_j P_j dP_j     N rounded products summed:           e_r  = sum(e_p |dP| + P e_dp) + gamma(N + 1) sum(P |dP|)
    #   dS = P (dP - r)        a subtraction and a product:         e_ds = e_p |dP - r| + P (e_dp + e_r) + gamma(2) P |dP - r|
    #   dq = scale dS k, dk = scale dS^T q   N products, the scale: e_ds |k| scale + gamma(N + 2) scale |dS| |k|, ...
    #   dv = P^T dO            N products:                          e_p^T |dO| + gamma(N + 1) P^T |dO|
    e_p = rel_p * p
    dp = d_out @ v.swapaxes(-1, -2)
    e_dp = gamma(dim + 1) * np.abs(d_out) @ np.abs(v).swapaxes(-1, -2)
    r = (p * dp).sum(axis=-1, keepdims=True)
    e_r = (e_p * np.abs(dp) + p * e_dp).sum(axis=-1, keepdims=True) + gamma(n + 1) * (p * np.abs(dp)).sum(
        axis=-1, keepdims=True)
    ds = p * (dp - r)
    e_ds = e_p * np.abs(dp - r) + p * (e_dp + e_r) + gamma(2) * p * np.abs(dp - r)
    c = float(scale)
    bound_q = c * (e_ds @ np.abs(k) + gamma(n + 2) * np.abs(ds) @ np.abs(k))
    bound_k = c * (e_ds.swapaxes(-1, -2) @ np.abs(q) + gamma(n + 2) * np.abs(ds).swapaxes(-1, -2) @ np.abs(q))
    bound_v = e_p.swapaxes(-1, -2) @ np.abs(d_out) + gamma(n + 1) * p.swapaxes(-1, -2) @ np.abs(d_out)
    bound_dqkv = np.stack([bound_q, bound_k, bound_v], axis=2).transpose(0, 3, 2, 1, 4)  # (B, N, 3, heads, dim)
    _assert_within(dqkv, expected_dqkv, bound_dqkv, "fused attention gradient")


def test_softmax_kernel(isa, mode):
    d = 197
    x = _normal(2, 3, 5, d) * 4
    x[0, 0, 0, :] = 80.0  # a constant row: exp(x - max) must not overflow
    upstream = _normal(*x.shape, seed=4)
    y, (dx,) = _ours(kernels.softmax(isa), [x], upstream, 1)
    ref_y, (ref_dx,) = _torch(lambda t: torch.softmax(t, dim=-1), [x], upstream, 1)
    # y_j = e_j / S, e_j = exp(x_j - m). x_j - m rounds once (relative u, so u |x_j - m| absolute in the
    # exponent, the same relative error in e_j); Cephes' exp adds <= 2 u; S sums d terms (gamma_d); the
    # division rounds once. Every e_j lies below the clamp's exp(-87) only where y_j < 1e-37.
    x64 = x.astype(np.float64)
    rel_y = U * np.abs(x64 - x64.max(axis=-1, keepdims=True)) + gamma(d + 4)
    bound_y = rel_y * ref_y + 1e-37
    _assert_within(y, ref_y, bound_y, "softmax")
    # dx_j = y_j (dy_j - s), s = sum_k dy_k y_k: the error of y carried through both factors, s's own
    # sum (gamma_d), and the two roundings of the subtraction and the product.
    dy = upstream.astype(np.float64)
    s = (dy * ref_y).sum(axis=-1, keepdims=True)
    ds = gamma(d) * np.abs(dy * ref_y).sum(axis=-1, keepdims=True) + (np.abs(dy) * bound_y).sum(axis=-1, keepdims=True)
    bound_dx = bound_y * np.abs(dy - s) + ref_y * (ds + gamma(2) * np.abs(dy - s)) + 1e-37
    _assert_within(dx, ref_dx, bound_dx, "softmax gradient")


class _LayerNorm(nn.Cell):
    """The LayerNorm kernel with its epsilon tensor bound: op(x, gamma, beta)."""

    def __init__(self, op, eps):
        super().__init__()
        self.op = op
        self.eps = ms.Tensor([eps], ms.float32)

    def construct(self, x, g, b):
        return self.op(x, g, b, self.eps)


def test_layer_norm_kernel(isa, mode):
    """LayerNorm and its three gradients against float64, rows of 197 (not a multiple of any vector
    width, so every row ends in a remainder) with a mean far from zero."""
    rows, d, eps = 37, 197, 1e-6
    x = _normal(rows, d) * 3 + 5
    gamma_, beta = 1 + 0.5 * _normal(d, seed=1), _normal(d, seed=2)
    upstream = _normal(rows, d, seed=4)
    y, (dx, dg, db) = _ours(_LayerNorm(kernels.layer_norm(isa), eps), [x, gamma_, beta], upstream, 3)
    ref_y, (ref_dx, ref_dg, ref_db) = _torch(lambda t, g, b: torch.nn.functional.layer_norm(t, (d,), g, b, eps),
                                             [x, gamma_, beta], upstream, 3)
    # The mean is a float32 sum of d terms and a division: off by e_m <= gamma(d + 1) mean |x|. The
    # variance sums d positive squares, then eps, sqrt and the reciprocal round: rstd is within
    # gamma(d + 4) relative (the mean's own error enters the variance only to second order). So
    # xhat = (x - m) rstd is off by e_xhat <= rstd e_m + gamma(d + 6) |xhat|, and y = xhat g + b rounds twice.
    x64, dy, g64 = x.astype(np.float64), upstream.astype(np.float64), gamma_.astype(np.float64)
    mean = x64.mean(axis=-1, keepdims=True)
    rstd = 1 / np.sqrt(x64.var(axis=-1, keepdims=True) + eps)
    xhat = (x64 - mean) * rstd
    e_xhat = rstd * gamma(d + 1) * np.abs(x64).mean(axis=-1, keepdims=True) + gamma(d + 6) * np.abs(xhat)
    _assert_within(y, ref_y, np.abs(g64) * e_xhat + gamma(2) * (np.abs(xhat * g64) + np.abs(beta)), "LayerNorm")
    # dx = rstd (g dy - mean(g dy) - xhat mean(g dy xhat)): two more sums of d terms, xhat's error through
    # both places it enters, rstd's relative error, and a few roundings of the combination.
    gdy = np.abs(g64 * dy)
    s2 = np.abs((g64 * dy * xhat).mean(axis=-1, keepdims=True))
    magnitude = rstd * (gdy + gdy.mean(axis=-1, keepdims=True) + np.abs(xhat) * (gdy * np.abs(xhat)).mean(axis=-1, keepdims=True))
    bound_dx = gamma(d + 10) * magnitude + rstd * (e_xhat * s2 + np.abs(xhat) * (gdy * e_xhat).mean(axis=-1, keepdims=True))
    _assert_within(dx, ref_dx, bound_dx, "LayerNorm input gradient")
    # d gamma = sum over rows of dy xhat, d beta = sum of dy: sums of `rows` terms.
    _assert_within(dg, ref_dg, gamma(rows + 1) * (np.abs(dy) * np.abs(xhat)).sum(0) + (np.abs(dy) * e_xhat).sum(0),
                   "LayerNorm gamma gradient")
    _assert_within(db, ref_db, gamma(rows) * np.abs(dy).sum(0), "LayerNorm beta gradient")


@pytest.mark.parametrize("approximate", [False, True], ids=["erf", "tanh"])
def test_gelu_kernel_matches_float64_reference(isa, approximate):
    kernel = kernels.gelu(approximate, isa)
    assert kernel is not None
    x = np.concatenate([np.linspace(-10, 10, 20001), np.random.default_rng(7).standard_normal(5000) * 3])
    x = x.astype(np.float32)
    y, (dx,) = _ours(kernel, [x], np.ones_like(x), 1)
    ref_y, (ref_dx,) = _torch(lambda t: torch.nn.functional.gelu(t, approximate="tanh" if approximate else "none"),
                              [x], np.ones_like(x), 1)
    x64 = x.astype(np.float64)
    # y = 0.5 x (1 + erf(x / sqrt 2)) or 0.5 x (1 + tanh(a)). Eigen's rational erf and the exp-based
    # tanh are accurate to a few ulp *absolute* near +-1 (Eigen's docs; Cephes), so 1 + erf keeps an
    # absolute error of ~4 u even where it cancels (large negative x): |dy| <= 8 u (|y| + 0.5 |x|).
    _assert_within(y, ref_y, 8 * U * (np.abs(ref_y) + 0.5 * np.abs(x64)), "GELU")
    # dy/dx = T1 + T2: T1 = 0.5 (1 + erf or tanh), absolute error <= 0.5 * 8 u as above; T2 = x phi(x) (erf) or 0.5 x sech^2(a) a'
    # (tanh) holds an exp(-e) whose argument e (x^2 / 2, or 2 |a|) carries a relative error of ~2 u,
    # hence e * 2 u relative in exp(-e), plus a few roundings of the products.
    if approximate:
        arg = 0.7978845608028654 * (x64 + 0.044715 * x64 ** 3)
        t1, e = 0.5 * (1 + np.tanh(arg)), 2 * np.abs(arg)
    else:
        t1, e = 0.5 * (1 + np.vectorize(math.erf)(x64 / np.sqrt(2))), x64 ** 2 / 2
    t2 = ref_dx - t1
    _assert_within(dx, ref_dx, U * (4 + (8 + 2 * e) * np.abs(t2) + np.abs(ref_dx)), "GELU gradient")


def test_patchify_kernel_is_exact_and_inverts_in_backward(isa, mode):
    image = _normal(2, 3, 2, 4, 3, 4)  # (B, C, H/p, p, W/p, p)
    perm = (0, 2, 4, 1, 3, 5)
    patchify = kernels.patchify(isa)
    np.testing.assert_array_equal(patchify(ms.Tensor(image)).asnumpy(), image.transpose(perm))
    upstream = _normal(*image.transpose(perm).shape, seed=5)
    grad = ms.grad(_Weighted(patchify, upstream))(ms.Tensor(image)).asnumpy()
    np.testing.assert_array_equal(grad, upstream.transpose(np.argsort(perm)))  # a copy: no rounding at all


def test_kernels_accept_a_dynamic_batch(isa):
    """Shapes come from the library's C++ infer functions, so one graph serves every batch size."""
    linear = kernels.linear(isa)
    patchify = kernels.patchify(isa)
    w, b = _normal(6, 8), _normal(6, seed=1)

    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.w = ms.Parameter(ms.Tensor(w))
            self.b = ms.Parameter(ms.Tensor(b))

        def construct(self, x):  # (B, 4, 8) -> (B, 1, 1, 4, 2, 3)
            y = linear(x.reshape(-1, 8), self.w, self.b)
            return patchify(y.reshape(-1, 4, 1, 2, 1, 3))

    def arrange(rows):  # (B 4, 6) -> the patchified layout
        return rows.reshape(-1, 4, 1, 2, 1, 3).transpose(0, 2, 4, 1, 3, 5)

    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        net = Net()
        net.set_inputs(ms.Tensor(shape=[None, 4, 8], dtype=ms.float32))
        for batch in (3, 1):
            x = _normal(batch, 4, 8, seed=batch).reshape(-1, 8).astype(np.float64)
            expected = arrange(x @ w.T + b)
            bound = arrange(gamma(8 + 2) * (np.abs(x) @ np.abs(w.T) + np.abs(b)))  # sums of 8 products + bias
            _assert_within(net(ms.Tensor(x.astype(np.float32).reshape(batch, 4, 8))).asnumpy(), expected, bound,
                           f"batch {batch}")
        assert len(net.compile_cache) == 1  # one phase per graph MindSpore really compiled
    finally:
        ms.set_context(mode=previous)


def test_a_variant_this_cpu_lacks_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(kernels, "cpu_isas", lambda: ("baseline",))
    monkeypatch.setenv(kernels.ISA_ENV, "avx2")
    with pytest.raises(ValueError, match=r"VIT_MS_KERNEL_ISA='avx2': this CPU cannot run that variant \(it runs "
                                         r"\['baseline'\]\)"):
        kernels.selected_isa()
    with pytest.raises(ValueError, match="cannot run the 'avx2' kernels"):
        kernels.library("avx2")
    monkeypatch.setenv(kernels.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match=r"'sse9' is not a kernel variant; use one of \['auto', 'avx512'"):
        kernels.selected_isa()
    monkeypatch.setenv(kernels.ISA_ENV, "auto")
    assert kernels.selected_isa() == "baseline"
