"""File readers: any supported weights file -> ({name: numpy array}, vit_ms metadata or None), names unchanged.

Supported: MindSpore `.ckpt` (ours are verified against their integrity record); `.safetensors` (read with
the safetensors NumPy API, no PyTorch needed); PyTorch `.pth`/`.pt`/`.bin` (needs torch; `weights_only=True`,
never an unrestricted unpickle); JAX `.npz` (`allow_pickle=False`); and a folder written by Hugging Face
`save_pretrained` (its `model.safetensors` or `pytorch_model.bin`). Every way a file can be damaged ends in
one `CheckpointError` naming the file.
"""
from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from .ckpt_file import read_ckpt
from .format import META_KEY, CheckpointError, parse_metadata, verify_integrity

logger = logging.getLogger(__name__)

FILE_TYPES = {".ckpt": "MindSpore", ".safetensors": "safetensors", ".pth": "PyTorch", ".pt": "PyTorch",
              ".bin": "PyTorch", ".npz": "NumPy (JAX)"}
# What `save_pretrained` writes, in the order transformers prefers them.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def check_file(path) -> Path:
    """`path` as a Path if it is a file or a save_pretrained folder; FileNotFoundError otherwise."""
    path = Path(path)
    if path.is_dir():
        return weights_in_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (or is not a file)")
    return path


def weights_in_folder(folder: Path) -> Path:
    """The weights file of a Hugging Face `save_pretrained` folder."""
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} is a folder without {' or '.join(HF_WEIGHT_FILES)}; pass the weights "
                            f"file itself (sharded checkpoints are not supported)")


def companion_config(path) -> Optional[dict]:
    """The `config.json` beside a weights file (as `save_pretrained` writes it), or None."""
    path = Path(path)
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {config}: {error}") from error
    return value if isinstance(value, dict) else None


def unreadable(path, error) -> CheckpointError:
    return CheckpointError(f"cannot read {path} as a {FILE_TYPES.get(Path(path).suffix.lower(), '')} "
                           f"checkpoint: the file is truncated or corrupt ({type(error).__name__}: {error}). "
                           f"Download or save it again.")


def read_params(path, verify: bool = True) -> Tuple[Dict[str, np.ndarray], Optional[dict]]:
    """Read a weights file into ({name: numpy array}, vit_ms metadata or None), names unchanged.

    A vit_ms checkpoint's tensors are checked against its integrity record; a training checkpoint's
    optimizer state is returned too (conversion leaves it out).

    Args:
        path: the weights file (its suffix selects the reader) or a `save_pretrained` folder.
        verify: False leaves the integrity check to the caller, who must run it (`format.integrity_checked`)
            before the tensors are used.
    """
    path = check_file(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise CheckpointError(f"{path}: unknown weights file type {suffix!r}; supported: "
                              f"{', '.join(sorted(FILE_TYPES))}")
    meta = None
    try:
        if suffix == ".ckpt":
            params, meta = _read_ckpt(path)
        elif suffix == ".safetensors":
            from safetensors.numpy import load_file

            params = load_file(str(path))
        elif suffix == ".npz":
            with np.load(str(path), allow_pickle=False) as archive:
                params = {name: archive[name] for name in archive.files}
        else:
            params = _read_torch(path)
    except (CheckpointError, ImportError):
        raise
    except Exception as error:  # each reader has its own exception types for a damaged file
        raise unreadable(path, error) from error
    if not params:
        raise CheckpointError(f"{path} holds no tensors")
    if meta is not None and verify:
        verify_integrity(path, params, meta)
    return params, meta


def _read_ckpt(path: Path):
    raw = read_ckpt(path)
    if raw is None:  # not a plain checkpoint (ckpt_file's docstring): MindSpore reads it, or says why not
        import mindspore as ms

        raw = ms.load_checkpoint(str(path))
    meta = parse_metadata(path, raw.pop(META_KEY)) if META_KEY in raw else None
    params = {}
    for name, value in raw.items():
        if isinstance(value, str):  # other append_dict strings carry no weights
            continue
        params[name] = value if isinstance(value, np.ndarray) else value.asnumpy()
    return params, meta


def read_metadata(path) -> Optional[dict]:
    """The `vit_ms_meta` dict of a checkpoint, or None for a checkpoint that has none.

    Reads only the metadata (no tensors are built, so the integrity record is not checked here; every
    reader of the weights checks it).
    """
    path = check_file(path)
    strings = read_ckpt(path, tensors=False) if path.suffix.lower() == ".ckpt" else None
    if strings is not None:
        return parse_metadata(path, strings[META_KEY]) if META_KEY in strings else None
    import mindspore as ms

    seen = []

    def only_metadata(name):
        seen.append(name)
        return name == META_KEY

    try:
        params = ms.load_checkpoint(str(path), choice_func=only_metadata)
    except Exception as error:  # MindSpore raises ValueError or RuntimeError for a damaged file
        # MindSpore parses the whole file before it offers the names, and raises when the filter keeps
        # none: names seen means a sound checkpoint that simply has no metadata (e.g. the tutorial's).
        if seen:
            return None
        raise unreadable(path, error) from error
    return parse_metadata(path, params[META_KEY])


def _read_torch(path: Path) -> Dict[str, np.ndarray]:
    try:
        import torch  # optional: only for PyTorch pickles; .safetensors needs no torch
    except ImportError as error:
        raise ImportError(f"reading {path} needs PyTorch (pip install torch); or save the state dict as "
                          f".safetensors, which loads without it") from error
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" not in str(error):
            raise
        raise CheckpointError(f"{path} holds Python objects besides tensors; refused to unpickle them "
                              f"(weights_only=True). Save only the state dict, or as .safetensors.") from error
    for key in ("state_dict", "model", "model_state_dict", "module"):  # training-checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    params = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        if value.dtype in (torch.bfloat16, torch.float16):  # NumPy has no bfloat16
            value = value.float()
        params[name] = value.numpy()
    if params and all(name.startswith("module.") for name in params):  # saved from DistributedDataParallel
        params = {name[len("module."):]: value for name, value in params.items()}
    return params


__all__ = ["FILE_TYPES", "HF_WEIGHT_FILES", "check_file", "companion_config", "read_params", "read_metadata"]
