"""eval.py --report: the report's numbers equal hand computations from known logits, and the page is one
self-contained HTML file that parses and embeds every picture it references."""
import base64
import io
import json
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from tiny_classifier import CLASS_NAMES, random_image, run_cli, write_checkpoint
from vit_ms.evaluate import EvalResult, softmax
from vit_ms.report import (calibration, confident_mistakes, most_confused_pairs, per_class_metrics,
                           render_html)

# 3 classes, 8 images. Row i: logits, true class. Worked out by hand below.
PROBS = np.array([
    [0.70, 0.20, 0.10],  # true 0, predicted 0, confidence 0.70
    [0.10, 0.85, 0.05],  # true 0, predicted 1, confidence 0.85  (wrong, most confident)
    [0.30, 0.50, 0.20],  # true 0, predicted 1, confidence 0.50  (wrong)
    [0.05, 0.90, 0.05],  # true 1, predicted 1, confidence 0.90
    [0.40, 0.35, 0.25],  # true 1, predicted 0, confidence 0.40  (wrong)
    [0.10, 0.10, 0.80],  # true 2, predicted 2, confidence 0.80
    [0.20, 0.20, 0.60],  # true 2, predicted 2, confidence 0.60
    [0.05, 0.05, 0.90],  # true 2, predicted 2, confidence 0.90
])
LOGITS = np.log(PROBS)
TARGETS = np.array([0, 0, 0, 1, 1, 2, 2, 2])


def test_precision_recall_f1_support_by_hand():
    result = EvalResult.from_logits(LOGITS, TARGETS, ["a", "b", "c"])
    # Confusion (rows true, columns predicted): [[1, 2, 0], [1, 1, 0], [0, 0, 3]].
    np.testing.assert_array_equal(result.confusion_matrix, [[1, 2, 0], [1, 1, 0], [0, 0, 3]])
    m = per_class_metrics(result.confusion_matrix)
    # class a: predicted twice (rows 0, 4), right once -> P 1/2; 3 images, 1 right -> R 1/3; F1 2PR/(P+R) = 2/5.
    # class b: predicted 3 times, right once -> P 1/3; 2 images -> R 1/2; F1 = (1/3)/(5/6) = 2/5.
    # class c: P 3/3, R 3/3, F1 1.
    np.testing.assert_allclose(m.precision, [1 / 2, 1 / 3, 1], rtol=1e-15)
    np.testing.assert_allclose(m.recall, [1 / 3, 1 / 2, 1], rtol=1e-15)
    np.testing.assert_allclose(m.f1, [2 / 5, 2 / 5, 1], rtol=1e-15)
    np.testing.assert_array_equal(m.support, [3, 2, 3])
    np.testing.assert_allclose(m.macro(), [(1 / 2 + 1 / 3 + 1) / 3, (1 / 3 + 1 / 2 + 1) / 3, (2 / 5 + 2 / 5 + 1) / 3])
    assert result.top_1 == 5 / 8 and result.top_5 is None  # top-5 only for more than 5 classes


def test_undefined_precision_and_recall_are_nan_not_zero():
    m = per_class_metrics(np.array([[2, 0, 0], [1, 0, 0], [0, 0, 0]]))  # class 1 never predicted, class 2 absent
    assert m.precision[0] == 2 / 3 and np.isnan(m.precision[1]) and np.isnan(m.precision[2])
    assert m.recall[0] == 1 and m.recall[1] == 0 and np.isnan(m.recall[2])
    assert m.f1[0] == pytest.approx(0.8, abs=1e-15) and np.isnan(m.f1[1]) and np.isnan(m.f1[2])


def test_ece_with_five_equal_width_bins_by_hand():
    # The probabilities themselves, not softmax(log(p)): 0.40 and 0.80 must stay exactly on the bin edges.
    cal = calibration(PROBS, TARGETS, n_bins=5)
    # Bins (0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1]; 0.40 and 0.80 sit on edges: they go to the bin they end.
    # (.2, .4]: {0.40 wrong}                      acc 0,   conf 0.40
    # (.4, .6]: {0.50 wrong, 0.60 right}          acc 1/2, conf 0.55
    # (.6, .8]: {0.70 right, 0.80 right}          acc 1,   conf 0.75
    # (.8, 1]:  {0.85 wrong, 0.90 right, 0.90 r}  acc 2/3, conf 0.88333...
    np.testing.assert_array_equal(cal.counts, [0, 1, 2, 2, 3])
    expected = (1 * 0.40 + 2 * 0.05 + 2 * 0.25 + 3 * abs(2 / 3 - 2.65 / 3)) / 8
    # Sums of <= 8 float64 terms of size <= 1: rounding below 1e-15.
    assert cal.ece == pytest.approx(expected, abs=1e-14)
    np.testing.assert_allclose(cal.accuracy[1:], [0, 1 / 2, 1, 2 / 3], rtol=1e-15)
    np.testing.assert_allclose(cal.confidence[1:], [0.40, 0.55, 0.75, 2.65 / 3], rtol=1e-14)
    assert cal.edges.tolist() == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])


def test_most_confused_pairs_and_confident_mistakes():
    confusion = np.array([[5, 2, 3], [0, 4, 3], [1, 0, 6]])
    assert most_confused_pairs(confusion, 3) == [(0, 2, 3), (1, 2, 3), (0, 1, 2)]  # ties: lower true class first
    assert most_confused_pairs(np.eye(3, dtype=int)) == []
    assert confident_mistakes(softmax(LOGITS), TARGETS, 2) == [1, 2]  # confidence 0.85, then 0.50 (0.40 is third)


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("href", "src"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])


def embedded_pictures(page: str):
    """Decode every <img> of `page`; fails unless each is a data: URI holding a picture."""
    collector = _Collector()
    collector.feed(page)
    collector.close()
    pictures = []
    for src in collector.images:
        assert src.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")), src[:60]
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True))) as im:
            im.load()
            pictures.append(im.size)
    assert collector.links == []  # no script, stylesheet or link to fetch: opens offline
    return collector, pictures


def test_render_html_embeds_the_pictures_it_references():
    result = EvalResult.from_logits(LOGITS, TARGETS, ["a<b", "b & c", "c"], paths=[f"x{i}.png" for i in range(8)])
    page = render_html(result, title="t", confusion_png=_tiny_png())
    collector, pictures = embedded_pictures(page)
    assert len(pictures) == 2  # the confusion matrix and the reliability diagram (no mistakes passed)
    assert "a&lt;b" in page and "b &amp; c" in page  # class names are escaped
    assert "62.50%" in page  # top-1 5/8
    assert "top-5" not in page  # 3 classes


def _tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_eval_report_cli(tmp_path):
    """eval.py --report on a tiny model: metrics.json, report.html with every picture embedded, and the
    second run into the same folder refused unless --overwrite."""
    root = tmp_path / "data"
    rng = np.random.default_rng(5)
    for name in CLASS_NAMES:
        (root / "val" / name).mkdir(parents=True)
        for i in range(2):
            random_image(rng, size=(40, 36)).save(root / "val" / name / f"{i}.png")
    (root / "val" / CLASS_NAMES[0] / "broken.jpg").write_bytes(b"not a jpeg")
    ckpt = write_checkpoint(tmp_path / "tiny.ckpt")
    args = ["--checkpoint", ckpt, "--data_path", root, "--output_dir", tmp_path / "out", "--report", "--json"]
    run = run_cli("eval.py", *args, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    metrics = json.loads(run.stdout)
    assert metrics["num_images"] == 2 * len(CLASS_NAMES)
    assert [s["path"] for s in metrics["skipped"]] == [str(root / "val" / CLASS_NAMES[0] / "broken.jpg")]
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    wrong = round((1 - metrics["top_1"]) * metrics["num_images"])
    assert wrong > 0  # a random model: there are mistakes to show
    collector, pictures = embedded_pictures(page)
    # confusion matrix + reliability diagram + (thumbnail + attention) per mistake, up to 8 mistakes
    assert len(pictures) == 2 + 2 * min(wrong, 8)
    assert "top-5 accuracy" in page  # 6 classes
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "confusion_matrix.csv", "confusion_matrix.png", "metrics.json", "report.html"]

    again = run_cli("eval.py", *args, cwd=tmp_path)
    assert again.returncode == 2
    assert f"--output_dir {tmp_path / 'out'} already holds 4 file(s)" in again.stderr
    assert "--overwrite" in again.stderr
    replaced = run_cli("eval.py", *args[:-2], "--overwrite", cwd=tmp_path)  # no --report this time
    assert replaced.returncode == 0, replaced.stderr
    assert "cross-entropy" in replaced.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "confusion_matrix.csv", "confusion_matrix.png", "metrics.json"]  # the earlier report is gone
