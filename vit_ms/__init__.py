"""vit_ms: Vision Transformer image classification in MindSpore.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
ICLR 2021. The public API::

    from vit_ms import ViTConfig, PRESETS, create_model
    net = create_model("vit_b_16", num_classes=10)

Names are imported on first use, so `vit_ms.config` and `vit_ms.cli` (and every script's `--help`) work
without paying MindSpore's few-second import.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "config": ["ViTConfig", "PRESETS", "Preprocess", "get_config", "count_parameters"],
    "model": ["ViT", "set_dynamic_batch"],
    "factory": ["create_model"],
    "checkpoint": ["load_weights", "resolve_pretrained"],
    "data": ["create_dataset", "ensure_sample_dataset", "load_image", "preprocess_image"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_MODULE_OF)


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'vit_ms' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
