"""Shared by the tests/test_checkpoint_*.py files: tiny configs, random nets, and PyTorch models with timm's
and torchvision's exact parameter names (independent references: built from torch.nn parts, not from timm or
torchvision, so a naming mistake of ours cannot hide behind the same mistake in the reference)."""
import collections
import dataclasses
import json
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file as save_safetensors_torch

from vit_ms import ViTConfig, create_model

TUTORIAL_KEYS = Path(__file__).parent / "data" / "tutorial_vit_b_16_keys.json"

# PyTorch conventions (timm / torchvision): exact GELU, epsilon 1e-6.
TINY = ViTConfig(image_size=32, patch_size=8, num_classes=10, embed_dim=64, depth=2, num_heads=4, mlp_dim=128)
TINY_TUTORIAL = dataclasses.replace(TINY, norm_eps=1e-7, gelu_approximate=True)
TINY_JAX = dataclasses.replace(TINY, gelu_approximate=True)  # Flax's nn.gelu is the tanh form


@pytest.fixture(autouse=True)
def _pynative():
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=previous)


def images(config, n=2, seed=1):
    return np.random.default_rng(seed).normal(size=(n, config.in_channels, config.image_size, config.image_size)).astype(np.float32)


def logits(net, x):
    net.set_train(False)
    return net(ms.Tensor(x)).asnumpy()


def random_net(config, seed=0):
    """A ViT whose every parameter (CLS token, head and LayerNorms included) is random."""
    net = create_model(config)
    rng = np.random.default_rng(seed)
    for name, p in net.parameters_and_names():
        value = rng.normal(0.0, 0.2, size=p.shape)
        if name.endswith("gamma"):
            value += 1.0
        p.set_data(ms.Tensor(value.astype(np.float32)))
    return net


def numpy_params(net):
    return {name: p.asnumpy().copy() for name, p in net.parameters_and_names()}


def assert_untouched(net, before):
    after = numpy_params(net)
    assert after.keys() == before.keys()
    for name in before:
        assert np.array_equal(after[name], before[name]), f"{name} changed by a failed load"


def save_ms(params: dict, path, append_dict=None, **options):
    """`params` ({name: array}) written by `ms.save_checkpoint`; `options` are its own (crc_check, enc_key, ...)."""
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(np.asarray(v, order="C"))} for k, v in params.items()],
                       str(path), append_dict=append_dict, **options)
    return path




def tutorial_names_for(depth):
    """The tutorial's key list, with its layer-0 entries repeated for `depth` layers."""
    keys = [name for name, _ in json.loads(TUTORIAL_KEYS.read_text())]
    layer0 = [k for k in keys if k.startswith("transformer.layers.0.")]
    others = [k for k in keys if not k.startswith("transformer.layers.")]
    return others + [k.replace("layers.0.", f"layers.{i}.", 1) for i in range(depth) for k in layer0]


# The tutorial's module tree (TUTORIAL.md): ResidualCell(cell=SequentialCell([LayerNorm, Attention]))
# and ResidualCell(cell=SequentialCell([LayerNorm, FeedForward])) per layer.
TUTORIAL_TO_OURS = {"cls": "cls_token", "pos_embedding": "pos_embed", "patch_embedding.conv.": "patch_embed.proj.",
                    "norm.": "norm.", "dense.": "head.", "0.cell.0.": "norm1.", "0.cell.1.qkv.": "attn.qkv.",
                    "0.cell.1.out.": "attn.proj.", "1.cell.0.": "norm2.", "1.cell.1.dense1.": "mlp.fc1.",
                    "1.cell.1.dense2.": "mlp.fc2."}


def ours_for_tutorial(name):
    if name.startswith("transformer.layers."):
        i, rest = name[len("transformer.layers."):].split(".", 1)
        prefix = next(k for k in TUTORIAL_TO_OURS if rest.startswith(k))
        return f"blocks.{i}." + TUTORIAL_TO_OURS[prefix] + rest[len(prefix):]
    prefix = next(k for k in TUTORIAL_TO_OURS if name.startswith(k))
    return TUTORIAL_TO_OURS[prefix] + name[len(prefix):]


class TimmAttention(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.num_heads = c.num_heads
        self.qkv = torch.nn.Linear(c.embed_dim, 3 * c.embed_dim)
        self.proj = torch.nn.Linear(c.embed_dim, c.embed_dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class TimmMlp(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1 = torch.nn.Linear(c.embed_dim, c.mlp_dim)
        self.fc2 = torch.nn.Linear(c.mlp_dim, c.embed_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class TimmBlock(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.attn = TimmAttention(c)
        self.norm2 = torch.nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.mlp = TimmMlp(c)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmPatchEmbed(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.proj = torch.nn.Conv2d(c.in_channels, c.embed_dim, c.patch_size, c.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimmViT(torch.nn.Module):
    """timm's VisionTransformer parameter names: cls_token, pos_embed, patch_embed.proj, blocks.{i}...."""

    def __init__(self, c):
        super().__init__()
        self.patch_embed = TimmPatchEmbed(c)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, c.num_patches + 1, c.embed_dim))
        self.blocks = torch.nn.ModuleList(TimmBlock(c) for _ in range(c.depth))
        self.norm = torch.nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.head = torch.nn.Linear(c.embed_dim, c.num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


class TorchvisionEncoderBlock(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.self_attention = torch.nn.MultiheadAttention(c.embed_dim, c.num_heads, batch_first=True)
        self.ln_2 = torch.nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(c.embed_dim, c.mlp_dim), torch.nn.GELU(), torch.nn.Dropout(0.0),
                                       torch.nn.Linear(c.mlp_dim, c.embed_dim), torch.nn.Dropout(0.0))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.self_attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TorchvisionEncoder(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.pos_embedding = torch.nn.Parameter(torch.zeros(1, c.num_patches + 1, c.embed_dim))
        self.layers = torch.nn.Sequential(collections.OrderedDict(
            (f"encoder_layer_{i}", TorchvisionEncoderBlock(c)) for i in range(c.depth)))
        self.ln = torch.nn.LayerNorm(c.embed_dim, eps=1e-6)

    def forward(self, x):
        return self.ln(self.layers(x + self.pos_embedding))


class TorchvisionViT(torch.nn.Module):
    """torchvision's VisionTransformer parameter names: class_token, conv_proj, encoder.*, heads.head."""

    def __init__(self, c):
        super().__init__()
        self.conv_proj = torch.nn.Conv2d(c.in_channels, c.embed_dim, c.patch_size, c.patch_size)
        self.class_token = torch.nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.encoder = TorchvisionEncoder(c)
        self.heads = torch.nn.Sequential(collections.OrderedDict(head=torch.nn.Linear(c.embed_dim, c.num_classes)))

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


def random_torch(cls, config, seed=0):
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.2)
            if name.endswith("weight") and p.ndim == 1:  # LayerNorm scales near 1
                p.add_(1.0)
    return model


def torch_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def save_state_dict(model, path, rename=None):
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if rename:
        sd = {rename(k): v for k, v in sd.items()}
    if path.suffix == ".safetensors":
        save_safetensors_torch(sd, str(path))
    else:
        torch.save(sd, str(path))
    return path


def old_torchvision_name(name):  # torchvision < 0.13 named the MLP's linears linear_1 / linear_2
    return name.replace(".mlp.0.", ".mlp.linear_1.").replace(".mlp.3.", ".mlp.linear_2.")
