"""The Vision Transformer as MindSpore Cells (Dosovitskiy et al., ICLR 2021, Eq. 1-4).

    z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos             (1)  PatchEmbed, cls_token, pos_embed
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}                           (2)  Block: attention branch
    z_l = MLP(LN(z'_l)) + z'_l                                  (3)  Block: feed-forward branch
    y = LN(z_L^0)                                               (4)  norm, then head on the CLS token

Weight init (the paper's JAX scheme, as in big_vision): Dense kernels Xavier-uniform, biases zero
except the MLP's N(0, 1e-6); the patch-embedding conv LeCun-normal (fan-in); the position embedding
N(0, 0.02); the CLS token and the classifier head zero; LayerNorm ones/zeros. Each initializer is
declared where its layer is built.

Every Cell takes `fast` (default True): the same math and parameters computed the way MindSpore's CPU
backend runs fastest, within float32 rounding (1e-5 on logits) of the plain path (`fast=False`), which
spells each step with the obvious op. The fast path computes the patch embedding as a matrix product
instead of a strided `Conv2d` (~100x faster on CPU) and runs on fused CPU kernels (`vit_ms.kernels`,
each with its own backward): the Dense layers and the attention products on oneDNN's sgemm, attention
reading q, k and v in place in the qkv output (no head split, no transposes), softmax, GELU, LayerNorm
and the patch permutation. A kernel that cannot be built leaves its step to the plain op. Checkpoints
are the same for both paths.

The model knows nothing of checkpoints, data or training: see `vit_ms.checkpoint` for weights.
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import nn, ops, Parameter
from mindspore.common.initializer import Normal, TruncatedNormal, XavierUniform, Zero, initializer

from .config import ViTConfig, get_config
from .kernels import (add_bias_kernel, attention_kernels, gelu_kernel, layer_norm_kernel, linear_kernel,
                      patchify_kernel, softmax_kernel)


class _FastDense(nn.Dense):
    """`nn.Dense` (same parameters) on fused CPU kernels: the whole layer on oneDNN's sgemm where the
    MindSpore wheel ships oneDNN (`linear`), else MindSpore's MatMul with the bias added by a kernel whose
    backward sums the bias gradient in one pass (MindSpore's CPU BiasAddGrad took 12 % of a ViT-S step)."""

    def __init__(self, *args, linear=None, add_bias=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.linear = linear
        self.add_bias = add_bias

    def construct(self, x):
        rows = x.reshape(-1, self.in_channels)
        if self.linear is not None:
            y = self.linear(rows, self.weight, self.bias)  # (rows, out)
        else:
            # nn.Dense's own 2-D MatMul(transpose_b): its backward needs no Transpose ops, unlike ops.dense's.
            y = self.add_bias(self.matmul(rows, self.weight), self.bias)
        return y.reshape(x.shape[:-1] + (self.out_channels,))


class _FastLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` over the last axis (same gamma, beta) computed by the fused CPU kernel: MindSpore's CPU
    LayerNormGrad took 23 % of a ViT-S training step."""

    def __init__(self, normalized_shape, epsilon, kernel):
        super().__init__(normalized_shape, epsilon=epsilon)
        self.kernel = kernel
        self.eps = ms.Tensor([epsilon], ms.float32)

    def construct(self, x):
        return self.kernel(x, self.gamma, self.beta, self.eps)


def _dense(in_dim: int, out_dim: int, bias_std: float = 0.0, fast: bool = True, weight_init=None) -> nn.Dense:
    bias_init = Normal(bias_std) if bias_std else Zero()
    weight_init = XavierUniform() if weight_init is None else weight_init
    add_bias = add_bias_kernel() if fast else None
    if add_bias is None:
        return nn.Dense(in_dim, out_dim, weight_init=weight_init, bias_init=bias_init)
    return _FastDense(in_dim, out_dim, weight_init=weight_init, bias_init=bias_init, linear=linear_kernel(),
                      add_bias=add_bias)


def _layer_norm(config: ViTConfig, fast: bool = True) -> nn.LayerNorm:
    kernel = layer_norm_kernel() if fast else None
    if kernel is None:
        return nn.LayerNorm((config.embed_dim,), epsilon=config.norm_eps)
    return _FastLayerNorm((config.embed_dim,), config.norm_eps, kernel)


class PatchEmbed(nn.Cell):
    """Split the image into patches and project each to `embed_dim` with one strided convolution."""

    def __init__(self, config: ViTConfig, fast: bool = True):
        super().__init__()
        self.fast = fast
        self.patch_size = config.patch_size
        self.embed_dim = config.embed_dim
        fan_in = config.in_channels * config.patch_size ** 2
        # LeCun normal, truncated at 2 sigma; 0.8796 undoes the variance lost to truncation (as in JAX).
        sigma = math.sqrt(1.0 / fan_in) / 0.87962566103423978
        self.proj = nn.Conv2d(config.in_channels, config.embed_dim, kernel_size=config.patch_size,
                              stride=config.patch_size, pad_mode="valid", has_bias=True,
                              weight_init=TruncatedNormal(sigma, a=-2 * sigma, b=2 * sigma), bias_init=Zero())
        self.patchify = patchify_kernel() if fast else None
        self.linear = linear_kernel() if fast else None
        self.add_bias = add_bias_kernel() if fast else None
        self.matmul = ops.MatMul(transpose_b=True)  # not ops.dense, whose backward adds Transposes

    def construct(self, x):
        if not self.fast:
            x = self.proj(x)  # (B, C, H, W) -> (B, D, H/p, W/p)
            x = x.flatten(start_dim=2)  # -> (B, D, N)
            return x.swapaxes(1, 2)  # -> (B, N, D)
        # The same convolution as one matrix product with the conv's own weight: a stride-p, p x p conv
        # is a Dense on flattened patches, and MindSpore's CPU Conv2d is ~100x slower than its MatMul.
        _, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(-1, c, h // p, p, w // p, p)
        # -> (B, H/p, W/p, C, p, p); the kernel is the same permutation without Transpose's offset table.
        x = x.transpose(0, 2, 4, 1, 3, 5) if self.patchify is None else self.patchify(x)
        x = x.reshape(-1, c * p * p)  # -> (B N, C p p), each row one patch in the weight's (C, p, p) order
        weight = self.proj.weight.reshape(self.embed_dim, -1)  # (D, C p p)
        if self.linear is not None:
            x = self.linear(x, weight, self.proj.bias)  # -> (B N, D)
        else:
            x = self.matmul(x, weight)
            x = x + self.proj.bias if self.add_bias is None else self.add_bias(x, self.proj.bias)
        return x.reshape(-1, (h // p) * (w // p), self.embed_dim)  # -> (B, N, D)


class Attention(nn.Cell):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, config: ViTConfig, fast: bool = True):
        super().__init__()
        self.embed_dim = config.embed_dim
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv = _dense(config.embed_dim, 3 * config.embed_dim, fast=fast)
        self.attn_drop = nn.Dropout(p=config.attention_dropout)
        self.proj = _dense(config.embed_dim, config.embed_dim, fast=fast)
        # The fast path reads q, k and v where the qkv projection wrote them: no head split, no transposes
        # (MindSpore's CPU Transpose holds an offset table of 2x the tensor for the graph's lifetime).
        kernels = attention_kernels() if fast else None
        self.scores_kernel, self.values_kernel = kernels or (None, None)
        self.scale_tensor = ms.Tensor([self.scale], ms.float32)
        self.softmax = softmax_kernel() if fast else None

    def split_qkv(self, x):
        """Tokens (B, N, D) -> qkv (B, N, 3, heads, head_dim), a view of the projection's output."""
        return self.qkv(x).reshape(-1, x.shape[1], 3, self.num_heads, self.head_dim)

    def scores(self, qkv):
        """q k^T / sqrt(d_h): (B, heads, N, N)."""
        if self.scores_kernel is not None:
            return self.scores_kernel(qkv, self.scale_tensor)
        q = qkv[:, :, 0].transpose(0, 2, 1, 3)  # (B, heads, N, head_dim)
        k = qkv[:, :, 1].transpose(0, 2, 3, 1)  # (B, heads, head_dim, N)
        return ops.matmul(q * self.scale, k)

    def weighted_values(self, probs, qkv):
        """probs v with the heads merged again: (B, N, heads, head_dim)."""
        if self.values_kernel is not None:
            return self.values_kernel(probs, qkv)
        v = qkv[:, :, 2].transpose(0, 2, 1, 3)  # (B, heads, N, head_dim)
        return ops.matmul(probs, v).swapaxes(1, 2)

    def attention_probs(self, x):
        """softmax(q k^T / sqrt(d_h)) from tokens x (B, N, D): (B, heads, N, N)."""
        return self.softmax_probs(self.scores(self.split_qkv(x)))

    def softmax_probs(self, scores):
        """Softmax over the keys (last axis)."""
        return ops.softmax(scores, axis=-1) if self.softmax is None else self.softmax(scores)

    def construct(self, x):
        _, n, d = x.shape
        qkv = self.split_qkv(x)
        probs = self.softmax_probs(self.scores(qkv))
        x = self.weighted_values(self.attn_drop(probs), qkv)  # (B, N, heads, head_dim)
        return self.proj(x.reshape(-1, n, d))  # heads concatenated, then projected


class GELU(nn.Cell):
    """GELU, exact (erf) or tanh; `fast` uses the fused CPU kernel of `vit_ms.kernels` where it builds."""

    def __init__(self, approximate: bool, fast: bool = True):
        super().__init__()
        self.approximate = "tanh" if approximate else "none"
        self.kernel = gelu_kernel(approximate) if fast else None

    def construct(self, x):
        if self.kernel is None:
            return ops.gelu(x, approximate=self.approximate)
        return self.kernel(x)


class FeedForward(nn.Cell):
    """The MLP of each block: Dense, GELU, dropout, Dense, dropout."""

    def __init__(self, config: ViTConfig, fast: bool = True):
        super().__init__()
        self.fc1 = _dense(config.embed_dim, config.mlp_dim, bias_std=1e-6, fast=fast)
        self.act = GELU(config.gelu_approximate, fast)
        self.fc2 = _dense(config.mlp_dim, config.embed_dim, bias_std=1e-6, fast=fast)
        self.drop = nn.Dropout(p=config.dropout)

    def construct(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Cell):
    """Stochastic depth: drop a sample's whole residual branch with probability p while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def construct(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = ops.floor(keep + ops.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype))
        return x / keep * mask


class Block(nn.Cell):
    """One pre-norm encoder block, Eq. 2 and 3."""

    def __init__(self, config: ViTConfig, drop_path: float = 0.0, fast: bool = True):
        super().__init__()
        self.norm1 = _layer_norm(config, fast)
        self.attn = Attention(config, fast)
        self.norm2 = _layer_norm(config, fast)
        self.mlp = FeedForward(config, fast)
        self.drop_path = DropPath(drop_path)

    def construct(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))  # (2)
        x = x + self.drop_path(self.mlp(self.norm2(x)))  # (3)
        return x


class ViT(nn.Cell):
    """Vision Transformer classifier: `ViT(config)(images) -> logits`, images (B, C, H, W) float32.

    Args:
        config: the architecture.
        fast: compute the same math the fastest way for MindSpore's CPU backend (see the module
            docstring); False spells each step with the plain op, e.g. the `Conv2d` patch embedding.
    """

    def __init__(self, config: ViTConfig, fast: bool = True):
        super().__init__()
        self.config = config
        self.fast = fast
        d = config.embed_dim
        self.patch_embed = PatchEmbed(config, fast)
        self.cls_token = Parameter(initializer(Zero(), (1, 1, d)), name="cls_token")
        self.pos_embed = Parameter(initializer(Normal(0.02), (1, config.num_patches + 1, d)), name="pos_embed")
        self.pos_drop = nn.Dropout(p=config.dropout)
        rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.CellList([Block(config, rate, fast) for rate in rates])
        self.norm = _layer_norm(config, fast)
        self.head_drop = nn.Dropout(p=config.dropout)
        # Zero head (as in big_vision): a fresh head starts from uniform predictions when fine-tuning.
        self.head = _dense(d, config.num_classes, fast=fast, weight_init=Zero())

    def embed(self, x):
        """Eq. 1: patch tokens, CLS token in front, position embedding added."""
        x = self.patch_embed(x)  # (B, N, D)
        cls = ops.broadcast_to(self.cls_token, (x.shape[0], -1, -1))  # (B, 1, D)
        x = ops.cat((cls, x), axis=1) + self.pos_embed  # (B, N + 1, D)
        return self.pos_drop(x)

    def forward_features(self, x):
        """Images (B, C, H, W) -> normed tokens (B, N + 1, D)."""
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # (4)

    def forward_head(self, x):
        """Normed tokens (B, N + 1, D) -> logits (B, num_classes), from the CLS token."""
        return self.head(self.head_drop(x[:, 0]))

    def construct(self, x):
        return self.forward_head(self.forward_features(x))


def create_model(name_or_config="vit_b_16", *, fast: bool = True, **overrides) -> ViT:
    """Build a ViT from a preset name or a `ViTConfig`; `overrides` are `ViTConfig` field names.

    Args:
        name_or_config: a key of `vit_ms.PRESETS` (e.g. "vit_b_16", "tutorial") or a `ViTConfig`.
        fast: the fast CPU computation (default) or the plain one; same parameters and logits.
        **overrides: field values replacing the preset's, e.g. `num_classes=10, image_size=64`.
    """
    return ViT(get_config(name_or_config, **overrides), fast=fast)


def set_dynamic_batch(net: nn.Cell, config: ViTConfig) -> nn.Cell:
    """Declare a dynamic batch dimension so graph mode compiles once for every batch size."""
    net.set_inputs(ms.Tensor(shape=[None, config.in_channels, config.image_size, config.image_size],
                             dtype=ms.float32))
    return net


__all__ = ["ViT", "PatchEmbed", "Attention", "GELU", "FeedForward", "DropPath", "Block", "create_model",
           "set_dynamic_batch"]
