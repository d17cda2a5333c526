"""The eval preprocessing as graph operations, so an exported MINDIR takes raw uint8 pixels.

`WithPreprocess(net, preprocess, input_size)` maps uint8 images (B, H, W, C) of one fixed size to logits
(C = `preprocess.channels`: 3 for an RGB model, 1 for a grayscale one, which takes grayscale pixels):
resize the short side to `preprocess.resize_size`, center-crop `preprocess.image_size`, normalise,
NHWC -> NCHW, then the ViT. Output size and crop offsets follow `vit_ms.data.eval_transforms` exactly
(measured on MindSpore 2.10's `vision.Resize` / `vision.CenterCrop`: the long side becomes
floor(long * resize / short) and the crop starts at floor((side - crop) / 2)).

What cannot match the dataset pipeline bit for bit: `vision.Resize` runs OpenCV's bilinear filter on uint8
(11-bit fixed-point weights, result rounded to uint8), the graph runs `ops.ResizeBilinearV2`
(half-pixel centers, float32, no rounding). Neither antialiases when shrinking, so they compute the same
formula; the rounding alone differs by up to 0.5 grey levels and the fixed-point weights add ~0.3
(measured: max 0.79 grey levels, 13% of pixels over 0.5, on random uint8 images; 0 when no resize is
needed). In normalised units that is 0.79 / (255 * std) <= 0.014. `reference_preprocess` is a NumPy
statement of what the graph computes; the graph matches it to float32 rounding.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from ..config import Preprocess


def resized_shape(height: int, width: int, short_side: int) -> Tuple[int, int]:
    """(H, W) after resizing the short side to `short_side` the way `vision.Resize(int)` does."""
    if height <= width:
        return short_side, int(width * short_side / height)  # truncation, as measured on vision.Resize
    return int(height * short_side / width), short_side


def crop_offsets(height: int, width: int, crop: int) -> Tuple[int, int]:
    """(top, left) of `vision.CenterCrop(crop)` on an (H, W) image (floor of the half margin)."""
    return (height - crop) // 2, (width - crop) // 2


def check_input_size(input_size: Sequence[int], preprocess: Preprocess) -> Tuple[int, int]:
    """The (H, W) pair, validated; raises ValueError naming the problem."""
    if len(input_size) != 2 or any(int(v) != v or v <= 0 for v in input_size):
        raise ValueError(f"input size must be two positive integers H W, got {list(input_size)}")
    if preprocess.interpolation != "bilinear":
        raise ValueError(f"the preprocessing graph implements bilinear resizing only; this model's "
                         f"Preprocess.interpolation is {preprocess.interpolation!r}")
    return int(input_size[0]), int(input_size[1])


class WithPreprocess(nn.Cell):
    """uint8 images (B, H, W, C) -> the net's logits, with the eval preprocessing inside the graph.

    Args:
        net: the ViT (plain path) taking normalised (B, C, S, S) float32, C = preprocess.channels.
        preprocess: the model's `Preprocess` (resize side, crop, mean, std).
        input_size: (H, W) of every input image; one graph serves one size.
    """

    def __init__(self, net: nn.Cell, preprocess: Preprocess, input_size: Sequence[int]):
        super().__init__()
        self.net = net
        self.input_size = check_input_size(input_size, preprocess)
        self.resized = resized_shape(*self.input_size, preprocess.resize_size)
        self.needs_resize = self.resized != self.input_size
        self.crop = preprocess.image_size
        self.top, self.left = crop_offsets(*self.resized, self.crop)
        # Normalize's [0, 255] units, shaped to broadcast over (B, C, S, S).
        self.mean = ms.Tensor(np.array([255 * m for m in preprocess.mean], np.float32).reshape(1, -1, 1, 1))
        self.std = ms.Tensor(np.array([255 * s for s in preprocess.std], np.float32).reshape(1, -1, 1, 1))
        self.resize = ops.ResizeBilinearV2(align_corners=False, half_pixel_centers=True)

    def construct(self, images):
        x = images.astype(ms.float32).transpose(0, 3, 1, 2)  # (B, H, W, C) uint8 -> (B, C, H, W) float32
        if self.needs_resize:
            x = self.resize(x, self.resized)  # -> (B, C, H', W'), short side resize_size
        x = x[:, :, self.top:self.top + self.crop, self.left:self.left + self.crop]  # -> (B, C, S, S)
        return self.net((x - self.mean) / self.std)


def _bilinear_axis(in_size: int, out_size: int):
    # Half-pixel centers: output pixel i samples the input at (i + 0.5) * in / out - 0.5, clamped to the
    # image (TensorFlow's and OpenCV's INTER_LINEAR convention). Positions in float32 as the kernel
    # computes them: in float64 they differ by up to ~2e-5 pixel, i.e. up to 255 * 2e-5 grey levels.
    scale = np.float32(in_size / out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.clip(src, 0, in_size - 1).astype(np.float64)
    low = np.floor(src).astype(np.int64)
    high = np.minimum(low + 1, in_size - 1)
    return low, high, src - low


def reference_preprocess(images: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    """NumPy (float64) statement of what `WithPreprocess` computes before the net: (B, H, W, C) uint8 ->
    (B, C, S, S) normalised."""
    x = np.asarray(images, np.float64)
    height, width = x.shape[1:3]
    out_h, out_w = resized_shape(height, width, preprocess.resize_size)
    if (out_h, out_w) != (height, width):
        low, high, frac = _bilinear_axis(height, out_h)
        x = x[:, low] * (1 - frac)[None, :, None, None] + x[:, high] * frac[None, :, None, None]
        low, high, frac = _bilinear_axis(width, out_w)
        x = x[:, :, low] * (1 - frac)[None, None, :, None] + x[:, :, high] * frac[None, None, :, None]
    top, left = crop_offsets(out_h, out_w, preprocess.image_size)
    s = preprocess.image_size
    x = x[:, top:top + s, left:left + s]
    x = (x - 255 * np.asarray(preprocess.mean)) / (255 * np.asarray(preprocess.std))
    return x.transpose(0, 3, 1, 2)


def pipeline_preprocess(images: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    """The Python pipeline (`vit_ms.data.eval_transforms` without decode) on each uint8 (H, W, C) image."""
    from ..data import eval_transforms

    out = []
    for image in images:
        # The pipeline starts from decoded RGB; a grayscale image is three equal channels, whose luma is
        # the grey value exactly (OpenCV's weights 4899 + 9617 + 1868 = 2^14).
        array = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
        for op in eval_transforms(preprocess, decode=False):
            array = op(array)
        out.append(np.asarray(array, np.float32))
    return np.stack(out)


def max_normalised_resize_gap(preprocess: Preprocess) -> float:
    """Largest |graph - pipeline| in normalised units from the resize filters (see the module docstring):
    one grey level (0.79 measured, rounded up) over the smallest std."""
    return 1.0 / (255 * min(preprocess.std))


__all__ = ["WithPreprocess", "resized_shape", "crop_offsets", "check_input_size", "reference_preprocess",
           "pipeline_preprocess", "max_normalised_resize_gap"]
