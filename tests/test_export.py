"""Export: one dynamic-batch MINDIR serves every batch size with the network's exact logits; ONNX agrees
with onnxruntime; a mismatch or an unsupported operator fails loudly."""
import dataclasses
import json

import mindspore as ms
import numpy as np
import onnxruntime
import pytest

from tiny_classifier import CLASS_NAMES, TINY, random_net
from vit_ms import export as export_module
from vit_ms.checkpoint import make_metadata
from vit_ms.evaluate import load_classifier, run_batch
from vit_ms.export import ExportError, ParityError, check_parity, export_model, load_mindir, read_sidecar


def batch(n, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 3, TINY.image_size, TINY.image_size)).astype(np.float32)


@pytest.fixture(scope="module")
def net():
    return random_net()


@pytest.fixture(scope="module")
def exported(net, tmp_path_factory):
    """One dynamic-batch MINDIR of `net`, shared by the tests that only read it."""
    return export_model(net, tmp_path_factory.mktemp("export") / "vit", make_metadata(TINY, CLASS_NAMES))


def test_one_mindir_file_serves_batch_1_3_8_with_the_networks_logits(exported, net):
    report = exported
    assert report.path.name == "vit.mindir" and report.path.is_file()  # suffix added
    assert report.batch_size is None and report.max_abs_diff <= 1e-5
    assert sorted(p.name for p in report.path.parent.iterdir()) == ["vit.mindir", "vit.mindir.json"]
    graph = load_mindir(report.path)  # one file, one loaded graph, three batch sizes
    for n in (1, 3, 8):
        x = batch(n, seed=n)
        exported, expected = graph(ms.Tensor(x)).asnumpy(), net(ms.Tensor(x)).asnumpy()
        assert exported.shape == (n, TINY.num_classes)
        np.testing.assert_allclose(exported, expected, rtol=0, atol=1e-5)


def test_sidecar_carries_preprocessing_class_names_and_the_check(exported):
    sidecar = read_sidecar(exported.path)
    assert sidecar == json.loads((exported.path.parent / "vit.mindir.json").read_text())
    assert sidecar["class_names"] == CLASS_NAMES
    assert sidecar["model"] == TINY.to_dict()
    assert sidecar["preprocess"]["image_size"] == 32 and sidecar["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    assert sidecar["export"]["batch_size"] is None and sidecar["export"]["checked_batch_sizes"] == [1, 4]
    assert sidecar["export"]["input_shape"] == [None, 3, 32, 32]


def test_static_mindir_is_padded_to_its_batch_by_infer(tmp_path, net):
    export_model(net, tmp_path / "static.mindir", make_metadata(TINY, CLASS_NAMES), batch_size=2)
    classifier = load_classifier(mindir=tmp_path / "static.mindir")
    assert classifier.fixed_batch == 2
    x = batch(5)  # 2 + 2 + 1 padded
    np.testing.assert_allclose(run_batch(classifier, x), net(ms.Tensor(x)).asnumpy(), rtol=0, atol=1e-5)


def test_parity_check_catches_a_network_that_changed(exported):
    with pytest.raises(ParityError, match=r"disagrees with the network: max \|logit difference\|"):
        check_parity(exported.path, random_net(seed=1), TINY, batch_sizes=(2,))


def test_failed_parity_removes_the_file_and_writes_no_sidecar(tmp_path, net, monkeypatch):
    real = export_module._run_exported
    monkeypatch.setattr(export_module, "_run_exported", lambda *a: real(*a) + 1e-3)  # a silently lossy export
    with pytest.raises(ParityError, match="1e-05"):
        export_model(net, tmp_path / "vit.mindir", make_metadata(TINY, CLASS_NAMES))
    assert list(tmp_path.iterdir()) == []


def test_onnx_output_matches_onnxruntime(tmp_path, net):
    report = export_model(net, tmp_path / "vit.onnx", make_metadata(TINY, CLASS_NAMES), file_format="ONNX",
                          batch_size=3)
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    session = onnxruntime.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [3, 3, 32, 32]  # static batch
    x = batch(3, seed=7)
    out = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(out, net(ms.Tensor(x)).asnumpy(), rtol=0, atol=1e-4)
    assert read_sidecar(report.path)["export"]["file_format"] == "ONNX"


def test_onnx_of_exact_gelu_fails_with_a_clear_error(tmp_path):
    exact = dataclasses.replace(TINY, gelu_approximate=False)
    with pytest.raises(ExportError, match=r"no converter for the Erf operator.*exact erf GELU.*MINDIR"):
        export_model(random_net(exact), tmp_path / "vit.onnx", make_metadata(exact), file_format="ONNX")
    assert not (tmp_path / "vit.onnx.json").exists()
