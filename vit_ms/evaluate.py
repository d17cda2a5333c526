"""Measuring and using a trained classifier: evaluation metrics, and fast batch predictions people can read.

Both evaluation and prediction run image files through one batch engine (`classify_files`): every file
is checked first with `vit_ms.data.check_image` (a bad file is reported with its reason, never fatal),
then the good ones are read by a `mindspore.dataset` pipeline that decodes and applies the model's eval
transforms (`vit_ms.data.eval_transforms`: resize, centre crop, normalise) in parallel C++ workers while
the model runs. The preprocessing travels in the checkpoint's metadata or the MINDIR's sidecar, so
train, eval and infer cannot drift apart.

`evaluate_folder` measures top-1/top-5, cross-entropy and the confusion matrix (NumPy, from the logits,
which it keeps for `vit_ms.report`); `predict_images` gives top-k classes per file; `run_inference` adds
annotated pictures, drawn by `vit_ms.viz` in a thread pool so that writing them never stalls the model.
`load_classifier` builds the model from a vit_ms checkpoint, an exported MINDIR, or a preset plus
foreign weights (e.g. the tutorial's `vit_b_16_224.ckpt`).
"""
from __future__ import annotations

import csv
import functools
import glob
import io
import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import mindspore as ms
import mindspore.dataset as ds
import numpy as np
from mindspore import nn

from . import data
from .data.files import worker_count
from .checkpoint import load_model, make_metadata
from .config import Preprocess, ViTConfig, get_config
from .files import write_text_atomic

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
    fixed_batch: Optional[int] = None  # the one batch size the graph takes (a static MINDIR's); None: any

    def metadata(self) -> dict:
        """Checkpoint-style metadata (config, preprocessing, class names) for export sidecars."""
        return make_metadata(self.config, self.class_names, self.preprocess)

    def class_index(self, name: str) -> Optional[int]:
        """The output index of a class given by its stored name (e.g. a folder name) or readable label."""
        if self.class_names is not None and name in self.class_names:
            return self.class_names.index(name)
        return self.labels.index(name) if name in self.labels else None


def load_classifier(checkpoint=None, *, mindir=None, model: Optional[str] = None, pretrained=None,
                    num_classes: Optional[int] = None, cache_graphs: bool = False,
                    pack_weights: bool = False, batch_size: Optional[int] = None) -> Classifier:
    """Build a `Classifier` from exactly one source, in eval mode.

    Args:
        checkpoint: a vit_ms checkpoint (weights + metadata), e.g. from train.py.
        mindir: an exported MINDIR; its sidecar (`<file>.json`) gives the preprocessing and class names.
        model: a preset name (`vit_ms.PRESETS`, e.g. "tutorial") for foreign weights, with `pretrained`.
        pretrained: weights without vit_ms metadata (the tutorial's ckpt, timm, torchvision, ...), loaded
            with `vit_ms.checkpoint.load_weights`; preprocessing is the preset's default (ImageNet).
        num_classes: with `model`, the head width if not the preset's 1000.
        cache_graphs: keep the graphs this process compiles for the next run of the same command
            (`vit_ms.graph_cache`, graph mode only), what eval.py and infer.py ask for. MindSpore's cache
            is process-wide and files graphs by the order they compile in, so only a process that compiles
            nothing but this classifier's graphs should turn it on (not a test run, not training's
            in-process follow-ups, not export).
        pack_weights: pack the weights for inference (`vit_ms.packing`: faster at batch 1, no gradients or
            attention maps afterwards), what infer.py asks for; skipped, with an INFO line saying why, where
            the network cannot be packed (a MINDIR, MindSpore's own ops, widths not multiples of 16).
        batch_size: compile the graph for this one batch size, where the caller knows every batch has it
            (`run_batch` pads a shorter one), instead of for any batch size. A graph with a dynamic batch
            infers every op's output shape again at each call: ViT-Ti/16 and ViT-S/16 batch-1 inference ran
            1.11x and 1.23x as fast on the fixed batch (README, "Round 30"). None (the default): any batch
            size, one compile for all. Graph mode only (PyNative compiles nothing); a MINDIR keeps the batch
            it was exported with.

    Raises:
        FileNotFoundError: naming the file that is missing (the model file before its sidecar).
    """
    if sum(x is not None for x in (checkpoint, mindir, model)) != 1:
        raise ValueError("give exactly one of checkpoint, mindir, or model (with pretrained)")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    fixed_batch = None
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint file {checkpoint} not found")
        net, meta = load_model(checkpoint)
        config, preprocess = net.config, Preprocess.from_dict(meta["preprocess"])
        class_names, source = meta.get("class_names"), str(checkpoint)
    elif mindir is not None:
        from .export import load_mindir, read_sidecar

        if not Path(mindir).is_file():  # the model first: its sidecar is missing too, but that is not the news
            raise FileNotFoundError(f"MINDIR file {mindir} not found")
        meta = read_sidecar(mindir)
        if meta.get("export", {}).get("with_preprocess"):
            raise ValueError(f"{mindir} was exported with --with_preprocess: it takes uint8 images of one fixed "
                             f"size, not this pipeline's tensors; serve it directly (README, 'Deploy'), or "
                             f"export without --with_preprocess for eval.py/infer.py")
        net = load_mindir(mindir)
        config = ViTConfig.from_dict(meta["model"])
        preprocess = Preprocess.from_dict(meta["preprocess"])
        class_names, source = meta.get("class_names"), str(mindir)
        fixed_batch = meta.get("export", {}).get("batch_size")
    else:
        if pretrained is None:
            raise ValueError(f"model {model!r} needs pretrained weights (a file path or a name known to "
                             f"vit_ms.checkpoint.resolve_pretrained)")
        from .checkpoint import ZOO, load_weights, resolve_pretrained
        from .model import create_model

        overrides = {"num_classes": num_classes} if num_classes else {}
        entry = ZOO.get(str(pretrained))
        if entry is not None:
            # A named download brings its own architecture and preprocessing (AugReg weights use mean/std
            # 0.5, not ImageNet's); the preset named by `model` must agree with it.
            if model != entry.preset and model not in (None, ""):
                logger.warning("%s is a %s; using that architecture instead of --model %s", pretrained,
                               entry.preset, model)
            config, preprocess = entry.config(**overrides), entry.preprocess()
            net = create_model(config)
            path = resolve_pretrained(pretrained)
            load_weights(net, path, source=entry.source)
        else:
            config = get_config(model, **overrides)
            net = create_model(config)
            path = resolve_pretrained(pretrained)
            load_weights(net, path)
            preprocess = Preprocess.for_model(config)
        # Foreign ImageNet weights: the standard index order is the sorted wnids (the tutorial's folders).
        class_names = ([wnid for wnid, _ in imagenet_classes()]
                       if config.num_classes == len(imagenet_classes()) else None)
        source = str(path)
    net.set_train(False)
    packed = pack_weights and _pack(net)
    if fixed_batch is None and not isinstance(net, nn.GraphCell):
        if batch_size is not None and ms.get_context("mode") == ms.GRAPH_MODE:
            fixed_batch = batch_size  # graph mode compiles for the shape of the first call
            logger.info("one graph for batches of %s", "1 image" if batch_size == 1 else
                        f"{batch_size} images (a shorter batch is padded)")
        else:
            from .model import set_dynamic_batch

            set_dynamic_batch(net, config)  # graph mode: one compile for every batch size (the last is short)
        if cache_graphs:
            _cache_compiled_graphs(config, packed, fixed_batch)
    return Classifier(net=net, config=config, preprocess=preprocess, class_names=class_names,
                      labels=readable_class_names(class_names, config.num_classes), source=source,
                      fixed_batch=fixed_batch)


def _pack(net) -> bool:
    """Pack `net`'s weights for inference where it can be (`vit_ms.packing`); whether it was."""
    from .packing import pack_for_inference, why_not_packable

    reason = "a MINDIR holds its own graph" if isinstance(net, nn.GraphCell) else why_not_packable(net)
    if reason is not None:
        logger.info("weights not packed for inference: %s", reason)
        return False
    pack_for_inference(net)
    return True


def _cache_compiled_graphs(config: ViTConfig, packed: bool, fixed_batch: Optional[int]) -> None:
    """Keep this process's compiled graphs for the next run of the same command (`vit_ms.graph_cache`).

    Nothing has compiled yet: building a network does not compile it, its first call does. MindSpore
    files cached graphs by the order they were compiled in, so the key holds everything that changes which
    graphs a run compiles: the model, the execution mode, the script and the names of its options (infer.py
    with --attention compiles a different first graph than without), whether the weights are packed
    (another kernel setting, the same graph otherwise), and the batch size a fixed-batch graph is compiled
    for. Option values (image paths, --top_k) stay out of it: with the dynamic batch, or the same fixed
    one, they compile the same graphs. A MINDIR is not cached: its
    graph comes from the file, not from the vit_ms sources the key digests.
    """
    import sys

    from . import graph_cache

    if ms.get_context("mode") != ms.GRAPH_MODE:
        return  # PyNative compiles no whole-network graph
    argv = sys.argv or [""]
    options = sorted({arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("--")})
    settings = {"model": config.to_dict(), "fixed_batch": fixed_batch, "mode": "graph", "packed": packed,
                "device": ms.get_context("device_target"), "script": Path(argv[0]).name, "options": options}
    folder = graph_cache.enable("classify", settings)
    if folder is not None:
        logger.info("compiled graphs cached in %s (VIT_MS_GRAPH_CACHE=0 turns this off)", folder)


def run_batch(classifier: Classifier, images: np.ndarray) -> np.ndarray:
    """Logits (B, C) for preprocessed images (B, 3, S, S); pads to the classifier's fixed batch, if it has one."""
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


# ---------------------------------------------------------------------------------------------------------
# The batch engine: check files, decode in a parallel pipeline, run the model
# ---------------------------------------------------------------------------------------------------------

def check_files(paths: Sequence, num_workers: Optional[int] = None) -> Tuple[List[int], List[Tuple[str, str]]]:
    """Positions of the decodable files in `paths`, and (path, reason) for each other one.

    Uses `vit_ms.data.check_image` in threads, so a file the pipeline would choke on is reported instead. The
    header check: a JPEG is decoded only when its end marker is missing (truncated), which costs a tenth of
    the full check (hymenoptera, 397 photos: 0.11 vs 0.94 s on one core) and leaves the model the cores;
    damage that only a decode finds still stops the pipeline, and `classify_files` then reads the rest
    one by one and reports that file.
    """
    def reason(path) -> Optional[str]:
        path = Path(path)
        return "no such file" if not path.is_file() else data.check_image(path, "header")

    with ThreadPoolExecutor(worker_count(num_workers)) as pool:
        reasons = list(pool.map(reason, paths))
    good = [i for i, r in enumerate(reasons) if r is None]
    bad = [(str(p), r) for p, r in zip(paths, reasons) if r is not None]
    for path, why in bad:
        logger.warning("skipping %s: %s", path, why)
    return good, bad


class _EncodedFiles:
    """Random-access source for the pipeline: (encoded bytes uint8 (n,), position int64 ()) per file."""

    def __init__(self, paths: Sequence):
        self.paths = [str(p) for p in paths]

    def __getitem__(self, index):
        return np.fromfile(self.paths[index], dtype=np.uint8), np.int64(index)

    def __len__(self):
        return len(self.paths)


def _pipeline(paths: Sequence, preprocess: Preprocess, batch_size: int, num_workers: Optional[int]):
    # One source thread (it only reads bytes) and the C++ map workers for decode and transforms, as in
    # vit_ms.data.create_dataset: Python source threads would fight the map workers over the GIL.
    dataset = ds.GeneratorDataset(_EncodedFiles(paths), column_names=["image", "position"], shuffle=False,
                                  num_parallel_workers=1, python_multiprocessing=False)
    dataset = dataset.map(data.eval_transforms(preprocess), input_columns="image",
                          num_parallel_workers=worker_count(num_workers))
    return dataset.batch(batch_size).create_tuple_iterator(output_numpy=True, num_epochs=1)


@dataclass
class Batch:
    """One forward pass over image files: which files, what the model saw, what it said."""

    positions: List[int]  # indices into the `paths` given to `classify_files`
    images: np.ndarray  # (B, 3, S, S) float32, preprocessed
    logits: np.ndarray  # (B, C)


def classify_files(classifier: Classifier, paths: Sequence, batch_size: int = 16,
                   num_workers: Optional[int] = None,
                   skipped: Optional[List[Tuple[str, str]]] = None) -> Iterator[Batch]:
    """Run the classifier over image files in batches, in the order given; bad files are left out.

    Every file is checked first (`check_files`); the good ones are decoded and transformed by a
    `mindspore.dataset` pipeline (parallel C++ workers, `vit_ms.data.eval_transforms`) that prepares the
    next batches while the model runs. Should the pipeline still fail on a file that passed the check,
    the files not yet classified are read one by one with Pillow (same transforms) and any failure is
    reported for its file alone.

    Args:
        classifier: from `load_classifier`.
        paths: image files.
        batch_size: images per forward pass.
        num_workers: decode workers (default: all cores).
        skipped: a list that receives (path, reason) for every file left out.

    Yields:
        `Batch`es covering every readable file once, in input order.
    """
    skipped = [] if skipped is None else skipped
    good, bad = check_files(paths, num_workers)
    skipped += bad
    if not good:
        return
    done = 0  # files of `good` yielded so far
    batches = _pipeline([paths[i] for i in good], classifier.preprocess, batch_size, num_workers)
    while True:
        try:
            images, positions = next(batches)
        except StopIteration:
            return
        except RuntimeError as error:  # MindSpore wraps a decode failure in RuntimeError
            logger.warning("the decode pipeline stopped (%s); reading the other %d file(s) one by one",
                           str(error).strip().splitlines()[0], len(good) - done)
            break
        yield Batch([good[int(p)] for p in positions], images, run_batch(classifier, images))
        done += len(positions)
    yield from _classify_one_by_one(classifier, paths, good[done:], batch_size, skipped)


def _classify_one_by_one(classifier, paths, positions, batch_size, skipped) -> Iterator[Batch]:
    pending: List[Tuple[int, np.ndarray]] = []
    for i, position in enumerate(positions):
        try:
            array = data.preprocess_image(data.load_image(paths[position]), classifier.preprocess)
        except Exception as error:  # any decode failure (PIL raises several types): report it, keep going
            reason = f"{type(error).__name__}: {error}"
            logger.warning("skipping %s: %s", paths[position], reason)
            skipped.append((str(paths[position]), reason))
        else:
            pending.append((position, array))
        if pending and (len(pending) == batch_size or i == len(positions) - 1):
            images = np.stack([a for _, a in pending])
            yield Batch([p for p, _ in pending], images, run_batch(classifier, images))
            pending = []

# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------

def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable for large logits)."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def confusion_matrix(predicted: np.ndarray, targets: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(targets, np.int64), np.asarray(predicted, np.int64)), 1)
    return matrix


def top_k_accuracy(logits: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Fraction of rows whose target is among the k largest logits (ties: the lower index ranks first)."""
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float(np.mean((order == np.asarray(targets)[:, None]).any(axis=1)))


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean plain cross-entropy per image (no label smoothing), in float64."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(targets)), np.asarray(targets)].mean())


@dataclass
class EvalResult:
    """What `evaluate` measured, and the per-image outputs it came from. Accuracies are fractions."""

    num_images: int
    top_1: float
    top_5: Optional[float]  # None for models with 5 classes or fewer (top-5 would always be 100%)
    cross_entropy: float  # mean plain cross-entropy per image (training's val loss is label-smoothed)
    confusion_matrix: np.ndarray  # (C, C) int: row = true class, column = predicted class
    labels: List[str] = field(default_factory=list)  # readable class names
    logits: Optional[np.ndarray] = field(default=None, repr=False)  # (N, C) float32, per image
    targets: Optional[np.ndarray] = field(default=None, repr=False)  # (N,) int64 true classes
    paths: List[str] = field(default_factory=list, repr=False)  # the image of each row, when known
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (file, reason) left out

    @classmethod
    def from_logits(cls, logits: np.ndarray, targets: np.ndarray, labels: Sequence[str],
                    paths: Sequence[str] = (), skipped: Sequence[Tuple[str, str]] = ()) -> "EvalResult":
        """All metrics from per-image logits (N, C) and true classes (N,)."""
        logits, targets = np.asarray(logits, np.float32), np.asarray(targets, np.int64)
        num_classes = logits.shape[1]
        if not len(targets):
            raise ValueError("no images to evaluate")
        return cls(num_images=len(targets), top_1=top_k_accuracy(logits, targets, 1),
                   top_5=top_k_accuracy(logits, targets, 5) if num_classes > 5 else None,
                   cross_entropy=cross_entropy(logits, targets),
                   confusion_matrix=confusion_matrix(logits.argmax(axis=1), targets, num_classes),
                   labels=list(labels), logits=logits, targets=targets, paths=list(paths), skipped=list(skipped))

    @property
    def probabilities(self) -> np.ndarray:
        """(N, C) softmax of the logits."""
        return softmax(self.logits)

    @property
    def per_class_accuracy(self) -> List[Optional[float]]:
        """Recall of each class (correct / images of that class); None for a class with no images."""
        support = self.confusion_matrix.sum(axis=1)
        correct = np.diag(self.confusion_matrix)
        return [float(c / s) if s else None for c, s in zip(correct, support)]

    def to_dict(self) -> dict:
        support = self.confusion_matrix.sum(axis=1)
        return {
            "num_images": self.num_images, "top_1": self.top_1, "top_5": self.top_5,
            "cross_entropy": self.cross_entropy,
            "per_class": [{"index": i, "name": name, "accuracy": acc, "images": int(n)}
                          for i, (name, acc, n) in enumerate(zip(self.labels, self.per_class_accuracy, support))],
            "skipped": [{"path": path, "reason": reason} for path, reason in self.skipped],
        }


def evaluate(net: nn.Cell, dataset, num_classes: int, labels: Optional[Sequence[str]] = None) -> EvalResult:
    """Top-1, top-5, cross-entropy and confusion matrix of `net` over a labelled dataset.

    Args:
        net: the classifier (logits out), e.g. a `ViT`.
        dataset: batches of ("image", "label"), e.g. `vit_ms.data.create_dataset(..., training=False)`.
        num_classes: the number of model outputs.
        labels: readable class names, for per-class reports.
    """
    net.set_train(False)
    logits, targets = [], []
    for batch in dataset.create_dict_iterator(output_numpy=True, num_epochs=1):
        logits.append(net(ms.Tensor(batch["image"])).asnumpy())
        targets.append(batch["label"])
    names = list(labels) if labels is not None else [str(i) for i in range(num_classes)]
    return EvalResult.from_logits(np.concatenate(logits), np.concatenate(targets), names)


def labelled_files(classifier: Classifier, root, split: str) -> Tuple[List[Path], List[int]]:
    """The image files of ROOT/split/<class>/ and their class index in the classifier's output order.

    Raises:
        FileNotFoundError: ROOT/split is missing.
        ValueError: the class folders do not match the model's classes.
    """
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir} not found: --data_path must hold a {split}/ folder with one "
                                f"sub-folder per class")
    folders = data.class_names(root, split)
    num_classes = classifier.config.num_classes
    if classifier.class_names is None:
        # No names stored: the folder order is the class order, as when the model was trained.
        if len(folders) != num_classes:
            raise ValueError(f"{split_dir} has {len(folders)} class folders but the model has {num_classes} "
                             f"outputs and stores no class names to match them by")
        index = {name: i for i, name in enumerate(folders)}
    else:
        index = {name: i for i, name in enumerate(classifier.class_names)}
        unknown = [name for name in folders if name not in index]
        if unknown:
            raise ValueError(f"class folders {unknown[:10]} of {split_dir} are not classes of the model "
                             f"({classifier.source} knows {len(index)} classes, e.g. "
                             f"{list(index)[:5]})")
    paths, targets = [], []
    for name in folders:
        files = find_images([str(split_dir / name)])[0]
        paths += files
        targets += [index[name]] * len(files)
    return paths, targets


def evaluate_folder(classifier: Classifier, root, split: str = "val", batch_size: int = 16,
                    num_workers: Optional[int] = None) -> EvalResult:
    """Evaluate on ROOT/split/<class>/* with the classifier's own preprocessing and class order.

    The images go through `classify_files` (the pipeline of `vit_ms.data.eval_transforms`), so the
    result keeps each image's path and logits for `vit_ms.report`. Unreadable files are left out and
    listed in `EvalResult.skipped`.

    Args:
        classifier: from `load_classifier`.
        root: dataset root.
        split: the split folder to evaluate.
        batch_size: images per batch.
        num_workers: decode workers.
    """
    paths, targets = labelled_files(classifier, root, split)
    skipped: List[Tuple[str, str]] = []
    rows, logits = [], []
    for batch in classify_files(classifier, paths, batch_size, num_workers, skipped):
        rows += batch.positions
        logits.append(batch.logits)
    if not rows:
        raise ValueError(f"{Path(root) / split} has no readable images ({len(skipped)} unreadable)")
    return EvalResult.from_logits(np.concatenate(logits), np.asarray(targets)[rows], classifier.labels,
                                  paths=[str(paths[i]) for i in rows], skipped=skipped)


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
    true_label: Optional[str] = None  # the class its folder names, if the folder is named like a class

    def to_dict(self) -> dict:
        return {"path": self.path, "true_label": self.true_label,
                "top_k": [{"index": i, "name": n, "probability": p}
                          for i, n, p in zip(self.indices, self.names, self.probabilities)]}


def find_images(inputs: Sequence[str]) -> Tuple[List[Path], List[Tuple[str, str]]]:
    """Expand files, folders (recursively, image extensions only) and glob patterns into image paths.

    A file named explicitly is taken whatever its extension (it is reported later if it cannot be
    decoded). Returns (paths in a stable order without duplicates, [(input, reason)] for inputs that
    matched nothing).
    """
    def in_folder(folder: Path) -> List[Path]:
        return data.list_images(folder)  # the one listing: hidden files and folders skipped, as in training

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
            images = ([m for m in matches if m.is_file() and data.is_image_file(m)]
                      + [p for m in matches if m.is_dir() for p in in_folder(m)])
            found += images
            if not images:
                missing.append((item, "no such file, folder or matching pattern"))
    unique = list(dict.fromkeys(found))
    return unique, missing


def folder_label(classifier: Classifier, path) -> Optional[str]:
    """The readable class named by the folder `path` sits in (e.g. val/ants/x.jpg -> "ants"), else None."""
    index = classifier.class_index(Path(path).parent.name)
    return None if index is None else classifier.labels[index]


def top_k_predictions(classifier: Classifier, paths: Sequence, logits: np.ndarray, k: int) -> List[Prediction]:
    """One `Prediction` per row of `logits` (B, C), for the files `paths`."""
    predictions = []
    for path, row in zip(paths, softmax(logits)):
        order = np.argsort(-row, kind="stable")[:k]
        predictions.append(Prediction(path=str(path), indices=[int(i) for i in order],
                                      names=[classifier.labels[i] for i in order],
                                      probabilities=[float(row[i]) for i in order],
                                      true_label=folder_label(classifier, path)))
    return predictions


def predict_images(classifier: Classifier, paths: Sequence, top_k: int = 5, batch_size: int = 16,
                   num_workers: Optional[int] = None,
                   on_batch: Optional[Callable[[List[Prediction], Batch], None]] = None,
                   ) -> Tuple[List[Prediction], List[Tuple[str, str]]]:
    """Top-k predictions for image files; unreadable files are skipped and reported.

    Args:
        classifier: from `load_classifier`.
        paths: image files (see `find_images`).
        top_k: classes reported per image (capped at the number of classes).
        batch_size: images per forward pass.
        num_workers: decode workers (default: all cores).
        on_batch: called with each batch's predictions and the `Batch` itself (e.g. to draw pictures
            while the next batch is decoded and run).

    Returns:
        (one `Prediction` per readable image in input order, [(path, reason)] for each skipped file).
    """
    k = min(top_k, classifier.config.num_classes)
    predictions: List[Prediction] = []
    skipped: List[Tuple[str, str]] = []
    for batch in classify_files(classifier, paths, batch_size, num_workers, skipped):
        new = top_k_predictions(classifier, [paths[i] for i in batch.positions], batch.logits, k)
        predictions += new
        if on_batch is not None:
            on_batch(new, batch)
    return predictions, skipped


# ---------------------------------------------------------------------------------------------------------
# Inference with pictures: what infer.py does
# ---------------------------------------------------------------------------------------------------------

PICTURE_SIDE = 512  # photos are decoded for pictures at no less than this short side (JPEG draft mode)


def display_image(path, min_side: int = PICTURE_SIDE):
    """The RGB image to draw on: JPEGs are decoded at a reduced scale (never below `min_side` on the
    short side), which is several times cheaper than a full decode of a camera photo."""
    from PIL import Image

    with Image.open(path) as image:
        scale = min_side / min(image.size)
        if scale < 1:
            image.draft("RGB", (round(image.width * scale), round(image.height * scale)))
        return image.convert("RGB")  # like MindSpore's Decode: alpha dropped, EXIF orientation not applied


def picture_suffix(path) -> str:
    """PNG stays PNG (drawings, screenshots, transparency); everything else becomes JPEG."""
    return ".png" if Path(path).suffix.lower() == ".png" else ".jpg"


class PictureWriter:
    """Draws annotated predictions (and attention maps) in a thread pool, so the model never waits.

    Output names are the input's stem plus `_pred.jpg|png` / `_attention.png`, made unique when two
    inputs share a name. Failures are logged and left out of the records, never raised.
    """

    def __init__(self, classifier: Classifier, out_dir, num_threads: Optional[int] = None):
        from . import viz

        viz.load_matplotlib()  # here, not in the pool's threads (see load_matplotlib)
        self.classifier = classifier
        self.out_dir = Path(out_dir)
        self.pool = ThreadPoolExecutor(worker_count(num_threads), thread_name_prefix="vit_ms-pictures")
        self.jobs: List[Tuple[dict, str, Future]] = []
        self.used: set = set()

    def _name(self, stem: str, suffix: str) -> Path:
        name, i = f"{stem}{suffix}", 1
        while name.lower() in self.used:  # same file name in two input folders (or differing in case)
            name, i = f"{stem}_{i}{suffix}", i + 1
        self.used.add(name.lower())
        return self.out_dir / name

    def submit(self, prediction: Prediction, record: dict, annotate: bool = True,
               heat: Optional[np.ndarray] = None) -> None:
        """Queue the pictures of one prediction; `record` gets their paths when `close` returns.

        Args:
            prediction: what to draw.
            record: the prediction's JSON record ("annotated" / "attention" keys are added).
            annotate: draw the annotated picture.
            heat: an attention map (grid, grid) to draw, or None.
        """
        stem = Path(prediction.path).stem
        if annotate:
            out = self._name(stem, "_pred" + picture_suffix(prediction.path))
            self.jobs.append((record, "annotated", self.pool.submit(self._draw_prediction, prediction, out)))
        if heat is not None:
            out = self._name(stem, "_attention.png")
            self.jobs.append((record, "attention", self.pool.submit(self._draw_attention, prediction, heat, out)))

    def _draw_prediction(self, prediction: Prediction, out_path: Path) -> Path:
        from . import viz

        top = list(zip(prediction.names, prediction.probabilities))
        return viz.save_prediction_picture(display_image(prediction.path), self.classifier.preprocess, top,
                                           out_path, true_label=prediction.true_label)

    def _draw_attention(self, prediction: Prediction, heat: np.ndarray, out_path: Path) -> Path:
        from . import viz

        title = f"{prediction.names[0]} {100 * prediction.probabilities[0]:.1f}%"
        if prediction.true_label is not None:
            title += f" (true: {prediction.true_label})"
        return viz.save_attention_picture(display_image(prediction.path), self.classifier.preprocess, heat,
                                          title, out_path)

    def close(self) -> int:
        """Wait for every picture; returns how many failed (each is logged)."""
        failed = 0
        for record, key, job in self.jobs:
            try:
                record[key] = str(job.result())
            except Exception as error:  # a picture is a courtesy: report it, keep the predictions
                logger.warning("could not draw the %s picture of %s: %s: %s", key, record["path"],
                               type(error).__name__, error)
                failed += 1
        self.pool.shutdown()
        return failed


@dataclass
class InferenceResult:
    """What `run_inference` produced: predictions (as JSON records, with picture paths) and skipped files."""

    model: str
    predictions: List[Prediction]
    records: List[dict]
    skipped: List[Tuple[str, str]]

    def to_dict(self) -> dict:
        return {"model": self.model, "predictions": self.records,
                "skipped": [{"path": path, "reason": reason} for path, reason in self.skipped]}


def run_inference(classifier: Classifier, paths: Sequence, *, top_k: int = 5, batch_size: int = 16,
                  num_workers: Optional[int] = None, out_dir=None, annotate: bool = True,
                  attention: bool = False) -> InferenceResult:
    """Predict image files and, with `out_dir`, draw each prediction (and its attention rollout).

    Pictures are drawn by `vit_ms.viz` in a `PictureWriter` thread pool while the next batches are
    decoded and classified. The attention rollout needs the model's blocks (a `ViT`, not a MINDIR); it
    is computed per batch on the images the model saw.

    Args:
        classifier: from `load_classifier`.
        paths: image files (see `find_images`).
        top_k, batch_size, num_workers: as for `predict_images`.
        out_dir: folder for the pictures (created when the first one is written); None: no pictures.
        annotate: draw `NAME_pred.jpg` (`.png` for PNG inputs) per image.
        attention: draw `NAME_attention.png` per image.
    """
    writer = PictureWriter(classifier, out_dir) if out_dir is not None and (annotate or attention) else None
    records: List[dict] = []

    def on_batch(predictions: List[Prediction], batch: Batch) -> None:
        heats = [None] * len(predictions)
        if attention and writer is not None:
            from . import viz

            heats = viz.rollout_map(viz.attention_rollout(classifier.net, batch.images))
        for prediction, heat in zip(predictions, heats):
            record = prediction.to_dict()
            records.append(record)
            if writer is not None:
                writer.submit(prediction, record, annotate, heat)

    try:
        predictions, skipped = predict_images(classifier, paths, top_k, batch_size, num_workers, on_batch)
    finally:
        if writer is not None:
            writer.close()
    return InferenceResult(model=classifier.source, predictions=predictions, records=records, skipped=skipped)


PREDICTIONS_JSON = "predictions.json"
PREDICTIONS_CSV = "predictions.csv"


def predictions_csv(result: InferenceResult) -> str:
    """One row per image: path, true label (blank if unknown), then index, name, probability per rank."""
    k = max((len(p.indices) for p in result.predictions), default=0)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "true_label"] + [f"top{r}_{what}" for r in range(1, k + 1)
                                              for what in ("index", "name", "probability")])
    for p in result.predictions:
        row = [p.path, p.true_label or ""]
        for i, name, prob in zip(p.indices, p.names, p.probabilities):
            row += [i, name, f"{prob:.6f}"]
        writer.writerow(row)
    return buffer.getvalue()


def write_predictions(result: InferenceResult, out_dir) -> Tuple[Path, Path]:
    """predictions.json (everything, skipped files too) and predictions.csv (one row per image)."""
    out_dir = Path(out_dir)
    json_path = write_text_atomic(out_dir / PREDICTIONS_JSON, json.dumps(result.to_dict(), indent=2))
    csv_path = write_text_atomic(out_dir / PREDICTIONS_CSV, predictions_csv(result))
    return json_path, csv_path


# ---------------------------------------------------------------------------------------------------------
# Output folders: never replace an earlier run's results without being asked
# ---------------------------------------------------------------------------------------------------------

def check_output_dir(out_dir, overwrite: bool, command: str) -> Optional[str]:
    """Why `out_dir` cannot receive new results, or None when it may.

    A folder that is missing or empty is free. A non-empty one holds earlier results (or anything else a
    user keeps there): it is refused unless `overwrite`, as train.py refuses a run folder that holds a run.
    Nothing is created here.

    Args:
        out_dir: the command's --output_dir.
        overwrite: the command's --overwrite.
        command: the script name for the message, e.g. "infer.py".
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        return f"--output_dir {out_dir} is a file, not a folder"
    if overwrite or not out_dir.is_dir():
        return None
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return None
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    return (f"--output_dir {out_dir} already holds {len(entries)} file(s) ({shown}) from an earlier run; "
            f"{command} does not replace them unless you pass --overwrite; or choose a new --output_dir")


def remove_earlier_pictures(out_dir) -> List[Path]:
    """With --overwrite: delete the pictures an earlier infer run listed in OUT/predictions.json (and no
    other file), so the folder does not mix two runs. Returns the files removed."""
    listing = Path(out_dir) / PREDICTIONS_JSON
    if not listing.is_file():
        return []
    try:
        records = json.loads(listing.read_text(encoding="utf-8")).get("predictions", [])
    except (ValueError, AttributeError):
        return []
    removed = []
    for record in records:
        for key in ("annotated", "attention"):
            # By name inside out_dir only: the listing may hold paths relative to another working folder,
            # and a hand-edited listing must not reach outside the folder.
            name = Path(record.get(key) or "").name
            path = Path(out_dir) / name
            if name and path.is_file():
                path.unlink()
                removed.append(path)
    return removed


__all__ = ["imagenet_classes", "readable_class_names", "Classifier", "load_classifier", "run_batch",
           "check_files", "Batch", "classify_files", "softmax", "confusion_matrix", "top_k_accuracy",
           "cross_entropy", "EvalResult", "evaluate", "labelled_files", "evaluate_folder", "Prediction",
           "find_images", "folder_label", "top_k_predictions", "predict_images", "display_image",
           "picture_suffix", "PictureWriter", "InferenceResult", "run_inference", "predictions_csv",
           "write_predictions", "check_output_dir", "remove_earlier_pictures"]
