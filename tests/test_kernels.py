"""The fast path's CPU kernels (`vit_ms.kernels`), each against PyTorch in float64: forward values and the
gradients their hand-written backward kernels give for a random upstream gradient."""
import shutil

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from torch_reference import torch
from vit_ms import kernels

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="the fused kernels need a C++ compiler (g++) on this machine")


class _Weighted(nn.Cell):
    """sum(op(*inputs) * upstream): its gradient is the op's backward applied to `upstream`."""

    def __init__(self, op, upstream):
        super().__init__()
        self.op = op
        self.upstream = ms.Tensor(upstream)

    def construct(self, *inputs):
        return (self.op(*inputs) * self.upstream).sum()


def _check(op, torch_op, inputs, atol, wrt=None):
    """op's output and the gradients of its first `wrt` inputs (default all) against torch_op in float64,
    for a random upstream gradient."""
    wrt = len(inputs) if wrt is None else wrt
    out = op(*(ms.Tensor(a) for a in inputs)).asnumpy()
    ref_inputs = [torch.from_numpy(a).double().requires_grad_() for a in inputs]
    ref = torch_op(*ref_inputs)
    upstream = np.random.default_rng(3).standard_normal(ref.shape).astype(np.float32)
    (ref * torch.from_numpy(upstream).double()).sum().backward()
    grads = ms.grad(_Weighted(op, upstream), grad_position=tuple(range(wrt)))(
        *(ms.Tensor(a) for a in inputs))
    grads = grads if isinstance(grads, tuple) else (grads,)  # one input: ms.grad returns the tensor itself
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=0, atol=atol)
    for i, (grad, ref_input) in enumerate(zip(grads, ref_inputs[:wrt])):
        np.testing.assert_allclose(grad.asnumpy(), ref_input.grad.numpy(), rtol=0, atol=atol, err_msg=f"input {i}")


def _normal(*shape, seed=0):
    return np.random.default_rng(seed + len(shape)).standard_normal(shape).astype(np.float32)


def test_dense_kernel_is_x_wt_plus_b(mode):
    linear = kernels.linear_kernel()
    assert linear is not None, "the MindSpore wheel here ships oneDNN: the Dense kernel must build"
    # 37 rows: an odd count, split unevenly over the threads.
    _check(linear, lambda x, w, b: x @ w.T + b, [_normal(37, 24), _normal(16, 24, seed=1), _normal(16, seed=2)],
           atol=1e-4)


def test_attention_kernels_read_heads_in_place(mode):
    scores, values = kernels.attention_kernels()
    b, n, heads, dim = 2, 7, 3, 5
    qkv = _normal(b, n, 3, heads, dim)  # the qkv projection's output, viewed per head
    probs = _normal(b, heads, n, n, seed=2)
    scale = np.array([dim ** -0.5], np.float32)

    def torch_scores(t, s):
        q, k = t[:, :, 0].transpose(1, 2), t[:, :, 1].transpose(1, 2)  # (B, heads, N, head_dim)
        return s * q @ k.transpose(-1, -2)

    def torch_values(p, t):
        return (p @ t[:, :, 2].transpose(1, 2)).transpose(1, 2)  # (B, N, heads, head_dim)

    _check(scores, torch_scores, [qkv, scale], atol=1e-5, wrt=1)  # the scale is a constant: no gradient
    _check(values, torch_values, [probs, qkv], atol=1e-5)


def test_softmax_kernel(mode):
    softmax = kernels.softmax_kernel()
    x = _normal(2, 3, 5, 197) * 4
    x[0, 0, 0, :] = 80.0  # a constant row: exp(x - max) must not overflow
    _check(softmax, lambda t: torch.softmax(t, dim=-1), [x], atol=1e-6)


def test_patchify_kernel_is_exact_and_inverts_in_backward(mode):
    image = _normal(2, 3, 2, 4, 3, 4)  # (B, C, H/p, p, W/p, p)
    perm = (0, 2, 4, 1, 3, 5)
    patchify = kernels.patchify_kernel()
    np.testing.assert_array_equal(patchify(ms.Tensor(image)).asnumpy(), image.transpose(perm))
    upstream = _normal(*image.transpose(perm).shape, seed=5)
    grad = ms.grad(_Weighted(patchify, upstream))(ms.Tensor(image)).asnumpy()
    np.testing.assert_array_equal(grad, upstream.transpose(np.argsort(perm)))


def test_kernels_accept_a_dynamic_batch():
    """Shapes come from the library's C++ infer functions, so one graph serves every batch size."""
    linear = kernels.linear_kernel()
    patchify = kernels.patchify_kernel()

    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.w = ms.Parameter(ms.Tensor(_normal(6, 8)))
            self.b = ms.Parameter(ms.Tensor(_normal(6, seed=1)))

        def construct(self, x):  # (B, 4, 8) -> (B, 1, 1, 4, 2, 3)
            y = linear(x.reshape(-1, 8), self.w, self.b)
            return patchify(y.reshape(-1, 4, 1, 2, 1, 3))

    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        net = Net()
        net.set_inputs(ms.Tensor(shape=[None, 4, 8], dtype=ms.float32))
        for batch in (3, 1):
            x = _normal(batch, 4, 8, seed=batch)
            expected = (x.reshape(-1, 8) @ _normal(6, 8).T + _normal(6, seed=1)).reshape(batch, 4, 2, 3)
            expected = expected.reshape(batch, 4, 1, 2, 1, 3).transpose(0, 2, 4, 1, 3, 5)
            np.testing.assert_allclose(net(ms.Tensor(x)).asnumpy(), expected, rtol=0, atol=1e-5)
        assert len(net.compile_cache) == 1  # one phase per graph MindSpore really compiled
    finally:
        ms.set_context(mode=previous)
