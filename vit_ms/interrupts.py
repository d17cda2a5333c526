"""Ctrl-C and SIGTERM taken by one watcher thread, so that MindSpore's graph runtime never sees them.

Why: MindSpore installs its own SIGINT handler around every graph run (`mindspore::SignalGuard` with
`mindspore::DefaultIntHandler` in `libmindspore_common.so`, which does `kill(getpid(), SIGTERM)`), and puts
the previous handler back afterwards. A Ctrl-C that lands during a training step, which is nearly always,
therefore reaches Python as SIGTERM: the run cannot tell it from a real SIGTERM and exits 143, not 130.

A signal that every thread blocks never runs any handler: it stays pending until a thread takes it with
`sigwaitinfo`. `route_to_watcher()` blocks SIGINT and SIGTERM in the calling thread, which must be the
process's only thread (every thread started later inherits the mask, MindSpore's included), and starts the
watcher. The watcher hands each signal to the current listener (`listening`), or, with none, does what the
signal would have done without routing: SIGINT raises KeyboardInterrupt in the main thread (a second one
exits at once, 130), SIGTERM runs its Python handler or its default action.
"""
from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_listener: Optional[Callable[[int], None]] = None
_routed = False
_forwarded_ctrl_c = 0  # Ctrl-Cs handed to the main thread as KeyboardInterrupt


def route_to_watcher() -> bool:
    """Route SIGINT and SIGTERM to a watcher thread for the rest of the process.

    Call it first thing in a script, before anything starts a thread (MindSpore's import does). Returns
    False, changing nothing, where that cannot hold: other threads exist already (their masks cannot be
    changed from here), or the platform has no `sigwaitinfo`.
    """
    global _routed
    if _routed:
        return True
    if not hasattr(signal, "sigwaitinfo") or _thread_count() != 1:
        return False
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    threading.Thread(target=_watch, name="vit_ms-interrupts", daemon=True).start()
    _routed = True
    return True


def is_routed() -> bool:
    """Whether `route_to_watcher` took over SIGINT and SIGTERM in this process."""
    return _routed


@contextlib.contextmanager
def listening(listener: Callable[[int], None]) -> Iterator[None]:
    """Hand every SIGINT and SIGTERM to `listener(signum)`, called in the watcher thread, while inside."""
    global _listener
    previous, _listener = _listener, listener
    try:
        yield
    finally:
        _listener = previous


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))  # native threads too, which `threading` does not see
    except OSError:
        return 0  # unknown: do not route


def _watch() -> None:
    while True:
        signum = signal.sigwaitinfo(SIGNALS).si_signo
        listener = _listener
        if listener is not None:
            listener(signum)
        else:
            _as_if_not_routed(signum)


def _as_if_not_routed(signum: int) -> None:
    global _forwarded_ctrl_c
    handler = signal.getsignal(signum)
    if signum == signal.SIGINT and handler is signal.default_int_handler:
        # KeyboardInterrupt reaches the main thread at its next Python instruction, so not during a long
        # call into MindSpore (a graph compile or run); a second Ctrl-C does not wait for that.
        _forwarded_ctrl_c += 1
        if _forwarded_ctrl_c > 1:
            sys.stderr.write("\nCtrl-C again: exiting at once\n")
            sys.stderr.flush()
            os._exit(128 + signum)
    if callable(handler):
        _thread.interrupt_main(signum)  # the Python handler runs in the main thread, as it would have
        return
    if handler == signal.SIG_IGN:
        return
    # The default action (terminate): deliver it again to this thread with the signal unblocked here.
    sys.stderr.flush()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    signal.pthread_kill(threading.get_ident(), signum)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signum])  # not reached for SIG_DFL's terminate


__all__ = ["SIGNALS", "route_to_watcher", "is_routed", "listening"]
