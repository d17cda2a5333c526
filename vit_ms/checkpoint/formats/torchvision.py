"""torchvision's `VisionTransformer` state dicts (`vit_b_16-c867db91.pth` and the others).

Fused `in_proj_weight` rows are q, k, v, as our qkv. torchvision >= 0.13 names the MLP's layers `mlp.0`
and `mlp.3`; older files say `mlp.linear_1` / `mlp.linear_2` (torchvision converts them on load, so do we).
"""
from . import WeightFormat
from ._rules import ln, rename, same

_LAYER = r"encoder\.layers\.encoder_layer_(\d+)\."
RULES = [
    (r"class_token", same("cls_token")),
    (r"conv_proj\.(weight|bias)", same("patch_embed.proj.{}")),
    (r"encoder\.pos_embedding", same("pos_embed")),
    (_LAYER + r"ln_1\.(weight|bias)", ln("blocks.{}.norm1")),
    (_LAYER + r"self_attention\.in_proj_(weight|bias)", same("blocks.{}.attn.qkv.{}")),
    (_LAYER + r"self_attention\.out_proj\.(weight|bias)", same("blocks.{}.attn.proj.{}")),
    (_LAYER + r"ln_2\.(weight|bias)", ln("blocks.{}.norm2")),
    (_LAYER + r"mlp\.(?:0|linear_1)\.(weight|bias)", same("blocks.{}.mlp.fc1.{}")),
    (_LAYER + r"mlp\.(?:3|linear_2)\.(weight|bias)", same("blocks.{}.mlp.fc2.{}")),
    (r"encoder\.ln\.(weight|bias)", ln("norm")),
    (r"heads\.head\.(weight|bias)", same("head.{}")),
]


def recognise(names) -> bool:
    return "class_token" in names or any(n.startswith(("encoder.layers.encoder_layer_", "conv_proj."))
                                         for n in names)


def to_vit_ms(params):
    return rename(params, RULES)


FORMAT = WeightFormat(
    name="torchvision", description="torchvision.models.vit_* state dicts (.pth)",
    detected_by="`class_token`, `conv_proj.*` or `encoder.layers.encoder_layer_N.*`",
    recognise=recognise, to_vit_ms=to_vit_ms)
