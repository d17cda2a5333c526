"""Helpers the naming-scheme modules share: regex rename tables and the conversion result type."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

# LayerNorm parameter names across frameworks -> ours (MindSpore's gamma/beta).
LN = {"weight": "gamma", "bias": "beta", "scale": "gamma", "gamma": "gamma", "beta": "beta"}
Rule = Tuple[str, Callable[[re.Match], str]]


@dataclass
class Converted:
    """What a naming scheme's `to_vit_ms` returns: our names, plus what was left out and why."""

    params: Dict[str, np.ndarray]
    dropped: Dict[str, str] = field(default_factory=dict)  # source name -> why it was not converted
    problems: List[str] = field(default_factory=list)  # lines for the error message
    num_heads: Optional[int] = None  # known only where the layout shows it (JAX, HF's config)


def shape(value) -> str:
    return str(tuple(np.shape(value)))


def ln(target: str) -> Callable[[re.Match], str]:
    """A LayerNorm rename: the last group is the parameter (weight/bias/scale), mapped to gamma/beta."""
    return lambda m: target.format(*m.groups()[:-1]) + "." + LN[m.groups()[-1]]


def same(target: str) -> Callable[[re.Match], str]:
    return lambda m: target.format(*m.groups())


def rename(params: Dict[str, np.ndarray], rules: List[Rule]) -> Converted:
    """Rename every tensor by the first rule whose pattern matches its whole name; unknown names are problems."""
    out = Converted({})
    compiled = [(re.compile(pattern), target) for pattern, target in rules]
    for name, value in params.items():
        for pattern, target in compiled:
            match = pattern.fullmatch(name)
            if match:
                out.params[target(match)] = value
                break
        else:
            out.problems.append(f"unknown name {name} {shape(value)}")
    return out


def torch_norm_names(params: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Our LayerNorm names (gamma/beta) -> PyTorch's (weight/bias); other names unchanged."""
    return {re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k)): v for k, v in params.items()}


BLOCK = r"blocks\.(\d+)\."


def write_safetensors(params: Dict[str, np.ndarray], path, metadata: Optional[Dict[str, str]] = None):
    """Write {name: array} as .safetensors atomically (`vit_ms.files.atomic_path`); returns the path."""
    from pathlib import Path

    from safetensors.numpy import save_file

    from ...files import atomic_path

    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in params.items()}, str(tmp), metadata=metadata)
    return Path(path)
