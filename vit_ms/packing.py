"""Networks packed for inference: each encoder block's four Dense weights rearranged once into the layout the
fused CPU kernels' own GEMM reads (`vit_ms/ops/csrc/packed.cc`), as onnxruntime packs a model's constant
weights when it loads them, where oneDNN's sgemm packs them again at every call.

A batch-1 step then takes 6-14 % less time (ViT-Ti/16 to ViT-B/16, AMD EPYC; README, round 29); at batch
16 up to 8 % more, so infer.py packs only where every batch is small (`SMALL_BATCH`). The weights are
rearranged in place, so the network holds no second copy, and renamed
(`...qkv.weight` -> `...qkv.weight_packed`), so that a checkpoint saved from it cannot pass for one in the
plain layout. A packed network is for inference only: its blocks run the one-kernel path in any mode, have
no gradients and no attention maps, and it must be packed before its first call (a compiled graph would
keep reading the weights as plain ones). `load_classifier(..., pack_weights=True)` packs what it loads
(infer.py asks for it).

    net = create_model(config); load_weights(net, path); net.set_train(False)
    pack_for_inference(net)      # then net(images), as before
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np

logger = logging.getLogger(__name__)

PACK_K = 256  # the depth of a packed block of k: csrc/packed.cc's kPackK
# The batch sizes packing is for: up to 4 images a step measured 0.99-1.23x as fast packed (ViT-Ti/S/B b1
# 1.06-1.16x, ViT-S b2 1.03-1.07x, b4 0.99x, ViT-B b4 1.22x), at 16 0.92-1.00x (AMD EPYC, AVX2; README,
# round 29). infer.py packs where every batch it runs is this small.
SMALL_BATCH = 4
SUFFIX = "_packed"  # appended to a packed weight's name


def pack_dense_weight(w: np.ndarray) -> np.ndarray:
    """A Dense weight w (n, k), n a multiple of 16, in packed.cc's layout, as an (n, k) float32 array: for
    each block of PACK_K values of k (the last one shorter, kc deep), for each panel of 16 output columns,
    the block's kc rows of 16 floats; w[16 p + j, k0 + i] lands at flat index k0 n + 16 p kc + 16 i + j."""
    w = np.asarray(w, np.float32)
    n, k = w.shape
    if n % 16:
        raise ValueError(f"a packed weight needs a multiple of 16 rows (output features), not {n}")
    packed = np.empty(n * k, np.float32)  # written once: every copy of a fresh array pays its page faults
    for k0 in range(0, k, PACK_K):
        kc = min(PACK_K, k - k0)
        packed[k0 * n:(k0 + kc) * n].reshape(n // 16, kc, 16)[...] = \
            w[:, k0:k0 + kc].reshape(n // 16, 16, kc).transpose(0, 2, 1)
    return packed.reshape(n, k)


def why_not_packable(net) -> Optional[str]:
    """Why `pack_for_inference` would refuse `net`, or None if it can pack it."""
    blocks = getattr(net, "blocks", None)
    if blocks is None or not hasattr(net, "config"):
        return f"{type(net).__name__} is not a vit_ms ViT"
    if any(block.packed for block in blocks):
        return "the network is packed already"
    if any(block.one_kernel is None for block in blocks):
        return ("the network runs MindSpore's own ops, not vit_ms's fused CPU kernels "
                "(vit_ms.layers.use_fused_kernels)")
    config = net.config
    if config.embed_dim % 16 or config.mlp_dim % 16:
        return f"its widths ({config.embed_dim}, {config.mlp_dim}) are not multiples of 16"
    # Its own graphs only: a graph compiled through a Cell around it (a loss wrapper, Model.eval) is not seen.
    if net.compile_cache:
        return "it has run already: pack it before its first call (its compiled graph reads the weights as plain)"
    return None


def pack_for_inference(net):
    """Pack every encoder block's qkv, proj, fc1 and fc2 weights of a vit_ms ViT in place (see the module's
    docstring) and put the network in eval mode; returns `net`. Raises ValueError, naming the reason, where
    `why_not_packable` gives one."""
    import mindspore as ms

    from .layers import encoder_block

    reason = why_not_packable(net)
    if reason is not None:
        raise ValueError(f"cannot pack the network for inference: {reason}")
    net.set_train(False)
    for block in net.blocks:
        for dense in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            weight = dense.weight
            weight.set_data(ms.Tensor.from_numpy(pack_dense_weight(weight.asnumpy())))  # a fresh array: no copy
            weight.name = weight.name + SUFFIX
            weight.requires_grad = False
        block.one_kernel = encoder_block(net.config, fused=True, packed=True)
        block.packed = True
    logger.info("weights packed for inference (%d blocks)", len(net.blocks))
    return net


__all__ = ["PACK_K", "SMALL_BATCH", "SUFFIX", "pack_dense_weight", "pack_for_inference", "why_not_packable"]
