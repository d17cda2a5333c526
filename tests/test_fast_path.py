"""The fast CPU path (`fast=True`): same logits, gradients and checkpoints as the plain path, fused GELU
kernels against a float64 reference, and one compiled graph for every batch size."""
import dataclasses
import logging
import shutil

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from torch_reference import torch
from vit_ms import ViTConfig, create_model, kernels, set_dynamic_batch

# Tiny width and depth, but the realistic 16 x 16 patch the fast patch embedding reshapes.
SMALL = ViTConfig(image_size=64, patch_size=16, num_classes=10, embed_dim=64, depth=2, num_heads=4, mlp_dim=128)

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="the fused kernels need a C++ compiler (g++) on this machine")


def _randomized_pair(config, seed=0):
    """A fast and a plain model holding the same random weights (zero init would hide mistakes)."""
    fast, plain = create_model(config), create_model(config, fast=False)
    rng = np.random.default_rng(seed)
    for p in fast.get_parameters():
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.3))
    not_loaded, _ = ms.load_param_into_net(plain, {p.name: p for p in fast.get_parameters()})
    assert not not_loaded
    return fast, plain


def _images(batch, seed=1, size=64):
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


@pytest.mark.parametrize("gelu_approximate", [False, True], ids=["gelu_erf", "gelu_tanh"])
def test_fast_and_plain_logits_agree(mode, gelu_approximate):
    config = dataclasses.replace(SMALL, gelu_approximate=gelu_approximate)
    fast, plain = _randomized_pair(config)
    fast.set_train(False)
    plain.set_train(False)
    x = ms.Tensor(_images(3))
    ours, reference = fast(x).asnumpy(), plain(x).asnumpy()
    assert np.abs(reference).max() > 0.5  # a real signal
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5)
    # Same for the token features and the attention probabilities the visualisations read.
    np.testing.assert_allclose(fast.forward_features(x).asnumpy(), plain.forward_features(x).asnumpy(),
                               rtol=0, atol=1e-5)
    tokens = fast.embed(x)
    probs_fast = fast.blocks[0].attn.attention_probs(tokens)
    probs_plain = plain.blocks[0].attn.attention_probs(tokens)
    np.testing.assert_allclose(probs_fast.asnumpy(), probs_plain.asnumpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("gelu_approximate", [False, True], ids=["gelu_erf", "gelu_tanh"])
def test_fast_and_plain_gradients_agree(gelu_approximate):
    # The fused GELU brings its own backward kernel; the patch matmul must send gradients to the conv weight.
    config = dataclasses.replace(SMALL, gelu_approximate=gelu_approximate)
    fast, plain = _randomized_pair(config, seed=2)
    x = ms.Tensor(_images(4, seed=3))
    y = ms.Tensor(np.array([1, 3, 5, 7], np.int32))
    grads = []
    for net in (fast, plain):
        net.set_train(True)
        loss_net = nn.WithLossCell(net, nn.CrossEntropyLoss())
        loss, g = ms.value_and_grad(loss_net, None, net.trainable_params())(x, y)
        grads.append(({p.name: v.asnumpy() for p, v in zip(net.trainable_params(), g)}, float(loss.asnumpy())))
    (g_fast, loss_fast), (g_plain, loss_plain) = grads
    assert abs(loss_fast - loss_plain) < 1e-5
    assert set(g_fast) == set(g_plain)
    assert np.abs(g_plain["patch_embed.proj.weight"]).max() > 1e-3  # the conv weight really gets a gradient
    for name in g_plain:
        scale = max(1.0, np.abs(g_plain[name]).max())
        np.testing.assert_allclose(g_fast[name], g_plain[name], rtol=0, atol=1e-5 * scale, err_msg=name)


def test_checkpoint_from_one_path_loads_into_the_other(tmp_path):
    fast, plain = _randomized_pair(SMALL, seed=4)
    x = ms.Tensor(_images(2, seed=5))
    for source, target_fast in ((fast, False), (plain, True)):
        path = tmp_path / f"from_{'fast' if source.fast else 'plain'}.ckpt"
        ms.save_checkpoint(source, str(path))
        target = create_model(SMALL, fast=target_fast)
        not_loaded, unused = ms.load_param_into_net(target, ms.load_checkpoint(str(path)))
        assert not not_loaded and not unused
        assert [p.name for p in target.get_parameters()] == [p.name for p in source.get_parameters()]
        source.set_train(False)
        target.set_train(False)
        np.testing.assert_allclose(target(x).asnumpy(), source(x).asnumpy(), rtol=0, atol=1e-5)


def test_changing_batch_size_does_not_recompile():
    # `Cell.compile_cache` holds one phase per graph MindSpore really compiled for that Cell.
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        x = _images(5, seed=6)
        net = set_dynamic_batch(create_model(SMALL), SMALL)
        net.set_train(False)
        whole = net(ms.Tensor(x)).asnumpy()
        parts = np.concatenate([net(ms.Tensor(x[:2])).asnumpy(), net(ms.Tensor(x[2:])).asnumpy()])
        assert len(net.compile_cache) == 1
        np.testing.assert_allclose(parts, whole, rtol=0, atol=1e-5)

        static = create_model(SMALL)  # the control: without a dynamic batch each new size compiles again
        static.set_train(False)
        static(ms.Tensor(x))
        static(ms.Tensor(x[:2]))
        assert len(static.compile_cache) == 2

        train_net = create_model(SMALL)
        step = nn.TrainOneStepCell(nn.WithLossCell(train_net, nn.CrossEntropyLoss()),
                                   nn.AdamWeightDecay(train_net.trainable_params(), learning_rate=1e-3))
        step.set_train(True)
        step.set_inputs(ms.Tensor(shape=[None, 3, 64, 64], dtype=ms.float32), ms.Tensor(shape=[None], dtype=ms.int32))
        for batch in (4, 3):
            assert np.isfinite(step(ms.Tensor(x[:batch]), ms.Tensor(np.arange(batch, dtype=np.int32))).asnumpy())
        assert len(step.compile_cache) == 1
    finally:
        ms.set_context(mode=previous)


@needs_compiler
@pytest.mark.parametrize("approximate", [False, True], ids=["erf", "tanh"])
def test_gelu_kernel_matches_float64_reference(approximate):
    kernel = kernels.gelu_kernel(approximate)
    assert kernel is not None

    class Gelu(nn.Cell):
        def construct(self, x):
            return kernel(x)

    x = np.concatenate([np.linspace(-10, 10, 20001), np.random.default_rng(7).standard_normal(5000) * 3])
    x = x.astype(np.float32)
    y = Gelu()(ms.Tensor(x)).asnumpy()
    dx = ms.grad(Gelu())(ms.Tensor(x)).asnumpy()
    xt = torch.from_numpy(x).double().requires_grad_()
    yt = torch.nn.functional.gelu(xt, approximate="tanh" if approximate else "none")
    yt.sum().backward()
    # float32 rounding of values up to 10: a few ulp, PyTorch's own float32 GELU is as far off.
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-6, atol=1e-6)


def test_without_a_compiler_the_model_falls_back_to_builtin_gelu(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(kernels, "_library", None)
    monkeypatch.setattr(kernels, "_failed", False)
    monkeypatch.setenv("VIT_MS_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="vit_ms.kernels"):
        assert kernels.gelu_kernel(False) is None
    assert "could not build the vit_ms CPU kernels" in caplog.text
    fast, plain = _randomized_pair(SMALL, seed=8)
    assert fast.blocks[0].mlp.act.kernel is None
    fast.set_train(False)
    plain.set_train(False)
    x = ms.Tensor(_images(2, seed=9))
    np.testing.assert_allclose(fast(x).asnumpy(), plain(x).asnumpy(), rtol=0, atol=1e-5)


def test_without_onednn_the_dense_and_attention_steps_fall_back(monkeypatch, tmp_path, caplog):
    # A MindSpore wheel without lib/libdnnl.so.3: the kernels build without the sgemm ones, and the model
    # runs Dense on MindSpore's MatMul and attention on its plain ops, with the same logits.
    monkeypatch.setattr(kernels, "_library", None)
    monkeypatch.setenv("VIT_MS_KERNEL_CACHE", str(tmp_path / "cache"))
    kernels.dnnl_library.cache_clear()
    monkeypatch.setattr(kernels.ms, "__file__", str(tmp_path / "mindspore" / "__init__.py"))
    try:
        with caplog.at_level(logging.WARNING, logger="vit_ms.kernels"):
            assert kernels.linear_kernel() is None and kernels.attention_kernels() is None
        assert "libdnnl.so.3 not found" in caplog.text
        assert kernels.gelu_kernel(False) is not None  # the other kernels still build
        fast, plain = _randomized_pair(SMALL, seed=10)
        assert fast.blocks[0].attn.scores_kernel is None and fast.blocks[0].mlp.fc1.linear is None
        fast.set_train(False)
        plain.set_train(False)
        x = ms.Tensor(_images(2, seed=11))
        np.testing.assert_allclose(fast(x).asnumpy(), plain(x).asnumpy(), rtol=0, atol=1e-5)
    finally:
        kernels.dnnl_library.cache_clear()
