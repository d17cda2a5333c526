"""Fine-tuning on photos, end to end: vit_ms's `finetune` recipe against the same recipe in PyTorch with timm.

What a user who wants a ViT fine-tuned on their photos would otherwise run is timm in PyTorch (DeiT's and
MAE's recipes are timm's). Both sides here start from the same weights file and train the same
architecture on the same folders with the same recipe, each as its user would run it:

- `mindspore`: `python train.py --recipe finetune --pretrained WEIGHTS --data_path DATA ...`, unchanged:
  MindSpore's C++ decode and augmentation workers, the fused CPU kernels, graph mode.
- `torch`: timm's parts put together the way timm's `train.py` does: `timm.data.create_transform`
  (RandomResizedCrop, flip, RandAugment, normalise, random erasing), a `torch.utils.data.DataLoader` with
  worker processes, `timm.data.Mixup`, `timm.create_model` (with `drop_path_rate`), `create_optimizer_v2`
  (AdamW with layer decay), a per-step warmup + cosine `CosineLRScheduler`, `ModelEmaV3`,
  `SoftTargetCrossEntropy`, gradient clipping; eager PyTorch.

The recipe on both sides (vit_ms's `finetune` defaults): batch 32 (last partial batch dropped), AdamW
(weight decay 0.05, layer decay 0.75), lr 5e-4 x batch / 512, gradient clipping at 1.0, RandAugment n2 m9,
random erasing 0.25 (per-pixel noise), Mixup 0.8 / CutMix 1.0 with label smoothing 0.1, stochastic depth
0.1, a new zero-initialised head, model EMA 0.9998 per step; every epoch evaluates the trained and the EMA
weights on val/. The image size, mean/std, interpolation and eval crop are what vit_ms reads from the
weights file (`vit_ms.checkpoint.describe_weights`), handed to timm's transforms. Known differences: timm's
RandAugment applies each chosen op with probability 0.5 (MindSpore's always applies it); the warmup length
(vit_ms shortens its 5 epochs to fit a short run, timm here warms up for 1 epoch). Neither changes the cost of a step.

The weights are a randomly initialised timm model written as `.safetensors` (no pretrained weights can be
downloaded where this was written), so the top-1 columns only show that both sides trained; the timings
are what the benchmark is for. Each job runs in a fresh process; the frameworks alternate round by round
(order reversed every other round) and each figure is the median over rounds. Columns: "launch to exit"
(process start to exit: imports, reading the data, building, compiling, every epoch), "first epoch" (its
train and eval, including MindSpore's graph compile and PyTorch's worker start), "steady epoch" (median of
epochs 2..E: train + eval of both weights), "train img/s" (training images per second of training time in
those epochs). vit_ms's compiled-graph cache is off (`VIT_MS_GRAPH_CACHE=0`), so every round compiles, as a
first run does (`--graph-cache`: on, and warmed by one untimed run of the same job, as a second run finds
it), and `--check none` (a first run checks each image once, cached afterwards; timm does not); the fused
CPU kernels are compiled before the first round (once per install: `python -m vit_ms.ops build`).

    python benchmarks/bench_finetune.py --data ../shared/data/hymenoptera --output outputs/bench_finetune.json
    python benchmarks/bench_finetune.py --data my_photos --model vit_s_16 --epochs 3 --rounds 2

PyTorch, timm and torchvision are benchmark-time dependencies only (the `test` extra); vit_ms never imports them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import cpu_label  # noqa: E402  (the CPU and its widest vector ISA, as every table names it)
# vit_ms presets -> timm's names of the same architecture (timm/models/vision_transformer.py).
TIMM_NAMES = {"vit_ti_16": "vit_tiny_patch16_224", "vit_s_16": "vit_small_patch16_224",
              "vit_b_16": "vit_base_patch16_224"}
RECIPE = dict(weight_decay=0.05, layer_decay=0.75, base_lr=5e-4, min_lr=1e-6, clip_grad=1.0, label_smoothing=0.1,
              mixup=0.8, cutmix=1.0, mixup_switch_prob=0.5, random_erasing=0.25, drop_path_rate=0.1,
              ema_decay=0.9998, ra_num_ops=2, ra_magnitude=9, crop_min_scale=0.08)


# --- children -------------------------------------------------------------------------------------------

def make_weights(path: Path, model: str) -> None:
    """A randomly initialised timm model of `model`'s architecture, as timm names it, in `path`."""
    sys.path.insert(0, str(ROOT / "tests"))
    from torch_env import make_torchvision_importable

    make_torchvision_importable()
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model(TIMM_NAMES[model], pretrained=False, num_classes=1000)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


def describe(path: Path) -> dict:
    """The preprocessing vit_ms takes from the weights file: what the timm side is given too."""
    from vit_ms.checkpoint import describe_weights

    pre = describe_weights(path).preprocess
    return {"image_size": pre.image_size, "mean": list(pre.mean), "std": list(pre.std),
            "crop_pct": pre.crop_pct, "interpolation": pre.interpolation}


def torch_finetune(args) -> dict:
    """The recipe in PyTorch with timm's parts; one record per epoch."""
    sys.path.insert(0, str(ROOT / "tests"))
    from torch_env import make_torchvision_importable

    make_torchvision_importable()
    import timm
    import torch
    import torchvision
    from safetensors.torch import load_file
    from timm.data import Mixup, create_transform
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3

    pre = json.loads(args.preprocess)
    torch.manual_seed(0)
    train_tf = create_transform(pre["image_size"], is_training=True, scale=(RECIPE["crop_min_scale"], 1.0),
                                hflip=0.5, color_jitter=0.0,
                                auto_augment=f"rand-m{RECIPE['ra_magnitude']}-n{RECIPE['ra_num_ops']}",
                                re_prob=RECIPE["random_erasing"], re_mode="pixel",
                                interpolation=pre["interpolation"], mean=pre["mean"], std=pre["std"])
    eval_tf = create_transform(pre["image_size"], is_training=False, crop_pct=pre["crop_pct"],
                               interpolation=pre["interpolation"], mean=pre["mean"], std=pre["std"])
    train_set = torchvision.datasets.ImageFolder(str(Path(args.data) / "train"), train_tf)
    val_set = torchvision.datasets.ImageFolder(str(Path(args.data) / "val"), eval_tf)
    workers = args.workers or os.cpu_count()
    train_loader = torch.utils.data.DataLoader(train_set, args.batch_size, shuffle=True, drop_last=True,
                                               num_workers=workers, persistent_workers=True)
    val_loader = torch.utils.data.DataLoader(val_set, args.batch_size, num_workers=workers, persistent_workers=True)
    classes = len(train_set.classes)

    model = timm.create_model(TIMM_NAMES[args.model], pretrained=False, num_classes=classes,
                              drop_path_rate=RECIPE["drop_path_rate"], img_size=pre["image_size"])
    weights = {k: v for k, v in load_file(args.weights).items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected, (missing, unexpected)
    torch.nn.init.zeros_(model.head.weight)  # the ViT paper's zero-initialised new head, as vit_ms
    torch.nn.init.zeros_(model.head.bias)

    steps = len(train_loader)
    lr = RECIPE["base_lr"] * args.batch_size / 512
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=RECIPE["weight_decay"],
                                    layer_decay=RECIPE["layer_decay"])
    scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs * steps, lr_min=RECIPE["min_lr"],
                                  warmup_t=steps, warmup_lr_init=lr / steps, t_in_epochs=False)
    ema = ModelEmaV3(model, decay=RECIPE["ema_decay"])
    mixup = Mixup(mixup_alpha=RECIPE["mixup"], cutmix_alpha=RECIPE["cutmix"], prob=1.0,
                  switch_prob=RECIPE["mixup_switch_prob"], mode="batch",
                  label_smoothing=RECIPE["label_smoothing"], num_classes=classes)
    loss_fn = SoftTargetCrossEntropy()

    def top1(net) -> float:
        net.eval()
        right = total = 0
        with torch.inference_mode():
            for x, y in val_loader:
                right += int((net(x).argmax(1) == y).sum())
                total += len(y)
        return right / total

    records, step = [], 0
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        model.train()
        images = 0
        for x, y in train_loader:
            x, y = mixup(x, y)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPE["clip_grad"])
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            ema.update(model, step)
            images += len(x)
        train_time = time.perf_counter() - start
        record = {"epoch": epoch, "top1": top1(model), "ema_top1": top1(ema.module)}
        record.update(time=time.perf_counter() - start, images_per_sec=images / train_time)
        records.append(record)
    return {"epochs": records, "classes": classes, "train_images": len(train_set)}


# --- parent ---------------------------------------------------------------------------------------------

def _child(args, *extra, timeout=3600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, __file__, *extra], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def run_mindspore(args, weights: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "train.py"), "--recipe", "finetune", "--data_path", str(args.data),
           "--pretrained", str(weights), "--epochs", str(args.epochs), "--batch_size", str(args.batch_size),
           "--output_dir", str(out), "--check", "none", "--no-progress_bar"]
    if args.workers:
        cmd += ["--num_workers", str(args.workers)]
    env = dict(os.environ, VIT_MS_GRAPH_CACHE="1" if args.graph_cache else "0", VIT_MS_HOME=str(args.scratch / "home"))
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=args.scratch, timeout=3600)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"train.py failed:\n{done.stderr[-3000:]}")
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"wall": wall, "epochs": epochs}


def run_torch(args, weights: Path, preprocess: dict) -> dict:
    extra = ["--worker", "--weights", str(weights), "--preprocess", json.dumps(preprocess), "--data", str(args.data),
             "--model", args.model, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
    if args.workers:
        extra += ["--workers", str(args.workers)]
    start = time.perf_counter()
    done = _child(args, *extra)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"the PyTorch job failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), wall=wall)


def summarize(runs: list) -> dict:
    """Medians over rounds of one framework's figures (and the spread of its steady train images/s)."""
    def per_round(run):
        later = run["epochs"][1:] or run["epochs"]
        return {"wall": run["wall"], "first_epoch": run["epochs"][0]["time"],
                "steady_epoch": statistics.median(e["time"] for e in later),
                "images_per_sec": statistics.median(e["images_per_sec"] for e in later),
                "top1": run["epochs"][-1]["top1"], "ema_top1": run["epochs"][-1].get("ema_top1", float("nan"))}

    rows = [per_round(run) for run in runs]
    out = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    speeds = [row["images_per_sec"] for row in rows]
    out["spread"] = (max(speeds) - min(speeds)) / out["images_per_sec"]
    out["rounds"] = rows
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", type=Path, help="an ImageFolder root with train/ and val/ (e.g. "
                                             "../shared/data/hymenoptera, the ant and bee photos)")
    p.add_argument("--model", default="vit_ti_16", choices=sorted(TIMM_NAMES), help="architecture (default vit_ti_16)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per job; 2.. count as steady (default 3)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of both frameworks (default 2)")
    p.add_argument("--batch-size", type=int, default=32, help="the finetune recipe's (default 32)")
    p.add_argument("--workers", type=int, default=0,
                   help="decode workers on both sides (default 0: vit_ms's default, every core, for both)")
    p.add_argument("--frameworks", default="mindspore,torch", help="comma-separated (default mindspore,torch)")
    p.add_argument("--scratch", type=Path, default=Path("outputs/bench_finetune_scratch"),
                   help="weights file and run folders (default outputs/bench_finetune_scratch)")
    p.add_argument("--graph-cache", action="store_true",
                   help="vit_ms with its compiled-graph cache, warmed by one untimed run of the same job first "
                        "(a user's second run); default: off, every round compiles")
    p.add_argument("--output", type=Path, help="write the report (every round) as JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--preprocess", help=argparse.SUPPRESS)
    p.add_argument("--make-weights", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--describe", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.make_weights:
        make_weights(args.make_weights, args.model)
        return 0
    if args.describe:
        print(json.dumps(describe(args.describe)))
        return 0
    if args.worker:
        print(json.dumps(torch_finetune(args)))
        return 0
    if args.data is None or not (args.data / "train").is_dir() or not (args.data / "val").is_dir():
        p.error(f"--data must be a folder with train/ and val/ (got {args.data})")
    if args.epochs < 2 or args.rounds < 1 or args.batch_size % 2:
        p.error("--epochs must be at least 2, --rounds at least 1, --batch-size even (Mixup pairs images)")
    frameworks = [f for f in args.frameworks.split(",") if f]
    unknown = set(frameworks) - {"mindspore", "torch"}
    if unknown:
        p.error(f"--frameworks: unknown {sorted(unknown)}; choose from mindspore, torch")
    args.data = args.data.resolve()
    args.scratch = args.scratch.resolve()
    args.scratch.mkdir(parents=True, exist_ok=True)

    weights = args.scratch / f"{TIMM_NAMES[args.model]}_random.safetensors"
    if not weights.exists():
        done = _child(args, "--make-weights", str(weights), "--model", args.model)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
    done = _child(args, "--describe", str(weights))
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    preprocess = json.loads(done.stdout.strip().splitlines()[-1])

    if "mindspore" in frameworks:  # the fused kernels are compiled once per install, not per run: not timed
        done = subprocess.run([sys.executable, "-m", "vit_ms.ops", "build"], capture_output=True, text=True,
                              cwd=ROOT, env=dict(os.environ, VIT_MS_HOME=str(args.scratch / "home")))
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
    if args.graph_cache and "mindspore" in frameworks:
        print("warming vit_ms's graph cache with one untimed run ...", file=sys.stderr, flush=True)
        run_mindspore(args, weights, args.scratch / "mindspore_warmup")
    runs = {f: [] for f in frameworks}
    for r in range(args.rounds):
        for framework in (frameworks if r % 2 == 0 else frameworks[::-1]):
            print(f"round {r + 1}/{args.rounds}: {framework} ...", file=sys.stderr, flush=True)
            if framework == "mindspore":
                runs[framework].append(run_mindspore(args, weights, args.scratch / f"mindspore_{r}"))
            else:
                runs[framework].append(run_torch(args, weights, preprocess))

    summary = {f: summarize(rs) for f, rs in runs.items()}
    print(f"\nFine-tuning {args.model} ({TIMM_NAMES[args.model]}) at {preprocess['image_size']} px on {args.data}: "
          f"{args.epochs} epochs of batch {args.batch_size}, {args.rounds} round(s), vit_ms's graph cache "
          f"{'warm' if args.graph_cache else 'off'}; {cpu_label()}")
    print("| framework | launch to exit s | first epoch s | steady epoch s | train img/s | spread | "
          "val top-1 (EMA) | steady epoch vs torch |")
    print("|---|---|---|---|---|---|---|---|")
    base = summary.get("torch")
    for f, s in summary.items():
        ratio = f"{base['steady_epoch'] / s['steady_epoch']:.2f}x" if base else "-"
        print(f"| {f} | {s['wall']:.1f} | {s['first_epoch']:.1f} | {s['steady_epoch']:.2f} | "
              f"{s['images_per_sec']:.1f} | {100 * s['spread']:.0f}% | {100 * s['top1']:.1f}% "
              f"({100 * s['ema_top1']:.1f}%) | {ratio} |")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"cpu": cpu_label(), "model": args.model, "epochs": args.epochs,
                                           "batch_size": args.batch_size, "preprocess": preprocess,
                                           "summary": summary, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
