"""ViT model: configs, presets, parameter counts, shapes, training signal, and parity with PyTorch."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from float32_bounds import assert_within, init_scale_weights, logits_bound
from torch_reference import TorchViT, copy_to_torch, torch
from vit_ms import PRESETS, ViTConfig, count_parameters, create_model, get_config, set_dynamic_batch

REPO = Path(__file__).resolve().parents[1]

# Published sizes with a 1000-class head (paper Table 1; DeiT for Ti and S).
PINNED_PARAMS = {
    "vit_ti_16": 5_717_416,
    "vit_s_16": 22_050_664,
    "vit_s_32": 22_878_952,
    "vit_b_16": 86_567_656,
    "vit_b_32": 88_224_232,
    "vit_l_16": 304_326_632,
    "vit_l_32": 306_535_400,
    "vit_h_14": 632_045_800,
    "tutorial": 86_567_656,
}

TINY = ViTConfig(image_size=32, patch_size=8, num_classes=10, embed_dim=64, depth=2, num_heads=4, mlp_dim=128)


def n_params(net):
    return sum(int(np.prod(p.shape)) for p in net.trainable_params())


def test_every_preset_has_a_pinned_count():
    assert set(PRESETS) == set(PINNED_PARAMS)


@pytest.mark.parametrize("name", sorted(PINNED_PARAMS))
def test_parameter_count_matches_paper(name):
    assert count_parameters(PRESETS[name]) == PINNED_PARAMS[name]


@pytest.mark.parametrize("config", [TINY, dataclasses.replace(TINY, num_classes=3, mlp_dim=96, depth=3),
                                    dataclasses.replace(TINY, global_pool="avg"),
                                    dataclasses.replace(TINY, global_pool="avg", class_token=False),
                                    PRESETS["vit_ti_16"], PRESETS["vit_b_32"]])
def test_counted_parameters_equal_built_parameters(config):
    assert n_params(create_model(config)) == count_parameters(config)


def test_tutorial_preset_uses_mindspore_defaults():
    t = PRESETS["tutorial"]
    assert (t.norm_eps, t.gelu_approximate) == (1e-7, True)
    assert dataclasses.replace(t, norm_eps=1e-6, gelu_approximate=False) == PRESETS["vit_b_16"]


@pytest.mark.parametrize("field, value, words", [
    ("image_size", 30, "divisible by ViTConfig.patch_size"),
    ("num_heads", 5, "divisible by ViTConfig.num_heads"),
    ("depth", 0, "ViTConfig.depth must be a positive integer"),
    ("embed_dim", -64, "ViTConfig.embed_dim must be a positive integer"),
    ("dropout", 1.0, "ViTConfig.dropout must be in [0, 1)"),
    ("attention_dropout", -0.1, "ViTConfig.attention_dropout must be in [0, 1)"),
    ("drop_path_rate", 1.5, "ViTConfig.drop_path_rate must be in [0, 1)"),
    ("global_pool", "max", "ViTConfig.global_pool must be 'token' or 'avg', got 'max'"),
    ("class_token", 0, "ViTConfig.class_token must be a bool, got 0"),
    ("class_token", False, "ViTConfig.global_pool='token' needs ViTConfig.class_token=True; use global_pool='avg'"),
])
def test_invalid_config_names_field_and_rule(field, value, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        dataclasses.replace(TINY, **{field: value})


def test_unknown_preset_and_override_are_rejected():
    with pytest.raises(ValueError, match="unknown model preset 'vit_x_16'"):
        create_model("vit_x_16")
    with pytest.raises(ValueError, match=r"unknown ViTConfig field\(s\) \['hidden_size'\]"):
        get_config("vit_b_16", hidden_size=10)
    with pytest.raises(ValueError, match="unknown ViTConfig field"):
        ViTConfig.from_dict({**TINY.to_dict(), "width": 3})
    assert ViTConfig.from_dict(TINY.to_dict()) == TINY


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_forward_shape_and_finite(name):
    # Full width and depth of each preset, at the smallest image that holds a 2x2 patch grid.
    config = PRESETS[name]
    net = create_model(name, image_size=2 * config.patch_size, num_classes=7)
    net.set_train(False)
    x = ms.Tensor(np.random.default_rng(1).standard_normal((2, 3, 2 * config.patch_size, 2 * config.patch_size)),
                  ms.float32)
    features = net.forward_features(x)
    logits = net(x)
    assert features.shape == (2, 5, config.embed_dim)
    assert logits.shape == (2, 7)
    assert np.isfinite(logits.asnumpy()).all() and np.isfinite(features.asnumpy()).all()


def test_dynamic_batch_one_graph_for_every_batch_size(mode):
    net = create_model(TINY)
    net.set_train(False)
    set_dynamic_batch(net, TINY)
    x = np.random.default_rng(2).standard_normal((5, 3, 32, 32)).astype(np.float32)
    whole = net(ms.Tensor(x)).asnumpy()
    parts = np.concatenate([net(ms.Tensor(x[:2])).asnumpy(), net(ms.Tensor(x[2:])).asnumpy()])
    np.testing.assert_allclose(parts, whole, rtol=0, atol=1e-5)


def test_graph_calls_hand_each_new_phase_to_every_cell_once(monkeypatch):
    """ViT passes a graph's phase down its Cells only when it changes: every Cell holds the phase of the
    graph that runs (as MindSpore's own walk leaves them), and a repeated call walks none of them."""
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        net = create_model(TINY)
        cells = [cell for _, cell in net.cells_and_names()]
        walked = []
        cell_phase = nn.Cell.compile_phase
        monkeypatch.setattr(nn.Cell, "compile_phase", property(
            cell_phase.fget, lambda cell, value: (walked.append(cell), cell_phase.fset(cell, value))))

        def call(*args):
            walked.clear()
            top = step if len(args) == 2 else net
            out = top(*(ms.Tensor(a) for a in args))
            phases = {cell.compile_phase for cell in cells}
            assert phases == {top.compile_phase} and top.compile_phase.startswith(top.phase), phases
            return out, len(walked)

        rng = np.random.default_rng(0)
        two, three = (rng.standard_normal((b, 3, 32, 32)).astype(np.float32) for b in (2, 3))
        net.set_train(False)
        _, first = call(two)
        assert first == len(cells)  # ViT's own setter hands it to Cell's, for every Cell
        assert call(two)[1] == 0
        assert call(three)[1] == len(cells)  # another shape: another graph
        assert call(two)[1] == len(cells)  # back to the first graph: its phase again
        step = nn.TrainOneStepCell(nn.WithLossCell(net, nn.CrossEntropyLoss()), nn.SGD(net.trainable_params()))
        step.set_train(True)
        labels = np.array([1, 2], np.int32)
        everything = len(list(step.cells_and_names()))  # the ViT's, the loss's, the optimizer's...
        loss, walks = call(two, labels)  # the training graph, from its own top Cell down
        assert np.isfinite(loss.asnumpy()) and walks == everything
        assert call(two, labels)[1] == everything - len(cells)  # all but the ViT's
        net.set_train(False)
        assert call(two)[1] == len(cells)
    finally:
        ms.set_context(mode=previous)


def _randomize(net, rng):
    """Random values everywhere (the zero-initialised CLS token and head would hide mistakes)."""
    for p in net.get_parameters():
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.5))


def test_backward_step_decreases_loss_on_fixed_batch(mode):
    net = create_model(TINY, drop_path_rate=0.1, dropout=0.1)
    loss_fn = nn.CrossEntropyLoss()
    opt = nn.Adam(net.trainable_params(), learning_rate=3e-3)
    step = nn.TrainOneStepCell(nn.WithLossCell(net, loss_fn), opt)
    step.set_train(True)
    rng = np.random.default_rng(3)
    x = ms.Tensor(rng.standard_normal((8, 3, 32, 32)).astype(np.float32))
    y = ms.Tensor(rng.integers(0, 10, 8).astype(np.int32))
    losses = [float(step(x, y).asnumpy()) for _ in range(20)]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses


def test_drop_path_is_identity_in_eval_and_random_in_train():
    net = create_model(TINY, drop_path_rate=0.5)
    _randomize(net, np.random.default_rng(4))
    x = ms.Tensor(np.random.default_rng(5).standard_normal((4, 3, 32, 32)).astype(np.float32))
    net.set_train(False)
    np.testing.assert_array_equal(net(x).asnumpy(), net(x).asnumpy())
    net.set_train(True)
    outs = [net(x).asnumpy() for _ in range(4)]
    assert any(not np.allclose(outs[0], o) for o in outs[1:])


_DROP_PATH_SCRIPT = """
import json, sys
import mindspore as ms
import numpy as np
from mindspore import nn, ops
from vit_ms import ViTConfig
from vit_ms.model import Block

class Constant(nn.Cell):  # a residual branch that outputs `value` whatever its input
    def __init__(self, value):
        super().__init__()
        self.value = value

    def construct(self, x):
        return ops.ones_like(x) * self.value

ms.set_device("CPU")
masks = {}
for mode, name in ((ms.GRAPH_MODE, "graph"), (ms.PYNATIVE_MODE, "pynative")):
    ms.set_context(mode=mode)
    ms.set_seed(int(sys.argv[1]))
    block = Block(ViTConfig(image_size=8, patch_size=4, embed_dim=8, depth=4, num_heads=2, mlp_dim=16),
                  drop_path=0.5, fused=False, index=3)
    block.attn, block.mlp = Constant(1.0), Constant(2.0)
    if len(sys.argv) > 2:  # as data-parallel training parts the ranks' streams: rank argv[2]'s own
        from vit_ms.training.distributed import seed_rank_streams
        seed_rank_streams(int(sys.argv[1]), int(sys.argv[2]), block)
    block.set_train(True)
    x = ms.Tensor(np.zeros((64, 1, 8), np.float32))
    # out = x + mask1 * 1 + mask2 * 2 per sample, each mask 0 or 1 / (1 - p) = 2
    masks[name] = [block(x).asnumpy()[:, 0, :].tolist() for _ in range(3)]
print(json.dumps(masks))
"""


def test_drop_path_masks_repeat_in_each_mode_and_process_and_differ_by_branch(tmp_path):
    # A run repeats only if stochastic depth does. Runs did not (MindSpore's CPU Dropout kernel, which drew
    # the masks, shares one generator between threads), and in graph mode a DropPath called for both
    # branches of a block dropped them together. Now: the same masks for the same seed in graph mode,
    # PyNative and a new process; independent masks for the attention and MLP branches.
    script = tmp_path / "masks.py"  # graph mode compiles the Constant cell from its source file
    script.write_text(_DROP_PATH_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    runs = [subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=180, env=env)
            for args in (["0"], ["0"], ["1"], ["0", "1"])]
    for run in runs:
        assert run.returncode == 0, run.stderr
    first, again, other, rank_1 = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert first == again
    # Under data parallelism rank r draws from seed + r after the network is built: seed 0's rank 1 drops
    # as a network built under seed 1 does, and not as its rank 0 (the single process) does.
    assert rank_1 == other and rank_1 != first
    out = np.array(first["graph"])  # (step, sample, channel)
    np.testing.assert_array_equal(out, np.array(first["pynative"]))
    assert not np.array_equal(out, np.array(other["graph"]))
    assert (out.min(axis=-1) == out.max(axis=-1)).all()  # whole samples
    out = out[..., 0]
    assert set(np.unique(out).tolist()) <= {0.0, 2.0, 4.0, 6.0}
    attention, mlp = (out / 2).astype(int) % 2, (out / 4).astype(int)
    assert (attention != mlp).any()  # the branches are dropped independently
    assert not np.array_equal(out[0], out[1]) and not np.array_equal(out[1], out[2])  # a new mask every step
    # 384 draws kept with probability 1/2: 192 expected, standard deviation 9.8; 5 of them either way.
    kept = int(attention.sum() + mlp.sum())
    assert abs(kept - 192) <= 49, kept


# --- Parity with an independent reference: PyTorch's own attention and functional ops -------------

POOLING = [("token", True), ("avg", True), ("avg", False)]


@pytest.mark.parametrize("global_pool, class_token", POOLING, ids=["token", "avg", "avg_no_cls"])
@pytest.mark.parametrize("gelu_approximate", [False, True], ids=["gelu_erf", "gelu_tanh"])
def test_logits_match_pytorch_reference(mode, gelu_approximate, global_pool, class_token):
    config = dataclasses.replace(TINY, gelu_approximate=gelu_approximate, global_pool=global_pool,
                                 class_token=class_token)
    net = create_model(config)
    init_scale_weights(net, np.random.default_rng(6))
    net.set_train(False)
    ref = TorchViT(config).double().eval()  # float64: the exact value, to float32's eyes
    copy_to_torch(net, ref)
    x = np.random.default_rng(7).standard_normal((3, 3, 32, 32)).astype(np.float32)
    out = net.forward_intermediates(ms.Tensor(x))
    ours = net(ms.Tensor(x)).asnumpy()
    with torch.no_grad():
        theirs = ref(torch.from_numpy(x).double()).numpy()
    assert np.abs(theirs).max() > 0.1  # a meaningful signal, not all zeros
    # float32 rounding bound of the whole chain, scaled by the head's terms (float32_bounds.py).
    bound = logits_bound(config, out["pre_logits"].asnumpy(), net.head.weight.asnumpy(), net.head.bias.asnumpy())
    assert_within(ours, theirs, bound, "logits")


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("approximate", [False, True], ids=["erf", "tanh"])
def test_gelu_layer_computes_the_configured_form(fused, approximate):
    # The model-level parity bound is wider than erf vs tanh GELU's difference (<= 5e-4), so the form is
    # checked here, per element: within the float32 bound of its own form (8 u (|y| + 0.5 |x|), as in
    # test_kernels.py) and beyond it from the other form.
    from vit_ms.layers import GELU

    x = np.linspace(-6, 6, 4001).astype(np.float32)
    y = GELU(approximate, fused=fused)(ms.Tensor(x)).asnumpy().astype(np.float64)
    xt = torch.from_numpy(x).double()
    bound = 8 * 2.0 ** -24 * (np.abs(y) + 0.5 * np.abs(x))
    same = torch.nn.functional.gelu(xt, approximate="tanh" if approximate else "none").numpy()
    other = torch.nn.functional.gelu(xt, approximate="none" if approximate else "tanh").numpy()
    assert_within(y, same, bound, "GELU")
    assert (np.abs(y - other) > bound).sum() > 1000


def test_pooling_variants_name_their_parameters_like_timm():
    # timm (1.0.31) vision_transformer.py: global_pool="avg" moves the final norm after pooling
    # (`fc_norm`; `norm` becomes Identity); without a class token the position embedding covers the
    # patches only (`embed_len = num_patches + num_prefix_tokens`).
    names = {p.name: p.shape for p in create_model(TINY, global_pool="avg", class_token=False).get_parameters()}
    assert "cls_token" not in names and not any(n.startswith("norm.") for n in names)
    assert names["fc_norm.gamma"] == (64,) and names["fc_norm.beta"] == (64,)
    assert names["pos_embed"] == (1, TINY.num_patches, 64)
    names = {p.name: p.shape for p in create_model(TINY).get_parameters()}
    assert names["pos_embed"] == (1, TINY.num_patches + 1, 64) and "norm.gamma" in names
    assert not any(n.startswith("fc_norm") for n in names)


@pytest.mark.parametrize("global_pool, class_token", POOLING, ids=["token", "avg", "avg_no_cls"])
def test_forward_intermediates_are_the_forward_pass(mode, global_pool, class_token):
    config = dataclasses.replace(TINY, global_pool=global_pool, class_token=class_token)
    net = create_model(config, fast=False)
    init_scale_weights(net, np.random.default_rng(8))
    net.set_train(False)
    x = ms.Tensor(np.random.default_rng(9).standard_normal((2, 3, 32, 32)).astype(np.float32))
    out = net.forward_intermediates(x)
    tokens = config.num_patches + (1 if class_token else 0)
    assert len(out["tokens"]) == len(out["attention"]) == config.depth
    assert out["embed"].shape == out["tokens"][0].shape == out["features"].shape == (2, tokens, 64)
    assert out["attention"][1].shape == (2, config.num_heads, tokens, tokens)
    np.testing.assert_allclose(out["attention"][0].asnumpy().sum(axis=-1), 1.0, rtol=0, atol=tokens * 2 ** -24 * 4)
    # The same ops on the same values as construct (compiled in graph mode): logits and features agree
    # within float32 rounding of the chain (float32_bounds.py).
    bound = logits_bound(config, out["pre_logits"].asnumpy(), net.head.weight.asnumpy(), net.head.bias.asnumpy())
    assert_within(out["logits"].asnumpy(), net(x).asnumpy().astype(np.float64), 2 * bound, "logits")
    assert out["pre_logits"].shape == (2, 64)


def test_attention_rollout_uses_intermediates_and_keeps_the_execution_mode(monkeypatch):
    from vit_ms import viz

    net = create_model(TINY, fast=False)
    init_scale_weights(net, np.random.default_rng(10))
    x = np.random.default_rng(11).standard_normal((2, 3, 32, 32)).astype(np.float32)

    def no_mode_switch(**kwargs):
        raise AssertionError(f"attention_rollout changed the MindSpore context: {kwargs}")

    monkeypatch.setattr(ms, "set_context", no_mode_switch)
    rollout = viz.attention_rollout(net, x)
    monkeypatch.undo()
    # The same rollout by hand from the intermediates: mean over heads, + identity, rows renormalised.
    expected = None
    for probs in net.forward_intermediates(ms.Tensor(x))["attention"]:
        a = probs.asnumpy().astype(np.float64).mean(axis=1) + np.eye(17)
        a /= a.sum(axis=-1, keepdims=True)
        expected = a if expected is None else a @ expected
    assert rollout.shape == (2, 17, 17)
    np.testing.assert_allclose(rollout, expected, rtol=1e-12, atol=0)  # float64 arithmetic on the same values
    np.testing.assert_allclose(rollout.sum(axis=-1), 1.0, rtol=1e-12)


def test_a_training_forward_prints_no_deprecation_warnings():
    code = ("import mindspore as ms, numpy as np\n"
            "ms.set_device('CPU')\n"
            "from vit_ms import create_model, ViTConfig\n"
            "for fast in (True, False):\n"
            "    net = create_model(ViTConfig(image_size=32, patch_size=8, num_classes=3, embed_dim=32, depth=2,"
            " num_heads=2, mlp_dim=64, dropout=0.1, drop_path_rate=0.2), fast=fast)\n"
            "    net.set_train(True)\n"
            "    print(net(ms.Tensor(np.ones((2, 3, 32, 32), np.float32))).shape)\n")
    # GLOG_v=2: MindSpore's own warnings on (the test session turns them off).
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GLOG_v": "2"})
    assert done.returncode == 0, done.stderr
    assert "deprecated" not in (done.stdout + done.stderr).lower(), done.stderr
