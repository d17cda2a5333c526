"""Training-time augmentation for fine-tuning: the per-image transform list (random resized crop, flip, an
automatic augmentation policy, colour jitter, normalisation, random erasing) on MindSpore's own C++/Python
vision ops, and batch-level Mixup/CutMix that turns integer labels into soft targets.

The order follows timm's `transforms_imagenet_train` (used by DeiT, Touvron et al. 2021, and AugReg,
Steiner et al. 2021, "How to train your ViT"): crop and flip, then the policy on the uint8 HWC image, then
normalise, and random erasing last on the normalised CHW float image, so an erased box holds N(0, 1) noise
in normalised units (timm's `re_mode="pixel"`). Mixup/CutMix (Zhang et al. 2018; Yun et al. 2019) runs on
whole batches after `dataset.batch`, as timm's `Mixup(mode="batch")`: one lambda per batch, each image
mixed with the batch in reverse order.

Wiring, for a train split of encoded image bytes and int32 labels::

    ops = train_augmentations(preprocess, auto_augment="randaugment", random_erasing=0.25)
    dataset = dataset.map(ops, input_columns="image").batch(batch_size, drop_remainder=True)
    dataset = add_batch_mixup(dataset, MixupCutmix(num_classes, 0.8, 1.0, label_smoothing=0.1, seed=0))
    # the "label" column is now float32 (B, num_classes); train with a loss that takes soft targets
    # (vit_ms.training.optim.SoftCrossEntropy).

`create_dataset(..., augmentation={...})` applies `train_augmentations` with those options to the train
split; the training loop adds Mixup/CutMix (`vit_ms.training.loop`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

import mindspore.dataset.vision as vision

from ..config import Preprocess
from .pipeline import _interpolation  # the one interpolation table of the pipelines

AUTO_AUGMENT_POLICIES = ("none", "randaugment", "trivialaugment", "autoaugment")
# RandAugment magnitude on timm's 0..10 scale ("rand-m9-n2"): MindSpore, like torchvision, picks the
# magnitude from `num_magnitude_bins` evenly spaced values in [0, max], so 11 bins make magnitude 9 mean
# 0.9 of each op's range, as timm's m9 does (torchvision's default 31 bins would make it 9/30).
_RA_MAGNITUDE_BINS = 11


def policy_op(name: str, preprocess: Preprocess, ra_num_ops: int = 2, ra_magnitude: int = 9):
    """The MindSpore op of one `--auto_augment` policy (uint8 HWC in and out), or None for "none".

    Geometric ops fill uncovered pixels with the dataset mean (as timm does) rather than black.

    Args:
        name: one of `AUTO_AUGMENT_POLICIES`.
        preprocess: supplies the mean used as fill colour.
        ra_num_ops: RandAugment: ops applied per image (timm's n).
        ra_magnitude: RandAugment: strength on timm's 0..10 scale (timm's m).
    """
    if name not in AUTO_AUGMENT_POLICIES:
        raise ValueError(f"auto_augment {name!r} is not one of {list(AUTO_AUGMENT_POLICIES)} "
                         f"(flag --auto_augment)")
    fill = tuple(int(round(255 * m)) for m in preprocess.mean)
    inter = vision.Inter.BILINEAR
    if name == "randaugment":
        if not (isinstance(ra_num_ops, int) and ra_num_ops >= 1):
            raise ValueError(f"ra_num_ops must be a positive integer, got {ra_num_ops!r} (flag --ra_num_ops)")
        if not (isinstance(ra_magnitude, int) and 0 <= ra_magnitude < _RA_MAGNITUDE_BINS):
            raise ValueError(f"ra_magnitude must be an integer in [0, {_RA_MAGNITUDE_BINS - 1}] (timm's scale), "
                             f"got {ra_magnitude!r} (flag --ra_magnitude)")
        return vision.RandAugment(num_ops=ra_num_ops, magnitude=ra_magnitude,
                                  num_magnitude_bins=_RA_MAGNITUDE_BINS, interpolation=inter, fill_value=fill)
    if name == "trivialaugment":
        return vision.TrivialAugmentWide(interpolation=inter, fill_value=fill)
    if name == "autoaugment":
        return vision.AutoAugment(vision.AutoAugmentPolicy.IMAGENET, interpolation=inter, fill_value=fill)
    return None


def train_augmentations(preprocess: Preprocess, *, auto_augment: str = "none", ra_num_ops: int = 2,
                        ra_magnitude: int = 9, color_jitter: float = 0.0, random_erasing: float = 0.0,
                        crop_scale: Sequence[float] = (0.08, 1.0),
                        crop_ratio: Sequence[float] = (0.75, 1.333), hflip: float = 0.5,
                        decode: bool = True) -> list:
    """The whole per-image training transform: encoded bytes (or uint8 HWC) -> float32 (3, S, S).

    RandomCropDecodeResize, RandomHorizontalFlip, [policy], [RandomColorAdjust], Normalize, HWC2CHW,
    [RandomErasing]. With every option at its default this is the project's plain training transform.

    Args:
        preprocess: image size, mean, std and interpolation of the model.
        auto_augment: "none", "randaugment", "trivialaugment" or "autoaugment" (ImageNet policy).
        ra_num_ops, ra_magnitude: RandAugment's n and m (timm's "rand-m9-n2" is the default).
        color_jitter: strength s; brightness, contrast and saturation factors drawn from [1 - s, 1 + s].
            Applied beside a policy too (timm leaves it out when a policy is on; pass 0 for that).
        random_erasing: probability of erasing one random box (area 2-33 %, aspect 0.3-3.3) with
            N(0, 1) noise after normalisation (Zhong et al. 2020; timm's re_mode="pixel").
        crop_scale, crop_ratio: area fraction and aspect range of the random resized crop.
        hflip: probability of a horizontal flip.
        decode: the input is encoded bytes (decoded inside the crop op); False: uint8 HWC arrays.
    """
    if not 0.0 <= color_jitter < 1.0:
        raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter!r} (flag --color_jitter)")
    if not 0.0 <= random_erasing <= 1.0:
        raise ValueError(f"random_erasing must be a probability in [0, 1], got {random_erasing!r} "
                         f"(flag --random_erasing)")
    size, inter = preprocess.image_size, _interpolation(preprocess)
    crop = vision.RandomCropDecodeResize if decode else vision.RandomResizedCrop
    ops = [crop(size, scale=tuple(crop_scale), ratio=tuple(crop_ratio), interpolation=inter),
           vision.RandomHorizontalFlip(prob=hflip)]
    policy = policy_op(auto_augment, preprocess, ra_num_ops, ra_magnitude)
    if policy is not None:
        ops.append(policy)
    if color_jitter > 0:
        factors = (1.0 - color_jitter, 1.0 + color_jitter)
        ops.append(vision.RandomColorAdjust(brightness=factors, contrast=factors, saturation=factors))
    # Normalize works on [0, 255] pixels; Preprocess keeps mean/std in [0, 1] units.
    ops += [vision.Normalize(mean=[255 * m for m in preprocess.mean], std=[255 * s for s in preprocess.std]),
            vision.HWC2CHW()]
    if random_erasing > 0:
        # MindSpore's RandomErasing works on CHW arrays; value="random" draws N(0, 1) per pixel.
        ops.append(vision.RandomErasing(prob=float(random_erasing), scale=(0.02, 1 / 3), ratio=(0.3, 3.3),
                                        value="random"))
    return ops


# ---------------------------------------------------------------------------------------------------------
# Mixup / CutMix on batches
# ---------------------------------------------------------------------------------------------------------

def smooth_one_hot(labels: np.ndarray, num_classes: int, smoothing: float = 0.0) -> np.ndarray:
    """Int labels (B,) -> float32 targets (B, C): on = 1 - s, off = s / (C - 1), the project's convention
    (the loss's, `vit_ms.training.optim.SoftCrossEntropy`; timm spreads s over all C classes instead: off = s / C)."""
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    off = smoothing / max(num_classes - 1, 1)
    target = np.full((labels.size, num_classes), off, dtype=np.float32)
    target[np.arange(labels.size), labels] = 1.0 - smoothing
    return target


def cutmix_box(shape: Tuple[int, ...], lam: float, rng: np.random.RandomState):
    """CutMix box for an image of `shape` (..., H, W): a box of side sqrt(1 - lam) of the image around a
    uniform random centre, clipped at the borders; returns (y0, y1, x0, x1) and lam corrected to the
    area actually kept (timm's `rand_bbox` + `correct_lam`, Yun et al. 2019)."""
    h, w = shape[-2:]
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    cy, cx = rng.randint(0, h), rng.randint(0, w)
    y0, y1 = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + (cut_h + 1) // 2, 0, h)
    x0, x1 = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + (cut_w + 1) // 2, 0, w)
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    return (int(y0), int(y1), int(x0), int(x1)), float(lam)


class MixupCutmix:
    """Batch Mixup/CutMix with soft targets, a `dataset.map` op on the ("image", "label") columns.

    Per batch: with probability `prob` mix at all; then CutMix with probability `switch_prob` when both
    alphas are positive (else whichever is on); lam ~ Beta(alpha, alpha). Image i is mixed with image
    B - 1 - i (the batch reversed). Targets: lam * t + (1 - lam) * t[::-1] with t the smoothed one-hot
    (`smooth_one_hot`). The random draws are timm's, in timm's order, from a private RandomState(seed).

    Args:
        num_classes: width of the targets.
        mixup_alpha: Beta parameter of Mixup; 0 turns Mixup off (DeiT: 0.8).
        cutmix_alpha: Beta parameter of CutMix; 0 turns CutMix off (DeiT: 1.0).
        prob: probability that a batch is mixed at all.
        switch_prob: probability of CutMix rather than Mixup when both are on.
        label_smoothing: smoothing of the targets (the loss then must not smooth again).
        seed: seed of this op's own random stream; None: fresh entropy.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1, seed: Optional[int] = None):
        if num_classes < 2:
            raise ValueError(f"MixupCutmix needs at least 2 classes, got {num_classes}")
        if mixup_alpha < 0 or cutmix_alpha < 0 or not (mixup_alpha > 0 or cutmix_alpha > 0):
            raise ValueError(f"MixupCutmix needs mixup_alpha > 0 or cutmix_alpha > 0 (flags --mixup, --cutmix), "
                             f"got {mixup_alpha} and {cutmix_alpha}")
        for name, value in (("prob", prob), ("switch_prob", switch_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"MixupCutmix {name} must be in [0, 1], got {value!r} (flag --mixup_{name})")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.num_classes = num_classes
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.label_smoothing = float(label_smoothing)
        self.rng = np.random.RandomState(seed)

    def draw(self) -> Tuple[float, bool]:
        """(lam, use_cutmix) of the next batch; lam == 1 means no mixing."""
        if self.rng.rand() >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(self.rng.rand() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return float(self.rng.beta(alpha, alpha)), use_cutmix

    def __call__(self, images: np.ndarray, labels: np.ndarray):
        """images float32 (B, C, H, W), labels int (B,) -> (mixed images float32, targets float32 (B, classes))."""
        images = np.asarray(images, dtype=np.float32)
        lam, use_cutmix = self.draw()
        mixed = images.copy()
        if lam != 1.0:
            if use_cutmix:
                (y0, y1, x0, x1), lam = cutmix_box(images.shape, lam, self.rng)
                mixed[:, :, y0:y1, x0:x1] = images[::-1, :, y0:y1, x0:x1]
            else:
                mixed = images * np.float32(lam) + images[::-1] * np.float32(1.0 - lam)
        target = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        target = target * np.float32(lam) + target[::-1] * np.float32(1.0 - lam)
        return mixed.astype(np.float32), target.astype(np.float32)


def add_batch_mixup(dataset, mixup: MixupCutmix):
    """`dataset` (batched "image", "label" columns) with `mixup` applied to every batch.

    One worker, in-process: the op's random stream is then consumed in batch order (reproducible).
    """
    return dataset.map(mixup, input_columns=["image", "label"], output_columns=["image", "label"],
                       num_parallel_workers=1, python_multiprocessing=False)


__all__ = ["AUTO_AUGMENT_POLICIES", "policy_op", "train_augmentations", "smooth_one_hot", "cutmix_box",
           "MixupCutmix", "add_batch_mixup"]
