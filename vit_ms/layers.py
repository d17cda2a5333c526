"""The building blocks of the ViT (`vit_ms.model`), and the one decision of how they compute.

Linear, LayerNorm, GELU, DropPath, the attention core (scores, softmax, values) and the patch projection,
each in two forms with the same parameters and math: the plain MindSpore op (`nn.Dense`, `nn.LayerNorm`,
a strided `nn.Conv2d`, ...), which runs on every device and exports to MINDIR and ONNX, and a fused form
on the CPU kernels of `vit_ms.ops` (the CPU backend's MatMul, Conv2d, LayerNormGrad, Transpose and
softmax backward are slow or hold memory; see `vit_ms.ops`). Checkpoints are the same for both.

`use_fused_kernels` is the one place that chooses (as timm's `use_fused_attn()`): the model calls it
once per network build, logs the decision, and hands each layer a plain `fused` bool. Fused kernels
are CPU code for float32 graphs, so the answer is False on any other device target, under AMP or for
another dtype, and when the environment says so:

    VIT_MS_FUSED_KERNELS=0   plain MindSpore ops everywhere (1, the default: fused where the policy allows)
    VIT_MS_KERNEL_ISA=...    which compiled variant the fused layers use (see `vit_ms.ops`)

A fused layer whose kernel cannot be built (no compiler) computes that step with the built-in op. For eval
a fused network also runs each whole encoder block as one kernel (`EncoderBlockKernel`), on those layers'
parameters.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from statistics import NormalDist
from typing import Optional

import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import Normal, TruncatedNormal, XavierUniform, Zero

from .threads import late_import_hint

logger = logging.getLogger(__name__)

FUSED_ENV = "VIT_MS_FUSED_KERNELS"

_INIT_SKIPPED = False  # True inside `weights_to_be_loaded()`


@contextlib.contextmanager
def weights_to_be_loaded():
    """Inside, layers draw no random initial weights: every parameter that would be random starts at zero.

    For a network whose every parameter a checkpoint overwrites right after it is built
    (`vit_ms.checkpoint.load_model`, which loads strictly), as eval.py and infer.py do at every start:
    drawing ViT-B/16's 86 M random numbers took ~1.0 s of its ~1.6 s build (AMD EPYC, 2 cores).
    """
    global _INIT_SKIPPED
    previous, _INIT_SKIPPED = _INIT_SKIPPED, True
    try:
        yield
    finally:
        _INIT_SKIPPED = previous


def initial(init):
    """A layer's initializer `init`, or zeros inside `weights_to_be_loaded()`."""
    return Zero() if _INIT_SKIPPED else init


def _env_allows_fused() -> bool:
    value = os.environ.get(FUSED_ENV, "1").strip().lower()
    if value in ("0", "false", "off", "no"):
        return False
    if value in ("1", "true", "on", "yes", ""):
        return True
    raise ValueError(f"{FUSED_ENV}={value!r}: use 1 (fused CPU kernels where possible) or 0 (plain ops)")


def _device_target() -> str:
    return ms.get_context("device_target")


def use_fused_kernels(requested: Optional[bool] = None, *, device_target: Optional[str] = None,
                      amp_level: str = "O0", dtype=ms.float32, log: bool = False) -> bool:
    """Whether a network built now computes on the fused CPU kernels.

    `ViT` calls this once per build with `log=True` (one INFO line with the reason). A caller that knows
    more, e.g. training under AMP, asks it first and passes the answer: `ViT(config,
    fast=use_fused_kernels(device_target=..., amp_level=...))`.

    Args:
        requested: None lets this function decide; False forces the plain ops; True asks for the fused
            kernels, still refused where they cannot run (another device, $VIT_MS_FUSED_KERNELS=0).
        device_target: "CPU", "GPU", "Ascend"; default: the current MindSpore context's.
        amp_level: the mixed-precision level training will apply ("O0" = none).
        dtype: the parameters' dtype.
        log: log the decision (INFO) and a refused request (WARNING).
    """
    device_target = device_target or _device_target()
    if not _env_allows_fused():
        fused, why = False, f"{FUSED_ENV}=0"
    elif device_target != "CPU":
        fused, why = False, f"device target {device_target} (the fused kernels are CPU code)"
    elif requested is not None:
        fused, why = bool(requested), f"fast={requested} requested"
    elif amp_level != "O0" or dtype != ms.float32:
        fused, why = False, f"AMP level {amp_level}, dtype {dtype} (the fused kernels are float32)"
    else:
        fused, why = True, "CPU, float32"
    if not log:
        return fused
    if requested and not fused:
        logger.warning("fast=True ignored: %s", why)
    logger.info("vit_ms layers: %s (%s)", "fused CPU kernels" if fused else "plain MindSpore ops", why)
    hint = late_import_hint() if fused else ""
    if hint:
        logger.info(hint)
    return fused


def _ops():
    from . import ops as kernels  # imported on the first fused layer: building is never an import's effect

    return kernels


class FusedLinear(nn.Dense):
    """`nn.Dense` (same parameters) on fused CPU kernels: the whole layer on oneDNN's sgemm where the
    MindSpore wheel ships oneDNN (`linear`), else MindSpore's MatMul with the bias added by a kernel whose
    backward sums the bias gradient in one pass (MindSpore's CPU BiasAddGrad took 12 % of a ViT-S step)."""

    def __init__(self, *args, linear=None, add_bias=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.linear = linear
        self.add_bias = add_bias

    def construct(self, x):
        if self.linear is not None:
            return self.linear(x, self.weight, self.bias)  # (..., in) -> (..., out), no reshape nodes
        # nn.Dense's own 2-D MatMul(transpose_b): its backward needs no Transpose ops, unlike ops.dense's.
        y = self.add_bias(self.matmul(x.reshape(-1, self.in_channels), self.weight), self.bias)
        return y.reshape(x.shape[:-1] + (self.out_channels,))


def linear(in_dim: int, out_dim: int, *, fused: bool, bias_std: float = 0.0, weight_init=None) -> nn.Dense:
    """A Dense layer (`nn.Dense`, or `FusedLinear` where fused kernels build); Xavier-uniform weight (the
    paper's JAX init) unless given, bias N(0, bias_std) or zeros."""
    bias_init = initial(Normal(bias_std) if bias_std else Zero())
    weight_init = initial(XavierUniform() if weight_init is None else weight_init)
    kernel = _ops().linear() if fused else None
    add_bias = _ops().add_bias() if fused and kernel is None else None
    if kernel is None and add_bias is None:
        return nn.Dense(in_dim, out_dim, weight_init=weight_init, bias_init=bias_init)
    return FusedLinear(in_dim, out_dim, weight_init=weight_init, bias_init=bias_init, linear=kernel,
                       add_bias=add_bias)


class FusedLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` over the last axis (same gamma, beta) on the fused CPU kernel: MindSpore's CPU
    LayerNormGrad took 23 % of a ViT-S training step."""

    def __init__(self, normalized_shape, epsilon, kernel):
        super().__init__(normalized_shape, epsilon=epsilon)
        self.kernel = kernel
        self.eps = ms.Tensor([epsilon], ms.float32)

    def construct(self, x):
        return self.kernel(x, self.gamma, self.beta, self.eps)


def layer_norm(dim: int, eps: float, *, fused: bool) -> nn.LayerNorm:
    """LayerNorm over the last axis (gamma ones, beta zeros): `nn.LayerNorm`, or `FusedLayerNorm` where
    the fused kernel builds."""
    kernel = _ops().layer_norm() if fused else None
    return nn.LayerNorm((dim,), epsilon=eps) if kernel is None else FusedLayerNorm((dim,), eps, kernel)


class GELU(nn.Cell):
    """GELU, exact (erf) or tanh."""

    def __init__(self, approximate: bool, *, fused: bool):
        super().__init__()
        self.approximate = "tanh" if approximate else "none"
        self.kernel = _ops().gelu(approximate) if fused else None

    def construct(self, x):
        if self.kernel is None:
            return ops.gelu(x, approximate=self.approximate)
        return self.kernel(x)


def linear_gelu(approximate: bool, *, fused: bool):
    """The one-kernel GELU(x w^T + b) that eval uses for a Dense layer followed by GELU, `op(x, w, b)`, or
    None (not fused, or the kernel cannot build): the hidden activations then exist once, not twice."""
    return _ops().linear_gelu(approximate) if fused else None


class EncoderBlockKernel(nn.Cell):
    """A whole pre-norm encoder block (Eq. 2 and 3, drop-path the identity) in one fused kernel, for eval:
    `vit_ms.ops.encoder_block`. It holds no parameters; the block passes its own."""

    def __init__(self, config, kernel, packed: bool = False):
        super().__init__()
        self.kernel = kernel
        # What the kernel reads at run time; the same values its backward was built with (ops.encoder_block),
        # and with packed weights (vit_ms.packing) a fourth, 1.
        settings = [config.num_heads, config.norm_eps, config.head_dim ** -0.5] + ([1.0] if packed else [])
        self.settings = ms.Tensor(settings, ms.float32)

    def construct(self, x, ln1_gamma, ln1_beta, qkv_w, qkv_b, proj_w, proj_b, ln2_gamma, ln2_beta, fc1_w, fc1_b,
                  fc2_w, fc2_b):
        return self.kernel(x, ln1_gamma, ln1_beta, qkv_w, qkv_b, proj_w, proj_b, ln2_gamma, ln2_beta, fc1_w, fc1_b,
                           fc2_w, fc2_b, self.settings)


def encoder_block(config, *, fused: bool, packed: bool = False) -> Optional[EncoderBlockKernel]:
    """The one-kernel encoder block that eval runs, or None (not fused, or the kernel cannot build); with
    `packed`, on weights packed for inference (vit_ms.packing)."""
    kernel = (_ops().encoder_block(config.num_heads, config.norm_eps, config.gelu_approximate, packed=packed)
              if fused else None)
    return None if kernel is None else EncoderBlockKernel(config, kernel, packed)


class DropPath(nn.Cell):
    """Stochastic depth: drop a sample's whole residual branch with probability p while training.

    Args:
        p: the probability of dropping a sample's branch; its survivors are scaled by 1 / (1 - p).
        stream: which random stream this layer draws from, distinct for every DropPath of a model.

    On CPU the masks follow `ms.set_seed`: the same seed gives the same masks, step by step, in every run
    (seeds `(global seed, stream + 1)`, a new draw at every step); without a global seed, a fresh seed per
    process. Two layers never share a stream, and one layer is called at one place only: MindSpore
    compiles each call of one random primitive in a graph into its own kernel, seeded alike, so a DropPath
    called twice would drop both of a block's branches together in graph mode (and not in PyNative).
    """

    def __init__(self, p: float = 0.0, stream: int = 0):
        super().__init__()
        self.p = p
        self.stream = stream
        self.normal = self.dropout = None
        if p > 0.0:
            self.reseed(ms.get_seed())

    def reseed(self, seed: Optional[int]) -> None:
        """Draw the masks from the streams of `seed` (None: a fresh seed per process) from now on.

        Takes effect for graphs compiled afterwards. Training calls it on each data-parallel rank with that
        rank's seed (`vit_ms.training.distributed.seed_rank_streams`), so that the ranks drop different
        samples' branches.
        """
        if self.p == 0.0:
            return
        seeds = () if seed is None else (seed, self.stream + 1)
        if _device_target() == "CPU":
            # keep = z < Phi^-1(1 - p), z ~ N(0, 1): P(keep) = 1 - p. Not nn.Dropout: MindSpore 2.10's CPU
            # Dropout kernel draws from one generator shared by the threads of a parallel launch whose split
            # it tunes by timing (ParallelLaunchAutoSearch), so its masks changed from run to run with the
            # same seed (dropout_cpu_kernel.cc). StandardNormal seeds each 128-value block of a launch from
            # (seed, seed2, launch count) (random_cpu_kernel.cc): the same values every run, checked by
            # tests/test_model.py across processes. ops.bernoulli takes a fresh seed per process (or, seeded,
            # returns the same mask at every step); UniformReal (ops.rand) is deprecated in 2.10.
            self.normal = ops.StandardNormal(*seeds)
            self.threshold = NormalDist().inv_cdf(1.0 - self.p)
            self.scale = 1.0 / (1.0 - self.p)
        else:
            # Ascend and GPU keep the Dropout primitive they always ran (nn.Dropout's; StandardNormal ignores
            # its seeds on Ascend, says its docstring), seeded here rather than from the global op-seed
            # counter; untested here, where no such device is. It scales its survivors by 1 / (1 - p).
            self.dropout = ops.Dropout(1.0 - self.p, *seeds)

    def construct(self, x):
        if not self.training or self.p == 0.0:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # (B, 1, ..., 1)
        if self.dropout is not None:
            return x * self.dropout(ops.ones(shape, x.dtype))[0]  # (output, mask)
        keep = self.normal((x.shape[0],)) < self.threshold  # (B,), each True with probability 1 - p
        return x * (keep.astype(x.dtype) * self.scale).reshape(shape)


class AttentionCore(nn.Cell):
    """softmax(q k^T / sqrt(d_h)) v from the qkv projection's output viewed as (B, N, 3, heads, head_dim).

    The fused form reads q, k and v where the projection wrote them: no head split, no transposes
    (MindSpore's CPU Transpose holds an offset table of 2x the tensor for the graph's lifetime). It computes
    the whole core in one kernel (`attend`), forward and backward, unless the probabilities themselves are
    needed: `probs` for attention maps, or attention dropout while training, which applies between the
    softmax and the values.
    """

    def __init__(self, head_dim: int, *, fused: bool, dropout: float = 0.0):
        super().__init__()
        self.scale = head_dim ** -0.5
        self.dropout = dropout
        kernels = _ops().attention() if fused else None
        self.scores_kernel, self.values_kernel = kernels or (None, None)
        self.softmax_kernel = _ops().softmax() if fused else None
        self.kernel = _ops().fused_attention() if fused else None
        self.scale_tensor = ms.Tensor([self.scale], ms.float32)

    def one_kernel(self) -> bool:
        """Whether `attend` may run: the fused kernel, in eval mode, or in training without attention
        dropout (the kernel has no dropout inside)."""
        return self.kernel is not None and (not self.training or self.dropout == 0.0)

    def attend(self, qkv):
        """softmax(q k^T / sqrt(d_h)) v in one kernel, heads merged: (B, N, heads, head_dim)."""
        return self.kernel(qkv, self.scale_tensor)

    def probs(self, qkv):
        """softmax over the keys of q k^T / sqrt(d_h): (B, heads, N, N)."""
        if self.scores_kernel is not None:
            scores = self.scores_kernel(qkv, self.scale_tensor)
        else:
            q = qkv[:, :, 0].transpose(0, 2, 1, 3)  # (B, heads, N, head_dim)
            k = qkv[:, :, 1].transpose(0, 2, 3, 1)  # (B, heads, head_dim, N)
            scores = ops.matmul(q * self.scale, k)
        return ops.softmax(scores, axis=-1) if self.softmax_kernel is None else self.softmax_kernel(scores)

    def values(self, probs, qkv):
        """probs v with the heads merged again: (B, N, heads, head_dim)."""
        if self.values_kernel is not None:
            return self.values_kernel(probs, qkv)
        v = qkv[:, :, 2].transpose(0, 2, 1, 3)  # (B, heads, N, head_dim)
        return ops.matmul(probs, v).swapaxes(1, 2)


class PatchProjection(nn.Conv2d):
    """Images (B, C, H, W) -> patch tokens (B, N, D): a p x p convolution with stride p (LeCun-normal
    weight, zero bias), parameters `weight` (D, C, p, p) and `bias` (D,) as `nn.Conv2d`'s.

    The fused form computes the same convolution as one matrix product on the flattened patches:
    MindSpore's CPU Conv2d is ~100x slower than its MatMul. On other devices the convolution is the fast op.
    """

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, *, fused: bool):
        fan_in = in_channels * patch_size ** 2
        # LeCun normal, truncated at 2 sigma; 0.8796 undoes the variance lost to truncation (as in JAX).
        sigma = math.sqrt(1.0 / fan_in) / 0.87962566103423978
        weight_init = initial(TruncatedNormal(sigma, a=-2 * sigma, b=2 * sigma))
        super().__init__(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, pad_mode="valid",
                         has_bias=True, weight_init=weight_init, bias_init=Zero())
        self.fused = fused
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.patchify = _ops().patchify() if fused else None
        self.linear = _ops().linear() if fused else None
        self.add_bias = _ops().add_bias() if fused and self.linear is None else None
        self.matmul = ops.MatMul(transpose_b=True)  # not ops.dense, whose backward adds Transposes

    def construct(self, x):
        if not self.fused:
            x = self.bias_add(self.conv2d(x, self.weight), self.bias)  # (B, D, H/p, W/p), as nn.Conv2d
            return x.flatten(start_dim=2).swapaxes(1, 2)  # -> (B, D, N) -> (B, N, D)
        _, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(-1, c, h // p, p, w // p, p)
        # -> (B, H/p, W/p, C, p, p); the kernel is the same permutation without Transpose's offset table.
        x = x.transpose(0, 2, 4, 1, 3, 5) if self.patchify is None else self.patchify(x)
        x = x.reshape(-1, c * p * p)  # -> (B N, C p p), each row one patch in the weight's (C, p, p) order
        weight = self.weight.reshape(self.embed_dim, -1)  # (D, C p p)
        if self.linear is not None:
            x = self.linear(x, weight, self.bias)  # -> (B N, D)
        else:
            x = self.matmul(x, weight)
            x = x + self.bias if self.add_bias is None else self.add_bias(x, self.bias)
        return x.reshape(-1, (h // p) * (w // p), self.embed_dim)  # -> (B, N, D)


__all__ = ["FUSED_ENV", "use_fused_kernels", "linear", "FusedLinear", "layer_norm", "FusedLayerNorm", "GELU",
           "linear_gelu", "DropPath", "AttentionCore", "PatchProjection"]
