"""vit_ms.data.files / manifest: check modes, the per-file manifest (warm starts re-check only what changed),
its location and fallback, sharing the check between concurrent ranks, the bounded wait, and
decompression bombs refused before any decoder allocates their pixels."""
import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from vit_ms import data
from vit_ms.config import Preprocess
from vit_ms.data import manifest as manifest_module
from vit_ms.data.files import DatasetError, UnreadableImageError

RAW = Preprocess(image_size=16, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)


def _jpeg(colour, size=(20, 16)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _png(colour, size=(20, 16)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def _noise_jpeg(seed=0):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def bomb_png(width=40000, height=40000) -> bytes:
    """A valid PNG header declaring width x height RGB pixels, with a few bytes of image data (truncated)."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(3 * width + 1)))
            + chunk(b"IEND", b""))


def _make_split(root: Path, good=6):
    """ROOT/train/{a,b}: `good` flat JPEGs and PNGs plus a truncated JPEG, a truncated PNG and a GIF named .jpg."""
    for i in range(good):
        folder = root / "train" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.{'jpg' if i < 3 else 'png'}").write_bytes((_jpeg if i < 3 else _png)((40 * i, 10, 20)))
    jpeg, png = _noise_jpeg(), _png((1, 2, 3))
    (root / "train" / "a" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "train" / "a" / "cut.png").write_bytes(png[:-20])
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    (root / "train" / "b" / "gif.jpg").write_bytes(gif.getvalue())


def _skipped(info):
    return sorted(p.name for p, _ in info.skipped)


def test_warm_start_rechecks_only_new_or_changed_files(tmp_path):
    _make_split(tmp_path)
    _, cold = data.create_dataset(tmp_path, "train", RAW, 2, num_workers=1)
    assert cold.checked == 9 and _skipped(cold) == ["cut.jpg", "cut.png", "gif.jpg"]
    manifest = tmp_path / ".vit_ms-check" / "train.json"
    entries = manifest_module.read_known(manifest)
    stat = (tmp_path / "train" / "b" / "0.jpg").stat()
    assert entries["b/0.jpg"] == [stat.st_size, stat.st_mtime_ns, 2, None]
    assert entries["b/gif.jpg"][3].startswith("GIF data")
    assert oct(manifest.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in manifest.parent.iterdir()) == ["train.json"]  # no temporaries, no parts

    _, warm = data.create_dataset(tmp_path, "train", RAW, 2, num_workers=1)
    assert warm.checked == 0 and warm.skipped == cold.skipped and warm.num_images == 6
    _, header = data.create_dataset(tmp_path, "train", RAW, 2, num_workers=1, check="header")
    assert header.checked == 0, "a full check also answers a header check"

    (tmp_path / "train" / "a" / "cut.jpg").write_bytes(_jpeg((9, 9, 9)))  # repaired: size changes
    (tmp_path / "train" / "b" / "new.png").write_bytes(_png((7, 7, 7)))
    (tmp_path / "train" / "b" / "0.jpg").unlink()
    _, changed = data.create_dataset(tmp_path, "train", RAW, 2, num_workers=1)
    assert changed.checked == 2 and _skipped(changed) == ["cut.png", "gif.jpg"] and changed.num_images == 7
    entries = manifest_module.read_known(manifest)
    assert "b/0.jpg" not in entries and entries["b/new.png"][3] is None  # deleted files leave the manifest

    # Same size, new mtime: checked again (a file rewritten in place).
    path = tmp_path / "train" / "a" / "1.jpg"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert data.create_dataset(tmp_path, "train", RAW, 2, num_workers=1)[1].checked == 1


def test_the_manifest_is_columns_in_scan_order_and_version_1_is_still_read(tmp_path):
    _make_split(tmp_path)
    data.create_dataset(tmp_path, "train", RAW, 2, num_workers=1)
    manifest = tmp_path / ".vit_ms-check" / "train.json"
    content = json.loads(manifest.read_text())
    paths = data.scan_split_paths(tmp_path, "train")[0]
    assert content["paths"] == [os.path.relpath(p, tmp_path / "train") for p in paths]
    assert content["size"] == [os.stat(p).st_size for p in paths]
    assert content["mtime_ns"] == [os.stat(p).st_mtime_ns for p in paths] and set(content["depth"]) == {2}
    assert sorted(content["paths"][int(i)] for i in content["reasons"]) == ["a/cut.jpg", "a/cut.png", "b/gif.jpg"]

    # A manifest written by the previous release (a dict of [size, mtime, depth, reason]) answers too.
    entries = manifest_module.read_known(manifest)
    manifest.write_text(json.dumps({"version": 1, "entries": entries}))
    _, info = data.create_dataset(tmp_path, "train", RAW, 2, num_workers=1)
    assert info.checked == 0 and _skipped(info) == ["cut.jpg", "cut.png", "gif.jpg"]
    assert manifest_module.read_known(manifest) == entries


def test_check_modes_and_their_depth(tmp_path):
    _make_split(tmp_path)
    _, header = data.create_dataset(tmp_path, "train", RAW, 2, num_workers=1, check="header")
    # Header: the GIF (format), the truncated PNG (chunk CRC) and the truncated JPEG (no end marker, so
    # decoded) are caught.
    assert header.checked == 9 and _skipped(header) == ["cut.jpg", "cut.png", "gif.jpg"]
    _, full = data.create_dataset(tmp_path, "train", RAW, 2, num_workers=1, check=True)
    # A header result does not answer a full check, but a file already found bad stays bad.
    assert full.checked == 6 and _skipped(full) == ["cut.jpg", "cut.png", "gif.jpg"]
    _, none = data.create_dataset(tmp_path, "train", RAW, 2, num_workers=1, check=False)
    assert none.checked == 0 and none.skipped == () and none.num_images == 9
    with pytest.raises(ValueError, match=r"check must be one of \('full', 'header', 'none'\)"):
        data.create_dataset(tmp_path, "train", RAW, 2, check="fast")


def test_manifest_falls_back_to_the_cache_when_the_data_root_is_read_only(tmp_path, monkeypatch):
    _make_split(tmp_path / "data")
    monkeypatch.setenv("VIT_MS_HOME", str(tmp_path / "home"))
    root = (tmp_path / "data").resolve()
    real_access = os.access
    # Simulate a read-only data root (chmod does not stop root, which the tests may run as).
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == root else real_access(p, mode))
    where = data.manifest_path(root / "train")
    assert where.parent.parent == tmp_path / "home" / "datasets" / "checks" and where.name == "train.json"
    assert data.create_dataset(root, "train", RAW, 2, num_workers=1)[1].checked == 9
    assert where.is_file() and not (root / ".vit_ms-check").exists()
    assert data.create_dataset(root, "train", RAW, 2, num_workers=1)[1].checked == 0


def test_a_damaged_manifest_costs_a_recheck_not_a_crash(tmp_path):
    _make_split(tmp_path)
    data.create_dataset(tmp_path, "train", RAW, 2, num_workers=1)
    manifest = tmp_path / ".vit_ms-check" / "train.json"
    manifest.write_text(manifest.read_text()[:50])
    _, info = data.create_dataset(tmp_path, "train", RAW, 2, num_workers=1)
    assert info.checked == 9 and _skipped(info) == ["cut.jpg", "cut.png", "gif.jpg"]
    assert json.loads(manifest.read_text())["version"] == manifest_module.MANIFEST_VERSION
    content = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**content, "reasons": {"999": "a reason for no file"}}))
    assert data.create_dataset(tmp_path, "train", RAW, 2, num_workers=1)[1].checked == 9


_RANK_SCRIPT = """
import json, sys
from vit_ms import data
from vit_ms.config import Preprocess
rank = int(sys.argv[2])
dataset, info = data.create_dataset(sys.argv[1], "train", Preprocess(image_size=16), 2, training=False,
                                    num_workers=1, num_shards=2, shard_id=rank)
print(json.dumps({"checked": info.checked, "skipped": sorted(str(p) for p, _ in info.skipped),
                  "rows": dataset.get_dataset_size()}))
"""


def _start_two_ranks(root: Path) -> list:
    """Both ranks as processes of one parent (as msrun starts them); their JSON results."""
    env = {**os.environ, "VIT_MS_CHECK_TIMEOUT": "300"}
    ranks = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(root), str(rank)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for rank in (0, 1)]
    results = []
    for process in ranks:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        results.append(json.loads(out.splitlines()[-1]))
    return results


def test_two_rank_processes_check_each_file_once_and_agree(tmp_path):
    _make_split(tmp_path / "data")
    results = _start_two_ranks(tmp_path / "data")
    owners = [manifest_module.owner(p.relative_to(tmp_path / "data" / "train").as_posix(), 2)
              for p in data.list_images(tmp_path / "data" / "train")]
    assert [r["checked"] for r in results] == [owners.count(0), owners.count(1)]  # 9 files, each once
    assert results[0]["skipped"] == results[1]["skipped"] and len(results[0]["skipped"]) == 3
    checks = tmp_path / "data" / ".vit_ms-check"
    assert sorted(p.name for p in checks.iterdir()) == ["train.json"]

    # Warm: each rank stats every other file, and both answer from the manifest once both tokens agree.
    warm = _start_two_ranks(tmp_path / "data")
    assert [r["checked"] for r in warm] == [0, 0] and warm[0]["skipped"] == results[0]["skipped"]
    tokens = sorted(checks.glob("train.warm-*"))
    assert [t.name.rsplit("-", 3)[1:] for t in tokens] == [["0", "of", "2"], ["1", "of", "2"]]
    assert [t.read_text().split()[0] for t in tokens] == ["unchanged", "unchanged"]

    # A file of rank 1's share changes (now a GIF named .jpg): its token says so, and both ranks take the
    # full path, which re-checks that file once and leaves it out on both.
    files = data.list_images(tmp_path / "data" / "train")
    changed = files[1]
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "GIF")
    changed.write_bytes(buffer.getvalue())
    after = _start_two_ranks(tmp_path / "data")
    assert sum(r["checked"] for r in after) == 1
    assert after[0]["skipped"] == after[1]["skipped"] == sorted(results[0]["skipped"] + [str(changed)])
    assert sorted(t.read_text().split()[0] for t in checks.glob("train.warm-*")) == ["changed", "unchanged"]


def test_a_rank_starting_late_still_hands_over_its_results(tmp_path, monkeypatch):
    """Rank 1 starts after rank 0 wrote its part: rank 1 then needs nothing more, but rank 0 waits for it."""
    _make_split(tmp_path)
    monkeypatch.setenv("VIT_MS_CHECK_TIMEOUT", "120")  # a regression fails in 2 minutes instead of hanging
    part = tmp_path / ".vit_ms-check" / "train.part-0-of-2.json"
    with ThreadPoolExecutor(1) as pool:
        early = pool.submit(data.create_dataset, tmp_path, "train", RAW, 1, num_shards=2, shard_id=0, num_workers=1)
        while not part.exists():
            assert not early.done(), early.exception()
            time.sleep(0.02)
        _, late = data.create_dataset(tmp_path, "train", RAW, 1, num_shards=2, shard_id=1, num_workers=1)
        _, first = early.result(timeout=180)
    assert first.checked + late.checked == 9 and first.skipped == late.skipped
    assert sorted(p.name for p in part.parent.iterdir()) == ["train.json"]  # rank 0 merged and tidied up


def test_a_missing_rank_ends_the_wait_with_a_clear_error(tmp_path, monkeypatch):
    _make_split(tmp_path)
    monkeypatch.setenv("VIT_MS_CHECK_TIMEOUT", "1")
    owners_of_files = [manifest_module.owner(p.relative_to(tmp_path / "train").as_posix(), 2)
                       for p in data.list_images(tmp_path / "train")]
    assert set(owners_of_files) == {0, 1}
    with pytest.raises(DatasetError, match=r"rank 0 of 2: waited 1 s for the image check results of \d+ file\(s\) "
                                           r".* from rank\(s\) \[1\].*VIT_MS_CHECK_TIMEOUT"):
        data.create_dataset(tmp_path, "train", RAW, 2, num_shards=2, shard_id=0, num_workers=1)
    # What rank 0 checked is kept (its part file): after a plain start, the sharded ones need no wait.
    _, info = data.create_dataset(tmp_path, "train", RAW, 2, num_workers=1)
    assert info.checked == sorted(owners_of_files).count(1)
    for shard in (0, 1):
        assert data.create_dataset(tmp_path, "train", RAW, 1, num_shards=2, shard_id=shard)[1].checked == 0


def test_header_check_decodes_only_jpegs_without_their_end_marker(tmp_path, monkeypatch):
    whole = _noise_jpeg()
    decoded = []
    real_load = ImageFile.ImageFile.load  # the decode (Image.Image.load is also called for other reasons)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: decoded.append(1) or real_load(image))
    (tmp_path / "plain.jpg").write_bytes(whole)
    (tmp_path / "padded.jpg").write_bytes(whole + bytes(10))
    (tmp_path / "trailer.jpg").write_bytes(whole + b"ftypmp42" + bytes(300))  # like a phone's motion photo
    (tmp_path / "cut.jpg").write_bytes(whole[:-200])
    assert [data.check_image(tmp_path / name, "header") for name in ("plain.jpg", "padded.jpg")] == [None, None]
    assert decoded == []  # the end marker is there: no pixel decode
    assert data.check_image(tmp_path / "trailer.jpg", "header") is None and len(decoded) == 1
    assert "truncated" in data.check_image(tmp_path / "cut.jpg", "header").lower()


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    bomb = bomb_png()
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    (folder / "bomb.png").write_bytes(bomb)
    (folder / "ok.png").write_bytes(_png((5, 6, 7)))
    for mode in ("full", "header"):
        reason = data.check_image(folder / "bomb.png", mode)
        assert "decompression bomb" in reason and "1600000000 pixels" in reason, reason
        _, info = data.create_dataset(tmp_path, "train", RAW, 1, training=False, check=mode)
        assert _skipped(info) == ["bomb.png"] and info.num_images == 1
    with pytest.raises(UnreadableImageError, match=r"bomb\.png: decompression bomb"):
        data.load_image(folder / "bomb.png")
    # check="none" trusts the files, but the source still reads the header first and stops with the reason.
    dataset, _ = data.create_dataset(tmp_path, "train", RAW, 1, training=False, check="none", shuffle=False)
    with pytest.raises(RuntimeError, match=r"bomb\.png: .*decompression bomb.*check='header'"):
        for _ in dataset.create_tuple_iterator(output_numpy=True):
            pass
