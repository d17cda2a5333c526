"""Train a Vision Transformer with MindSpore's Model.fit.

    python train.py                                   # tiny ViT, embedded sample set, offline, CPU
    python train.py --recipe tutorial --device_target Ascend     # the MindSpore tutorial end to end
    python train.py --recipe finetune --data_path my_photos --pretrained augreg_vit_ti_16_224
    python train.py --recipe linear_probe --data_path my_photos --pretrained weights.safetensors
    python train.py --resume --output_dir outputs/train          # continue from last.ckpt
    python train.py --overwrite                       # replace the run in outputs/train
    msrun --worker_num=8 --local_worker_num=8 --master_port=8118 --log_dir=msrun_log \\
        train.py --distributed --recipe tutorial --device_target Ascend

A recipe (vit_ms.training.RECIPES) supplies every setting; flags given here override it. A new run
refuses a --output_dir that holds another run: continue it with --resume or replace it with --overwrite.
Ctrl-C stops after the current step and prints the --resume command. See README.md.
"""
import argparse
import contextlib
import json
import logging
import sys

from vit_ms import interrupts
from vit_ms.cli import LOG_DATE_FORMAT, LOG_FORMAT, ArgumentParser, quiet_mindspore, require_device_target

BOOL = argparse.BooleanOptionalAction


def build_parser() -> argparse.ArgumentParser:
    # Every flag defaults to "not given" (SUPPRESS), so only the flags a user types override the recipe.
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                            argument_default=argparse.SUPPRESS)
    add = parser.add_argument
    add("--recipe", help="named settings to start from: 'scratch' (default: a small ViT from scratch on the "
                         "sample set), 'tutorial' (the MindSpore tutorial's fine-tuning, then eval/infer/export), "
                         "'finetune' (a --pretrained ViT on your --data_path, the DeiT/MAE recipe) or "
                         "'linear_probe' (a --pretrained ViT frozen, only a new head trained)")
    add("--config", dest="config_file", metavar="JSON",
        help="a JSON object of TrainConfig fields applied over the recipe (unknown keys are an error)")
    add("--dry_run", action="store_true", help="print the resolved settings (every TrainConfig field) as JSON and exit")

    group = parser.add_argument_group("data")
    group.add_argument("--dataset", choices=["sample", "imagenet_subset"],
                       help="'sample': the embedded offline set (generated on first use); 'imagenet_subset': the "
                            "tutorial's ImageNet subset (downloaded on first use)")
    group.add_argument("--data_path", help="an ImageFolder root holding train/<class>/ and val/<class>/ "
                                           "(overrides --dataset's location)")
    group.add_argument("--check", dest="data_check", choices=["full", "header", "none"],
                       help="image check before the first epoch: 'full' decodes every file (default), 'header' "
                            "only opens it, 'none' trusts the files")
    group.add_argument("--augment", action=BOOL, help="random-resized-crop + flip on train images")
    group.add_argument("--crop_min_scale", type=float, help="smallest area fraction of the random training crop")
    group.add_argument("--num_workers", type=int, help="parallel decode workers per pipeline")
    group.add_argument("--auto_augment", choices=["none", "randaugment", "trivialaugment", "autoaugment"],
                       help="per-image augmentation policy (MindSpore's vision.RandAugment, TrivialAugmentWide, "
                            "AutoAugment with the ImageNet policy)")
    group.add_argument("--ra_num_ops", type=int, help="RandAugment: ops per image (timm's n)")
    group.add_argument("--ra_magnitude", type=int, help="RandAugment: strength 0..10 (timm's m)")
    group.add_argument("--color_jitter", type=float, metavar="S",
                       help="brightness/contrast/saturation factors in [1 - S, 1 + S]; 0: off")
    group.add_argument("--random_erasing", type=float, metavar="P", help="probability of erasing a random box; 0: off")
    group.add_argument("--mixup", type=float, metavar="ALPHA", help="batch Mixup, Beta(ALPHA, ALPHA); 0: off")
    group.add_argument("--cutmix", type=float, metavar="ALPHA", help="batch CutMix, Beta(ALPHA, ALPHA); 0: off")
    group.add_argument("--mixup_prob", type=float, help="probability that a batch is mixed")
    group.add_argument("--mixup_switch_prob", type=float, help="probability of CutMix instead of Mixup when both are on")

    group = parser.add_argument_group("model")
    group.add_argument("--model", help="a preset of vit_ms.PRESETS, e.g. vit_b_16 or tutorial (drops the "
                                       "recipe's --model_override values and takes the preset's image size)")
    group.add_argument("--image_size", type=int, help="input side in pixels (finetune, linear_probe: the "
                                                       "--pretrained weights' own unless given)")
    group.add_argument("--model_override", dest="model_overrides", action="append", metavar="FIELD=VALUE",
                       help="a ViTConfig field replacing the preset's, e.g. depth=6 (repeatable)")
    group.add_argument("--drop_path_rate", type=float, help="stochastic depth at the last block")
    group.add_argument("--pretrained", help="initial weights: a checkpoint file (ours, the tutorial's, timm, "
                                            "torchvision, JAX) or a vit_ms.checkpoint.ZOO name such as "
                                            "augreg_vit_ti_16_224 (downloaded); each brings its architecture and "
                                            "preprocessing, as convert.py reads it (--model only where a file's "
                                            "shapes are that preset's); --resume reads it no more")
    group.add_argument("--freeze_backbone", action=BOOL, help="train the head only (a linear probe)")
    group.add_argument("--train_final_norm", action=BOOL, help="with --freeze_backbone: train the final norm too")
    group.add_argument("--recompute", action=BOOL, help="recompute encoder-block activations in the backward "
                                                         "pass (less memory, about one more forward pass)")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int, help="passes over the train split")
    group.add_argument("--batch_size", type=int, help="images per step on each device")
    group.add_argument("--optimizer", choices=["adam", "adamw", "sgd"],
                       help="'adam': nn.Adam (the tutorial's); 'adamw': nn.AdamWeightDecay without decay on "
                            "norms, biases, cls_token and pos_embed; 'sgd': nn.SGD with momentum, the same groups")
    group.add_argument("--momentum", type=float, help="SGD momentum")
    group.add_argument("--nesterov", action=BOOL, help="SGD Nesterov momentum")
    group.add_argument("--lr", type=float, help="peak learning rate")
    group.add_argument("--min_lr", type=float, help="learning rate at the end of the cosine")
    group.add_argument("--lr_schedule", choices=["cosine_epoch", "warmup_cosine"],
                       help="'cosine_epoch': nn.cosine_decay_lr, one value per epoch (the tutorial's); "
                            "'warmup_cosine': linear warmup, then a per-step cosine")
    group.add_argument("--warmup_epochs", type=int, help="epochs of linear warmup (warmup_cosine)")
    group.add_argument("--beta1", type=float, help="Adam first-moment decay")
    group.add_argument("--beta2", type=float, help="Adam second-moment decay")
    group.add_argument("--eps", type=float, help="Adam epsilon")
    group.add_argument("--weight_decay", type=float, help="weight decay (AdamW: decoupled, matrices only)")
    group.add_argument("--label_smoothing", type=float, help="target on = 1 - s, off = s / (classes - 1)")
    group.add_argument("--layer_decay", type=float, metavar="D",
                       help="layer-wise lr decay: block i learns at lr * D^(depth - i), embeddings least, head "
                            "1.0; 1: off")
    group.add_argument("--clip_grad", type=float, metavar="NORM", help="clip gradients to this global norm; 0: off")
    group.add_argument("--accum_steps", type=int, metavar="K",
                       help="accumulate K batches per optimizer step (= one batch K times larger)")
    group.add_argument("--ema_decay", type=float, metavar="D",
                       help="model EMA per optimizer step, evaluated every epoch and saved as ema.ckpt; 0: off")

    group = parser.add_argument_group("runtime")
    group.add_argument("--device_target", choices=["CPU", "GPU", "Ascend"], help="the device to train on")
    group.add_argument("--mode", choices=["graph", "pynative"], help="graph (compiled, default) or pynative")
    group.add_argument("--amp_level", choices=["auto", "O0", "O1", "O2", "O3"],
                       help="mixed precision; 'auto': O2 on Ascend, O0 elsewhere (CPU: O0 or O2)")
    group.add_argument("--dataset_sink_mode", action=BOOL, help="feed data through the device queue "
                                                                 "(default: on for Ascend, off elsewhere)")
    group.add_argument("--seed", type=int, help="seed of weights, shuffling, augmentation and stochastic "
                                               "depth (under msrun rank r augments and drops paths with seed + r)")
    group.add_argument("--output_dir", help="where checkpoints, metrics.jsonl, train.log, curves.png and "
                                            "config.json go")
    group.add_argument("--resume", action=BOOL, help="continue the run in OUTPUT_DIR from its last.ckpt, with its "
                                                      "saved settings (flags given here override them)")
    group.add_argument("--overwrite", action=BOOL, help="replace the run OUTPUT_DIR holds (its files are deleted "
                                                         "once this run's inputs check out)")
    group.add_argument("--distributed", action=BOOL, help="data parallel, one process per device, under msrun")
    group.add_argument("--progress_bar", action=BOOL, help="a progress bar per epoch (on a terminal only)")
    group.add_argument("--followups", action=BOOL, help="after training, evaluate, infer and export best.ckpt")
    return parser


def _parse_overrides(pairs, parser) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            parser.error(f"--model_override expects FIELD=VALUE, got {pair!r}")
        try:
            overrides[key] = json.loads(value)  # numbers and booleans; anything else stays a string
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


@contextlib.contextmanager
def _console_logging():
    # vit_ms's INFO lines on the console outside train() (which sets up its own console and train.log):
    # settings adjusted while resolving, and the follow-up steps.
    package = logging.getLogger("vit_ms")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
    previous = package.level
    package.setLevel(logging.INFO)
    package.addHandler(handler)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(previous)


def parse_config(argv=None, parser=None):
    """(resolved TrainConfig, dry_run) from command-line arguments; bad flags exit with status 2."""
    parser = parser or build_parser()
    args = vars(parser.parse_args(argv))
    if "model_overrides" in args:
        args["model_overrides"] = _parse_overrides(args["model_overrides"], parser)
    recipe, config_file, dry_run = args.pop("recipe", None), args.pop("config_file", None), args.pop("dry_run", False)

    from vit_ms.training.config import resolve_train_config

    try:
        with _console_logging():
            cfg = resolve_train_config(recipe, config_file, **args)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    return cfg, dry_run


def main(argv=None) -> int:
    # Before anything starts a thread: Ctrl-C then reaches vit_ms, not MindSpore's graph runtime, which
    # would turn it into SIGTERM (vit_ms/interrupts.py).
    interrupts.route_to_watcher()
    parser = build_parser()
    cfg, dry_run = parse_config(argv, parser)
    if dry_run:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    quiet_mindspore()
    require_device_target(parser, cfg.device_target)

    from vit_ms.checkpoint import CheckpointError
    from vit_ms.data import DatasetError
    from vit_ms.training import (RunFolderError, TrainingDiverged, TrainingInterrupted, run_followups,
                                 train)
    from vit_ms.training.distributed import DistributedJobError

    try:
        result = train(cfg)
        if cfg.followups and result.rank == 0:
            with _console_logging():
                run_followups(cfg, result)
    except TrainingInterrupted as stop:
        return stop.exit_status  # train() has logged the last finished epoch and the --resume command
    except KeyboardInterrupt:
        # A Ctrl-C that reached Python's default handler (outside training, or delivered again by MindSpore
        # after train() stopped): the files are consistent, every write being atomic.
        print(f"train.py: interrupted; continue with: python train.py --resume --output_dir {cfg.output_dir}",
              file=sys.stderr)
        return 130
    except (TrainingDiverged, DatasetError, CheckpointError, RunFolderError):
        return 1  # train() has logged the reason and the fix, on the console and in train.log
    except DistributedJobError as error:
        print(f"train.py: {error}", file=sys.stderr)
        return 1
    if result.rank == 0:  # under msrun one summary, from the rank that wrote the files
        print(f"best val top-1 {100 * result.best_top1:.2f}% after {result.epochs_done} epoch(s); "
              f"checkpoints in {result.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
