"""vit_ms: Vision Transformer image classification in MindSpore.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
ICLR 2021. The public API::

    from vit_ms import ViTConfig, PRESETS, create_model
    net = create_model("vit_b_16", num_classes=10)
"""
from .config import PRESETS, Preprocess, ViTConfig, count_parameters, get_config
from .model import ViT, create_model, set_dynamic_batch
from .checkpoint import load_weights, resolve_pretrained
from .data import create_dataset, ensure_sample_dataset, load_image, preprocess_image

__version__ = "0.1.0"

__all__ = ["ViTConfig", "PRESETS", "Preprocess", "get_config", "count_parameters", "ViT", "create_model",
           "set_dynamic_batch", "load_weights", "resolve_pretrained", "create_dataset", "ensure_sample_dataset",
           "load_image", "preprocess_image"]
