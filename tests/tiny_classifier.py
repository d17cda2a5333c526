"""Shared by the eval / infer / export tests: a tiny random ViT, its checkpoint, and images to feed it."""
import os
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
from PIL import Image

from vit_ms import ViTConfig, create_model
from vit_ms.checkpoint import make_metadata, save_checkpoint

REPO = Path(__file__).resolve().parent.parent
# Tanh GELU so that the same model also exports to ONNX (MindSpore's exporter has no Erf).
TINY = ViTConfig(image_size=32, patch_size=8, num_classes=6, embed_dim=64, depth=2, num_heads=4, mlp_dim=128,
                 gelu_approximate=True)
# Deliberately not in sorted order: the class order is the checkpoint's, not the folders' sort order.
CLASS_NAMES = ["zebra", "apple", "cat's eye", "dog", "bird nest", "eel"]


def random_net(config: ViTConfig = TINY, seed: int = 0):
    """A ViT whose every parameter is random (the default init zeroes the head: uniform predictions)."""
    net = create_model(config)
    rng = np.random.default_rng(seed)
    for p in net.get_parameters():
        scale = 1.0 if "gamma" in p.name else 0.15
        value = rng.standard_normal(p.shape) * scale + (1.0 if "gamma" in p.name else 0.0)
        p.set_data(ms.Tensor(value.astype(np.float32)))
    net.set_train(False)
    return net


def write_checkpoint(path, config: ViTConfig = TINY, class_names=CLASS_NAMES, seed: int = 0) -> Path:
    return save_checkpoint(random_net(config, seed), path, make_metadata(config, class_names))


def random_image(rng, size=(48, 40), tint=None) -> Image.Image:
    """A noisy RGB image, optionally tinted so that images of one class share a colour."""
    pixels = rng.integers(0, 256, (size[1], size[0], 3)).astype(np.float64)
    if tint is not None:
        pixels = 0.5 * pixels + 0.5 * np.asarray(tint, np.float64)
    return Image.fromarray(pixels.astype(np.uint8))


def run_cli(script: str, *args, cwd) -> subprocess.CompletedProcess:
    """Run a top-level script with this interpreter, as a user would, from `cwd` (never the repo)."""
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
