"""Pictures: what can be asserted about them is asserted (sizes, titles, the crop outline's position from the
preprocessing, colour map and bar, integer epoch ticks, the best-epoch marker), and importing vit_ms.viz
leaves the program's matplotlib backend alone."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tiny_classifier import random_image
from vit_ms import Preprocess
from vit_ms import viz

PREPROCESS = Preprocess(image_size=32, crop_pct=0.875)  # resize_size 37


def by_gid(figure, gid):
    return next(ax for ax in figure.axes if ax.get_gid() == gid)


def test_importing_and_drawing_keeps_the_programs_backend(tmp_path):
    code = ("import matplotlib; matplotlib.use('svg'); import numpy as np; from vit_ms import viz; "
            "viz.plot_confusion_matrix(np.eye(2, dtype=int), ['a', 'b'], 'cm.png'); "
            "print(matplotlib.get_backend())")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "svg" and (tmp_path / "cm.png").is_file()


def test_crop_box_is_the_eval_transforms_crop_by_hand():
    # 80 x 50: short side 50 -> 37, long side int(80 * 37 / 50) = 59; crop 32 at top (37 - 32) // 2 = 2,
    # left (59 - 32) // 2 = 13, in original pixels times 50 / 37 vertically and 80 / 59 horizontally.
    left, top, right, bottom = viz.crop_box((80, 50), PREPROCESS)
    np.testing.assert_allclose([left, top, right, bottom], [13 * 80 / 59, 2 * 50 / 37, 45 * 80 / 59, 34 * 50 / 37])
    # Portrait: 30 x 90 -> 37 x int(90 * 37 / 30) = 111; top (111 - 32) // 2 = 39, left 2.
    np.testing.assert_allclose(viz.crop_box((30, 90), PREPROCESS),
                               [2 * 30 / 37, 39 * 90 / 111, 34 * 30 / 37, 71 * 90 / 111])


@pytest.mark.parametrize("true_label, mark, colour", [("cat", "\u2713 right: cat (71.0%)", viz.RIGHT_COLOUR),
                                                      ("dog", "\u2717 wrong: predicted cat (71.0%), true dog",
                                                       viz.WRONG_COLOUR),
                                                      (None, "predicted: cat (71.0%)", "black")])
def test_prediction_picture_title_crop_outline_and_bars(tmp_path, true_label, mark, colour):
    image = random_image(np.random.default_rng(0), size=(80, 50))
    top = [("cat", 0.71), ("dog", 0.2), ("eel", 0.09)]
    figure = viz.prediction_figure(image, PREPROCESS, top, true_label)
    assert figure._suptitle.get_text() == mark
    assert figure._suptitle.get_color() == colour
    outline = next(p for p in by_gid(figure, "image").patches if p.get_gid() == "model_crop")
    left, upper, right, lower = viz.crop_box(image.size, PREPROCESS)
    assert outline.get_xy() == (left - 0.5, upper - 0.5)  # pixel centres are integers in imshow
    assert (outline.get_width(), outline.get_height()) == (right - left, lower - upper)
    bars = by_gid(figure, "top_k")
    assert [t.get_text() for t in bars.get_yticklabels()] == ["cat", "dog", "eel"]
    assert [t.get_text() for t in bars.texts] == ["71.0%", "20.0%", "9.0%"]
    # The bars lie below the photo, so no text covers it.
    assert bars.get_position().y1 < by_gid(figure, "image").get_position().y0

    out = viz.save_prediction_picture(image, PREPROCESS, top, tmp_path / "a b_pred.png", true_label)
    width, height = figure.get_size_inches() * figure.dpi
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.size == (round(width), round(height))
    assert [p.name for p in tmp_path.iterdir()] == ["a b_pred.png"]  # no temporary left behind


def test_prediction_picture_writes_jpeg_for_jpg(tmp_path):
    out = viz.save_prediction_picture(random_image(np.random.default_rng(0), size=(40, 60)), PREPROCESS,
                                      [("cat", 0.5)], tmp_path / "p.jpg")
    with Image.open(out) as picture:
        assert picture.format == "JPEG"


def test_attention_picture_shows_the_crop_and_a_smooth_map_with_a_colour_bar(tmp_path):
    image = random_image(np.random.default_rng(2), size=(80, 50))
    heat = np.zeros((4, 4))
    heat[1, 2] = 1.0  # one patch: the peak must land in its cell of the crop
    figure = viz.attention_figure(image, PREPROCESS, heat, "predicted: cat (71.0%)")
    assert figure._suptitle.get_text() == "predicted: cat (71.0%)"
    original, overlay = by_gid(figure, "original"), by_gid(figure, "overlay")
    np.testing.assert_array_equal(original.images[0].get_array(), np.asarray(viz.model_view(image, PREPROCESS)))
    smooth = np.asarray(overlay.images[1].get_array())
    assert overlay.images[1].get_cmap().name == "inferno"
    assert len(np.unique(smooth.round(4))) > 100  # interpolated, not 16 flat blocks
    assert 0.0 <= smooth.min() and smooth.max() <= 1.0
    row, col = np.unravel_index(np.argmax(smooth), smooth.shape)
    side = smooth.shape[0]
    assert (int(4 * row / side), int(4 * col / side)) == (1, 2)
    assert by_gid(figure, "colorbar").get_ylabel().startswith("share of attention")

    out = viz.save_attention_picture(image, PREPROCESS, heat, "predicted: cat (71.0%)", tmp_path / "x_attention.png")
    with Image.open(out) as picture:
        assert picture.size == (900, 460)


def write_metrics(path, epochs, top5=1.0):
    records = [{"epoch": e, "train_loss_smoothed": 1.0 / e, "val_loss_smoothed": 1.1 / e, "top1": [0.5, 0.8, 0.7][e - 1],
                "top5": top5, "lr": 1e-3 / e} for e in epochs]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_one_epoch_curves_have_one_integer_tick_and_no_uninformative_top5(tmp_path):
    records = write_metrics(tmp_path / "metrics.jsonl", [1])
    figure = viz.curves_figure(records)
    for gid in ("loss", "accuracy", "lr"):
        ax = by_gid(figure, gid)
        xlim = ax.get_xlim()
        assert [t for t in ax.get_xticks() if xlim[0] <= t <= xlim[1]] == [1.0]
    labels = by_gid(figure, "accuracy").get_legend_handles_labels()[1]
    assert labels == ["val top-1", "best: 50.00% (epoch 1)"]  # top-5 is always 100% with <= 5 classes
    out = viz.plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    with Image.open(out) as picture:
        assert picture.size == (1350, 400)


def test_curves_mark_the_best_epoch_and_show_top5_for_many_classes(tmp_path):
    records = write_metrics(tmp_path / "metrics.jsonl", [1, 2, 3], top5=0.9)
    figure = viz.curves_figure(records, num_classes=10)
    accuracy = by_gid(figure, "accuracy")
    best = next(line for line in accuracy.lines if line.get_gid() == "best_marker")
    assert list(best.get_xdata()) == [2] and list(best.get_ydata()) == [80.0]
    assert "val top-5" in accuracy.get_legend_handles_labels()[1]
    assert list(by_gid(figure, "lr").lines[0].get_ydata()) == [1e-3, 5e-4, 1e-3 / 3]
    five_classes = by_gid(viz.curves_figure(records, num_classes=5), "accuracy")
    assert "val top-5" not in five_classes.get_legend_handles_labels()[1]


def test_empty_metrics_is_a_clear_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no epochs"):
        viz.plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()


def test_legacy_annotate_image_still_writes(tmp_path):
    out = viz.annotate_image(random_image(np.random.default_rng(0)), ["1: cat 50.0%"], tmp_path / "a_pred.png")
    with Image.open(out) as picture:
        assert picture.size == (384, 320)  # 48 x 40 enlarged to a short side of 320
