"""Networks packed for inference (`vit_ms.packing`): the packed layout, logits within float32 rounding of
a float64 reference at batch sizes that take every path of the packed GEMM, and the refusals and guards
that keep packed weights from being read as plain ones (a second pack, a network that has run, one on
MindSpore's own ops, gradients, attention maps, a checkpoint saved from it). Tolerances: `float32_bounds`."""
import dataclasses

import mindspore as ms
import numpy as np
import pytest

from float32_bounds import assert_within, init_scale_weights, logits_bound
from test_fast_path import SMALL, _images, _reference, isa  # noqa: F401  (isa: the kernel-variant fixture)
from vit_ms import create_model, layers, set_dynamic_batch
from vit_ms.checkpoint import CheckpointError, load_weights
from vit_ms.packing import PACK_K, SUFFIX, pack_dense_weight, pack_for_inference, why_not_packable


@pytest.fixture(autouse=True)
def _fused_kernels_allowed(monkeypatch):
    """Packing needs the fused kernels: allowed here also in a run with VIT_MS_FUSED_KERNELS=0 for the rest."""
    monkeypatch.delenv(layers.FUSED_ENV, raising=False)


def _packed_and_plain(config=SMALL, seed=0):
    """A network packed for inference and a fused, unpacked twin holding the same init-scale weights."""
    plain = create_model(config, fast=True)
    init_scale_weights(plain, np.random.default_rng(seed))
    packed = create_model(config, fast=True)
    not_loaded, _ = ms.load_param_into_net(packed, {p.name: p for p in plain.get_parameters()})
    assert not not_loaded
    plain.set_train(False)
    return pack_for_inference(packed), plain


def test_the_packed_layout_is_the_one_the_kernel_reads():
    """w[16 p + j, k0 + i] lands at k0 n + 16 p kc + 16 i + j (csrc/packed.cc), kc the depth of k's block."""
    n, k = 48, PACK_K + 44
    w = np.arange(n * k, dtype=np.float32).reshape(n, k)  # each value names its own place
    flat = pack_dense_weight(w).ravel()
    rows, cols = np.meshgrid(np.arange(n), np.arange(k), indexing="ij")
    k0 = cols // PACK_K * PACK_K
    kc = np.minimum(PACK_K, k - k0)
    at = k0 * n + 16 * (rows // 16) * kc + 16 * (cols - k0) + rows % 16
    np.testing.assert_array_equal(flat[at], w)
    assert sorted(at.ravel().tolist()) == list(range(n * k))  # a permutation: every value once
    with pytest.raises(ValueError, match="multiple of 16 rows"):
        pack_dense_weight(np.zeros((40, 8), np.float32))


def test_packed_logits_are_within_float32_rounding_of_the_exact_ones(isa):
    """Graph mode, dynamic batch (as infer.py runs it): batch 1 and 3, and 24 (408 token rows, 204 per
    thread on 2 threads: more than one 192-row block of the packed GEMM)."""
    packed, plain = _packed_and_plain()
    set_dynamic_batch(packed, SMALL)
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        for batch in (1, 3, 24):
            x = _images(batch, seed=batch)
            ref_logits, _ = _reference(plain, SMALL, x)
            # The bound's feature magnitudes from the unpacked twin (the packed network has no intermediates).
            pre_logits = plain.forward_intermediates(ms.Tensor(x))["pre_logits"].asnumpy()
            bound = logits_bound(SMALL, pre_logits, plain.head.weight.asnumpy(), plain.head.bias.asnumpy())
            assert_within(packed(ms.Tensor(x)).asnumpy(), ref_logits, bound, f"packed logits, batch {batch}")
    finally:
        ms.set_context(mode=previous)


def test_a_packed_network_runs_its_one_kernel_in_training_mode_too():
    """Its blocks cannot run the separate ops on packed weights, so training mode changes nothing (SMALL
    has no dropout or drop path)."""
    packed, _ = _packed_and_plain()
    x = ms.Tensor(_images(2))
    eval_logits = packed(x).asnumpy()
    packed.set_train(True)
    np.testing.assert_array_equal(packed(x).asnumpy(), eval_logits)


def test_what_cannot_be_packed_is_refused_with_the_reason(tmp_path):
    packed, plain = _packed_and_plain()
    with pytest.raises(ValueError, match="packed already"):
        pack_for_inference(packed)
    assert "MindSpore's own ops" in why_not_packable(create_model(SMALL, fast=False))
    narrow = dataclasses.replace(SMALL, embed_dim=40, mlp_dim=80, num_heads=4)
    assert "not multiples of 16" in why_not_packable(create_model(narrow, fast=True))
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        plain(ms.Tensor(_images(1)))  # compiled: its graph reads the weights as plain ones
    finally:
        ms.set_context(mode=previous)
    with pytest.raises(ValueError, match="before its first call"):
        pack_for_inference(plain)


def test_a_packed_network_has_no_gradients_and_no_attention_maps():
    packed, _ = _packed_and_plain()
    x = ms.Tensor(_images(1))
    with pytest.raises(RuntimeError, match="no gradients"):
        ms.grad(packed)(x)
    with pytest.raises(ValueError, match="attention maps"):
        packed.forward_intermediates(x)


def test_a_checkpoint_saved_from_a_packed_network_is_not_taken_for_a_plain_one(tmp_path):
    packed, _ = _packed_and_plain()
    names = [p.name for p in packed.get_parameters()]
    assert "blocks.0.attn.qkv.weight" + SUFFIX in names and "blocks.0.attn.qkv.weight" not in names
    ms.save_checkpoint(packed, str(tmp_path / "packed.ckpt"))
    with pytest.raises(CheckpointError, match="qkv.weight"):
        load_weights(create_model(SMALL, fast=True), tmp_path / "packed.ckpt")
