"""An independent ViT built from PyTorch's own parts (torch.nn.MultiheadAttention, torch.nn.functional), the
one numerical reference of the tests and of `benchmarks/bench_model.py`. Needs `torch` (CPU), a test-time
and benchmark-time dependency only; vit_ms never imports it.

Options follow `ViTConfig`: `class_token` (a CLS token in front, covered by the position embedding) and
`global_pool` ("token": the CLS token after the final LayerNorm; "avg": the mean of the patch tokens, then
a LayerNorm `fc_norm`, with no final norm before pooling, as timm's VisionTransformer).
"""
import torch

from vit_ms import ViTConfig


class TorchViT(torch.nn.Module):
    """A ViT built from torch.nn parts, with torch.nn.MultiheadAttention doing the attention."""

    def __init__(self, c: ViTConfig):
        super().__init__()
        self.c = c
        self.conv = torch.nn.Conv2d(c.in_channels, c.embed_dim, c.patch_size, c.patch_size)
        prefix = 1 if c.class_token else 0
        self.cls = torch.nn.Parameter(torch.zeros(1, 1, c.embed_dim)) if c.class_token else None
        self.pos = torch.nn.Parameter(torch.randn(1, c.num_patches + prefix, c.embed_dim) * 0.02)
        self.ln1 = torch.nn.ModuleList(torch.nn.LayerNorm(c.embed_dim, eps=c.norm_eps) for _ in range(c.depth))
        self.mha = torch.nn.ModuleList(torch.nn.MultiheadAttention(c.embed_dim, c.num_heads, batch_first=True)
                                       for _ in range(c.depth))
        self.ln2 = torch.nn.ModuleList(torch.nn.LayerNorm(c.embed_dim, eps=c.norm_eps) for _ in range(c.depth))
        self.fc1 = torch.nn.ModuleList(torch.nn.Linear(c.embed_dim, c.mlp_dim) for _ in range(c.depth))
        self.fc2 = torch.nn.ModuleList(torch.nn.Linear(c.mlp_dim, c.embed_dim) for _ in range(c.depth))
        self.norm = torch.nn.LayerNorm(c.embed_dim, eps=c.norm_eps)  # before pooling ("token") or after ("avg")
        self.head = torch.nn.Linear(c.embed_dim, c.num_classes)

    def features(self, x, probs=None):
        """Tokens after the last block (before any final norm); appends each block's attention
        probabilities (B, heads, T, T) to the list `probs` if one is given."""
        F = torch.nn.functional
        x = self.conv(x).flatten(2).transpose(1, 2)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos
        for i in range(self.c.depth):
            h = self.ln1[i](x)
            attended, p = self.mha[i](h, h, h, need_weights=probs is not None, average_attn_weights=False)
            if probs is not None:
                probs.append(p)
            x = x + attended
            h = self.fc1[i](self.ln2[i](x))
            h = F.gelu(h, approximate="tanh" if self.c.gelu_approximate else "none")
            x = x + self.fc2[i](h)
        return x

    def forward(self, x):
        x = self.features(x)
        if self.c.global_pool == "avg":
            prefix = 1 if self.cls is not None else 0
            return self.head(self.norm(x[:, prefix:].mean(dim=1)))
        return self.head(self.norm(x)[:, 0])


def torch_names(ref: TorchViT) -> dict:
    """vit_ms parameter name -> TorchViT parameter name (mapped by hand, no vit_ms code involved)."""
    final = "fc_norm" if ref.c.global_pool == "avg" else "norm"
    names = {"patch_embed.proj.weight": "conv.weight", "patch_embed.proj.bias": "conv.bias",
             "pos_embed": "pos", f"{final}.gamma": "norm.weight", f"{final}.beta": "norm.bias",
             "head.weight": "head.weight", "head.bias": "head.bias"}
    if ref.cls is not None:
        names["cls_token"] = "cls"
    for i in range(ref.c.depth):
        b = f"blocks.{i}."
        names.update({
            b + "norm1.gamma": f"ln1.{i}.weight", b + "norm1.beta": f"ln1.{i}.bias",
            b + "attn.qkv.weight": f"mha.{i}.in_proj_weight", b + "attn.qkv.bias": f"mha.{i}.in_proj_bias",
            b + "attn.proj.weight": f"mha.{i}.out_proj.weight", b + "attn.proj.bias": f"mha.{i}.out_proj.bias",
            b + "norm2.gamma": f"ln2.{i}.weight", b + "norm2.beta": f"ln2.{i}.bias",
            b + "mlp.fc1.weight": f"fc1.{i}.weight", b + "mlp.fc1.bias": f"fc1.{i}.bias",
            b + "mlp.fc2.weight": f"fc2.{i}.weight", b + "mlp.fc2.bias": f"fc2.{i}.bias",
        })
    return names


def copy_to_torch(net, ref):
    """Copy a vit_ms ViT's weights into a TorchViT (in the TorchViT's dtype); every parameter must map."""
    p = {k: torch.from_numpy(v.asnumpy()) for k, v in net.parameters_and_names()}
    names = torch_names(ref)
    assert set(p) == set(names), sorted(set(p) ^ set(names))
    dtype = ref.head.weight.dtype
    missing, unexpected = ref.load_state_dict({names[k]: v.to(dtype) for k, v in p.items()}, strict=True)
    assert not missing and not unexpected
