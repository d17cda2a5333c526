"""Checkpoints, the named model zoo: downloads over a loopback HTTP server (cached once, hash verified, a
corrupted download rejected with nothing left in the cache, an offline failure naming the URL and where to
put the file by hand), `create_pretrained`, the `list` command, and the AugReg entries checked against
timm's own pretrained configs."""
import dataclasses
import functools
import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import timm

from checkpoint_helpers import TINY, _pynative, images, logits, numpy_params, random_net  # noqa: F401
from vit_ms import resolve_pretrained
import vit_ms
from vit_ms.checkpoint import ZOO, Weights, create_pretrained, default_cache_dir, download_weights
from vit_ms.config import PRESETS

REPO = Path(__file__).resolve().parents[1]



@pytest.fixture
def http_root(tmp_path):
    """A loopback HTTP server over a folder; yields (folder, base URL)."""
    root = tmp_path / "server"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/vision/classification"
    server.shutdown()
    server.server_close()


def test_named_pretrained_is_downloaded_once_into_the_cache(tmp_path, http_root):
    root, base_url = http_root
    payload = np.random.default_rng(0).bytes(300_000)
    (root / "vision" / "classification").mkdir(parents=True)
    (root / "vision" / "classification" / "vit_b_16_224.ckpt").write_bytes(payload)
    cache = tmp_path / "cache"
    path = resolve_pretrained("vit_b_16_224", cache_dir=cache, base_url=base_url)
    assert path == cache / "vit_b_16_224.ckpt" and path.read_bytes() == payload
    (root / "vision" / "classification" / "vit_b_16_224.ckpt").unlink()  # the cache needs no server
    assert resolve_pretrained("vit_b_16_224", cache_dir=cache, base_url=base_url) == path
    assert resolve_pretrained(str(path)) == path  # a path is returned as is


@pytest.mark.parametrize("why", ["refused", "not_found"])
def test_failed_download_says_where_to_put_the_file(tmp_path, http_root, why):
    _, base_url = http_root
    if why == "refused":
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            base_url = f"http://127.0.0.1:{s.getsockname()[1]}/x"
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError) as error:
        resolve_pretrained("vit_b_16_224", cache_dir=cache, base_url=base_url)
    message = str(error.value)
    assert f"{base_url}/vit_b_16_224.ckpt" in message
    assert f"put it at {cache / 'vit_b_16_224.ckpt'}" in message
    assert not (cache / "vit_b_16_224.ckpt").exists()


def _serve(root: Path, name: str, payload: bytes) -> None:
    (root / "w").mkdir(exist_ok=True)
    (root / "w" / name).write_bytes(payload)


def _entry(base_url: str, name: str, sha256=None, **kwargs) -> Weights:
    return Weights(url=f"{base_url.rsplit('/vision', 1)[0]}/w/{name}", preset="vit_b_16", source="timm",
                   sha256=sha256, **kwargs)


def test_a_download_is_verified_against_the_publishers_hash(tmp_path, http_root):
    root, base_url = http_root
    payload = np.random.default_rng(1).bytes(200_000)
    _serve(root, "good-1a2b3c4d.pth", payload)
    digest = hashlib.sha256(payload).hexdigest()
    cache = tmp_path / "cache"
    for published in (digest, digest[:8]):  # a full SHA-256, or torchvision's 8-digit prefix
        path = download_weights(_entry(base_url, "good-1a2b3c4d.pth", published), cache)
        assert path == cache / "good-1a2b3c4d.pth" and path.read_bytes() == payload
        path.unlink()


def test_a_corrupted_download_is_rejected_and_nothing_is_left_in_the_cache(tmp_path, http_root):
    root, base_url = http_root
    payload = np.random.default_rng(2).bytes(200_000)
    digest = hashlib.sha256(payload).hexdigest()
    _serve(root, "vit-c867db91.pth", payload[:-1] + bytes([payload[-1] ^ 1]))  # one bit changed in transit
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(RuntimeError) as error:
        download_weights(_entry(base_url, "vit-c867db91.pth", digest[:8]), cache)
    assert f"the publisher's is {digest[:8]}" in str(error.value) and "was deleted" in str(error.value)
    assert f"put it at {cache / 'vit-c867db91.pth'}" in str(error.value)
    assert list(cache.iterdir()) == []  # no file under the final name, no temporary


def test_offline_download_names_the_url_and_where_to_put_the_file(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url_base = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("VIT_MS_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(ZOO, "tiny_test", _entry(url_base + "/vision", "tiny.safetensors"))
    with pytest.raises(RuntimeError) as error:
        resolve_pretrained("tiny_test")
    target = tmp_path / "home" / "weights" / "tiny.safetensors"
    assert f"from {url_base}/w/tiny.safetensors" in str(error.value)
    assert f"put it at {target}" in str(error.value) and not target.exists()


def test_create_pretrained_downloads_and_loads_an_entry(tmp_path, http_root, monkeypatch):
    from safetensors.numpy import save_file

    root, base_url = http_root
    net = random_net(TINY, seed=3)
    timm_names = {k.replace(".gamma", ".weight").replace(".beta", ".bias"): v for k, v in numpy_params(net).items()}
    save_file(timm_names, str(tmp_path / "t.safetensors"))
    payload = (tmp_path / "t.safetensors").read_bytes()
    _serve(root, "tiny-timm.safetensors", payload)
    monkeypatch.setitem(PRESETS, "tiny_test", dataclasses.replace(TINY, image_size=224))
    entry = dataclasses.replace(_entry(base_url, "tiny-timm.safetensors", hashlib.sha256(payload).hexdigest()),
                                preset="tiny_test", image_size=32)
    monkeypatch.setitem(ZOO, "tiny_test", entry)
    loaded = create_pretrained("tiny_test", cache_dir=tmp_path / "cache")
    assert loaded.config == TINY  # the entry's image size and timm's numerics
    np.testing.assert_array_equal(logits(loaded, images(TINY)), logits(net, images(TINY)))
    assert entry.preprocess().crop_pct == 0.875  # not published for this entry: the documented default

    # The public spelling, from the one cache root: vit_ms.create_model(name, pretrained=NAME).
    monkeypatch.setenv("VIT_MS_HOME", str(tmp_path / "home"))
    again = vit_ms.create_model("tiny_test", pretrained="tiny_test")
    assert (tmp_path / "home" / "weights" / "tiny-timm.safetensors").is_file()
    np.testing.assert_array_equal(logits(again, images(TINY)), logits(net, images(TINY)))
    with pytest.raises(ValueError, match="are a tiny_test, not 'vit_b_16'"):
        vit_ms.create_model("vit_b_16", pretrained="tiny_test")


def test_default_cache_is_the_weights_folder_of_the_one_cache_root(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="neither a file nor a named pretrained checkpoint.*vit_b_16_224"):
        resolve_pretrained("vit_z_99")
    monkeypatch.setenv("VIT_MS_HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / "weights"


# ---------------------------------------------------------------------------------------------------
# The table itself
# ---------------------------------------------------------------------------------------------------

def test_augreg_entries_agree_with_timms_pretrained_configs():
    timm_names = {"vit_ti_16": "vit_tiny_patch16", "vit_s_16": "vit_small_patch16", "vit_b_16": "vit_base_patch16",
                  "vit_l_16": "vit_large_patch16"}
    augreg = {name: w for name, w in ZOO.items() if name.startswith("augreg_")}
    assert len(augreg) == 8  # Ti, S, B, L at 224 and 384
    for name, w in augreg.items():
        cfg = timm.models.get_pretrained_cfg(f"{timm_names[w.preset]}_{w.image_size}.augreg_in21k_ft_in1k")
        assert (w.url, w.crop_pct, w.interpolation) == (cfg.url, cfg.crop_pct, cfg.interpolation), name
        assert (w.mean, w.std, w.image_size) == (tuple(cfg.mean), tuple(cfg.std), cfg.input_size[1]), name


def test_every_entry_names_a_preset_a_scheme_and_its_source():
    from vit_ms.checkpoint import FORMATS

    for name, w in ZOO.items():
        assert w.preset in PRESETS and w.source in FORMATS and w.reference, name
        assert w.config().image_size == w.image_size
        if "download.pytorch.org" in w.url:  # torchvision's URLs end in the hash prefix torch.hub checks
            assert w.url.endswith(f"-{w.sha256}.pth"), name


def test_list_command_prints_the_zoo():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "vit_ms.checkpoint", "list"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name, w in ZOO.items():
        assert f"| {name} | {w.preset} |" in result.stdout and w.url in result.stdout
