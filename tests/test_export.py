"""Export: one dynamic-batch file (MINDIR or ONNX) serves batches 1, 3 and 8 with the network's logits, for
both GELU forms; the uint8 MINDIR preprocesses like the Python pipeline; nothing is replaced silently and
a mismatch fails loudly.

Tolerances. MINDIR reloads run MindSpore's own kernels: 1e-5. onnxruntime's kernels sum in another order;
for these tiny nets (K <= 128, depth 2, |logits| < 10) float32 rounding gives differences ~sqrt(K) * 6e-8 *
|logit| per step, ~1e-5 in all, so 1e-4 * max(1, max|logit|) (the exporter's own bound) leaves 10x margin
on any CPU. Preprocessed pixels are |x| < 3 after normalisation: float32 rounding of a few operations is
< 1e-6, so 1e-4 is generous for graph-vs-NumPy; the resize filter gap to the dataset pipeline is bounded
in `preprocess_graph` (<= 1 grey level).
"""
import dataclasses
import io
import json

import mindspore as ms
import mindspore.dataset.vision as vision
import numpy as np
import onnx
import onnxruntime
import pytest
from mindspore import nn
from PIL import Image, ImageDraw

from tiny_classifier import CLASS_NAMES, TINY, random_net, run_cli, write_checkpoint
from vit_ms import Preprocess
from vit_ms import export as export_module
from vit_ms.checkpoint import make_metadata
from vit_ms.evaluate import load_classifier, run_batch
from vit_ms.export import (ParityError, WithPreprocess, check_parity, export_model, load_mindir, onnx_writer,
                           pipeline_preprocess, read_sidecar, reference_preprocess)
from vit_ms.export.preprocess_graph import crop_offsets, max_normalised_resize_gap, resized_shape

EXACT = dataclasses.replace(TINY, gelu_approximate=False)  # like every paper preset


def batch(n, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 3, TINY.image_size, TINY.image_size)).astype(np.float32)


def logits(net, x):
    return net(ms.Tensor(x)).asnumpy()


def assert_close(actual, expected, atol):
    """|actual - expected| <= atol * max(1, max|expected|), the exporter's bound (module docstring)."""
    assert actual.shape == expected.shape
    assert np.max(np.abs(actual - expected)) <= atol * max(1.0, np.abs(expected).max())


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
        out = graph(ms.Tensor(x)).asnumpy()
        assert out.shape == (n, TINY.num_classes)
        np.testing.assert_allclose(out, logits(net, x), rtol=0, atol=1e-5)


def test_sidecar_carries_preprocessing_class_names_and_the_check(exported):
    sidecar = read_sidecar(exported.path)
    assert sidecar == json.loads((exported.path.parent / "vit.mindir.json").read_text())
    assert sidecar["class_names"] == CLASS_NAMES
    assert sidecar["model"] == TINY.to_dict()
    assert sidecar["preprocess"]["image_size"] == 32 and sidecar["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    assert sidecar["export"]["batch_size"] is None and sidecar["export"]["checked_batch_sizes"] == [1, 3, 8]
    assert sidecar["export"]["input_shape"] == [None, 3, 32, 32]
    assert sidecar["export"]["with_preprocess"] is False and sidecar["export"]["input_dtype"] == "float32"


def test_read_sidecar_names_the_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"exported model .*missing\.mindir not found"):
        read_sidecar(tmp_path / "missing.mindir")


def test_static_mindir_is_padded_to_its_batch_by_infer(tmp_path, net):
    export_model(net, tmp_path / "static.mindir", make_metadata(TINY, CLASS_NAMES), batch_size=2)
    classifier = load_classifier(mindir=tmp_path / "static.mindir")
    assert classifier.fixed_batch == 2
    x = batch(5)  # 2 + 2 + 1 padded
    np.testing.assert_allclose(run_batch(classifier, x), logits(net, x), rtol=0, atol=1e-5)


def test_parity_check_catches_a_network_that_changed(exported):
    with pytest.raises(ParityError, match=r"disagrees with the network: max \|logit difference\|"):
        check_parity(exported.path, random_net(seed=1), TINY, batch_sizes=(2,))


def test_failed_parity_leaves_no_file_and_no_sidecar(tmp_path, net, monkeypatch):
    real = export_module._run_exported
    monkeypatch.setattr(export_module, "_run_exported", lambda *a: real(*a) + 1e-3)  # a silently lossy export
    with pytest.raises(ParityError, match="atol 1e-05"):
        export_model(net, tmp_path / "vit.mindir", make_metadata(TINY, CLASS_NAMES), check_batch_sizes=(2,))
    assert list(tmp_path.iterdir()) == []  # not even the temporary file


def test_an_existing_file_is_never_replaced_silently(tmp_path, net):
    target = tmp_path / "vit.onnx"
    target.write_bytes(b"an earlier export")
    with pytest.raises(FileExistsError, match=r"vit\.onnx already exists.*--overwrite"):
        export_model(net, target, make_metadata(TINY, CLASS_NAMES), file_format="ONNX")
    assert target.read_bytes() == b"an earlier export" and sorted(p.name for p in tmp_path.iterdir()) == ["vit.onnx"]
    export_model(net, target, make_metadata(TINY, CLASS_NAMES), file_format="ONNX", overwrite=True)
    assert onnx.load(str(target)).graph.input[0].name == "images"


# ---------------------------------------------------------------------------------------------------------
# ONNX written from the weights
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [TINY, EXACT], ids=["tanh_gelu", "exact_gelu"])
def test_onnx_has_a_dynamic_batch_and_matches_onnxruntime_at_1_3_8(tmp_path, config):
    net = random_net(config, seed=3)
    report = export_model(net, tmp_path / "vit", make_metadata(config), file_format="ONNX")
    assert report.path.name == "vit.onnx" and report.checked_batch_sizes == [1, 3, 8]
    model = onnx.load(str(report.path))
    assert model.opset_import[0].version >= 17
    ops = {node.op_type for node in model.graph.node}
    assert ("Erf" in ops) == (not config.gelu_approximate) and ("Tanh" in ops) == config.gelu_approximate
    session = onnxruntime.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, 32, 32]
    for n in (1, 3, 8):
        x = batch(n, seed=10 + n)
        assert_close(session.run(None, {"images": x})[0], logits(net, x), 1e-4)
    assert read_sidecar(report.path)["export"]["file_format"] == "ONNX"


def test_onnx_with_a_fixed_batch(tmp_path, net):
    report = export_model(net, tmp_path / "vit.onnx", make_metadata(TINY, CLASS_NAMES), file_format="ONNX",
                          batch_size=3)
    session = onnxruntime.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [3, 3, 32, 32] and report.checked_batch_sizes == [3]


def test_onnx_past_the_protobuf_limit_keeps_its_weights_beside_it(tmp_path, net, monkeypatch):
    monkeypatch.setattr(onnx_writer, "PROTOBUF_LIMIT", 1000)  # as if the model were ViT-H/14 (2.5 GB)
    report = export_model(net, tmp_path / "vit.onnx", make_metadata(TINY, CLASS_NAMES), file_format="ONNX")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.onnx", "vit.onnx.data", "vit.onnx.json"]
    assert read_sidecar(report.path)["export"]["external_data"] == "vit.onnx.data"
    session = onnxruntime.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    x = batch(2)
    assert_close(session.run(None, {"images": x})[0], logits(net, x), 1e-4)


# ---------------------------------------------------------------------------------------------------------
# MINDIR with the preprocessing inside
# ---------------------------------------------------------------------------------------------------------

def jpeg(width, height, seed):
    """A photo-like JPEG (gradient, shapes, noise), decoded back: what a camera would hand over."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    pixels = np.stack([255 * xx, 255 * yy, 128 + 100 * np.sin(6 * xx + 3 * yy)], -1)
    pixels = pixels + rng.normal(0, 6, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse([width // 4, height // 4, 3 * width // 4, 3 * height // 4], fill=tuple(rng.integers(0, 256, 3)))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def photos(input_size):
    """JPEGs of several sizes, resized to the graph's one input size (H, W) first."""
    height, width = input_size
    return np.stack([np.asarray(jpeg(w, h, seed).resize((width, height), Image.Resampling.BILINEAR))
                     for seed, (w, h) in enumerate([(120, 90), (64, 64), (75, 200)])])


class Identity(nn.Cell):
    def construct(self, x):
        return x


@pytest.mark.parametrize("size", [(375, 500), (500, 333), (301, 257), (99, 130)])
def test_resize_and_crop_geometry_equals_the_dataset_ops(size):
    # The independent reference: MindSpore's own vision.Resize / vision.CenterCrop on a marked image.
    image = np.random.default_rng(0).integers(0, 256, size + (3,)).astype(np.uint8)
    resized = vision.Resize(256)(image)
    assert resized.shape[:2] == resized_shape(*size, 256)
    top, left = crop_offsets(*resized.shape[:2], 224)
    np.testing.assert_array_equal(vision.CenterCrop(224)(resized), resized[top:top + 224, left:left + 224])


def test_preprocessing_graph_equals_numpy_and_is_within_one_grey_level_of_the_pipeline():
    preprocess = Preprocess(image_size=32)  # resize_size 37
    for input_size in [(40, 52), (90, 60), (30, 30)]:  # shrink, shrink, enlarge
        images = photos(input_size)
        graph = WithPreprocess(Identity(), preprocess, input_size)(ms.Tensor(images)).asnumpy()
        assert graph.shape == (3, 3, 32, 32)
        np.testing.assert_allclose(graph, reference_preprocess(images, preprocess), rtol=0, atol=1e-4)
        gap = np.abs(graph - pipeline_preprocess(images, preprocess))
        assert gap.max() <= max_normalised_resize_gap(preprocess)  # the resize filters' documented gap
    same = photos((37, 50))  # short side already resize_size: no resize, so the pipeline exactly
    graph = WithPreprocess(Identity(), preprocess, (37, 50))(ms.Tensor(same)).asnumpy()
    np.testing.assert_allclose(graph, pipeline_preprocess(same, preprocess), rtol=0, atol=1e-4)


def test_uint8_mindir_matches_the_network_on_preprocessed_jpegs(tmp_path):
    net = random_net(EXACT, seed=2)
    preprocess = Preprocess(image_size=32)
    meta = make_metadata(EXACT, preprocess=preprocess)
    # (40, 52): resized inside, compared with the NumPy statement of the graph; (37, 50): short side already
    # resize_size, so the Python pipeline itself must agree.
    for input_size, reference in [((40, 52), reference_preprocess), ((37, 50), pipeline_preprocess)]:
        images = photos(input_size)  # three JPEGs of different sizes, resized to input_size
        report = export_model(net, tmp_path / f"vit_{input_size[0]}.mindir", meta, with_preprocess=True,
                              input_size=input_size, check_images=images, check_batch_sizes=(3,))
        sidecar = read_sidecar(report.path)["export"]
        assert sidecar["input_shape"] == [None, *input_size, 3] and sidecar["input_dtype"] == "uint8"
        out = load_mindir(report.path)(ms.Tensor(images)).asnumpy()
        assert_close(out, logits(net, reference(images, preprocess).astype(np.float32)), 1e-4)


# ---------------------------------------------------------------------------------------------------------
# export.py as a user runs it
# ---------------------------------------------------------------------------------------------------------

def test_cli_refuses_before_creating_anything(tmp_path):
    done = run_cli("export.py", "--checkpoint", "none.ckpt", "--output", "new/dir/v.mindir", "--with_preprocess",
                   cwd=tmp_path)
    assert done.returncode == 2 and "--with_preprocess and --input_size H W go together" in done.stderr
    done = run_cli("export.py", "--checkpoint", "none.ckpt", "--output", "v.mindir", "--overwrit", cwd=tmp_path)
    assert done.returncode == 2 and "did you mean --overwrite?" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_onnx_of_exact_gelu_and_refuses_to_replace_it(tmp_path):
    write_checkpoint(tmp_path / "exact.ckpt", EXACT, class_names=None)
    done = run_cli("export.py", "--checkpoint", "exact.ckpt", "--output", "out/vit.onnx", "--file_format", "ONNX",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "(ONNX, dynamic batch); reloaded and checked on batch sizes 1, 3, 8" in done.stdout
    before = (tmp_path / "out" / "vit.onnx").read_bytes()
    done = run_cli("export.py", "--checkpoint", "exact.ckpt", "--output", "out/vit.onnx", "--file_format", "ONNX",
                   cwd=tmp_path)
    assert done.returncode == 1 and "already exists" in done.stderr and "--overwrite" in done.stderr
    assert (tmp_path / "out" / "vit.onnx").read_bytes() == before
