"""Fine-tuning augmentation (vit_ms.data.augment): the transform list, each auto-augment policy, random
erasing, and batch Mixup/CutMix against a NumPy re-computation (and timm's own Mixup where installed)."""
import io

import numpy as np
import pytest
from PIL import Image

import mindspore.dataset as ds
import mindspore.dataset.vision as vision

from vit_ms.data.augment import (AUTO_AUGMENT_POLICIES, MixupCutmix, add_batch_mixup, cutmix_box, policy_op,
                            smooth_one_hot, train_augmentations)
from vit_ms.config import Preprocess

PRE = Preprocess(image_size=32)


def _images(n=6, size=40, seed=0):
    """Structured uint8 HWC images (gradients plus a bright square): every policy op has edges to move."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        yy, xx = np.mgrid[:size, :size]
        img = np.stack([xx * 6, yy * 6, (xx + yy) * 3], axis=-1) % 256
        y0, x0 = rng.integers(0, size // 2, 2)
        img[y0:y0 + size // 3, x0:x0 + size // 3] = rng.integers(0, 256, 3)
        out.append(img.astype(np.uint8))
    return out


def _png(img):
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def test_default_list_is_the_plain_training_transform():
    ops = train_augmentations(PRE)
    assert [type(op).__name__ for op in ops] == ["RandomCropDecodeResize", "RandomHorizontalFlip", "Normalize",
                                                 "HWC2CHW"]


def test_full_list_order():
    ops = train_augmentations(PRE, auto_augment="randaugment", color_jitter=0.4, random_erasing=0.25)
    assert [type(op).__name__ for op in ops] == ["RandomCropDecodeResize", "RandomHorizontalFlip", "RandAugment",
                                                 "RandomColorAdjust", "Normalize", "HWC2CHW", "RandomErasing"]


@pytest.mark.parametrize("name", [p for p in AUTO_AUGMENT_POLICIES if p != "none"])
def test_each_policy_changes_images(name):
    ds.config.set_seed(0)
    op = policy_op(name, PRE)
    images = _images()
    changed = [not np.array_equal(op(img), img) for img in images]
    # A policy may draw an identity op for one image (TrivialAugment includes it); not for all six.
    assert sum(changed) >= 4, changed


def test_policy_none_and_bad_name():
    assert policy_op("none", PRE) is None
    with pytest.raises(ValueError, match="--auto_augment"):
        train_augmentations(PRE, auto_augment="randaug")
    with pytest.raises(ValueError, match="--ra_magnitude"):
        train_augmentations(PRE, auto_augment="randaugment", ra_magnitude=11)


@pytest.mark.parametrize("name", AUTO_AUGMENT_POLICIES)
def test_full_pipeline_runs_on_encoded_bytes(name):
    images = _images(4)
    source = [(_png(img), np.int32(i % 2)) for i, img in enumerate(images)]
    dataset = ds.GeneratorDataset(source, ["image", "label"], shuffle=False)
    ops = train_augmentations(PRE, auto_augment=name, color_jitter=0.3, random_erasing=0.5)
    dataset = dataset.map(ops, input_columns="image").batch(2, drop_remainder=True)
    dataset = add_batch_mixup(dataset, MixupCutmix(2, 0.8, 1.0, seed=0))
    batches = list(dataset.create_tuple_iterator(output_numpy=True))
    assert len(batches) == 2
    for x, t in batches:
        assert x.shape == (2, 3, 32, 32) and x.dtype == np.float32 and np.isfinite(x).all()
        assert t.shape == (2, 2) and t.dtype == np.float32
        np.testing.assert_allclose(t.sum(axis=1), 1.0, atol=1e-6)


def test_list_on_decoded_arrays():
    """decode=False: the same list on uint8 HWC arrays of any size (RandomResizedCrop instead)."""
    ops = train_augmentations(PRE, auto_augment="trivialaugment", decode=False)
    assert type(ops[0]).__name__ == "RandomResizedCrop"
    x = _images(1, size=57)[0]
    for op in ops:
        x = op(x)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32


def test_random_erasing_writes_noise_into_one_box():
    op = train_augmentations(PRE, random_erasing=1.0)[-1]
    x = np.full((3, 32, 32), 7.0, np.float32)  # 7 never comes out of N(0, 1) noise
    y = op(x)
    erased = (y != 7.0).any(axis=0)
    rows, cols = np.nonzero(erased)
    assert rows.size > 0
    # One box, all channels erased inside it, nothing outside.
    box = np.zeros_like(erased)
    box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
    assert np.array_equal(erased, box)
    assert (y[:, box] != 7.0).all()
    area = box.sum() / box.size
    assert 0.02 - 1 / box.size <= area <= 1 / 3 + 1 / 32  # scale (0.02, 1/3), rounded to whole pixels


def test_color_jitter_changes_colours_only():
    op = train_augmentations(PRE, color_jitter=0.4)[2]
    assert isinstance(op, vision.RandomColorAdjust)
    ds.config.set_seed(1)
    img = _images(1)[0]
    assert not np.array_equal(op(img), img)


# ---------------------------------------------------------------------------------------------------------
# Mixup / CutMix
# ---------------------------------------------------------------------------------------------------------

def test_smooth_one_hot_hand_table():
    t = smooth_one_hot(np.array([2, 0]), 4, 0.3)
    np.testing.assert_array_equal(t, np.array([[0.1, 0.1, 0.7, 0.1], [0.7, 0.1, 0.1, 0.1]], np.float32))


def _reference_mix(x, labels, num_classes, mixup_alpha, cutmix_alpha, prob, switch_prob, smoothing, rng):
    """An independent NumPy re-computation of batch Mixup/CutMix, drawing from `rng` in timm's order."""
    lam, cut = 1.0, False
    if rng.rand() < prob:
        if mixup_alpha > 0 and cutmix_alpha > 0:
            cut = rng.rand() < switch_prob
        else:
            cut = cutmix_alpha > 0
        a = cutmix_alpha if cut else mixup_alpha
        lam = rng.beta(a, a)
    out = x.copy()
    if lam != 1.0:
        if cut:
            h, w = x.shape[2:]
            r = np.sqrt(1 - lam)
            ch, cw = int(h * r), int(w * r)
            cy, cx = rng.randint(0, h), rng.randint(0, w)
            ys = range(max(cy - ch // 2, 0), min(cy + (ch + 1) // 2, h))
            xs = range(max(cx - cw // 2, 0), min(cx + (cw + 1) // 2, w))
            for i in range(len(x)):
                for yy in ys:
                    for xx in xs:
                        out[i, :, yy, xx] = x[len(x) - 1 - i, :, yy, xx]
            lam = 1 - len(ys) * len(xs) / (h * w)
        else:
            out = np.float32(lam) * x + np.float32(1 - lam) * x[::-1]
    onehot = np.zeros((len(labels), num_classes))
    for i, c in enumerate(labels):
        onehot[i] = smoothing / (num_classes - 1)
        onehot[i, c] = 1 - smoothing
    return out, lam * onehot + (1 - lam) * onehot[::-1]


@pytest.mark.parametrize("mixup_alpha, cutmix_alpha, prob, switch_prob", [
    (0.8, 1.0, 1.0, 0.5), (0.8, 0.0, 1.0, 0.5), (0.0, 1.0, 1.0, 0.5), (0.8, 1.0, 0.5, 0.5)])
def test_mixup_cutmix_matches_numpy(mixup_alpha, cutmix_alpha, prob, switch_prob):
    rng = np.random.default_rng(3)
    op = MixupCutmix(5, mixup_alpha, cutmix_alpha, prob, switch_prob, label_smoothing=0.1, seed=11)
    ref_rng = np.random.RandomState(11)
    kinds = set()
    for _ in range(12):  # enough batches to see mixup, cutmix and (prob 0.5) unmixed ones
        x = rng.standard_normal((6, 3, 9, 7)).astype(np.float32)
        labels = rng.integers(0, 5, 6).astype(np.int32)
        got_x, got_t = op(x, labels)
        want_x, want_t = _reference_mix(x, labels, 5, mixup_alpha, cutmix_alpha, prob, switch_prob, 0.1, ref_rng)
        # Mixup: the same two float32 products and one sum in both; cutmix copies pixels exactly.
        np.testing.assert_allclose(got_x, want_x, rtol=0, atol=1e-6)
        # Targets: float32 vs float64 arithmetic on values <= 1: a few float32 ulps.
        np.testing.assert_allclose(got_t, want_t, rtol=0, atol=1e-6)
        assert got_t.shape == (6, 5) and got_t.dtype == np.float32
        kinds.add("same" if np.array_equal(got_x, x) else "mixed")
    assert "mixed" in kinds
    if prob < 1:
        assert "same" in kinds


def test_cutmix_lambda_is_the_kept_area():
    rng = np.random.RandomState(0)
    for lam in (0.1, 0.5, 0.9):
        for _ in range(20):
            (y0, y1, x0, x1), kept = cutmix_box((3, 10, 8), lam, rng)
            assert 0 <= y0 <= y1 <= 10 and 0 <= x0 <= x1 <= 8
            assert kept == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 80)


def test_matches_timm_mixup_without_smoothing():
    """timm's Mixup (batch mode) on the same global NumPy stream; smoothing 0 because timm spreads it
    over all C classes (off = s / C) where this project uses s / (C - 1)."""
    import timm.data.mixup as timm_mixup  # a test dependency (setup.py's "test" extra)
    import torch
    rng = np.random.default_rng(5)
    ours = MixupCutmix(4, 0.8, 1.0, label_smoothing=0.0, seed=21)
    theirs = timm_mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=4)
    np.random.seed(21)
    for _ in range(8):
        x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
        labels = rng.integers(0, 4, 4)
        got_x, got_t = ours(x, labels.astype(np.int32))
        want_x, want_t = theirs(torch.from_numpy(x.copy()), torch.from_numpy(labels))
        np.testing.assert_allclose(got_x, want_x.numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(got_t, want_t.numpy(), rtol=0, atol=1e-6)


def test_mixup_rejects_bad_settings():
    with pytest.raises(ValueError, match="--mixup, --cutmix"):
        MixupCutmix(3, 0.0, 0.0)
    with pytest.raises(ValueError, match="labels must lie"):
        MixupCutmix(3, 0.8, 0.0)(np.zeros((2, 3, 4, 4), np.float32), np.array([0, 3]))
