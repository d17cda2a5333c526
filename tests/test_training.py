"""Training: recipes and settings, the learning-rate schedules against hand computation, optimizer groups,
the smoothed loss, and short real runs (loss goes down, files written, NaN stops the run, run folders
never clobbered, nothing written before the inputs check out)."""
import dataclasses
import json
import logging
import math
import os
import shutil
import stat
import subprocess
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn
from mindspore.train import Callback
from PIL import Image

from vit_ms import create_model
from vit_ms.checkpoint import CheckpointError, export_checkpoint, load_model, read_metadata, read_params
from vit_ms.data import DatasetError
from vit_ms.evaluate import imagenet_classes
from vit_ms.training import (RunFolderError, SoftCrossEntropy, TrainingDiverged, create_optimizer, lr_schedule,
                             param_groups, read_metrics, resolve_train_config, run_followups, train)
from vit_ms.training.config import RECIPES, TrainConfig, get_train_config
from vit_ms.training.loop import _keeps_head

# A model that compiles in seconds: 16-pixel images, 2x2 patches of 8, width 32, one block.
TINY_MODEL = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64}
TINY = dict(image_size=16, model_overrides=TINY_MODEL, batch_size=8, warmup_epochs=0, lr=3e-3,
            num_workers=1, progress_bar=False)


def make_image_folder(root, per_class=(16, 4), colours=((220, 40, 40), (40, 200, 40), (40, 40, 220)), seed=0):
    """ROOT/{train,val}/class_<i>/*.png: noisy 16x16 images whose colour gives the class away."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "val"), per_class):
        for c, colour in enumerate(colours):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.integers(-40, 41, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------

def test_tutorial_recipe_is_the_tutorials_fine_tuning():
    cfg = resolve_train_config("tutorial")  # resolving settings downloads nothing
    assert (cfg.model, cfg.pretrained, cfg.dataset, cfg.image_size) == ("tutorial", "vit_b_16_224",
                                                                         "imagenet_subset", 224)
    assert (cfg.epochs, cfg.batch_size, cfg.optimizer, cfg.beta1) == (10, 16, "adam", 0.9)
    assert (cfg.lr, cfg.min_lr, cfg.lr_schedule, cfg.label_smoothing) == (5e-5, 0.0, "cosine_epoch", 0.1)
    assert (cfg.weight_decay, cfg.drop_path_rate, cfg.model_overrides) == (0.0, 0.0, {})
    assert cfg.amp_level == "auto" and cfg.followups and cfg.augment and cfg.crop_min_scale == 0.08
    # nn.cosine_decay_lr(min_lr=0, max_lr=5e-5, total_step=10*125, step_per_epoch=125, decay_epoch=10),
    # written out by hand: constant within an epoch, 5e-5 * (1 + cos(pi * epoch / 10)) / 2.
    lr = lr_schedule(cfg, steps_per_epoch=125)
    assert len(lr) == 1250
    for step in (0, 124, 125, 600, 1249):
        assert lr[step] == pytest.approx(0.5 * 5e-5 * (1 + math.cos(math.pi * (step // 125) / 10)), rel=1e-6)
    assert lr[0] == pytest.approx(5e-5) and lr[-1] == pytest.approx(5e-5 * (1 + math.cos(0.9 * math.pi)) / 2)


def _optimizer(net, cfg, schedule):
    # As the training loop builds it.
    return create_optimizer(net, cfg.optimizer, schedule, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay,
                            momentum=cfg.momentum, nesterov=cfg.nesterov, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps)


def test_tutorial_optimizer_is_adam_with_beta1_09():
    cfg = get_train_config("tutorial", epochs=2)
    net = create_model("vit_ti_16", num_classes=4, **TINY_MODEL, image_size=16)
    opt = _optimizer(net, cfg, lr_schedule(cfg, 3))
    assert type(opt) is nn.Adam
    assert float(opt.beta1.asnumpy()) == pytest.approx(0.9) and float(opt.beta2.asnumpy()) == pytest.approx(0.999)
    for group_lr in opt.learning_rate:  # one table per parameter group, all the same without layer decay
        assert np.allclose(group_lr.learning_rate.asnumpy(), [5e-5] * 3 + [2.5e-5] * 3)  # cos(pi / 2) = 0


def test_scratch_recipe_is_the_default_and_uses_adamw_with_groups():
    cfg = resolve_train_config()
    assert cfg == RECIPES["scratch"] and cfg.dataset == "sample" and cfg.optimizer == "adamw"
    assert cfg.lr_schedule == "warmup_cosine" and cfg.warmup_epochs > 0
    assert cfg.label_smoothing > 0 and cfg.drop_path_rate > 0
    net = create_model("vit_ti_16", num_classes=4, **TINY_MODEL, image_size=16)
    assert type(_optimizer(net, cfg, [1e-3] * 4)) is nn.AdamWeightDecay


def test_unknown_keys_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown TrainConfig field.*'epoch'"):
        get_train_config("scratch", epoch=3)
    with pytest.raises(ValueError, match="unknown TrainConfig field.*'lr_max'"):
        resolve_train_config("tutorial", lr_max=1.0)
    with pytest.raises(ValueError, match="unknown TrainConfig field.*'batchsize'"):
        TrainConfig.from_dict({"batchsize": 8})
    file = tmp_path / "settings.json"
    file.write_text(json.dumps({"epochs": 2, "optimiser": "sgd"}))
    with pytest.raises(ValueError, match="'optimiser'"):
        resolve_train_config("scratch", config_file=file)
    with pytest.raises(ValueError, match="model_overrides has unknown.*'layers'"):
        get_train_config("scratch", model_overrides={"layers": 3})
    with pytest.raises(ValueError, match="unknown recipe 'finetuning'"):
        resolve_train_config("finetuning")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        get_train_config("scratch", optimizer="lamb")


def test_old_import_path_still_gives_the_training_settings():
    import vit_ms.config

    assert vit_ms.config.TrainConfig is TrainConfig and vit_ms.config.RECIPES is RECIPES


def test_a_recipe_warmup_longer_than_the_run_is_shortened_with_a_note(caplog):
    with caplog.at_level(logging.INFO, logger="vit_ms"):
        cfg = resolve_train_config("scratch", epochs=1)  # the recipe's warmup is 1 epoch
    assert (cfg.epochs, cfg.warmup_epochs) == (1, 0)
    assert "warmup shortened from the recipe's 1 epoch(s) to 0 to fit --epochs 1" in caplog.text
    assert resolve_train_config("scratch", epochs=3).warmup_epochs == RECIPES["scratch"].warmup_epochs == 1
    with pytest.raises(ValueError, match=r"warmup_epochs \(2\) must be below epochs \(2\)"):
        resolve_train_config("scratch", epochs=2, warmup_epochs=2)  # both typed by the user: their conflict


def test_layers_override_in_order(tmp_path):
    file = tmp_path / "settings.json"
    file.write_text(json.dumps({"epochs": 4, "lr": 1e-4}))
    cfg = resolve_train_config("tutorial", config_file=file, lr=2e-4, batch_size=8)
    assert (cfg.recipe, cfg.epochs, cfg.lr, cfg.batch_size, cfg.optimizer) == ("tutorial", 4, 2e-4, 8, "adam")
    # model_overrides merge into the recipe's; another model drops them and takes its own image size.
    merged = resolve_train_config("scratch", model_overrides={"depth": 2})
    assert merged.model_overrides == {**RECIPES["scratch"].model_overrides, "depth": 2}
    other = resolve_train_config("scratch", model="vit_s_16")
    assert other.model_overrides == {} and other.image_size == 224
    # Resuming takes the run's saved config.json; flags still override it.
    out = tmp_path / "run"
    out.mkdir()
    saved = get_train_config("scratch", epochs=7, lr=5e-4, output_dir=str(out))
    (out / "config.json").write_text(json.dumps(saved.to_dict()))
    resumed = resolve_train_config(None, resume=True, output_dir=str(out), epochs=9)
    assert resumed == dataclasses.replace(saved, epochs=9, resume=True)


# ---------------------------------------------------------------------------------------------------------
# Schedule, groups, loss
# ---------------------------------------------------------------------------------------------------------

def test_warmup_cosine_schedule_against_hand_computation():
    cfg = get_train_config("scratch", lr=1e-3, min_lr=1e-5, epochs=4, warmup_epochs=1)
    lr = np.array(lr_schedule(cfg, steps_per_epoch=3))
    # Warmup: 1/3, 2/3, 3/3 of the peak; then 9 cosine steps at t = 0/9 .. 8/9 of the half period.
    expected = [1e-3 / 3, 2e-3 / 3, 1e-3] + [1e-5 + (1e-3 - 1e-5) * (1 + np.cos(np.pi * t / 9)) / 2
                                             for t in range(9)]
    np.testing.assert_allclose(lr, expected, rtol=1e-12)
    assert lr[3] == pytest.approx(1e-3) and lr.min() > 1e-5 and np.all(np.diff(lr[3:]) < 0)


def test_cosine_epoch_schedule_matches_mindspore():
    cfg = get_train_config("tutorial", lr=1e-3, min_lr=1e-4, epochs=3)
    np.testing.assert_allclose(lr_schedule(cfg, 4), nn.cosine_decay_lr(1e-4, 1e-3, 12, 4, 3), rtol=1e-12)
    assert lr_schedule(cfg, 4)[4:8] == [pytest.approx(1e-4 + 0.9e-3 * 0.75)] * 4  # cos(pi/3) = 1/2


def test_param_groups_exempt_norms_biases_and_embeddings():
    net = create_model("vit_ti_16", num_classes=4, image_size=16, **TINY_MODEL)
    *groups, order = param_groups(net, [1e-3], weight_decay=0.05)
    assert {g["weight_decay"] for g in groups} == {0.05, 0.0}
    decay_names = {p.name for g in groups if g["weight_decay"] for p in g["params"]}
    assert decay_names == {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                           "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "head.weight"}
    no_decay_names = {p.name for g in groups if not g["weight_decay"] for p in g["params"]}
    assert {"cls_token", "pos_embed", "norm.gamma", "norm.beta", "head.bias", "blocks.0.norm1.gamma"} <= no_decay_names
    assert len(decay_names) + len(no_decay_names) == len(order["order_params"]) == len(net.trainable_params())


def test_a_zoo_name_in_pretrained_brings_its_architecture_and_preprocessing():
    from vit_ms.training.loop import _model_config

    # --model says Ti, the weights are an S/16: the weights' architecture wins; the image size is the run's.
    cfg = get_train_config("finetune", pretrained="augreg_vit_s_16_224", model="vit_ti_16", image_size=160)
    config, preprocess, _ = _model_config(cfg, 5)
    # ViT-S/16 (DeiT's table): width 384, depth 12, 6 heads, MLP 1536; AugReg's JAX numerics (eps 1e-6).
    assert (config.embed_dim, config.depth, config.num_heads, config.mlp_dim) == (384, 12, 6, 1536)
    assert (config.num_classes, config.image_size, config.drop_path_rate) == (5, 160, 0.1)
    # timm's augreg_in21k_ft_in1k preprocessing: mean = std = 0.5, bicubic.
    assert (preprocess.mean, preprocess.std, preprocess.interpolation, preprocess.image_size) == (
        (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 160)
    # A file keeps --model and the preset's own preprocessing (ImageNet mean/std).
    config, preprocess, _ = _model_config(dataclasses.replace(cfg, pretrained="weights.npz"), 5)
    assert config.embed_dim == 192 and preprocess.mean == pytest.approx((0.485, 0.456, 0.406))


def test_the_transfer_recipes_take_the_image_size_of_the_weights_unless_one_is_given():
    from vit_ms.training.loop import _model_config

    # timm's resolve_data_config: the pretrained config's input size unless the run gives one. --model does
    # not pin the preset's size here (it does for the scratch recipe).
    for recipe in ("finetune", "linear_probe"):
        cfg = resolve_train_config(recipe, pretrained="augreg_vit_s_16_384", model="vit_s_16")
        assert cfg.image_size is None
        config, preprocess, _ = _model_config(cfg, 5)
        # AugReg's 384 px fine-tuning: a 24x24 grid, crop_pct 1.0 (timm's augreg_in21k_ft_in1k 384 cfg).
        assert (config.image_size, preprocess.image_size, preprocess.crop_pct) == (384, 384, 1.0)
        config, preprocess, _ = _model_config(dataclasses.replace(cfg, image_size=224), 5)
        assert (config.image_size, preprocess.image_size) == (224, 224)
        # A foreign file says nothing of its size: the --model preset's.
        config, _, _ = _model_config(dataclasses.replace(cfg, pretrained="weights.npz", model="vit_b_32"), 5)
        assert (config.embed_dim, config.patch_size, config.image_size) == (768, 32, 224)
    assert resolve_train_config("scratch", model="vit_s_16").image_size == 224


def test_a_mistyped_pretrained_name_stops_before_anything_is_written(tmp_path):
    cfg = get_train_config("finetune", data_path=str(make_image_folder(tmp_path / "data", per_class=(1, 1))),
                           pretrained="augreg_vit_ti_16_22", output_dir=str(tmp_path / "run"))
    with pytest.raises(CheckpointError, match=r"augreg_vit_ti_16_22 is neither a file nor a named pretrained "
                                              r"checkpoint \(did you mean augreg_vit_ti_16_224\?\)"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_smoothed_cross_entropy_against_numpy(rng):
    logits = rng.normal(size=(5, 4)).astype(np.float32)
    labels = np.array([0, 3, 1, 1, 2], np.int32)
    loss = SoftCrossEntropy(4, 0.1)(ms.Tensor(logits), ms.Tensor(labels)).asnumpy()
    target = np.full((5, 4), 0.1 / 3)
    target[np.arange(5), labels] = 0.9
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert loss == pytest.approx(-(target * log_softmax).sum(axis=1).mean(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Real runs
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _no_graph_cache_in_process():
    # train() turns MindSpore's compile cache on for the whole process (its env vars stay set); in the
    # pytest process that would reach every later test. The CLI tests (subprocesses) exercise the cache.
    previous = os.environ.get("VIT_MS_GRAPH_CACHE")
    os.environ["VIT_MS_GRAPH_CACHE"] = "0"
    yield
    if previous is None:
        os.environ.pop("VIT_MS_GRAPH_CACHE")
    else:
        os.environ["VIT_MS_GRAPH_CACHE"] = previous


@pytest.fixture(scope="module", autouse=True)
def _context_mode_restored():
    # train() sets the execution mode for the process (graph by default); later modules run in the mode
    # they found (test_fast_path's gradient test failed after this module when it ran in graph mode).
    previous = ms.get_context("mode")
    yield
    ms.set_context(mode=previous)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Three epochs of a tiny ViT on a tiny colour dataset, in graph mode: (config, result)."""
    root = make_image_folder(tmp_path_factory.mktemp("data"))
    cfg = get_train_config("scratch", data_path=str(root), output_dir=str(tmp_path_factory.mktemp("run")),
                           epochs=3, **TINY)
    return cfg, train(cfg)


def test_training_learns_and_writes_every_output(tiny_run):
    cfg, result = tiny_run
    out = result.output_dir
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert set(records[0]) == {"epoch", "step", "train_loss_smoothed", "top1", "val_loss_smoothed", "lr", "time",
                               "images_per_sec"}  # no top5: three classes
    assert records[-1]["train_loss_smoothed"] < records[0]["train_loss_smoothed"]
    assert records[-1]["top1"] == 1.0 and result.best_top1 == 1.0  # three colours, one per class
    steps = records[0]["step"]
    assert steps == 48 // 8 and [r["step"] for r in records] == [steps, 2 * steps, 3 * steps]
    lr = lr_schedule(cfg, steps)
    assert [r["lr"] for r in records] == [pytest.approx(lr[r["step"] - 1]) for r in records]
    assert json.loads((out / "config.json").read_text()) == cfg.to_dict()
    log = (out / "train.log").read_text()
    assert (out / "curves.png").stat().st_size > 1000 and "epoch 3/3: train loss (label-smoothed)" in log
    assert "top-5" not in log and "\r" not in log  # no progress bar in a log file
    for name in ("last.ckpt", "best.ckpt", "config.json", "metrics.jsonl"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left

    meta = read_metadata(out / "last.ckpt")
    assert meta["epoch"] == 3 and meta["class_names"] == ["class_0", "class_1", "class_2"]
    assert meta["preprocess"]["image_size"] == 16 and meta["model"]["embed_dim"] == 32
    assert meta["train_config"] == cfg.to_dict()
    last = ms.load_checkpoint(str(out / "last.ckpt"))
    assert {"global_step", "adam_m.cls_token", "adam_v.head.weight"} <= set(last)
    assert int(last["global_step"].asnumpy()[0]) == 3 * steps
    # best.ckpt is self-describing: load_model rebuilds the net and it classifies the colours.
    net, best_meta = load_model(out / "best.ckpt")
    assert best_meta["epoch"] == records.index(max(records, key=lambda r: r["top1"])) + 1
    net.set_train(False)
    image = np.zeros((1, 3, 16, 16), np.float32)
    image[0, 2] = (220 - 0.406 * 255) / (0.225 * 255)  # blue channel high, red and green low: class 2
    image[0, 0] = (40 - 0.485 * 255) / (0.229 * 255)
    image[0, 1] = (40 - 0.456 * 255) / (0.224 * 255)
    assert int(net(ms.Tensor(image)).asnumpy().argmax()) == 2


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_run, tmp_path):
    cfg, result = tiny_run
    out = tmp_path / "run"
    shutil.copytree(result.output_dir, out)
    before = {name: (out / name).read_bytes() for name in ("last.ckpt", "best.ckpt", "metrics.jsonl")}
    # An absurd learning rate blows the weights up within a step or two of epoch 4.
    cfg = dataclasses.replace(cfg, output_dir=str(out), resume=True, epochs=5, lr=1e30, min_lr=0.0)
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf).*epoch 4.*last good checkpoint is "
                                               r".*last.ckpt \(epoch 3\)"):
        train(cfg)
    for name, content in before.items():
        assert (out / name).read_bytes() == content, f"{name} changed after the NaN"
    assert "training stopped" in (out / "train.log").read_text()


def test_followups_evaluate_infer_and_export_in_process(tiny_run, tmp_path, monkeypatch):
    cfg, result = tiny_run
    infer = tmp_path / "data" / "infer"
    shutil.copytree(Path(cfg.data_path) / "val", tmp_path / "data" / "val")
    infer.mkdir()
    shutil.copy(Path(cfg.data_path) / "val" / "class_1" / "000.png", infer / "green.png")
    out = tmp_path / "run"
    shutil.copytree(result.output_dir, out)
    # Library calls, not the repository's scripts: no subprocess at all.
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"ran a subprocess {a}"))
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail(f"started a subprocess {a}"))
    run_followups(cfg, dataclasses.replace(result, output_dir=out, best_checkpoint=out / "best.ckpt"),
                  data_root=tmp_path / "data")
    evaluation = json.loads((out / "eval" / "metrics.json").read_text())
    assert evaluation["top_1"] == 1.0 and evaluation["num_images"] == 12
    predictions = json.loads((out / "infer" / "predictions.json").read_text())["predictions"]
    assert [(p["path"], p["top_k"][0]["name"]) for p in predictions] == [(str(infer / "green.png"), "class_1")]
    assert (out / "infer" / "predictions.csv").is_file() and (out / "infer" / "green_pred.png").is_file()
    assert (out / "vit.mindir").stat().st_size > 0 and (out / "vit.mindir.json").is_file()


def test_resume_continues_the_shuffle_order_of_an_uninterrupted_run(tiny_run, tmp_path):
    from mindspore.train import Callback

    class Labels(Callback):  # the labels of every training batch, per epoch
        def __init__(self):
            super().__init__()
            self.seen = {}

        def on_train_step_end(self, run_context):
            cb_params = run_context.original_args()
            labels = cb_params.train_dataset_element[1].asnumpy().tolist()
            self.seen.setdefault(cb_params.cur_epoch_num, []).append(labels)

    cfg, _ = tiny_run
    whole, first, rest = Labels(), Labels(), Labels()
    train(dataclasses.replace(cfg, output_dir=str(tmp_path / "whole")), callbacks=[whole])
    train(dataclasses.replace(cfg, output_dir=str(tmp_path / "split"), epochs=1), callbacks=[first])
    train(dataclasses.replace(cfg, output_dir=str(tmp_path / "split"), resume=True), callbacks=[rest])
    assert sorted(whole.seen) == [1, 2, 3] and sorted(first.seen) == [1] and sorted(rest.seen) == [2, 3]
    assert whole.seen[2] != whole.seen[3]  # the order does change between epochs, so equality means something
    assert {**first.seen, **rest.seen} == whole.seen


def test_a_vit_ms_checkpoint_in_pretrained_brings_its_architecture_and_resume_needs_it_no_more(tiny_run, tmp_path):
    # Fine-tuning from one of our runs (or from weights convert.py wrote) needs no --model_override: the
    # checkpoint's metadata names the model and, with no --image_size (the transfer recipes' default), the
    # image size. --model says ViT-B at 224 px; the weights are the tiny run's, at 16 px.
    cfg, result = tiny_run
    pretrained = Path(shutil.copy(result.best_checkpoint, tmp_path / "pretrained.ckpt"))
    cfg = dataclasses.replace(cfg, model="vit_b_16", pretrained=str(pretrained), drop_path_rate=0.1,
                              model_overrides={}, image_size=None, output_dir=str(tmp_path / "finetuned"), epochs=1)
    start = _HeadAtStart()
    tuned = train(cfg, callbacks=[start])  # with --model's ViT-B this stopped at the first shape that did not fit
    log = (tuned.output_dir / "train.log").read_text()
    assert "is a vit_ms checkpoint of a ViT with width 32, depth 1, 2 heads, patch 8" in log
    assert f"image size 16 px: {pretrained}'s own" in log and "resampled" not in log
    assert "INFO model: {" in log and "INFO model vit_b_16" not in log  # it names no model it does not train
    # Every tensor: the checkpoint's head is for the data's own 3 classes, so training goes on with it.
    assert f"loaded 20 tensors from {pretrained} (vit_ms names)" in log and "new zero-initialised head" not in log
    saved, _ = read_params(pretrained)
    np.testing.assert_array_equal(start.weight, saved["head.weight"])
    meta = read_metadata(tuned.last_checkpoint)
    assert {k: meta["model"][k] for k in TINY_MODEL} == TINY_MODEL and meta["model"]["image_size"] == 16
    assert json.loads((tuned.output_dir / "config.json").read_text())["image_size"] == 16  # the size used
    assert meta["model"]["drop_path_rate"] == 0.1  # the run's own settings still apply on top
    assert meta["preprocess"] == read_metadata(result.best_checkpoint)["preprocess"]
    # --resume takes the weights and the model from last.ckpt: the --pretrained file may be gone.
    pretrained.unlink()
    resumed = train(dataclasses.replace(cfg, resume=True, epochs=2))
    assert [r["epoch"] for r in read_metrics(resumed.output_dir)] == [1, 2]
    resumed_meta = read_metadata(resumed.last_checkpoint)
    assert resumed_meta["model"] == meta["model"] and resumed_meta["preprocess"] == meta["preprocess"]


class _HeadAtStart(Callback):
    """The classifier of the network being trained, as its first step finds it (copied: asnumpy shares memory)."""

    def on_train_begin(self, run_context):
        params = {p.name: p.asnumpy().copy() for p in run_context.original_args().train_network.get_parameters()}
        self.weight, self.bias = params["head.weight"], params["head.bias"]


def test_fine_tuning_onto_other_classes_of_the_same_count_starts_from_a_new_zero_head(tiny_run, tmp_path):
    # The tiny run's head fits a 3-class data set but its rows are class_0..2, not red/green/blue: it used
    # to be loaded and trained on as if they were the same classes (only a head of another size was left out).
    cfg, result = tiny_run
    data = make_image_folder(tmp_path / "colours")
    for split in ("train", "val"):
        for c, name in enumerate(("red", "green", "blue")):
            (data / split / f"class_{c}").rename(data / split / name)
    cfg = dataclasses.replace(cfg, data_path=str(data), pretrained=str(result.best_checkpoint), epochs=1,
                              model_overrides={}, output_dir=str(tmp_path / "colours_run"))
    start = _HeadAtStart()
    tuned = train(cfg, callbacks=[start])
    assert not start.weight.any() and not start.bias.any()
    log = (tuned.output_dir / "train.log").read_text()
    assert ("a new zero-initialised head for the 3 classes of the data (blue, green, red); the weights' head is "
            "for 3 other classes (class_0, class_1, class_2)") in log
    assert (f"loaded 18 tensors from {result.best_checkpoint} (vit_ms names); dropped 2 (a new head for the "
            f"model's classes: head.weight, head.bias)") in log
    assert "WARNING" not in log
    assert read_metadata(tuned.last_checkpoint)["class_names"] == ["blue", "green", "red"]


def test_only_a_head_whose_rows_are_the_datas_classes_is_kept():
    wnids = [wnid for wnid, _ in imagenet_classes()]
    assert _keeps_head((1000, None), wnids)  # the tutorial: ImageNet-1k weights, wnid folders
    assert not _keeps_head((1000, None), [f"class_{i:04d}" for i in range(1000)])
    assert _keeps_head((2, ["ants", "bees"]), ["ants", "bees"])
    assert not _keeps_head((2, ["ants", "bees"]), ["bees", "cats"])
    assert not _keeps_head((2, None), ["ants", "bees"])  # rows of unknown meaning
    assert not _keeps_head(None, ["ants", "bees"])


def test_a_foreign_weights_file_in_pretrained_brings_its_architecture_as_convert_reads_it(tiny_run, tmp_path):
    # timm's names (what `convert.py --to timm` writes, what timm's save_file gives): no metadata, so the
    # architecture comes from the shapes, as convert.py reads them, and --model ViT-B is not used. Width 32
    # has no standard head count: the run's --model_override num_heads gives it, and without it the run
    # stops before anything is written, naming the way out.
    cfg, result = tiny_run
    timm_file = export_checkpoint(result.best_checkpoint, tmp_path / "tiny_timm.safetensors", "timm")
    cfg = dataclasses.replace(cfg, model="vit_b_16", pretrained=str(timm_file), image_size=None, epochs=1,
                              model_overrides={"num_heads": 2}, output_dir=str(tmp_path / "from_timm"))
    tuned = train(cfg)
    log = (tuned.output_dir / "train.log").read_text()
    assert (f"--pretrained {timm_file} holds a ViT with width 32, depth 1, 2 heads, patch 8 (timm names): "
            f"training that architecture (not --model vit_b_16)") in log
    assert f"image size 16 px: {timm_file}'s own" in log
    # A timm file cannot say which classes its head's 3 rows are: a new head for the data's.
    assert f"loaded 18 tensors from {timm_file} (timm names); dropped 2 (a new head" in log
    assert "the weights' head is for 3 unnamed classes" in log
    meta = read_metadata(tuned.last_checkpoint)
    assert {k: meta["model"][k] for k in TINY_MODEL} == TINY_MODEL and meta["model"]["image_size"] == 16
    # timm's numerics and preprocessing convention (convert.py's): eps 1e-6, exact GELU, ImageNet statistics.
    assert (meta["model"]["norm_eps"], meta["model"]["gelu_approximate"]) == (1e-6, False)
    assert meta["preprocess"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    with pytest.raises(CheckpointError, match="width 32, which has no standard head count"):
        train(dataclasses.replace(cfg, model_overrides={}, output_dir=str(tmp_path / "no_heads")))
    assert not (tmp_path / "no_heads").exists()


def test_two_runs_with_one_seed_end_bit_for_bit_alike(tiny_run, tmp_path):
    # Every random choice of a run follows --seed: initial weights, shuffling, the augmentations drawn by
    # two parallel decode workers, Mixup/CutMix, and stochastic depth in two blocks; the fine-tuning step
    # (gradient clipping, EMA) on top. Stochastic depth (vit_ms.layers.DropPath) and random erasing
    # (vit_ms.data.pipeline) made runs differ until this test.
    cfg, _ = tiny_run
    cfg = dataclasses.replace(cfg, model_overrides={**TINY_MODEL, "depth": 2}, drop_path_rate=0.5, num_workers=2,
                              auto_augment="randaugment", color_jitter=0.3, random_erasing=0.5, mixup=0.8,
                              cutmix=1.0, clip_grad=1.0, ema_decay=0.9)
    runs = [train(dataclasses.replace(cfg, output_dir=str(tmp_path / name))) for name in ("first", "again")]
    (first, _), (again, _) = (read_params(run.last_checkpoint) for run in runs)
    assert sorted(first) == sorted(again) and "global_step" in first
    for name in first:
        np.testing.assert_array_equal(first[name], again[name], err_msg=name)
    timing = ("time", "images_per_sec")
    assert ([{k: v for k, v in r.items() if k not in timing} for r in read_metrics(runs[0].output_dir)]
            == [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(runs[1].output_dir)])


# ---------------------------------------------------------------------------------------------------------
# Run folders: never clobbered, nothing written before the inputs check out
# ---------------------------------------------------------------------------------------------------------

def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_new_run_is_refused_where_a_run_is(tiny_run, tmp_path):
    cfg, result = tiny_run
    before = _snapshot(result.output_dir)
    with pytest.raises(RunFolderError, match=r"already holds a run \(config.json, metrics.jsonl, train.log, "
                                             r"last.ckpt, best.ckpt, curves.png\); continue it with --resume, "
                                             r"replace it with --overwrite"):
        train(dataclasses.replace(cfg, epochs=1))
    assert _snapshot(result.output_dir) == before

    # --overwrite replaces it: the old run's lines are gone, not mixed with the new run's.
    out = tmp_path / "run"
    shutil.copytree(result.output_dir, out)
    stale = out / ".last.ckpt.abc123.vit_ms-tmp.ckpt"  # what a save killed mid-write leaves
    stale.write_bytes(b"partial")
    train(dataclasses.replace(cfg, epochs=1, output_dir=str(out), overwrite=True))
    assert [r["epoch"] for r in read_metrics(out)] == [1]
    assert "epoch 3/3" not in (out / "train.log").read_text() and not stale.exists()
    assert json.loads((out / "config.json").read_text())["overwrite"] is True


def test_resume_without_a_run_creates_nothing(tiny_run, tmp_path):
    cfg, _ = tiny_run
    nothing = tmp_path / "outputs" / "nothing"
    with pytest.raises(RunFolderError, match=f"--resume: {nothing / 'last.ckpt'} does not exist"):
        train(dataclasses.replace(cfg, output_dir=str(nothing), resume=True))
    assert not (tmp_path / "outputs").exists()


def test_bad_data_path_writes_nothing_into_the_run(tiny_run, tmp_path):
    cfg, result = tiny_run
    out = tmp_path / "run"
    shutil.copytree(result.output_dir, out)
    before = _snapshot(out)
    with pytest.raises(DatasetError, match="no_such_data"):
        train(dataclasses.replace(cfg, output_dir=str(out), resume=True, epochs=4,
                                  data_path=str(tmp_path / "no_such_data")))
    assert _snapshot(out) == before


def test_data_check_setting_reaches_create_dataset(tiny_run, tmp_path, monkeypatch):
    from vit_ms import data

    cfg, _ = tiny_run
    seen = []

    def record(*args, **kwargs):
        seen.append(kwargs["check"])
        raise DatasetError("recorded")

    monkeypatch.setattr(data, "create_dataset", record)
    with pytest.raises(DatasetError, match="recorded"):
        train(dataclasses.replace(cfg, output_dir=str(tmp_path / "run"), data_check="header"))
    assert seen == ["header"] and not (tmp_path / "run").exists()
