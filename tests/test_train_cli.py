"""train.py as a user runs it: --help, bad flags, the fine-tuning recipes and options (mixup, cutmix, layer
decay, clipping, accumulation, EMA, a frozen backbone, recomputation, a default-sized model on a tiny
folder), a run killed with SIGKILL and resumed (EMA included), Ctrl-C and a second run into the same
folder, a full disk during a checkpoint save, msrun data parallelism on two CPU workers (and one worker
killed), an unavailable device, and the tutorial recipe offline."""
import functools
import importlib.util
import json
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

from test_training import TINY_MODEL, make_image_folder
from vit_ms.checkpoint import read_metadata
from vit_ms.training import lr_schedule, read_metrics
from vit_ms.training.config import get_train_config

REPO = Path(__file__).resolve().parent.parent
RECORDING_TRAIN = Path(__file__).resolve().parent / "recording_train.py"  # train.py + a recording callback
PYTHON = sys.executable
TINY_FLAGS = ["--image_size", "16", "--batch_size", "8", "--warmup_epochs", "0", "--lr", "3e-3",
              "--num_workers", "1", "--no-progress_bar"]
for _key, _value in TINY_MODEL.items():
    TINY_FLAGS += ["--model_override", f"{_key}={_value}"]


def _env():
    # msrun starts its workers with `python` from PATH: the venv's must come first.
    env = dict(os.environ, PATH=f"{Path(PYTHON).parent}{os.pathsep}{os.environ.get('PATH', '')}", GLOG_v="3")
    env.pop("VIT_MS_DATA", None)
    return env


def run_train(args, cwd, timeout=180, script=REPO / "train.py", record=None, **kwargs):
    # cwd is a temporary folder: MindSpore may write compiler files into the working directory.
    command = [PYTHON, str(script), *([str(record)] if record is not None else []), *args]
    return subprocess.run(command, cwd=cwd, env=kwargs.pop("env", _env()), capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def test_help_explains_every_main_flag(tmp_path):
    result = run_train(["--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    for flag in ("--data_path", "--dataset", "--model", "--pretrained", "--epochs", "--batch_size", "--lr",
                 "--output_dir", "--resume", "--distributed", "--recipe", "--device_target", "--mode",
                 "--amp_level", "--seed", "--overwrite", "--check", "{full,header,none}", "{sample,imagenet_subset}",
                 "{CPU,GPU,Ascend}", "{graph,pynative}", "{none,randaugment,trivialaugment,autoaugment}",
                 "--ra_magnitude", "--random_erasing P", "--color_jitter S", "--mixup ALPHA", "--cutmix ALPHA",
                 "--mixup_prob", "--mixup_switch_prob", "{adam,adamw,sgd}", "--momentum", "--nesterov",
                 "--layer_decay D", "--clip_grad NORM", "--accum_steps K", "--ema_decay D", "--recompute",
                 "--freeze_backbone", "--train_final_norm", "finetune", "linear_probe"):
        assert flag in result.stdout, flag
    assert "msrun" in result.stdout and "tutorial" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--device_target", "TPU"], "invalid choice: 'TPU'"),
    (["--epochs", "many"], "invalid int value: 'many'"),
    (["--model_override", "layers=3"], "model_overrides has unknown or reserved field(s) ['layers']"),
    (["--model", "vit_z_16"], "unknown model preset 'vit_z_16'"),
    (["--epoch", "3"], "unrecognized arguments: --epoch 3 (--epoch: did you mean --epochs?)"),
    (["--resume", "--overwrite"], "--resume continues the run in output_dir and --overwrite deletes it"),
    (["--recipe", "finetune"], "the finetune recipe needs --pretrained: a checkpoint file"),
    (["--recipe", "linear_probe"], "or a zoo name such as augreg_vit_ti_16_224, downloaded on first use"),
    (["--auto_augment", "randaug"], "invalid choice: 'randaug'"),
    (["--layer_decay", "1.5"], "--layer_decay must be in (0, 1] (1: off), got 1.5"),
    (["--ema_decay", "1"], "--ema_decay must be in [0, 1) (0: off), got 1.0"),
    (["--mixup_prob", "2"], "--mixup_prob must be a probability in [0, 1], got 2.0"),
    (["--accum_steps", "0"], "TrainConfig.accum_steps must be a positive integer, got 0"),
    (["--clip_grad", "-1"], "--clip_grad must be >= 0 (0: off), got -1.0"),
    (["--nesterov"], "--nesterov needs --optimizer sgd with --momentum > 0"),
    (["--train_final_norm"], "--train_final_norm only applies with --freeze_backbone"),
    (["--amp_level", "O2", "--ema_decay", "0.9"], "train in float32: use --amp_level O0"),
])
def test_bad_flags_fail_with_a_clear_message(tmp_path, args, message):
    result = run_train(args + ["--dry_run"], tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_flags_override_the_recipe(tmp_path):
    result = run_train(["--recipe", "tutorial", "--epochs", "3", "--lr", "1e-4", "--device_target", "Ascend",
                        "--dry_run"], tmp_path)
    assert result.returncode == 0, result.stderr
    expected = get_train_config("tutorial", epochs=3, lr=1e-4, device_target="Ascend").to_dict()
    assert json.loads(result.stdout) == expected


def test_finetune_recipe_resolves_and_dry_run_prints_every_field(tmp_path):
    result = run_train(["--recipe", "finetune", "--pretrained", "weights.safetensors", "--data_path", "photos",
                        "--epochs", "3", "--dry_run"], tmp_path)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    expected = get_train_config("finetune", pretrained="weights.safetensors", data_path="photos", epochs=3)
    assert printed == expected.to_dict()
    # The published defaults (README, "The finetune recipe: defaults and where each comes from"), and the warmup fitted to 3 epochs.
    assert {k: printed[k] for k in ("auto_augment", "ra_num_ops", "ra_magnitude", "color_jitter", "random_erasing",
                                    "mixup", "cutmix", "mixup_prob", "mixup_switch_prob", "optimizer", "momentum",
                                    "nesterov", "layer_decay", "clip_grad", "accum_steps", "ema_decay",
                                    "recompute", "freeze_backbone", "train_final_norm", "label_smoothing",
                                    "weight_decay", "warmup_epochs")} == {
        "auto_augment": "randaugment", "ra_num_ops": 2, "ra_magnitude": 9, "color_jitter": 0.0,
        "random_erasing": 0.25, "mixup": 0.8, "cutmix": 1.0, "mixup_prob": 1.0, "mixup_switch_prob": 0.5,
        "optimizer": "adamw", "momentum": 0.9, "nesterov": False, "layer_decay": 0.75, "clip_grad": 1.0,
        "accum_steps": 1, "ema_decay": 0.9998, "recompute": False, "freeze_backbone": False,
        "train_final_norm": False, "label_smoothing": 0.1, "weight_decay": 0.05, "warmup_epochs": 2}
    assert printed["lr"] == pytest.approx(5e-4 * 32 / 512)
    assert "warmup shortened from the recipe's 5 epoch(s) to 2 to fit --epochs 3" in result.stderr
    probe = run_train(["--recipe", "linear_probe", "--pretrained", "w.ckpt", "--dry_run"], tmp_path)
    assert probe.returncode == 0, probe.stderr
    probe = json.loads(probe.stdout)
    assert probe["freeze_backbone"] and (probe["auto_augment"], probe["mixup"], probe["cutmix"]) == ("none", 0, 0)


FINETUNE_FLAGS = ["--mixup", "0.8", "--cutmix", "1.0", "--layer_decay", "0.75", "--clip_grad", "1.0",
                  "--accum_steps", "2", "--ema_decay", "0.9", "--auto_augment", "randaugment", "--random_erasing",
                  "0.25", "--color_jitter", "0.2"]


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory):
    """One epoch with every fine-tuning option on, in its own VIT_MS_HOME: (output folder, result, home)."""
    tmp = tmp_path_factory.mktemp("finetune")
    data, out, home = make_image_folder(tmp / "data"), tmp / "run", tmp / "home"
    args = ["--data_path", str(data), "--output_dir", str(out), "--epochs", "1", *TINY_FLAGS, "--batch_size", "4",
            *FINETUNE_FLAGS]
    result = run_train(args, tmp, env=dict(_env(), VIT_MS_HOME=str(home)))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result, home


def test_one_epoch_with_every_finetuning_option_writes_ema_ckpt_and_says_which_weights_won(finetune_run):
    out, result, home = finetune_run
    assert {"best.ckpt", "last.ckpt", "ema.ckpt"} <= {p.name for p in out.iterdir()}
    record = read_metrics(out)[-1]
    # 48 images in batches of 4 = 12 micro-batches; 2 per optimizer step.
    assert record["step"] == 6 and read_metadata(out / "last.ckpt")["global_step"] == 6
    last = ms.load_checkpoint(str(out / "last.ckpt"))
    assert int(last["global_step"].asnumpy()[0]) == 6 and int(last["accum_micro_step"].asnumpy()) == 12
    # ema.ckpt holds exactly the averages last.ckpt keeps for --resume, under the model's own names.
    ema = ms.load_checkpoint(str(out / "ema.ckpt"))
    ema.pop("vit_ms_meta", None)
    assert set(ema) == {name[len("ema."):] for name in last if name.startswith("ema.")}
    for name, value in ema.items():
        np.testing.assert_array_equal(value.asnumpy(), last[f"ema.{name}"].asnumpy(), err_msg=name)
    # The log and best.ckpt's metadata agree on which weights won.
    winner = read_metadata(out / "best.ckpt")["weights"]
    ema_won = record["ema_top1"] > record["top1"]
    assert winner == ("ema" if ema_won else "trained")
    best = max(record["ema_top1"], record["top1"])
    phrase = (f"from the EMA weights (top-1 {100 * record['ema_top1']:.2f}% vs {100 * record['top1']:.2f}% trained)"
              if ema_won else
              f"from the trained weights (top-1 {100 * record['top1']:.2f}% vs {100 * record['ema_top1']:.2f}% EMA)")
    assert f"new best val top-1 {100 * best:.2f}%: wrote {out / 'best.ckpt'} {phrase}" in (out / "train.log").read_text()
    assert f"EMA top-1 {100 * record['ema_top1']:.2f}%" in result.stderr
    # The compiled graphs were cached for the next run with these settings.
    assert list((home / "graphs").rglob("*.mindir")), sorted((home / "graphs").rglob("*"))


def test_linear_probe_from_a_checkpoint_changes_only_the_head_with_recompute(finetune_run, tmp_path):
    pretrained, _, home = finetune_run
    pretrained = pretrained / "ema.ckpt"
    data, out, record = make_image_folder(tmp_path / "data", per_class=(8, 2)), tmp_path / "run", tmp_path / "rec"
    args = ["--recipe", "linear_probe", "--pretrained", str(pretrained), "--data_path", str(data), "--output_dir",
            str(out), "--epochs", "1", *TINY_FLAGS, "--recompute"]
    result = run_train(args, tmp_path, script=RECORDING_TRAIN, record=record,
                       env=dict(_env(), VIT_MS_HOME=str(home)))
    assert result.returncode == 0, result.stderr[-3000:]
    start = ms.load_checkpoint(str(record / "rank_0_start.ckpt"))
    final = ms.load_checkpoint(str(record / "rank_0_final.ckpt"))
    weights = ms.load_checkpoint(str(pretrained))
    weights.pop("vit_ms_meta")
    changed = set()
    for name, value in weights.items():
        if not name.startswith("head."):  # the backbone started from the checkpoint
            np.testing.assert_array_equal(start[name].asnumpy(), value.asnumpy(), err_msg=name)
        if not np.array_equal(start[name].asnumpy(), final[name].asnumpy()):
            changed.add(name)
    assert changed == {"head.weight", "head.bias"}
    assert "frozen backbone: training head.weight, head.bias only" in result.stderr


def test_a_cached_training_graph_drops_paths_by_the_seed_of_the_run_that_loads_it(tmp_path):
    # The graph cache's key left the seed out, but DropPath's seeds are compiled into the graph: a --seed 1
    # run after a --seed 0 run with the same settings dropped by seed 0's masks (different weights from a
    # fresh --seed 1 run).
    data = make_image_folder(tmp_path / "data")
    flags = ["--data_path", str(data), "--epochs", "1", *TINY_FLAGS, "--model_override", "depth=2",
             "--drop_path_rate", "0.5"]  # two blocks: the first block's rate is 0

    def run(name, seed, home):
        result = run_train(flags + ["--output_dir", str(tmp_path / name), "--seed", str(seed)], tmp_path,
                           env=dict(_env(), VIT_MS_HOME=str(tmp_path / home)))
        assert result.returncode == 0, result.stderr[-3000:]
        return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(tmp_path / name / "last.ckpt")).items()
                if isinstance(v, ms.Tensor)}

    run("seed0", 0, "home")
    cached, fresh = run("seed1", 1, "home"), run("seed1_fresh", 1, "other_home")
    assert set(cached) == set(fresh)
    for name in cached:
        np.testing.assert_array_equal(cached[name], fresh[name], err_msg=name)
    assert len(list((tmp_path / "home" / "graphs").iterdir())) == 2  # a graph per seed


def test_the_default_model_trains_one_epoch_on_a_tiny_folder(tmp_path):
    # `python train.py --data_path DIR --model vit_ti_16 --epochs 1`: ViT-Ti/16 at 224 px with the scratch
    # recipe's batch of 32 on a folder of 6 training images: the batch shrinks to fit (a warning), the
    # one-epoch warmup is shortened, and the run finishes. PyNative mode only to keep the test short
    # (compiling the 12-block graph takes over a minute on 2 cores); the settings are mode-independent.
    data = make_image_folder(tmp_path / "data", per_class=(2, 1))
    out = tmp_path / "run"
    result = run_train(["--data_path", str(data), "--model", "vit_ti_16", "--epochs", "1", "--output_dir", str(out),
                        "--no-progress_bar", "--mode", "pynative"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--batch_size 32 x --accum_steps 1 is more than the 6 training image(s) per device: using --batch_size 6"         in result.stderr
    assert json.loads((out / "config.json").read_text())["batch_size"] == 6
    assert [r["epoch"] for r in read_metrics(out)] == [1]
    meta = read_metadata(out / "best.ckpt")
    assert (meta["model"]["image_size"], meta["model"]["embed_dim"], meta["model"]["depth"]) == (224, 192, 12)


def _kill_after_first_checkpoint(proc, out: Path, timeout=150):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "last.ckpt").exists():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"not killed mid-run (rc {proc.returncode}):\n{stderr[-3000:]}"


def test_sigkill_then_resume_restores_everything_and_loses_no_epoch(tmp_path):
    data = make_image_folder(tmp_path / "data")
    out, debug = tmp_path / "run", tmp_path / "debug"
    epochs = 6
    # nn.Adam, the tutorial's optimizer: its state is moment1/moment2, beta1_power/beta2_power, global_step.
    args = ["--data_path", str(data), "--output_dir", str(out), "--epochs", str(epochs), "--optimizer", "adam",
            "--weight_decay", "0", "--ema_decay", "0.9", *TINY_FLAGS]
    proc = subprocess.Popen([PYTHON, str(REPO / "train.py"), *args], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _kill_after_first_checkpoint(proc, out)
    saved = ms.load_checkpoint(str(out / "last.ckpt"))  # readable: written atomically
    killed_at = read_metadata(out / "last.ckpt")["epoch"]
    assert 1 <= killed_at < epochs
    # A kill between an epoch's metrics line and its checkpoint leaves a line for an epoch that will be
    # trained again; make sure that case is covered whatever instant the kill hit.
    records = read_metrics(out)
    if records[-1]["epoch"] == killed_at:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(dict(records[-1], epoch=killed_at + 1)) + "\n")

    result = run_train(["--resume", "--output_dir", str(out)], tmp_path, script=RECORDING_TRAIN, record=debug)
    assert result.returncode == 0, result.stderr[-3000:]

    # What the resumed process held before its first step is exactly what last.ckpt saved.
    resumed = ms.load_checkpoint(str(debug / "rank_0_start.ckpt"))
    saved.pop("vit_ms_meta")
    assert set(resumed) == set(saved)
    assert {"moment1.cls_token", "moment2.head.weight", "beta1_power", "beta2_power", "global_step",
            "ema.cls_token", "ema.head.weight"} <= set(saved)  # the EMA too, restored tensor-equal
    for name, value in saved.items():
        np.testing.assert_array_equal(resumed[name].asnumpy(), value.asnumpy(), err_msg=name)
    steps = 48 // 8
    assert int(saved["global_step"].asnumpy()[0]) == killed_at * steps

    records = read_metrics(out)
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    assert [r["step"] for r in records] == [steps * e for e in range(1, epochs + 1)]
    lr = lr_schedule(get_train_config("scratch", epochs=epochs, lr=3e-3, warmup_epochs=0), steps)
    assert [r["lr"] for r in records] == [pytest.approx(lr[steps * e - 1]) for e in range(1, epochs + 1)]
    final = ms.load_checkpoint(str(out / "last.ckpt"))
    assert int(final["global_step"].asnumpy()[0]) == epochs * steps
    assert read_metadata(out / "last.ckpt")["epoch"] == epochs
    assert f"resumed from {out / 'last.ckpt'}: epoch {killed_at} done" in (out / "train.log").read_text()


def _unique_colour_folder(root: Path, per_class=(8, 2)):
    """Images whose red and blue are solid, each (red, blue) used once, and whose green is one left-to-right
    ramp in all of them: the red and blue means of a training batch name its files whatever the crop, the
    green means tell which part of the image each crop kept."""
    index = 0
    ramp = np.broadcast_to(np.linspace(10, 240, 16).round().astype(np.uint8), (16, 16))
    for split, count in zip(("train", "val"), per_class):
        for c in range(3):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = np.stack([np.full((16, 16), 10 + 8 * index), ramp, np.full((16, 16), 60 + 40 * c)], -1)
                index += 1
                Image.fromarray(image.astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_msrun_two_cpu_workers_train_one_model_on_disjoint_shards(tmp_path):
    data = _unique_colour_folder(tmp_path / "data")
    out, debug, logs = tmp_path / "run", tmp_path / "debug", tmp_path / "msrun_log"
    msrun = Path(PYTHON).parent / "msrun"
    cmd = [str(msrun), "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}",
           f"--log_dir={logs}", "--join=True", str(RECORDING_TRAIN), str(debug), "--distributed", "--data_path",
           str(data), "--output_dir", str(out), "--epochs", "2", *TINY_FLAGS, "--batch_size", "4"]
    result = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    worker_logs = "".join(p.read_text(errors="replace")[-3000:] for p in sorted(logs.glob("worker_*.log")))
    assert result.returncode == 0, worker_logs

    # One summary, from rank 0, and right (msrun's console repeats the worker logs); rank 1 logs no INFO.
    for text in (result.stdout + result.stderr, worker_logs):
        summaries = [line for line in text.splitlines() if "best val top-1" in line and "finished" in line]
        assert len(summaries) <= 1, summaries
    summaries = [line for line in worker_logs.splitlines() if "best val top-1" in line and "finished" in line]
    assert len(summaries) == 1 and "[rank 0]" in summaries[0], summaries
    assert f"best val top-1 {100 * read_metadata(out / 'last.ckpt')['best_top1']:.2f}%" in summaries[0]
    assert "[rank 1] INFO" not in worker_logs + result.stdout + result.stderr

    # Gradients were averaged: both ranks end with the same weights (and optimizer state) although their
    # data differed.
    final = [ms.load_checkpoint(str(debug / f"rank_{r}_final.ckpt")) for r in (0, 1)]
    assert set(final[0]) == set(final[1])
    for name in final[0]:
        np.testing.assert_array_equal(final[0][name].asnumpy(), final[1][name].asnumpy(), err_msg=name)

    # Each epoch, the two ranks saw disjoint halves that together cover the 24 training images (one shuffle
    # for both ranks), each cropped by its own rank's random stream: the green ramp's mean over the i-th
    # crop of rank 0 is not that of rank 1 (with one stream for both, they were equal at every i).
    seen, crops = {}, {}
    for rank in (0, 1):
        for line in (debug / f"rank_{rank}_batches.jsonl").read_text().splitlines():
            record = json.loads(line)
            seen.setdefault((record["epoch"], rank), []).extend(tuple(np.round(m[::2], 2)) for m in record["means"])
            crops.setdefault((record["epoch"], rank), []).extend(m[1] for m in record["means"])
    for epoch in (1, 2):
        a, b = seen[(epoch, 0)], seen[(epoch, 1)]
        assert len(set(a)) == len(a) == 12 and len(set(b)) == len(b) == 12
        assert not set(a) & set(b) and len(set(a) | set(b)) == 24
        differ = sum(x != y for x, y in zip(crops[(epoch, 0)], crops[(epoch, 1)]))
        assert differ >= 9, (differ, crops[(epoch, 0)], crops[(epoch, 1)])

    # Only rank 0 wrote: one metrics line per epoch, a log without other ranks, the checkpoints.
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]
    assert read_metadata(out / "last.ckpt")["global_step"] == 2 * 24 // 8
    assert "[rank 0]" in (out / "train.log").read_text() and "[rank 1]" not in (out / "train.log").read_text()


def _train_script():
    spec = importlib.util.spec_from_file_location("train_script", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tutorial_offline_stops_at_each_download_naming_the_file(tmp_path, monkeypatch, capsys):
    from vit_ms import checkpoint, data

    closed = f"http://127.0.0.1:{_free_port()}"  # nothing listens there: the download fails at once
    monkeypatch.setenv("VIT_MS_DATA", str(tmp_path / "datasets"))
    monkeypatch.setenv("VIT_MS_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "download_tutorial_dataset", functools.partial(
        data.download_tutorial_dataset, url=f"{closed}/vit_imagenet_dataset.zip", timeout=5, progressbar=False))
    resolve_pretrained = checkpoint.resolve_pretrained
    monkeypatch.setattr(checkpoint, "resolve_pretrained", lambda *a, **k: pytest.fail("fetched the weights first"))
    args = ["--recipe", "tutorial", "--output_dir", str(tmp_path / "run"), "--no-progress_bar"]

    # First stop: the dataset archive, before anything else is fetched or built.
    assert _train_script().main(args) == 1
    err = capsys.readouterr().err
    assert f"place it at {tmp_path / 'datasets' / 'vit_imagenet_dataset.zip'}" in err, err
    assert not (tmp_path / "run").exists()  # nothing is created before the inputs check out

    # With the data in place, the next stop is the pretrained checkpoint, named with its place.
    make_image_folder(tmp_path / "datasets" / "imagenet_subset", per_class=(2, 1))
    monkeypatch.setattr(checkpoint, "resolve_pretrained", resolve_pretrained)
    monkeypatch.setenv("VIT_MS_PRETRAINED_URL", closed)
    assert _train_script().main(args) == 1
    err = capsys.readouterr().err
    assert f"put it at {tmp_path / 'cache' / 'weights' / 'vit_b_16_224.ckpt'}" in err, err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------
# Run folders, interrupts, faults
# ---------------------------------------------------------------------------------------------------------

def test_a_second_run_into_a_run_folder_is_refused_naming_resume_and_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "train.log").write_text("the first run\n")
    result = run_train(["--output_dir", str(out), "--epochs", "1"], tmp_path)
    assert result.returncode == 1, result.stderr
    assert (f"{out} already holds a run (config.json, train.log); continue it with --resume, replace it with "
            f"--overwrite, or choose another --output_dir") in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "train.log"]
    assert (out / "train.log").read_text() == "the first run\n"


def test_resume_of_an_empty_folder_creates_nothing(tmp_path):
    result = run_train(["--resume", "--output_dir", str(tmp_path / "outputs" / "nothing")], tmp_path)
    assert result.returncode == 1
    assert f"--resume: {tmp_path / 'outputs' / 'nothing' / 'last.ckpt'} does not exist" in result.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("target", ["GPU", "Ascend"])
def test_an_unavailable_device_is_one_line_naming_what_to_install(tmp_path, target):
    result = run_train(["--device_target", target, "--output_dir", str(tmp_path / "run")], tmp_path)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"train.py: error: --device_target {target}: this MindSpore {ms.__version__} "
                            f"supports CPU device target(s) only; install the {target}"), result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def _wait_for(predicate, proc, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}:\n{proc.communicate()[1][-3000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_cleanly_names_the_resume_command_and_resume_finishes(tmp_path, signum):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    # Batch 2: 24 steps per epoch, 12 epochs, so the signal lands inside an epoch on a fast or a loaded machine.
    epochs = 12
    args = ["--data_path", str(data), "--output_dir", str(out), "--epochs", str(epochs), *TINY_FLAGS,
            "--batch_size", "2"]
    proc = subprocess.Popen([PYTHON, str(REPO / "train.py"), *args], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: len(read_metrics(out)) >= 1, proc, 150, "epoch 1 finished")
        time.sleep(0.5)  # into the next epochs' steps
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    # A Ctrl-C is reported as SIGINT although MindSpore's graph runtime turns one it catches into SIGTERM:
    # train.py routes both signals to vit_ms's watcher thread (vit_ms/interrupts.py).
    assert proc.returncode == 128 + signum, stderr[-3000:]
    name = signal.Signals(signum).name
    done = read_metadata(out / "last.ckpt")["epoch"]
    assert 1 <= done < epochs  # the epoch that was running, or being saved, when the signal came
    assert f"{name}: stopped after epoch {done} of {epochs} (files consistent); continue with: python train.py " \
           f"--resume --output_dir {out}" in stderr
    assert "Traceback" not in stderr and "\r" not in stderr  # no progress bar on a pipe
    assert [r["epoch"] for r in read_metrics(out)] == list(range(1, done + 1))
    assert int(ms.load_checkpoint(str(out / "last.ckpt"))["global_step"].asnumpy()[0]) == 24 * done
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]

    result = run_train(["--resume", "--output_dir", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["epoch"] for r in read_metrics(out)] == list(range(1, epochs + 1))
    assert read_metadata(out / "last.ckpt")["epoch"] == epochs


def test_a_second_signal_exits_at_once(monkeypatch):
    # Unit level: two signals sent back to back can merge into one before Python sees them, so a subprocess
    # test could not tell "at once" from "after the next step".
    from vit_ms.training.callbacks import RunState, StopOnSignal

    exits = []
    monkeypatch.setattr(os, "_exit", lambda status: exits.append(status))
    stopper = StopOnSignal(RunState(lr=[1.0], start_step=0, batch_size=1))
    stopper._handle(signal.SIGTERM, None)
    assert stopper.state.stop_signal == signal.SIGTERM and exits == []
    stopper._handle(signal.SIGINT, None)
    assert exits == [130]


def _full_disk(limit: int):
    def preexec():
        # A write past `limit` bytes fails with EFBIG, as on a full disk (SIGXFSZ ignored: an error, not a kill).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoints(tmp_path):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    args = ["--data_path", str(data), "--output_dir", str(out), "--epochs", "1", *TINY_FLAGS]
    assert run_train(args, tmp_path).returncode == 0
    before = {name: (out / name).read_bytes() for name in ("last.ckpt", "best.ckpt")}
    # Small files (config.json, metrics, the log) still fit; a checkpoint does not.
    limit = len(before["best.ckpt"]) // 2
    result = run_train(["--resume", "--output_dir", str(out), "--epochs", "2"], tmp_path,
                       preexec_fn=_full_disk(limit))
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"could not write {out / 'best.ckpt'}" in result.stderr or \
           f"could not write {out / 'last.ckpt'}" in result.stderr, result.stderr[-3000:]
    assert f"is kept. Free disk space, then continue with: python train.py --resume --output_dir {out}" \
           in result.stderr
    for name, content in before.items():
        assert (out / name).read_bytes() == content, name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file behind
    # Once there is room again, --resume redoes epoch 2 (its metrics line is not kept twice).
    result = run_train(["--resume", "--output_dir", str(out), "--epochs", "2"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]
    for name in ("last.ckpt", "best.ckpt"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


def _rank_pids(marker: str) -> dict:
    """{rank: pid} of the msrun workers whose command line holds `marker` (msrun exports RANK_ID)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if marker.encode() in cmdline and environ.get(b"MS_ROLE") == b"MS_WORKER":
            found[int(environ[b"RANK_ID"])] = int(proc.name)
    return found


def test_msrun_worker_killed_ends_the_job_and_resume_continues_on_both_ranks(tmp_path):
    data = make_image_folder(tmp_path / "data")
    out, record = tmp_path / "run", tmp_path / "record"

    def msrun(logs, *extra):
        return [str(Path(PYTHON).parent / "msrun"), "--worker_num=2", "--local_worker_num=2",
                f"--master_port={_free_port()}", f"--log_dir={logs}", "--join=True", str(RECORDING_TRAIN),
                str(record), "--distributed", "--output_dir", str(out), *extra]

    args = ["--data_path", str(data), "--epochs", "3", *TINY_FLAGS, "--batch_size", "2"]
    proc = subprocess.Popen(msrun(tmp_path / "log1", *args), cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: len(read_metrics(out)) >= 1, proc, 200, "epoch 1 finished")
        victim = _rank_pids(str(out))[1]
        os.kill(victim, signal.SIGKILL)  # rank 1 dies in epoch 2
        console, _ = proc.communicate(timeout=150)  # bounded: MindSpore's heartbeat times the job out
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert f"Worker process {victim} exit with exception. Error code: -9" in console, console[-3000:]
    done = read_metadata(out / "last.ckpt")["epoch"]
    assert done >= 1 and [r["epoch"] for r in read_metrics(out)][:done] == list(range(1, done + 1))
    saved = ms.load_checkpoint(str(out / "last.ckpt"))
    saved.pop("vit_ms_meta")

    shutil.rmtree(record)
    result = subprocess.run(msrun(tmp_path / "log2", "--resume"), cwd=tmp_path, env=_env(), capture_output=True,
                            text=True, timeout=240)
    logs = "".join(p.read_text(errors="replace")[-3000:] for p in sorted((tmp_path / "log2").glob("worker_*.log")))
    assert result.returncode == 0, logs
    # Both ranks started from exactly what last.ckpt held, and the run finished every epoch once.
    for rank in (0, 1):
        start = ms.load_checkpoint(str(record / f"rank_{rank}_start.ckpt"))
        for name, value in saved.items():
            np.testing.assert_array_equal(start[name].asnumpy(), value.asnumpy(), err_msg=f"rank {rank} {name}")
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2, 3]
    assert read_metadata(out / "last.ckpt")["epoch"] == 3
