"""Input pipelines on `mindspore.dataset.ImageFolderDataset`, shared by training, evaluation and inference.

Layout: ROOT/{train,val}/<class>/<image>; classes are the sorted folder names.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import List, Optional

import mindspore as ms
import mindspore.dataset as ds
import mindspore.dataset.vision as vision
from mindspore.dataset.transforms import TypeCast

from .config import Preprocess

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def class_names(root, split: str = "train") -> List[str]:
    """Sorted class folder names of ROOT/split."""
    split_dir = Path(root) / split
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir())


def create_dataset(root, split: str, preprocess: Preprocess, batch_size: int, *, training: Optional[bool] = None,
                   num_workers: Optional[int] = None, num_shards: Optional[int] = None,
                   shard_id: Optional[int] = None, shuffle: Optional[bool] = None,
                   drop_remainder: Optional[bool] = None) -> ds.Dataset:
    """Batches of ("image" float32 (B, 3, S, S), "label" int32 (B,)) from ROOT/split.

    Args:
        root: dataset root holding one folder per split.
        split: "train", "val", ...
        preprocess: image size, mean, std and crop ratio (from the model's config or checkpoint).
        batch_size: images per batch.
        training: random-crop/flip augmentation; defaults to `split == "train"`.
        num_workers: parallel decode workers, capped at the core count.
        num_shards, shard_id: data-parallel sharding.
        shuffle, drop_remainder: default to `training`.
    """
    training = split == "train" if training is None else training
    shuffle = training if shuffle is None else shuffle
    drop_remainder = training if drop_remainder is None else drop_remainder
    workers = min(num_workers or os.cpu_count() or 1, os.cpu_count() or 1)
    dataset = ds.ImageFolderDataset(str(Path(root) / split), shuffle=shuffle, num_shards=num_shards,
                                    shard_id=shard_id, num_parallel_workers=workers,
                                    extensions=[e for ext in IMAGE_EXTENSIONS for e in (ext, ext.upper())])
    mean = [255 * m for m in preprocess.mean]
    std = [255 * s for s in preprocess.std]
    size = preprocess.image_size
    if training:
        transforms = [vision.RandomCropDecodeResize(size, scale=(0.08, 1.0), ratio=(0.75, 1.333)),
                      vision.RandomHorizontalFlip(prob=0.5)]
    else:
        transforms = [vision.Decode(), vision.Resize(preprocess.resize_size), vision.CenterCrop(size)]
    transforms += [vision.Normalize(mean=mean, std=std), vision.HWC2CHW()]
    dataset = dataset.map(transforms, input_columns="image", num_parallel_workers=workers)
    dataset = dataset.map(TypeCast(ms.int32), input_columns="label", num_parallel_workers=workers)
    return dataset.batch(batch_size, drop_remainder=drop_remainder)


__all__ = ["IMAGE_EXTENSIONS", "class_names", "create_dataset"]
