"""Checkpoints, our own format: round trips (weights, optimizer state, metadata), files written 0644 and
atomically, the integrity digest (a flipped byte anywhere in the tensors, a file truncated at every 10%
of its length: one CheckpointError naming the file from every reader, never a partially loaded net),
`read_training_checkpoint` (what --resume reads), and `Preprocess` with any channel count."""
import dataclasses
import json
import os
import stat

import mindspore as ms
import numpy as np
import pytest

from checkpoint_helpers import (TINY, _pynative, assert_untouched, images, logits, numpy_params,  # noqa: F401
                                random_net, save_ms)
from vit_ms import Preprocess, create_model, load_weights
from vit_ms.checkpoint import (META_KEY, CheckpointError, convert_checkpoint, load_model, make_metadata,
                               read_metadata, read_params, read_training_checkpoint, save_checkpoint)


# ---------------------------------------------------------------------------------------------------
# Our own checkpoints
# ---------------------------------------------------------------------------------------------------

def test_own_checkpoint_with_optimizer_state_round_trips(tmp_path):
    net = random_net(TINY)
    params = numpy_params(net)
    # What a training checkpoint carries beside the weights (nn.Adam, AdamWeightDecay, the loop).
    state = {f"moment1.{k}": v * 0 + 1 for k, v in params.items()}
    state.update({f"adam_m.{k}": v for k, v in list(params.items())[:3]})
    state.update({"beta1_power": np.array([0.9], np.float32), "learning_rate": np.array(1e-3, np.float32),
                  "global_step": np.array([7], np.int32)})
    path = save_ms({**params, **state}, tmp_path / "ours.ckpt",
                   append_dict={META_KEY: json.dumps(make_metadata(TINY, class_names=list("abcdefghij")))})

    fresh = create_model(TINY)
    report = load_weights(fresh, path)
    assert report.source == "vit_ms"
    assert sorted(report.loaded) == sorted(params)
    assert set(report.dropped) == set(state) and set(report.dropped.values()) == {"optimizer / training state"}
    assert report.metadata["class_names"] == list("abcdefghij")
    np.testing.assert_array_equal(logits(fresh, images(TINY)), logits(net, images(TINY)))

    loaded, meta = load_model(path)
    assert loaded.config == TINY and meta["class_names"][0] == "a"
    np.testing.assert_array_equal(logits(loaded, images(TINY)), logits(net, images(TINY)))


@pytest.mark.parametrize("optimizer", [ms.nn.Adam, ms.nn.AdamWeightDecay, ms.nn.Momentum, ms.nn.SGD])
def test_training_checkpoint_of_the_train_network_loads(tmp_path, optimizer):
    # What train.py's last.ckpt holds: the whole TrainOneStepWithLossScaleCell, optimizer state included.
    net = random_net(TINY, seed=6)
    opt = optimizer(net.trainable_params(), 0.1, **({"momentum": 0.9} if optimizer is ms.nn.Momentum else {}))
    loss = ms.nn.WithLossCell(net, ms.nn.SoftmaxCrossEntropyWithLogits(sparse=True))
    cell = ms.nn.TrainOneStepWithLossScaleCell(loss, opt, ms.Tensor(1024.0))
    path = save_checkpoint(cell, tmp_path / "last.ckpt", make_metadata(TINY, epoch=1))
    loaded, _ = load_model(path)
    np.testing.assert_array_equal(logits(loaded, images(TINY)), logits(net, images(TINY)))


def test_save_checkpoint_is_read_back_by_load_model(tmp_path):
    net = random_net(TINY, seed=3)
    path = save_checkpoint(net, tmp_path / "sub" / "model.ckpt", make_metadata(TINY, epoch=4))
    assert read_metadata(path)["epoch"] == 4
    loaded, _ = load_model(path)
    np.testing.assert_array_equal(logits(loaded, images(TINY)), logits(net, images(TINY)))



def test_load_model_draws_no_random_initial_weights(tmp_path, monkeypatch):
    """load_model overwrites every parameter (strictly), so it builds the net without drawing random initial
    weights (ViT-B/16: ~1 s of each eval.py/infer.py start); a model built outside it still draws them."""
    net = random_net(TINY, seed=3)
    path = save_checkpoint(net, tmp_path / "model.ckpt", make_metadata(TINY))
    from mindspore.common import initializer

    def refuse(self, arr):
        raise AssertionError(f"{type(self).__name__} drew random initial weights")

    for cls in (initializer.XavierUniform, initializer.TruncatedNormal, initializer.Normal):
        monkeypatch.setattr(cls, "_initialize", refuse)
    loaded, _ = load_model(path)
    np.testing.assert_array_equal(logits(loaded, images(TINY)), logits(net, images(TINY)))
    with pytest.raises(AssertionError, match="drew random initial weights"):
        create_model(TINY)


def test_checkpoints_are_written_0644_with_no_temporary_left(tmp_path):
    net = random_net(TINY)
    path = save_checkpoint(net, tmp_path / "best.ckpt", make_metadata(TINY))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # not MindSpore's 0400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt"]
    meta = read_metadata(path)
    assert meta["integrity"]["algorithm"] == "sha256" and meta["integrity"]["tensors"] == len(list(net.get_parameters()))


def _train_network(seed=6):
    net = random_net(TINY, seed=seed)
    opt = ms.nn.AdamWeightDecay(net.trainable_params(), 0.1)
    loss = ms.nn.WithLossCell(net, ms.nn.SoftmaxCrossEntropyWithLogits(sparse=True))
    return net, ms.nn.TrainOneStepWithLossScaleCell(loss, opt, ms.Tensor(1024.0))


def test_read_training_checkpoint_returns_weights_optimizer_state_and_metadata(tmp_path):
    net, cell = _train_network()
    path = save_checkpoint(cell, tmp_path / "last.ckpt", make_metadata(TINY, epoch=3, global_step=12))
    params, meta = read_training_checkpoint(path)
    assert meta["epoch"] == 3 and "learning_rate" not in params
    expected = {p.name: p.asnumpy() for p in cell.get_parameters() if p.name != "learning_rate"}
    assert set(params) == set(expected) and any(name.startswith("adam_m.") for name in params)
    for name, value in expected.items():
        np.testing.assert_array_equal(params[name].asnumpy(), value, err_msg=name)
    # What --resume does with it: every parameter of a fresh train network receives its value.
    fresh_net, fresh = _train_network(seed=9)
    not_loaded, _ = ms.load_param_into_net(fresh, params, strict_load=True)
    assert [n for n in not_loaded if n != "learning_rate"] == []
    np.testing.assert_array_equal(logits(fresh_net, images(TINY)), logits(net, images(TINY)))
    weights_only = save_checkpoint(net, tmp_path / "best.ckpt", make_metadata(TINY))  # no epoch: not a run's
    with pytest.raises(CheckpointError, match="best.ckpt is not a vit_ms training checkpoint"):
        read_training_checkpoint(weights_only)


# ---------------------------------------------------------------------------------------------------
# Integrity: flipped bytes and truncation
# ---------------------------------------------------------------------------------------------------

def _ours(tmp_path, name="ours.ckpt"):
    return save_checkpoint(random_net(TINY, seed=7), tmp_path / name, make_metadata(TINY, epoch=1))


def _flipped(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01  # one bit: the smallest corruption a disk or a copy can make
    out = path.with_name(f"flipped_{offset}.ckpt")
    out.write_bytes(bytes(data))
    return out


def _tensor_byte_offset(path):
    """An offset inside the bytes of blocks.0.attn.qkv.weight (found by its value, so surely tensor data)."""
    data = path.read_bytes()
    value = np.ascontiguousarray(read_params(path)[0]["blocks.0.attn.qkv.weight"]).tobytes()
    start = data.find(value[:64])
    assert start > 0
    return start + len(value) // 2


def _readers(tmp_path):
    """Every reader of a checkpoint's weights, each given a fresh net where it loads into one."""
    nets = {}

    def weights(path):
        nets["load_weights"] = net = random_net(TINY, seed=11)
        before = numpy_params(net)
        try:
            load_weights(net, path)
        finally:
            nets["load_weights_before"] = before

    return {
        "load_weights": weights,
        "load_model": load_model,
        "read_params": read_params,
        "read_training_checkpoint": read_training_checkpoint,
        "convert_checkpoint": lambda path: convert_checkpoint(path, tmp_path / "converted.ckpt"),
    }, nets


def test_a_flipped_bit_in_the_tensors_is_caught_by_every_reader(tmp_path):
    path = _ours(tmp_path)
    flipped = _flipped(path, _tensor_byte_offset(path))
    # MindSpore alone reads the damaged file without complaint: what the digest is for.
    assert META_KEY in ms.load_checkpoint(str(flipped))
    readers, nets = _readers(tmp_path)
    for name, read in readers.items():
        with pytest.raises(CheckpointError) as error:
            read(flipped)
        message = str(error.value)
        assert str(flipped) in message and "failed its integrity check" in message, (name, message)
    assert_untouched(nets["load_weights"], nets["load_weights_before"])
    assert not (tmp_path / "converted.ckpt").exists()


@pytest.mark.parametrize("where", ["metadata", "middle"])
def test_a_flipped_bit_anywhere_gives_one_checkpoint_error(tmp_path, where):
    path = _ours(tmp_path)
    data = path.read_bytes()
    offset = data.find(b'"class_names"') + 3 if where == "metadata" else len(data) // 2
    flipped = _flipped(path, offset)
    readers, nets = _readers(tmp_path)
    for name, read in readers.items():
        with pytest.raises(CheckpointError, match=str(flipped).replace(".", r"\.")):
            read(flipped)
    assert_untouched(nets["load_weights"], nets["load_weights_before"])


def test_a_file_truncated_at_every_10_percent_gives_one_checkpoint_error(tmp_path):
    path = _ours(tmp_path)
    data = path.read_bytes()
    readers, nets = _readers(tmp_path)
    for tenth in range(1, 10):
        cut = tmp_path / f"cut_{tenth}0.ckpt"
        cut.write_bytes(data[: len(data) * tenth // 10])
        for name, read in readers.items():
            with pytest.raises(CheckpointError) as error:
                read(cut)
            assert str(cut) in str(error.value), (name, tenth, str(error.value))
        assert_untouched(nets["load_weights"], nets["load_weights_before"])
    assert not (tmp_path / "converted.ckpt").exists()


def test_a_checkpoint_without_an_integrity_record_still_loads(tmp_path):
    # Written before integrity records existed (or by hand): loads, since there is nothing to check.
    net = random_net(TINY, seed=8)
    path = save_ms(numpy_params(net), tmp_path / "old.ckpt", append_dict={META_KEY: json.dumps(make_metadata(TINY))})
    loaded, meta = load_model(path)
    assert "integrity" not in meta
    np.testing.assert_array_equal(logits(loaded, images(TINY)), logits(net, images(TINY)))


# ---------------------------------------------------------------------------------------------------
# Preprocess: one mean/std value per channel
# ---------------------------------------------------------------------------------------------------

def test_preprocess_takes_one_value_per_channel_for_any_channel_count():
    gray = Preprocess(image_size=28, mean=[0.1307], std=[0.3081], crop_pct=1.0)
    assert gray.mean == (0.1307,) and gray.channels == 1 and gray.resize_size == 28
    assert Preprocess.from_dict(gray.to_dict()) == gray
    four = Preprocess(mean=(0.1, 0.2, 0.3, 0.4), std=(1, 1, 1, 1))
    assert four.channels == 4
    with pytest.raises(ValueError, match="one value per input channel, the same number each; got 1 mean and 3"):
        Preprocess(mean=(0.5,), std=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="std values must be positive"):
        Preprocess(mean=(0.5,), std=(0.0,))
    with pytest.raises(ValueError, match="interpolation must be one of"):
        Preprocess(interpolation="cubic")
    one = dataclasses.replace(TINY, in_channels=1)
    assert Preprocess.for_model(one) == Preprocess(image_size=32, mean=(0.449,), std=(0.226,))
    with pytest.raises(ValueError, match="3 mean/std values for a model with 1 input channel"):
        make_metadata(one, preprocess=Preprocess(image_size=32))


def test_a_one_channel_model_round_trips_with_its_preprocessing(tmp_path):
    one = dataclasses.replace(TINY, in_channels=1)
    net = random_net(one, seed=5)
    pre = Preprocess(image_size=32, mean=(0.1307,), std=(0.3081,), crop_pct=1.0, interpolation="bicubic")
    path = save_checkpoint(net, tmp_path / "mnist.ckpt", make_metadata(one, list("0123456789"), pre))
    loaded, meta = load_model(path)
    assert Preprocess.from_dict(meta["preprocess"]) == pre and meta["class_names"][3] == "3"
    np.testing.assert_array_equal(logits(loaded, images(one)), logits(net, images(one)))


def test_read_metadata_is_none_for_a_sound_checkpoint_without_it(tmp_path):
    path = str(tmp_path / "plain.ckpt")
    ms.save_checkpoint([{"name": "w", "data": ms.Tensor(np.ones(2, np.float32))}], path)
    assert read_metadata(path) is None
    (tmp_path / "cut.ckpt").write_bytes(open(path, "rb").read()[:20])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_metadata(str(tmp_path / "cut.ckpt"))


def test_the_public_names_of_the_former_checkpoint_module_are_importable():
    import vit_ms.checkpoint as checkpoint

    for name in ("load_weights", "load_model", "save_checkpoint", "read_metadata", "make_metadata",
                 "config_from_metadata", "parse_metadata", "read_params", "convert", "detect_source",
                 "resample_pos_embed", "convert_checkpoint", "resolve_pretrained", "CheckpointError", "LoadReport",
                 "infer_config", "META_KEY", "SOURCES", "PRETRAINED", "PretrainedSource", "default_cache_dir",
                 "read_training_checkpoint", "export_checkpoint", "create_pretrained", "FORMATS", "ZOO"):
        assert name in checkpoint.__all__ and hasattr(checkpoint, name), name
