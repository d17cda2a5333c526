"""Time from process start to the first prediction: vit_ms cold and warm, beside PyTorch.

What a user waits for when they run a classifier once on one image: import the framework, build the
model, load its weights, read and preprocess one image, predict. vit_ms runs in MindSpore's graph mode,
which compiles the network on its first call; `vit_ms.evaluate.load_classifier(cache_graphs=True)` (as
eval.py and infer.py call it) turns on `vit_ms.graph_cache`, which keeps compiled graphs across processes,
so a second run skips most of that ("warm"). "cold" empties the graph cache first (the compiled CPU
kernels stay: they are built once per machine, not per run). PyTorch eager has nothing to compile. The
vit_ms child times the graph compile (`Cell.compile`) on its own, so the table shows the warm compile as
a share of the cold one.

The real command is timed too: `python infer.py --checkpoint ... --input IMAGE --no-annotate` as a user
runs it, cold and warm, wall time from launch to exit (its start-up, logging and output included).

Every run is a fresh process; the kinds alternate round by round and each figure is the median over
rounds, with the spread (max - min) of the total.

    python benchmarks/bench_start.py                       # ViT-B/16, 3 rounds
    python benchmarks/bench_start.py --preset vit_ti_16 --rounds 5 --output outputs/bench_start.json

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
import vit_ms  # first, as every script: its OpenMP defaults must reach libgomp before MindSpore loads it
import numpy as np
import mindspore as ms
from vit_ms.data import load_image, preprocess_image
from vit_ms.evaluate import load_classifier
t_import = time.time()
ms.set_device("CPU")
ms.set_context(mode=ms.GRAPH_MODE)
# as infer.py loads for one image: graph cache on, weights packed, a graph for batches of 1
classifier = load_classifier(ckpt, cache_graphs=True, pack_weights=True, batch_size=1)
t_built = time.time()
x = ms.Tensor(preprocess_image(load_image(image), classifier.preprocess)[None])
t = time.time()
classifier.net.compile(x)
t_compiled = time.time()
top = int(classifier.net(x).asnumpy().argmax())
t_done = time.time()
print(json.dumps({"import": t_import - launched, "build": t_built - launched, "predict": t_done - launched,
                  "compile": t_compiled - t, "top": top}))
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


def _run_infer(ckpt, image, env) -> dict:
    """Wall time of the real infer.py on one image, launch to exit; its top-1 class from --json."""
    out = Path(env["BENCH_TMP"]) / "infer_out"
    command = [sys.executable, str(ROOT / "infer.py"), "--checkpoint", str(ckpt), "--input", str(image),
               "--no-annotate", "--json", "--top_k", "1"]
    launched = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=env["BENCH_TMP"])
    total = time.time() - launched
    if done.returncode:
        raise RuntimeError(f"infer.py failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return {"total": total, "top": result["predictions"][0]["top_k"][0]["index"]}


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
    parser.add_argument("--no-command", action="store_true", help="leave out the infer.py command runs")
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
        commands = {"infer.py cold": [], "infer.py warm": []}
        for _ in range(args.rounds):
            shutil.rmtree(home / "graphs", ignore_errors=True)
            runs["vit_ms cold"].append(_run(_VIT_MS_CHILD, [ckpt, image], env))
            runs["vit_ms warm"].append(_run(_VIT_MS_CHILD, [ckpt, image], env))
            runs["PyTorch eager"].append(_run(_TORCH_CHILD, [weights, image, config, ROOT], env))
            if not args.no_command:
                shutil.rmtree(home / "graphs", ignore_errors=True)
                commands["infer.py cold"].append(_run_infer(ckpt, image, env))
                commands["infer.py warm"].append(_run_infer(ckpt, image, env))
        tops = {r["top"] for rs in (*runs.values(), *commands.values()) for r in rs}
        rows = []
        for name, rs in runs.items():
            med = {k: statistics.median(r[k] for r in rs) for k in ("import", "build", "predict")}
            med["compile"] = statistics.median(r["compile"] for r in rs) if "compile" in rs[0] else None
            spread = max(r["predict"] for r in rs) - min(r["predict"] for r in rs)
            rows.append({"run": name, **{k: (None if v is None else round(v, 2)) for k, v in med.items()},
                         "first_call": round(med["predict"] - med["build"], 2), "spread": round(spread, 2)})
        print(f"\n{args.preset}, batch 1, {args.rounds} round(s); seconds since process start (medians)\n")
        print("| run | imported | model built + weights loaded | graph compile | first prediction | of which "
              "first call (preprocess + compile + run) | spread of first prediction |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            compile_s = "-" if r["compile"] is None else f"{r['compile']:.2f}"
            print(f"| {r['run']} | {r['import']:.2f} | {r['build']:.2f} | {compile_s} | {r['predict']:.2f} | "
                  f"{r['first_call']:.2f} | {r['spread']:.2f} |")
        cold, warm = rows[0]["compile"], rows[1]["compile"]
        print(f"\nwarm compile / cold compile: {warm / cold:.0%} (target <= 20%)")
        command_rows = []
        if not args.no_command:
            print("\n| command | wall time s (median) | spread s |\n|---|---|---|")
            for name, rs in commands.items():
                totals = [r["total"] for r in rs]
                command_rows.append({"run": name, "total": round(statistics.median(totals), 2),
                                     "spread": round(max(totals) - min(totals), 2)})
                print(f"| python infer.py --checkpoint CKPT --input IMAGE --no-annotate ({name.split()[-1]}) | "
                      f"{command_rows[-1]['total']:.2f} | {command_rows[-1]['spread']:.2f} |")
        print(f"\nsame top-1 class in every run: {len(tops) == 1}")
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps({"preset": args.preset, "rows": rows,
                                                     "commands": command_rows}, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
