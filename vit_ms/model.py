"""The Vision Transformer as MindSpore Cells (Dosovitskiy et al., ICLR 2021, Eq. 1-4).

    z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos             (1)  PatchEmbed, cls_token, pos_embed
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}                           (2)  Block: attention branch
    z_l = MLP(LN(z'_l)) + z'_l                                  (3)  Block: feed-forward branch
    y = LN(z_L^0)                                               (4)  norm, then head on the CLS token

With `ViTConfig.global_pool="avg"` the head reads the mean of the patch tokens, normalised by `fc_norm`
(the final `norm` is then the identity), and `class_token=False` drops x_class, as timm does.

Weight init (the paper's JAX scheme, as in big_vision): Dense kernels Xavier-uniform, biases zero
except the MLP's N(0, 1e-6); the patch-embedding conv LeCun-normal (fan-in); the position embedding
N(0, 0.02); the CLS token and the classifier head zero; LayerNorm ones/zeros. Each initializer is
declared where its layer is built; inside `vit_ms.layers.weights_to_be_loaded()` the random ones are zeros
(a checkpoint is about to overwrite them).

The layers come from `vit_ms.layers`, which decides once per network (`use_fused_kernels`) whether they
compute on fused CPU kernels or on MindSpore's built-in ops: same parameters, same checkpoints, logits
within float32 rounding. `fast=False` forces the plain ops (exportable to MINDIR and ONNX).

The model knows nothing of checkpoints, data or training: see `vit_ms.checkpoint` for weights.
"""
from __future__ import annotations

from typing import Optional

import mindspore as ms
from mindspore import nn, ops, Parameter
from mindspore.common.initializer import Normal, Zero, initializer

from .config import ViTConfig, get_config
from .layers import (GELU, AttentionCore, DropPath, PatchProjection, encoder_block, initial, layer_norm, linear,
                     linear_gelu, use_fused_kernels)


class PatchEmbed(nn.Cell):
    """Split the image into patches and project each to `embed_dim` (a stride-p convolution)."""

    def __init__(self, config: ViTConfig, fused: bool = False):
        super().__init__()
        self.proj = PatchProjection(config.in_channels, config.embed_dim, config.patch_size, fused=fused)

    def construct(self, x):
        return self.proj(x)  # (B, C, H, W) -> (B, N, D)


class Attention(nn.Cell):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, config: ViTConfig, fused: bool = False):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = linear(config.embed_dim, 3 * config.embed_dim, fused=fused)
        self.core = AttentionCore(config.head_dim, fused=fused, dropout=config.attention_dropout)
        self.attn_drop = nn.Dropout(p=config.attention_dropout)
        self.proj = linear(config.embed_dim, config.embed_dim, fused=fused)

    def heads(self, x):
        """Tokens (B, N, D) -> the qkv projection viewed per head: (B, N, 3, heads, head_dim)."""
        return self.qkv(x).reshape(-1, x.shape[1], 3, self.num_heads, self.head_dim)

    def forward_with_probs(self, x):
        """Tokens (B, N, D) -> (output (B, N, D), attention probabilities (B, heads, N, N))."""
        _, n, d = x.shape
        qkv = self.heads(x)
        probs = self.core.probs(qkv)  # (B, heads, N, N)
        x = self.core.values(self.attn_drop(probs), qkv)  # (B, N, heads, head_dim)
        return self.proj(x.reshape(-1, n, d)), probs  # heads concatenated, then projected

    def construct(self, x):
        if not self.core.one_kernel():
            return self.forward_with_probs(x)[0]
        # The same math in one kernel (and one for the backward) that never writes (B, heads, N, N).
        _, n, d = x.shape
        return self.proj(self.core.attend(self.heads(x)).reshape(-1, n, d))


class FeedForward(nn.Cell):
    """The MLP of each block: Dense, GELU, dropout, Dense, dropout."""

    def __init__(self, config: ViTConfig, fused: bool = False):
        super().__init__()
        self.fc1 = linear(config.embed_dim, config.mlp_dim, bias_std=1e-6, fused=fused)
        self.act = GELU(config.gelu_approximate, fused=fused)
        self.fc2 = linear(config.mlp_dim, config.embed_dim, bias_std=1e-6, fused=fused)
        # One Dropout per call site: one random op called twice in a graph draws the same mask twice.
        self.drop1 = nn.Dropout(p=config.dropout)
        self.drop2 = nn.Dropout(p=config.dropout)
        self.fc1_act = linear_gelu(config.gelu_approximate, fused=fused)  # fc1 and GELU in one kernel, eval only

    def construct(self, x):
        if self.fc1_act is not None and not self.training:  # dropout is the identity in eval
            return self.fc2(self.fc1_act(x, self.fc1.weight, self.fc1.bias))
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Cell):
    """One pre-norm encoder block, Eq. 2 and 3; `index`, its place in the encoder, numbers its random streams."""

    def __init__(self, config: ViTConfig, drop_path: float = 0.0, fused: bool = False, index: int = 0):
        super().__init__()
        self.norm1 = layer_norm(config.embed_dim, config.norm_eps, fused=fused)
        self.attn = Attention(config, fused)
        self.norm2 = layer_norm(config.embed_dim, config.norm_eps, fused=fused)
        self.mlp = FeedForward(config, fused)
        # Each branch drops on its own (as timm's drop_path1/drop_path2), from its own random stream.
        self.drop_path1 = DropPath(drop_path, stream=2 * index)
        self.drop_path2 = DropPath(drop_path, stream=2 * index + 1)
        self.one_kernel = encoder_block(config, fused=fused)  # the whole block in one kernel, eval only
        self.packed = False  # weights packed for inference (vit_ms.packing): only the one kernel reads them

    def forward_with_probs(self, x):
        """Tokens (B, N, D) -> (tokens (B, N, D), this block's attention probabilities): `construct` with
        the probabilities formed and returned, which the one-kernel attention never forms."""
        if self.packed:
            raise ValueError("attention maps need the block's separate ops, which cannot read weights packed for "
                             "inference (vit_ms.packing): load the model without packing")
        attended, probs = self.attn.forward_with_probs(self.norm1(x))
        x = x + self.drop_path1(attended)  # (2)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))  # (3)
        return x, probs

    def construct(self, x):
        if self.one_kernel is not None and (self.packed or not self.training):  # Eq. 2 and 3, drop_path the identity
            attn, mlp = self.attn, self.mlp
            return self.one_kernel(x, self.norm1.gamma, self.norm1.beta, attn.qkv.weight, attn.qkv.bias,
                                   attn.proj.weight, attn.proj.bias, self.norm2.gamma, self.norm2.beta,
                                   mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
        x = x + self.drop_path1(self.attn(self.norm1(x)))  # (2)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))  # (3)
        return x


class ViT(nn.Cell):
    """Vision Transformer classifier: `ViT(config)(images) -> logits`, images (B, C, H, W) float32.

    Args:
        config: the architecture.
        fast: None (default) lets `vit_ms.layers.use_fused_kernels` decide (fused CPU kernels on a
            float32 CPU network); True asks for them; False forces MindSpore's plain ops, e.g. the
            `Conv2d` patch embedding, for export.
    """

    def __init__(self, config: ViTConfig, fast: Optional[bool] = None):
        super().__init__()
        self.config = config
        fused = self.fast = use_fused_kernels(fast, log=True)  # decided once per network, logged
        d = config.embed_dim
        self.num_prefix_tokens = 1 if config.class_token else 0
        self.patch_embed = PatchEmbed(config, fused)
        if config.class_token:
            self.cls_token = Parameter(initializer(Zero(), (1, 1, d)), name="cls_token")
        num_tokens = config.num_patches + self.num_prefix_tokens
        self.pos_embed = Parameter(initializer(initial(Normal(0.02)), (1, num_tokens, d)), name="pos_embed")
        self.pos_drop = nn.Dropout(p=config.dropout)
        rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.CellList([Block(config, rate, fused, i) for i, rate in enumerate(rates)])
        # timm: with average pooling the final norm moves after the pooling (fc_norm).
        avg = config.global_pool == "avg"
        self.norm = nn.Identity() if avg else layer_norm(d, config.norm_eps, fused=fused)
        self.fc_norm = layer_norm(d, config.norm_eps, fused=fused) if avg else nn.Identity()
        self.head_drop = nn.Dropout(p=config.dropout)
        # Zero head (as in big_vision): a fresh head starts from uniform predictions when fine-tuning.
        self.head = linear(d, config.num_classes, fused=fused, weight_init=Zero())
        self._intermediates = None  # built by the first forward_intermediates

    def embed(self, x):
        """Eq. 1: patch tokens, CLS token in front (if the config has one), position embedding added."""
        x = self.patch_embed(x)  # (B, N, D)
        if self.num_prefix_tokens:
            cls = ops.broadcast_to(self.cls_token, (x.shape[0], -1, -1))  # (B, 1, D)
            x = ops.cat((cls, x), axis=1)  # (B, 1 + N, D)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x):
        """Images (B, C, H, W) -> tokens (B, T, D), T = N (+ 1 with a class token); normed by (4)
        unless global_pool="avg", which normalises after pooling."""
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # (4)

    def pool(self, x):
        """Tokens (B, T, D) -> one vector per image (B, D): the CLS token, or the mean of the patch tokens."""
        if self.config.global_pool == "avg":
            return self.fc_norm(x[:, self.num_prefix_tokens:].mean(axis=1))
        return x[:, 0]

    def forward_head(self, x):
        """Tokens from `forward_features` (B, T, D) -> logits (B, num_classes)."""
        return self.head(self.head_drop(self.pool(x)))

    def construct(self, x):
        return self.forward_head(self.forward_features(x))

    @property
    def compile_phase(self):
        return self._compile_phase

    @compile_phase.setter
    def compile_phase(self, value):
        # MindSpore hands the called graph's phase to every Cell of the network at every graph call, even a
        # compiled one; Cell's setter walks all of them in Python (177 in ViT-Ti, 0.8 ms per call: 3 % of a
        # batch-1 inference step on 2 cores). The Cells below already hold the phase this one last passed
        # down, so only a new phase (a new graph: other shapes, train/eval) is walked down again.
        if value != self._compile_phase:
            nn.Cell.compile_phase.fset(self, value)

    def forward_intermediates(self, x) -> dict:
        """Everything a probe or a picture needs from one forward pass (in the train/eval mode set).

        Returns a dict of Tensors: "embed" (B, T, D) after Eq. 1; "tokens", one (B, T, D) per block;
        "attention", one (B, heads, T, T) per block (softmax probabilities); "features" (B, T, D) as
        `forward_features`; "pre_logits" (B, D); "logits" (B, num_classes). Runs in the current execution
        mode: one compiled graph in graph mode.
        """
        if self._intermediates is None:
            # Not a child Cell (that would put the network inside itself): a plain attribute.
            object.__setattr__(self, "_intermediates", _Intermediates(self))
        self._intermediates.set_train(self.training)
        embed, tokens, attention, features, pre_logits, logits = self._intermediates(x)
        return {"embed": embed, "tokens": list(tokens), "attention": list(attention), "features": features,
                "pre_logits": pre_logits, "logits": logits}

    def intermediates_tuple(self, x):
        """`forward_intermediates` as a tuple, traceable in graph mode."""
        x = self.embed(x)
        embed, tokens, attention = x, (), ()
        for block in self.blocks:
            x, probs = block.forward_with_probs(x)
            tokens += (x,)
            attention += (probs,)
        features = self.norm(x)
        pre_logits = self.pool(features)
        return embed, tokens, attention, features, pre_logits, self.head(self.head_drop(pre_logits))


class _Intermediates(nn.Cell):
    """`ViT.intermediates_tuple` as one Cell, so that graph mode compiles the pass as one graph instead of
    a graph per sub-Cell called from Python (MindSpore keys those by object id, which Python reuses)."""

    def __init__(self, net: ViT):
        super().__init__(auto_prefix=False)  # the parameters keep the network's names
        self.net = net

    def construct(self, x):
        return self.net.intermediates_tuple(x)


def create_model(name_or_config="vit_b_16", *, fast: Optional[bool] = None, **overrides) -> ViT:
    """Build a ViT from a preset name or a `ViTConfig`; `overrides` are `ViTConfig` field names.

    Args:
        name_or_config: a key of `vit_ms.PRESETS` (e.g. "vit_b_16", "tutorial") or a `ViTConfig`.
        fast: None: `vit_ms.layers.use_fused_kernels` decides; True/False force the fused CPU kernels or
            the plain ops (same parameters and, within float32 rounding, the same logits).
        **overrides: field values replacing the preset's, e.g. `num_classes=10, image_size=64`.
    """
    return ViT(get_config(name_or_config, **overrides), fast=fast)


def set_dynamic_batch(net: nn.Cell, config: ViTConfig, labels: bool = False) -> nn.Cell:
    """Declare a dynamic batch dimension so graph mode compiles once for every batch size.

    Args:
        net: a Cell taking images (B, C, H, W) float32, e.g. a `ViT`; with `labels`, a Cell taking
            (images, labels (B,) int32), e.g. `nn.WithEvalCell` or a `TrainOneStepCell`.
        config: the model's config (channels and image size).
        labels: declare the second, label input too.
    """
    images = ms.Tensor(shape=[None, config.in_channels, config.image_size, config.image_size], dtype=ms.float32)
    if labels:
        net.set_inputs(images, ms.Tensor(shape=[None], dtype=ms.int32))
    else:
        net.set_inputs(images)
    return net


__all__ = ["ViT", "PatchEmbed", "Attention", "FeedForward", "Block", "create_model", "set_dynamic_batch",
           "GELU", "DropPath"]
