"""Checkpoints against the real reference packages: tiny random `transformers` ViTs (ViTForImageClassification
and ViTModel, through a save_pretrained folder) and tiny random `timm` ViTs (CLS token, and the GAP variants
with `global_pool='avg'`, with and without a class token) load with the reference's own outputs; exports back
to timm and HF load into the real packages with the same logits, and round trips are exact.

Tolerance: both sides compute in float32 from identical weights but with different op orders (fused qkv vs
three matmuls, MindSpore vs oneDNN GEMM blocking, erf GELU implementations). Each matmul over K <= 128 terms
has a relative rounding error of at most about K * 2**-24 ~ 8e-6 (typically sqrt(K) * 2**-24 ~ 7e-7);
LayerNorm and softmax keep relative errors of that order. Through two blocks, logits of magnitude <= ~10
(weights N(0, 0.2^2)) differ by at most ~10 * 8e-6 = 8e-5 < 1e-4, on any x86-64 (AVX2 or AVX-512)."""
import dataclasses

import numpy as np
import pytest
import timm
import torch
import transformers
from safetensors.numpy import load_file
from safetensors.torch import save_file as save_safetensors_torch

from checkpoint_helpers import TINY, _pynative, images, logits, numpy_params, random_net  # noqa: F401
from vit_ms import ViTConfig, create_model, load_weights
from vit_ms.checkpoint import convert_checkpoint, export_checkpoint, load_model, make_metadata, save_checkpoint

ATOL = 1e-4  # see the module docstring
CLASSES = ["cat", "dog", "fox"]


def randomize(model, seed=0):
    """Every parameter N(0, 0.2^2), LayerNorm scales around 1: logits far from zero, errors visible."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.2)
            if p.ndim == 1 and ("norm" in name) and name.endswith("weight"):
                p.add_(1.0)
    return model.eval()


def tiny_hf_config(**kwargs):
    return transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  image_size=32, patch_size=8, num_channels=3, layer_norm_eps=1e-12,
                                  id2label=dict(enumerate(CLASSES)), label2id={n: i for i, n in enumerate(CLASSES)},
                                  **kwargs)


HF_TINY = dataclasses.replace(TINY, num_classes=3, norm_eps=1e-12)  # transformers' default epsilon


# ---------------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------------

def test_hf_vit_for_image_classification_folder_loads_with_its_logits(tmp_path):
    model = randomize(transformers.ViTForImageClassification(tiny_hf_config()))
    model.save_pretrained(tmp_path / "hf")
    x = images(TINY, n=3)
    with torch.no_grad():
        expected = model(pixel_values=torch.from_numpy(x)).logits.numpy()

    net = create_model(HF_TINY)
    report = load_weights(net, tmp_path / "hf")  # the folder; model.safetensors inside
    assert report.source == "hf" and len(report.loaded) == len(dict(net.parameters_and_names()))
    np.testing.assert_allclose(logits(net, x), expected, rtol=0, atol=ATOL)

    # convert.py's path: architecture, epsilon and labels from config.json, HF's 0.5 normalisation.
    _, _, config = convert_checkpoint(tmp_path / "hf" / "model.safetensors", tmp_path / "hf.ckpt")
    assert config == HF_TINY
    converted, meta = load_model(tmp_path / "hf.ckpt")
    assert meta["class_names"] == CLASSES and meta["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert meta["preprocess"]["crop_pct"] == 1.0  # ViTImageProcessor resizes to the model's size, no crop
    np.testing.assert_allclose(logits(converted, x), expected, rtol=0, atol=ATOL)


def test_hf_pytorch_model_bin_and_in_memory_names_load(tmp_path):
    # A transformers >= 5 state_dict() uses layers.N.attention.q_proj / mlp.fc1 names (not the hub's).
    model = randomize(transformers.ViTForImageClassification(tiny_hf_config()), seed=1)
    torch.save(model.state_dict(), str(tmp_path / "pytorch_model.bin"))
    (tmp_path / "config.json").write_text(model.config.to_json_string())
    x = images(TINY)
    with torch.no_grad():
        expected = model(pixel_values=torch.from_numpy(x)).logits.numpy()
    net = create_model(HF_TINY)
    assert load_weights(net, tmp_path).source == "hf"
    np.testing.assert_allclose(logits(net, x), expected, rtol=0, atol=ATOL)


def test_hf_vit_model_backbone_loads_with_its_hidden_states(tmp_path):
    model = randomize(transformers.ViTModel(tiny_hf_config()), seed=2)  # with its pooler (dropped)
    model.save_pretrained(tmp_path / "backbone")
    x = images(TINY)
    with torch.no_grad():
        expected = model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    net = create_model(HF_TINY)
    report = load_weights(net, tmp_path / "backbone")
    assert set(report.dropped) == {"pooler.dense.weight", "pooler.dense.bias"}
    assert report.initialised == ["head.weight", "head.bias"]
    net.set_train(False)
    import mindspore as ms

    np.testing.assert_allclose(net.forward_features(ms.Tensor(x)).asnumpy(), expected, rtol=0, atol=ATOL)


def test_export_to_hf_loads_in_transformers_and_round_trips_exactly(tmp_path):
    net = random_net(dataclasses.replace(TINY, num_classes=3), seed=3)
    src = save_checkpoint(net, tmp_path / "best.ckpt", make_metadata(net.config, CLASSES))
    out = export_checkpoint(src, tmp_path / "to_hf", "hf")
    model = transformers.ViTForImageClassification.from_pretrained(out).eval()
    assert model.config.id2label == dict(enumerate(CLASSES)) and model.config.layer_norm_eps == 1e-6
    x = images(TINY)
    with torch.no_grad():
        theirs = model(pixel_values=torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(theirs, logits(net, x), rtol=0, atol=ATOL)
    # And back: every tensor bit-equal to the original.
    _, _, config = convert_checkpoint(out, tmp_path / "back.ckpt")
    assert config == net.config
    back, meta = load_model(tmp_path / "back.ckpt")
    assert meta["class_names"] == CLASSES
    # The preprocessing travels through preprocessor_config.json (HF has no crop: crop_pct 1.0).
    assert meta["preprocess"] == {"image_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                  "crop_pct": 1.0, "interpolation": "bilinear"}
    original = numpy_params(net)
    for name, value in numpy_params(back).items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)


# ---------------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------------

def tiny_timm(**kwargs):
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=10, **kwargs)


def _timm_parity(tmp_path, model, config):
    save_safetensors_torch({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "t.safetensors"))
    x = images(TINY, n=3)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    net = create_model(config)
    assert load_weights(net, tmp_path / "t.safetensors").source == "timm"
    np.testing.assert_allclose(logits(net, x), expected, rtol=0, atol=ATOL)
    _, _, converted = convert_checkpoint(tmp_path / "t.safetensors", tmp_path / "t.ckpt", num_heads=4)
    assert converted == config


def test_timm_vit_loads_with_its_logits(tmp_path):
    _timm_parity(tmp_path, randomize(tiny_timm(), seed=4), TINY)


# These two need ViTConfig.global_pool / class_token and the fc_norm LayerNorm (the model branch); with
# average pooling timm's final `norm` is Identity and `fc_norm` normalises the pooled patch tokens.
@pytest.mark.parametrize("class_token", [False, True])
def test_timm_gap_vit_loads_with_its_logits(tmp_path, class_token):
    model = randomize(tiny_timm(global_pool="avg", class_token=class_token), seed=5)
    assert "fc_norm.weight" in model.state_dict() and "norm.weight" not in model.state_dict()
    config = ViTConfig(**{**TINY.to_dict(), "global_pool": "avg", "class_token": class_token})
    _timm_parity(tmp_path, model, config)


def test_export_to_timm_loads_in_timm_and_round_trips_exactly(tmp_path):
    net = random_net(TINY, seed=6)
    src = save_checkpoint(net, tmp_path / "best.ckpt", make_metadata(TINY))
    out = export_checkpoint(src, tmp_path / "timm.safetensors", "timm")
    model = tiny_timm().eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(str(out)).items()}, strict=True)
    x = images(TINY)
    with torch.no_grad():
        theirs = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(theirs, logits(net, x), rtol=0, atol=ATOL)
    convert_checkpoint(out, tmp_path / "back.ckpt", num_heads=4)
    back, _ = load_model(tmp_path / "back.ckpt")
    assert back.config == TINY
    original = numpy_params(net)
    for name, value in numpy_params(back).items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)


def test_export_refuses_what_the_target_cannot_hold(tmp_path):
    from safetensors.numpy import save_file

    from vit_ms.checkpoint import CheckpointError

    save_file({"cls_token": np.zeros((1, 1, 4), np.float32)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="foreign.safetensors is not a vit_ms checkpoint; convert it first"):
        export_checkpoint(tmp_path / "foreign.safetensors", tmp_path / "x", "hf")
    with pytest.raises(CheckpointError, match="cannot export to 'onnx'"):
        export_checkpoint(tmp_path / "foreign.safetensors", tmp_path / "x", "onnx")
