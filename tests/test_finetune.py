"""Fine-tuning optimisation parts (vit_ms.training.optim, .ema, .train_step) against NumPy and
hand tables: the soft-target loss, layer-wise lr decay, SGD, clipping, gradient accumulation, EMA, a frozen
backbone, recomputation, and the train step under Model.train."""
import numpy as np
import pytest

import mindspore as ms
import mindspore.dataset as ds
from mindspore import nn
from mindspore.train import Model

from vit_ms.data.augment import MixupCutmix, add_batch_mixup
from vit_ms.training.ema import ModelEMA
from vit_ms.model import create_model
from vit_ms.training.optim import (SoftCrossEntropy, apply_recompute, create_optimizer, freeze_backbone,
                                   layer_scale, param_groups)
from vit_ms.training.train_step import TrainStep

CLASSES = 3
# float32 unit roundoff
U = 2.0 ** -24


@pytest.fixture
def graph():
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=previous)


def tiny(fast=False, seed=0, drop_path_rate=0.0):
    """A 2-block ViT on 16 px images; the head made non-zero so every parameter gets a gradient."""
    ms.set_seed(seed)
    net = create_model("vit_ti_16", fast=fast, image_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                       mlp_dim=64, num_classes=CLASSES, drop_path_rate=drop_path_rate)
    head = np.random.default_rng(seed + 100).standard_normal((CLASSES, 32)).astype(np.float32) * 0.3
    net.head.weight.set_data(ms.Tensor(head))
    return net


def batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 3, 16, 16)).astype(np.float32), rng.integers(0, CLASSES, n).astype(np.int32))


def weights(net):
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


def grads_of(net, x, y, loss=None):
    loss_net = nn.WithLossCell(net, loss or SoftCrossEntropy(CLASSES))
    _, grads = ms.value_and_grad(loss_net, None, net.trainable_params())(ms.Tensor(x), ms.Tensor(y))
    return {p.name: g.asnumpy() for p, g in zip(net.trainable_params(), grads)}


# ---------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------

def _log_softmax(z):
    z = z.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_soft_cross_entropy_int_labels_and_soft_targets():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 4)).astype(np.float32) * 3
    labels = np.array([0, 3, 1, 1, 2], np.int32)
    s = 0.2
    target = np.full((5, 4), s / 3)
    target[np.arange(5), labels] = 1 - s  # the project's convention: on 1 - s, off s / (C - 1)
    want = -(target * _log_softmax(logits)).sum(axis=1).mean()
    loss = SoftCrossEntropy(4, s)
    # float32 log-softmax of values |z| < 10: a few ulps of 10 per element.
    assert float(loss(ms.Tensor(logits), ms.Tensor(labels))) == pytest.approx(want, abs=1e-5)
    soft = rng.dirichlet(np.ones(4), 5).astype(np.float32)
    want = -(soft * _log_softmax(logits)).sum(axis=1).mean()
    assert float(loss(ms.Tensor(logits), ms.Tensor(soft))) == pytest.approx(want, abs=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay and the optimizer
# ---------------------------------------------------------------------------------------------------------

# Depth 2, D = 0.5: embeddings are layer 0 (0.5^3), block i layer i + 1, final norm and head layer 3 (1.0).
LAYER_TABLE = {
    "cls_token": 0.125, "pos_embed": 0.125, "patch_embed.proj.weight": 0.125, "patch_embed.proj.bias": 0.125,
    "blocks.0.norm1.gamma": 0.25, "blocks.0.attn.qkv.weight": 0.25, "blocks.0.mlp.fc2.bias": 0.25,
    "blocks.1.attn.proj.weight": 0.5, "blocks.1.norm2.beta": 0.5, "blocks.1.mlp.fc1.weight": 0.5,
    "norm.gamma": 1.0, "norm.beta": 1.0, "head.weight": 1.0, "head.bias": 1.0,
}
DECAYED = {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.attn.proj.weight",
           "blocks.1.mlp.fc1.weight", "head.weight"}


def test_layer_scale_hand_table():
    for name, scale in LAYER_TABLE.items():
        assert layer_scale(name, 2, 0.5) == scale, name


def test_layer_decay_groups_lr_and_weight_decay_per_parameter():
    net = tiny()
    schedule = [0.1, 0.2, 0.4]
    groups = param_groups(net, schedule, layer_decay=0.5, weight_decay=0.05)
    assert [p.name for p in groups[-1]["order_params"]] == [p.name for p in net.trainable_params()]
    seen = {}
    for group in groups[:-1]:
        for param in group["params"]:
            seen[param.name] = (group["lr"].asnumpy(), group["weight_decay"])
    assert set(seen) == {p.name for p in net.trainable_params()}
    for name, scale in LAYER_TABLE.items():
        lr, wd = seen[name]
        np.testing.assert_array_equal(lr, np.float32(schedule) * np.float32(scale), err_msg=name)
        assert wd == (0.05 if name in DECAYED else 0.0), name


def test_sgd_step_uses_each_parameters_scaled_lr():
    """Fake gradients of ones through plain SGD: each parameter moves by exactly -lr[step] * scale."""
    net = tiny()
    before = weights(net)
    opt = create_optimizer(net, "sgd", [0.1, 0.2], layer_decay=0.5, momentum=0.0)
    ones = tuple(ms.Tensor(np.ones(p.shape, np.float32)) for p in opt.parameters)
    opt(ones)
    opt(ones)
    after = weights(net)
    for name, scale in LAYER_TABLE.items():
        # Two float32 subtractions of lr * scale: |error| <= 2 ulp of the weight (|w| < 4) plus the product.
        np.testing.assert_allclose(after[name], before[name] - (0.1 + 0.2) * scale, rtol=0, atol=2e-6,
                                   err_msg=name)


def test_sgd_momentum_and_nesterov_vs_numpy():
    net = tiny()
    w0 = weights(net)["head.weight"].astype(np.float64)
    opt = create_optimizer(net, "sgd", [0.1, 0.1, 0.1], momentum=0.9, nesterov=True)
    assert isinstance(opt, nn.SGD)
    rng = np.random.default_rng(0)
    v, w = 0.0, w0
    for _ in range(3):
        grads = tuple(rng.standard_normal(p.shape).astype(np.float32) for p in opt.parameters)
        opt(tuple(ms.Tensor(g) for g in grads))
        g = grads[[p.name for p in opt.parameters].index("head.weight")]
        v = 0.9 * v + g
        w = w - 0.1 * (g + 0.9 * v)  # PyTorch's Nesterov form, which nn.SGD follows
    np.testing.assert_allclose(weights(net)["head.weight"], w, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="--optimizer"):
        create_optimizer(net, "lamb", [0.1])


# ---------------------------------------------------------------------------------------------------------
# The train step: clipping, accumulation, EMA
# ---------------------------------------------------------------------------------------------------------

def test_clip_by_global_norm_vs_numpy():
    x, y = batch(8)
    net = tiny()
    before = weights(net)
    g = grads_of(net, x, y)
    norm = np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in g.values()))
    clip = 0.25 * norm  # active: the gradient is scaled by clip / norm = 0.25
    step = TrainStep(nn.WithLossCell(net, SoftCrossEntropy(CLASSES)), nn.SGD(net.trainable_params(), 0.5),
                     clip_grad=float(clip))
    step.set_train()
    step(ms.Tensor(x), ms.Tensor(y))
    after = weights(net)
    for name, grad in g.items():
        want = before[name] - 0.5 * grad * (clip / norm)
        # float32: norm to ~1e-6 relative, the update lr * g * 0.25 to a few ulps of the weight (|w| < 4).
        np.testing.assert_allclose(after[name], want, rtol=0, atol=2e-6, err_msg=name)


def test_accumulating_4_micro_batches_of_4_equals_one_step_of_16(graph):
    """Plain SGD makes the step linear in the gradient, so the two differ only by float32 summation order:
    the batch-16 gradient sums 16 per-sample terms (over 80 token rows in the weight GEMMs) in another
    order than 4 sums of 4 then a sum of 4; |difference| <= ~80 u sum|terms| ~ 5e-6 of a gradient of
    size O(1), times lr 0.1 -> under 1e-6 on the weights, well inside 1e-5."""
    x, y = batch(16)
    one = tiny()
    step16 = TrainStep(nn.WithLossCell(one, SoftCrossEntropy(CLASSES, 0.1)), nn.SGD(one.trainable_params(), 0.1))
    step16.set_train()
    step16(ms.Tensor(x), ms.Tensor(y))

    acc = tiny()
    start = weights(acc)
    opt = nn.SGD(acc.trainable_params(), 0.1)
    # EMA decay 0: the average is exactly the weights it saw, so it proves (in graph mode) that the EMA
    # reads the weights after the optimizer step, not before.
    ema = ModelEMA(acc, 0.0)
    step4 = TrainStep(nn.WithLossCell(acc, SoftCrossEntropy(CLASSES, 0.1)), opt, accum_steps=4, ema=ema)
    step4.set_train()
    for i in range(4):
        step4(ms.Tensor(x[4 * i:4 * i + 4]), ms.Tensor(y[4 * i:4 * i + 4]))
        if i < 3:  # nothing applied before the 4th micro-batch
            assert all(np.array_equal(v, start[k]) for k, v in weights(acc).items())
    assert int(opt.global_step.asnumpy().reshape(-1)[0]) == 1
    got, want = weights(acc), weights(one)
    changed = 0
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5, err_msg=name)
        changed += not np.array_equal(want[name], start[name])
    assert changed == len(want)
    for name, value in ema.ema_state().items():
        np.testing.assert_array_equal(value.asnumpy(), got[name], err_msg=name)
    # The buffers are empty again for the next accumulation.
    assert all(not t.asnumpy().any() for t in step4.accumulated)


def test_ema_vs_numpy_over_three_steps_and_restored_by_name(tmp_path):
    net = tiny()
    decay = 0.7
    ema = ModelEMA(net, decay)
    step = TrainStep(nn.WithLossCell(net, SoftCrossEntropy(CLASSES)), nn.SGD(net.trainable_params(), 0.5),
                     ema=ema)
    step.set_train()
    want = {k: v.astype(np.float64) for k, v in weights(net).items()}
    for i in range(3):
        x, y = batch(4, seed=i)
        step(ms.Tensor(x), ms.Tensor(y))
        for name, w in weights(net).items():  # the update uses the weights after the optimizer step
            want[name] = decay * want[name] + (1 - decay) * w
    state = ema.ema_state()
    assert set(state) == set(want)
    for name, value in state.items():
        # Three float32 updates (two products and a sum each, |values| < 4): at most 3 x 3 x 4 U = 36 U.
        np.testing.assert_allclose(value.asnumpy(), want[name], rtol=0, atol=64 * U, err_msg=name)
    assert any(not np.allclose(state[k].asnumpy(), v) for k, v in weights(net).items())

    # Saved with the train network and restored by name into a fresh one.
    path = str(tmp_path / "last.ckpt")
    ms.save_checkpoint(step, path)
    fresh = tiny(seed=5)
    fresh_ema = ModelEMA(fresh, decay)
    fresh_step = TrainStep(nn.WithLossCell(fresh, SoftCrossEntropy(CLASSES)), nn.SGD(fresh.trainable_params(), 0.5),
                           ema=fresh_ema)
    not_loaded, _ = ms.load_param_into_net(fresh_step, ms.load_checkpoint(path), strict_load=True)
    assert not_loaded == []
    for name, value in fresh_ema.ema_state().items():
        np.testing.assert_array_equal(value.asnumpy(), state[name].asnumpy())
    evaluated = fresh_ema.copy_to(tiny(seed=9))
    for name, value in weights(evaluated).items():
        np.testing.assert_array_equal(value, state[name].asnumpy())
    ema.reset()  # back to the current weights
    for name, value in ema.ema_state().items():
        np.testing.assert_array_equal(value.asnumpy(), weights(net)[name])


# ---------------------------------------------------------------------------------------------------------
# Frozen backbone, recomputation
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("train_final_norm", [False, True])
def test_frozen_backbone_changes_only_the_head(train_final_norm):
    net = tiny()
    names = freeze_backbone(net, train_final_norm)
    expected = {"head.weight", "head.bias"} | ({"norm.gamma", "norm.beta"} if train_final_norm else set())
    assert set(names) == expected
    before = weights(net)
    opt = create_optimizer(net, "adamw", [1e-2], weight_decay=0.05, layer_decay=0.75)
    step = TrainStep(nn.WithLossCell(net, SoftCrossEntropy(CLASSES)), opt)
    step.set_train()
    x, y = batch(4)
    step(ms.Tensor(x), ms.Tensor(y))
    changed = {k for k, v in weights(net).items() if not np.array_equal(v, before[k])}
    assert changed == expected


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.9], ids=["no_drop_path", "drop_path"])
@pytest.mark.parametrize("fast", [False, True])
def test_recompute_gives_the_same_gradients(graph, fast, drop_path_rate):
    # With stochastic depth (the finetune recipe's 0.1; 0.9 here, so the second block drops most samples'
    # branches), the recomputed forward must drop what the first forward dropped.
    x, y = batch(16)

    def net():
        built = tiny(fast, drop_path_rate=drop_path_rate)
        built.set_train(True)  # DropPath draws in training mode only
        return built

    plain = grads_of(net(), x, y)
    recomputed = grads_of(apply_recompute(net()), x, y)
    if drop_path_rate:  # the masks are at work: other gradients than without stochastic depth
        still = grads_of(tiny(fast), x, y)
        assert any(not np.allclose(still[name], g) for name, g in plain.items())
    for name, g in plain.items():
        # Recomputation reruns the same kernels on the same inputs: equal up to (at most) reduction order.
        np.testing.assert_allclose(recomputed[name], g, rtol=1e-5, atol=1e-7, err_msg=name)


# ---------------------------------------------------------------------------------------------------------
# Under Model.train, with Mixup soft targets
# ---------------------------------------------------------------------------------------------------------

def test_train_step_under_model_train_with_mixup(graph):
    x, y = batch(16)
    dataset = ds.GeneratorDataset(list(zip(x, y)), ["image", "label"], shuffle=False).batch(4, drop_remainder=True)
    dataset = add_batch_mixup(dataset, MixupCutmix(CLASSES, 0.8, 1.0, label_smoothing=0.1, seed=0))
    net = tiny()
    before = weights(net)
    opt = create_optimizer(net, "adamw", [1e-3, 1e-3], weight_decay=0.05, layer_decay=0.75)
    ema = ModelEMA(net, 0.9)
    step = TrainStep(nn.WithLossCell(net, SoftCrossEntropy(CLASSES)), opt, clip_grad=1.0, accum_steps=2, ema=ema)
    losses = []

    class Record(ms.train.Callback):
        def on_train_step_end(self, run_context):
            losses.append(float(run_context.original_args().net_outputs.asnumpy()))

    Model(step).train(1, dataset, callbacks=[Record()], dataset_sink_mode=False)
    assert len(losses) == 4 and np.isfinite(losses).all()
    assert int(opt.global_step.asnumpy().reshape(-1)[0]) == 2  # 4 micro-batches, 2 optimizer steps
    assert all(not np.array_equal(v, before[k]) for k, v in weights(net).items())


@pytest.mark.parametrize("name, cls, no_decay_wd", [("adam", nn.Adam, 0.05), ("adamw", nn.AdamWeightDecay, 0.0),
                                                     ("sgd", nn.SGD, 0.0)])
def test_create_optimizer_kinds_and_decay_groups(name, cls, no_decay_wd):
    """adam keeps the tutorial's L2 on every parameter; adamw and sgd spare norms, biases, cls and pos."""
    net = tiny()
    opt = create_optimizer(net, name, [1e-3], weight_decay=0.05, layer_decay=0.75)
    assert type(opt) is cls
    groups = param_groups(net, [1e-3], 0.75, 0.05, decay_all=name == "adam")
    matrices = {"patch_embed.proj.weight", "head.weight"} | {
        f"blocks.{i}.{layer}.weight" for i in range(2) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    for group in groups[:-1]:
        for param in group["params"]:
            assert group["weight_decay"] == (0.05 if param.name in matrices else no_decay_wd), param.name
