"""An independent ViT built from PyTorch's own parts (torch.nn.MultiheadAttention, torch.nn.functional),
used only by the tests as a numerical reference. Needs `torch==2.13.0` (CPU), a test-time dependency."""
import numpy as np
import torch

from vit_ms import ViTConfig


class TorchViT(torch.nn.Module):
    """A ViT built from torch.nn parts, with torch.nn.MultiheadAttention doing the attention."""

    def __init__(self, c: ViTConfig):
        super().__init__()
        self.c = c
        self.conv = torch.nn.Conv2d(c.in_channels, c.embed_dim, c.patch_size, c.patch_size)
        self.cls = torch.nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos = torch.nn.Parameter(torch.zeros(1, c.num_patches + 1, c.embed_dim))
        self.ln1 = torch.nn.ModuleList(torch.nn.LayerNorm(c.embed_dim, eps=c.norm_eps) for _ in range(c.depth))
        self.mha = torch.nn.ModuleList(torch.nn.MultiheadAttention(c.embed_dim, c.num_heads, batch_first=True)
                                       for _ in range(c.depth))
        self.ln2 = torch.nn.ModuleList(torch.nn.LayerNorm(c.embed_dim, eps=c.norm_eps) for _ in range(c.depth))
        self.fc1 = torch.nn.ModuleList(torch.nn.Linear(c.embed_dim, c.mlp_dim) for _ in range(c.depth))
        self.fc2 = torch.nn.ModuleList(torch.nn.Linear(c.mlp_dim, c.embed_dim) for _ in range(c.depth))
        self.norm = torch.nn.LayerNorm(c.embed_dim, eps=c.norm_eps)
        self.head = torch.nn.Linear(c.embed_dim, c.num_classes)

    def forward(self, x):
        F = torch.nn.functional
        x = self.conv(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for i in range(self.c.depth):
            h = self.ln1[i](x)
            x = x + self.mha[i](h, h, h, need_weights=False)[0]
            h = self.fc1[i](self.ln2[i](x))
            h = F.gelu(h, approximate="tanh" if self.c.gelu_approximate else "none")
            x = x + self.fc2[i](h)
        return self.head(self.norm(x)[:, 0])


def copy_to_torch(net, ref):
    """Copy a vit_ms ViT's weights into a TorchViT (names mapped by hand, no vit_ms code involved)."""
    p = {k: torch.from_numpy(v.asnumpy()) for k, v in net.parameters_and_names()}
    sd = {"conv.weight": p["patch_embed.proj.weight"], "conv.bias": p["patch_embed.proj.bias"],
          "cls": p["cls_token"], "pos": p["pos_embed"], "norm.weight": p["norm.gamma"],
          "norm.bias": p["norm.beta"], "head.weight": p["head.weight"], "head.bias": p["head.bias"]}
    for i in range(ref.c.depth):
        b = f"blocks.{i}."
        sd.update({
            f"ln1.{i}.weight": p[b + "norm1.gamma"], f"ln1.{i}.bias": p[b + "norm1.beta"],
            f"mha.{i}.in_proj_weight": p[b + "attn.qkv.weight"], f"mha.{i}.in_proj_bias": p[b + "attn.qkv.bias"],
            f"mha.{i}.out_proj.weight": p[b + "attn.proj.weight"], f"mha.{i}.out_proj.bias": p[b + "attn.proj.bias"],
            f"ln2.{i}.weight": p[b + "norm2.gamma"], f"ln2.{i}.bias": p[b + "norm2.beta"],
            f"fc1.{i}.weight": p[b + "mlp.fc1.weight"], f"fc1.{i}.bias": p[b + "mlp.fc1.bias"],
            f"fc2.{i}.weight": p[b + "mlp.fc2.weight"], f"fc2.{i}.bias": p[b + "mlp.fc2.bias"],
        })
    missing, unexpected = ref.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
