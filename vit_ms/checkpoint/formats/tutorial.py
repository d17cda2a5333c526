"""The MindSpore ViT tutorial's names (its pretrained `vit_b_16_224.ckpt`).

MindSpore's default numerics: tanh GELU (`nn.GELU()`) and LayerNorm epsilon 1e-7 (`nn.LayerNorm`).
"""
from . import WeightFormat
from ._rules import ln, rename, same

RULES = [
    (r"cls", same("cls_token")),
    (r"pos_embedding", same("pos_embed")),
    (r"patch_embedding\.conv\.(weight|bias)", same("patch_embed.proj.{}")),
    (r"transformer\.layers\.(\d+)\.0\.cell\.0\.(gamma|beta)", ln("blocks.{}.norm1")),
    (r"transformer\.layers\.(\d+)\.0\.cell\.1\.qkv\.(weight|bias)", same("blocks.{}.attn.qkv.{}")),
    (r"transformer\.layers\.(\d+)\.0\.cell\.1\.out\.(weight|bias)", same("blocks.{}.attn.proj.{}")),
    (r"transformer\.layers\.(\d+)\.1\.cell\.0\.(gamma|beta)", ln("blocks.{}.norm2")),
    (r"transformer\.layers\.(\d+)\.1\.cell\.1\.dense1\.(weight|bias)", same("blocks.{}.mlp.fc1.{}")),
    (r"transformer\.layers\.(\d+)\.1\.cell\.1\.dense2\.(weight|bias)", same("blocks.{}.mlp.fc2.{}")),
    (r"norm\.(gamma|beta)", ln("norm")),
    (r"dense\.(weight|bias)", same("head.{}")),
]


def recognise(names) -> bool:
    return any(n.startswith("transformer.layers.") for n in names) or {"cls", "pos_embedding"} <= names


def to_vit_ms(params):
    return rename(params, RULES)


FORMAT = WeightFormat(
    name="tutorial", description="the MindSpore ViT tutorial (vit_b_16_224.ckpt)",
    detected_by="`transformer.layers.N.*`, or `cls` with `pos_embedding`",
    recognise=recognise, to_vit_ms=to_vit_ms, norm_eps=1e-7, gelu_approximate=True, training_state=True)
