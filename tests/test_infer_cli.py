"""infer.py as a user runs it: a folder mixing good, odd and broken images; MINDIR and checkpoint agree;
annotated images, attention maps, predictions.json and predictions.csv are written; an output folder in
use is refused unless --overwrite."""
import csv
import json
import os
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

from tiny_classifier import CLASS_NAMES, random_image, run_cli, write_checkpoint
from vit_ms import Preprocess, data
from vit_ms.checkpoint import load_model
from vit_ms.evaluate import find_images, readable_class_names, softmax

GOOD = ["cat's photo.png", "dog 2.jpg", "sub dir/bird's nest.jpeg", "gray scale.jpg", "cmyk 'print'.jpg",
        "UPPER.PNG", "alpha 'rgba'.png", "dog/pup.jpg"]  # dog/: a folder named like a class of the model
BROKEN = "broken.jpg"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A checkpoint, its exported MINDIR (via export.py), and a folder of images good and bad."""
    root = tmp_path_factory.mktemp("infer")
    rng = np.random.default_rng(0)
    images = root / "my images"
    (images / "sub dir").mkdir(parents=True)
    (images / "dog").mkdir()
    for name in GOOD:
        image = random_image(rng, size=(int(rng.integers(33, 60)), int(rng.integers(33, 60))))
        if name.startswith("gray"):
            image = image.convert("L")
        elif name.startswith("cmyk"):
            image = image.convert("CMYK")
        elif name.startswith("alpha"):
            image.putalpha(Image.fromarray(rng.integers(0, 256, image.size[::-1]).astype(np.uint8)))
        image.save(images / name)
    (images / BROKEN).write_bytes(b"this is not a JPEG file\n" * 20)
    (images / "notes.txt").write_text("not an image; folders yield image extensions only")
    ckpt = write_checkpoint(root / "tiny.ckpt")
    run = run_cli("export.py", "--checkpoint", ckpt, "--output", root / "tiny.mindir", cwd=root)
    assert run.returncode == 0, run.stderr
    assert "max |logit difference| 0" in run.stdout
    return root


@pytest.fixture(scope="module")
def from_checkpoint(workdir):
    """infer.py --checkpoint on the mixed folder with annotated output and attention maps."""
    run = run_cli("infer.py", "--checkpoint", workdir / "tiny.ckpt", "--input", workdir / "my images",
                  "--top_k", 3, "--json", "--attention", "--output_dir", workdir / "out", cwd=workdir)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_fixture_images_have_the_modes_we_mean(workdir):
    with Image.open(workdir / "my images" / "gray scale.jpg") as im:
        assert im.mode == "L"
    with Image.open(workdir / "my images" / "cmyk 'print'.jpg") as im:
        assert im.mode == "CMYK"
    with Image.open(workdir / "my images" / "alpha 'rgba'.png") as im:
        assert im.mode == "RGBA" and im.getextrema()[3] != (255, 255)


def test_one_prediction_per_good_image_and_the_broken_one_reported(workdir, from_checkpoint):
    folder = workdir / "my images"
    assert sorted(p["path"] for p in from_checkpoint["predictions"]) == sorted(str(folder / n) for n in GOOD)
    assert [s["path"] for s in from_checkpoint["skipped"]] == [str(folder / BROKEN)]
    assert from_checkpoint["skipped"][0]["reason"]  # says why, e.g. "UnidentifiedImageError: cannot identify"
    assert from_checkpoint["model"] == str(workdir / "tiny.ckpt")
    # The folder "dog" names a class of the model: that is the image's true label; other folders do not.
    truth = {p["path"]: p["true_label"] for p in from_checkpoint["predictions"]}
    assert truth == {str(folder / n): ("dog" if n.startswith("dog/") else None) for n in GOOD}


def test_probabilities_are_the_networks_softmax_top_k(workdir, from_checkpoint):
    net, meta = load_model(workdir / "tiny.ckpt")
    net.set_train(False)
    preprocess = Preprocess.from_dict(meta["preprocess"])
    for record in from_checkpoint["predictions"]:
        image = data.preprocess_image(data.load_image(record["path"]), preprocess)
        probs = softmax(net(ms.Tensor(image[None])).asnumpy())[0]
        expected = np.argsort(-probs)[:3]
        assert [t["index"] for t in record["top_k"]] == expected.tolist()
        assert [t["name"] for t in record["top_k"]] == [CLASS_NAMES[i] for i in expected]
        np.testing.assert_allclose([t["probability"] for t in record["top_k"]], probs[expected], atol=1e-6)


def test_annotated_images_attention_maps_and_predictions_json_are_written(workdir, from_checkpoint):
    out = workdir / "out"
    saved = json.loads((out / "predictions.json").read_text())
    assert saved == from_checkpoint
    written = []
    for record in saved["predictions"]:
        # Pictures of PNG inputs stay PNG; photos become JPEG. Attention maps are PNG.
        expected = {"annotated": "PNG" if record["path"].lower().endswith(".png") else "JPEG", "attention": "PNG"}
        for key, kind in expected.items():
            assert Path(record[key]).suffix == {"PNG": ".png", "JPEG": ".jpg"}[kind]
            with Image.open(record[key]) as im:
                assert im.format == kind and im.mode == "RGB"
            written.append(Path(record[key]).name)
    assert len(set(written)) == 2 * len(GOOD)  # no file overwrote another
    assert sorted(p.name for p in out.iterdir()) == sorted(written + ["predictions.json", "predictions.csv"])

    with open(out / "predictions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "true_label"] + [f"top{r}_{w}" for r in (1, 2, 3) for w in ("index", "name", "probability")]
    assert len(rows) == 1 + len(GOOD)
    for row, record in zip(rows[1:], saved["predictions"]):
        assert row[:2] == [record["path"], record["true_label"] or ""]
        for r, top in enumerate(record["top_k"]):
            assert row[2 + 3 * r:5 + 3 * r] == [str(top["index"]), top["name"], f"{top['probability']:.6f}"]


def test_a_used_output_dir_is_refused_unless_overwrite(workdir, from_checkpoint):
    out = workdir / "out"
    before = sorted(p.name for p in out.iterdir())
    args = ["--checkpoint", workdir / "tiny.ckpt", "--input", workdir / "my images", "--output_dir", out]
    refused = run_cli("infer.py", *args, cwd=workdir)
    assert refused.returncode == 2
    assert f"--output_dir {out} already holds {len(before)} file(s)" in refused.stderr
    assert "--overwrite" in refused.stderr
    assert sorted(p.name for p in out.iterdir()) == before  # nothing touched

    # --overwrite --no-annotate: the earlier run's pictures go, only the new predictions stay.
    run = run_cli("infer.py", *args, "--overwrite", "--no-annotate", "--json", cwd=workdir)
    assert run.returncode == 0, run.stderr
    assert "weights packed" not in run.stderr  # 9 files, batches of up to 16: the plain weights
    assert sorted(p.name for p in out.iterdir()) == ["predictions.csv", "predictions.json"]
    result = json.loads(run.stdout)
    assert all("annotated" not in p for p in result["predictions"]) and len(result["predictions"]) == len(GOOD)


def test_a_missing_mindir_is_named_not_its_sidecar(workdir):
    run = run_cli("infer.py", "--mindir", workdir / "missing.mindir", "--input", workdir / "my images",
                  "--output_dir", workdir / "never", cwd=workdir)
    assert run.returncode == 1
    assert f"MINDIR file {workdir / 'missing.mindir'} not found" in run.stderr
    assert "missing.mindir.json" not in run.stderr
    assert not (workdir / "never").exists()  # nothing created before the inputs are valid


def test_a_misspelled_flag_names_the_right_one(workdir):
    run = run_cli("infer.py", "--checkpoint", "x.ckpt", "--input", "x.jpg", "--topk", "3", cwd=workdir)
    assert run.returncode == 2 and "--topk: did you mean --top_k?" in run.stderr


def test_a_file_the_pipeline_cannot_decode_is_reported_alone(workdir, monkeypatch):
    """Should a file pass the check and still fail in the decode pipeline, the other files are predicted
    one by one and only that file is reported."""
    from vit_ms.evaluate import load_classifier, predict_images

    classifier = load_classifier(workdir / "tiny.ckpt")
    folder = workdir / "my images"
    paths = [folder / n for n in GOOD[:3]] + [folder / BROKEN] + [folder / n for n in GOOD[3:]]
    expected, skipped = predict_images(classifier, paths, top_k=2, batch_size=2)
    assert [p.path for p in expected] == [str(folder / n) for n in GOOD]
    assert [s[0] for s in skipped] == [str(folder / BROKEN)]

    monkeypatch.setattr(data, "check_image", lambda path, mode="full": None)  # the check lets everything through
    predictions, skipped = predict_images(classifier, paths, top_k=2, batch_size=2)
    assert [s[0] for s in skipped] == [str(folder / BROKEN)] and skipped[0][1]
    assert [p.path for p in predictions] == [p.path for p in expected]
    for got, want in zip(predictions, expected):
        assert got.indices == want.indices
        # Pillow decodes these files to the same pixels as MindSpore (test_probabilities_are_the_networks_
        # softmax_top_k compares with a Pillow decode at 1e-6); only the batch composition differs, which
        # changes float32 GEMM rounding (~1e-7 relative on logits of size ~10).
        np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=0, atol=1e-5)


def test_mindir_and_checkpoint_agree_on_every_image(workdir, from_checkpoint):
    run = run_cli("infer.py", "--mindir", workdir / "tiny.mindir", "--input", workdir / "my images",
                  workdir / "missing.png", "--top_k", 3, "--json", cwd=workdir)
    assert run.returncode == 0, run.stderr
    from_mindir = json.loads(run.stdout)
    assert len(from_mindir["predictions"]) == len(GOOD)
    by_path = {p["path"]: p["top_k"] for p in from_checkpoint["predictions"]}
    for record in from_mindir["predictions"]:
        expected = by_path[record["path"]]
        assert [t["index"] for t in record["top_k"]] == [t["index"] for t in expected]
        assert [t["name"] for t in record["top_k"]] == [t["name"] for t in expected]
        # The MINDIR holds the plain computation, the checkpoint runs the fast CPU path: float32 rounding.
        np.testing.assert_allclose([t["probability"] for t in record["top_k"]],
                                   [t["probability"] for t in expected], rtol=0, atol=1e-5)
    assert from_mindir["skipped"] == [{"path": str(workdir / "missing.png"),
                                       "reason": "no such file, folder or matching pattern"}] + from_checkpoint["skipped"]


@pytest.mark.parametrize("batch_size", [2, 3, 9])
def test_small_batches_pack_the_weights_and_predict_the_same(workdir, from_checkpoint, batch_size):
    """With batches of at most 4 images and no --attention, infer.py packs the weights for inference
    (vit_ms.packing); the fixture's run (--attention, batches of 16) keeps them plain: the same classes,
    probabilities within float32 rounding (the packed logits' own bound is checked in test_packing.py; 1e-5
    as for the MINDIR below). The folder's 9 image files (one broken) make batches of one size at 3 (3, 3,
    and 2 good ones padded to 3): one graph for that size; at 2 the last batch is shorter: a dynamic batch;
    at 9, one batch of 9: too large for either, plain weights and the dynamic batch."""
    run = run_cli("infer.py", "--checkpoint", workdir / "tiny.ckpt", "--input", workdir / "my images",
                  "--top_k", 3, "--json", "--batch_size", batch_size, cwd=workdir)
    assert run.returncode == 0, run.stderr
    if batch_size > 4:
        assert "packed for inference" not in run.stderr
    elif os.environ.get("VIT_MS_FUSED_KERNELS", "1") == "0":  # MindSpore's own ops: nothing to pack; it says why
        assert "weights not packed for inference: the network runs MindSpore's own ops" in run.stderr
    else:
        assert "weights packed for inference (2 blocks)" in run.stderr
    fixed = [line for line in run.stderr.splitlines() if "one graph for batches" in line]
    assert [line.split(" INFO ", 1)[1] for line in fixed] == (
        ["one graph for batches of 3 images (a shorter batch is padded)"] if batch_size == 3 else [])
    packed = {p["path"]: p["top_k"] for p in json.loads(run.stdout)["predictions"]}
    assert sorted(packed) == sorted(p["path"] for p in from_checkpoint["predictions"])
    for record in from_checkpoint["predictions"]:
        got = packed[record["path"]]
        assert [t["index"] for t in got] == [t["index"] for t in record["top_k"]]
        np.testing.assert_allclose([t["probability"] for t in got], [t["probability"] for t in record["top_k"]],
                                   rtol=0, atol=1e-5)


def test_find_images_expands_files_folders_and_globs(tmp_path):
    for name in ("a.jpg", "b.PNG", "c.txt", "deep/er/d.jpeg", "x[1].png", ".ipynb_checkpoints/a-checkpoint.jpg",
                 ".hidden.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    paths, missing = find_images([str(tmp_path / "*.jpg"), str(tmp_path / "deep"), str(tmp_path / "c.txt"),
                                  str(tmp_path / "x[1].png"), str(tmp_path / "a.jpg"), str(tmp_path / "none*")])
    assert paths == [tmp_path / "a.jpg", tmp_path / "deep/er/d.jpeg", tmp_path / "c.txt", tmp_path / "x[1].png"]
    assert missing == [(str(tmp_path / "none*"), "no such file, folder or matching pattern")]
    # A folder: image extensions only, any case, recursive, hidden files and folders skipped (as training does).
    everything, _ = find_images([str(tmp_path)])
    assert [p.name for p in everything] == ["a.jpg", "b.PNG", "d.jpeg", "x[1].png"]


def test_imagenet_models_get_readable_names():
    names = readable_class_names(None, 1000)
    assert len(names) == 1000 and names[236] == "Doberman" and names[0] == "tench"
    assert readable_class_names(["n02107142", "n01440764"], 2) == ["Doberman", "tench"]  # tutorial wnid folders
    assert readable_class_names(["cat", "n01440764"], 2) == ["cat", "n01440764"]
    assert readable_class_names(None, 3) == ["0", "1", "2"]
