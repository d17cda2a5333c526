"""Measuring and using a trained classifier: top-1/top-5 evaluation, and predictions people can read.

`evaluate` runs `mindspore.Model.eval` with the tutorial's metrics (`nn.Top1CategoricalAccuracy`,
`nn.Top5CategoricalAccuracy`) plus the loss and a confusion matrix, from which the per-class accuracy
follows. `predict_images` turns image files into top-k class indices, names and probabilities, with the
same preprocessing the model was trained and evaluated with (it travels in the checkpoint's metadata or
the MINDIR's sidecar). `load_classifier` builds the model from any of: a vit_ms checkpoint, an exported
MINDIR, or a preset plus foreign weights (e.g. the tutorial's `vit_b_16_224.ckpt`).
"""
from __future__ import annotations

import functools
import glob
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import nn

from . import data
from .checkpoint import load_model, make_metadata
from .config import Preprocess, ViTConfig, get_config

logger = logging.getLogger(__name__)

_IMAGENET_INDEX = Path(__file__).with_name("imagenet_class_index.json")


# ---------------------------------------------------------------------------------------------------------
# Class names
# ---------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def imagenet_classes() -> Tuple[Tuple[str, str], ...]:
    """The 1000 ImageNet-1k classes as (wnid, name), in the standard index order (sorted wnids)."""
    index = json.loads(_IMAGENET_INDEX.read_text(encoding="utf-8"))
    return tuple((index[str(i)][0], index[str(i)][1]) for i in range(len(index)))


def readable_class_names(class_names: Optional[Sequence[str]], num_classes: int) -> List[str]:
    """Names to show people, one per model output.

    A model's own names win, except that ImageNet wnids (the tutorial's class folders, e.g. "n02107142")
    become their readable name ("Doberman"). A 1000-class model without names gets the ImageNet names;
    any other unnamed model gets its indices as strings.

    Args:
        class_names: the names stored with the model, or None.
        num_classes: the model's number of outputs.
    """
    if class_names is None:
        if num_classes == len(imagenet_classes()):
            return [name for _, name in imagenet_classes()]
        return [str(i) for i in range(num_classes)]
    by_wnid = dict(imagenet_classes())
    if all(name in by_wnid for name in class_names):
        return [by_wnid[name] for name in class_names]
    return list(class_names)


# ---------------------------------------------------------------------------------------------------------
# Loading a model to evaluate or run
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Classifier:
    """A network plus what is needed to feed it and name its outputs."""

    net: nn.Cell  # ViT, or nn.GraphCell for an exported MINDIR
    config: ViTConfig
    preprocess: Preprocess
    class_names: Optional[List[str]]  # as stored with the model (folder names, wnids) or None
    labels: List[str]  # readable name per output (see readable_class_names)
    source: str  # the file the model came from
    fixed_batch: Optional[int] = None  # the batch size a static MINDIR accepts; None: any

    def metadata(self) -> dict:
        """Checkpoint-style metadata (config, preprocessing, class names) for export sidecars."""
        return make_metadata(self.config, self.class_names, self.preprocess)


def load_classifier(checkpoint=None, *, mindir=None, model: Optional[str] = None, pretrained=None,
                    num_classes: Optional[int] = None) -> Classifier:
    """Build a `Classifier` from exactly one source, in eval mode.

    Args:
        checkpoint: a vit_ms checkpoint (weights + metadata), e.g. from train.py.
        mindir: an exported MINDIR; its sidecar (`<file>.json`) gives the preprocessing and class names.
        model: a preset name (`vit_ms.PRESETS`, e.g. "tutorial") for foreign weights, with `pretrained`.
        pretrained: weights without vit_ms metadata (the tutorial's ckpt, timm, torchvision, ...), loaded
            with `vit_ms.checkpoint.load_weights`; preprocessing is the preset's default (ImageNet).
        num_classes: with `model`, the head width if not the preset's 1000.
    """
    if sum(x is not None for x in (checkpoint, mindir, model)) != 1:
        raise ValueError("give exactly one of checkpoint, mindir, or model (with pretrained)")
    fixed_batch = None
    if checkpoint is not None:
        net, meta = load_model(checkpoint)
        config, preprocess = net.config, Preprocess.from_dict(meta["preprocess"])
        class_names, source = meta.get("class_names"), str(checkpoint)
    elif mindir is not None:
        from .export import load_mindir, read_sidecar

        meta = read_sidecar(mindir)
        net = load_mindir(mindir)
        config = ViTConfig.from_dict(meta["model"])
        preprocess = Preprocess.from_dict(meta["preprocess"])
        class_names, source = meta.get("class_names"), str(mindir)
        fixed_batch = meta.get("export", {}).get("batch_size")
    else:
        if pretrained is None:
            raise ValueError(f"model {model!r} needs pretrained weights (a file path or a name known to "
                             f"vit_ms.checkpoint.resolve_pretrained)")
        from .checkpoint import load_weights, resolve_pretrained
        from .model import ViT

        overrides = {"num_classes": num_classes} if num_classes else {}
        config = get_config(model, **overrides)
        net = ViT(config)
        path = resolve_pretrained(pretrained)
        load_weights(net, path)
        preprocess = Preprocess.for_model(config)
        # Foreign ImageNet weights: the standard index order is the sorted wnids (the tutorial's folders).
        class_names = ([wnid for wnid, _ in imagenet_classes()]
                       if config.num_classes == len(imagenet_classes()) else None)
        source = str(path)
    net.set_train(False)
    return Classifier(net=net, config=config, preprocess=preprocess, class_names=class_names,
                      labels=readable_class_names(class_names, config.num_classes), source=source,
                      fixed_batch=fixed_batch)


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------

class _PerImageLoss(nn.Loss):
    """Mean loss over images. `nn.Loss` averages batch means, which over-weights a short last batch."""

    def update(self, *inputs):
        loss = self._convert_data(inputs[0]).reshape(-1)  # per-image losses (reduction="none")
        self._sum_loss += float(loss.sum())
        self._total_num += loss.size


@dataclass
class EvalResult:
    """What `evaluate` measured. Accuracies are fractions in [0, 1]."""

    num_images: int
    top_1: float
    top_5: Optional[float]  # None for models with fewer than 5 classes
    loss: float  # mean cross entropy per image (no label smoothing)
    confusion_matrix: np.ndarray  # (C, C) int: row = true class, column = predicted class
    labels: List[str] = field(default_factory=list)  # readable class names

    @property
    def per_class_accuracy(self) -> List[Optional[float]]:
        """Recall of each class (correct / images of that class); None for a class with no images."""
        support = self.confusion_matrix.sum(axis=1)
        correct = np.diag(self.confusion_matrix)
        return [float(c / s) if s else None for c, s in zip(correct, support)]

    def to_dict(self) -> dict:
        support = self.confusion_matrix.sum(axis=1)
        return {
            "num_images": self.num_images, "top_1": self.top_1, "top_5": self.top_5, "loss": self.loss,
            "per_class": [{"index": i, "name": name, "accuracy": acc, "images": int(n)}
                          for i, (name, acc, n) in enumerate(zip(self.labels, self.per_class_accuracy, support))],
        }


def evaluate(net: nn.Cell, dataset, num_classes: int, labels: Optional[Sequence[str]] = None) -> EvalResult:
    """Top-1, top-5, loss and confusion matrix of `net` over `dataset` with `mindspore.Model.eval`.

    Args:
        net: the classifier (logits out), e.g. a `ViT`.
        dataset: batches of ("image", "label"), e.g. `vit_ms.data.create_dataset(..., training=False)`.
        num_classes: the number of model outputs.
        labels: readable class names, for per-class reports.
    """
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    metrics = {"top_1": nn.Top1CategoricalAccuracy(), "loss": _PerImageLoss(),
               "confusion_matrix": nn.ConfusionMatrix(num_classes)}
    if num_classes >= 5:
        metrics["top_5"] = nn.Top5CategoricalAccuracy()
    net.set_train(False)
    eval_net = nn.WithEvalCell(net, loss_fn)
    config = getattr(net, "config", None)
    if config is not None:
        # One graph for every batch size: the last, shorter batch does not trigger a second compile.
        eval_net.set_inputs(ms.Tensor(shape=[None, config.in_channels, config.image_size, config.image_size],
                                      dtype=ms.float32), ms.Tensor(shape=[None], dtype=ms.int32))
    model = ms.Model(net, loss_fn=loss_fn, metrics=metrics, eval_network=eval_net, eval_indexes=[0, 1, 2])
    # ConfusionMatrix.eval computes every normalisation even for "no_norm" and warns on classes never
    # predicted; the raw counts we use are unaffected.
    with np.errstate(invalid="ignore", divide="ignore"):
        values = model.eval(dataset, dataset_sink_mode=False)
    matrix = np.asarray(values["confusion_matrix"]).round().astype(np.int64)
    return EvalResult(num_images=int(matrix.sum()), top_1=float(values["top_1"]),
                      top_5=float(values["top_5"]) if "top_5" in values else None, loss=float(values["loss"]),
                      confusion_matrix=matrix,
                      labels=list(labels) if labels is not None else [str(i) for i in range(num_classes)])


def evaluate_folder(classifier: Classifier, root, split: str = "val", batch_size: int = 16,
                    num_workers: Optional[int] = None) -> EvalResult:
    """Evaluate on ROOT/split/<class>/* with the classifier's own preprocessing and class order.

    Args:
        classifier: from `load_classifier`.
        root: dataset root.
        split: the split folder to evaluate.
        batch_size: images per batch.
        num_workers: decode workers.
    """
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir} not found: --data_path must hold a {split}/ folder with one "
                                f"sub-folder per class")
    num_classes = classifier.config.num_classes
    names = classifier.class_names
    if names is None:
        # No names stored: the folder order is the class order, as when the model was trained.
        names = data.class_names(root, split)
        if len(names) != num_classes:
            raise ValueError(f"{split_dir} has {len(names)} class folders but the model has {num_classes} "
                             f"outputs and stores no class names to match them by")
    dataset, _ = data.create_dataset(root, split, classifier.preprocess, batch_size, training=False,
                                  num_workers=num_workers, class_names=names)
    return evaluate(classifier.net, dataset, num_classes, classifier.labels)


# ---------------------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Prediction:
    """The top-k classes of one image, most probable first."""

    path: str
    indices: List[int]
    names: List[str]
    probabilities: List[float]

    def to_dict(self) -> dict:
        return {"path": self.path, "top_k": [{"index": i, "name": n, "probability": p}
                                             for i, n, p in zip(self.indices, self.names, self.probabilities)]}


def find_images(inputs: Sequence[str]) -> Tuple[List[Path], List[Tuple[str, str]]]:
    """Expand files, folders (recursively, image extensions only) and glob patterns into image paths.

    A file named explicitly is taken whatever its extension (it is reported later if it cannot be
    decoded). Returns (paths in a stable order without duplicates, [(input, reason)] for inputs that
    matched nothing).
    """
    extensions = {ext.lower() for ext in data.IMAGE_EXTENSIONS}

    def in_folder(folder: Path) -> List[Path]:
        return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions)

    found, missing = [], []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_file():  # checked before globbing: names may contain [ ] * ?
            found.append(path)
        elif path.is_dir():
            images = in_folder(path)
            found += images
            if not images:
                missing.append((item, "folder holds no image files"))
        else:
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
            images = ([m for m in matches if m.is_file() and m.suffix.lower() in extensions]
                      + [p for m in matches if m.is_dir() for p in in_folder(m)])
            found += images
            if not images:
                missing.append((item, "no such file, folder or matching pattern"))
    unique = list(dict.fromkeys(found))
    return unique, missing


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable for large logits)."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def run_batch(classifier: Classifier, images: np.ndarray) -> np.ndarray:
    """Logits (B, C) for preprocessed images (B, 3, S, S); pads to a static MINDIR's fixed batch."""
    n = images.shape[0]
    fixed = classifier.fixed_batch
    if fixed is None:
        return classifier.net(ms.Tensor(images)).asnumpy()
    outputs = []
    for start in range(0, n, fixed):
        chunk = images[start:start + fixed]
        pad = np.zeros((fixed - len(chunk),) + chunk.shape[1:], chunk.dtype)
        outputs.append(classifier.net(ms.Tensor(np.concatenate([chunk, pad]))).asnumpy()[:len(chunk)])
    return np.concatenate(outputs)


def predict_images(classifier: Classifier, paths: Sequence, top_k: int = 5,
                   batch_size: int = 16) -> Tuple[List[Prediction], List[Tuple[str, str]]]:
    """Top-k predictions for image files; unreadable files are skipped and reported.

    Args:
        classifier: from `load_classifier`.
        paths: image files (see `find_images`).
        top_k: classes reported per image (capped at the number of classes).
        batch_size: images per forward pass.

    Returns:
        (one `Prediction` per readable image in input order, [(path, reason)] for each skipped file).
    """
    k = min(top_k, classifier.config.num_classes)
    predictions, skipped = [], []
    pending: List[Tuple[str, np.ndarray]] = []

    def flush():
        if not pending:
            return
        probs = softmax(run_batch(classifier, np.stack([array for _, array in pending])))
        for (path, _), row in zip(pending, probs):
            order = np.argsort(-row, kind="stable")[:k]
            predictions.append(Prediction(path=path, indices=[int(i) for i in order],
                                          names=[classifier.labels[i] for i in order],
                                          probabilities=[float(row[i]) for i in order]))
        pending.clear()

    for path in paths:
        try:
            array = data.preprocess_image(data.load_image(path), classifier.preprocess)
        except Exception as error:  # any decode failure (PIL raises several types): report it, keep going
            reason = f"{type(error).__name__}: {error}"
            logger.warning("skipping %s: %s", path, reason)
            skipped.append((str(path), reason))
            continue
        pending.append((str(path), array))
        if len(pending) == batch_size:
            flush()
    flush()
    return predictions, skipped


__all__ = ["imagenet_classes", "readable_class_names", "Classifier", "load_classifier", "EvalResult",
           "evaluate", "evaluate_folder", "Prediction", "find_images", "softmax", "run_batch",
           "predict_images"]
