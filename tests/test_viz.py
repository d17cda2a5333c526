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
    layout = viz.prediction_layout(image.size, PREPROCESS, top, true_label)
    assert (layout.title, layout.title_colour) == (mark, colour)
    # A small photo is enlarged to 320 px wide, at its own aspect ratio, below the title band, centred.
    x0, y0, x1, y1 = layout.photo
    assert (x1 - x0, y1 - y0) == (320, 200) and x0 + x1 == layout.size[0]
    left, upper, right, lower = viz.crop_box(image.size, PREPROCESS)  # checked by hand above
    sx, sy = (x1 - x0) / 80, (y1 - y0) / 50
    np.testing.assert_allclose(layout.crop, [x0 + left * sx, y0 + upper * sy, x0 + right * sx, y0 + lower * sy])
    assert [name for name, _, _ in layout.bars] == ["cat", "dog", "eel"]
    bar_colours = {"cat": viz.RIGHT_COLOUR, "dog": viz.WRONG_COLOUR, None: viz.OTHER_COLOUR}[true_label]
    assert layout.bars[0][2] == bar_colours
    assert layout.bars_top > y1  # the bars lie below the photo, so no text covers it

    out = viz.save_prediction_picture(image, PREPROCESS, top, tmp_path / "a b_pred.png", true_label)
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.size == layout.size
        pixels = np.asarray(picture.convert("RGB"), np.int32)
    assert [p.name for p in tmp_path.iterdir()] == ["a b_pred.png"]  # no temporary left behind
    # The outline is drawn where the layout puts the crop: black under white dashes, on every side.
    crop = [round(c) for c in layout.crop]
    middle_x, middle_y = (crop[0] + crop[2]) // 2, (crop[1] + crop[3]) // 2
    for x, y in ((crop[0], middle_y), (crop[2], middle_y), (middle_x, crop[1]), (middle_x, crop[3])):
        strip = pixels[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3)
        assert strip.max(axis=1).min() < 60 or strip.min(axis=1).max() > 200, (x, y, strip)  # black or white
    # Outside the crop the photo is dimmed to 65 %; inside it is the photo itself.
    shown = np.asarray(image.convert("RGB").resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR), np.int32)
    inside = (middle_y, (crop[0] + middle_x) // 2)
    np.testing.assert_allclose(pixels[inside], shown[inside[0] - y0, inside[1] - x0], atol=2)
    corner = (y0 + 1, x0 + 1)
    np.testing.assert_allclose(pixels[corner], np.round(shown[1, 1] * 0.65), atol=1)
    # The title band and the bar rows hold ink (text and bars) in the title's and the bars' colours.
    title_band = pixels[:y0]
    assert (np.abs(title_band - np.array(Image.new("RGB", (1, 1), colour).getpixel((0, 0)))).sum(axis=-1) < 60).any()
    first_row = pixels[layout.bars_top:layout.bars_top + layout.row_height, layout.bars_left + 2]
    bar_rgb = np.array(Image.new("RGB", (1, 1), bar_colours).getpixel((0, 0)))
    assert (np.abs(first_row - bar_rgb).sum(axis=-1) < 10).any()


def test_prediction_picture_shows_a_photo_at_its_own_size_where_it_fits():
    # 500 x 375 fits the 610 px between the margins: drawn pixel for pixel; 1200 x 900 is scaled to 610 wide.
    assert viz.prediction_layout((500, 375), PREPROCESS, [("cat", 1.0)]).photo == (70, 45, 570, 420)
    x0, y0, x1, y1 = viz.prediction_layout((1200, 900), PREPROCESS, [("cat", 1.0)]).photo
    assert (x1 - x0, y1 - y0) == (610, 458)
    x0, y0, x1, y1 = viz.prediction_layout((300, 1200), PREPROCESS, [("cat", 1.0)]).photo  # tall: 700 high
    assert (x1 - x0, y1 - y0) == (175, 700)


def test_prediction_picture_fits_long_titles_and_names():
    layout = viz.prediction_layout((80, 50), PREPROCESS, [("x" * 200, 0.9), ("b", 0.1)], true_label="b")
    font, title = viz._fit(layout.title, 18, layout.size[0] - 30, bold=True)
    assert title.endswith("\u2026") and viz._text_width(title, font) <= layout.size[0] - 30
    assert layout.bars_left <= 15 + 300  # the class-name column is capped; longer names are cut


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
