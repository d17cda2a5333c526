"""ViT model: configs, presets, parameter counts, shapes, training signal, and parity with PyTorch."""
import dataclasses

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from torch_reference import TorchViT, copy_to_torch, torch
from vit_ms import PRESETS, ViTConfig, count_parameters, create_model, get_config, set_dynamic_batch

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


# --- Parity with an independent reference: PyTorch's own attention and functional ops -------------

@pytest.mark.parametrize("gelu_approximate", [False, True], ids=["gelu_erf", "gelu_tanh"])
def test_logits_match_pytorch_reference(mode, gelu_approximate):
    config = dataclasses.replace(TINY, gelu_approximate=gelu_approximate, norm_eps=1e-6)
    net = create_model(config)
    _randomize(net, np.random.default_rng(6))
    net.set_train(False)
    ref = TorchViT(config).eval()
    copy_to_torch(net, ref)
    x = np.random.default_rng(7).standard_normal((3, 3, 32, 32)).astype(np.float32)
    ours = net(ms.Tensor(x)).asnumpy()
    with torch.no_grad():
        theirs = ref(torch.from_numpy(x)).numpy()
    assert np.abs(theirs).max() > 0.1  # a meaningful signal, not all zeros
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    # The two GELUs differ by more than the tolerance, so this test tells them apart.
    other = TorchViT(dataclasses.replace(config, gelu_approximate=not gelu_approximate)).eval()
    copy_to_torch(net, other)
    with torch.no_grad():
        assert np.abs(other(torch.from_numpy(x)).numpy() - ours).max() > 1e-4
