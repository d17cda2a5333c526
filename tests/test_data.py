"""vit_ms.data: pipelines over real bad files, the verify CLI, clear errors, sharding, the sample set's
determinism, the eval transform's numerics, and the tutorial download against a loopback HTTP server."""
import hashlib
import http.server
import io
import os
import subprocess
import sys
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vit_ms.config import Preprocess
from vit_ms import data
from vit_ms.data import DatasetError

REPO = Path(__file__).resolve().parent.parent
# mean 0 and std 1/255 make Normalize an identity: the pipeline then returns raw RGB pixel values.
RAW = Preprocess(image_size=16, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)


def _flat(colour, size=(40, 30)):
    return Image.new("RGB", size, tuple(int(c) for c in colour))


def _make_bad_folder(root: Path):
    """ROOT/train/{a,b}: good files in every mode MindSpore must turn into RGB, plus real bad files.

    Every good image is one flat colour, unique per file, so a pipeline's output identifies its file.
    Returns {colour (r, g, b) as Pillow decodes it: label} of the good files.
    """
    a, b = root / "train" / "a", root / "train" / "b"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    _flat((200, 30, 40)).save(a / "good.jpg", quality=95)
    _flat((30, 200, 40)).save(a / "UPPER.JPEG", quality=95)
    _flat((90, 90, 90)).convert("L").save(a / "gray.jpg", quality=95)
    _flat((20, 60, 220)).convert("CMYK").save(a / "cmyk.jpg", quality=95)
    rgba = _flat((240, 200, 10)).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(b / "rgba.png")
    _flat((10, 120, 130)).convert("P", palette=Image.Palette.ADAPTIVE).save(b / "palette.png")
    _flat((160, 60, 200)).save(b / "plain.bmp")
    # The bad ones: each must be skipped, none may stop the epoch.
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (a / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (a / "zero.jpg").write_bytes(b"")
    (b / "text.jpg").write_text("this is not an image\n")
    _flat((1, 2, 3)).save(b / "animation.jpg", format="GIF")
    # Not images at all: ignored, not even reported.
    (a / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (b / "README.txt").write_text("notes\n")
    expected = {}
    for label, folder in enumerate((a, b)):
        for path in folder.iterdir():
            if path.name in ("good.jpg", "UPPER.JPEG", "gray.jpg", "cmyk.jpg", "rgba.png", "palette.png",
                             "plain.bmp"):
                colour = tuple(np.asarray(Image.open(path).convert("RGB"))[5, 5].tolist())
                expected[colour] = label
    return expected


def _bad_names():
    return {"truncated.jpg", "zero.jpg", "text.jpg", "animation.jpg"}


def _collect(dataset):
    images, labels = [], []
    for image, label in dataset.create_tuple_iterator(output_numpy=True):
        images.append(image)
        labels.append(label)
    return np.concatenate(images), np.concatenate(labels)


def test_pipelines_yield_exactly_the_good_images_in_rgb_and_write_nothing(tmp_path, monkeypatch):
    expected = _make_bad_folder(tmp_path / "data")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    dataset, info = data.create_dataset(tmp_path / "data", "train", RAW, 3, training=False, num_workers=2)
    images, labels = _collect(dataset)
    assert images.shape == (7, 3, 16, 16) and images.dtype == np.float32
    assert labels.dtype == np.int32
    assert sorted(Path(p).name for p, _ in info.skipped) == sorted(_bad_names())
    assert info.class_names == ("a", "b") and info.num_images == 7 and info.split == "train"
    got = {}
    for image, label in zip(images, labels):
        assert np.ptp(image, axis=(1, 2)).max() < 1e-3, "a flat image stays flat through resize and crop"
        got[tuple(image[:, 0, 0].round().astype(int).tolist())] = int(label)
    # Same files, same labels, same RGB colour as Pillow decodes them (JPEG decoders may differ by 1-2).
    assert len(got) == len(expected) == 7
    for colour, label in expected.items():
        match = [c for c in got if max(abs(x - y) for x, y in zip(c, colour)) <= 3]
        assert len(match) == 1 and got[match[0]] == label, (colour, got)

    train, _ = data.create_dataset(tmp_path / "data", "train", RAW, 3, num_workers=2)
    images, labels = _collect(train)
    assert images.shape == (6, 3, 16, 16) and labels.dtype == np.int32  # 7 good, drop_remainder
    assert os.listdir(cwd) == [], "the pipeline wrote into the working directory"


def test_verify_cli_lists_the_bad_files_and_exits_non_zero(tmp_path):
    _make_bad_folder(tmp_path / "data")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = subprocess.run([sys.executable, "-m", "vit_ms.data", "verify", str(tmp_path / "data")], cwd=cwd,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 1, result.stderr
    listed = {Path(line.split(": ")[0]).name for line in result.stdout.splitlines() if ": " in line}
    assert listed == _bad_names()
    assert "7 of 11 images readable, 4 unreadable" in result.stdout
    assert os.listdir(cwd) == []
    assert data.main(["verify", str(tmp_path / "data" / "train" / "a" / "..")]) == 1
    good = tmp_path / "good"
    good.mkdir()
    _flat((1, 2, 3)).save(good / "x.png")
    assert data.main(["verify", str(good)]) == 0


@pytest.mark.parametrize("argv, message", [
    (["verify", "--chek", "full", "ROOT"], "python -m vit_ms.data verify: error: unrecognized arguments: --chek "
                                           "ROOT (--chek: did you mean --check?)"),
    (["sample", "--rot", "x"], "python -m vit_ms.data sample: error: unrecognized arguments: --rot x "
                               "(--rot: did you mean --root?)"),
    (["verify", "--check", "ful", "ROOT"], "python -m vit_ms.data verify: error: argument --check: invalid "
                                           "choice: 'ful' (choose from 'full', 'header')"),
])
def test_a_sub_command_names_its_own_flags(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        data.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == message
    assert err.startswith(f"usage: python -m vit_ms.data {argv[0]} ")  # the sub-command's usage, not the top's


def test_load_image_gives_rgb_and_names_unreadable_files(tmp_path):
    _make_bad_folder(tmp_path)
    for name in ("cmyk.jpg", "gray.jpg"):
        image = data.load_image(tmp_path / "train" / "a" / name)
        assert image.mode == "RGB"
    assert data.load_image(tmp_path / "train" / "b" / "rgba.png").mode == "RGB"
    for name in ("text.jpg", "animation.jpg"):
        with pytest.raises(data.UnreadableImageError, match=name):
            data.load_image(tmp_path / "train" / "b" / name)
    with pytest.raises(data.UnreadableImageError, match="does not exist"):
        data.load_image(tmp_path / "missing.jpg")


def test_preprocess_image_matches_pillow_and_numpy():
    pre = Preprocess(image_size=32)  # resize short side to 37, centre crop 32
    mean, std = np.array(pre.mean), np.array(pre.std)
    # A flat colour survives any resize exactly: the result is the hand-computed normalisation.
    flat = data.preprocess_image(_flat((10, 128, 250), size=(50, 40)), pre)
    want = ((np.array([10, 128, 250]) / 255 - mean) / std)[:, None, None]
    assert flat.shape == (3, 32, 32) and flat.dtype == np.float32
    np.testing.assert_allclose(flat, np.broadcast_to(want, flat.shape), atol=1e-5)
    # A smooth image: compare with Pillow's bilinear resize + centre crop (resamplers differ slightly).
    yy, xx = np.mgrid[0:60, 0:80]
    smooth = np.stack([xx * 3, yy * 4, (xx + yy) * 2], -1).clip(0, 255).astype(np.uint8)
    ours = data.preprocess_image(Image.fromarray(smooth), pre)
    resized = np.asarray(Image.fromarray(smooth).resize((49, 37), Image.Resampling.BILINEAR), np.float64)
    top, left = (37 - 32) // 2, (49 - 32) // 2
    crop = resized[top:top + 32, left:left + 32]
    reference = ((crop / 255 - mean) / std).transpose(2, 0, 1)
    assert np.abs(ours - reference).mean() < 0.03
    assert np.abs(ours - reference).max() < 0.15


def test_clear_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*vit_ms.data sample"):
        data.create_dataset(tmp_path / "nowhere", "train", RAW, 2)
    (tmp_path / "root" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"split folder .*val does not exist"):
        data.create_dataset(tmp_path / "root", "val", RAW, 2)
    _flat((1, 2, 3)).save(tmp_path / "root" / "train" / "loose.png")
    with pytest.raises(DatasetError, match="no class folders.*1 loose images"):
        data.class_names(tmp_path / "root")
    empty_class = tmp_path / "root" / "train" / "cat"
    empty_class.mkdir()
    (empty_class / "notes.txt").write_text("x")
    (tmp_path / "root" / "train" / "dog").mkdir()
    _flat((1, 2, 3)).save(tmp_path / "root" / "train" / "dog" / "a.png")
    with pytest.raises(DatasetError, match=r"class folder .*cat has no image files"):
        data.create_dataset(tmp_path / "root", "train", RAW, 2)
    (empty_class / "bad.jpg").write_bytes(b"")
    (tmp_path / "root" / "train" / "dog" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="no readable images"):
        data.create_dataset(tmp_path / "root", "train", RAW, 2)
    (tmp_path / "root" / "val" / "dog").mkdir(parents=True)
    _flat((1, 2, 3)).save(tmp_path / "root" / "val" / "dog" / "a.png")
    with pytest.raises(DatasetError, match=r"differ .*missing \['cat'\]"):
        data.create_dataset(tmp_path / "root", "val", RAW, 2, class_names=["cat", "dog"])


def test_shards_are_disjoint_and_cover_the_split(tmp_path):
    rng = np.random.default_rng(0)
    colours = rng.choice(256, size=(10, 3), replace=False)
    for i, colour in enumerate(colours):
        folder = tmp_path / "train" / ("a" if i < 5 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        _flat(colour).save(folder / f"{i}.png")
    # The two ranks run concurrently, as under msrun: each checks its own files and waits for the other's.
    with ThreadPoolExecutor(2) as pool:
        built = list(pool.map(lambda shard: data.create_dataset(tmp_path, "train", RAW, 1, training=False,
                                                                num_shards=2, shard_id=shard, num_workers=1),
                              range(2)))
    assert sum(info.checked for _, info in built) == 10, "every file checked exactly once"
    seen = []
    for dataset, _ in built:
        images, _ = _collect(dataset)
        seen.append({tuple(im[:, 0, 0].round().astype(int)) for im in images})
    with pytest.raises(ValueError, match="both num_shards and shard_id"):
        data.create_dataset(tmp_path, "train", RAW, 1, num_shards=2)


def _hashes(root: Path):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_sample_dataset_is_deterministic_and_complete(tmp_path, monkeypatch):
    first = data.ensure_sample_dataset(tmp_path / "one")
    second = data.ensure_sample_dataset(tmp_path / "two")
    assert _hashes(first) == _hashes(second)
    assert data.class_names(first) == list(data.SAMPLE_CLASSES) == data.class_names(first, "val")
    assert len(data.list_images(first / "train")) == 240 * 5
    assert len(data.list_images(first / "infer")) == 10
    assert all(p.parent == first / "infer" for p in data.list_images(first / "infer"))  # flat
    assert data.verify_images(first) == []
    assert [p.name for p in tmp_path.iterdir()] and all(not p.name.startswith(".") for p in tmp_path.iterdir())
    mtime = (first / "SAMPLE_VERSION").stat().st_mtime_ns
    assert data.ensure_sample_dataset(first) == first  # reused, not regenerated
    assert (first / "SAMPLE_VERSION").stat().st_mtime_ns == mtime
    # Classes differ by shape and texture, not colour: the mean colour alone barely beats chance (0.2).
    def mean_colours(split):
        pairs = [(np.asarray(Image.open(p), np.float64).mean((0, 1)), label)
                 for label, name in enumerate(data.SAMPLE_CLASSES) for p in data.list_images(first / split / name)]
        return np.array([f for f, _ in pairs]), np.array([y for _, y in pairs])
    train_x, train_y = mean_colours("train")
    val_x, val_y = mean_colours("val")
    centroids = np.stack([train_x[train_y == k].mean(0) for k in range(len(data.SAMPLE_CLASSES))])
    nearest = ((val_x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == val_y).mean() < 0.45


def test_default_data_root_is_env_then_local_datasets_then_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_MS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VIT_MS_DATA", str(tmp_path / "env"))
    monkeypatch.chdir(tmp_path)
    assert data.default_data_root() == tmp_path / "env"
    monkeypatch.delenv("VIT_MS_DATA")
    assert data.default_data_root() == tmp_path / "home" / "datasets"  # no ./datasets here: the cache
    (tmp_path / "datasets").mkdir()
    assert data.default_data_root() == tmp_path / "datasets"  # run from a checkout: its data folder
    assert not (tmp_path / "home").exists()  # nothing created


# ---------------------------------------------------------------------------------------------------------
# Tutorial download against a loopback server
# ---------------------------------------------------------------------------------------------------------

def _zip_bytes(members):
    """members: list of (name, bytes) or (ZipInfo, bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, payload in members:
            archive.writestr(name, payload)
    return buffer.getvalue()


def _png_bytes(colour):
    buffer = io.BytesIO()
    _flat(colour).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def server():
    """A loopback HTTP server; set `routes[path] = (bytes, claimed_length)` before fetching."""
    routes = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path not in routes:
                self.send_error(404)
                return
            body, length = routes[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", routes
    httpd.shutdown()
    httpd.server_close()


def _tutorial_members():
    return [("dataset/train/n01/a.JPEG", _png_bytes((10, 20, 30))),
            ("dataset/train/n02/b.JPEG", _png_bytes((40, 50, 60))),
            ("dataset/val/n01/c.JPEG", _png_bytes((70, 80, 90))),
            ("dataset/val/n02/d.JPEG", _png_bytes((90, 80, 70))),
            ("dataset/infer/e.JPEG", _png_bytes((1, 2, 3)))]


def test_download_happy_path_and_offline_reuse(tmp_path, server):
    base, routes = server
    payload = _zip_bytes(_tutorial_members())
    routes["/ok.zip"] = (payload, len(payload))
    root = tmp_path / "datasets"
    out = data.download_tutorial_dataset(root, url=base + "/ok.zip", progressbar=False)
    assert out == root / "imagenet_subset"
    assert data.class_names(out) == ["n01", "n02"] == data.class_names(out, "val")
    assert (out / "infer" / "e.JPEG").read_bytes() == _tutorial_members()[-1][1]
    assert sorted(p.name for p in root.iterdir()) == ["imagenet_subset"]  # archive and temp folder removed
    # Done once: a second call needs no server.
    assert data.download_tutorial_dataset(root, url="http://127.0.0.1:9/none.zip") == out
    # Offline: the error names the URL and where to place the archive; a placed archive then works.
    other = tmp_path / "offline"
    with pytest.raises(DatasetError, match=r"could not download http://127\.0\.0\.1:9/none\.zip.*place it at "
                                           + str(other / "vit_imagenet_dataset.zip").replace(".", r"\.")):
        data.download_tutorial_dataset(other, url="http://127.0.0.1:9/none.zip", timeout=2, progressbar=False)
    (other / "vit_imagenet_dataset.zip").write_bytes(payload)
    placed = data.download_tutorial_dataset(other, url="http://127.0.0.1:9/none.zip", progressbar=False)
    assert data.class_names(placed) == ["n01", "n02"]
    assert (other / "vit_imagenet_dataset.zip").is_file()  # the user's archive is left alone


def test_interrupted_download_leaves_no_dataset(tmp_path, server):
    base, routes = server
    payload = _zip_bytes(_tutorial_members())
    routes["/cut.zip"] = (payload[: len(payload) // 2], len(payload))  # claims more than it sends
    root = tmp_path / "datasets"
    with pytest.raises(DatasetError, match="could not download"):
        data.download_tutorial_dataset(root, url=base + "/cut.zip", timeout=5, progressbar=False)
    left = sorted(p.name for p in root.iterdir())
    assert "imagenet_subset" not in left and "vit_imagenet_dataset.zip" not in left
    assert all(name.endswith(".part") for name in left), left  # only the resumable partial file
    # A truncated archive placed by hand is refused and nothing is extracted.
    (root / "vit_imagenet_dataset.zip").write_bytes(payload[:-40])
    with pytest.raises(DatasetError, match="not a complete zip"):
        data.download_tutorial_dataset(root, url=base + "/cut.zip", progressbar=False)
    assert not (root / "imagenet_subset").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".imagenet_subset")]


@pytest.mark.parametrize("evil", ["../escaped.txt", "/tmp/vit_ms_absolute_escape.txt", "link"])
def test_malicious_archive_members_are_rejected(tmp_path, server, evil):
    base, routes = server
    members = _tutorial_members()
    if evil == "link":
        info = zipfile.ZipInfo("dataset/train/n01/link.JPEG")
        info.external_attr = (0o120777 << 16)  # a symlink entry pointing outside
        members.append((info, "../../../../escaped.txt"))
    else:
        members.append((evil, b"owned"))
    payload = _zip_bytes(members)
    routes["/evil.zip"] = (payload, len(payload))
    root = tmp_path / "deep" / "datasets"
    name = "dataset/train/n01/link.JPEG" if evil == "link" else evil
    with pytest.raises(DatasetError, match=f"member '{name}' .*refusing to extract"):
        data.download_tutorial_dataset(root, url=base + "/evil.zip", progressbar=False)
    assert sorted(p.name for p in root.iterdir()) == []  # archive deleted, nothing extracted
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert written == ["deep", "deep/datasets"]
    assert not Path("/tmp/vit_ms_absolute_escape.txt").exists()


def test_decode_workers_are_capped_at_the_cores_this_process_may_run_on(tmp_path):
    # A process pinned to one core (taskset, a container's cpuset, msrun --bind_core True) decodes with one
    # worker, not with one per core of the machine.
    script = ("import os, sys\n"
              "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
              "from vit_ms.data.files import available_cores, worker_count\n"
              "print(available_cores(), worker_count(None), worker_count(8), os.cpu_count())\n")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    cores, default, capped, machine = map(int, done.stdout.split())
    assert (cores, default, capped) == (1, 1, 1)
    unpinned = data.files.worker_count(None)
    assert unpinned == len(os.sched_getaffinity(0)) and unpinned <= machine
