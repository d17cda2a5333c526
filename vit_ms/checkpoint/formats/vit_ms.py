"""Our own names (also those of mindcv's second-generation ViT, which shares them).

`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`,
`norm.*` (or `fc_norm.*` with average pooling), `head.*`; LayerNorms as MindSpore's gamma/beta.
"""
from . import WeightFormat
from ._rules import BLOCK, rename

_RULES = [
    (r"cls_token|pos_embed|patch_embed\.proj\.(?:weight|bias)|head\.(?:weight|bias)|(?:fc_)?norm\.(?:gamma|beta)",
     lambda m: m.group(0)),
    (BLOCK + r"(norm[12]\.(?:gamma|beta)|attn\.(?:qkv|proj)\.(?:weight|bias)|mlp\.fc[12]\.(?:weight|bias))",
     lambda m: f"blocks.{m.group(1)}.{m.group(2)}"),
]


def recognise(names) -> bool:
    return any(n.endswith(("norm1.gamma", "norm.gamma")) for n in names)


def to_vit_ms(params):
    return rename(params, _RULES)


FORMAT = WeightFormat(
    name="vit_ms", description="vit_ms checkpoints (train.py, convert.py); weights-only files in our names",
    detected_by="the vit_ms_meta entry, or LayerNorms named `norm1.gamma`/`norm.gamma`",
    recognise=recognise, to_vit_ms=to_vit_ms, training_state=True)
