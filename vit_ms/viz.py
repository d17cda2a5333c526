"""Pictures for people: annotated predictions, attention maps, training curves, confusion matrices.

Every picture but one is drawn with matplotlib's object-oriented API on its own `Figure` with an Agg
canvas, so importing this module never changes the pyplot backend of the program that imports it; the
`*_figure` functions return the `Figure` (titles and texts can be inspected) and the `save_*` / `plot_*`
functions write it. The one exception is the annotated prediction, drawn once per image by infer.py: it is
drawn with Pillow from a `PredictionLayout` (a tenth of the time, so the pictures keep up with the model).
Each file is written atomically (`vit_ms.files.atomic_path`).

The crop outline and the attention picture use the eval transform's geometry (`vit_ms.data.eval_transforms`:
short side resized to `preprocess.resize_size`, centre crop of `preprocess.image_size`), so they show
exactly the region the model saw. Nothing here is needed to train or infer.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .files import atomic_path

logger = logging.getLogger(__name__)

RIGHT_COLOUR, WRONG_COLOUR = "#1a7f37", "#c62828"  # green / red, readable on white
OTHER_COLOUR = "#4c72b0"  # the other guesses' bars
HEAT_CMAP = "inferno"  # perceptually uniform, dark = little attention, bright = much
DPI = 100


def load_matplotlib() -> None:
    """Import matplotlib's figure and Agg canvas now. Call it in the main thread before drawing in a
    thread pool: two threads importing matplotlib for the first time at once break its circular imports."""
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401


def _figure(width: float, height: float):
    """A Figure with a non-interactive Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, out_path) -> Path:
    """Write `figure` to `out_path` atomically; the format follows the suffix (.png, .jpg, ...).

    Written as RGB: matplotlib's PNG writer adds an alpha channel that an opaque figure does not use (a
    quarter of the file, and some viewers draw it on a checkerboard)."""
    from PIL import Image

    figure.canvas.draw()
    return save_image(Image.fromarray(np.asarray(figure.canvas.buffer_rgba())[..., :3]), out_path)


_PIL_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


# ---------------------------------------------------------------------------------------------------------
# The region the model sees
# ---------------------------------------------------------------------------------------------------------

def crop_box(size: Tuple[int, int], preprocess) -> Tuple[float, float, float, float]:
    """(left, top, right, bottom) in original-image pixels of the centre crop the eval transform takes.

    The same geometry as `vision.Resize(resize_size)` + `vision.CenterCrop(image_size)` (and as
    `vit_ms.export.preprocess_graph`): the long side becomes floor(long * resize / short), the crop starts
    at floor((side - crop) / 2) of the resized image; mapped back by the resize factor of each axis.

    Args:
        size: the image's (width, height), as PIL gives it.
        preprocess: the model's `Preprocess`.
    """
    width, height = size
    short = preprocess.resize_size
    if height <= width:
        resized_h, resized_w = short, int(width * short / height)
    else:
        resized_h, resized_w = int(height * short / width), short
    crop = preprocess.image_size
    top, left = (resized_h - crop) // 2, (resized_w - crop) // 2
    sy, sx = height / resized_h, width / resized_w
    return left * sx, top * sy, (left + crop) * sx, (top + crop) * sy


def model_view(image, preprocess):
    """The region of `image` the model sees after the eval transform (short-side resize, center crop)."""
    left, top, right, bottom = crop_box(image.size, preprocess)
    return image.crop((round(left), round(top), round(right), round(bottom)))


# ---------------------------------------------------------------------------------------------------------
# Annotated predictions
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PredictionLayout:
    """Where everything of an annotated prediction goes, in pixels of the picture (see `prediction_layout`)."""

    size: Tuple[int, int]  # (width, height) of the picture
    title: str
    title_colour: str
    photo: Tuple[int, int, int, int]  # (left, top, right, bottom) of the drawn photo
    crop: Tuple[float, float, float, float]  # the region the model saw, in picture pixels
    bars: Tuple[Tuple[str, float, str], ...]  # (class name, probability, colour), most likely first
    bars_left: int  # x where the bars start (class names end left of it)
    bars_top: int  # y of the first bar row
    row_height: int


# The picture is 640 px wide: title band, the photo (nothing covers it), the top-k bars below.
_PICTURE_WIDTH, _MARGIN, _TITLE_BAND, _GAP, _ROW = 640, 15, 45, 12, 30
_MAX_PHOTO_HEIGHT = 700  # very tall photos are shown narrower rather than taller
_MIN_PHOTO_WIDTH = 320
_DIM = [round(0.65 * v) for v in range(256)] * 3  # lookup table: what the model did not see, at 65 %


def prediction_layout(size: Tuple[int, int], preprocess, top: Sequence[Tuple[str, float]],
                      true_label: Optional[str] = None) -> PredictionLayout:
    """The layout of `save_prediction_picture` for an image of `size` (width, height): pure arithmetic, so
    tests can check it against the preprocessing without reading pixels."""
    width, height = size
    # At its own size where it fits (no resampling: sharper and cheaper), else scaled to fit; tiny images
    # are enlarged so the outline and its label stay legible.
    photo_w = min(_PICTURE_WIDTH - 2 * _MARGIN, max(width, _MIN_PHOTO_WIDTH))
    photo_h = round(photo_w * height / width)
    if photo_h > _MAX_PHOTO_HEIGHT:
        photo_h, photo_w = _MAX_PHOTO_HEIGHT, round(_MAX_PHOTO_HEIGHT * width / height)
    x0 = (_PICTURE_WIDTH - photo_w) // 2
    photo = (x0, _TITLE_BAND, x0 + photo_w, _TITLE_BAND + photo_h)
    left, upper, right, lower = crop_box(size, preprocess)
    sx, sy = photo_w / width, photo_h / height
    crop = (x0 + left * sx, _TITLE_BAND + upper * sy, x0 + right * sx, _TITLE_BAND + lower * sy)

    top = list(top)
    if not top:
        title, colour = "no prediction", "black"
    elif true_label is None:
        title, colour = f"predicted: {top[0][0]} ({100 * top[0][1]:.1f}%)", "black"
    elif top[0][0] == true_label:
        title, colour = f"\u2713 right: {top[0][0]} ({100 * top[0][1]:.1f}%)", RIGHT_COLOUR
    else:
        title, colour = (f"\u2717 wrong: predicted {top[0][0]} ({100 * top[0][1]:.1f}%), true {true_label}",
                         WRONG_COLOUR)
    # The true class green; a wrong first guess red; other guesses neutral blue.
    bars = tuple((name, float(p), RIGHT_COLOUR if name == true_label else
                  WRONG_COLOUR if i == 0 and true_label is not None else OTHER_COLOUR)
                 for i, (name, p) in enumerate(top))
    names_w = max((_text_width(name, _fonts(14)) for name, _, _ in bars), default=0)
    bars_left = _MARGIN + min(300, names_w + 12)
    bars_top = photo[3] + _GAP
    picture_h = bars_top + _ROW * max(len(bars), 1) + _MARGIN
    return PredictionLayout((_PICTURE_WIDTH, picture_h), title, colour, photo, crop, bars, bars_left, bars_top,
                            _ROW)


def render_prediction(image, layout: PredictionLayout):
    """The annotated picture (a PIL RGB image) of `image` drawn as `layout` says, with Pillow: a tenth of
    the time of the same picture as a matplotlib figure (measured: 12 vs 125 ms), so pictures keep up with
    the model."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = layout.photo
    if image.mode != "RGB":
        image = image.convert("RGB")
    # Bilinear where scaling is needed: a third of bicubic's time, for a factor near 1 (JPEGs are decoded
    # near the size shown, see vit_ms.evaluate.display_image).
    if image.size != (x1 - x0, y1 - y0):
        image = image.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR, reducing_gap=2.0)
    canvas.paste(image, (x0, y0))
    # Dim what the model did not see (to 65 %, by a lookup table), then outline the crop: two strokes,
    # dark under light, visible on any photo.
    crop = [round(c) for c in layout.crop]
    for box in ((x0, y0, x1, crop[1]), (x0, crop[3], x1, y1), (x0, crop[1], crop[0], crop[3]),
                (crop[2], crop[1], x1, crop[3])):
        if box[2] > box[0] and box[3] > box[1]:
            canvas.paste(canvas.crop(box).point(_DIM), box[:2])
    draw.rectangle([crop[0] - 1, crop[1] - 1, crop[2], crop[3]], outline="black", width=3)
    _dashed_rectangle(draw, crop, fill="white", width=1, dash=7, gap=4)
    label_font = _fonts(12)
    at = (crop[0] + 6, crop[1] + 6)
    box = draw.textbbox(at, "model's view", font=label_font)
    draw.rectangle([box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2], fill=(40, 40, 40))
    draw.text(at, "model's view", font=label_font, fill="white")

    title_font, title = _fit(layout.title, 18, layout.size[0] - 2 * _MARGIN, bold=True)
    draw.text((layout.size[0] / 2, 12), title, font=title_font, fill=layout.title_colour, anchor="ma")
    bar_w = layout.size[0] - _MARGIN - 55 - layout.bars_left
    name_font, value_font = _fonts(14), _fonts(12)
    for i, (name, probability, colour) in enumerate(layout.bars):
        middle = layout.bars_top + i * layout.row_height + layout.row_height / 2
        half = 0.36 * layout.row_height
        end = layout.bars_left + probability * bar_w
        draw.rectangle([layout.bars_left, middle - half, max(end, layout.bars_left + 1), middle + half], fill=colour)
        _, shown = _fit(name, 14, layout.bars_left - 8 - _MARGIN, shrink_to=14)
        draw.text((layout.bars_left - 8, middle), shown, font=name_font, fill="black", anchor="rm")
        draw.text((end + 5, middle), f"{100 * probability:.1f}%", font=value_font, fill="black", anchor="lm")
    if layout.bars:
        draw.line([layout.bars_left, layout.bars_top, layout.bars_left,
                   layout.bars_top + len(layout.bars) * layout.row_height], fill="black", width=1)
    return canvas


def _dashed_rectangle(draw, box, fill, width: int, dash: int, gap: int) -> None:
    left, top, right, bottom = box
    for (xa, ya), (xb, yb) in (((left, top), (right, top)), ((right, top), (right, bottom)),
                               ((right, bottom), (left, bottom)), ((left, bottom), (left, top))):
        length = abs(xb - xa) + abs(yb - ya)
        dx, dy = (xb - xa) / max(length, 1), (yb - ya) / max(length, 1)
        for start in range(0, int(length), dash + gap):
            stop = min(start + dash, length)
            draw.line([xa + dx * start, ya + dy * start, xa + dx * stop, ya + dy * stop], fill=fill, width=width)


_font_cache = threading.local()  # FreeType faces are not shared between the picture threads


def _fonts(size: int, bold: bool = False):
    """DejaVu Sans (shipped with matplotlib; it has the \u2713 and \u2717 marks) at `size` pixels, else Pillow's font."""
    from PIL import ImageFont

    cache = _font_cache.__dict__.setdefault("fonts", {})
    if (size, bold) not in cache:
        import matplotlib

        name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
        try:
            cache[size, bold] = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)
        except OSError:
            cache[size, bold] = _font(size)
    return cache[size, bold]


def _fit(text: str, size: int, max_width: float, bold: bool = False, shrink_to: int = 12):
    """(font, text) that fit in `max_width` pixels: the font shrunk down to `shrink_to`, then the text cut
    with an ellipsis."""
    for smaller in range(size, shrink_to - 1, -1):
        font = _fonts(smaller, bold)
        if _text_width(text, font) <= max_width:
            return font, text
    while len(text) > 1 and _text_width(text + "\u2026", font) > max_width:
        text = text[:-1]
    return font, text + "\u2026"


def _text_width(text: str, font) -> int:
    left, _, right, _ = font.getbbox(text)
    return right - left


def save_prediction_picture(image, preprocess, top: List[Tuple[str, float]], out_path,
                            true_label: Optional[str] = None) -> Path:
    """Save `image` with its top-k predictions as bars below it and the crop the model saw outlined.

    Args:
        image: the original PIL image (any mode).
        preprocess: the model's `Preprocess` (where the centre crop lies).
        top: (class name, probability) pairs, most likely first.
        out_path: file to write (.png, .jpg, ...).
        true_label: the image's class when known (e.g. its folder): the title then says right or wrong.

    Returns:
        `out_path`.
    """
    picture = render_prediction(image, prediction_layout(image.size, preprocess, top, true_label))
    # PNG level 1: half the time of the default level for a photo (48 vs 103 ms), 15 % larger.
    return save_image(picture, out_path, png_level=1)


def save_image(picture, out_path, png_level: int = 6) -> Path:
    """Write a PIL image to `out_path` atomically; the format follows the suffix (.png, .jpg, ...)."""
    out_path = Path(out_path)
    with atomic_path(out_path, suffix=out_path.suffix or ".png") as tmp:
        picture.save(tmp, format=_PIL_FORMATS.get(out_path.suffix.lower(), "PNG"), quality=90,
                     compress_level=png_level)
    return out_path


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable since Pillow 10.1
    except TypeError:
        return ImageFont.load_default()


def annotate_image(image, lines: Sequence[str], out_path, min_side: int = 320) -> Path:
    """Save `image` with `lines` of text drawn in a box at its top-left corner (Pillow only; the older,
    plainer picture; `save_prediction_picture` shows more).

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
    with atomic_path(out_path, suffix=out_path.suffix or ".png") as tmp:
        Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB").save(
            tmp, format=(out_path.suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG"))
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
    matrix = np.asarray(matrix)
    n = matrix.shape[0]
    rows = matrix.sum(axis=1, keepdims=True)
    fraction = np.divide(matrix, rows, out=np.zeros(matrix.shape, np.float64), where=rows > 0)
    side = float(np.clip(0.45 * n + 2.5, 5, 20))
    fig = _figure(side, side)
    ax = fig.add_subplot()
    image = ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 60:
        long_names = max((len(str(label)) for label in labels), default=0) > 6
        ax.set_xticks(range(n), labels, rotation=45 if long_names else 0, ha="right" if long_names else "center",
                      rotation_mode="anchor")
        ax.set_yticks(range(n), labels)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=11 if n <= 10 else 8,
                            color="white" if fraction[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or f"confusion matrix ({int(matrix.sum())} images)")
    fig.tight_layout()
    return save_figure(fig, out_png)


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


def _upsample(heat: np.ndarray, side: int) -> np.ndarray:
    """(grid, grid) -> (side, side) with bicubic interpolation between patch centres, clipped back to the
    map's range (bicubic overshoots a little near sharp peaks)."""
    from PIL import Image

    heat = np.asarray(heat, np.float32)
    smooth = np.asarray(Image.fromarray(heat).resize((side, side), Image.Resampling.BICUBIC))  # mode "F"
    return np.clip(smooth, float(heat.min()), float(heat.max()))


def attention_figure(image, preprocess, heat: np.ndarray, title: str, alpha: float = 0.55):
    """The figure of `save_attention_picture` (see there); axes gids "original", "overlay", "colorbar"."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    view = np.asarray(model_view(image.convert("RGB"), preprocess))
    heat = np.asarray(heat, np.float64)
    if heat.ndim != 2:
        raise ValueError(f"heat must be a (grid, grid) map, got shape {heat.shape}")
    vmax = float(heat.max()) if heat.max() > 0 else 1.0
    smooth = _upsample(heat / vmax, max(view.shape[0], 224))
    figure = _figure(9.0, 4.6)
    grid = figure.add_gridspec(1, 3, width_ratios=[1, 1, 0.05], wspace=0.06, left=0.02, right=0.92,
                               top=0.84, bottom=0.03)
    extent = (0, 1, 1, 0)  # both images on the same unit square, whatever their pixel sizes
    crop = preprocess.image_size
    original = figure.add_subplot(grid[0])
    original.set_gid("original")
    original.imshow(view, extent=extent, interpolation="antialiased")
    original.set_title(f"the crop the model saw (its {crop}\u00d7{crop} input)", fontsize=10)
    overlay = figure.add_subplot(grid[1])
    overlay.set_gid("overlay")
    overlay.imshow(view, extent=extent, interpolation="antialiased")
    overlay.imshow(smooth, extent=extent, cmap=HEAT_CMAP, vmin=0, vmax=1, alpha=alpha, interpolation="bilinear")
    overlay.set_title("attention rollout (CLS token)", fontsize=10)
    for ax in (original, overlay):
        ax.set_xticks([])
        ax.set_yticks([])
    bar_ax = figure.add_subplot(grid[2])
    bar_ax.set_gid("colorbar")
    figure.colorbar(ScalarMappable(Normalize(0, 1), cmap=HEAT_CMAP), cax=bar_ax,
                    label="share of attention (1 = the most attended patch)")
    figure.suptitle(title, fontsize=13, fontweight="bold")
    return figure


def save_attention_picture(image, preprocess, heat: np.ndarray, title: str, out_path) -> Path:
    """Save original | attention overlay side by side, on the exact crop the model saw.

    Args:
        image: the original PIL image.
        preprocess: the model's `Preprocess` (which crop the model saw).
        heat: (grid, grid) attention map, e.g. one entry of `rollout_map`; shown relative to its maximum,
            upsampled bicubically between patch centres, in a perceptually uniform colour map with a bar.
        title: e.g. "predicted: bees (87.1%)".
        out_path: file to write.

    Returns:
        `out_path`.
    """
    return save_figure(attention_figure(image, preprocess, heat, title), out_path)


def save_attention_overlay(image, heat: np.ndarray, preprocess, out_path, alpha: float = 0.5,
                           min_side: int = 320) -> Path:
    """The plain overlay of earlier versions (no title, no bar): the model's view with a (grid, grid) map in
    [0, 1] as a jet heat map. Kept for callers of the old name; `save_attention_picture` explains more.
    """
    import matplotlib
    from PIL import Image

    view = model_view(image.convert("RGB"), preprocess)
    side = max(view.width, min_side)
    view = view.resize((side, side), Image.Resampling.BICUBIC)
    colours = matplotlib.colormaps["jet"](np.clip(_upsample(heat, side), 0, 1))[..., :3]
    blended = (1 - alpha) * np.asarray(view, np.float64) / 255 + alpha * colours
    out_path = Path(out_path)
    with atomic_path(out_path, suffix=out_path.suffix or ".png") as tmp:
        Image.fromarray((blended * 255).round().astype(np.uint8)).save(tmp, format="PNG")
    return out_path


# ---------------------------------------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------------------------------------

def _read_records(metrics_jsonl) -> List[dict]:
    from .training.rundir import read_metrics

    records = read_metrics(metrics_jsonl)
    if not records:
        raise ValueError(f"{metrics_jsonl} holds no epochs to plot")
    return records


def curves_figure(records: Sequence[dict], num_classes: Optional[int] = None):
    """The figure of `plot_training_curves`; axes gids "loss", "accuracy", "lr"."""
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in records]
    top1 = [100 * r["top1"] for r in records]
    best = int(np.argmax(top1))  # the first epoch reaching the best top-1, as best.ckpt keeps it
    # Training's top-5 is top-min(5, C): for 5 classes or fewer it is always 100% and says nothing.
    show_top5 = all("top5" in r for r in records) and (
        num_classes > 5 if num_classes is not None else not all(r["top5"] == 1.0 for r in records))
    has_lr = all("lr" in r for r in records)
    figure = _figure(13.5 if has_lr else 9.5, 4.0)
    axes = figure.subplots(1, 3 if has_lr else 2)
    ax_loss, ax_acc = axes[0], axes[1]
    ax_loss.set_gid("loss")
    ax_acc.set_gid("accuracy")

    # Both are label-smoothed cross-entropy (eval.py reports the plain one); runs before the rename wrote
    # "loss" / "val_loss".
    train_key = "train_loss_smoothed" if "train_loss_smoothed" in records[0] else "loss"
    val_key = "val_loss_smoothed" if "val_loss_smoothed" in records[0] else "val_loss"
    ax_loss.plot(epochs, [r[train_key] for r in records], "o-", label="train loss (label-smoothed)", markersize=4)
    if all(val_key in r for r in records):
        ax_loss.plot(epochs, [r[val_key] for r in records], "s-", label="val loss (label-smoothed)", markersize=4)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()

    ax_acc.plot(epochs, top1, "o-", label="val top-1", markersize=4)
    if show_top5:
        ax_acc.plot(epochs, [100 * r["top5"] for r in records], "s-", label="val top-5", markersize=4)
    ax_acc.plot([epochs[best]], [top1[best]], marker="*", markersize=16, color="#d62728", linestyle="none",
                label=f"best: {top1[best]:.2f}% (epoch {epochs[best]})", gid="best_marker")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy", ylim=(0, 101))
    ax_acc.legend(loc="lower right")

    if has_lr:
        ax_lr = axes[2]
        ax_lr.set_gid("lr")
        ax_lr.plot(epochs, [r["lr"] for r in records], "o-", color="#8c564b", markersize=4)
        ax_lr.set(xlabel="epoch", ylabel="learning rate", title="learning rate (end of epoch)")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax_lr.set_ylim(bottom=0)
    for ax in axes:
        ax.axvline(epochs[best], color="#d62728", linestyle=":", linewidth=1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)  # one epoch: a tick at 1, not 0.96-1.04
        ax.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def plot_training_curves(metrics_jsonl, out_png, num_classes: Optional[int] = None) -> Path:
    """Draw loss, val top-1 (top-5 for more than 5 classes) and the learning rate per epoch, with the best
    epoch marked, from a training run's metrics.jsonl.

    Args:
        metrics_jsonl: the file `vit_ms.training` writes, one JSON object per epoch with at least epoch,
            train_loss_smoothed and top1 (val_loss_smoothed, top5 and lr drawn when present).
        out_png: the picture to write.
        num_classes: the model's classes; None: top-5 is drawn unless it is 100% at every epoch (what
            training's top-min(5, C) gives for 5 classes or fewer).

    Returns:
        The path written.
    """
    return save_figure(curves_figure(_read_records(metrics_jsonl), num_classes), out_png)
