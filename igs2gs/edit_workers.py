"""Editor threads: replicas on several devices fed batches of views from one queue, and the warm-up
that pays the editors' first-use costs during set-up.

A sweep's batches go into one queue; each editor replica (one per ``--pipeline.ip2p-devices``
entry) takes the next batch when it is free, so fast devices take more. On CUDA each worker runs
on its own stream, which also lets edits overlap with splat training on a shared GPU. A replica
that raises is retired, its batch goes back into the queue for the others, and the failure is
kept for the log; only when every replica has failed does the sweep fail.

Both kinds of thread spend their time inside torch's code, so each is stopped and waited for at the
interpreter's exit (``threads_at_exit``).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from igs2gs.graphed_loss import CAPTURE_GATE
from igs2gs.threads_at_exit import finish_at_exit


@dataclass
class EditJob:
    """One batch of views to edit: renders and originals [B, 3, H, W] in [0, 1] and a generator per view."""

    views: List[int]
    renders: Tensor
    originals: Tensor
    generators: List[torch.Generator]


@dataclass
class EditResult:
    """The edits of a job ([B, 3, H, W] on the CPU), or the error that ended the last replica."""

    job: EditJob
    edits: Optional[Tensor]
    worker: str
    seconds: float
    prompt: str = ""
    error: Optional[str] = None


class EditWorkers:
    """One thread per editor; ``settings()`` is read when a batch starts, so changes apply at the next edit."""

    def __init__(self, editors: Sequence, settings: Callable[[], Tuple[str, Dict[str, object]]]) -> None:
        if not editors:
            raise ValueError("need at least one editor")
        self.settings = settings
        self.failures: List[Tuple[str, str]] = []
        self._jobs: "queue.Queue[Optional[EditJob]]" = queue.Queue()
        self._results: "queue.Queue[EditResult]" = queue.Queue()
        self._lock = threading.Lock()
        self._outstanding = 0
        self._busy = 0
        self._running = threading.Event()
        self._running.set()
        self._stopping = False
        self._alive = len(editors)
        self.names = [f"{index}:{getattr(editor, 'device', 'cpu')}" for index, editor in enumerate(editors)]
        self._threads = [
            threading.Thread(target=self._work, args=(editor, name), name=f"igs2gs-editor-{name}", daemon=True)
            for editor, name in zip(editors, self.names)
        ]
        for thread in self._threads:
            thread.start()
            finish_at_exit(thread, self.stop)

    @property
    def outstanding(self) -> int:
        """Jobs submitted whose result has not been taken yet."""
        return self._outstanding

    @property
    def busy(self) -> int:
        """Jobs being edited right now (their results are queued before this drops)."""
        return self._busy

    def pause(self, paused: bool) -> None:
        """Hold queued jobs back while ``paused``; jobs already being edited finish."""
        if paused:
            self._running.clear()
        else:
            self._running.set()

    def submit(self, job: EditJob) -> None:
        with self._lock:
            self._outstanding += 1
        self._jobs.put(job)

    def results(self, block: bool, timeout: Optional[float] = None) -> List[EditResult]:
        """Finished jobs: all that are ready, or (``block``) at least one unless none is outstanding."""
        finished: List[EditResult] = []
        if block and self._outstanding:
            try:
                finished.append(self._results.get(timeout=timeout))
            except queue.Empty:
                return finished
        while True:
            try:
                finished.append(self._results.get_nowait())
            except queue.Empty:
                break
        with self._lock:
            self._outstanding -= len(finished)
        for result in finished:
            if result.error is not None:
                raise RuntimeError(f"every editor replica failed; last: {result.error}; all failures: {self.failures}")
        return finished

    def close(self) -> None:
        """End the threads once the queued jobs are edited."""
        for _ in self._threads:
            self._jobs.put(None)

    def stop(self) -> None:
        """End the threads after the batches being edited; queued jobs are dropped (the interpreter is exiting)."""
        self._stopping = True
        self._running.set()
        self.close()

    def _work(self, editor, name: str) -> None:
        device = torch.device(getattr(editor, "device", "cpu"))
        stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        while True:
            job = self._jobs.get()
            if job is None or self._stopping:
                return
            self._running.wait()  # paused: hold the job until editing resumes (then with the settings of then)
            if self._stopping:
                return
            with self._lock:
                self._busy += 1
            try:
                alive = self._edit(editor, name, device, stream, job)
            finally:
                with self._lock:
                    self._busy -= 1
            if not alive:
                return

    def _edit(self, editor, name: str, device: torch.device, stream, job: EditJob) -> bool:
        """Edit one job and queue its result; False when this replica failed and retires."""
        started = time.perf_counter()
        prompt, settings = self.settings()
        try:
            # Shared with the other editors; a CUDA graph capture in the training thread waits for it.
            with CAPTURE_GATE.shared(), torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                edits = editor.edit(
                    job.renders.to(device), job.originals.to(device), prompt,
                    generator=job.generators, cond_keys=list(job.views), **settings,
                ).cpu()
        except Exception as error:  # noqa: BLE001 - retire this replica, let the others take the batch
            with self._lock:
                self.failures.append((name, f"{type(error).__name__}: {error}"))
                self._alive -= 1
                last = self._alive == 0
            if last:
                self._results.put(EditResult(job, None, name, 0.0, prompt, error=f"{name}: {type(error).__name__}: {error}"))
            else:
                self._jobs.put(job)
            return False
        self._results.put(EditResult(job, edits, name, time.perf_counter() - started, prompt))
        return True


class WarmUp:
    """Editors' first-use costs paid in a background thread while the trainer sets up.

    The first batch of each shape an editor sees costs seconds beyond its diffusion (cuDNN and
    cuBLAS loading their kernels and choosing algorithms, 3.5-6 s on an H100 with a cold disk
    cache). Here each editor edits one throw-away batch of each shape the first sweep will use, with
    one diffusion step, while the scene loads and the viewer starts; the first sweep ``wait``s.
    The instruction's embedding stays cached, and so do the condition latents of the ``conditions``
    batches (view ids and their original photos on a device), which the first sweep would otherwise encode; a
    failure costs only the warm-up (it is logged).
    """

    def __init__(
        self,
        editors: Sequence,
        shapes: Sequence[Tuple[int, int, int]],
        prompt: str,
        conditions: Optional[Callable[[torch.device], Iterable[Tuple[List[int], Tensor]]]] = None,
    ) -> None:
        self.shapes = list(shapes)
        self.seconds = 0.0
        self.parts: List[Tuple[str, float]] = []
        """What the warm-up did and its seconds, in order: each batch shape per editor (0.0 for a shape a compiled
        editor pads to one already warm) and the photos' conditioning (up to its GPU work's end)."""
        self.error: Optional[str] = None
        self._conditions = conditions or (lambda device: ())
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(list(editors), prompt), name="igs2gs-editor-warm-up", daemon=True)
        self._thread.start()
        finish_at_exit(self._thread, self._stopping.set)

    def _run(self, editors: List, prompt: str) -> None:
        started = time.perf_counter()
        try:
            with CAPTURE_GATE.shared():  # a CUDA graph capture in the training thread waits for it
                for editor in editors:
                    device = torch.device(editor.device)
                    for batch, height, width in self.shapes:
                        if self._stopping.is_set():
                            return
                        seconds = editor.warm_up(batch, height, width, prompt)
                        self.parts.append((f"{device} batch {batch} {width}x{height}", seconds))
                    begun, photos = time.perf_counter(), 0
                    for views, originals in self._conditions(device):
                        if self._stopping.is_set():
                            return
                        editor.encode_conditions(originals, views)
                        photos += len(views)
                    if photos:
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        self.parts.append((f"{device} conditioning of {photos} photos", time.perf_counter() - begun))
        except Exception as error:  # noqa: BLE001 - e.g. memory taken by another process: the sweep copes
            self.error = f"{type(error).__name__}: {error}"
        self.seconds = time.perf_counter() - started

    def describe(self) -> str:
        """The parts and their seconds for the log, e.g. ``cuda:0 batch 15 511x511 2.1 s, cuda:0 conditioning of 73
        photos 0.6 s``."""
        return ", ".join(f"{what} {seconds:.1f} s" for what, seconds in self.parts)

    def wait(self) -> float:
        """Block until the warm-up is done; returns the seconds waited."""
        started = time.perf_counter()
        self._thread.join()
        return time.perf_counter() - started
