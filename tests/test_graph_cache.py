"""The compiled-graph cache: keys that change with everything that shapes a graph, and cached graphs that
compute exactly what a fresh compile computes, whatever weights the network holds."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


from vit_ms import graph_cache

ROOT = Path(__file__).resolve().parent.parent


def test_key_is_stable_and_changes_with_each_input(monkeypatch, tmp_path):
    base = graph_cache.cache_key("infer", {"model": {"depth": 2}, "batch": 8})
    assert base == graph_cache.cache_key("infer", {"batch": 8, "model": {"depth": 2}})  # order-free
    assert base != graph_cache.cache_key("train", {"model": {"depth": 2}, "batch": 8})
    assert base != graph_cache.cache_key("infer", {"model": {"depth": 3}, "batch": 8})

    # A changed vit_ms source: digest a copy of the package with one byte changed.
    package = ROOT / "vit_ms"
    copy = tmp_path / "vit_ms"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert graph_cache.source_digest(str(copy)) == graph_cache.source_digest(str(package))
    (copy / "model.py").write_bytes((copy / "model.py").read_bytes() + b"\n# edited\n")
    changed = graph_cache.source_digest(str(copy))
    assert changed != graph_cache.source_digest(str(package))
    monkeypatch.setattr(graph_cache, "source_digest", lambda: changed)
    assert graph_cache.cache_key("infer", {"model": {"depth": 2}, "batch": 8}) != base
    monkeypatch.undo()

    monkeypatch.setattr(graph_cache, "_mindspore_version", lambda: "9.9.9")
    assert graph_cache.cache_key("infer", {"model": {"depth": 2}, "batch": 8}) != base
    monkeypatch.undo()
    monkeypatch.setattr(graph_cache, "cpu_description", lambda: "x86_64 Other CPU avx2")
    assert graph_cache.cache_key("infer", {"model": {"depth": 2}, "batch": 8}) != base
    monkeypatch.undo()
    # Flip the switch from whatever this run has (the suite may itself run with VIT_MS_FUSED_KERNELS=0).
    monkeypatch.setenv("VIT_MS_FUSED_KERNELS", "1" if os.environ.get("VIT_MS_FUSED_KERNELS") == "0" else "0")
    assert graph_cache.cache_key("infer", {"model": {"depth": 2}, "batch": 8}) != base


def test_no_cache_without_an_entry_script(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["-c"])
    monkeypatch.delenv(graph_cache.SWITCH_ENV, raising=False)
    monkeypatch.delenv("MS_COMPILER_CACHE_PATH", raising=False)
    assert graph_cache.enable("infer") is None
    assert "MS_COMPILER_CACHE_PATH" not in os.environ


def test_switched_off_sets_nothing(monkeypatch):
    monkeypatch.setenv(graph_cache.SWITCH_ENV, "0")
    monkeypatch.delenv("MS_COMPILER_CACHE_PATH", raising=False)
    assert graph_cache.enable("infer") is None
    assert "MS_COMPILER_CACHE_PATH" not in os.environ


def test_prune_keeps_the_newest(tmp_path):
    for i in range(5):
        folder = tmp_path / f"k{i}"
        folder.mkdir()
        os.utime(folder, (1000 + i, 1000 + i))
    graph_cache._prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k3", "k4"]


_RUN = """
import gc, json, sys
import numpy as np
import mindspore as ms
from vit_ms import create_model, graph_cache, set_dynamic_batch
seed, use_cache = int(sys.argv[1]), sys.argv[2] == "1"
folder = graph_cache.enable("test", {"seed-independent": True}) if use_cache else None
ms.set_device("CPU")
ms.set_context(mode=ms.GRAPH_MODE)
net = create_model("vit_ti_16", num_classes=5, image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                   mlp_dim=64)
rng = np.random.default_rng(seed)
for p in net.get_parameters():
    p.set_data(ms.Tensor((0.1 * rng.standard_normal(p.shape)).astype(np.float32)))
set_dynamic_batch(net, net.config)
net.set_train(False)
x = ms.Tensor(np.random.default_rng(7).standard_normal((3, 3, 32, 32)).astype(np.float32))
print(json.dumps({"folder": str(folder), "logits": net(x).asnumpy().tolist(), "frozen": gc.get_freeze_count()}))
"""


def _run(script: Path, seed: int, use_cache: bool, env: dict) -> dict:
    done = subprocess.run([sys.executable, str(script), str(seed), "1" if use_cache else "0"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_cached_graph_computes_what_a_fresh_compile_computes(tmp_path):
    env = {**os.environ, "VIT_MS_HOME": str(tmp_path / "home"), "GLOG_v": "3",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop(graph_cache.SWITCH_ENV, None)
    script = tmp_path / "run.py"  # MindSpore's cache hashes the entry script: `python -c` has none
    script.write_text(_RUN)
    cold = _run(script, 1, True, env)
    folder = Path(cold["folder"])
    assert folder.parent == tmp_path / "home" / "graphs"
    assert list(folder.rglob("*.mindir")), "no graph was cached"
    # Same key, other weights: the cached graph must run the new parameters, bit for bit as uncached.
    warm = _run(script, 2, True, env)
    assert warm["folder"] == cold["folder"]
    fresh = _run(script, 2, False, env)
    assert warm["logits"] == fresh["logits"]
    assert warm["logits"] != cold["logits"]
    # With the cache the process's objects were frozen for MindSpore's gc.collect() before each compile.
    assert cold["frozen"] > 0 and warm["frozen"] > 0 and fresh["frozen"] == 0


_CLASSIFY = """
import json, os, sys
import numpy as np
import mindspore as ms
from vit_ms.evaluate import load_classifier, run_batch
ckpt, mode, cache = sys.argv[1], sys.argv[2], sys.argv[3] == "cache"
ms.set_device("CPU")
ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
classifier = load_classifier(ckpt, cache_graphs=cache, pack_weights="pack" in sys.argv[4:],
                             batch_size=2 if "fixed" in sys.argv[4:] else None)
x = np.random.default_rng(7).standard_normal((2, 3, 32, 32)).astype(np.float32)
print(json.dumps({"folder": os.environ.get("MS_COMPILER_CACHE_PATH"),
                  "logits": run_batch(classifier, x).tolist()}))
"""


def test_load_classifier_caches_graphs_per_model_and_options(tmp_path):
    """eval.py and infer.py get the cache through `load_classifier(cache_graphs=True)`: in graph mode, keyed
    by the model, the script's option names (which change the graphs compiled), whether the weights are
    packed (infer.py's small batches: the same graph but for a kernel setting) and the batch size of a
    fixed-batch graph; not in PyNative, and not unless asked (the cache is process-wide)."""
    from vit_ms import create_model
    from vit_ms.checkpoint import make_metadata, save_checkpoint

    net = create_model("vit_ti_16", num_classes=5, image_size=32, patch_size=8, embed_dim=32, depth=1,
                       num_heads=2, mlp_dim=64, fast=False)
    ckpt = save_checkpoint(net, tmp_path / "tiny.ckpt", make_metadata(net.config))
    env = {**os.environ, "VIT_MS_HOME": str(tmp_path / "home"), "GLOG_v": "3",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop(graph_cache.SWITCH_ENV, None)
    env.pop("MS_COMPILER_CACHE_PATH", None)
    script = tmp_path / "classify.py"
    script.write_text(_CLASSIFY)

    def run(*args, env=env):
        done = subprocess.run([sys.executable, str(script), str(ckpt), *args], env=env, capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    assert run("graph", "no-cache")["folder"] is None
    cold = run("graph", "cache")
    folder = Path(cold["folder"])
    assert folder.parent == tmp_path / "home" / "graphs"
    assert list(folder.rglob("*.mindir")), "no graph was cached"
    warm = run("graph", "cache")
    assert warm == cold  # same folder, the same logits from the cached graph
    other = run("graph", "cache", "--attention")
    assert other["folder"] != cold["folder"]
    # Packed weights (they need the fused kernels, also in a run with VIT_MS_FUSED_KERNELS=0): no option name
    # differs, the key's "packed" must.
    fused = {k: v for k, v in env.items() if k != "VIT_MS_FUSED_KERNELS"}
    plain, packed = run("graph", "cache", env=fused), run("graph", "cache", "pack", env=fused)
    assert packed["folder"] not in (plain["folder"], other["folder"])
    # The cached graph gives what the fresh compile gave (whose logits test_packing.py bounds).
    assert run("graph", "cache", "pack", env=fused) == packed
    # A graph for one batch size (infer.py where every batch has it): no option name differs, the key must.
    fixed = run("graph", "cache", "fixed")
    assert fixed["folder"] not in (plain["folder"], packed["folder"], other["folder"], cold["folder"])
    assert run("graph", "cache", "fixed") == fixed
    assert run("pynative", "cache")["folder"] is None
