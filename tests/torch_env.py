"""PyTorch-side set-up shared by the tests and the benchmarks (PyTorch, timm and torchvision are references
only: vit_ms never imports them)."""
import sys


def make_torchvision_importable():
    """Let timm import torchvision next to the CPU-only torch wheel.

    `pip install torch==2.13.0` takes the local `+cpu` wheel, while timm's dependency torchvision 0.28.0
    comes from PyPI, built against CUDA torch: its C extension does not load (libc10_cuda.so is missing),
    which torchvision tolerates everywhere except two unguarded fake-kernel registrations for
    `torchvision::nms` / `qnms` in `_meta_registrations.py`, so `import torchvision` (and timm) raises
    "operator torchvision::nms does not exist". Declaring those two schemas first makes the import succeed;
    neither the tests nor the benchmarks use a torchvision op (its PIL transforms need none). With a
    matching torchvision the first import succeeds and nothing is declared.
    """
    import torch

    try:
        import torchvision  # noqa: F401
    except RuntimeError as error:
        if "torchvision::nms does not exist" not in str(error):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        library = torch.library.Library("torchvision", "DEF")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        make_torchvision_importable.library = library  # the declarations live as long as the Library
        import torchvision  # noqa: F401,F811
