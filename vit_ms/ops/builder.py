"""Compile the C++ kernels in `vit_ms/ops/csrc/` into one shared library per instruction set.

The sources ship as package data. `KernelBuilder(isa).build()` compiles them with the system's C++
compiler (`$CXX`, else g++, else c++) into the one cache root, `vit_ms.files.cache_dir("kernels")`,
under a name that hashes the sources, the flags and the compiler, so an edited source or another flag
builds a new library and an unchanged one is reused. The library is written to a temporary name and
renamed, so concurrent processes never load a half-written file. A failed build raises
`KernelBuildError` carrying the compiler's own output.

One library per instruction set (baseline x86-64, AVX2, AVX-512) rather than GCC's `target_clones`:
the variant is then a choice a user (and a test) can force, and each variant is plain code a compiler
and a profiler see as it is.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional

from ..files import atomic_path, cache_dir

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
ISAS = ("avx512", "avx2", "baseline")  # best first
# `-mavx512f` and `-mavx2` are the exact targets the earlier `target_clones("avx512f", "avx2", "default")`
# compiled; neither enables FMA, so no variant contracts a * b + c into one rounding.
_ISA_FLAGS = {"avx512": ["-mavx512f"], "avx2": ["-mavx2"], "baseline": []}
_CPU_FLAG = {"avx512": "avx512f", "avx2": "avx2"}  # the /proc/cpuinfo flag each variant needs
# MindSpore's own libraries use the pre-C++11 string/vector ABI; the shape functions return a vector.
# The math flags only let the loops vectorise (select instead of branch for the clamps); none reorders
# arithmetic or swaps in approximate instructions.
_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-D_GLIBCXX_USE_CXX11_ABI=0", "-Wall",
          "-fno-trapping-math", "-ffinite-math-only", "-fno-signed-zeros", "-fno-math-errno"]


class KernelBuildError(RuntimeError):
    """The kernels could not be compiled; the message holds the command and the compiler's output."""


@functools.lru_cache(maxsize=None)
def cpu_isas() -> tuple:
    """The variants this CPU can run, best first (only "baseline" off x86-64). Read once per process: building
    a ViT-B/16 asks ~300 times, and each read of /proc/cpuinfo took ~0.1 ms."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ("baseline",)
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ("baseline",)
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return tuple(isa for isa in ISAS if isa == "baseline" or _CPU_FLAG[isa] in flags)


def find_compiler() -> Optional[str]:
    """`$CXX`, else g++ or c++ on PATH; None if there is none."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


class KernelBuilder:
    """Builds (once) the kernel library for one instruction set.

    Args:
        isa: one of `ISAS`.
        dnnl: the oneDNN library to take sgemm from (`mindspore/lib/libdnnl.so.3`); None builds the
            library without the Dense and attention sgemm kernels.
        compiler: the C++ compiler; default `find_compiler()`.
    """

    def __init__(self, isa: str, dnnl: Optional[Path] = None, compiler: Optional[str] = None):
        if isa not in ISAS:
            raise ValueError(f"unknown kernel ISA {isa!r}; choose one of {list(ISAS)}")
        self.isa = isa
        self.dnnl = dnnl
        self.compiler = compiler or find_compiler()

    def sources(self) -> List[Path]:
        return sorted(CSRC.glob("*.cc"))

    def flags(self) -> List[str]:
        defines = [f'-DVIT_MS_DNNL_PATH="{self.dnnl}"'] if self.dnnl is not None else []
        return [*_FLAGS, *_ISA_FLAGS[self.isa], *defines]

    def _libs(self) -> List[str]:
        return ["-ldl"] if self.dnnl is not None else []  # sgemm is dlopen'ed

    def target(self) -> Path:
        """Where the library is (or will be): named by a hash of sources, header, flags and compiler."""
        digest = hashlib.sha256()
        for path in sorted(CSRC.iterdir()):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        digest.update(" ".join([str(self.compiler), *self.flags(), *self._libs()]).encode())
        return cache_dir("kernels") / f"vit_ms_kernels_{self.isa}_{digest.hexdigest()[:16]}.so"

    def build(self) -> Path:
        """The library's path, compiling it first if the cache has none; raises KernelBuildError."""
        if self.compiler is None:
            raise KernelBuildError("no C++ compiler found (set $CXX or install g++)")
        target = self.target()
        if target.exists():
            return target
        with atomic_path(target, suffix=".so") as tmp:
            command = [self.compiler, *self.flags(), "-o", str(tmp), *map(str, self.sources()), *self._libs()]
            logger.info("compiling the vit_ms CPU kernels (%s) into %s", self.isa, target)
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.SubprocessError) as err:
                raise KernelBuildError(f"{' '.join(command)}: {err}") from err
            if done.returncode != 0:
                raise KernelBuildError(f"{' '.join(command)} exited with {done.returncode}:\n{done.stderr}")
            if done.stderr.strip():
                logger.warning("the C++ compiler warned while building the vit_ms kernels:\n%s", done.stderr)
        return target


__all__ = ["ISAS", "CSRC", "KernelBuildError", "KernelBuilder", "cpu_isas", "find_compiler"]
