"""Checkpoints: our file format, file readers, one module per naming scheme, conversion, pos-embed
resampling, validated loading and a named model zoo.

A vit_ms checkpoint is a MindSpore `.ckpt` in our parameter names plus metadata (model config,
preprocessing, class names, an integrity digest), so eval, infer and export need nothing but the file.
Foreign weights load in four steps, each a plain function, so the model never knows where its weights
came from:

1. `read_params(path)` (`readers`): file -> {name: numpy array} (.ckpt, .safetensors, .pth/.pt/.bin,
   .npz, a Hugging Face save_pretrained folder);
2. `detect_source(names)` (`naming`): which naming scheme, asking each of `FORMATS` in turn;
3. `convert(params, source)` (`naming`): our names and layouts (JAX kernels transposed, q/k/v fused);
4. `load_weights(net, path)` (`loading`): validate every tensor, drop a head with another class count,
   resample the position embedding (`posembed`), and only then assign: a bad file changes nothing.

Modules: `format` (our file: metadata, save, integrity), `readers`, `ckpt_file` (MindSpore's `.ckpt`
read without MindSpore's Python protobuf parser), `formats/` (one module per naming
scheme, registered in the table `formats.FORMATS`), `naming`, `posembed`, `loading`, `conversion`
(convert.py's file-to-file conversion and the export back to timm / HF), `zoo` (named downloadable
weights; `python -m vit_ms.checkpoint list`).

To support a new source of weights, add ONE module to `vit_ms/checkpoint/formats/` defining
`FORMAT = WeightFormat(...)` (how to recognise its names, how to convert them to ours, optionally how to
export ours back) and add it to the table in `formats/__init__.py`; detection, conversion, convert.py's
`--source` and the registry test pick it up from there.
"""
from .conversion import (EXPORT_TARGETS, STANDARD_HEADS, WeightsDescription, convert_checkpoint,
                         describe_weights, export_checkpoint)
from .format import (FORMAT_VERSION, META_KEY, CheckpointError, config_from_metadata, make_metadata,
                     parse_metadata, save_checkpoint, tensor_digest, verify_integrity)
from .formats import FORMATS, SOURCES, WeightFormat
from .loading import LoadReport, load_model, load_weights, read_training_checkpoint
from .naming import convert, detect_source, infer_config
from .posembed import resample_pos_embed
from .readers import FILE_TYPES, read_metadata, read_params
from .zoo import (PRETRAINED, ZOO, Weights, create_pretrained, default_cache_dir, download_weights,
                  resolve_pretrained)

# Kept for code written against the single-module checkpoint.py.
PretrainedSource = Weights

__all__ = ["META_KEY", "FORMAT_VERSION", "SOURCES", "FORMATS", "FILE_TYPES", "WeightFormat", "CheckpointError",
           "LoadReport", "make_metadata", "parse_metadata", "save_checkpoint", "read_metadata",
           "config_from_metadata", "tensor_digest", "verify_integrity", "load_model", "load_weights",
           "read_training_checkpoint", "read_params", "detect_source", "convert", "resample_pos_embed",
           "infer_config", "describe_weights", "WeightsDescription", "convert_checkpoint", "export_checkpoint",
           "EXPORT_TARGETS", "STANDARD_HEADS",
           "ZOO", "PRETRAINED", "Weights", "PretrainedSource", "default_cache_dir", "resolve_pretrained",
           "download_weights", "create_pretrained"]
