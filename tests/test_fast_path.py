"""The fused-kernel path against the plain one and against a float64 PyTorch reference: same logits,
attention, gradients and checkpoints, on every kernel variant this CPU runs; the one policy that chooses
(`vit_ms.layers.use_fused_kernels`), its environment switch, its fallbacks, and kernels that are built
lazily and ahead of time, never by an import. Tolerances: `float32_bounds` (stated there).

Only the kernel variants this CPU supports are collected (`vit_ms.ops.cpu_isas()`): one it lacks cannot
be loaded here (its instructions would fault), so it belongs to another machine's run rather than
showing up as a skip in this one. The test ids (`[avx2]`, `[baseline]`) say which variants ran."""
import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from float32_bounds import assert_within, gradient_bound, init_scale_weights, logits_bound, probs_bound
from torch_reference import TorchViT, copy_to_torch, torch, torch_names
from vit_ms import ViTConfig, create_model, layers, set_dynamic_batch, threads
from vit_ms import ops as kernels

# Tiny width and depth, but the realistic 16 x 16 patch the fused patch embedding reshapes.
SMALL = ViTConfig(image_size=64, patch_size=16, num_classes=10, embed_dim=64, depth=2, num_heads=4, mlp_dim=128)


@pytest.fixture(autouse=True)
def _fused_kernels_allowed(monkeypatch):
    """This file tests the fused path itself, also in a run with VIT_MS_FUSED_KERNELS=0 for the rest."""
    monkeypatch.delenv(layers.FUSED_ENV, raising=False)


@pytest.fixture(params=kernels.cpu_isas())
def isa(request, monkeypatch):
    """Build the fused layers on one compiled variant ($VIT_MS_KERNEL_ISA)."""
    monkeypatch.setenv(kernels.ISA_ENV, request.param)
    return request.param


def _pair(config, seed=0):
    """A fused and a plain model holding the same init-scale random weights."""
    fast, plain = create_model(config, fast=True), create_model(config, fast=False)
    init_scale_weights(fast, np.random.default_rng(seed))
    not_loaded, _ = ms.load_param_into_net(plain, {p.name: p for p in fast.get_parameters()})
    assert not not_loaded
    return fast, plain


def _images(batch, seed=1, size=64):
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def _reference(net, config, x):
    """Logits and per-block attention probabilities in float64 from the PyTorch reference."""
    ref = TorchViT(config).double().eval()
    copy_to_torch(net, ref)
    probs = []
    with torch.no_grad():
        logits = ref(torch.from_numpy(x).double())
        ref.features(torch.from_numpy(x).double(), probs)
    return logits.numpy(), [p.numpy() for p in probs]


def _qkv(net, config, i, tokens_in):
    """Block i's qkv projection output (B, T, 3, heads, head_dim), in float64 NumPy from the parameters:
    the magnitudes the attention bound needs."""
    p = {q.name: q.asnumpy().astype(np.float64) for q in net.get_parameters()}
    b = f"blocks.{i}."
    t = np.asarray(tokens_in, np.float64)
    h = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + config.norm_eps)
    h = h * p[b + "norm1.gamma"] + p[b + "norm1.beta"]
    qkv = h @ p[b + "attn.qkv.weight"].T + p[b + "attn.qkv.bias"]
    return qkv.reshape(t.shape[0], t.shape[1], 3, config.num_heads, config.head_dim)


def _assert_close_to_reference(net, config, x, what):
    """`net`'s logits and attention probabilities within their float32 bounds of the float64 reference."""
    net.set_train(False)
    out = net.forward_intermediates(ms.Tensor(x))
    ref_logits, ref_probs = _reference(net, config, x)
    assert np.abs(ref_logits).max() > 0.5  # a real signal
    bound = logits_bound(config, out["pre_logits"].asnumpy(), net.head.weight.asnumpy(), net.head.bias.asnumpy())
    assert_within(out["logits"].asnumpy(), ref_logits, bound, f"{what} logits")
    assert_within(net(ms.Tensor(x)).asnumpy(), ref_logits, bound, f"{what} logits from construct")
    for i in range(config.depth):
        qkv = _qkv(net, config, i, (out["embed"] if i == 0 else out["tokens"][i - 1]).asnumpy())
        assert_within(out["attention"][i].asnumpy(), ref_probs[i], probs_bound(config, i, qkv, ref_probs[i]),
                      f"{what} attention probabilities of block {i}")


@pytest.mark.parametrize("execution, gelu_approximate", [("graph", False), ("pynative", True)],
                         ids=["graph-gelu_erf", "pynative-gelu_tanh"])
def test_fast_and_plain_logits_agree(isa, execution, gelu_approximate):
    # Both GELU forms and both execution modes, each once per kernel variant (graph compiles are slow).
    config = dataclasses.replace(SMALL, gelu_approximate=gelu_approximate)
    fast, plain = _pair(config)
    x = _images(3)
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE if execution == "graph" else ms.PYNATIVE_MODE)
    try:
        # Each within its float32 bound of the exact value, hence within the sum of both of each other.
        _assert_close_to_reference(fast, config, x, "fused")
        _assert_close_to_reference(plain, config, x, "plain")
    finally:
        ms.set_context(mode=previous)


def _never_one_kernel(self):  # a def, not a lambda: graph mode parses the patched method's source
    return False


@pytest.mark.parametrize("attention", ["one kernel", "three kernels"])
def test_fast_and_plain_gradients_agree(isa, attention, monkeypatch):
    # The fused kernels bring their own backward (GELU's both forms: test_kernels.py); the patch matmul
    # must send gradients to the conv weight. Training runs attention as one kernel (probabilities
    # recomputed in its backward) unless it needs the probabilities: attention dropout, which the
    # three-kernel path (scores, softmax, values) serves, checked here with the dropout itself off.
    if attention == "three kernels":
        monkeypatch.setattr(layers.AttentionCore, "one_kernel", _never_one_kernel)
    config = SMALL
    fast, plain = _pair(config, seed=2)
    x, y = _images(4, seed=3), np.array([1, 3, 5, 7], np.int32)
    ref = TorchViT(config).double()
    copy_to_torch(fast, ref)
    torch.nn.functional.cross_entropy(ref(torch.from_numpy(x).double()), torch.from_numpy(y).long()).backward()
    ref_grads = dict(ref.named_parameters())
    names = torch_names(ref)
    rows = x.shape[0] * (config.num_patches + 1)
    for net in (fast, plain):
        net.set_train(True)
        loss_net = nn.WithLossCell(net, nn.CrossEntropyLoss())
        _, grads = ms.value_and_grad(loss_net, None, net.trainable_params())(ms.Tensor(x), ms.Tensor(y))
        grads = {p.name: g.asnumpy() for p, g in zip(net.trainable_params(), grads)}
        assert set(grads) == set(names)
        assert np.abs(grads["patch_embed.proj.weight"]).max() > 1e-3  # the conv weight really gets a gradient
        for name, grad in grads.items():
            expected = ref_grads[names[name]].grad.numpy()
            assert_within(grad, expected, gradient_bound(config, rows, expected), f"fast={net.fast} d {name}")


def test_attention_is_one_kernel_unless_training_needs_the_probabilities(monkeypatch):
    # Attention dropout applies to the probabilities, which the one kernel never forms: such a network
    # trains on the three kernels and still evaluates on the one, inside the block's one kernel ("block",
    # gradients included). Which form each block really ran is recorded in PyNative mode, where construct
    # runs as Python.
    calls = []
    original_block = layers.EncoderBlockKernel.construct
    monkeypatch.setattr(layers.EncoderBlockKernel, "construct",
                        lambda self, *args: calls.append("block") or original_block(self, *args))
    for method in ("attend", "probs"):
        original = getattr(layers.AttentionCore, method)
        monkeypatch.setattr(layers.AttentionCore, method,
                            lambda self, *args, _f=original, _m=method: calls.append(_m) or _f(self, *args))
    x, y = ms.Tensor(_images(2, seed=3)), ms.Tensor(np.array([1, 3], np.int32))
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        for dropout, training_form in ((0.0, "attend"), (0.1, "probs")):
            net = create_model(dataclasses.replace(SMALL, attention_dropout=dropout), fast=True)
            for training, form in ((True, training_form), (False, "block")):
                net.set_train(training)
                calls.clear()
                loss, grads = ms.value_and_grad(nn.WithLossCell(net, nn.CrossEntropyLoss()), None,
                                                net.trainable_params())(x, y)
                assert calls == [form] * SMALL.depth, (dropout, training, calls)
                assert np.isfinite(loss.asnumpy()) and all(np.isfinite(g.asnumpy()).all() for g in grads)
    finally:
        ms.set_context(mode=previous)


def test_eval_runs_each_block_as_one_kernel(monkeypatch):
    # In eval each encoder block is one kernel (its values: test_kernels.py and the logits tests above);
    # training runs the block's layers apart (drop_path acts on each branch, GELU's backward needs the product),
    # and so does `forward_intermediates`, which needs the attention probabilities. Recorded in PyNative mode.
    calls = []
    for cls, method, name in ((layers.EncoderBlockKernel, "construct", "block"), (layers.GELU, "construct", "gelu"),
                              (layers.AttentionCore, "probs", "probs")):
        original = getattr(cls, method)
        monkeypatch.setattr(cls, method, lambda self, *args, _f=original, _n=name: calls.append(_n) or _f(self, *args))
    net = create_model(SMALL, fast=True)
    x = ms.Tensor(_images(2, seed=3))
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        for training, expected in ((False, ["block"] * SMALL.depth), (True, ["gelu"] * SMALL.depth)):
            net.set_train(training)
            calls.clear()
            assert np.isfinite(net(x).asnumpy()).all()
            assert calls == expected, (training, calls)
        net.set_train(False)
        calls.clear()
        net.forward_intermediates(x)
        assert calls == ["probs"] * SMALL.depth, calls  # fc1 + GELU still one kernel there: no "gelu"
    finally:
        ms.set_context(mode=previous)


def test_checkpoint_from_one_path_loads_into_the_other(tmp_path):
    fast, plain = _pair(SMALL, seed=4)
    x = _images(2, seed=5)
    for source, target_fast in ((fast, False), (plain, True)):
        path = tmp_path / f"from_{'fast' if source.fast else 'plain'}.ckpt"
        ms.save_checkpoint(source, str(path))
        target = create_model(SMALL, fast=target_fast)
        not_loaded, unused = ms.load_param_into_net(target, ms.load_checkpoint(str(path)))
        assert not not_loaded and not unused
        assert [p.name for p in target.get_parameters()] == [p.name for p in source.get_parameters()]
        _assert_close_to_reference(target, SMALL, x, f"loaded into fast={target_fast}")


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
        # The same graph on the same rows; only sgemm's blocking over a different row count may differ.
        np.testing.assert_allclose(parts, whole, rtol=0, atol=1e-6 * max(1.0, np.abs(whole).max()))

        static = create_model(SMALL)  # the control: without a dynamic batch each new size compiles again
        static.set_train(False)
        static(ms.Tensor(x))
        static(ms.Tensor(x[:2]))
        assert len(static.compile_cache) == 2

        train_net = create_model(SMALL)
        step = nn.TrainOneStepCell(nn.WithLossCell(train_net, nn.CrossEntropyLoss()),
                                   nn.AdamWeightDecay(train_net.trainable_params(), learning_rate=1e-3))
        step.set_train(True)
        set_dynamic_batch(step, SMALL, labels=True)
        for batch in (4, 3):
            assert np.isfinite(step(ms.Tensor(x[:batch]), ms.Tensor(np.arange(batch, dtype=np.int32))).asnumpy())
        assert len(step.compile_cache) == 1
    finally:
        ms.set_context(mode=previous)


# --- the one policy -----------------------------------------------------------------------------

def _fused_parts(net):
    """Names of the sub-Cells that compute on a fused kernel or a CPU-only formulation."""
    parts = []
    for name, cell in net.cells_and_names():
        if isinstance(cell, (layers.FusedLinear, layers.FusedLayerNorm)):
            parts.append(name)
        elif isinstance(cell, layers.PatchProjection) and cell.fused:
            parts.append(name)
        elif isinstance(cell, layers.GELU) and cell.kernel is not None:
            parts.append(name)
        elif isinstance(cell, layers.AttentionCore) and (cell.scores_kernel is not None
                                                         or cell.softmax_kernel is not None):
            parts.append(name)
    return parts


@pytest.mark.parametrize("inputs, expected", [
    ({"device_target": "CPU"}, True),
    ({"device_target": "GPU"}, False),
    ({"device_target": "Ascend"}, False),
    ({"device_target": "CPU", "amp_level": "O2"}, False),
    ({"device_target": "CPU", "dtype": ms.float16}, False),
    ({"device_target": "CPU", "requested": False}, False),
    ({"device_target": "CPU", "requested": True, "amp_level": "O2"}, True),  # forced: the caller's choice
    ({"device_target": "GPU", "requested": True}, False),  # CPU code cannot run on a GPU, forced or not
])
def test_policy_decides_from_device_dtype_and_amp(inputs, expected):
    assert layers.use_fused_kernels(**inputs) is expected


def test_policy_environment_switch_disables_fused_kernels(monkeypatch):
    monkeypatch.setenv(layers.FUSED_ENV, "0")
    assert layers.use_fused_kernels(device_target="CPU") is False
    assert layers.use_fused_kernels(True, device_target="CPU") is False
    net = create_model(SMALL, fast=True)
    assert _fused_parts(net) == [] and net.fast is False
    monkeypatch.setenv(layers.FUSED_ENV, "maybe")
    with pytest.raises(ValueError, match=r"VIT_MS_FUSED_KERNELS='maybe': use 1 .* or 0"):
        layers.use_fused_kernels(device_target="CPU")


@pytest.mark.parametrize("device", ["GPU", "Ascend"])
@pytest.mark.parametrize("fast", [None, True])
def test_on_another_device_no_cpu_only_path_is_built(monkeypatch, device, fast):
    # The policy reads the device from the MindSpore context; simulate another one there.
    monkeypatch.setattr(layers, "_device_target", lambda: device)
    net = create_model(SMALL, fast=fast)
    assert net.fast is False
    assert _fused_parts(net) == []
    assert isinstance(net.patch_embed.proj, nn.Conv2d) and not net.patch_embed.proj.fused  # the strided conv
    assert type(net.blocks[0].mlp.fc1) is nn.Dense and type(net.norm) is nn.LayerNorm


def test_on_cpu_every_layer_is_fused_and_the_decision_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(threads, "TOO_LATE", False)
    with caplog.at_level(logging.INFO, logger="vit_ms.layers"):
        net = create_model(SMALL)
    records = [r for r in caplog.records if r.name == "vit_ms.layers"]
    assert [r.getMessage() for r in records] == ["vit_ms layers: fused CPU kernels (CPU, float32)"]
    parts = _fused_parts(net)
    assert net.blocks[0].attn.core.kernel is not None  # the one-kernel attention
    assert {"patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.attn.core", "blocks.1.mlp.act", "norm",
            "head"} <= set(parts)


def test_a_late_vit_ms_import_says_how_to_get_the_spin_default(caplog, monkeypatch):
    monkeypatch.setattr(threads, "TOO_LATE", True)  # MindSpore (libgomp) was loaded before vit_ms
    with caplog.at_level(logging.INFO, logger="vit_ms.layers"):
        create_model(SMALL)
        create_model(SMALL, fast=False)  # plain ops run no OpenMP kernels: no hint
    hints = [r.getMessage() for r in caplog.records if "GOMP_SPINCOUNT" in r.getMessage()]
    assert hints == ["MindSpore was imported before vit_ms, so libgomp keeps its long OpenMP spin (slower small "
                     "batches on few cores): import vit_ms first, or set GOMP_SPINCOUNT=3000 OMP_WAIT_POLICY=ACTIVE "
                     "in the environment"]


# --- kernels unavailable, built lazily or ahead of time -------------------------------------------

def test_a_failed_build_shows_the_compiler_output_and_falls_back(monkeypatch, tmp_path, caplog):
    compiler = tmp_path / "broken-c++"
    compiler.write_text("#!/bin/sh\necho 'csrc/gelu.cc:1:1: error: simulated compiler failure' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setattr(kernels, "_libraries", {})
    monkeypatch.setenv("VIT_MS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CXX", str(compiler))
    with caplog.at_level(logging.WARNING, logger="vit_ms.ops"):
        assert kernels.gelu(False) is None
    assert "could not build the vit_ms CPU kernels" in caplog.text
    assert "csrc/gelu.cc:1:1: error: simulated compiler failure" in caplog.text
    fast, _ = _pair(SMALL, seed=8)
    assert fast.fast and fast.blocks[0].mlp.act.kernel is None  # fused layers, built-in ops inside
    assert list((tmp_path / "home" / "kernels").glob("*.so")) == []  # nothing half-written left behind
    _assert_close_to_reference(fast, SMALL, _images(2, seed=9), "fallback")


def test_without_onednn_the_dense_and_attention_steps_fall_back(monkeypatch, tmp_path):
    # A MindSpore wheel without lib/libdnnl.so.3: the kernels build without the sgemm ones, and the model
    # runs Dense on MindSpore's MatMul and attention on its plain ops.
    monkeypatch.setattr(kernels, "_libraries", {})
    monkeypatch.setattr(kernels, "dnnl_library", lambda: None)
    monkeypatch.setenv("VIT_MS_HOME", str(tmp_path / "home"))
    assert kernels.linear() is None and kernels.attention() is None
    assert kernels.gelu(False) is not None  # the other kernels still build
    fast, _ = _pair(SMALL, seed=10)
    assert fast.blocks[0].attn.core.scores_kernel is None and fast.blocks[0].mlp.fc1.linear is None
    assert fast.blocks[0].attn.core.kernel is None
    assert fast.blocks[0].mlp.fc1.add_bias is not None
    _assert_close_to_reference(fast, SMALL, _images(2, seed=11), "without oneDNN")


def _run(code, home, **env):
    environ = {**os.environ, "VIT_MS_HOME": str(home), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=300)


def test_importing_or_building_a_plain_model_compiles_nothing(tmp_path):
    done = _run("import sys, mindspore as ms; ms.set_device('CPU')\n"
                "import vit_ms.model, vit_ms.layers\n"
                "from vit_ms import create_model, ViTConfig\n"
                "create_model(ViTConfig(image_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,"
                " mlp_dim=64), fast=False)\n"
                "print('vit_ms.ops' in sys.modules)\n", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"
    assert not (tmp_path / "kernels").exists()


def test_ahead_of_time_build_fills_the_one_cache(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vit_ms.ops", "build", "--isa", "baseline"], capture_output=True,
                          text=True, env={**os.environ, "VIT_MS_HOME": str(tmp_path)}, timeout=300)
    assert done.returncode == 0, done.stderr
    isa, path = done.stdout.strip().split(": ")
    assert isa == "baseline" and Path(path).parent == tmp_path / "kernels" and Path(path).is_file()
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == [Path(path).name]
    bad = subprocess.run([sys.executable, "-m", "vit_ms.ops", "build"], capture_output=True, text=True,
                         env={**os.environ, "VIT_MS_HOME": str(tmp_path), "VIT_MS_KERNEL_ISA": "sse9"}, timeout=300)
    assert bad.returncode == 1
    assert "error: VIT_MS_KERNEL_ISA='sse9' is not a kernel variant" in bad.stderr
