"""A named model zoo: public ViT weights with everything needed to use them (as torchvision's `Weights`).

Each `Weights` entry bundles the URL, the file hash where the publisher gives one (torchvision's URLs
embed the first 8 hex digits of the file's SHA-256, which `torch.hub` checks; so do we after every
download), the vit_ms preset, the naming scheme, the eval preprocessing and the top-1 the publisher
reports. Every URL and figure is cited from the publisher's source beside its entry; a field that could
not be checked there is None, never a guess.

Downloads land in `vit_ms.files.cache_dir("weights")` through an atomic write: a failed or corrupted
download leaves nothing under the final name. `python -m vit_ms.checkpoint list` prints the table.
"""
from __future__ import annotations

import difflib
import hashlib
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from ..config import IMAGENET_MEAN, IMAGENET_STD, Preprocess, ViTConfig, get_config
from ..files import atomic_path, cache_dir

logger = logging.getLogger(__name__)

MIRROR_ENV = "VIT_MS_PRETRAINED_URL"  # a mirror folder replacing every URL's directory part
DOWNLOAD_TIMEOUT_S = 60  # per socket operation; a dead server fails instead of hanging


@dataclass(frozen=True)
class Weights:
    """One downloadable checkpoint: where it lives and what it needs."""

    url: str
    preset: str  # a `vit_ms.PRESETS` name
    source: str  # naming scheme (a key of `vit_ms.checkpoint.FORMATS`)
    image_size: int = 224  # the input side the weights were fine-tuned at
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    crop_pct: Optional[float] = None  # eval resize-then-crop ratio; None: not published (0.875 used)
    interpolation: Optional[str] = None  # eval resize filter; None: not published (bilinear used)
    top1: Optional[float] = None  # ImageNet-1k val top-1 (%) as the publisher reports it; None: not found
    sha256: Optional[str] = None  # a full SHA-256, or the prefix the publisher gives
    reference: str = ""  # where the URL and figures come from

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[1]

    def config(self, **overrides) -> ViTConfig:
        """The ViTConfig these weights fit: the preset at `image_size`, with the scheme's numerics."""
        from .formats import FORMATS

        fmt = FORMATS[self.source]
        numerics = {} if self.preset == "tutorial" else {"norm_eps": fmt.norm_eps,
                                                         "gelu_approximate": fmt.gelu_approximate}
        return get_config(self.preset, **{"image_size": self.image_size, **numerics, **overrides})

    def preprocess(self) -> Preprocess:
        return Preprocess(image_size=self.image_size, mean=self.mean, std=self.std,
                          crop_pct=self.crop_pct or 0.875, interpolation=self.interpolation or "bilinear")


_TV = "torchvision/models/vision_transformer.py (pytorch/vision 07a929e8)"
_TV_URL = "https://download.pytorch.org/models"
_TIMM = "timm 1.0.31 timm/models/vision_transformer.py default_cfgs"
_AUGREG_URL = "https://storage.googleapis.com/vit_models/augreg"
_MINDCV = "mindspore-lab/mindcv mindcv/models/vit.py (VisionTransformer rewrite) and configs/vit/README.md"
_MINDCV_URL = "https://download.mindspore.cn/toolkits/mindcv/vit"
_INCEPTION = (0.5, 0.5, 0.5)  # timm's IMAGENET_INCEPTION_MEAN / _STD


def _augreg(preset: str, size: int, run: str, lr: str) -> Weights:
    # timm's _cfg for these entries: mean/std IMAGENET_INCEPTION (0.5), interpolation bicubic, crop_pct
    # 0.9 at 224 and 1.0 at 384 (`input_size=(3, 384, 384), crop_pct=1.0`). timm publishes top-1 in its
    # results CSVs, which are not part of the package and could not be checked: left None.
    return Weights(url=f"{_AUGREG_URL}/{run}--imagenet2012-steps_20k-lr_{lr}-res_{size}.npz",
                   preset=preset, source="jax", image_size=size, mean=_INCEPTION, std=_INCEPTION,
                   crop_pct=0.9 if size == 224 else 1.0, interpolation="bicubic",
                   reference=f"{_TIMM}: '{_TIMM_NAMES[preset]}_{size}.augreg_in21k_ft_in1k'")


def _torchvision(file: str, preset: str, top1: float, weights: str, **preprocess) -> Weights:
    # torchvision names each file <model>-<first 8 hex digits of its SHA-256>.pth.
    return Weights(url=f"{_TV_URL}/{file}", preset=preset, source="torchvision", top1=top1,
                   sha256=file.rsplit("-", 1)[1].split(".")[0], reference=f"{_TV}: {weights}",
                   **{"crop_pct": 224 / 256, "interpolation": "bilinear", **preprocess})


_TIMM_NAMES = {"vit_ti_16": "vit_tiny_patch16", "vit_s_16": "vit_small_patch16", "vit_b_16": "vit_base_patch16",
               "vit_l_16": "vit_large_patch16"}
# The ImageNet-21k pre-training run each fine-tune starts from (the file name's first half) and the
# ImageNet-1k fine-tuning learning rate (its second half).
_AUGREG_RUNS = {
    "vit_ti_16": ("Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0", "0.03"),
    "vit_s_16": ("S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0", "0.03"),
    "vit_b_16": ("B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0", "0.01"),
    "vit_l_16": ("L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1", "0.01"),
}

ZOO: Dict[str, Weights] = {
    # The MindSpore ViT tutorial's ImageNet-1k ViT-B/16 (346 MB, weights only, tutorial names); the tutorial
    # evaluates with Resize(256) + CenterCrop(224) and ImageNet mean/std; it reports no top-1.
    "vit_b_16_224": Weights(url="https://download.mindspore.cn/vision/classification/vit_b_16_224.ckpt",
                            preset="tutorial", source="tutorial", crop_pct=224 / 256, interpolation="bilinear",
                            reference="MindSpore ViT tutorial (vit_b_16_224.ckpt)"),
    # torchvision: ImageClassification(crop_size=224) resizes to 256 (bilinear) unless resize_size is given;
    # acc@1 from each Weights' meta["_metrics"]["ImageNet-1K"].
    "tv_vit_b_16": _torchvision("vit_b_16-c867db91.pth", "vit_b_16", 81.072, "ViT_B_16_Weights.IMAGENET1K_V1"),
    "tv_vit_b_32": _torchvision("vit_b_32-d86f8d99.pth", "vit_b_32", 75.912, "ViT_B_32_Weights.IMAGENET1K_V1"),
    "tv_vit_l_16": _torchvision("vit_l_16-852ce7e3.pth", "vit_l_16", 79.662,
                                "ViT_L_16_Weights.IMAGENET1K_V1 (resize_size=242)", crop_pct=224 / 242),
    "tv_vit_l_32": _torchvision("vit_l_32-c7638314.pth", "vit_l_32", 76.972, "ViT_L_32_Weights.IMAGENET1K_V1"),
    # ViT-H/14 has only SWAG weights in torchvision: end-to-end fine-tuned at 518 and a linear head at 224,
    # both resized straight to the crop size (bicubic).
    "tv_vit_h_14_swag": _torchvision("vit_h_14_swag-80465313.pth", "vit_h_14", 88.552,
                                     "ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1", image_size=518, crop_pct=1.0,
                                     interpolation="bicubic"),
    "tv_vit_h_14_swag_linear": _torchvision("vit_h_14_lc_swag-c1eb923e.pth", "vit_h_14", 85.708,
                                            "ViT_H_14_Weights.IMAGENET1K_SWAG_LINEAR_V1", crop_pct=1.0,
                                            interpolation="bicubic"),
    # mindcv's second-generation checkpoints (our names, MindSpore numerics). Top-1 from configs/vit/README.md;
    # eval interpolation bicubic and crop_pct 0.875 from configs/vit/vit_{b32,l16,l32}_224_ascend.yaml (the
    # B/32 yaml sets no crop_pct: None).
    "mindcv_vit_b_32_224": Weights(url=f"{_MINDCV_URL}/vit_b_32_224-4a1c9d8e.ckpt", preset="vit_b_32",
                                   source="mindcv", interpolation="bicubic", top1=77.45, reference=_MINDCV),
    "mindcv_vit_l_16_224": Weights(url=f"{_MINDCV_URL}/vit_l_16_224-d2635f8b.ckpt", preset="vit_l_16",
                                   source="mindcv", crop_pct=0.875, interpolation="bicubic", top1=81.25,
                                   reference=_MINDCV),
    "mindcv_vit_l_32_224": Weights(url=f"{_MINDCV_URL}/vit_l_32_224-8c8ea164.ckpt", preset="vit_l_32",
                                   source="mindcv", crop_pct=0.875, interpolation="bicubic", top1=74.57,
                                   reference=_MINDCV),
}
for _preset, (_run, _lr) in _AUGREG_RUNS.items():
    for _size in (224, 384):
        ZOO[f"augreg_{_preset}_{_size}"] = _augreg(_preset, _size, _run, _lr)

# The name the tutorial recipe and older code use.
PRETRAINED = ZOO


def default_cache_dir() -> Path:
    """Where downloads go: `vit_ms.files.cache_dir("weights")` ($VIT_MS_HOME/weights)."""
    return cache_dir("weights")


def resolve_pretrained(name_or_path, cache_dir=None, base_url: Optional[str] = None) -> Path:
    """A local file for a named zoo entry (downloaded once into the cache and verified) or a path.

    Args:
        name_or_path: an existing file or folder, or a key of `ZOO` (e.g. "vit_b_16_224").
        cache_dir: where downloads go; default `default_cache_dir()`.
        base_url: a mirror folder replacing the URL's directory (also read from $VIT_MS_PRETRAINED_URL).
    """
    path = Path(str(name_or_path)).expanduser()
    if path.exists():
        return path
    if name_or_path not in ZOO:
        close = difflib.get_close_matches(str(name_or_path), ZOO, n=1)
        raise FileNotFoundError(f"{name_or_path} is neither a file nor a named pretrained checkpoint"
                                f"{f' (did you mean {close[0]}?)' if close else ''}; the names: "
                                f"{', '.join(sorted(ZOO))}")
    return download_weights(ZOO[name_or_path], cache_dir, base_url)


def download_weights(entry: Weights, cache_dir=None, base_url: Optional[str] = None) -> Path:
    """Download `entry` into the cache unless already there; verify its hash; return the file."""
    url = entry.url
    base_url = base_url or os.environ.get(MIRROR_ENV)
    if base_url:
        url = base_url.rstrip("/") + "/" + entry.filename
    target = Path(cache_dir or default_cache_dir()).expanduser() / entry.filename
    if target.is_file():
        logger.info("using cached %s", target)
        return target
    logger.info("downloading %s to %s", url, target)
    by_hand = f"Download it by hand and put it at {target} (or pass its path instead of the name)."
    try:
        with atomic_path(target) as tmp:
            digest = _fetch(url, tmp)
            if entry.sha256 and not digest.startswith(entry.sha256.lower()):
                raise _HashMismatch(f"the download from {url} has SHA-256 {digest}, the publisher's is "
                                    f"{entry.sha256}...: it is corrupt or was changed, and was deleted. "
                                    f"Retry, or {by_hand[0].lower()}{by_hand[1:]}")
    except _HashMismatch as error:
        raise RuntimeError(str(error)) from None
    except (OSError, urllib.error.URLError, ValueError) as error:  # offline, HTTP error, disk full
        raise RuntimeError(f"could not download {entry.filename} from {url} ({type(error).__name__}: {error}). "
                           f"{by_hand}") from error
    return target


class _HashMismatch(Exception):
    pass


def _fetch(url: str, path: Path) -> str:
    """Stream `url` into `path`; returns the SHA-256 of what was written."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(path, "wb") as out:
        while True:
            chunk = response.read(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def create_pretrained(name: str, fast=None, cache_dir=None, **overrides):
    """Build the ViT a zoo entry describes and load its weights (what `create_model(..., pretrained=NAME)`
    does): returns the net; `ZOO[name].preprocess()` is its eval preprocessing.

    Args:
        name: a key of `ZOO`.
        fast: passed to `vit_ms.create_model` (None: the model's policy decides).
        cache_dir: where downloads go (default `default_cache_dir()`).
        **overrides: ViTConfig fields, e.g. `num_classes=10` (the published head is then dropped).
    """
    from ..model import create_model
    from .loading import load_weights

    if name not in ZOO:
        raise ValueError(f"unknown pretrained weights {name!r}; choose one of {sorted(ZOO)}")
    entry = ZOO[name]
    kwargs = {} if fast is None else {"fast": fast}
    net = create_model(entry.config(**overrides), **kwargs)
    load_weights(net, download_weights(entry, cache_dir), source=entry.source)
    return net


def zoo_table() -> str:
    """The zoo as a Markdown table (what `python -m vit_ms.checkpoint list` prints)."""
    rows = ["| name | preset | image | scheme | top-1 (publisher) | mean / std | crop_pct | interpolation | hash | url |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, w in ZOO.items():
        stats = "ImageNet" if (w.mean, w.std) == (IMAGENET_MEAN, IMAGENET_STD) else f"{w.mean[0]} / {w.std[0]}"
        rows.append(f"| {name} | {w.preset} | {w.image_size} | {w.source} | "
                    f"{'' if w.top1 is None else w.top1} | {stats} | "
                    f"{'' if w.crop_pct is None else round(w.crop_pct, 3)} | {w.interpolation or ''} | "
                    f"{w.sha256 or ''} | {w.url} |")
    return "\n".join(rows)


__all__ = ["Weights", "ZOO", "PRETRAINED", "MIRROR_ENV", "default_cache_dir", "resolve_pretrained",
           "download_weights", "create_pretrained", "zoo_table"]
