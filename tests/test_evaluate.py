"""Evaluation: eval.py's top-1 / top-5 / loss / confusion matrix equal a hand computation from the logits."""
import csv
import dataclasses
import json

import mindspore as ms
import mindspore.dataset as ds
import numpy as np
import pytest
from PIL import Image

from tiny_classifier import CLASS_NAMES, TINY, random_image, random_net, run_cli, write_checkpoint
from vit_ms import data
from vit_ms.checkpoint import load_model
from vit_ms.evaluate import evaluate, evaluate_folder, load_classifier, run_batch

PER_CLASS = 3


def hand_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Top-1, top-5, mean cross entropy and confusion matrix, straight from the definitions."""
    order = np.argsort(-logits, axis=1)
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    matrix = np.zeros((num_classes, num_classes), np.int64)
    for true, predicted in zip(labels, order[:, 0]):
        matrix[true, predicted] += 1
    return {"top_1": float(np.mean(order[:, 0] == labels)),
            "top_5": float(np.mean([label in row[:5] for label, row in zip(labels, order)])),
            "loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
            "confusion": matrix}


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    """ROOT/val/<class>/ with 3 images per class, folders named after the checkpoint's (unsorted) classes."""
    root = tmp_path_factory.mktemp("evalset")
    rng = np.random.default_rng(3)
    for k, name in enumerate(CLASS_NAMES):
        folder = root / "val" / name
        folder.mkdir(parents=True)
        tint = rng.integers(0, 256, 3)
        for i in range(PER_CLASS):
            random_image(rng, size=(40, 36), tint=tint).save(folder / f"img {i}.png")
    return root


def test_eval_cli_equals_a_hand_computation_from_the_logits(tmp_path, val_set):
    ckpt = write_checkpoint(tmp_path / "tiny.ckpt")
    # Batch 4 over 18 images: the last batch is short, which must not skew the loss.
    run = run_cli("eval.py", "--checkpoint", ckpt, "--data_path", val_set, "--batch_size", 4, "--json",
                  "--output_dir", tmp_path / "out", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)

    # The same images through the network directly, labels from the checkpoint's class order.
    net, meta = load_model(ckpt)
    net.set_train(False)
    classifier = load_classifier(ckpt)
    logits, labels = [], []
    dataset, _ = data.create_dataset(val_set, "val", classifier.preprocess, 5, training=False, class_names=CLASS_NAMES)
    for batch in dataset.create_dict_iterator(output_numpy=True):
        logits.append(net(ms.Tensor(batch["image"])).asnumpy())
        labels.append(batch["label"])
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    assert sorted(labels.tolist()) == sorted(list(range(len(CLASS_NAMES))) * PER_CLASS)
    hand = hand_metrics(logits, labels, len(CLASS_NAMES))
    assert 0 < hand["top_1"] < hand["top_5"] < 1  # a test that can tell top-1 from top-5

    assert report["num_images"] == len(CLASS_NAMES) * PER_CLASS
    assert report["top_1"] == pytest.approx(hand["top_1"], abs=1e-12)
    assert report["top_5"] == pytest.approx(hand["top_5"], abs=1e-12)
    assert report["cross_entropy"] == pytest.approx(hand["loss"], rel=1e-5)

    with open(report["confusion_matrix_csv"], newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == CLASS_NAMES and [r[0] for r in rows[1:]] == CLASS_NAMES
    matrix = np.array([[int(v) for v in r[1:]] for r in rows[1:]])
    np.testing.assert_array_equal(matrix, hand["confusion"])
    assert matrix.sum() == report["num_images"] and (matrix.sum(axis=1) == PER_CLASS).all()
    for c in report["per_class"]:
        assert c["name"] == CLASS_NAMES[c["index"]] and c["images"] == PER_CLASS
        assert c["accuracy"] == pytest.approx(hand["confusion"][c["index"], c["index"]] / PER_CLASS)
    with Image.open(report["confusion_matrix_png"]) as im:
        assert im.format == "PNG"
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == report


def test_evaluate_without_top_5_below_5_classes_and_loss_per_image():
    config = dataclasses.replace(TINY, num_classes=3)
    net = random_net(config, seed=2)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((7, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 3, 7).astype(np.int32)
    dataset = ds.NumpySlicesDataset({"image": images, "label": labels}, shuffle=False).batch(3)  # 3 + 3 + 1
    result = evaluate(net, dataset, 3)
    hand = hand_metrics(net(ms.Tensor(images)).asnumpy(), labels, 3)
    assert result.top_5 is None and result.num_images == 7
    assert result.top_1 == pytest.approx(hand["top_1"], abs=1e-12)
    assert result.cross_entropy == pytest.approx(hand["loss"], rel=1e-5)  # a mean of batch means would differ
    np.testing.assert_array_equal(result.confusion_matrix, hand["confusion"])
    support = hand["confusion"].sum(axis=1)
    expected = [hand["confusion"][i, i] / s if s else None for i, s in enumerate(support)]
    assert result.per_class_accuracy == pytest.approx(expected)


def test_a_missing_split_is_named(tmp_path, val_set):
    classifier = load_classifier(write_checkpoint(tmp_path / "tiny.ckpt"))
    with pytest.raises(FileNotFoundError, match=f"{val_set / 'test'} not found: --data_path must hold a test/"):
        evaluate_folder(classifier, val_set, "test")


def test_an_unavailable_device_is_one_line_before_anything_is_loaded(tmp_path):
    # A checkpoint that does not exist: the device is refused first, the way train.py does.
    run = run_cli("eval.py", "--checkpoint", tmp_path / "none.ckpt", "--data_path", tmp_path, "--device_target",
                  "GPU", "--output_dir", tmp_path / "out", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        f"eval.py: error: --device_target GPU: this MindSpore {ms.__version__} supports CPU device target(s) "
        f"only; install the GPU (CUDA) build of MindSpore on a machine with an NVIDIA GPU and CUDA "
        f"(https://www.mindspore.cn/install), or use --device_target CPU"), run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()


def test_a_classifier_for_one_batch_size_pads_shorter_batches(tmp_path, monkeypatch):
    """`load_classifier(batch_size=3)` (infer.py where every batch has the same size): one graph, compiled for
    batches of 3, a longer input split and a shorter one padded; the logits within float32 rounding of the
    float64 reference (`float32_bounds`), as the dynamic-batch graph's are. PyNative compiles nothing: no
    fixed batch there."""
    from float32_bounds import assert_within, init_scale_weights, logits_bound
    from test_fast_path import SMALL, _images, _reference
    from vit_ms import create_model, layers
    from vit_ms.checkpoint import make_metadata, save_checkpoint

    monkeypatch.delenv(layers.FUSED_ENV, raising=False)  # the fused kernels, what infer.py runs
    net = create_model(SMALL, fast=True)
    init_scale_weights(net, np.random.default_rng(0))
    net.set_train(False)
    ckpt = save_checkpoint(net, tmp_path / "small.ckpt", make_metadata(SMALL))
    x = _images(5, seed=4)
    ref_logits, _ = _reference(net, SMALL, x)
    pre_logits = net.forward_intermediates(ms.Tensor(x))["pre_logits"].asnumpy()
    bound = logits_bound(SMALL, pre_logits, net.head.weight.asnumpy(), net.head.bias.asnumpy())
    previous = ms.get_context("mode")
    try:
        ms.set_context(mode=ms.GRAPH_MODE)
        classifier = load_classifier(ckpt, batch_size=3)
        assert classifier.fixed_batch == 3
        assert_within(run_batch(classifier, x), ref_logits, bound, "batches of 3 (3 + 2 padded)")
        assert_within(run_batch(classifier, x[:1]), ref_logits[:1], bound[:1], "one image, padded to 3")
        assert len(classifier.net.compile_cache) == 1  # one graph for all of them
        with pytest.raises(ValueError, match="batch_size must be positive"):
            load_classifier(ckpt, batch_size=0)
        ms.set_context(mode=ms.PYNATIVE_MODE)
        assert load_classifier(ckpt, batch_size=3).fixed_batch is None
    finally:
        ms.set_context(mode=previous)
