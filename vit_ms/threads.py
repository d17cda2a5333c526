"""How long the fused kernels' OpenMP workers spin between kernels before they sleep.

The fused CPU kernels (`vit_ms.ops`) split each op over OpenMP threads (GNU libgomp, which
`import mindspore` loads). Between two kernels a worker spins, then sleeps. libgomp's default spin is
300,000 iterations of a pause instruction, ~15 ms on a Xeon since Skylake (~140 cycles a pause, per
Intel's optimization manual): longer than a whole ViT-Ti step at batch 1, so the workers never sleep and
hold a core that MindSpore's runtime threads and Python's main thread need; on 2 cores a step that loses
that race runs at half speed. 3,000 iterations (tens of microseconds) still bridge the gap between two
kernels of a step, then give the core back. Measured (README, "Batch 1 and the OpenMP spin"): batch-1
steps 13-16 ms instead of 13-28, +12 % to +31 % images/s at batch 1, batch 16 unchanged.

libgomp spins only a "throttled" count once it manages more threads than there are CPUs (libgomp's env.c:
100 iterations, 1,000 with `OMP_WAIT_POLICY=ACTIVE`, never more than `GOMP_SPINCOUNT`), and an eval or
infer process always gets there: MindSpore runs a graph's first call on its actor thread and the later
ones on the caller's, each thread that starts a parallel region keeps a team of its own, so 2 cores carry
3 managed threads. At 100 iterations (a few microseconds) a worker sleeps at nearly every region's end
and must be woken for the next (~70-90 futex sleeps per ViT-S b1 step). vit_ms therefore also sets
`OMP_WAIT_POLICY=ACTIVE`: with `GOMP_SPINCOUNT` given, its only effect is that throttled count, 1,000.
Measured (README, the section on the second OpenMP team): ViT-Ti b1 inference ~10 % faster; training,
which runs on one thread's team, keeps its 3,000.

libgomp reads both once, when it is loaded, so the defaults are set when `vit_ms` is imported, before
MindSpore: every script imports vit_ms first. They are left alone if the user set `GOMP_SPINCOUNT` or
`OMP_WAIT_POLICY`, or if MindSpore (and with it libgomp) was imported before vit_ms. Child processes
inherit them (a benchmark that times another framework gives it `foreign_environment()`).
"""
from __future__ import annotations

import os
import sys

SPIN_ENV = "GOMP_SPINCOUNT"
SPIN_DEFAULT = "3000"
LIBGOMP_DEFAULT = "300000"  # https://gcc.gnu.org/onlinedocs/libgomp/GOMP_005fSPINCOUNT.html
WAIT_ENV = "OMP_WAIT_POLICY"
WAIT_DEFAULT = "ACTIVE"  # with GOMP_SPINCOUNT set: the throttled spin 1,000 instead of 100 (module docstring)
DEFAULTED = False  # True when this process's GOMP_SPINCOUNT and OMP_WAIT_POLICY are vit_ms's, not the user's
TOO_LATE = False  # True when MindSpore (libgomp) was imported before vit_ms and the user chose nothing


def set_spin_default(environ=None, modules=None) -> bool:
    """Set GOMP_SPINCOUNT and OMP_WAIT_POLICY to vit_ms's defaults where the user chose neither and libgomp
    is not loaded yet; True if set."""
    global DEFAULTED, TOO_LATE
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    if SPIN_ENV in environ or WAIT_ENV in environ:
        return False
    if "mindspore" in modules:
        TOO_LATE = environ is os.environ
        return False
    environ[SPIN_ENV] = SPIN_DEFAULT
    environ[WAIT_ENV] = WAIT_DEFAULT
    DEFAULTED = environ is os.environ
    return True


def foreign_environment(environ=None) -> dict:
    """A copy of the environment for a child process that runs another framework (PyTorch ships libgomp
    too) at its own defaults: vit_ms's GOMP_SPINCOUNT becomes libgomp's documented default, 300,000,
    which also keeps that child's own `import vit_ms` from setting either, and vit_ms's OMP_WAIT_POLICY is
    dropped (libgomp's default is none); a user's own values stay."""
    environ = dict(os.environ if environ is None else environ)
    if DEFAULTED and environ.get(SPIN_ENV) == SPIN_DEFAULT:
        environ[SPIN_ENV] = LIBGOMP_DEFAULT
        if environ.get(WAIT_ENV) == WAIT_DEFAULT:
            del environ[WAIT_ENV]
    return environ


def late_import_hint() -> str:
    """What to do when libgomp was loaded before vit_ms could set its spin default; "" otherwise."""
    if not TOO_LATE:
        return ""
    return (f"MindSpore was imported before vit_ms, so libgomp keeps its long OpenMP spin (slower small "
            f"batches on few cores): import vit_ms first, or set {SPIN_ENV}={SPIN_DEFAULT} "
            f"{WAIT_ENV}={WAIT_DEFAULT} in the environment")
