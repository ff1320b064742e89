"""Threads that run torch's code, told to stop and waited for when the interpreter exits.

When Python shuts down, a daemon thread that comes back from C++ code (a torch op that let the
interpreter go) is ended by unwinding its stack; the C++ runtime answers that by aborting the whole
process ("terminate called without an active exception", exit status 134, a core dump where they
are kept). igs2gs's editor threads, its viewer panel and nerfstudio's viewer renderers all run torch,
so an error in set-up, a Ctrl-C or any exit while one of them worked ended that way. Each is
registered here; at exit all are told to stop, then waited for.
"""

from __future__ import annotations

import atexit
import threading
import time
from typing import Callable, Iterable, List, Tuple

import torch  # noqa: F401 - imported first, so that torch's exit handlers run after ``_finish_threads``

Stoppable = Tuple[threading.Thread, Callable[[], None]]

EXIT_WAIT_S = 60.0
"""How long the exit waits for all of them: editor threads stop at their next batch (or warm-up shape), so this is one
batch's edit (~2.5 s on an H100) or a first use (~7 s), with room to spare."""

_threads: List[Stoppable] = []
_sources: List[Callable[[], Iterable[Stoppable]]] = []
_lock = threading.Lock()


def finish_at_exit(thread: threading.Thread, stop: Callable[[], None]) -> None:
    """At the interpreter's exit, call ``stop``, then wait for ``thread``."""
    with _lock:
        _threads[:] = [(t, s) for t, s in _threads if t.is_alive()]
        _threads.append((thread, stop))


def finish_at_exit_those_of(source: Callable[[], Iterable[Stoppable]]) -> None:
    """At the interpreter's exit, stop and wait for the threads ``source`` then lists (threads that come and go, e.g.
    one per viewer client)."""
    with _lock:
        _sources.append(source)


def running() -> List[Stoppable]:
    """The registered threads alive now, with their stops."""
    with _lock:
        threads, sources = list(_threads), list(_sources)
    listed: List[Stoppable] = []
    for source in sources:
        try:
            listed.extend(source())
        except Exception:  # noqa: BLE001 - e.g. a viewer half torn down: its threads are not waited for
            continue
    return [(thread, stop) for thread, stop in threads + listed if thread.is_alive()]


@atexit.register
def _finish_threads() -> None:
    stopping = running()
    for _, stop in stopping:
        stop()
    deadline = time.monotonic() + EXIT_WAIT_S
    for thread, _ in stopping:
        thread.join(max(0.0, deadline - time.monotonic()))
