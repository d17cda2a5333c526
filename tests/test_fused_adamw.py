"""AdamW's fused update (`vit_ms.ops.adamw_update`, `FusedAdamWeightDecay`): the kernel's arithmetic
against float64 within a bound derived from its roundings, and the optimizer inside a training step,
where the update must come after every read of the weights it overwrites (the backward's included).

nn.AdamWeightDecay's update (no bias correction), for one parameter p with moments m, v and gradient g:
    m' = b1 m + (1 - b1) g,  v' = b2 v + (1 - b2) g^2,  p' = p - lr (m' / (sqrt(v') + eps) + wd p).
The kernel computes it in float32 (1 - b1 and 1 - b2 are exact: Sterbenz). With u = 2^-24 and gamma_k
= k u / (1 - k u), to first order:
    |m^ - m'| <= gamma_2 (b1 |m| + (1 - b1) |g|) =: E_m       (two products, one sum)
    |v^ - v'| <= gamma_3 v'                                    (three roundings of non-negative terms)
    d = sqrt(v') + eps: relative error <= gamma_4              (sqrt halves v's error, then two roundings)
    q = m' / d: |q^ - q| <= E_m / d + gamma_5 |q|
    r = q + wd p: |r^ - r| <= |q^ - q| + gamma_2 (|q| + wd |p|)
    |p^' - p'| <= lr |r^ - r| + gamma_2 (|p| + lr |r|)
Second-order terms are covered by a factor 1 + 1e-3 (they are O(gamma^2) relative).
"""
import shutil

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn, ops

from float32_bounds import gamma
from vit_ms import ops as kernels
from vit_ms.training import FusedAdamWeightDecay

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="the fused kernels need a C++ compiler (g++) on this machine")

B1, B2 = np.float32(0.9), np.float32(0.999)


@pytest.fixture(params=kernels.cpu_isas())
def isa(request):
    """Every compiled variant this CPU runs (`[avx2]`, `[baseline]`, ...), as in test_kernels.py."""
    return request.param


def update_bounds(p, m, v, g, lr, eps, wd):
    """float64 p', m', v' from float32 inputs, and the bounds above on |p^' - p'| and |m^ - m'|."""
    p, m, v, g = (np.asarray(a, np.float64) for a in (p, m, v, g))
    b1, b2, lr, eps, wd = (float(np.float32(a)) for a in (B1, B2, lr, eps, wd))
    m1 = b1 * m + (1 - b1) * g
    v1 = b2 * v + (1 - b2) * g * g
    d = np.sqrt(v1) + eps
    q = m1 / d
    r = q + wd * p
    p1 = p - lr * r
    e_m = gamma(2) * (b1 * np.abs(m) + (1 - b1) * np.abs(g))
    e_q = e_m / d + gamma(5) * np.abs(q)
    e_r = e_q + gamma(2) * (np.abs(q) + wd * np.abs(p))
    e_p = (lr * e_r + gamma(2) * (np.abs(p) + lr * np.abs(r))) * (1 + 1e-3)
    return p1, m1, v1, e_p, e_m * (1 + 1e-3)


class _OneUpdate(nn.Cell):
    def __init__(self, kernel, p, m, v):
        super().__init__()
        self.kernel = kernel
        self.p, self.m, self.v = Parameter(Tensor(p), "p"), Parameter(Tensor(m), "m"), Parameter(Tensor(v), "v")

    def construct(self, g, lr, b1, b2, eps, wd):
        return self.kernel(self.p, self.m, self.v, g, lr, b1, b2, eps, wd)


def _scalar(x):
    return Tensor(np.array([x], np.float32))


def test_adamw_kernel_is_the_update_within_its_rounding_bound(isa, mode, rng):
    kernel = kernels.adamw_update(isa)
    assert kernel is not None, "the kernel library builds wherever there is a C++ compiler"
    n = 4099  # not a multiple of any vector width or thread count
    p = rng.standard_normal(n).astype(np.float32)
    m = (0.01 * rng.standard_normal(n)).astype(np.float32)
    v = (1e-4 * rng.random(n)).astype(np.float32)
    g = (0.1 * rng.standard_normal(n)).astype(np.float32)
    g[::7] = 0  # v' tiny or zero there: the division at its most sensitive
    v[::14] = 0
    lr, eps, wd = 1e-2, 1e-8, 0.05
    cell = _OneUpdate(kernel, p, m, v)
    cell(Tensor(g), _scalar(lr), _scalar(B1), _scalar(B2), _scalar(eps), _scalar(wd))
    p1, m1, v1, e_p, e_m = update_bounds(p, m, v, g, lr, eps, wd)
    got_p, got_m, got_v = (x.asnumpy().astype(np.float64) for x in (cell.p, cell.m, cell.v))
    assert np.all(np.abs(got_m - m1) <= e_m)
    assert np.all(np.abs(got_v - v1) <= gamma(3) * v1 * (1 + 1e-3))
    assert np.all(np.abs(got_p - p1) <= e_p), np.max(np.abs(got_p - p1) / e_p)
    # The bound is far below the update's terms: a dropped term (weight decay here) would be caught.
    assert np.max(np.abs(got_p - (p1 + lr * wd * p)) / e_p) > 100


class _TwoLayers(nn.Cell):
    """y = (x W1^T) W2^T, loss = |y|^2 / 2: the backward reads W2 (for dh = dy W2) after W2's own gradient
    is complete, so an update of W2 scheduled before that read would corrupt W1's gradient."""

    def __init__(self, w1, w2):
        super().__init__()
        self.w1, self.w2 = Parameter(Tensor(w1), "w1"), Parameter(Tensor(w2), "w2")

    def construct(self, x):
        y = ops.matmul(ops.matmul(x, self.w1.T), self.w2.T)
        return 0.5 * (y * y).sum()


@pytest.mark.parametrize("grouped", [True, False], ids=["groups", "one-list"])
def test_fused_adamw_in_a_training_step_updates_after_every_read(mode, rng, grouped):
    """One step of TrainOneStepCell with FusedAdamWeightDecay against the update in float64 from float64
    gradients: with two parameter groups (own learning-rate schedules, weight decay on W1 only), and with
    one list (one learning rate and decay for both).
    eps = 1e3 makes the update nearly linear in g (q ~ (1 - b1) g / eps), and lr = 1e3 makes it large:
    W2 moves by ~0.1 |g2|, of the order of W2 itself, so W1's gradient taken after the update would be
    off by O(1), while float32 rounding moves it by gamma_k of its terms' magnitude (k = the chain of
    sums: 6 + 5 + 4 + 8) and p' by at most lr (1 - b1) / eps = 0.1 times that."""
    x = rng.standard_normal((8, 6)).astype(np.float32)
    w1 = (rng.standard_normal((5, 6)) / np.sqrt(6)).astype(np.float32)
    w2 = (rng.standard_normal((4, 5)) / np.sqrt(5)).astype(np.float32)
    net = _TwoLayers(w1, w2)
    lr1, eps, wd = 1e3, 1e3, 0.1
    lr2, wd2 = (5e2, 0.0) if grouped else (lr1, wd)
    if grouped:
        params = [{"params": [net.w1], "weight_decay": wd, "lr": Tensor(np.array([lr1, 1.0], np.float32))},
                  {"params": [net.w2], "weight_decay": wd2, "lr": Tensor(np.array([lr2, 1.0], np.float32))}]
    else:
        params = [net.w1, net.w2]
    opt = FusedAdamWeightDecay(params, learning_rate=Tensor(np.array([lr1, 1.0], np.float32)), eps=eps,
                               weight_decay=0.0 if grouped else wd, kernel=kernels.adamw_update())
    # The same state as nn.AdamWeightDecay's, so checkpoints and resume move between the two.
    assert [p.name for p in opt.moments1] == ["adam_m.w1", "adam_m.w2"]
    assert [p.name for p in opt.moments2] == ["adam_v.w1", "adam_v.w2"]
    step = nn.TrainOneStepCell(net, opt)
    step(Tensor(x))

    x64, w1_64, w2_64 = (a.astype(np.float64) for a in (x, w1, w2))
    h, y = x64 @ w1_64.T, x64 @ w1_64.T @ w2_64.T
    g2, g1 = y.T @ h, (y @ w2_64).T @ x64
    ax, aw1, aw2 = np.abs(x64), np.abs(w1_64), np.abs(w2_64)
    ah, ay = ax @ aw1.T, ax @ aw1.T @ aw2.T
    k = gamma(6 + 5 + 4 + 8 + 2)
    e_g2, e_g1 = k * ay.T @ ah, k * (ay @ aw2).T @ ax
    zeros = np.zeros_like
    for got, p0, g, e_g, lr, decay in ((net.w1, w1, g1, e_g1, lr1, wd), (net.w2, w2, g2, e_g2, lr2, wd2)):
        p1, _, _, e_p, _ = update_bounds(p0, zeros(p0), zeros(p0), g, lr, eps, decay)
        # d p' / d g = lr (1 - b1) eps / (sqrt(1 - b2) |g| + eps)^2 <= lr (1 - b1) / eps
        bound = e_p + lr * (1 - float(B1)) / eps * e_g
        diff = np.abs(got.asnumpy().astype(np.float64) - p1)
        assert np.all(diff <= bound), (got.name, np.max(diff / bound))
    assert int(opt.global_step.asnumpy().reshape(-1)[0]) == 1



def test_create_optimizer_takes_the_fused_adamw_where_asked_with_the_same_groups():
    """train.py passes `fused=` the model's own fused-kernel decision; the groups (layer-wise rates, decay
    spared on norms, biases, cls and pos) are those nn.AdamWeightDecay gets."""
    from vit_ms.model import create_model
    from vit_ms.training.optim import create_optimizer

    net = create_model("vit_ti_16", fast=True, image_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                       mlp_dim=64, num_classes=3)
    fused = create_optimizer(net, "adamw", [1e-3, 2e-3], weight_decay=0.05, layer_decay=0.75, fused=True)
    plain = create_optimizer(net, "adamw", [1e-3, 2e-3], weight_decay=0.05, layer_decay=0.75)
    assert type(fused) is FusedAdamWeightDecay and type(plain) is nn.AdamWeightDecay
    assert [p.name for p in fused.moments1] == [p.name for p in plain.moments1]
    assert list(fused.decay_flags) == list(plain.decay_flags)
    rates = [[lr.learning_rate.asnumpy() for lr in opt.learning_rate] for opt in (fused, plain)]  # per group
    assert len(rates[0]) == len(rates[1]) > 1 and all(map(np.array_equal, *rates))
    assert [float(w) for w in fused.weight_decay] == [float(w) for w in plain.weight_decay]
