"""Time from process start to the first prediction: vit_ms cold and warm, beside PyTorch.

What a user waits for when they run a classifier once on one image: import the framework, build the
model, load its weights, read and preprocess one image, predict. vit_ms runs in MindSpore's graph mode,
which compiles the network on its first call; `vit_ms.graph_cache` keeps compiled graphs across
processes, so a second run skips most of that ("warm"). "cold" empties the graph cache first (the
compiled CPU kernels stay: they are built once per machine, not per run). PyTorch eager has nothing to
compile. Every run is a fresh process; the three kinds alternate round by round and each figure is the
median over rounds.

    python benchmarks/bench_start.py                       # ViT-B/16, 3 rounds
    python benchmarks/bench_start.py --preset vit_s_16 --rounds 5 --output outputs/bench_start.json

PyTorch is a benchmark-time dependency only; vit_ms never imports it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # vit_ms from this checkout; tests/torch_reference.py

# Each child prints one JSON line of seconds since the parent launched it: imported, built (weights
# loaded), predicted (first prediction done, compile included).
_VIT_MS_CHILD = r"""
import json, sys, time
launched = float(sys.argv[1]); ckpt, image = sys.argv[2], sys.argv[3]
import numpy as np
import mindspore as ms
from vit_ms import graph_cache
from vit_ms.checkpoint import load_model
from vit_ms.data import load_image, preprocess_image
from vit_ms.model import set_dynamic_batch
t_import = time.time()
ms.set_device("CPU")
ms.set_context(mode=ms.GRAPH_MODE)
net, meta = load_model(ckpt)
graph_cache.enable("bench_start", {"model": net.config.to_dict()})
set_dynamic_batch(net, net.config)
net.set_train(False)
t_built = time.time()
from vit_ms.config import Preprocess
x = preprocess_image(load_image(image), Preprocess.from_dict(meta["preprocess"]))[None]
top = int(net(ms.Tensor(x)).asnumpy().argmax())
t_done = time.time()
print(json.dumps({"import": t_import - launched, "build": t_built - launched, "predict": t_done - launched,
                  "top": top}))
"""

_TORCH_CHILD = r"""
import json, sys, time
launched = float(sys.argv[1]); weights, image, config = sys.argv[2], sys.argv[3], sys.argv[4]
import numpy as np
import torch
from PIL import Image
t_import = time.time()
sys.path[:0] = [sys.argv[5], sys.argv[5] + "/tests"]
from torch_reference import TorchViT
from vit_ms.config import ViTConfig
net = TorchViT(ViTConfig.from_dict(json.loads(config)))
net.load_state_dict(torch.load(weights))
net.eval()
t_built = time.time()
# The eval transform: short side to 256, center crop 224, ImageNet mean/std.
img = Image.open(image).convert("RGB")
w, h = img.size
s = 256 / min(w, h)
img = img.resize((round(w * s), round(h * s)), Image.BILINEAR)
w, h = img.size
l, t = (w - 224) // 2, (h - 224) // 2
a = np.asarray(img.crop((l, t, l + 224, t + 224)), np.float32) / 255
a = (a - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
with torch.inference_mode():
    top = int(net(torch.from_numpy(a.transpose(2, 0, 1)[None].copy())).argmax())
t_done = time.time()
print(json.dumps({"import": t_import - launched, "build": t_built - launched, "predict": t_done - launched,
                  "top": top}))
"""


def _run(code: str, args, env) -> dict:
    script = Path(env["BENCH_TMP"]) / "child.py"  # a file: MindSpore's graph cache needs an entry script
    script.write_text(code)
    launched = time.time()
    done = subprocess.run([sys.executable, str(script), str(launched), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise RuntimeError(f"child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _prepare(preset: str, tmp: Path):
    """A vit_ms checkpoint with random weights, the same weights for PyTorch, and one photo-sized JPEG."""
    import numpy as np
    import torch
    from PIL import Image
    from torch_reference import TorchViT, copy_to_torch
    from vit_ms import create_model
    from vit_ms.checkpoint import make_metadata, save_checkpoint

    net = create_model(preset, fast=False)
    ckpt = save_checkpoint(net, tmp / "model.ckpt", make_metadata(net.config))
    ref = TorchViT(net.config)
    copy_to_torch(net, ref)
    torch.save(ref.state_dict(), tmp / "model.pt")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(tmp / "image.jpg", quality=90)
    return ckpt, tmp / "model.pt", tmp / "image.jpg", json.dumps(net.config.to_dict())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--preset", default="vit_b_16", help="model preset (random weights)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians")
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench_start_"))
    try:
        home = tmp / "home"
        env = {**os.environ, "VIT_MS_HOME": str(home), "BENCH_TMP": str(tmp), "GLOG_v": "3",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        env.pop("VIT_MS_GRAPH_CACHE", None)
        ckpt, weights, image, config = _prepare(args.preset, tmp)
        _run(_VIT_MS_CHILD, [ckpt, image], env)  # builds the CPU kernels once, outside the timings
        runs = {"vit_ms cold": [], "vit_ms warm": [], "PyTorch eager": []}
        for _ in range(args.rounds):
            shutil.rmtree(home / "graphs", ignore_errors=True)
            runs["vit_ms cold"].append(_run(_VIT_MS_CHILD, [ckpt, image], env))
            runs["vit_ms warm"].append(_run(_VIT_MS_CHILD, [ckpt, image], env))
            runs["PyTorch eager"].append(_run(_TORCH_CHILD, [weights, image, config, ROOT], env))
        tops = {r["top"] for rs in runs.values() for r in rs}
        rows = []
        for name, rs in runs.items():
            med = {k: statistics.median(r[k] for r in rs) for k in ("import", "build", "predict")}
            spread = max(r["predict"] for r in rs) - min(r["predict"] for r in rs)
            rows.append({"run": name, **{k: round(v, 2) for k, v in med.items()},
                         "first_call": round(med["predict"] - med["build"], 2), "spread": round(spread, 2)})
        print(f"\n{args.preset}, batch 1, {args.rounds} round(s); seconds since process start (medians)\n")
        print("| run | imported | model built + weights loaded | first prediction | of which first call "
              "(preprocess + compile + run) | spread of first prediction |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['run']} | {r['import']:.2f} | {r['build']:.2f} | {r['predict']:.2f} | "
                  f"{r['first_call']:.2f} | {r['spread']:.2f} |")
        print(f"\nsame top-1 class in every run: {len(tops) == 1}")
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps({"preset": args.preset, "rows": rows}, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
