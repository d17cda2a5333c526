"""Data for vit_ms: image files and their check, the input pipelines, the sample set and the tutorial download.

Modules, one concept each:

- `files`: what an image file is (`is_image_file`, `IMAGE_EXTENSIONS`), the data root, listing, and the
  per-file check (`check_image`: "full", "header" or "none"; decompression bombs refused).
- `manifest`: the check at scale, cached per file (path, size, mtime) and shared out between msrun ranks.
- `pipeline`: `create_dataset` -> (dataset, `DatasetInfo`) for train and eval, the transforms, and
  `load_image` / `preprocess_image` for single images; one decoding convention for all of them.
- `augment`: fine-tuning augmentation: an auto-augment policy, colour jitter, random erasing
  (`train_augmentations`, used by `create_dataset(..., augmentation=...)`) and batch Mixup/CutMix.
- `shrink`: a copy of an image folder with large photos made smaller (`shrink_images`), once, for speed.
- `sample`: the embedded offline sample set; `download`: the tutorial's ImageNet subset.
- `__main__`: `python -m vit_ms.data {verify,shrink,sample,download}`.

Every public name is importable from `vit_ms.data`. Names load on first use, so `python -m vit_ms.data
verify` and the check do not import MindSpore.
"""
from .._lazy import lazy_exports

_EXPORTS = {
    "files": ["IMAGE_EXTENSIONS", "MAX_IMAGE_PIXELS", "CHECK_MODES", "DATA_ENV", "DatasetError",
              "UnreadableImageError", "default_data_root", "is_image_file", "count_images", "list_images",
              "list_image_paths", "check_image", "check_images", "verify_images"],
    "manifest": ["check_split", "manifest_path"],
    "pipeline": ["DatasetInfo", "load_image", "to_channels", "preprocess_image", "eval_transforms", "train_transforms",
                 "class_names", "scan_split", "scan_split_paths", "create_dataset"],
    "augment": ["AUTO_AUGMENT_POLICIES", "policy_op", "train_augmentations", "smooth_one_hot", "cutmix_box",
                "MixupCutmix", "add_batch_mixup"],
    "shrink": ["ShrinkReport", "shrink_images", "short_side_for", "large_photo_hint"],
    "sample": ["SAMPLE_CLASSES", "SAMPLE_VERSION", "ensure_sample_dataset"],
    "download": ["TUTORIAL_URL", "download_tutorial_dataset"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS, extra=["main"])


def main(argv=None) -> int:
    """`python -m vit_ms.data` as a function (see `vit_ms.data.__main__`)."""
    from .__main__ import main as run  # not imported above: `python -m` would then warn about a re-import

    return run(argv)
