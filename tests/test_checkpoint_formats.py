"""Checkpoints, naming schemes: every scheme loads with the original's logits, against independent references
(PyTorch models with timm's and torchvision's exact parameter names, a NumPy forward pass in JAX's layout, the
tutorial's and mindcv's key lists), head dropping, pos-embed resampling, and every error case leaving the net
untouched. The registry test enumerates `FORMATS`."""
import dataclasses
import json
import logging
import os
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file as save_safetensors_numpy

from checkpoint_helpers import (TINY, TINY_JAX, TINY_TUTORIAL, TUTORIAL_KEYS, TimmViT, TorchvisionViT,  # noqa: F401
                                _pynative, assert_untouched, images, logits, numpy_params, ours_for_tutorial,
                                random_net, random_torch, save_ms, save_state_dict, torch_logits,
                                tutorial_names_for, old_torchvision_name)
from vit_ms import ViTConfig, create_model, load_weights
from vit_ms.checkpoint import (FORMATS, SOURCES, CheckpointError, convert, detect_source, infer_config,
                               load_model, make_metadata, read_params, resample_pos_embed, save_checkpoint)
from vit_ms.checkpoint.loading import NEW_HEAD

# ---------------------------------------------------------------------------------------------------
# The tutorial's MindSpore checkpoint
# ---------------------------------------------------------------------------------------------------

def test_tutorial_checkpoint_loads_with_identical_logits(tmp_path):
    net = random_net(TINY_TUTORIAL)
    params = numpy_params(net)
    names = tutorial_names_for(TINY.depth)
    assert len(names) == len(params)
    path = save_ms({name: params[ours_for_tutorial(name)] for name in names}, tmp_path / "vit_b_16_224.ckpt")

    fresh = create_model(TINY_TUTORIAL)
    report = load_weights(fresh, path)
    assert report.source == "tutorial" and len(report.loaded) == len(params) and not report.dropped
    np.testing.assert_allclose(logits(fresh, images(TINY)), logits(net, images(TINY)), rtol=0, atol=1e-5)


def test_real_tutorial_key_list_loads_into_the_tutorial_preset(tmp_path):
    keys = json.loads(TUTORIAL_KEYS.read_text())
    assert len(keys) == 152
    rng = np.random.default_rng(0)
    # Full size (346 MB): constant tensors with a random value each, so a mix-up of two names shows.
    marks = {name: np.float32(rng.normal()) for name, _ in keys}
    path = save_ms({name: np.full(shape, marks[name], np.float32) for name, shape in keys},
                   tmp_path / "vit_b_16_224.ckpt", append_dict={"epoch_num": 10, "step_num": 1250})
    net = create_model("tutorial")
    report = load_weights(net, path)
    assert report.source == "tutorial"
    assert len(report.loaded) == 152 and not report.initialised and not report.resampled
    assert set(report.dropped) == {"epoch_num", "step_num"}
    loaded = dict(net.parameters_and_names())
    for name, shape in keys:
        value = loaded[ours_for_tutorial(name)].asnumpy()
        assert value.shape == tuple(shape) and float(value.flat[0]) == marks[name], name


# ---------------------------------------------------------------------------------------------------
# timm and torchvision: PyTorch models with their exact parameter names
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme, suffix", [("timm", ".safetensors"), ("timm", ".pth"),
                                            ("torchvision", ".safetensors"), ("torchvision", ".pth"),
                                            ("torchvision_old", ".bin")])
def test_pytorch_state_dicts_match_the_pytorch_model(tmp_path, scheme, suffix):
    model = random_torch(TimmViT if scheme == "timm" else TorchvisionViT, TINY)
    path = save_state_dict(model, tmp_path / f"weights{suffix}",
                           rename=old_torchvision_name if scheme == "torchvision_old" else None)
    net = create_model(TINY)
    report = load_weights(net, path)
    assert report.source == scheme.split("_")[0]
    assert len(report.loaded) == len(dict(net.parameters_and_names())) and not report.dropped
    x = images(TINY, n=3)
    np.testing.assert_allclose(logits(net, x), torch_logits(model, x), rtol=0, atol=1e-5)


def test_timm_weights_match_in_graph_mode(tmp_path):
    ms.set_context(mode=ms.GRAPH_MODE)  # the autouse fixture restores the mode
    model = random_torch(TimmViT, TINY, seed=5)
    net = create_model(TINY)
    load_weights(net, save_state_dict(model, tmp_path / "w.safetensors"), source="timm")
    x = images(TINY)
    np.testing.assert_allclose(logits(net, x), torch_logits(model, x), rtol=0, atol=1e-5)


def test_safetensors_written_by_numpy_and_a_wrapped_pth_load(tmp_path):
    model = random_torch(TimmViT, TINY, seed=2)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    save_safetensors_numpy(sd, str(tmp_path / "np.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3},
               str(tmp_path / "train.pth"))  # a DDP training checkpoint
    x = images(TINY)
    for name in ("np.safetensors", "train.pth"):
        net = create_model(TINY)
        load_weights(net, tmp_path / name)
        np.testing.assert_allclose(logits(net, x), torch_logits(model, x), rtol=0, atol=1e-5)


def test_pth_is_loaded_without_unpickling_arbitrary_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1), "x": Evil()}, str(path))
    with pytest.raises(CheckpointError, match="refused to unpickle"):  # weights_only=True refuses it
        load_weights(create_model(TINY), path)


# ---------------------------------------------------------------------------------------------------
# JAX .npz (google-research/vision_transformer and big_vision), against a NumPy forward in JAX layout
# ---------------------------------------------------------------------------------------------------

def random_jax_params(c, variant, seed=0):
    """Flax parameters in JAX layout: Dense kernels (in, out), q/k/v kernels (D, heads, head_dim)."""
    rng = np.random.default_rng(seed)
    r = lambda *shape: rng.normal(0.0, 0.2, size=shape).astype(np.float32)
    d, h, hd, p = c.embed_dim, c.num_heads, c.head_dim, c.patch_size
    attn, ln2, mlp = ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3") if variant == "vit_jax" \
        else ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    params = {"cls": r(1, 1, d), "embedding/kernel": r(p, p, c.in_channels, d), "embedding/bias": r(d),
              "Transformer/encoder_norm/scale": 1 + r(d), "Transformer/encoder_norm/bias": r(d),
              "head/kernel": r(d, c.num_classes), "head/bias": r(c.num_classes)}
    if variant == "vit_jax":  # added after the [cls] token is prepended: N + 1 rows
        params["Transformer/posembed_input/pos_embedding"] = r(1, c.num_patches + 1, d)
    else:  # big_vision adds it before prepending [cls]: N rows
        params["pos_embedding"] = r(1, c.num_patches, d)
    for i in range(c.depth):
        b = f"Transformer/encoderblock_{i}/"
        params.update({b + "LayerNorm_0/scale": 1 + r(d), b + "LayerNorm_0/bias": r(d),
                       b + f"{ln2}/scale": 1 + r(d), b + f"{ln2}/bias": r(d),
                       b + f"{attn}/out/kernel": r(h, hd, d), b + f"{attn}/out/bias": r(d),
                       b + f"{mlp}/Dense_0/kernel": r(d, c.mlp_dim), b + f"{mlp}/Dense_0/bias": r(c.mlp_dim),
                       b + f"{mlp}/Dense_1/kernel": r(c.mlp_dim, d), b + f"{mlp}/Dense_1/bias": r(d)})
        for part in ("query", "key", "value"):
            params[b + f"{attn}/{part}/kernel"] = r(d, h, hd)
            params[b + f"{attn}/{part}/bias"] = r(h, hd)
    return params


def jax_forward(params, c, variant, x_nchw):
    """The Flax ViT's forward pass written in NumPy on the JAX-layout arrays (float64)."""
    g = {k: v.astype(np.float64) for k, v in params.items()}
    attn, ln2, mlp = ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3") if variant == "vit_jax" \
        else ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")

    def ln(x, prefix):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-6) * g[prefix + "/scale"] + g[prefix + "/bias"]

    def gelu(x):  # flax.linen.gelu(approximate=True)
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

    x = x_nchw.astype(np.float64).transpose(0, 2, 3, 1)  # NHWC, as JAX convolves
    n, s, p = x.shape[0], c.image_size, c.patch_size
    gs = s // p
    patches = x.reshape(n, gs, p, gs, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, gs * gs, p * p * 3)
    x = patches @ g["embedding/kernel"].reshape(p * p * 3, -1) + g["embedding/bias"]  # VALID conv, HWIO
    cls = np.broadcast_to(g["cls"], (n, 1, c.embed_dim))
    if variant == "vit_jax":
        x = np.concatenate([cls, x], 1) + g["Transformer/posembed_input/pos_embedding"]
    else:
        x = np.concatenate([cls, x + g["pos_embedding"]], 1)
    for i in range(c.depth):
        b = f"Transformer/encoderblock_{i}/"
        y = ln(x, b + "LayerNorm_0")
        q, k, v = (np.einsum("bnd,dhk->bnhk", y, g[b + f"{attn}/{t}/kernel"]) + g[b + f"{attn}/{t}/bias"]
                   for t in ("query", "key", "value"))
        w = np.einsum("bqhk,bnhk->bhqn", q / np.sqrt(c.head_dim), k)
        w = np.exp(w - w.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = np.einsum("bhqn,bnhk->bqhk", w, v)
        x = x + np.einsum("bqhk,hkd->bqd", o, g[b + f"{attn}/out/kernel"]) + g[b + f"{attn}/out/bias"]
        y = ln(x, b + ln2)
        y = gelu(y @ g[b + f"{mlp}/Dense_0/kernel"] + g[b + f"{mlp}/Dense_0/bias"])
        x = x + y @ g[b + f"{mlp}/Dense_1/kernel"] + g[b + f"{mlp}/Dense_1/bias"]
    x = ln(x, "Transformer/encoder_norm")
    return x[:, 0] @ g["head/kernel"] + g["head/bias"]


def scanned(params):
    """big_vision with scan=True: one Transformer/encoderblock tree, blocks stacked on a leading axis."""
    out = {k: v for k, v in params.items() if not k.startswith("Transformer/encoderblock_")}
    rests = {k.split("/", 2)[2] for k in params if k.startswith("Transformer/encoderblock_")}
    depth = 1 + max(int(k.split("/")[1].split("_")[1]) for k in params if k.startswith("Transformer/encoderblock_"))
    for rest in rests:
        out["Transformer/encoderblock/" + rest] = np.stack(
            [params[f"Transformer/encoderblock_{i}/{rest}"] for i in range(depth)])
    return out


@pytest.mark.parametrize("variant", ["vit_jax", "big_vision", "big_vision_scan", "big_vision_train_state"])
def test_jax_npz_matches_a_numpy_forward_in_jax_layout(tmp_path, variant):
    base = "vit_jax" if variant == "vit_jax" else "big_vision"
    params = random_jax_params(TINY_JAX, base)
    stored = scanned(params) if variant == "big_vision_scan" else params
    if variant == "big_vision_train_state":
        stored = {**{f"params/{k}": v for k, v in params.items()}, "opt/step": np.array(100)}
    np.savez(tmp_path / "vit.npz", **stored)
    net = create_model(TINY_JAX)
    report = load_weights(net, tmp_path / "vit.npz")
    assert report.source == "jax" and len(report.loaded) == len(dict(net.parameters_and_names()))
    assert set(report.dropped) == ({"opt/step"} if variant == "big_vision_train_state" else set())
    x = images(TINY_JAX, n=3)
    np.testing.assert_allclose(logits(net, x), jax_forward(params, TINY_JAX, base, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("prefix", ["", "params/"])  # a checkpoint, and a big_vision train state
def test_jax_pre_logits_and_the_head_on_top_are_dropped(tmp_path, caplog, prefix):
    params = random_jax_params(TINY_JAX, "vit_jax")
    params.update({"pre_logits/kernel": np.ones((64, 64), np.float32), "pre_logits/bias": np.ones(64, np.float32)})
    np.savez(tmp_path / "i21k.npz", **{prefix + k: v for k, v in params.items()})
    net = create_model(TINY_JAX)
    with caplog.at_level(logging.WARNING, logger="vit_ms.checkpoint"):
        report = load_weights(net, tmp_path / "i21k.npz")
    assert set(report.dropped) == {prefix + n for n in ("pre_logits/kernel", "pre_logits/bias", "head/kernel",
                                                        "head/bias")}
    assert report.initialised == ["head.weight", "head.bias"]
    assert "pre-logits" in caplog.text and not net.head.weight.asnumpy().any()  # the zero-initialised head


# ---------------------------------------------------------------------------------------------------
# Allowed differences: head, position embedding
# ---------------------------------------------------------------------------------------------------

def test_new_head_leaves_out_a_head_of_the_same_shape_without_a_warning(tmp_path, caplog):
    # Fine-tuning onto other classes of the same count: the file's head fits but means other classes.
    path = save_state_dict(random_torch(TimmViT, TINY), tmp_path / "same_count.safetensors")
    net = create_model(TINY)
    with caplog.at_level(logging.INFO, logger="vit_ms.checkpoint"):
        report = load_weights(net, path, new_head=True)
    assert report.dropped == {"head.weight": NEW_HEAD, "head.bias": NEW_HEAD} and not report.initialised
    assert "head.weight" not in report.loaded and len(report.loaded) == len(dict(net.parameters_and_names())) - 2
    assert not net.head.weight.asnumpy().any() and not net.head.bias.asnumpy().any()  # the model's zero head
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert f"dropped 2 ({NEW_HEAD}: head.weight, head.bias)" in caplog.text
    load_weights(net, path)  # without it, the same file's head is loaded
    assert net.head.weight.asnumpy().any()
    # A file without a head (e.g. self-supervised pretraining): nothing to drop, and no warning either.
    headless = {k: v for k, v in read_params(path)[0].items() if not k.startswith("head.")}
    save_safetensors_numpy(headless, str(tmp_path / "headless.safetensors"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vit_ms.checkpoint"):
        report = load_weights(create_model(TINY), tmp_path / "headless.safetensors", new_head=True)
    assert not report.dropped and not report.initialised
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_head_with_another_class_count_is_dropped_with_a_warning(tmp_path, caplog):
    model = random_torch(TimmViT, TINY)
    path = save_state_dict(model, tmp_path / "in1k.safetensors")
    net = create_model(dataclasses.replace(TINY, num_classes=5))
    with caplog.at_level(logging.WARNING, logger="vit_ms.checkpoint"):
        report = load_weights(net, path)
    assert set(report.dropped) == {"head.weight", "head.bias"}
    assert "head for 10 classes, the model has 5" in caplog.text
    assert not net.head.weight.asnumpy().any() and not net.head.bias.asnumpy().any()
    # Everything below the head is the PyTorch model's: compare the normed CLS features.
    x = images(TINY)
    with torch.no_grad():
        t = model.patch_embed(torch.from_numpy(x))
        t = torch.cat([model.cls_token.expand(2, -1, -1), t], 1) + model.pos_embed
        for block in model.blocks:
            t = block(t)
        expected = model.norm(t)[:, 0].numpy()
    net.set_train(False)
    features = net.forward_features(ms.Tensor(x)).asnumpy()[:, 0]
    np.testing.assert_allclose(features, expected, rtol=0, atol=1e-5)


def test_headless_checkpoint_keeps_the_models_head(tmp_path, caplog):
    model = random_torch(TimmViT, TINY)
    sd = {k: v.numpy() for k, v in model.state_dict().items() if not k.startswith("head.")}
    save_safetensors_numpy(sd, str(tmp_path / "features.safetensors"))
    net = create_model(TINY)
    with caplog.at_level(logging.WARNING, logger="vit_ms.checkpoint"):
        report = load_weights(net, tmp_path / "features.safetensors")
    assert report.initialised == ["head.weight", "head.bias"] and "has no head.weight" in caplog.text
    with pytest.raises(CheckpointError, match=r"missing head.weight: the model expects \(10, 64\)"):
        load_weights(create_model(TINY), tmp_path / "features.safetensors", strict=True)


@pytest.mark.parametrize("old, new", [(14, 24), (24, 14), ((3, 4), (5, 7)), (2, 2)])
def test_resample_pos_embed_matches_torch_bilinear(old, new):
    oh, ow = (old, old) if isinstance(old, int) else old
    nh, nw = (new, new) if isinstance(new, int) else new
    pos = np.random.default_rng(0).normal(size=(1, 1 + oh * ow, 8)).astype(np.float32)
    out = resample_pos_embed(pos, new, old_grid=old)
    assert out.shape == (1, 1 + nh * nw, 8) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 0], pos[:, 0])  # the CLS row is kept
    grid = torch.from_numpy(pos[0, 1:].reshape(oh, ow, 8)).double().permute(2, 0, 1)[None]
    expected = F.interpolate(grid, size=(nh, nw), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(out[0, 1:], expected[0].permute(1, 2, 0).reshape(-1, 8).numpy(), atol=1e-6)


def test_pos_embed_is_resampled_from_224_to_384(tmp_path, caplog):
    small = ViTConfig(image_size=224, patch_size=16, num_classes=10, embed_dim=32, depth=1, num_heads=2, mlp_dim=64)
    net224 = random_net(small)
    # A smooth position embedding, as trained ones are: a low-frequency pattern over the 14x14 grid.
    yy, xx = np.meshgrid(np.linspace(0, 1, 14), np.linspace(0, 1, 14), indexing="ij")
    waves = np.stack([np.sin(np.pi * (k % 3 + 1) * yy + k) * np.cos(np.pi * (k % 2 + 1) * xx) for k in range(32)], -1)
    pos = np.concatenate([np.full((1, 1, 32), 0.3), waves.reshape(1, 196, 32)], 1).astype(np.float32)
    net224.pos_embed.set_data(ms.Tensor(pos))
    path = save_checkpoint(net224, tmp_path / "vit224.ckpt", make_metadata(small))

    big = dataclasses.replace(small, image_size=384)
    net384 = create_model(big)
    with caplog.at_level(logging.INFO, logger="vit_ms.checkpoint"):
        report = load_weights(net384, path)
    assert report.resampled == {"pos_embed": ((14, 14), (24, 24))}
    assert "from a 14x14 to a 24x24 patch grid" in caplog.text
    new_pos = net384.pos_embed.asnumpy()
    assert new_pos.shape == (1, 577, 32)
    np.testing.assert_array_equal(new_pos[:, 0], pos[:, 0])

    # Sensible: a smooth image shown at 224 and (bilinearly upsampled) at 384 gives close logits.
    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.normal(size=(4, 3, 4, 4)).astype(np.float32))
    x224 = F.interpolate(coarse, size=(224, 224), mode="bilinear", align_corners=False).numpy()
    x384 = F.interpolate(coarse, size=(384, 384), mode="bilinear", align_corners=False).numpy()
    a, b = logits(net224, x224), logits(net384, x384)
    assert np.isfinite(b).all()
    # Measured: correlation >= 0.997, max difference <= 0.09 of the largest logit over three seeds; with
    # a random (not resampled) 24x24 position embedding instead: correlation -0.13..0.94, 0.44..2.7.
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98
    assert np.abs(a - b).max() < 0.2 * np.abs(a).max()


# ---------------------------------------------------------------------------------------------------
# Errors: one clear message, and the net untouched
# ---------------------------------------------------------------------------------------------------

def _ours(tmp_path, config, name, seed=7):
    return save_checkpoint(random_net(config, seed), tmp_path / name, make_metadata(config))


def _timm_with_extra(tmp_path):
    sd = {k: v.numpy() for k, v in random_torch(TimmViT, TINY).state_dict().items()}
    sd["blocks.0.ls1.gamma"] = np.ones(64, np.float32)  # LayerScale: a different architecture
    save_safetensors_numpy(sd, str(tmp_path / "layerscale.safetensors"))
    return tmp_path / "layerscale.safetensors"


def _truncated(tmp_path, path):
    data = path.read_bytes()
    out = tmp_path / f"truncated{path.suffix}"
    out.write_bytes(data[: len(data) // 2])
    return out


def _npz(tmp_path, params):
    np.savez(tmp_path / "f.npz", **params)
    return tmp_path / "f.npz"


def _garbage(tmp_path, suffix):
    out = tmp_path / f"garbage{suffix}"
    out.write_bytes(np.random.default_rng(0).bytes(4096))
    return out


ERROR_CASES = {
    "deeper": (lambda t: _ours(t, dataclasses.replace(TINY, depth=3), "deep.ckpt"), {},
               [r"unexpected blocks\.2\.norm1\.gamma \(64,\)", r"unexpected blocks\.2\.attn\.qkv\.weight \(192, 64\)",
                "holds a model with depth=3; the model has depth=2"]),
    "shallower": (lambda t: _ours(t, dataclasses.replace(TINY, depth=1), "shallow.ckpt"), {},
                  [r"missing blocks\.1\.mlp\.fc2\.bias: the model expects \(64,\)", "depth=1"]),
    "narrower": (lambda t: _ours(t, dataclasses.replace(TINY, embed_dim=32, num_heads=2), "narrow.ckpt"), {},
                 [r"shape of blocks\.0\.attn\.qkv\.weight: checkpoint \(96, 32\), model \(192, 64\)",
                  r"shape of cls_token: checkpoint \(1, 1, 32\), model \(1, 1, 64\)", "embed_dim=32"]),
    "other_mlp": (lambda t: _ours(t, dataclasses.replace(TINY, mlp_dim=96), "mlp.ckpt"), {},
                  [r"shape of blocks\.1\.mlp\.fc1\.weight: checkpoint \(96, 64\), model \(128, 64\)"]),
    "unknown_name": (_timm_with_extra, {}, [r"unknown name blocks\.0\.ls1\.gamma \(64,\)"]),
    "wrong_source": (lambda t: save_state_dict(random_torch(TimmViT, TINY), t / "timm.safetensors"),
                     {"source": "torchvision"}, [r"unknown name blocks\.0\.attn\.qkv\.weight \(192, 64\)"]),
    "truncated_ckpt": (lambda t: _truncated(t, _ours(t, TINY, "full.ckpt")), {}, ["truncated or corrupt"]),
    "truncated_safetensors": (lambda t: _truncated(t, save_state_dict(random_torch(TimmViT, TINY),
                                                                      t / "f.safetensors")), {},
                              ["truncated or corrupt"]),
    "truncated_pth": (lambda t: _truncated(t, save_state_dict(random_torch(TimmViT, TINY), t / "f.pth")), {},
                      ["truncated or corrupt"]),
    "truncated_npz": (lambda t: _truncated(t, _npz(t, random_jax_params(TINY_JAX, "vit_jax"))), {},
                      ["truncated or corrupt"]),
    "garbage_ckpt": (lambda t: _garbage(t, ".ckpt"), {}, ["truncated or corrupt"]),
    "garbage_safetensors": (lambda t: _garbage(t, ".safetensors"), {}, ["truncated or corrupt"]),
    "unknown_suffix": (lambda t: _garbage(t, ".h5"), {}, [r"unknown weights file type '\.h5'"]),
    "strict_head": (lambda t: _ours(t, dataclasses.replace(TINY, num_classes=3), "c3.ckpt"), {"strict": True},
                    [r"shape of head\.weight: checkpoint \(3, 64\), model \(10, 64\)"]),
    "strict_pos_embed": (lambda t: _ours(t, dataclasses.replace(TINY, image_size=48), "i48.ckpt"), {"strict": True},
                         [r"shape of pos_embed: checkpoint \(1, 37, 64\), model \(1, 17, 64\)"]),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_checkpoint_raises_one_clear_error_and_leaves_the_net_untouched(tmp_path, case):
    make, kwargs, patterns = ERROR_CASES[case]
    path = make(tmp_path)
    net = random_net(TINY, seed=11)
    before = numpy_params(net)
    with pytest.raises(CheckpointError) as error:
        load_weights(net, path, **kwargs)
    for pattern in patterns:
        assert error.match(pattern), f"{pattern!r} not in:\n{error.value}"
    assert str(path) in str(error.value)
    assert_untouched(net, before)


def test_a_mismatch_after_valid_tensors_still_assigns_nothing(tmp_path):
    # Every tensor but the last block's fc2 fits: MindSpore's load_param_into_net would have loaded
    # the others before raising; load_weights must not.
    good = numpy_params(random_net(TINY, seed=4))
    good["blocks.1.mlp.fc2.weight"] = np.zeros((64, 100), np.float32)
    path = save_ms(good, tmp_path / "almost.ckpt")
    net = random_net(TINY, seed=12)
    before = numpy_params(net)
    with pytest.raises(CheckpointError, match="1 problem"):
        load_weights(net, path)
    assert_untouched(net, before)


def test_load_model_validates_weights_against_metadata(tmp_path):
    deep = random_net(dataclasses.replace(TINY, depth=3))
    path = save_checkpoint(deep, tmp_path / "lying.ckpt", make_metadata(TINY))  # metadata says depth 2
    with pytest.raises(CheckpointError, match=r"unexpected blocks\.2\."):
        load_model(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(create_model(TINY), tmp_path / "nope.ckpt")
    plain = save_ms(numpy_params(random_net(TINY)), tmp_path / "plain.ckpt")
    with pytest.raises(CheckpointError, match="has no vit_ms metadata.*convert.py"):
        load_model(plain)


def test_detect_source_and_convert_and_infer_config():
    assert detect_source(["cls", "pos_embedding", "transformer.layers.0.0.cell.0.gamma"]) == "tutorial"
    assert detect_source(["cls_token", "patch_embed.proj.weight", "blocks.0.norm1.weight"]) == "timm"
    assert detect_source(["cls_token", "patch_embed.proj.weight", "blocks.0.norm1.gamma"]) == "vit_ms"
    assert detect_source(["class_token", "conv_proj.weight"]) == "torchvision"
    assert detect_source(["params/embedding/kernel", "params/cls"]) == "jax"
    with pytest.raises(CheckpointError, match="cannot tell the naming scheme"):
        detect_source(["fc.weight", "conv1.weight"])
    with pytest.raises(CheckpointError, match=r"unknown name fc\.weight \(2, 2\)"):
        convert({"fc.weight": np.zeros((2, 2))}, "timm")
    with pytest.raises(CheckpointError, match="unknown source 'keras'"):
        convert({}, "keras")
    ours = convert({k: v.numpy() for k, v in TimmViT(TINY).state_dict().items()}, "timm")
    fields = infer_config(ours)
    assert fields == {"embed_dim": 64, "in_channels": 3, "patch_size": 8, "depth": 2, "mlp_dim": 128,
                      "image_size": 32, "num_classes": 10}


# ---------------------------------------------------------------------------------------------------
# The registry: every scheme has its module, is detected from its own names, and converts to ours
# ---------------------------------------------------------------------------------------------------

def _mindcv_first_generation(ours):
    """mindcv's first-generation names (mindcv/models/vit.py at 0fb3f772): the tutorial's layout under
    `backbone.` (Parameters `cls` / `pos_embedding` named at creation) and `head.classifier.*`."""
    out = {}
    for name in tutorial_names_for(TINY.depth):
        theirs = f"head.classifier.{name[len('dense.'):]}" if name.startswith("dense.") else f"backbone.{name}"
        out[theirs] = ours[ours_for_tutorial(name)]
    return out


def _hf_names(ours):  # the hub layout save_pretrained writes, built by hand from modeling_vit's module tree
    out = {"vit.embeddings.cls_token": ours["cls_token"], "vit.embeddings.position_embeddings": ours["pos_embed"],
           "classifier.weight": ours["head.weight"], "classifier.bias": ours["head.bias"]}
    for kind in ("weight", "bias"):
        out[f"vit.embeddings.patch_embeddings.projection.{kind}"] = ours[f"patch_embed.proj.{kind}"]
        out[f"vit.layernorm.{kind}"] = ours["norm." + ("gamma" if kind == "weight" else "beta")]
        for i in range(TINY.depth):
            b, o = f"vit.encoder.layer.{i}.", f"blocks.{i}."
            for part, rows in zip(("query", "key", "value"), np.split(ours[o + f"attn.qkv.{kind}"], 3)):
                out[b + f"attention.attention.{part}.{kind}"] = rows
            out[b + f"attention.output.dense.{kind}"] = ours[o + f"attn.proj.{kind}"]
            out[b + f"intermediate.dense.{kind}"] = ours[o + f"mlp.fc1.{kind}"]
            out[b + f"output.dense.{kind}"] = ours[o + f"mlp.fc2.{kind}"]
            ln = "gamma" if kind == "weight" else "beta"
            out[b + f"layernorm_before.{kind}"] = ours[o + f"norm1.{ln}"]
            out[b + f"layernorm_after.{kind}"] = ours[o + f"norm2.{ln}"]
    return out


SAMPLES = {  # scheme -> (its names for a TINY net's weights `ours`), built without vit_ms's own converters
    "vit_ms": lambda ours: dict(ours),
    "timm": lambda ours: {k.replace(".gamma", ".weight").replace(".beta", ".bias"): v for k, v in ours.items()},
    "tutorial": lambda ours: {n: ours[ours_for_tutorial(n)] for n in tutorial_names_for(TINY.depth)},
    "mindcv": _mindcv_first_generation,
    "hf": _hf_names,
    "torchvision": None,  # from TorchvisionViT's state dict (its own module tree)
    "jax": None,  # from random_jax_params (JAX layout)
}


def test_every_registered_scheme_has_a_module_is_detected_and_converts():
    assert set(SAMPLES) == set(FORMATS) == set(SOURCES), "a new scheme needs a sample here"
    formats_dir = Path(__file__).resolve().parents[1] / "vit_ms" / "checkpoint" / "formats"
    ours = numpy_params(random_net(TINY, seed=21))
    for name, fmt in FORMATS.items():
        assert (formats_dir / f"{name}.py").is_file(), f"{name}: one module per scheme"
        if name == "torchvision":
            sample = {k: v.numpy() for k, v in random_torch(TorchvisionViT, TINY).state_dict().items()}
        elif name == "jax":
            sample = random_jax_params(TINY_JAX, "big_vision")
        else:
            sample = SAMPLES[name](ours)
        assert detect_source(sample) == name
        converted = convert(sample, name)
        assert set(converted) == set(ours), name
        if name not in ("torchvision", "jax"):
            for key, value in converted.items():
                np.testing.assert_array_equal(value, ours[key], err_msg=f"{name}: {key}")


def test_mindcv_first_generation_checkpoint_loads_with_the_original_logits(tmp_path):
    net = random_net(TINY_TUTORIAL, seed=22)  # mindcv builds nn.GELU() (tanh) and nn.LayerNorm (1e-7)
    sample = _mindcv_first_generation(numpy_params(net))
    sample["adam_m.backbone.norm.gamma"] = np.zeros(64, np.float32)  # a mindcv training checkpoint's state
    path = save_ms(sample, tmp_path / "vit_b_32_224-7553218f.ckpt")
    fresh = create_model(TINY_TUTORIAL)
    report = load_weights(fresh, path)
    assert report.source == "mindcv" and set(report.dropped) == {"adam_m.backbone.norm.gamma"}
    np.testing.assert_array_equal(logits(fresh, images(TINY)), logits(net, images(TINY)))


def test_mindcv_pre_logits_head_is_dropped_with_its_reason(tmp_path):
    sample = _mindcv_first_generation(numpy_params(random_net(TINY_TUTORIAL, seed=23)))
    sample["head.classifier.1.classifier.weight"] = sample.pop("head.classifier.weight")
    sample["head.classifier.1.classifier.bias"] = sample.pop("head.classifier.bias")
    sample["head.classifier.0.classifier.weight"] = np.zeros((64, 64), np.float32)  # has_logits=True
    sample["head.classifier.0.classifier.bias"] = np.zeros(64, np.float32)
    report = load_weights(create_model(TINY_TUTORIAL), save_ms(sample, tmp_path / "logits.ckpt"))
    assert report.dropped["head.classifier.0.classifier.weight"].startswith("pre-logits")
    assert report.dropped["head.classifier.1.classifier.weight"].startswith("head trained on top")
    assert report.initialised == ["head.weight", "head.bias"]


def test_mindcv_second_generation_names_are_ours_and_take_mindcv_numerics(tmp_path):
    from vit_ms.checkpoint import convert_checkpoint

    net = random_net(TINY_TUTORIAL, seed=24)
    path = save_ms(numpy_params(net), tmp_path / "vit_l_16_224-d2635f8b.ckpt")
    assert detect_source(numpy_params(net)) == "vit_ms"  # same names as ours: no way to tell them apart
    _, _, config = convert_checkpoint(path, tmp_path / "out.ckpt", source="mindcv", num_heads=4)
    assert config == TINY_TUTORIAL  # MindSpore's tanh GELU and epsilon 1e-7
    converted, _ = load_model(tmp_path / "out.ckpt")
    np.testing.assert_array_equal(logits(converted, images(TINY)), logits(net, images(TINY)))
