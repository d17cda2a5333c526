"""One decoding convention in training, eval and infer: 16-bit grayscale PNG, palette PNG with transparency,
animated PNG and EXIF-rotated JPEG give the same pixels through create_dataset (train and eval) and through
load_image + preprocess_image, each compared with a NumPy/Pillow expectation; and the channel count follows
len(preprocess.mean) (1: ITU-R 601 luma, 3: RGB)."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mindspore.dataset.vision as vision

from vit_ms import data
from vit_ms.config import Preprocess

SIDE = 16
# mean 0 and std 1/255 make Normalize an identity; crop_pct 1 and a SIDE x SIDE image make the eval resize and
# crop identities: the pipelines then return the decoded pixels themselves.
RAW3 = Preprocess(image_size=SIDE, crop_pct=1.0, mean=(0.0,) * 3, std=(1 / 255,) * 3)
RAW1 = Preprocess(image_size=SIDE, crop_pct=1.0, mean=(0.0,), std=(1 / 255,))
RNG = np.random.default_rng(0)


def _png_16bit_gray(path: Path):
    values = RNG.integers(0, 65536, (SIDE, SIDE)).astype(np.uint16)
    Image.fromarray(values).save(path)  # Pillow writes mode I;16 as a 16-bit grayscale PNG
    high = (values >> 8).astype(np.uint8)  # the convention: the high byte
    return np.repeat(high[..., None], 3, -1)


def _png_palette_with_transparency(path: Path):
    palette = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [200, 200, 50]], np.uint8)
    index = RNG.integers(0, 4, (SIDE, SIDE)).astype(np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(palette.ravel().tolist())
    image.save(path, transparency=bytes([0, 128, 255, 255]))  # tRNS: index 0 fully transparent
    return palette[index]  # alpha dropped: the palette colour, transparent pixels included


def _apng(path: Path):
    first, second = (RNG.integers(0, 256, (SIDE, SIDE, 3)).astype(np.uint8) for _ in range(2))
    Image.fromarray(first).save(path, save_all=True, append_images=[Image.fromarray(second)], duration=100)
    return first


def _exif_rotated_jpeg(path: Path):
    stored = np.zeros((SIDE, SIDE, 3), np.uint8)
    stored[: SIDE // 2] = 240  # bright top half, dark bottom half, as stored
    stored[SIDE // 2:] = 20
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: "rotate 90 CW to display"; applied, the bright half would be on the right
    image.save(path, quality=95, exif=exif.tobytes())
    return stored


CASES = {"sixteen_bit.png": (_png_16bit_gray, 0), "palette_trns.png": (_png_palette_with_transparency, 0),
         "animated.png": (_apng, 0),
         # Lossless cases are exact. JPEG: two decoders (MindSpore's libjpeg-turbo build, Pillow's) may differ
         # by a few levels on a 240/20 edge; applying the rotation would move 220-level differences.
         "exif_rotated.jpg": (_exif_rotated_jpeg, 8)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode")
    expected = {}
    for name, (make, _) in CASES.items():
        class_dir = root / "train" / Path(name).stem
        class_dir.mkdir(parents=True)
        expected[name] = make(class_dir / name)
    return root, expected


def _pipeline_images(root, preprocess, training):
    dataset, info = data.create_dataset(root, "train", preprocess, 1, training=training, shuffle=False,
                                        num_workers=1, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    assert info.skipped == ()
    by_class = {info.class_names[int(label[0])]: image[0]  # (C, S, S)
                for image, label in dataset.create_tuple_iterator(output_numpy=True)}
    return {name: by_class[Path(name).stem] for name in CASES}


def _assert_same(got_chw, want_hwc, tol, flips: bool, what: str):
    want = want_hwc.transpose(2, 0, 1).astype(np.float64)
    candidates = [want, want[:, :, ::-1]] if flips else [want]  # training flips at random
    errors = [np.abs(got_chw - c).max() for c in candidates]
    assert min(errors) <= tol + 1e-3, f"{what}: off by {min(errors)}"


@pytest.mark.parametrize("name", list(CASES))
def test_train_eval_and_infer_decode_the_same_way(folder, name):
    root, expected = folder
    tol = CASES[name][1]
    path = root / "train" / Path(name).stem / name
    _assert_same(_pipeline_images(root, RAW3, training=False)[name], expected[name], tol, False, "eval")
    _assert_same(_pipeline_images(root, RAW3, training=True)[name], expected[name], tol, True, "train")
    infer = data.preprocess_image(data.load_image(path), RAW3)
    assert infer.shape == (3, SIDE, SIDE)
    _assert_same(infer, expected[name], tol, False, "infer")


def test_what_mindspore_and_pillow_do_with_these_files(folder):
    """The facts the convention rests on, so a MindSpore or Pillow upgrade that changes them is noticed."""
    root, expected = folder
    decode = vision.Decode()
    for name in ("sixteen_bit.png", "palette_trns.png", "animated.png"):
        raw = np.fromfile(root / "train" / Path(name).stem / name, np.uint8)
        np.testing.assert_array_equal(decode(raw), expected[name], err_msg=name)  # MindSpore's Decode, exactly
    sixteen = Image.open(root / "train" / "sixteen_bit" / "sixteen_bit.png")
    assert sixteen.mode == "I;16"
    # Pillow's own conversion saturates 16-bit samples, which is why load_image keeps the high byte itself.
    assert (np.asarray(sixteen.convert("RGB")) == 255).mean() > 0.9
    raw = np.fromfile(root / "train" / "exif_rotated" / "exif_rotated.jpg", np.uint8)
    assert decode(raw)[: SIDE // 2].mean() > 200 and decode(raw)[SIDE // 2:].mean() < 60  # stored order kept


def _luma(rgb):
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R BT.601


def test_one_channel_models_get_the_luma_three_channel_models_replicate_gray(tmp_path):
    colour = RNG.integers(0, 256, (3, SIDE, SIDE, 3)).astype(np.uint8)
    gray = RNG.integers(0, 256, (SIDE, SIDE)).astype(np.uint8)
    for i, rgb in enumerate(colour):
        (tmp_path / "train" / f"c{i}").mkdir(parents=True)
        Image.fromarray(rgb).save(tmp_path / "train" / f"c{i}" / "x.png")
    (tmp_path / "train" / "gray").mkdir()
    Image.fromarray(gray, "L").save(tmp_path / "train" / "gray" / "g.png")
    wanted = {f"c{i}": _luma(rgb) for i, rgb in enumerate(colour)}
    wanted["gray"] = gray.astype(np.float64)

    # Bound: OpenCV's cvtColor rounds the luma to uint8 (0.5) with 14-bit fixed-point weights (each within
    # 2e-5 of the exact one: < 0.02 levels at 255); ToTensor's x / 255 in float32 adds < 1e-4 after
    # un-normalising. A wrong formula (a plain channel mean, BGR order) is off by tens of levels.
    bound = 0.5 + 0.02 + 1e-4
    for training in (False, True):
        dataset, info = data.create_dataset(tmp_path, "train", RAW1, 4, training=training, shuffle=False,
                                            drop_remainder=False, num_workers=1, crop_scale=(1.0, 1.0),
                                            crop_ratio=(1.0, 1.0))
        images, labels = next(dataset.create_tuple_iterator(output_numpy=True))
        assert images.shape == (4, 1, SIDE, SIDE) and images.dtype == np.float32
        for image, label in zip(images, labels):
            want = wanted[info.class_names[label]]
            error = min(np.abs(image[0] - want).max(), np.abs(image[0] - want[:, ::-1]).max())  # random flip
            assert error <= bound, (training, info.class_names[label], error)
        # A grayscale image passes unchanged: equal channels weigh 4899 + 9617 + 1868 = 2^14, exact.
        got = images[info.class_names.index("gray")][0]
        assert min(np.abs(got - gray).max(), np.abs(got - gray[:, ::-1]).max()) <= 1e-4  # ToTensor's float32

    # Infer: the same ops on load_image's RGB.
    for i, rgb in enumerate(colour):
        one = data.preprocess_image(data.load_image(tmp_path / "train" / f"c{i}" / "x.png"), RAW1)
        assert one.shape == (1, SIDE, SIDE) and np.abs(one[0] - _luma(rgb)).max() <= bound
    # A grayscale photo fed to an RGB model: replicated into three equal channels.
    three = data.preprocess_image(data.load_image(tmp_path / "train" / "gray" / "g.png"), RAW3)
    np.testing.assert_array_equal(three, np.broadcast_to(gray, (3, SIDE, SIDE)).astype(np.float32))
    # Real mean/std per channel: the normalisation uses the single value.
    normalised = data.preprocess_image(Image.fromarray(gray, "L"),
                                       Preprocess(image_size=SIDE, crop_pct=1.0, mean=(0.5,), std=(0.25,)))
    np.testing.assert_allclose(normalised[0], (gray / 255 - 0.5) / 0.25, atol=1e-5)


def test_channel_counts_other_than_one_or_three_are_refused_clearly(tmp_path):
    pre = Preprocess(image_size=SIDE, mean=(0.5,) * 4, std=(0.5,) * 4)
    with pytest.raises(ValueError, match="1 \\(grayscale\\) or 3 \\(RGB\\) channels, but Preprocess.mean has 4"):
        data.create_dataset(tmp_path, "train", pre, 1)
    with pytest.raises(ValueError, match=r"need one value per input channel, the same number each; got 2 mean "
                                         r"and 1 std value\(s\)"):
        Preprocess(mean=(0.5, 0.5), std=(0.5,))
