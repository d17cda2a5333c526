"""Does pretraining help a small ViT on a small dataset? Fine-tuning vs training from scratch, same budget.

1. Pretrain a small ViT from scratch on a synthetic task A (6 shape classes: disk, square, triangle,
   cross, ring, bar; random sizes, positions, colours, noisy backgrounds).
2. On a different task B (5 texture classes: vertical, horizontal and diagonal stripes, checkerboard,
   dots; few images per class) and, with `--photos DIR` (an ImageFolder with train/ and val/, e.g. the
   ant/bee photos of the PyTorch transfer-learning tutorial), train the same architecture
   (a) from scratch (AdamW, warmup + cosine, lr 1e-3: the project's scratch recipe), and
   (b) fine-tuned from step 1 with the fine-tuning recipe (new zero head, layer decay, clipping, label
       smoothing, RandAugment, Mixup/CutMix, EMA: `vit_ms.data.augment`, `vit_ms.training.optim`,
       `vit_ms.training.train_step`), for the same epochs and batch size,
   and report val top-1 (and the EMA's) and wall time for each in a table.

What it can show: whether features learnt on one task transfer to another under this project's
fine-tuning parts, on a CPU. What it cannot: ImageNet-scale pretraining (no weights can be downloaded on
the machine it was written on); a synthetic task A is a weak stand-in for ImageNet features on photos.

Tiny check (a minute):
    python benchmarks/bench_transfer.py --tiny
Full run (about 2 minutes on 2 CPU cores):
    python benchmarks/bench_transfer.py --photos ../shared/data/hymenoptera --output outputs/bench_transfer.json
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mindspore as ms  # noqa: E402
import mindspore.dataset as ds  # noqa: E402
from mindspore import nn  # noqa: E402

from vit_ms.data.augment import MixupCutmix, add_batch_mixup, train_augmentations  # noqa: E402
from vit_ms.cli import ArgumentParser  # noqa: E402
from vit_ms.config import Preprocess  # noqa: E402
from vit_ms.training.ema import ModelEMA  # noqa: E402
from vit_ms.model import create_model  # noqa: E402
from vit_ms.training.optim import SoftCrossEntropy, create_optimizer  # noqa: E402
from vit_ms.training.train_step import TrainStep  # noqa: E402

logger = logging.getLogger("bench_transfer")

SHAPES = ("disk", "square", "triangle", "cross", "ring", "bar")
TEXTURES = ("vertical", "horizontal", "diagonal", "checker", "dots")


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------

def _background(rng, size):
    base = rng.integers(0, 256, 3)
    noise = rng.normal(0, 20, (size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def draw_shape(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 (size, size, 3) image of a shape of task A."""
    image = Image.fromarray(_background(rng, size))
    draw = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    r = rng.uniform(0.2, 0.4) * size
    cx, cy = rng.uniform(r, size - r, 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    width = max(1, int(r / 3))
    if kind == "disk":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif kind == "cross":
        draw.rectangle((cx - r, cy - width / 2, cx + r, cy + width / 2), fill=colour)
        draw.rectangle((cx - width / 2, cy - r, cx + width / 2, cy + r), fill=colour)
    elif kind == "ring":
        draw.ellipse(box, outline=colour, width=width)
    else:  # bar
        draw.rectangle((cx - r, cy - width, cx + r, cy + width), fill=colour)
    return np.asarray(image)


def draw_texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 (size, size, 3) image of a texture of task B."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    period = rng.uniform(4, 9)
    phase = rng.uniform(0, period)
    if kind == "vertical":
        mask = ((xx + phase) % period) < period / 2
    elif kind == "horizontal":
        mask = ((yy + phase) % period) < period / 2
    elif kind == "diagonal":
        mask = ((xx + yy * rng.choice([-1, 1]) + phase) % period) < period / 2
    elif kind == "checker":
        mask = (((xx + phase) // (period / 2)) + ((yy + phase) // (period / 2))) % 2 == 0
    else:  # dots
        mask = (((xx + phase) % period - period / 2) ** 2 + ((yy + phase) % period - period / 2) ** 2) < (period / 4) ** 2
    a, b = rng.integers(0, 256, (2, 3))
    image = np.where(mask[..., None], a, b) + rng.normal(0, 15, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def synthetic_task(draw, classes, per_class: int, size: int, seed: int) -> Tuple[List[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, kind in enumerate(classes):
        for _ in range(per_class):
            images.append(draw(kind, size, rng))
            labels.append(label)
    return images, np.asarray(labels, np.int32)


def photo_task(root: Path, split: str) -> Tuple[List[np.ndarray], np.ndarray, List[str]]:
    """uint8 HWC images and labels of ROOT/split/<class>/*, with Pillow (3 channels)."""
    from vit_ms.data import class_names, is_image_file, load_image

    names = class_names(root, "train")
    images, labels = [], []
    for label, name in enumerate(names):
        for path in sorted((root / split / name).iterdir()):
            if is_image_file(path):
                image = load_image(path)
                image.thumbnail((160, 160))  # decode once, small: the crop resizes further anyway
                images.append(np.asarray(image))
                labels.append(label)
    return images, np.asarray(labels, np.int32), names


def eval_arrays(images, preprocess: Preprocess) -> np.ndarray:
    """The eval transform (resize short side, centre crop, normalise) -> float32 (N, 3, S, S)."""
    from vit_ms.data import preprocess_image

    return np.stack([preprocess_image(Image.fromarray(img), preprocess) for img in images])


def train_pipeline(images, labels, preprocess: Preprocess, batch_size: int, recipe: dict, num_classes: int,
                   seed: int):
    ds.config.set_seed(seed)
    source = ds.GeneratorDataset(list(zip(images, labels)), ["image", "label"], shuffle=True)
    ops = train_augmentations(preprocess, auto_augment=recipe["auto_augment"], random_erasing=recipe["random_erasing"],
                              crop_scale=(recipe["crop_min_scale"], 1.0), decode=False)
    dataset = source.map(ops, input_columns="image").batch(batch_size, drop_remainder=True)
    if recipe["mixup"] > 0 or recipe["cutmix"] > 0:
        dataset = add_batch_mixup(dataset, MixupCutmix(num_classes, recipe["mixup"], recipe["cutmix"],
                                                       label_smoothing=recipe["label_smoothing"], seed=seed))
    return dataset


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------

SCRATCH = dict(lr=1e-3, warmup_epochs=1, layer_decay=1.0, clip_grad=0.0, label_smoothing=0.1, auto_augment="none",
               random_erasing=0.0, mixup=0.0, cutmix=0.0, ema_decay=0.0, crop_min_scale=0.5, weight_decay=0.05)
FINETUNE = dict(lr=5e-4, warmup_epochs=1, layer_decay=0.75, clip_grad=1.0, label_smoothing=0.1,
                auto_augment="randaugment", random_erasing=0.25, mixup=0.8, cutmix=1.0, ema_decay=0.99,
                crop_min_scale=0.5, weight_decay=0.05)


def warmup_cosine(lr: float, epochs: int, warmup_epochs: int, steps: int) -> List[float]:
    total, warmup = epochs * steps, min(warmup_epochs, epochs - 1) * steps
    return [lr * (i + 1) / warmup if i < warmup else
            0.5 * lr * (1 + math.cos(math.pi * (i - warmup) / max(total - warmup, 1))) for i in range(total)]


def accuracy(net, x: np.ndarray, y: np.ndarray, batch: int = 64) -> float:
    net.set_train(False)
    hits = 0
    for i in range(0, len(x), batch):
        logits = net(ms.Tensor(x[i:i + batch])).asnumpy()
        hits += int((logits.argmax(axis=1) == y[i:i + batch]).sum())
    return hits / len(x)


def train_run(model_kwargs: dict, num_classes: int, train: tuple, val: tuple, preprocess: Preprocess,
              recipe: dict, epochs: int, batch_size: int, seed: int, init: Optional[Dict] = None) -> dict:
    """Train one model; returns its val top-1 (raw and EMA), time and the weights."""
    ms.set_seed(seed)
    net = create_model("vit_ti_16", num_classes=num_classes, **model_kwargs)
    if init is not None:
        # The backbone from pretraining; the head is the model's own zero head for the new classes.
        backbone = {k: ms.Parameter(v, name=k) for k, v in init.items() if not k.startswith("head.")}
        ms.load_param_into_net(net, backbone, strict_load=False)
    dataset = train_pipeline(*train, preprocess, batch_size, recipe, num_classes, seed)
    steps = dataset.get_dataset_size()
    if steps == 0:
        raise ValueError(f"fewer training images ({len(train[1])}) than one batch ({batch_size}); lower --batch_size")
    schedule = warmup_cosine(recipe["lr"], epochs, recipe["warmup_epochs"], steps)
    optimizer = create_optimizer(net, "adamw", schedule, weight_decay=recipe["weight_decay"],
                                 layer_decay=recipe["layer_decay"], fused=net.fast)  # as train.py does
    ema = ModelEMA(net, recipe["ema_decay"]) if recipe["ema_decay"] > 0 else None
    step = TrainStep(nn.WithLossCell(net, SoftCrossEntropy(num_classes, recipe["label_smoothing"])), optimizer,
                     clip_grad=recipe["clip_grad"], ema=ema)
    val_x = eval_arrays(val[0], preprocess)
    started = time.perf_counter()
    for epoch in range(epochs):
        step.set_train()
        losses = [float(step(x, t).asnumpy()) for x, t in dataset.create_tuple_iterator()]
        logger.info("epoch %d/%d: loss %.4f", epoch + 1, epochs, np.mean(losses))
    seconds = time.perf_counter() - started
    top1 = accuracy(net, val_x, val[1])
    ema_top1 = None
    if ema is not None:
        ema_net = ema.copy_to(create_model("vit_ti_16", num_classes=num_classes, **model_kwargs))
        ema_top1 = accuracy(ema_net, val_x, val[1])
    return {"top1": top1, "ema_top1": ema_top1, "seconds": seconds,
            "weights": {p.name: ms.Tensor(p.asnumpy()) for p in net.get_parameters()}}


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--width", type=int, default=96, help="embed_dim (heads: width / 32)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--pretrain_per_class", type=int, default=400, help="task A images per class")
    parser.add_argument("--pretrain_epochs", type=int, default=15)
    parser.add_argument("--target_per_class", type=int, default=20, help="task B training images per class")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of each task-B / photo run")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--photos", type=Path, default=None, help="ImageFolder with train/ and val/ (real photos)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="seconds-long settings that only check it runs")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.tiny:
        args.image_size, args.width, args.depth = 16, 32, 1
        args.pretrain_per_class, args.pretrain_epochs, args.target_per_class, args.epochs = 8, 2, 4, 2
        args.batch_size = 8
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    patch = 4 if args.image_size <= 16 else 8
    model_kwargs = dict(image_size=args.image_size, patch_size=patch, embed_dim=args.width, depth=args.depth,
                        num_heads=max(1, args.width // 32), mlp_dim=2 * args.width, drop_path_rate=0.1)
    preprocess = Preprocess(image_size=args.image_size, crop_pct=1.0)
    common = dict(model_kwargs=model_kwargs, preprocess=preprocess, epochs=args.epochs, batch_size=args.batch_size,
                  seed=args.seed)
    rows = []

    logger.info("pretraining on task A (%d shape classes, %d images each)", len(SHAPES), args.pretrain_per_class)
    a_train = synthetic_task(draw_shape, SHAPES, args.pretrain_per_class, args.image_size, args.seed)
    a_val = synthetic_task(draw_shape, SHAPES, max(4, args.pretrain_per_class // 8), args.image_size, args.seed + 1)
    pre = train_run(num_classes=len(SHAPES), train=a_train, val=a_val, recipe=SCRATCH,
                    **dict(common, epochs=args.pretrain_epochs))
    rows.append(("A: shapes", "pretrain (scratch)", len(a_train[1]), args.pretrain_epochs, pre))

    targets = [("B: textures", synthetic_task(draw_texture, TEXTURES, args.target_per_class, args.image_size,
                                              args.seed + 2),
                synthetic_task(draw_texture, TEXTURES, 20, args.image_size, args.seed + 3), len(TEXTURES))]
    if args.photos is not None:
        images, labels, names = photo_task(args.photos, "train")
        val_images, val_labels, _ = photo_task(args.photos, "val")
        targets.append((f"photos: {args.photos.name}", (images, labels), (val_images, val_labels), len(names)))
    for task, train, val, num_classes in targets:
        for name, recipe, init in (("scratch", SCRATCH, None), ("fine-tune from A", FINETUNE, pre["weights"])):
            logger.info("%s: %s", task, name)
            result = train_run(num_classes=num_classes, train=train, val=val, recipe=recipe, init=init, **common)
            rows.append((task, name, len(train[1]), args.epochs, result))

    lines = ["| task | run | train images | epochs | val top-1 | EMA top-1 | time (s) |",
             "|---|---|---|---|---|---|---|"]
    for task, name, count, epochs, r in rows:
        ema = "-" if r["ema_top1"] is None else f"{100 * r['ema_top1']:.1f}%"
        lines.append(f"| {task} | {name} | {count} | {epochs} | {100 * r['top1']:.1f}% | {ema} | {r['seconds']:.1f} |")
    print("\n".join(lines))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        records = [{"task": t, "run": n, "train_images": c, "epochs": e,
                    **{k: v for k, v in r.items() if k != "weights"}} for t, n, c, e, r in rows]
        args.output.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": records},
                                          indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
