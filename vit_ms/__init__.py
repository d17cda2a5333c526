"""vit_ms: Vision Transformer image classification in MindSpore.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
ICLR 2021. The public API::

    from vit_ms import ViTConfig, PRESETS, create_model
    net = create_model("vit_b_16", num_classes=10)

Names are imported on first use, so `vit_ms.config` and `vit_ms.cli` (and every script's `--help`) work
without paying MindSpore's few-second import.
"""
from ._lazy import lazy_exports
from .threads import set_spin_default

# Before anything imports MindSpore (which loads libgomp): the OpenMP workers' spin (vit_ms.threads).
set_spin_default()

__version__ = "0.1.0"

_EXPORTS = {
    "config": ["ViTConfig", "PRESETS", "Preprocess", "get_config", "count_parameters"],
    "model": ["ViT", "set_dynamic_batch"],
    "factory": ["create_model"],
    "checkpoint": ["load_weights", "resolve_pretrained"],
    "data": ["create_dataset", "ensure_sample_dataset", "load_image", "preprocess_image"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
