"""Position-embedding resampling: a learned (1, prefix + gh * gw, D) embedding moved to another patch grid.

The paper's "fine-tuning at higher resolution" (Sec. 3.2): the 2-D interpolation of the pre-trained
position embeddings according to their location in the original image.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np


def _linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D linear interpolation with half-pixel centres (align_corners=False)."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    matrix = np.zeros((n_out, n_in))
    np.add.at(matrix, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(matrix, (np.arange(n_out), hi), frac)
    return matrix


def _as_grid(grid) -> Tuple[int, int]:
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def resample_pos_embed(pos_embed: np.ndarray, new_grid, old_grid=None, num_prefix_tokens: int = 1) -> np.ndarray:
    """Resample a learned position embedding to another patch grid ("high-res fine-tuning", paper 3.2).

    The CLS row is kept as is; the patch rows are laid out on their 2-D grid and resized with bilinear
    interpolation, half-pixel centres, no antialiasing: the same numbers as PyTorch's
    `F.interpolate(mode="bilinear", align_corners=False)` (timm defaults to bicubic, big_vision to
    `scipy.ndimage.zoom(order=1)`; all three agree closely).

    Args:
        pos_embed: (1, num_prefix_tokens + gh * gw, D).
        new_grid: the target grid, an int (square) or (rows, cols).
        old_grid: the source grid; default: the square root of the patch-token count.
        num_prefix_tokens: leading non-patch tokens (1: the CLS token).
    """
    pos_embed = np.asarray(pos_embed)
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, tokens, D), got {pos_embed.shape}")
    n = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        if math.isqrt(n) ** 2 != n:
            raise ValueError(f"{n} patch tokens do not form a square grid; pass old_grid=(rows, cols)")
        old_grid = math.isqrt(n)
    (gh, gw), (nh, nw) = _as_grid(old_grid), _as_grid(new_grid)
    if gh * gw != n:
        raise ValueError(f"old_grid {gh}x{gw} does not hold the {n} patch tokens of pos_embed")
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[0, num_prefix_tokens:]
    grid = grid.reshape(gh, gw, -1).astype(np.float64)
    # Bilinear = linear along rows, then along columns.
    grid = np.einsum("ih,hwd,jw->ijd", _linear_resize_matrix(gh, nh), grid, _linear_resize_matrix(gw, nw))
    grid = grid.reshape(1, nh * nw, -1).astype(pos_embed.dtype)
    return np.concatenate([prefix, grid], axis=1)


__all__ = ["resample_pos_embed"]
