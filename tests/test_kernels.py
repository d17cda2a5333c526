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


def _check(op, torch_op, inputs, atol):
    """op's output and input gradients against torch_op in float64, for a random upstream gradient."""
    out = op(*(ms.Tensor(a) for a in inputs)).asnumpy()
    ref_inputs = [torch.from_numpy(a).double().requires_grad_() for a in inputs]
    ref = torch_op(*ref_inputs)
    upstream = np.random.default_rng(3).standard_normal(ref.shape).astype(np.float32)
    (ref * torch.from_numpy(upstream).double()).sum().backward()
    grads = ms.grad(_Weighted(op, upstream), grad_position=tuple(range(len(inputs))))(
        *(ms.Tensor(a) for a in inputs))
    grads = grads if isinstance(grads, tuple) else (grads,)  # one input: ms.grad returns the tensor itself
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=0, atol=atol)
    for i, (grad, ref_input) in enumerate(zip(grads, ref_inputs)):
        np.testing.assert_allclose(grad.asnumpy(), ref_input.grad.numpy(), rtol=0, atol=atol, err_msg=f"input {i}")


def _normal(*shape, seed=0):
    return np.random.default_rng(seed + len(shape)).standard_normal(shape).astype(np.float32)


def test_dense_kernel_is_x_wt_plus_b(mode):
    linear = kernels.linear_kernel()
    assert linear is not None, "the MindSpore wheel here ships oneDNN: the Dense kernel must build"
    # 37 rows: an odd count, split unevenly over the threads.
    _check(linear, lambda x, w, b: x @ w.T + b, [_normal(37, 24), _normal(16, 24, seed=1), _normal(16, seed=2)],
           atol=1e-4)


def test_attention_product_kernels(mode):
    a_bt, ab = kernels.batched_matmul_kernels()
    q, k = _normal(2, 3, 7, 5), _normal(2, 3, 7, 5, seed=1)  # (B, heads, N, head_dim)
    probs = _normal(2, 3, 7, 7, seed=2)
    _check(a_bt, lambda a, b: a @ b.transpose(-1, -2), [q, k], atol=1e-5)
    _check(ab, lambda a, b: a @ b, [probs, q], atol=1e-5)


def test_softmax_kernel(mode):
    softmax = kernels.softmax_kernel()
    x = _normal(2, 3, 5, 197) * 4
    x[0, 0, 0, :] = 80.0  # a constant row: exp(x - max) must not overflow
    _check(softmax, lambda t: torch.softmax(t, dim=-1), [x], atol=1e-6)


def test_permutation_kernels_are_exact_and_invert_in_backward(mode):
    tokens = _normal(2, 5, 3, 4)  # (B, N, heads, head_dim)
    image = _normal(2, 3, 2, 4, 3, 4)  # (B, C, H/p, p, W/p, p)
    for op, perm, x in ((kernels.swap_heads_kernel(), (0, 2, 1, 3), tokens),
                        (kernels.patchify_kernel(), (0, 2, 4, 1, 3, 5), image)):
        np.testing.assert_array_equal(op(ms.Tensor(x)).asnumpy(), x.transpose(perm))
        upstream = _normal(*x.transpose(perm).shape, seed=5)
        grad = ms.grad(_Weighted(op, upstream))(ms.Tensor(x)).asnumpy()
        np.testing.assert_array_equal(grad, upstream.transpose(np.argsort(perm)))


def test_kernels_accept_a_dynamic_batch():
    """Shapes come from the library's C++ infer functions, so one graph serves every batch size."""
    linear = kernels.linear_kernel()
    swap = kernels.swap_heads_kernel()

    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.w = ms.Parameter(ms.Tensor(_normal(6, 8)))
            self.b = ms.Parameter(ms.Tensor(_normal(6, seed=1)))

        def construct(self, x):  # (B, 4, 8) -> (B, 2, 4, 3)
            y = linear(x.reshape(-1, 8), self.w, self.b)
            return swap(y.reshape(-1, 4, 2, 3))

    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        net = Net()
        net.set_inputs(ms.Tensor(shape=[None, 4, 8], dtype=ms.float32))
        for batch in (3, 1):
            x = _normal(batch, 4, 8, seed=batch)
            expected = (x.reshape(-1, 8) @ _normal(6, 8).T + _normal(6, seed=1)).reshape(batch, 4, 2, 3)
            np.testing.assert_allclose(net(ms.Tensor(x)).asnumpy(), expected.transpose(0, 2, 1, 3), rtol=0,
                                       atol=1e-5)
        assert len(net.compile_cache) == 1  # one phase per graph MindSpore really compiled
    finally:
        ms.set_context(mode=previous)
