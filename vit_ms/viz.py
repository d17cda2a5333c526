"""Pictures for people: training curves, annotated predictions, confusion matrices, attention rollout.

Uses matplotlib's non-interactive Agg backend and Pillow; nothing here is needed to train or infer.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")  # headless: write files, never open windows

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Annotated predictions
# ---------------------------------------------------------------------------------------------------------

def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable since Pillow 10.1
    except TypeError:
        return ImageFont.load_default()


def annotate_image(image, lines: Sequence[str], out_path, min_side: int = 320) -> Path:
    """Save `image` with `lines` of text drawn in a box at its top-left corner (Pillow only).

    Args:
        image: a PIL image.
        lines: text lines, e.g. "236: Doberman 87.1%".
        out_path: where to write (format from the suffix, e.g. .png).
        min_side: small images are enlarged to this short side first so the text stays legible.
    """
    from PIL import Image, ImageDraw

    image = image.convert("RGB")
    scale = min_side / min(image.size)
    if scale > 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    font = _font(max(12, min(image.size) // 22))
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    pad = 4
    boxes = [draw.textbbox((0, 0), line, font=font) for line in lines]
    line_height = max((b[3] - b[1] for b in boxes), default=0) + pad
    width = max((b[2] - b[0] for b in boxes), default=0)
    draw.rectangle([0, 0, width + 2 * pad, line_height * len(lines) + pad], fill=(0, 0, 0, 160))
    for i, line in enumerate(lines):
        draw.text((pad, pad + i * line_height), line, font=font, fill=(255, 255, 255, 255))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB").save(out_path)
    return out_path


# ---------------------------------------------------------------------------------------------------------
# Confusion matrix
# ---------------------------------------------------------------------------------------------------------

def plot_confusion_matrix(matrix: np.ndarray, labels: Sequence[str], out_png, title: str = "") -> Path:
    """Save a confusion matrix (rows: true class, columns: predicted) as a PNG, colour = row fraction.

    Counts are written in the cells up to 30 classes and class names on the axes up to 60; larger
    matrices (ImageNet's 1000) are drawn as a plain image.

    Args:
        matrix: (C, C) counts.
        labels: class names.
        out_png: output file.
        title: figure title, e.g. the top-1 accuracy.
    """
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    n = matrix.shape[0]
    rows = matrix.sum(axis=1, keepdims=True)
    fraction = np.divide(matrix, rows, out=np.zeros(matrix.shape, np.float64), where=rows > 0)
    side = float(np.clip(0.45 * n + 2.5, 5, 20))
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 60:
        ax.set_xticks(range(n), labels, rotation=90)
        ax.set_yticks(range(n), labels)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if fraction[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or f"confusion matrix ({int(matrix.sum())} images)")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


# ---------------------------------------------------------------------------------------------------------
# Attention rollout
# ---------------------------------------------------------------------------------------------------------

def attention_rollout(net, images: np.ndarray) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020).

    Per block: average the heads, add the identity for the residual path, renormalise the rows; then
    multiply the blocks' matrices from the first to the last. Row 0 (the CLS token) of the result says how
    much of the classification token's information comes from each input token.

    Args:
        net: a `ViT`; its attention comes from `net.forward_intermediates`, in the current execution mode.
        images: preprocessed images (B, C, S, S) float32.

    Returns:
        (B, T, T) float64, every row summing to 1; with a class token, token 0 is the CLS token.
    """
    import mindspore as ms

    net.set_train(False)
    rollout = None
    for probs in net.forward_intermediates(ms.Tensor(images))["attention"]:  # (B, heads, T, T) per block
        a = probs.asnumpy().astype(np.float64).mean(axis=1)
        a += np.eye(a.shape[-1])  # the residual path
        a /= a.sum(axis=-1, keepdims=True)
        rollout = a if rollout is None else a @ rollout  # later blocks act on earlier blocks' mixing
    return rollout


def rollout_map(rollout: np.ndarray) -> np.ndarray:
    """The CLS row of `attention_rollout` over the patches, as (B, grid, grid) scaled to a maximum of 1."""
    cls = rollout[:, 0, 1:]  # (B, N)
    grid = int(round(np.sqrt(cls.shape[1])))
    if grid * grid != cls.shape[1]:
        raise ValueError(f"{cls.shape[1]} patch tokens do not form a square grid")
    cls = cls / np.maximum(cls.max(axis=1, keepdims=True), 1e-12)
    return cls.reshape(-1, grid, grid)


def model_view(image, preprocess):
    """The region of `image` the model sees after the eval transform (short-side resize, center crop)."""
    side = min(image.size) * preprocess.image_size / preprocess.resize_size
    left, top = (image.width - side) / 2, (image.height - side) / 2
    return image.crop((round(left), round(top), round(left + side), round(top + side)))


def save_attention_overlay(image, heat: np.ndarray, preprocess, out_path, alpha: float = 0.5,
                           min_side: int = 320) -> Path:
    """Save the model's view of `image` with a (grid, grid) map in [0, 1] overlaid as a colour heat map.

    Args:
        image: the original PIL image.
        heat: e.g. one entry of `rollout_map`.
        preprocess: the model's `Preprocess` (which part of the image it sees).
        out_path: PNG file to write.
        alpha: opacity of the heat map.
        min_side: small images are enlarged to this side first.
    """
    from PIL import Image

    view = model_view(image.convert("RGB"), preprocess)
    side = max(view.width, min_side)
    view = view.resize((side, side), Image.Resampling.BICUBIC)
    heat_image = Image.fromarray(np.asarray(heat, np.float32)).resize((side, side),  # float32: mode "F"
                                                                      Image.Resampling.BILINEAR)
    colours = matplotlib.colormaps["jet"](np.clip(np.asarray(heat_image), 0, 1))[..., :3]
    blended = (1 - alpha) * np.asarray(view, np.float64) / 255 + alpha * colours
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((blended * 255).round().astype(np.uint8)).save(out_path)
    return out_path


def plot_training_curves(metrics_jsonl, out_png):
    """Draw train/val loss and val top-1/top-5 per epoch from a training run's metrics.jsonl.

    Args:
        metrics_jsonl: the file `vit_ms.training` writes, one JSON object per epoch with at least
            epoch, loss, top1 and top5 (val_loss drawn when present).
        out_png: the picture to write (its folder must exist).

    Returns:
        The path written.
    """
    import json
    from pathlib import Path

    import matplotlib.pyplot as plt

    lines = Path(metrics_jsonl).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    if not records:
        raise ValueError(f"{metrics_jsonl} holds no epochs to plot")
    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["loss"] for r in records], "o-", label="train loss")
    if all("val_loss" in r for r in records):
        ax_loss.plot(epochs, [r["val_loss"] for r in records], "s-", label="val loss")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * r["top1"] for r in records], "o-", label="val top-1")
    ax_acc.plot(epochs, [100 * r["top5"] for r in records], "s-", label="val top-5")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy", ylim=(0, 100))
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    # Write beside the target and rename, so a reader never sees half a PNG.
    out_png = Path(out_png)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png
