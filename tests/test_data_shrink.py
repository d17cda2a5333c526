"""vit_ms.data.shrink: a copy of an image folder with large photos made smaller, decoded as the pipelines
decode them; the hint that suggests it; the `python -m vit_ms.data shrink` command."""
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vit_ms.config import Preprocess
from vit_ms.data import DatasetError, create_dataset, load_image, main as data_main
from vit_ms.data.shrink import large_photo_hint, short_side_for, shrink_images


def _smooth(size, seed=0, mode="RGB"):
    """A photo-like image: random colours upsampled smoothly (what JPEG and the resamplers handle alike)."""
    rng = np.random.default_rng(seed)
    channels = len(mode)
    small = Image.fromarray((rng.random((12, 16, channels)) * 255).astype(np.uint8), mode)
    return small.resize(size, Image.BICUBIC)


def _folder(root: Path) -> Path:
    """train/a: a 1600x1200 JPEG and a small PNG; train/b: a 1000x900 RGBA PNG, a broken JPEG, a text file."""
    (root / "train" / "a").mkdir(parents=True)
    (root / "train" / "b").mkdir(parents=True)
    _smooth((1600, 1200)).save(root / "train" / "a" / "big.jpg", quality=95)
    _smooth((100, 80), seed=1).save(root / "train" / "a" / "small.png")
    _smooth((1000, 900), seed=2, mode="RGBA").save(root / "train" / "b" / "big.png")
    (root / "train" / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "train" / "b" / "notes.txt").write_text("not an image")
    return root


def test_shrink_resizes_large_images_as_the_pipelines_read_them_and_copies_the_rest(tmp_path):
    src, dst = _folder(tmp_path / "photos"), tmp_path / "small"
    report = shrink_images(src, dst, short_side=300)
    assert (report.shrunk, report.copied, report.kept) == (2, 1, 0)
    assert [(p.name, "broken" in str(p)) for p, _ in report.unreadable] == [("broken.jpg", True)]
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file()) == [
        "train/a/big.jpg", "train/a/small.png", "train/b/big.png"]  # no broken file, no text file
    # Small images: byte for byte.
    assert (dst / "train/a/small.png").read_bytes() == (src / "train/a/small.png").read_bytes()
    # A PNG: lossless, alpha dropped as load_image drops it, then Lanczos to a 300 px short side: exactly
    # Pillow's own resize of the decoded image (no draft mode for PNG).
    with Image.open(dst / "train/b/big.png") as png:
        assert (png.format, png.mode, png.size) == ("PNG", "RGB", (333, 300))
        expected = load_image(src / "train/b/big.png").resize((333, 300), Image.LANCZOS)
        np.testing.assert_array_equal(np.asarray(png), np.asarray(expected))
    # A JPEG: decoded at 1/4 scale (DCT) instead of in full, then written at quality 95. Against a full
    # decode resized with Lanczos, the smooth image differs by JPEG's rounding and the two low-pass filters'
    # difference: under 2 grey levels on average (a photo with fine detail would differ more, as any
    # two resamplers do).
    with Image.open(dst / "train/a/big.jpg") as jpeg:
        assert (jpeg.format, jpeg.size) == ("JPEG", (400, 300))
        full = load_image(src / "train/a/big.jpg").resize((400, 300), Image.LANCZOS)
        assert np.abs(np.asarray(jpeg, np.float64) - np.asarray(full, np.float64)).mean() < 2.0


def test_a_second_shrink_only_does_what_changed(tmp_path):
    src, dst = _folder(tmp_path / "photos"), tmp_path / "small"
    shrink_images(src, dst, short_side=300)
    written = {p: p.stat().st_mtime_ns for p in dst.rglob("*") if p.is_file()}
    again = shrink_images(src, dst, short_side=300)
    assert (again.shrunk, again.copied, again.kept, len(again.unreadable)) == (0, 0, 3, 1)
    assert {p: p.stat().st_mtime_ns for p in dst.rglob("*") if p.is_file()} == written
    # A changed source is done again.
    _smooth((1200, 1600), seed=3).save(src / "train/a/big.jpg", quality=95)
    later = os.stat(dst / "train/a/big.jpg").st_mtime + 10
    os.utime(src / "train/a/big.jpg", (later, later))
    third = shrink_images(src, dst, short_side=300)
    assert (third.shrunk, third.kept) == (1, 2)
    assert Image.open(dst / "train/a/big.jpg").size == (300, 400)


def test_shrink_refuses_a_copy_inside_its_source_and_a_missing_folder(tmp_path):
    src = _folder(tmp_path / "photos")
    with pytest.raises(DatasetError, match="would be inside"):
        shrink_images(src, src / "small")
    with pytest.raises(DatasetError, match="is not a folder of images"):
        shrink_images(tmp_path / "nothing", tmp_path / "small")
    assert not (src / "small").exists() and not (tmp_path / "small").exists()


def test_shrink_command_line(tmp_path, capsys):
    src, dst = _folder(tmp_path / "photos"), tmp_path / "small"
    assert data_main(["shrink", str(src), str(dst), "--short_side", "300", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "broken.jpg" in out and "2 shrunk, 1 copied unchanged, 0 already up to date, 1 unreadable left out" in out
    assert data_main(["shrink", str(src), str(src / "inside")]) == 2


def test_the_hint_names_large_photos_once_per_root(tmp_path, caplog):
    # The default short side keeps RandomResizedCrop's smallest crop (8 % of the area) at the image size.
    assert (short_side_for(224), short_side_for(384)) == (800, 1400)
    big = tmp_path / "big"
    for split in ("train", "val"):
        (big / split / "a").mkdir(parents=True)
        for i in range(2):
            _smooth((2400, 1800), seed=i).save(big / split / "a" / f"{i}.jpg", quality=80)
    paths = sorted((big / "train" / "a").iterdir())
    hint = large_photo_hint(paths, 224)
    assert "median short side 1800 px" in hint and "python -m vit_ms.data shrink SRC DST --short_side 800" in hint
    assert large_photo_hint(paths, 448) is None  # 1800 px is less than twice the 1600 px a 448 px model wants
    small = _folder(tmp_path / "photos") / "train" / "a"
    assert large_photo_hint([small / "small.png"], 224) is None
    with caplog.at_level(logging.INFO, logger="vit_ms.data"):
        for split in ("train", "val"):  # a run builds both: one hint
            create_dataset(big, split, Preprocess(image_size=224), batch_size=2, training=False)
    assert caplog.text.count("are large (median short side 1800 px") == 1
