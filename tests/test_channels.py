"""Models that are not RGB-224, end to end through the scripts a user runs (issue 13):

- a 1-channel (grayscale) model evaluated by eval.py on a folder of grayscale PNGs gets the top-1 and
  cross-entropy of the model run directly on the NumPy-normalised pixels; infer.py, export.py (MINDIR and
  ONNX) and a --with_preprocess MINDIR taking (B, H, W, 1) pixels agree with it too;
- a 32 px model converted with `convert.py --crop_pct 1.0 --image_size 32` sees its 32x32 images
  unresized: the tensors the pipelines yield are the normalised pixels, bit for bit.
"""
import dataclasses
import json

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

from float32_bounds import U, assert_within, init_scale_weights, logits_bound
from tiny_classifier import TINY, run_cli, write_checkpoint
from vit_ms import Preprocess, create_model
from vit_ms.checkpoint import export_checkpoint, load_model, make_metadata, read_metadata, save_checkpoint
from vit_ms.data import create_dataset
from vit_ms.evaluate import classify_files, evaluate_folder, load_classifier
from vit_ms.export import load_mindir

GRAY = dataclasses.replace(TINY, in_channels=1, num_classes=3)
GRAY_PREPROCESS = Preprocess(image_size=32, mean=(0.5,), std=(0.25,), crop_pct=1.0)
CLASSES = ["nought", "one", "two"]
PER_CLASS = 4


def _softmax(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def gray(tmp_path_factory):
    """A 1-channel checkpoint, a val/ split of 32x32 grayscale PNGs, and the model's logits on them computed
    from the pixels by NumPy (x / 255 - mean) / std, with their float32 error bound."""
    root = tmp_path_factory.mktemp("gray")
    rng = np.random.default_rng(0)
    net = create_model(GRAY)
    init_scale_weights(net, rng)  # the bound of float32_bounds holds for weights at init scale
    ckpt = save_checkpoint(net, root / "gray.ckpt", make_metadata(GRAY, CLASSES, preprocess=GRAY_PREPROCESS))
    pixels, targets = [], []
    for label, name in enumerate(CLASSES):
        (root / "data" / "val" / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            image = rng.integers(0, 256, (32, 32)).astype(np.uint8)
            Image.fromarray(image, "L").save(root / "data" / "val" / name / f"{i}.png")
            pixels.append(image)
            targets.append(label)
    pixels = np.stack(pixels)  # (N, 32, 32) uint8, in the order eval.py lists them (class, then file name)
    inputs = ((pixels / 255.0 - 0.5) / 0.25)[:, None].astype(np.float32)  # (N, 1, 32, 32)

    loaded, _ = load_model(ckpt)
    out = loaded.forward_intermediates(ms.Tensor(inputs))
    logits = out["logits"].asnumpy().astype(np.float64)
    # Two float32 computations of the logits (any kernels, any summation order) each lie within
    # logits_bound of the exact value, so they differ by at most twice that. The input's own float32
    # rounding (divide, subtract, divide: 3 more roundings on a chain of ~900) is covered by using
    # gamma(K + 3) / gamma(K) <= 1.01 as a factor.
    bound = 2 * 1.01 * logits_bound(GRAY, out["pre_logits"].asnumpy(), loaded.head.weight.asnumpy(),
                                    loaded.head.bias.asnumpy())
    top2 = np.sort(logits, axis=1)[:, -2:]
    # The images' predicted classes are decided by more than the rounding, so top-1 must agree exactly.
    assert (top2[:, 1] - top2[:, 0] > 2 * bound.max()).all()
    return {"root": root, "ckpt": ckpt, "data": root / "data", "pixels": pixels, "inputs": inputs,
            "logits": logits, "bound": bound, "targets": np.array(targets)}


def test_eval_py_on_grayscale_pngs_matches_the_model_run_directly(gray):
    run = run_cli("eval.py", "--checkpoint", gray["ckpt"], "--data_path", gray["data"], "--json",
                  "--output_dir", gray["root"] / "eval", cwd=gray["root"])
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    predicted = gray["logits"].argmax(axis=1)
    assert report["num_images"] == len(CLASSES) * PER_CLASS and report["skipped"] == []
    assert report["top_1"] == np.mean(predicted == gray["targets"])
    assert 0 < report["top_1"] < 1  # a random model: a comparison of something other than 0 or 1
    log_probs = np.log(_softmax(gray["logits"]))
    reference_ce = -np.mean(log_probs[np.arange(len(predicted)), gray["targets"]])
    # A log-softmax moves by at most 2 max|dz| when the logits move by dz.
    assert abs(report["cross_entropy"] - reference_ce) <= 2 * gray["bound"].max()
    per_class = [c["accuracy"] for c in report["per_class"]]
    assert per_class == [np.mean(predicted[gray["targets"] == k] == k) for k in range(len(CLASSES))]

    # The Python API gives the same figures as the script.
    result = evaluate_folder(load_classifier(gray["ckpt"]), gray["data"], "val")
    assert result.top_1 == report["top_1"]
    assert abs(result.cross_entropy - reference_ce) <= 2 * gray["bound"].max()


def test_the_pipeline_feeds_the_model_one_grey_channel(gray):
    classifier = load_classifier(gray["ckpt"])
    paths = sorted((gray["data"] / "val").glob("*/*.png"))
    images = np.concatenate([b.images for b in classify_files(classifier, paths, batch_size=5)])
    assert images.shape == (len(paths), 1, 32, 32)
    # ToTensor's x * float32(1/255) is within 2 roundings of x / 255 (<= 1), the subtraction adds one of a
    # value <= 0.5, the division by 0.25 is exact, and the reference's cast to float32 one of a value <= 2.
    assert_within(images, gray["inputs"], (3 * U) / 0.25 + 2 * U, "normalised grey pixels")


def test_infer_py_on_grayscale_pngs(gray):
    run = run_cli("infer.py", "--checkpoint", gray["ckpt"], "--input", gray["data"] / "val", "--top_k", 3,
                  "--json", cwd=gray["root"])
    assert run.returncode == 0, run.stderr
    predictions = json.loads(run.stdout)["predictions"]
    assert len(predictions) == len(gray["logits"])
    probabilities = _softmax(gray["logits"])
    for row, prediction in enumerate(predictions):  # infer.py lists the folder in the same sorted order
        assert prediction["true_label"] == CLASSES[gray["targets"][row]]
        indices = [entry["index"] for entry in prediction["top_k"]]
        assert indices[0] == gray["logits"][row].argmax() and sorted(indices) == [0, 1, 2]
        assert [entry["name"] for entry in prediction["top_k"]] == [CLASSES[i] for i in indices]
        # softmax moves each probability by at most 2 max|dz| (times p_j <= 1).
        assert_within([entry["probability"] for entry in prediction["top_k"]], probabilities[row][indices],
                      2 * gray["bound"][row].max(), "probabilities")


@pytest.mark.parametrize("file_format", ["MINDIR", "ONNX"])
def test_export_py_writes_a_one_channel_model(gray, file_format):
    out = gray["root"] / f"gray.{file_format.lower()}"
    # --no_check: this test is the parity check, against the NumPy-fed model instead of the script's own.
    run = run_cli("export.py", "--checkpoint", gray["ckpt"], "--output", out, "--file_format", file_format,
                  "--no_check", cwd=gray["root"])
    assert run.returncode == 0, run.stderr
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["export"]["input_shape"] == [None, 1, 32, 32]
    assert sidecar["preprocess"]["mean"] == [0.5] and sidecar["class_names"] == CLASSES
    if file_format == "MINDIR":
        logits = load_mindir(out)(ms.Tensor(gray["inputs"])).asnumpy()
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        logits = session.run(None, {session.get_inputs()[0].name: gray["inputs"]})[0]
    assert_within(logits, gray["logits"], gray["bound"], f"{file_format} logits")

    if file_format == "MINDIR":  # infer.py reads the exported file with its sidecar
        run = run_cli("infer.py", "--mindir", out, "--input", gray["data"] / "val", "--top_k", 1, "--json",
                      cwd=gray["root"])
        assert run.returncode == 0, run.stderr
        top_1 = [p["top_k"][0]["index"] for p in json.loads(run.stdout)["predictions"]]
        assert top_1 == list(gray["logits"].argmax(axis=1))


def test_with_preprocess_mindir_takes_grey_pixels(gray):
    from vit_ms.export import export_model

    classifier = load_classifier(gray["ckpt"])
    report = export_model(classifier.net, gray["root"] / "gray_uint8.mindir", classifier.metadata(),
                          with_preprocess=True, input_size=(32, 32), check=False)  # checked below
    sidecar = json.loads(report.sidecar.read_text())["export"]
    assert sidecar["input_shape"] == [None, 32, 32, 1]
    assert sidecar["input_layout"] == "NHWC, raw grayscale pixels 0-255"
    logits = load_mindir(report.path)(ms.Tensor(gray["pixels"][..., None])).asnumpy()  # (N, 32, 32, 1) uint8
    assert_within(logits, gray["logits"], gray["bound"], "uint8 grayscale MINDIR logits")


# ---------------------------------------------------------------------------------------------------------
# A 32 px model converted with --crop_pct 1.0 sees its images unresized
# ---------------------------------------------------------------------------------------------------------

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """A 32 px model's timm-named safetensors, and a val/ split of 32x32 RGB PNGs."""
    root = tmp_path_factory.mktemp("cifar")
    timm_file = export_checkpoint(write_checkpoint(root / "tiny.ckpt"), root / "tiny_timm.safetensors", "timm")
    rng = np.random.default_rng(1)
    pixels = {}
    for name in ("cat", "dog"):
        (root / "data" / "val" / name).mkdir(parents=True)
        for i in range(3):
            image = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
            Image.fromarray(image).save(root / "data" / "val" / name / f"{i}.png")
            pixels[f"{name}/{i}.png"] = image
    return {"root": root, "timm": timm_file, "data": root / "data", "pixels": pixels}


def _normalised(pixels):
    """uint8 (H, W, 3) -> (3, H, W) as `vision.Normalize` computes it: (x - 255 m) / (255 s) in float32,
    with 255 m and 255 s computed in float64 and rounded once (the pipeline passes them as Python floats);
    the same roundings in the same order, so bit for bit."""
    shift, scale = np.float32(255 * np.array(MEAN)), np.float32(255 * np.array(STD))
    return ((pixels.astype(np.float32) - shift) / scale).transpose(2, 0, 1)


def _convert(cifar, dst, *flags):
    run = run_cli("convert.py", cifar["timm"], cifar["root"] / dst, "--num_heads", TINY.num_heads,
                  "--image_size", 32, "--mean", *MEAN, "--std", *STD, *flags, cwd=cifar["root"])
    assert run.returncode == 0, run.stderr
    return Preprocess.from_dict(read_metadata(cifar["root"] / dst)["preprocess"])


def test_convert_crop_pct_one_keeps_32px_images_unresized(cifar):
    preprocess = _convert(cifar, "cifar.ckpt", "--crop_pct", "1.0")
    assert (preprocess.image_size, preprocess.crop_pct, preprocess.resize_size) == (32, 1.0, 32)
    expected = [_normalised(pixels) for _, pixels in sorted(cifar["pixels"].items())]

    dataset, info = create_dataset(cifar["data"], "val", preprocess, batch_size=4)
    assert info.class_names == ("cat", "dog")
    images = np.concatenate([batch[0] for batch in dataset.create_tuple_iterator(output_numpy=True)])
    np.testing.assert_array_equal(images, np.stack(expected))

    # eval.py and infer.py use the batch engine of vit_ms.evaluate: the same tensors there.
    classifier = load_classifier(cifar["root"] / "cifar.ckpt")
    paths = [cifar["data"] / "val" / name for name in sorted(cifar["pixels"])]
    seen = np.concatenate([b.images for b in classify_files(classifier, paths, batch_size=4)])
    np.testing.assert_array_equal(seen, np.stack(expected))


def test_default_crop_resizes_32px_images(cifar):
    """Without --crop_pct, 32 px images are resized to 37 and centre-cropped: what the test above rules out."""
    preprocess = _convert(cifar, "cifar_default.ckpt")
    assert preprocess.resize_size == 37
    dataset, _ = create_dataset(cifar["data"], "val", preprocess, batch_size=6)
    images = next(dataset.create_tuple_iterator(output_numpy=True))[0]
    unresized = _normalised(sorted(cifar["pixels"].items())[0][1])
    assert np.abs(images[0] - unresized).max() > 1.0
