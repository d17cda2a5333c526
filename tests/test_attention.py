"""Attention rollout (Abnar & Zuidema 2020) on a tiny ViT: shapes, normalisation, a closed form, PNGs."""
import dataclasses

import mindspore as ms
import numpy as np
from PIL import Image

from tiny_classifier import TINY, random_image, random_net
from vit_ms import Preprocess
from vit_ms.viz import attention_rollout, model_view, rollout_map, save_attention_overlay

TOKENS = TINY.num_patches + 1


def images(n=2):
    return np.random.default_rng(0).standard_normal((n, 3, 32, 32)).astype(np.float32)


def test_rollout_is_row_stochastic_and_restores_the_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        rollout = attention_rollout(random_net(), images())
        assert ms.get_context("mode") == ms.GRAPH_MODE
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert rollout.shape == (2, TOKENS, TOKENS)
    assert (rollout >= 0).all()
    np.testing.assert_allclose(rollout.sum(axis=-1), 1.0, atol=1e-12)
    heat = rollout_map(rollout)
    assert heat.shape == (2, TINY.grid_size, TINY.grid_size)
    np.testing.assert_allclose(heat.max(axis=(1, 2)), 1.0)
    np.testing.assert_allclose(heat.reshape(2, -1), rollout[:, 0, 1:] / rollout[:, 0, 1:].max(1, keepdims=True))


def test_uniform_attention_gives_the_closed_form():
    # Zero q and k make every attention row uniform, U = ones / T. Each block is then (U + I) / 2 and,
    # as U @ U = U, L blocks roll out to I / 2^L + (1 - 2^-L) U.
    config = dataclasses.replace(TINY, depth=3)
    net = random_net(config)
    for block in net.blocks:
        weight = block.attn.qkv.weight.asnumpy().copy()
        bias = block.attn.qkv.bias.asnumpy().copy()
        weight[: 2 * config.embed_dim] = 0  # rows of q and k
        bias[: 2 * config.embed_dim] = 0
        block.attn.qkv.weight.set_data(ms.Tensor(weight))
        block.attn.qkv.bias.set_data(ms.Tensor(bias))
    rollout = attention_rollout(net, images(1))[0]
    depth = config.depth
    expected = np.eye(TOKENS) / 2 ** depth + (1 - 2.0 ** -depth) / TOKENS
    np.testing.assert_allclose(rollout, expected, atol=1e-6)
    np.testing.assert_allclose(rollout_map(rollout[None])[0], 1.0, atol=1e-6)  # every patch equally


def test_overlay_png_covers_the_models_view(tmp_path):
    image = random_image(np.random.default_rng(1), size=(80, 50))
    preprocess = Preprocess(image_size=32, crop_pct=0.875)
    view = model_view(image, preprocess)
    # The eval geometry: 50 -> resize_size 37, crop 32, i.e. 32 * 50 / 37 = 43.2 original pixels, rounded.
    assert view.size == (43, 43)
    heat = np.linspace(0, 1, 16).reshape(4, 4)
    out = save_attention_overlay(image, heat, preprocess, tmp_path / "a b's_attention.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (320, 320)
        pixels = np.asarray(im.convert("RGB"), np.float64)
    # jet: low values blue, high values red, so the heat map is really drawn on the image.
    assert pixels[:40, :40, 2].mean() > pixels[:40, :40, 0].mean()
    assert pixels[-40:, -40:, 0].mean() > pixels[-40:, -40:, 2].mean()
