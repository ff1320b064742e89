"""One sweep in progress: each batch of edits is swapped in and stored as it arrives; the sweep
closes (state, before/after sheet, log line) once every training view has its new edit.

Batches may arrive in the order they were rendered (one editor, training waiting) or in any
order from several editor replicas, also while training goes on (``overlap_edits``).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from igs2gs.datamanager import to_uint8
from igs2gs.edit_store import EditStore, SweepState
from nerfstudio.utils import writer
from nerfstudio.utils.rich_utils import CONSOLE


class Sweep:
    """Progress of sweep ``index`` started at training ``step``; persists through ``persist`` (one thread, in order)."""

    def __init__(self, pipeline, index: int, step: int, persist: ThreadPoolExecutor) -> None:
        self.pipeline, self.index, self.step, self.persist = pipeline, index, step, persist
        state = pipeline.sweep_state
        if state.sweep_in_progress is None:
            state.last_sweep_step = step
        state.sweep_in_progress = index
        pipeline.edit_store.save_state(state)
        self.views = len(pipeline.datamanager.original_images)
        done_before = set(state.views_done)
        self.todo = [view for view in range(self.views) if view not in done_before]
        self.resumed_with = len(done_before)
        self.planned = max(index + 1, pipeline.planned_sweeps())
        self.timings: Dict[str, float] = {"render_s": 0.0, "swap_s": 0.0}  # edit_s etc. added by close()
        self.batch_edit_s: List[float] = []  # per batch, in arrival order: the first of a shape pays its set-up
        self.sheet_rows: List[np.ndarray] = []
        self.started = time.perf_counter()

    @property
    def done(self) -> int:
        return len(self.pipeline.sweep_state.views_done)

    @property
    def rate(self) -> float:
        """Edits per second of wall time since this sweep (or its resumption) started."""
        return (self.done - self.resumed_with) / max(time.perf_counter() - self.started, 1e-9)

    def store(self, views: Sequence[int], renders: Tensor, edits: Tensor, edit_seconds: float) -> None:
        """Swap a batch of edits into the working set and queue their atomic write with the progress."""
        started = time.perf_counter()
        pipeline, state = self.pipeline, self.pipeline.sweep_state
        stored = pipeline.datamanager.replace(list(views), edits).cpu().numpy()
        state.views_done.extend(views)
        pipeline.pending_writes.append(self.persist.submit(pipeline.edit_store.save_edits, list(views), stored, state.snapshot()))
        self._add_sheet_rows(views, renders, stored)
        self.batch_edit_s.append(edit_seconds)
        self.timings["swap_s"] += time.perf_counter() - started
        pipeline.status = f"sweep {self.index + 1} of {self.planned} · {self.done}/{self.views} views · {self.rate:.2f} edits/s"

    def _add_sheet_rows(self, views: Sequence[int], renders: Tensor, stored: np.ndarray) -> None:
        """Rows of original | render | edit for the first ``sheet_views`` views of the sweep."""
        wanted = max(0, self.pipeline.config.sheet_views - len(self.sheet_rows))
        datamanager = self.pipeline.datamanager
        for index, view in enumerate(list(views)[:wanted]):
            original = to_uint8(datamanager.over_background(datamanager.original_images[view]))
            render = to_uint8(renders[index].permute(1, 2, 0))
            self.sheet_rows.append(np.concatenate([original.cpu().numpy(), render.cpu().numpy(), stored[index]], axis=1))

    def close(self) -> None:
        """Mark the sweep complete if every view is in, and queue its state and sheet behind the edit
        writes: the training thread does not wait for PNG encoding (a failed write is raised by
        ``raise_failed_writes`` at a later step)."""
        pipeline, state, store = self.pipeline, self.pipeline.sweep_state, self.pipeline.edit_store
        if self.done < self.views:  # paused from the viewer: the sweep resumes when editing resumes
            CONSOLE.log(f"igs2gs sweep {self.index + 1} paused after {self.done} views")
            return
        state.sweeps_completed, state.sweep_in_progress, state.views_done = self.index + 1, None, []
        self.timings["total_s"] = time.perf_counter() - self.started
        self.timings["views"] = float(len(self.todo))
        self.timings["step"] = float(self.step)
        self.timings["edit_s"] = sum(self.batch_edit_s)
        if self.batch_edit_s:
            self.timings["slowest_batch_edit_s"] = max(self.batch_edit_s)
            self.timings["fastest_batch_edit_s"] = min(self.batch_edit_s)
        pipeline.sweep_timings.append(self.timings)
        sheet = np.concatenate(self.sheet_rows, axis=0) if self.sheet_rows else None
        pipeline.pending_writes.append(self.persist.submit(self._write_completion, store, state.snapshot(), sheet))
        if sheet is not None:
            writer.put_image(name=f"igs2gs/before_after_sweep_{self.index:02d}", image=torch.from_numpy(sheet) / 255.0, step=self.step)
        timings = self.timings
        CONSOLE.log(
            f"igs2gs sweep {self.index + 1}: {len(self.todo)} views in {timings['total_s']:.1f} s "
            f"(render {timings['render_s']:.1f} s, edit {timings['edit_s']:.1f} s, store {timings['swap_s']:.1f} s), "
            f"instruction {pipeline.prompt!r}"
        )
        pipeline.status = f"sweep {self.index + 1} of {self.planned} done"

    def _write_completion(self, store: EditStore, state: SweepState, sheet: Optional[np.ndarray]) -> None:
        store.save_state(state)
        if sheet is not None:
            store.save_sheet(self.index, sheet)
