"""timm's `VisionTransformer` names (`vit_base_patch16_224.*` safetensors / .pth), both ways.

Same structure as ours with PyTorch's LayerNorm names (weight/bias). A GAP model (`global_pool='avg'`)
has `fc_norm.*` and no final `norm.*` (timm makes it Identity); `class_token=False` removes `cls_token`
and the position embedding's CLS row. Checked against timm 1.0 `timm/models/vision_transformer.py`
(`VisionTransformer.__init__`: `self.norm = norm_layer(embed_dim) if final_norm and not use_fc_norm
else nn.Identity()`, `self.fc_norm = norm_layer(embed_dim) if final_norm and use_fc_norm else
nn.Identity()`). Export writes timm names for `timm.create_model(..., pretrained=False)` +
`load_state_dict`; the model must use timm's exact GELU and epsilon 1e-6 to match numerically.
"""
import logging

from . import WeightFormat
from ._rules import BLOCK, ln, rename, same, torch_norm_names, write_safetensors

logger = logging.getLogger(__name__)

RULES = [
    (r"(cls_token|pos_embed|patch_embed\.proj\.weight|patch_embed\.proj\.bias)", same("{}")),
    (BLOCK + r"(norm[12])\.(weight|bias)", ln("blocks.{}.{}")),
    (BLOCK + r"(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", same("blocks.{}.{}.{}")),
    (r"(norm|fc_norm)\.(weight|bias)", ln("{}")),
    (r"head\.(weight|bias)", same("head.{}")),
]


def recognise(names) -> bool:
    return (any(n.endswith(("norm1.weight", "norm.weight")) for n in names)
            or "patch_embed.proj.weight" in names)


def to_vit_ms(params):
    return rename(params, RULES)


def from_vit_ms(params):
    """Our names -> timm's: only the LayerNorm parameter names differ."""
    return torch_norm_names(params)


def export(params, config, preprocess, class_names, dst):
    differences = ["tanh GELU (timm's default: exact; act_layer)"] if config.gelu_approximate else []
    if config.norm_eps != 1e-6:
        differences.append(f"LayerNorm epsilon {config.norm_eps:g} (timm's default: 1e-6; norm_layer)")
    if differences:
        logger.warning("%s: this model uses %s; build the timm model with matching arguments", dst,
                       " and ".join(differences))
    return write_safetensors(from_vit_ms(params), dst, metadata={"format": "pt"})


FORMAT = WeightFormat(
    name="timm", description="timm VisionTransformer (.safetensors, .pth), incl. GAP and no-CLS variants",
    detected_by="`patch_embed.proj.weight` or LayerNorms named `norm1.weight`",
    recognise=recognise, to_vit_ms=to_vit_ms, export=export)
