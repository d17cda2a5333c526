"""eval.py --report: one self-contained HTML page that says what a classifier gets wrong, and how sure it was.

The numbers are pure NumPy functions of the confusion matrix and the per-image probabilities, so tests
check them against hand computations: per-class precision / recall / F1 / support, the most-confused
class pairs, the most confidently wrong images, and calibration. Calibration follows Guo et al., "On
Calibration of Modern Neural Networks" (ICML 2017): the confidence of an image is its top softmax
probability, images are put in M equal-width bins of confidence, bin b holding (b/M, (b+1)/M] (bin 0
also holds 0), and the expected calibration error is ECE = sum_b |B_b| / N * |accuracy(B_b) -
confidence(B_b)|; the reliability diagram draws accuracy against confidence per bin.

`render_html` puts it together; every picture (confusion matrix, reliability diagram, the mistakes with
their attention rollout from `vit_ms.viz`) is embedded as a data: URI, so the page opens offline and can
be mailed as one file.
"""
from __future__ import annotations

import base64
import html
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

ECE_BINS = 15  # Guo et al. 2017 use 15 bins


# ---------------------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------------------

@dataclass
class ClassMetrics:
    """Per-class scores from a confusion matrix (rows: true class, columns: predicted class).

    precision is NaN for a class never predicted, recall for a class with no images, F1 where either is.
    """

    precision: np.ndarray  # (C,) true positives / images predicted as the class
    recall: np.ndarray  # (C,) true positives / images of the class
    f1: np.ndarray  # (C,) harmonic mean of precision and recall (0 when both are 0)
    support: np.ndarray  # (C,) int, images of the class

    def macro(self) -> Tuple[float, float, float]:
        """Unweighted means of precision, recall and F1 over the classes where each is defined."""
        def mean(x):
            return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")

        return mean(self.precision), mean(self.recall), mean(self.f1)


def per_class_metrics(confusion: np.ndarray) -> ClassMetrics:
    """Precision, recall, F1 and support of every class of a (C, C) confusion matrix."""
    confusion = np.asarray(confusion, np.float64)
    tp = np.diag(confusion)
    predicted, support = confusion.sum(axis=0), confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, np.nan)
        recall = np.where(support > 0, tp / support, np.nan)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    f1 = np.where(np.isnan(precision) | np.isnan(recall), np.nan, f1)
    return ClassMetrics(precision, recall, f1, support.astype(np.int64))


def most_confused_pairs(confusion: np.ndarray, n: int = 10) -> List[Tuple[int, int, int]]:
    """The n largest off-diagonal cells as (true class, predicted class, count), largest first
    (ties: lower true class, then lower predicted class); cells with count 0 are left out."""
    confusion = np.asarray(confusion)
    pairs = [(int(confusion[i, j]), i, j) for i, j in zip(*np.nonzero(confusion)) if i != j]
    pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [(i, j, count) for count, i, j in pairs[:n]]


def confident_mistakes(probabilities: np.ndarray, targets: np.ndarray, n: int = 8) -> List[int]:
    """Rows of the n wrong predictions with the highest top probability, most confident first."""
    probabilities, targets = np.asarray(probabilities), np.asarray(targets)
    predicted = probabilities.argmax(axis=1)
    wrong = np.nonzero(predicted != targets)[0]
    confidence = probabilities[wrong, predicted[wrong]]
    return [int(i) for i in wrong[np.argsort(-confidence, kind="stable")][:n]]


@dataclass
class Calibration:
    """Confidence-binned accuracy (see the module docstring for the binning)."""

    ece: float  # expected calibration error, in [0, 1]
    edges: np.ndarray  # (M + 1,) bin edges 0, 1/M, ..., 1
    counts: np.ndarray  # (M,) images per bin
    accuracy: np.ndarray  # (M,) fraction right per bin (NaN where empty)
    confidence: np.ndarray  # (M,) mean confidence per bin (NaN where empty)


def calibration(probabilities: np.ndarray, targets: np.ndarray, n_bins: int = ECE_BINS) -> Calibration:
    """Expected calibration error and reliability bins of top-1 predictions.

    Args:
        probabilities: (N, C) softmax outputs.
        targets: (N,) true classes.
        n_bins: M, the number of equal-width confidence bins.
    """
    probabilities, targets = np.asarray(probabilities, np.float64), np.asarray(targets)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == targets).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left": a confidence equal to an edge e_b falls in the bin that ends at e_b, i.e. (e_b-1, e_b].
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(bins, weights=correct, minlength=n_bins) / counts
        mean_confidence = np.bincount(bins, weights=confidence, minlength=n_bins) / counts
    gaps = np.where(counts > 0, np.abs(accuracy - mean_confidence), 0.0)
    ece = float((counts / counts.sum() * gaps).sum())
    return Calibration(ece, edges, counts, accuracy, mean_confidence)


# ---------------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------------

def data_uri(payload: bytes, mime: str = "image/png") -> str:
    """`payload` as a data: URI, for embedding in the page."""
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def reliability_diagram(cal: Calibration) -> bytes:
    """PNG bytes: accuracy per confidence bin against the diagonal of perfect calibration, with counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = np.diff(cal.edges)
    centres = cal.edges[:-1] + width / 2
    filled = cal.counts > 0
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(centres[filled], cal.accuracy[filled], width=width[filled], edgecolor="black", color="#4C72B0",
           label="accuracy in bin")
    ax.bar(centres[filled], (cal.confidence - cal.accuracy)[filled], bottom=cal.accuracy[filled],
           width=width[filled], color="#DD8452", alpha=0.5, hatch="//", edgecolor="#DD8452",
           label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"reliability diagram: ECE {100 * cal.ece:.2f}% ({len(cal.counts)} equal-width bins)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax_n.bar(centres, cal.counts, width=width, color="#888888", edgecolor="black")
    ax_n.set(xlabel="confidence (top softmax probability)", ylabel="images")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _jpeg_bytes(image, max_side: int) -> bytes:
    # JPEG: photos and heat maps over photos; a page of 8 mistakes stays well under a megabyte.
    from PIL import Image

    image = image.convert("RGB")
    scale = max_side / max(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=88)
    return buffer.getvalue()


@dataclass
class Mistake:
    """One confidently wrong image, ready for the page."""

    path: str
    true_label: str
    predicted: str
    probability: float  # of the predicted class
    true_probability: float  # of the true class
    thumbnail_jpeg: bytes
    attention_jpeg: Optional[bytes]  # None when the model hides its attention (MINDIR)


def mistake_pictures(classifier, result, rows: Sequence[int], thumb_side: int = 200) -> List[Mistake]:
    """Thumbnails and attention-rollout pictures (`vit_ms.viz`) of the given rows of an `EvalResult`."""
    from . import data, viz
    from .evaluate import display_image

    if not rows:
        return []
    probabilities = result.probabilities
    arrays = np.stack([data.preprocess_image(data.load_image(result.paths[i]), classifier.preprocess)
                       for i in rows])
    heats = None
    if hasattr(classifier.net, "blocks"):  # a ViT; an exported MINDIR hides the attention
        heats = viz.rollout_map(viz.attention_rollout(classifier.net, arrays))
    mistakes = []
    with tempfile.TemporaryDirectory(prefix="vit_ms-report-") as tmp:
        for k, i in enumerate(rows):
            predicted = int(probabilities[i].argmax())
            target = int(result.targets[i])
            image = display_image(result.paths[i])
            attention = None
            if heats is not None:
                title = f"{result.labels[predicted]} {100 * probabilities[i, predicted]:.1f}% " \
                        f"(true: {result.labels[target]})"
                out = viz.save_attention_picture(image, classifier.preprocess, heats[k], title,
                                                 Path(tmp) / f"{k}_attention.png")
                from PIL import Image

                with Image.open(out) as picture:
                    attention = _jpeg_bytes(picture, 480)
            mistakes.append(Mistake(path=result.paths[i], true_label=result.labels[target],
                                    predicted=result.labels[predicted],
                                    probability=float(probabilities[i, predicted]),
                                    true_probability=float(probabilities[i, target]),
                                    thumbnail_jpeg=_jpeg_bytes(image, thumb_side), attention_jpeg=attention))
    return mistakes


# ---------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
.meta { color: #555; font-size: 0.9em; }
.cards { display: flex; flex-wrap: wrap; gap: 1em; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 1em; min-width: 9em; background: #fafafa; }
.card .v { font-size: 1.6em; font-weight: 600; } .card .k { color: #555; font-size: 0.85em; }
table { border-collapse: collapse; font-size: 0.9em; } th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; }
th { background: #f0f0f0; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.low td { background: #fff1f0; }
.grid { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.mistake { border: 1px solid #ddd; border-radius: 6px; padding: 0.5em; width: 500px; }
.mistake .pics { display: flex; gap: 0.5em; align-items: flex-start; }
.mistake .pics img { height: 200px; width: auto; max-width: 300px; object-fit: contain; }
.mistake .cap { font-size: 0.85em; color: #333; margin-top: 0.3em; word-break: break-all; }
.note { color: #555; font-size: 0.85em; }
img { max-width: 100%; height: auto; }
"""


def _pct(x: Optional[float]) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{100 * x:.2f}%"


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _cards(result, metrics: ClassMetrics, cal: Calibration) -> str:
    macro_p, macro_r, macro_f1 = metrics.macro()
    items = [("top-1 accuracy", _pct(result.top_1))]
    if result.top_5 is not None:
        items.append(("top-5 accuracy", _pct(result.top_5)))
    items += [("cross-entropy", f"{result.cross_entropy:.4f}"), ("macro F1", _pct(macro_f1)),
              ("macro precision", _pct(macro_p)), ("macro recall", _pct(macro_r)),
              (f"ECE ({len(cal.counts)} bins)", _pct(cal.ece)), ("images", f"{result.num_images}")]
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{_esc(v)}</div><div class="k">{_esc(k)}</div></div>' for k, v in items
    ) + "</div>"


def _class_table(labels: Sequence[str], metrics: ClassMetrics, max_rows: int = 40) -> str:
    rows = list(range(len(labels)))
    note = ""
    if len(rows) > max_rows:  # ImageNet: the classes that need attention, not a 1000-row table
        order = np.argsort(np.nan_to_num(metrics.f1, nan=-1.0), kind="stable")
        rows = [int(i) for i in order[:max_rows]]
        note = (f'<p class="note">{len(labels)} classes: the {max_rows} with the lowest F1 are shown; '
                f"metrics.json lists every class.</p>")
    macro_f1 = metrics.macro()[2]
    body = "".join(
        f'<tr class="{"low" if np.isfinite(metrics.f1[i]) and metrics.f1[i] < macro_f1 else ""}">'
        f"<td class=n>{i}</td><td>{_esc(labels[i])}</td><td class=n>{_pct(metrics.precision[i])}</td>"
        f"<td class=n>{_pct(metrics.recall[i])}</td><td class=n>{_pct(metrics.f1[i])}</td>"
        f"<td class=n>{int(metrics.support[i])}</td></tr>" for i in rows)
    return (note + "<table><tr><th>#</th><th>class</th><th>precision</th><th>recall</th><th>F1</th>"
            f"<th>support</th></tr>{body}</table>"
            '<p class="note">Precision: right among the images predicted as the class; recall: right among the '
            "images of the class; F1: their harmonic mean; support: images of the class. Shaded: F1 below the "
            "macro average. – : undefined (class never predicted, or no images).</p>")


def _pairs_table(labels: Sequence[str], confusion: np.ndarray, pairs) -> str:
    if not pairs:
        return "<p>No image was confused: every prediction is right.</p>"
    support = np.asarray(confusion).sum(axis=1)
    body = "".join(f"<tr><td>{_esc(labels[i])}</td><td>{_esc(labels[j])}</td><td class=n>{count}</td>"
                   f"<td class=n>{_pct(count / support[i])}</td></tr>" for i, j, count in pairs)
    return ("<table><tr><th>true class</th><th>predicted as</th><th>images</th><th>share of the true class</th>"
            f"</tr>{body}</table>")


def _mistakes_grid(mistakes: Sequence[Mistake]) -> str:
    if not mistakes:
        return "<p>No wrong predictions.</p>"
    cells = []
    for m in mistakes:
        pics = f'<img alt="{_esc(Path(m.path).name)}" src="{data_uri(m.thumbnail_jpeg, "image/jpeg")}">'
        if m.attention_jpeg is not None:
            pics += (f'<img alt="attention rollout of {_esc(Path(m.path).name)}" '
                     f'src="{data_uri(m.attention_jpeg, "image/jpeg")}">')
        cells.append(f'<div class="mistake"><div class="pics">{pics}</div><div class="cap">'
                     f"true <b>{_esc(m.true_label)}</b> ({_pct(m.true_probability)}), predicted "
                     f"<b>{_esc(m.predicted)}</b> ({_pct(m.probability)})<br>{_esc(m.path)}</div></div>")
    return ('<div class="grid">' + "".join(cells) + "</div>"
            '<p class="note">Attention rollout (Abnar &amp; Zuidema, 2020): how much of the class token\'s '
            "information comes from each patch, over the centre crop the model saw.</p>")


def _calibration_table(cal: Calibration) -> str:
    rows = "".join(f"<tr><td>({cal.edges[b]:.3f}, {cal.edges[b + 1]:.3f}]</td><td class=n>{cal.counts[b]}</td>"
                   f"<td class=n>{_pct(cal.confidence[b])}</td><td class=n>{_pct(cal.accuracy[b])}</td></tr>"
                   for b in range(len(cal.counts)) if cal.counts[b])
    return ("<table><tr><th>confidence bin</th><th>images</th><th>mean confidence</th><th>accuracy</th></tr>"
            f"{rows}</table>")


def render_html(result, *, title: str, meta: Sequence[Tuple[str, str]] = (), confusion_png: bytes = b"",
                mistakes: Sequence[Mistake] = (), n_pairs: int = 10, n_bins: int = ECE_BINS) -> str:
    """The report page for an `EvalResult` (which must carry its logits and targets).

    Args:
        result: from `vit_ms.evaluate.evaluate_folder`.
        title: the page's heading.
        meta: (name, value) lines shown under the heading (model file, data folder, split...).
        confusion_png: the confusion-matrix picture (e.g. from `vit_ms.viz.plot_confusion_matrix`).
        mistakes: from `mistake_pictures`.
        n_pairs: how many most-confused pairs to list.
        n_bins: calibration bins.
    """
    metrics = per_class_metrics(result.confusion_matrix)
    cal = calibration(result.probabilities, result.targets, n_bins)
    pairs = most_confused_pairs(result.confusion_matrix, n_pairs)
    meta_html = "<br>".join(f"{_esc(k)}: {_esc(v)}" for k, v in meta)
    skipped = ""
    if result.skipped:
        items = "".join(f"<li>{_esc(p)}: {_esc(r)}</li>" for p, r in result.skipped[:50])
        skipped = f"<h2>Unreadable files left out ({len(result.skipped)})</h2><ul>{items}</ul>"
    confusion = (f'<img alt="confusion matrix" src="{data_uri(confusion_png)}" style="max-width:800px">'
                 if confusion_png else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style></head>
<body>
<h1>{_esc(title)}</h1><p class="meta">{meta_html}</p>
{_cards(result, metrics, cal)}
<h2>Per class</h2>{_class_table(result.labels, metrics)}
<h2>Confusion matrix</h2><p class="note">Rows: true class; columns: predicted class; colour: share of the
true class.</p>{confusion}
<h2>Most-confused pairs</h2>{_pairs_table(result.labels, result.confusion_matrix, pairs)}
<h2>Most confidently wrong</h2>{_mistakes_grid(mistakes)}
<h2>Calibration</h2>
<p>Expected calibration error <b>{_pct(cal.ece)}</b>: confidence is the top softmax probability; images are
put in {len(cal.counts)} equal-width bins (b/{len(cal.counts)}, (b+1)/{len(cal.counts)}], and ECE is the
image-weighted mean of |accuracy &minus; mean confidence| over the bins (Guo et al., ICML 2017). A bar below
the diagonal: over-confident.</p>
<div class="grid"><img alt="reliability diagram" src="{data_uri(reliability_diagram(cal))}">
{_calibration_table(cal)}</div>
{skipped}
</body></html>
"""


def write_report(path, classifier, result, *, meta: Sequence[Tuple[str, str]] = (), title: str = "",
                 confusion_png=None, n_mistakes: int = 8) -> Path:
    """Write report.html for an evaluation (atomically, see `vit_ms.files`).

    Args:
        path: the HTML file.
        classifier: the evaluated `Classifier` (its net draws the attention rollout).
        result: from `evaluate_folder` (with paths, logits and targets).
        meta: (name, value) lines for the heading.
        title: the heading; default "Evaluation report".
        confusion_png: a confusion-matrix picture file to embed; drawn here when None.
        n_mistakes: how many confidently wrong images to show.
    """
    from . import viz
    from .files import write_text_atomic

    if confusion_png is None:
        with tempfile.TemporaryDirectory(prefix="vit_ms-report-") as tmp:
            png = viz.plot_confusion_matrix(result.confusion_matrix, result.labels, Path(tmp) / "confusion.png")
            payload = Path(png).read_bytes()
    else:
        payload = Path(confusion_png).read_bytes()
    rows = confident_mistakes(result.probabilities, result.targets, n_mistakes)
    page = render_html(result, title=title or "Evaluation report", meta=meta, confusion_png=payload,
                       mistakes=mistake_pictures(classifier, result, rows))
    return write_text_atomic(path, page)


__all__ = ["ECE_BINS", "ClassMetrics", "per_class_metrics", "most_confused_pairs", "confident_mistakes",
           "Calibration", "calibration", "data_uri", "reliability_diagram", "Mistake", "mistake_pictures",
           "render_html", "write_report"]
