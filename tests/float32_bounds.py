"""Float32 rounding bounds for comparing a ViT's outputs with a float64 reference: shared by the model
and fast-path tests, so every tolerance there comes from one stated analysis instead of a constant.

u = 2^-24 is float32's unit roundoff. A float32 sum of K products, in any order or blocking (what differs
between MindSpore's MatMul, oneDNN's sgemm and the AVX-512/AVX2/baseline kernels), is within
gamma_K * sum |a_i b_i| of the exact sum, gamma_K = K u / (1 - K u) (Higham, "Accuracy and Stability of
Numerical Algorithms", 2nd ed., Eq. 3.5). Through a network, first order, the errors of the successive
sums add up: a value computed after a chain of sums of lengths K_1, K_2, ... is within
gamma_(K_1 + K_2 + ...) of the magnitude of its terms, provided no step amplifies relative errors.
That proviso holds for weights at their initialisation scale (each layer keeps its input's scale,
LayerNorm renormalises, softmax scores stay O(1)); it fails for weights so large that the softmax
saturates, where float32 rounding of a score is amplified by exp: tests use init-scale weights.
"""
import numpy as np

U = 2.0 ** -24


def gamma(k: int) -> float:
    """Higham's gamma_k: the relative bound on k successive float32 roundings."""
    return k * U / (1 - k * U)


def chain_length(config, blocks=None) -> int:
    """Length of the longest chain of float32 sums from the image to the logits (or to the input of
    block `blocks`): patch projection C p^2, per block qkv D, scores head_dim, values T, proj D, fc1 D,
    fc2 mlp_dim, then the head D."""
    tokens = config.num_patches + (1 if config.class_token else 0)
    block = 3 * config.embed_dim + config.head_dim + tokens + config.mlp_dim
    patch = config.in_channels * config.patch_size ** 2
    if blocks is not None:
        return patch + blocks * block
    return patch + config.depth * block + config.embed_dim


def init_scale_weights(net, rng) -> None:
    """Random weights at initialisation scale (zero-initialised CLS token and head would hide mistakes):
    matrices N(0, 1/fan_in) (LeCun), LayerNorm gamma 1 + N(0, 0.1^2), biases and beta N(0, 0.1^2),
    CLS token and position embedding N(0, 0.5^2) so that they matter."""
    for p in net.get_parameters():
        name = p.name
        if name.endswith("gamma"):
            value = 1 + 0.1 * rng.standard_normal(p.shape)
        elif name.endswith(("beta", "bias")):
            value = 0.1 * rng.standard_normal(p.shape)
        elif name in ("cls_token", "pos_embed"):
            value = 0.5 * rng.standard_normal(p.shape)
        else:
            value = rng.standard_normal(p.shape) / np.sqrt(np.prod(p.shape[1:]))
        p.set_data(type(p.data)(value.astype(np.float32)))


def logits_bound(config, pre_logits, head_weight, head_bias):
    """Elementwise bound on |logits - exact|: the head's terms |f| |W|^T + |b| (f the pooled features,
    unit-scale after LayerNorm), times gamma of the whole chain, whose errors reach f relative to f's
    scale. Each row's largest |f| stands for that scale, so a small f_j is not credited a small error."""
    f = np.abs(np.asarray(pre_logits, np.float64))
    f = f + f.max(axis=-1, keepdims=True)
    return gamma(chain_length(config)) * (f @ np.abs(head_weight.astype(np.float64)).T + np.abs(head_bias))


def probs_bound(config, block, qkv, probs):
    """Elementwise bound on |attention probabilities - exact| in block `block` (0-based).

    Args:
        qkv: that block's qkv projection output (B, T, 3, heads, head_dim), for magnitudes.
        probs: reference probabilities (B, heads, T, T).

    A score s_j = q.k / sqrt(d_h) sums head_dim products of q and k, which carry the chain's error up to
    the qkv projection, relative to their magnitudes: |ds_j| <= gamma(2 K_qk + head_dim) |q|.|k| / sqrt(d_h).
    Softmax p_j = exp(s_j) / sum_k exp(s_k) turns that into |dp_j| <= p_j (|ds_j| + max_k |ds_k|), and adds
    its own rounding: x_j - max (u |s_j - max|), exp (2 u), the sum of T terms and the division.
    """
    qkv = np.asarray(qkv, np.float64)
    q = qkv[:, :, 0].transpose(0, 2, 1, 3)  # (B, heads, T, head_dim)
    k = qkv[:, :, 1].transpose(0, 2, 1, 3)
    scale = config.head_dim ** -0.5
    scores = q @ k.transpose(0, 1, 3, 2) * scale
    magnitude = np.abs(q) @ np.abs(k).transpose(0, 1, 3, 2) * scale
    k_qk = chain_length(config, block) + config.embed_dim
    ds = gamma(2 * k_qk + config.head_dim) * magnitude
    tokens = probs.shape[-1]
    own = U * np.abs(scores - scores.max(axis=-1, keepdims=True)) + gamma(tokens + 4)
    return probs * (ds + ds.max(axis=-1, keepdims=True) + own) + 1e-37


def gradient_bound(config, rows, reference_grad):
    """Bound on |gradient - exact| for one parameter tensor: the backward pass runs the forward chain
    back (chain_length) and a weight's gradient sums over the `rows` = batch x tokens rows; the terms are
    of the size of the tensor's largest gradient (the loss is a batch mean), hence
    gamma(chain + rows) * max |g|."""
    return gamma(chain_length(config) + rows) * np.abs(reference_grad).max()


def assert_within(actual, expected, bound, what=""):
    """Every |actual - expected| <= bound (broadcast), else say where and by how much."""
    excess = np.abs(np.asarray(actual, np.float64) - expected) - bound
    excess = np.broadcast_to(excess, np.broadcast_shapes(excess.shape, np.shape(actual)))
    assert (excess <= 0).all(), (f"{what}: error exceeds its float32 bound by up to {excess.max():.3g} at "
                                 f"{np.unravel_index(excess.argmax(), excess.shape)}")
