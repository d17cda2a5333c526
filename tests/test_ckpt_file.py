"""vit_ms.checkpoint.ckpt_file reads MindSpore's .ckpt without MindSpore: checked against `ms.load_checkpoint` (the
reference) on files MindSpore itself writes; what it does not know goes back to MindSpore. Also the two other
parts of a faster load: the integrity check on its own thread, and parameters that take arrays over."""
import mindspore as ms
import mindspore.train.serialization as serialization
import numpy as np
import pytest

from checkpoint_helpers import TINY, images, logits, numpy_params, random_net, save_ms
from vit_ms import create_model
from vit_ms.checkpoint import (META_KEY, CheckpointError, load_model, make_metadata, read_metadata, read_params,
                               save_checkpoint)
from vit_ms.checkpoint.ckpt_file import DTYPES, read_ckpt
from vit_ms.checkpoint.format import integrity_checked
from vit_ms.checkpoint.loading import load_params


def _reference(path):
    """What MindSpore reads: {name: array or str}, in its order."""
    return {name: value if isinstance(value, str) else value.asnumpy()
            for name, value in ms.load_checkpoint(str(path)).items()}


def _assert_same(mine, reference):
    assert mine is not None
    assert list(mine) == list(reference)
    for name, value in reference.items():
        if isinstance(value, str):
            assert mine[name] == value, name
        else:
            assert (mine[name].dtype, mine[name].shape) == (value.dtype, value.shape), name
            np.testing.assert_array_equal(mine[name], value, err_msg=name)
            assert mine[name].flags.writeable and mine[name].flags.aligned, name


def _every_dtype(path, **save_options):
    rng = np.random.default_rng(0)
    values = {f"t_{name}": (rng.random((3, 5)) * 100 - 20 * (name[0] != "U")).astype(dtype)
              for name, dtype in DTYPES.items()}
    values["scalar"] = np.array(2.5, np.float32)
    values["four_d"] = rng.random((2, 3, 4, 5)).astype(np.float32)
    return save_ms(values, path, append_dict={"text": "h\u00e9llo \u2713", "count": 7, "rate": 1.5, "flag": True},
                   **save_options)


@pytest.mark.parametrize("crc_check", [False, True])
def test_every_dtype_scalar_and_string_reads_as_mindspore_reads_it(tmp_path, crc_check):
    path = _every_dtype(tmp_path / "mixed.ckpt", crc_check=crc_check)
    assert (path.read_bytes()[-17:-10] == b"crc_num") == crc_check
    reference = _reference(path)
    assert reference["text"] == "h\u00e9llo \u2713" and reference["scalar"].shape == ()
    _assert_same(read_ckpt(path), reference)
    strings = read_ckpt(path, tensors=False)
    assert strings == {"text": "h\u00e9llo \u2713"}


def test_a_tensor_written_in_slices_is_joined(tmp_path, monkeypatch):
    # MindSpore writes a tensor of more than SLICE_SIZE KB (512 MB) as one Value per slice: made small here.
    monkeypatch.setattr(serialization, "SLICE_SIZE", 1)
    weight = np.random.default_rng(1).normal(size=(40, 30)).astype(np.float32)  # 4.8 KB: 5 slices
    path = tmp_path / "sliced.ckpt"
    save_ms({"weight": weight, "bias": weight[0]}, path)
    assert path.read_bytes().count(b"\n\x06weight") == 5
    reference = _reference(path)
    np.testing.assert_array_equal(reference["weight"], weight)
    _assert_same(read_ckpt(path), reference)


def test_what_the_reader_does_not_know_goes_back_to_mindspore(tmp_path):
    sound = _every_dtype(tmp_path / "sound.ckpt")
    data = sound.read_bytes()
    encrypted = tmp_path / "encrypted.ckpt"
    save_ms({"w": np.ones((4, 4), np.float32)}, encrypted, enc_key=b"0123456789abcdef")
    bfloat16 = tmp_path / "bfloat16.ckpt"  # NumPy has no bfloat16
    ms.save_checkpoint([{"name": "w", "data": ms.Tensor(np.ones(3, np.float32), ms.bfloat16)}], str(bfloat16))
    assert ms.load_checkpoint(str(bfloat16))["w"].dtype == ms.bfloat16
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[:len(data) // 2])
    # one tensor's dims grown by one: its bytes no longer fill them
    dims = data.find(b"\x08\x03\x08\x05")
    grown = tmp_path / "grown.ckpt"
    grown.write_bytes(data[:dims] + b"\x08\x04" + data[dims + 2:])
    for path in (encrypted, bfloat16, empty, truncated, grown):
        assert read_ckpt(path) is None, path.name
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_params(truncated)  # MindSpore's reader raised, worded as before


def test_vit_ms_checkpoints_load_without_mindspores_reader(tmp_path, monkeypatch):
    net = random_net(TINY, seed=3)
    path = save_checkpoint(net, tmp_path / "model.ckpt", make_metadata(TINY, class_names=list("abcdefghij")))

    def refuse(*args, **kwargs):
        raise AssertionError("ms.load_checkpoint was called")

    monkeypatch.setattr(ms, "load_checkpoint", refuse)
    assert read_metadata(path)["class_names"] == list("abcdefghij")
    loaded, meta = load_model(path)
    np.testing.assert_array_equal(logits(loaded, images(TINY)), logits(net, images(TINY)))


def _digest_in(path, params, meta, body):
    with integrity_checked(path, params, meta):
        body()


def test_the_integrity_check_on_its_thread_reports_a_damaged_file_first(tmp_path):
    net = random_net(TINY, seed=4)
    path = save_checkpoint(net, tmp_path / "model.ckpt", make_metadata(TINY))
    params, meta = read_params(path, verify=False)
    _digest_in(path, params, meta, lambda: None)  # sound: passes
    damaged = dict(params, **{"head.bias": params["head.bias"] + 1})

    def fails():
        raise ValueError("the body's own error")

    with pytest.raises(CheckpointError, match="failed its integrity check"):
        _digest_in(path, damaged, meta, lambda: None)
    with pytest.raises(CheckpointError, match="failed its integrity check"):
        _digest_in(path, damaged, meta, fails)  # the damage explains the body's error: it is what is raised
    with pytest.raises(ValueError, match="the body's own error"):
        _digest_in(path, params, meta, fails)


def test_parameters_take_over_arrays_nothing_else_shares(tmp_path):
    net = create_model(TINY)
    params = numpy_params(random_net(TINY, seed=5))
    shared = np.stack([params["blocks.0.norm1.gamma"], params["blocks.0.norm2.gamma"]])
    params["blocks.0.norm1.gamma"], params["blocks.0.norm2.gamma"] = shared[0], shared[1]  # one buffer
    params["head.bias"] = params["head.bias"].astype(np.float64)  # needs a cast
    expected = {name: value.astype(np.float32) for name, value in params.items()}
    load_params(net, params, "memory", "vit_ms", None, strict=True, owned=True)
    parameters = dict(net.parameters_and_names())
    for value in (shared, params["head.bias"], params["cls_token"]):
        value[...] = 0
    for name in ("blocks.0.norm1.gamma", "blocks.0.norm2.gamma", "head.bias"):  # copied
        np.testing.assert_array_equal(parameters[name].asnumpy(), expected[name], err_msg=name)
    np.testing.assert_array_equal(parameters["cls_token"].asnumpy(), 0)  # taken over: no copy was made
    # Not owned (a caller's arrays): always copied.
    net = create_model(TINY)
    params = numpy_params(random_net(TINY, seed=6))
    load_params(net, params, "memory", "vit_ms", None, strict=True)
    params["cls_token"][...] = 0
    assert np.abs(dict(net.parameters_and_names())["cls_token"].asnumpy()).max() > 0
