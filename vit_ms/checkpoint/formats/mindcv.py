"""mindcv's ViT checkpoints (MindSpore `.ckpt`), both naming generations.

Checked against mindspore-lab/mindcv `mindcv/models/vit.py`:
- first generation (commits 0fb3f7721996c3d7c78e16729d688f8a5bf51528 and
  76b7a700a5d972e6034a465788b67962dfbc19fb; checkpoints `vit_b_32_224-7553218f.ckpt`, `vit_l_16_224-f02b2487.ckpt`,
  `vit_l_32_224-3a961018.ckpt`): `BaseClassifier(backbone=ViT, head=DenseHead)`, so the tutorial's layout under
  `backbone.` (`backbone.cls` and `backbone.pos_embedding`, Parameters named explicitly;
  `backbone.patch_embedding.conv.*`; `backbone.transformer.layers.N.{0,1}.cell.{0,1}.*`; `backbone.norm.*`)
  and `head.classifier.*` (with `has_logits`, a pre-logits `head.classifier.0.classifier.*` before
  `head.classifier.1.classifier.*`);
- second generation (the timm-style `VisionTransformer` rewrite; checkpoints `vit_b_32_224-4a1c9d8e.ckpt`,
  `vit_l_16_224-d2635f8b.ckpt`, `vit_l_32_224-8c8ea164.ckpt`): `patch_embed.proj.*`, `cls_token`, `pos_embed`,
  `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`, `norm.*` / `fc_norm.*`, `head.*` with
  MindSpore's gamma/beta: exactly our names, so such files are detected as "vit_ms"; pass `source="mindcv"`
  (convert.py --source mindcv) to get mindcv's numerics when converting.
The release numbers of the two generations could not be pinned from the indexed sources, only these commits.
Both generations build `nn.GELU()` (tanh form by default in MindSpore) and `nn.LayerNorm` (epsilon 1e-7).
"""
import re

from . import WeightFormat
from . import tutorial, vit_ms
from ._rules import rename, same

_OLD_HEAD = [
    (r"head\.classifier\.(weight|bias)", same("head.{}")),
    (r"head\.classifier\.1\.classifier\.(weight|bias)", same("head.{}")),
]
_PRE_LOGITS = re.compile(r"head\.classifier\.0\.classifier\.(weight|bias)")


def recognise(names) -> bool:
    return any(n.startswith(("backbone.transformer.layers.", "backbone.patch_embedding.")) for n in names)


def to_vit_ms(params):
    if not recognise(set(params)):  # second generation: our names
        return vit_ms.to_vit_ms(params)
    if any(_PRE_LOGITS.fullmatch(n) for n in params):
        # The head on top of a representation layer this ViT does not have: both are left out.
        dropped = {n: "pre-logits representation layer, which this ViT does not have" for n in params
                   if _PRE_LOGITS.fullmatch(n)}
        dropped.update({n: "head trained on top of the dropped pre-logits layer" for n in params
                        if n.startswith("head.classifier.1.")})
        params = {k: v for k, v in params.items() if k not in dropped}
    else:
        dropped = {}
    # `cls` and `pos_embedding` are Parameters named at creation; accept them with or without the prefix.
    body = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in params.items()
            if not k.startswith("head.")}
    out = rename(body, tutorial.RULES)
    head = rename({k: v for k, v in params.items() if k.startswith("head.")}, _OLD_HEAD)
    out.params.update(head.params)
    out.problems += head.problems
    out.dropped.update(dropped)
    return out


FORMAT = WeightFormat(
    name="mindcv", description="mindcv ViT checkpoints (.ckpt), first and second naming generation",
    detected_by="`backbone.transformer.layers.N.*` / `backbone.patch_embedding.*` (first generation); the "
                "second generation has our names and needs --source mindcv",
    recognise=recognise, to_vit_ms=to_vit_ms, norm_eps=1e-7, gelu_approximate=True, training_state=True)
