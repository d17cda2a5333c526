"""Checkpoints from the command line: convert.py as a user runs it (into vit_ms with the preprocessing a
non-RGB-224 model needs, out to timm / HF), and convert.py, eval.py and infer.py given a damaged checkpoint
(one error line naming the file, exit status 1, no traceback)."""
import dataclasses
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from checkpoint_helpers import (TINY, TINY_TUTORIAL, TimmViT, _pynative, images, logits,  # noqa: F401
                                numpy_params, ours_for_tutorial, random_net, random_torch, save_ms,
                                save_state_dict, torch_logits, tutorial_names_for)
from vit_ms import Preprocess
from vit_ms.checkpoint import (EXPORT_TARGETS, SOURCES, load_model, make_metadata, read_metadata,
                               resample_pos_embed, save_checkpoint)

REPO = Path(__file__).resolve().parents[1]
SCRIPT_ENV = {**os.environ, "PYTHONPATH": str(REPO), "GLOG_v": "3"}


def _garbage(tmp_path, suffix):
    out = tmp_path / f"garbage{suffix}"
    out.write_bytes(np.random.default_rng(0).bytes(4096))
    return out


def _convert_module():
    spec = importlib.util.spec_from_file_location("convert_cli", REPO / "convert.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli



def run_convert(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "GLOG_v": "3"}
    return subprocess.run([sys.executable, str(REPO / "convert.py"), *map(str, args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_convert_cli_help(tmp_path):
    result = run_convert(tmp_path, "--help")
    assert result.returncode == 0
    for flag in ("--to", "--source", "--model", "--num_classes", "--image_size", "--num_heads", "--mean", "--std",
                 "--crop_pct", "--interpolation", "--class_names"):
        assert flag in result.stdout
    assert "{" + ",".join(("auto",) + SOURCES) + "}" in result.stdout  # convert.py spells SOURCES out


def test_convert_cli_timm_to_a_checkpoint_load_model_reads(tmp_path):
    model = random_torch(TimmViT, TINY, seed=9)
    src = save_state_dict(model, tmp_path / "timm_tiny.safetensors")
    result = run_convert(tmp_path, src, tmp_path / "out" / "tiny.ckpt", "--num_heads", "4")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "timm names" in result.stdout
    net, meta = load_model(tmp_path / "out" / "tiny.ckpt")
    assert net.config == TINY  # shapes from the weights, heads from the flag, PyTorch numerics
    assert meta["source"] == "timm" and meta["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    x = images(TINY)
    np.testing.assert_allclose(logits(net, x), torch_logits(model, x), rtol=0, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "timm_tiny.safetensors"]  # nothing else written



def test_convert_cli_reports_a_bad_file_without_a_traceback(tmp_path, caplog):
    # In-process (the subprocess tests above cover the real command line).
    cli = _convert_module()
    with caplog.at_level(logging.ERROR):
        assert cli.main([str(_garbage(tmp_path, ".ckpt")), str(tmp_path / "bad.ckpt")]) == 1
        assert cli.main([str(tmp_path / "missing.npz"), str(tmp_path / "bad.ckpt")]) == 1
    assert "truncated or corrupt" in caplog.text and "missing.npz is neither a file" in caplog.text
    assert not (tmp_path / "bad.ckpt").exists()


def test_convert_cli_tutorial_names_new_classes_and_image_size(tmp_path):
    net = random_net(TINY_TUTORIAL)
    params = numpy_params(net)
    src = save_ms({name: params[ours_for_tutorial(name)] for name in tutorial_names_for(2)}, tmp_path / "tut.ckpt")
    result = run_convert(tmp_path, src, tmp_path / "tut5.ckpt", "--num_heads", "4", "--num_classes", "5",
                         "--image_size", "48")
    assert result.returncode == 0, result.stderr
    converted, meta = load_model(tmp_path / "tut5.ckpt")
    assert converted.config == dataclasses.replace(TINY_TUTORIAL, num_classes=5, image_size=48)
    assert meta["preprocess"]["image_size"] == 48
    loaded = numpy_params(converted)
    np.testing.assert_array_equal(loaded["blocks.1.attn.qkv.weight"], params["blocks.1.attn.qkv.weight"])
    np.testing.assert_array_equal(loaded["pos_embed"], resample_pos_embed(params["pos_embed"], 6))
    assert not loaded["head.weight"].any()
    assert "head for 10 classes" in result.stderr and "4x4 to a 6x6" in result.stderr


def test_convert_cli_sources_and_targets_match_the_package():
    cli = _convert_module()
    assert cli.SOURCES == SOURCES and set(cli.TARGETS) == set(EXPORT_TARGETS)
    from vit_ms.config import INTERPOLATIONS

    assert cli.INTERPOLATIONS == INTERPOLATIONS


def test_convert_cli_stores_the_preprocessing_of_a_one_channel_28px_model(tmp_path):
    one = TINY.__class__(**{**TINY.to_dict(), "in_channels": 1, "image_size": 28, "patch_size": 7})
    timm_names = {k.replace(".gamma", ".weight").replace(".beta", ".bias"): v
                  for k, v in numpy_params(random_net(one, seed=4)).items()}
    from safetensors.numpy import save_file

    save_file(timm_names, str(tmp_path / "mnist.safetensors"))
    (tmp_path / "names.txt").write_text("zero\none\ntwo\nthree\nfour\nfive\nsix\nseven\neight\nnine\n")
    status = _convert_module().main([str(tmp_path / "mnist.safetensors"), str(tmp_path / "mnist.ckpt"), "--num_heads",
                                     "4", "--mean", "0.1307", "--std", "0.3081", "--crop_pct", "1.0",
                                     "--interpolation", "bicubic", "--class_names", str(tmp_path / "names.txt")])
    assert status == 0
    meta = read_metadata(tmp_path / "mnist.ckpt")
    assert Preprocess.from_dict(meta["preprocess"]) == Preprocess(image_size=28, mean=(0.1307,), std=(0.3081,),
                                                                  crop_pct=1.0, interpolation="bicubic")
    assert meta["class_names"][9] == "nine" and meta["model"]["in_channels"] == 1


@pytest.mark.parametrize("args, message", [
    (["--mean", "0.5", "0.5", "--std", "0.5"], "one value per input channel each"),
    (["--mean", "0.5"], "--mean and --std go together"),
    (["--to", "hf", "--crop_pct", "1.0"], "--crop_pct applies only to --to vit_ms"),
    (["--crop", "1.0"], "did you mean --crop_pct"),  # vit_ms.cli.ArgumentParser's exact flags
])
def test_convert_cli_rejects_inconsistent_flags(args, message, capsys):
    # In-process: parse errors happen before anything is imported (the subprocess tests cover the real CLI).
    with pytest.raises(SystemExit) as exit_status:
        _convert_module().parse_args(["a.ckpt", "b.ckpt", *args])
    assert exit_status.value.code == 2 and message in capsys.readouterr().err


def test_convert_cli_mean_std_of_the_wrong_channel_count_is_one_clear_error(tmp_path, caplog):
    src = save_state_dict(random_torch(TimmViT, TINY), tmp_path / "t.safetensors")
    with caplog.at_level(logging.ERROR):
        status = _convert_module().main([str(src), str(tmp_path / "t.ckpt"), "--num_heads", "4", "--mean", "0.5",
                                         "--std", "0.5"])
    assert status == 1 and "1 mean/std values for a model with 3 input channel(s)" in caplog.text
    assert not (tmp_path / "t.ckpt").exists()


def test_convert_cli_exports_to_hf_and_timm(tmp_path):
    net = random_net(TINY, seed=5)
    src = save_checkpoint(net, tmp_path / "best.ckpt", make_metadata(TINY, list("abcdefghij")))
    cli = _convert_module()  # in-process: the script-level tests below start the real command line
    assert cli.main([str(src), str(tmp_path / "hf_out"), "--to", "hf"]) == 0
    config = json.loads((tmp_path / "hf_out" / "config.json").read_text())
    assert config["id2label"]["3"] == "d" and config["hidden_size"] == 64
    assert sorted(p.name for p in (tmp_path / "hf_out").iterdir()) == ["config.json", "model.safetensors",
                                                                     "preprocessor_config.json"]
    assert cli.main([str(src), str(tmp_path / "timm.safetensors"), "--to", "timm"]) == 0
    from safetensors.numpy import load_file

    exported = load_file(str(tmp_path / "timm.safetensors"))
    np.testing.assert_array_equal(exported["norm.weight"], numpy_params(net)["norm.gamma"])


# ---------------------------------------------------------------------------------------------------
# Every script given a damaged checkpoint: one line, exit 1, no traceback
# ---------------------------------------------------------------------------------------------------

def _damaged(tmp_path):
    path = save_checkpoint(random_net(TINY, seed=7), tmp_path / "best.ckpt", make_metadata(TINY))
    data = path.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) * 6 // 10])
    return cut


@pytest.mark.parametrize("script", ["convert.py", "eval.py", "infer.py"])
def test_scripts_report_a_damaged_checkpoint_in_one_line(tmp_path, script):
    cut = _damaged(tmp_path)
    args = {"convert.py": [str(cut), str(tmp_path / "out.ckpt")],
            "eval.py": ["--checkpoint", str(cut), "--data_path", str(tmp_path), "--output_dir", str(tmp_path / "e")],
            "infer.py": ["--checkpoint", str(cut), "--input", str(tmp_path), "--output_dir", str(tmp_path / "i")]}
    result = subprocess.run([sys.executable, str(REPO / script), *args[script]], cwd=tmp_path, env=SCRIPT_ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    ours = [line for line in result.stderr.splitlines() if re.match(r"\d\d:\d\d:\d\d ERROR ", line)]
    assert len(ours) == 1 and str(cut) in ours[0] and "truncated or corrupt" in ours[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.ckpt").exists()
