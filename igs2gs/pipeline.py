"""The Instruct-GS2GS loop: every ``gs_steps`` steps, render all training views, edit, swap in.

Between sweeps this is plain splatfacto training on the working set. A sweep renders each view
from the current splats with a fixed background, edits the renders in batches (the original photo
conditions the edit), swaps the edits into the datamanager and stores each one atomically with
the sweep progress, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import Counter
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Literal, Optional, Protocol, Sequence, Tuple, Type

import torch
from torch import Tensor
from torch.cuda.amp.grad_scaler import GradScaler

from igs2gs.datamanager import IGS2GSDataManagerConfig, without_point_cloud
from igs2gs.edit_store import EditStore, SweepState
from igs2gs.edit_workers import EditJob, EditResult, EditWorkers, WarmUp
from igs2gs.model import IGS2GSModelConfig
from igs2gs.oracle import OracleEditor, OracleEditorConfig
from igs2gs.sweep import Sweep
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from nerfstudio.utils.rich_utils import CONSOLE

DEFAULT_PROMPT = "don't change the image"
DEFAULT_IP2P_MODEL = "timbrooks/instruct-pix2pix"


class Editor(Protocol):
    """What the pipeline needs of an editor: ``InstructPix2Pix.edit``'s contract (renders and
    originals float [B,3,H,W] in [0,1], the prompt, the edit settings, ``generator`` and
    ``cond_keys`` by keyword; returns the edits, same shape)."""

    def edit(self, renders: Tensor, originals: Tensor, prompt: str, **settings) -> Tensor: ...


@dataclass
class IGS2GSPipelineConfig(VanillaPipelineConfig):
    """Instruct-GS2GS: splatfacto trained on views that InstructPix2Pix re-edits every few thousand steps."""

    _target: Type = field(default_factory=lambda: IGS2GSPipeline)
    datamanager: IGS2GSDataManagerConfig = field(default_factory=IGS2GSDataManagerConfig)
    """Datamanager holding the original photos and the edited working set."""
    model: IGS2GSModelConfig = field(default_factory=IGS2GSModelConfig)
    """Splatfacto model trained on the edited views."""
    prompt: str = DEFAULT_PROMPT
    """The edit instruction, e.g. 'make him a marble statue'."""
    guidance_scale: float = 12.5
    """Text guidance: how strongly the edit follows the instruction."""
    image_guidance_scale: float = 1.5
    """Image guidance: how strongly the edit stays close to the original photo."""
    gs_steps: int = 2500
    """Steps between sweeps; each sweep re-edits every training view from the current splats."""
    diffusion_steps: int = 20
    """DDIM denoising steps per edit."""
    lower_bound: float = 0.70
    """Lowest noise level (fraction of the diffusion timesteps) a render is noised to before editing."""
    upper_bound: float = 0.98
    """Highest noise level (fraction of the diffusion timesteps) a render is noised to before editing."""
    editor: Literal["ip2p", "oracle"] = "ip2p"
    """Editor of the sweeps: InstructPix2Pix, or the oracle (a known colour edit of the photos, for benchmarks)."""
    oracle: OracleEditorConfig = field(default_factory=OracleEditorConfig)
    """Settings of the oracle editor."""
    ip2p_model: str = DEFAULT_IP2P_MODEL
    """InstructPix2Pix weights: a Hugging Face hub id or a local diffusers folder."""
    ip2p_device: Optional[str] = None
    """Device of the editor (e.g. cuda:1); default: the training device."""
    ip2p_devices: Optional[str] = None
    """Several editor devices, comma-separated (e.g. cuda:1,cuda:2): one editor replica on each, a sweep's batches shared among them (overrides ip2p-device)."""
    overlap_edits: bool = False
    """Keep training while a sweep's edits are made (own thread and CUDA stream per editor); each edit is swapped in as it finishes. Default: training waits for the sweep, as in Instruct-GS2GS."""
    ip2p_use_full_precision: bool = False
    """Run the editor in float32 instead of float16 (twice the memory, slower)."""
    ip2p_cpu_offload: bool = False
    """Keep the editor's sub-models on the CPU until used (for GPUs with little memory; much slower)."""
    ip2p_max_batch_size: Optional[int] = None
    """Most views edited at once; default: 16, or fewer if free GPU memory asks (an out-of-memory error halves it)."""
    ip2p_compile: Optional[bool] = None
    """Run the editor's UNet and VAE (CUDA) from packages compiled ahead of time for the sweeps' batch shape: faster edits. True: compile those not yet made (the first run for a shape, model architecture and GPU type: minutes; later runs load them in seconds from ~/.cache/igs2gs/packages or $IGS2GS_PACKAGE_DIR; without a working compiler the editor stays eager, logged; not with --pipeline.ip2p-cpu-offload). None (default): use the packages an earlier run compiled, else edit eagerly. False: always eagerly."""
    ip2p_cuda_graph: bool = True
    """Replay the compiled UNet (--pipeline.ip2p-compile's packages, CUDA) from a CUDA graph captured in the editor's warm-up: one launch per call instead of hundreds, made with Python's GIL released (a direct package call holds it while launching). On an H100 (stone_horse, two alternating pairs): sweeps 34.6 vs 35.3-35.7 s, 0.151 vs 0.154-0.155 s per edit, peak GPU memory 5.28 vs 6.10 GB. False: call the package directly. A failed capture is logged and the package called directly."""
    edit_seed: int = 0
    """Seed of the edit noise; each (sweep, view) gets its own stream, so a resumed sweep makes the same edits."""
    sheet_views: int = 4
    """Views shown (original | render | edit) on the before/after sheet written after each sweep."""


def edit_generator(seed: int, sweep: int, view: int) -> torch.Generator:
    """The noise stream of one view's edit in one sweep (also what ``igs2gs-preview`` gives a view)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + sweep * 100_003 + view) % (2**63))


def _size_groups(view_ids: Sequence[int], sizes: Sequence[Tuple[int, int]], limit: int) -> List[List[int]]:
    """Edit batches: views of one image size, at most ``limit`` per batch, batches of even length
    (73 views by 8 make ten batches of 7-8, not nine of 8 and a slow one of 1)."""
    by_size: Dict[Tuple[int, int], List[int]] = {}
    for view in view_ids:
        by_size.setdefault(tuple(sizes[view]), []).append(view)
    groups: List[List[int]] = []
    for views in by_size.values():
        count = -(-len(views) // limit)
        for index in range(count):
            groups.append(views[index * len(views) // count : (index + 1) * len(views) // count])
    return groups


class IGS2GSPipeline(VanillaPipeline):
    """Splatfacto pipeline with the sweep schedule of Instruct-GS2GS."""

    config: IGS2GSPipelineConfig

    def __init__(
        self,
        config: IGS2GSPipelineConfig,
        device: str,
        test_mode: Literal["test", "val", "inference"] = "val",
        world_size: int = 1,
        local_rank: int = 0,
        grad_scaler: Optional[GradScaler] = None,
    ) -> None:
        if config.model.seed_points_used is not None:  # the model's start is a placeholder for the checkpoint's
            without_point_cloud(config.datamanager.dataparser)
        super().__init__(config, device, test_mode, world_size, local_rank, grad_scaler)
        # What sweep renders show where nothing is drawn (the viewer re-sets the model's to its own colour).
        self.datamanager.background = self.model.background_color.clone()
        self.prompt = config.model.prompt or config.prompt
        self.editor: Optional[Editor] = None
        self.edit_store: Optional[EditStore] = None
        self.sweep_state: Optional[SweepState] = None
        self.sweep_timings: List[Dict[str, float]] = []
        # Steering from the viewer: set by its panel's callbacks, applied by the training thread.
        self.status = "waiting for the first sweep"
        self.train_lock: Optional[threading.Lock] = None  # the viewer's; released while IP2P runs
        self.editing_paused = False
        self.edit_end_step: Optional[int] = None
        self._requested_settings: Optional[Dict[str, object]] = None
        self._sweep_requested = False
        self._persist: Optional[ThreadPoolExecutor] = None
        self.pending_writes: List[Future] = []  # edit, state and sheet writes queued on the persist thread
        self.editors: List[Editor] = []
        self.edit_workers: Optional[EditWorkers] = None
        self._sweep_in_flight: Optional[Sweep] = None
        self.warm_up: Optional[WarmUp] = None  # the editors' first-use costs, paid beside set-up
        self._step_clock: Tuple[int, float, float] = (-1, 0.0, 0.0)  # last step, its time, seconds per step
        if test_mode == "val":  # training; the viewer, ns-render and ns-export never load the editor
            from igs2gs.viewer_controls import EditControls

            if config.editor == "ip2p":
                advice = self.datamanager.view_size_advice()
                if advice is not None:
                    CONSOLE.log(f"[yellow]igs2gs: {advice}.")
            self.editors = [self._load_editor(device) for device in editor_devices(config, str(self.device))]
            if config.editor == "ip2p":
                self._compile_editors()
                self.warm_up = self._warm_up_in_background()
            self.editor = self.editors[0]
            if len(self.editors) > 1 or config.overlap_edits:
                self.edit_workers = EditWorkers(self.editors, lambda: (self.prompt, self._edit_kwargs()))
            self.edit_controls = EditControls(self)

    def _load_editor(self, device: str) -> Editor:
        from igs2gs.ip2p import InstructPix2Pix

        if self.config.editor == "oracle":
            CONSOLE.log(f"Editing with the oracle ({self.config.oracle.transform}), not InstructPix2Pix")
            return OracleEditor(self.config.oracle, device)
        CONSOLE.log(f"Loading InstructPix2Pix from {self.config.ip2p_model} onto {device}")
        return InstructPix2Pix.from_pretrained(
            self.config.ip2p_model,
            device=device,
            dtype=torch.float32 if self.config.ip2p_use_full_precision else torch.float16,
            cpu_offload=self.config.ip2p_cpu_offload,
            max_batch_size=self.config.ip2p_max_batch_size,
            packages={True: "compile", None: "cached", False: "off"}[self.config.ip2p_compile],
            unet_cuda_graph=self.config.ip2p_cuda_graph,
        )

    def _full_sweep_batches(self) -> Tuple[List[Tuple[int, int]], List[List[int]]]:
        """Every training view's size, and the edit batches a sweep of all views makes (``_size_groups``)."""
        sizes = self._view_sizes()
        return sizes, _size_groups(range(len(sizes)), sizes, self.edit_batch_limit)

    def _compile_editors(self) -> None:
        """Load (or, with ``--pipeline.ip2p-compile True``, compile) each editor's packages for the sweeps' batch shape
        now, in this thread: export and compilation are not thread-safe, and overlapped or multi-device sweeps edit in
        threads. The shape is the largest batch of the most common view size, so the sweeps' evened batches pad little
        (73 views by 16: batches of 14-15 padded to 15, 75 rows edited, not 80)."""
        compiled = [editor for editor in self.editors if getattr(editor, "compiled", False)]
        if not compiled:
            return
        sizes, groups = self._full_sweep_batches()
        (height, width), _ = Counter(sizes).most_common(1)[0]
        batch = max(len(group) for group in groups if sizes[group[0]] == (height, width))
        for editor in compiled:
            doing = "Preparing" if editor.compile_missing else "Looking for"
            CONSOLE.log(f"{doing} the compiled InstructPix2Pix UNet and VAE on {editor.device} for batches of {batch} {width}x{height} views")
            editor.prepare_compiled(batch, height, width, self.prompt)
            if not editor.compiled and not editor.compile_missing:
                CONSOLE.log("InstructPix2Pix edits eagerly: --pipeline.ip2p-compile True compiles it for these batches once "
                            "(minutes), for faster edits in this run and the later ones (on an H100: 0.15 vs 0.21 s per edit)")

    def _warm_up_in_background(self) -> Optional[WarmUp]:
        """Start warming the CUDA editors up for the first sweep's batch shapes and encoding the photos' condition
        latents (the trainer sets up meanwhile)."""
        sizes, groups = self._full_sweep_batches()
        shapes = sorted({(len(group), *sizes[group[0]]) for group in groups})
        editors = [editor for editor in self.editors if self._needs_warm_up(editor, shapes)]
        if not editors:
            return None
        # ``original_images`` was cached by ``_view_sizes`` in this thread, before a resume swaps stored edits in.
        photos = lambda device: ((group, self.datamanager.originals(group, device)) for group in groups)  # noqa: E731
        return WarmUp(editors, shapes, self.prompt, conditions=photos)

    @staticmethod
    def _needs_warm_up(editor: Editor, shapes: Sequence[Tuple[int, int, int]]) -> bool:
        """CUDA editors whose GPU has room for the largest warm-up batch twice over: the scene and its optimizer
        state load beside it (on a small GPU the first sweep pays its set-up instead, as without a warm-up)."""
        from igs2gs.ip2p import edit_bytes

        device = torch.device(getattr(editor, "device", "cpu"))
        if device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(device)
        return free >= 2 * max(edit_bytes(*shape) for shape in shapes)

    def _finish_warm_up(self) -> float:
        """Wait for the editors' warm-up, if one is running; returns the seconds waited."""
        warm_up, self.warm_up = self.warm_up, None
        if warm_up is None:
            return 0.0
        with self._viewer_unlocked():
            waited = warm_up.wait()
        if warm_up.error is not None:
            CONSOLE.log(f"[yellow]igs2gs: warming InstructPix2Pix up failed ({warm_up.error}); the first sweep pays its set-up")
        else:
            CONSOLE.log(f"Warmed InstructPix2Pix up beside set-up in {warm_up.seconds:.1f} s: {warm_up.describe()}")
        return waited

    def _view_sizes(self) -> List[Tuple[int, int]]:
        """(height, width) of each training view, in view-id order."""
        return [(int(image.shape[0]), int(image.shape[1])) for image in self.datamanager.original_images]

    @property
    def edit_batch_limit(self) -> int:
        """Views per edit batch. On an H100, 16 512² views take 5.7 GB of editor memory (batch 8: 4.6 GB)
        and 0.208 s per edit eager (batch 8: 0.219 s)."""
        return self.config.ip2p_max_batch_size or 16

    @property
    def editor_device(self) -> torch.device:
        return torch.device(getattr(self.editor, "device", self.device))

    # ------------------------------------------------------------------------- state
    def start_editing(self, store: EditStore, loaded_step: int, edit_steps: int, previous: Optional[EditStore] = None) -> None:
        """Attach the run's edit store; when resuming, restore the stored edits into the working set.

        The edit ends ``edit_steps`` after the step it started from (recorded, so that a checkpoint
        from its end is known as a finished edit)."""
        if previous is not None:
            store.adopt(previous)
        given = self.edit_settings()  # from the command line
        names = self.datamanager.image_names
        state = store.load_state()
        if state is None:
            state = SweepState(edit_start_step=loaded_step, image_names=names)
        elif state.image_names != names:
            raise ValueError(
                f"The edits in {store.folder} belong to other training views ({len(state.image_names)} views, first "
                f"{state.image_names[:2]}) than --data gives ({len(names)} views, first {names[:2]}). "
                "Resume with the data the edit was started on."
            )
        else:
            edits = store.load_edits()
            self.datamanager.replace_uint8({view: torch.from_numpy(image) for view, image in edits.items()})
            where = f", sweep {state.sweep_in_progress} resumes after {len(state.views_done)} views" if state.sweep_in_progress is not None else ""
            CONSOLE.log(f"Restored {len(edits)} edited views from {store.folder} ({state.sweeps_completed} sweeps done{where})")
            # A setting keeps its recorded value (e.g. set in the viewer) unless the command line changed it since the
            # edit last started (a state file from before command settings were recorded keeps them all).
            unchanged = lambda key: given.get(key) == state.command_settings.get(key, given.get(key))  # noqa: E731
            kept = {key: value for key, value in state.settings.items() if unchanged(key)}
            if kept and {**given, **kept} != given:
                self._apply_settings(kept, "as last set in the run being resumed; a value changed on the command line wins")
        state.settings, state.command_settings = self.edit_settings(), given
        state.edit_end_step = self.edit_end_step = state.edit_start_step + edit_steps
        self.edit_store, self.sweep_state = store, state
        store.save_state(state)

    def edit_settings(self) -> Dict[str, object]:
        return {
            "prompt": self.prompt,
            "guidance_scale": self.config.guidance_scale,
            "image_guidance_scale": self.config.image_guidance_scale,
        }

    def _apply_settings(self, settings: Dict[str, object], why: str) -> None:
        self.prompt = str(settings.get("prompt", self.prompt))
        self.config.guidance_scale = float(settings.get("guidance_scale", self.config.guidance_scale))  # type: ignore[arg-type]
        self.config.image_guidance_scale = float(settings.get("image_guidance_scale", self.config.image_guidance_scale))  # type: ignore[arg-type]
        CONSOLE.log(
            f"igs2gs: instruction {self.prompt!r}, guidance {self.config.guidance_scale}, "
            f"image guidance {self.config.image_guidance_scale} ({why})"
        )

    # ------------------------------------------------------------------------- viewer requests
    def request_settings(self, prompt: str, guidance_scale: float, image_guidance_scale: float) -> None:
        """Ask for new edit settings from the next edit on (viewer thread; returns at once)."""
        if not prompt.strip():
            self.status = "an empty instruction was ignored"
            return
        self._requested_settings = {"prompt": prompt, "guidance_scale": guidance_scale, "image_guidance_scale": image_guidance_scale}

    def request_sweep(self) -> None:
        """Ask for a sweep of all views at the next training step (viewer thread; returns at once)."""
        self._sweep_requested = True
        self.status = "re-edit of all views requested"

    def set_editing_paused(self, paused: bool) -> None:
        """Hold sweeps back (a running sweep stops after its current batch and resumes later)."""
        self.editing_paused = paused
        if self.edit_workers is not None and self.config.overlap_edits:
            # An overlapped sweep queued all its batches at once: hold those not started yet.
            self.edit_workers.pause(paused)
        self.status = "editing paused" if paused else "editing resumed"

    def apply_viewer_requests(self) -> None:
        """Apply settings asked for in the viewer (training thread): logged and recorded in the run."""
        requested, self._requested_settings = self._requested_settings, None
        if requested is None or requested == self.edit_settings():
            return
        self._apply_settings(requested, "set in the viewer")
        if self.sweep_state is not None and self.edit_store is not None:
            self.sweep_state.settings = self.edit_settings()
            # Queued behind the edits being written, so the state file ends with the new settings.
            self.pending_writes.append(self._persist_thread().submit(self.edit_store.save_state, self.sweep_state.snapshot()))

    def _update_status(self, step: int) -> None:
        """Status between sweeps: sweeps done, time to the next one (at the measured step rate)."""
        last_step, last_time, per_step = self._step_clock
        now = time.perf_counter()
        if step == last_step + 1:
            per_step = (now - last_time) if per_step == 0 else 0.9 * per_step + 0.1 * (now - last_time)
        self._step_clock = (step, now, per_step)
        state = self.sweep_state
        if state is None or step % 10:
            return
        if self.editing_paused:
            self.status = f"editing paused · {state.sweeps_completed} of {self.planned_sweeps()} sweeps done"
            return
        steps_left = self.config.gs_steps - (step - state.edit_start_step - 1) % self.config.gs_steps
        when = f"next sweep in {steps_left} steps (~{steps_left * per_step:.0f} s)"
        if self.edit_end_step is not None and step + steps_left > self.edit_end_step:
            when = "no sweep left"
        self.status = f"sweep {state.sweeps_completed} of {self.planned_sweeps()} done · {when}"

    def planned_sweeps(self) -> int:
        """Sweeps the edit will have made by its last step (more if some were asked for in the viewer)."""
        state = self.sweep_state
        assert state is not None
        if self.edit_end_step is None:
            return state.sweeps_completed
        return max(state.sweeps_completed, math.ceil((self.edit_end_step - state.edit_start_step) / self.config.gs_steps))

    @contextlib.contextmanager
    def _viewer_unlocked(self):
        """Let the viewer draw while IP2P runs (the splats do not change during a sweep).

        nerfstudio's trainer holds ``train_lock`` around every training iteration, so a sweep (run
        from ``get_train_loss_dict``) always runs with the lock held by this thread."""
        lock = self.train_lock
        if lock is None or not lock.locked():
            yield
            return
        lock.release()
        try:
            yield
        finally:
            lock.acquire()

    def sweep_due(self, step: int) -> Optional[int]:
        """Index of the sweep to run before training ``step``, if any."""
        state = self.sweep_state
        if state is None or self.editor is None or self.editing_paused or self._sweep_in_flight is not None:
            return None
        if state.sweep_in_progress is not None:
            return state.sweep_in_progress
        if self._sweep_requested:
            self._sweep_requested = False
            return state.sweeps_completed
        since_start = step - state.edit_start_step - 1
        if since_start >= 0 and since_start % self.config.gs_steps == 0 and state.last_sweep_step < step:
            return state.sweeps_completed
        return None

    # ------------------------------------------------------------------------- training
    def get_train_loss_dict(self, step: int):
        self.raise_failed_writes()
        self.collect_edits(step)
        self.apply_viewer_requests()
        sweep = self.sweep_due(step)
        if sweep is not None:
            self.run_sweep(sweep, step)
        self._update_status(step)
        return super().get_train_loss_dict(step)

    @contextlib.contextmanager
    def fixed_background(self) -> Iterator[None]:
        """Inside, the model renders over the datamanager's background: the nerfstudio viewer sets the model's to the
        colour chosen in its panel before drawing, and that choice must not change edits or metrics."""
        viewer_background, self.model.background_color = self.model.background_color, self.datamanager.background
        try:
            yield
        finally:
            self.model.background_color = viewer_background

    @torch.no_grad()
    def _render(self, view_ids: Sequence[int]) -> Tensor:
        """Renders of ``view_ids`` from the current splats, float [B, 3, H, W], over the fixed background."""
        self.model.eval()  # again each time: the viewer puts the model back in training mode after drawing
        with self.fixed_background():
            renders = [self.model.get_outputs_for_camera(self.training_camera(v))["rgb"] for v in view_ids]
        return torch.stack(renders).permute(0, 3, 1, 2).clamp(0, 1)

    def training_camera(self, view: int) -> Cameras:
        """Training view ``view``'s camera with the camera optimizer's pose correction, as training renders it
        (splatfacto applies the correction in training mode only; sweeps render in eval mode)."""
        camera = self.datamanager.train_dataset.cameras[view : view + 1]  # a new Cameras: the dataset's stay as they are
        optimizer = self.model.camera_optimizer
        if optimizer.config.mode != "off":
            camera.metadata = {**(camera.metadata or {}), "cam_idx": view}
            camera.camera_to_worlds = optimizer.apply_to_camera(camera)
        return camera

    def run_sweep(self, sweep: int, step: int) -> None:
        """Render, edit and swap in every training view not yet edited in this sweep."""
        assert self.editor is not None and self.edit_store is not None and self.sweep_state is not None
        current = Sweep(self, sweep, step, self._persist_thread())
        current.timings["warm_up_wait_s"] = self._finish_warm_up()
        groups = _size_groups(current.todo, self._view_sizes(), self.edit_batch_limit)
        was_training = self.model.training
        try:
            if self.edit_workers is None:
                self._edit_in_turn(current, groups)
            elif self.config.overlap_edits:
                # Every batch is rendered before the first is edited: renders made beside a running editor wait for
                # the GPU it fills, and training waits for the renders.
                for job in [self._job(current, group) for group in groups]:
                    self.edit_workers.submit(job)
                self._sweep_in_flight = current  # training goes on; collect_edits swaps edits in as they finish
                return
            else:
                self._edit_on_replicas(current, groups)
        finally:
            self.model.train(was_training)
        current.close()

    @contextlib.contextmanager
    def _progress_bar(self, current: Sweep):
        """The sweep's console progress bar (views done, edits/s, ETA); yields the function that redraws it."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (
            TextColumn(f"[bold]igs2gs sweep {current.index + 1}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("views · {task.fields[rate]:.2f} edits/s · ETA"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=CONSOLE) as progress:
            task = progress.add_task("sweep", total=current.views, completed=current.done, rate=0.0)
            yield lambda: progress.update(task, completed=current.done, rate=current.rate)

    def _edit_in_turn(self, current: Sweep, groups: List[List[int]]) -> None:
        """One editor, training waiting (the reference's behaviour): render a batch, edit it, store it."""
        assert self.editor is not None
        with self._progress_bar(current) as show_progress:
            for group in groups:
                self.apply_viewer_requests()
                if self.editing_paused:
                    break
                renders = self._timed_render(current, group)
                started = time.perf_counter()
                with self._viewer_unlocked():
                    edits = self.editor.edit(
                        renders.to(self.editor_device),
                        self.datamanager.originals(group, self.editor_device),
                        self.prompt,
                        generator=self._generators(current, group),
                        cond_keys=list(group),
                        **self._edit_kwargs(),
                    )
                current.store(group, renders, edits, time.perf_counter() - started)
                show_progress()

    def _edit_on_replicas(self, current: Sweep, groups: List[List[int]]) -> None:
        """Several editors: keep each busy (two batches queued per replica), store edits as they come back."""
        assert self.edit_workers is not None
        waiting = list(groups)
        with self._progress_bar(current) as show_progress:
            while waiting or self.edit_workers.outstanding:
                self.apply_viewer_requests()
                while waiting and not self.editing_paused and self.edit_workers.outstanding < 2 * len(self.editors):
                    self._submit(current, waiting.pop(0))
                if not self.edit_workers.outstanding:  # paused with nothing in flight: the sweep resumes later
                    break
                with self._viewer_unlocked():
                    finished = self.edit_workers.results(block=True)
                self._store_results(current, finished)
                show_progress()

    def collect_edits(self, step: int) -> None:
        """With ``overlap_edits``: swap in the edits finished since the last step; close the sweep when all
        are in. At the edit's last step, wait for the rest, so that none is lost; if editing is paused
        then, wait only for the batches being edited, and leave the sweep for a resumed run to finish."""
        current = self._sweep_in_flight
        if current is None or self.edit_workers is None:
            return
        last_step = self.edit_end_step is not None and step >= self.edit_end_step
        while True:
            held = self.editing_paused and not self.edit_workers.busy
            self._store_results(current, self.edit_workers.results(block=last_step and not held))
            if current.done == current.views or not last_step or not self.edit_workers.outstanding or held:
                break
        if current.done == current.views or last_step:
            self._sweep_in_flight = None
            current.close()

    def _store_results(self, current: Sweep, finished: List[EditResult]) -> None:
        for result in finished:
            assert result.edits is not None
            current.store(result.job.views, result.job.renders, result.edits, result.seconds)

    def _submit(self, current: Sweep, group: List[int]) -> None:
        assert self.edit_workers is not None
        self.edit_workers.submit(self._job(current, group))

    def _job(self, current: Sweep, group: List[int]) -> EditJob:
        """The editor threads' work for ``group``: its views rendered now, their photos and noise streams."""
        renders = self._timed_render(current, group).cpu()  # on the CPU: the workers' streams read it safely
        originals = self.datamanager.originals(group, torch.device("cpu"))
        return EditJob(list(group), renders, originals, self._generators(current, group))

    def _generators(self, current: Sweep, group: Sequence[int]) -> List[torch.Generator]:
        """One noise stream per (sweep, view): the same edits in any batching, on any replica, after a resume."""
        return [edit_generator(self.config.edit_seed, current.index, view) for view in group]

    def _timed_render(self, current: Sweep, group: Sequence[int]) -> Tensor:
        started = time.perf_counter()
        renders = self._render(group)
        current.timings["render_s"] += time.perf_counter() - started
        return renders

    def _edit_kwargs(self) -> Dict[str, object]:
        return {
            "guidance_scale": self.config.guidance_scale,
            "image_guidance_scale": self.config.image_guidance_scale,
            "diffusion_steps": self.config.diffusion_steps,
            "lower_bound": self.config.lower_bound,
            "upper_bound": self.config.upper_bound,
        }

    def raise_failed_writes(self, wait: bool = False) -> None:
        """Re-raise the first failed write (a full disk must stop the run, not lose edits silently);
        with ``wait``, first wait until everything queued is on disk."""
        if wait:
            futures.wait(self.pending_writes)
        pending, self.pending_writes = self.pending_writes, []
        for write in pending:  # one done() check per write: one finishing meanwhile is neither lost nor raised twice
            if write.done():
                write.result()
            else:
                self.pending_writes.append(write)

    def store_after(self, write: Future) -> None:
        """Write the edits and progress queued from now on only once ``write`` has finished (the persist thread
        waits for it, training does not); a failure of ``write`` is raised as a failed edit write."""
        self.pending_writes.append(self._persist_thread().submit(write.result))

    def _persist_thread(self) -> ThreadPoolExecutor:
        """The one thread that writes edits and progress, in order (edits of a batch before the state that counts them)."""
        if self._persist is None:
            self._persist = ThreadPoolExecutor(max_workers=1, thread_name_prefix="igs2gs-store")
        return self._persist


def check_prompt(prompt: str) -> None:
    """Refuse an empty instruction; warn about the default one, which asks for no change."""
    if not prompt or not prompt.strip():
        raise ValueError("The edit instruction is empty: pass one with --pipeline.prompt \"make him a marble statue\".")
    if prompt.strip() == DEFAULT_PROMPT:
        CONSOLE.print(
            f"[bold yellow]Warning: the instruction is the default {DEFAULT_PROMPT!r}, which asks for no change. "
            "Pass your edit with --pipeline.prompt \"...\"."
        )


def editor_devices(config: IGS2GSPipelineConfig, training_device: str) -> List[str]:
    """The editors' devices: ``ip2p_devices``, else ``ip2p_device``, else the training device."""
    listed = config.ip2p_devices or config.ip2p_device or training_device
    return [device.strip() for device in listed.split(",") if device.strip()]


def schedule_problems(lower_bound: float, upper_bound: float, diffusion_steps: int, prefix: str = "--pipeline.") -> List[str]:
    """What is wrong with an edit's noise bounds and step count, each named by its flag (``prefix`` + name)."""
    problems = []
    if not 0.0 <= lower_bound <= upper_bound <= 1.0:
        problems.append(
            f"{prefix}lower-bound {lower_bound} and {prefix}upper-bound {upper_bound}: "
            "need 0 <= lower-bound <= upper-bound <= 1 (fractions of the diffusion timesteps)"
        )
    if diffusion_steps < 1:
        problems.append(f"{prefix}diffusion-steps {diffusion_steps}: must be at least 1")
    return problems


def device_problem(device: str) -> Optional[str]:
    """``'<device>: why it cannot run an editor here'``, or None when it can."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        return f"{device!r}: not a torch device (e.g. cuda:1)"
    count = torch.cuda.device_count()
    if parsed.type == "cuda" and (parsed.index or 0) >= count:
        return f"{device}: " + (f"this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}" if count else "no CUDA device is available")
    return None


def check_edit_settings(config: IGS2GSPipelineConfig, training_device: str) -> None:
    """Refuse settings the first sweep would fail on, before the scene and the editor load (which takes
    tens of seconds), with every problem named by its flag."""
    problems = schedule_problems(config.lower_bound, config.upper_bound, config.diffusion_steps)
    for flag, count in (("gs-steps", config.gs_steps), ("ip2p-max-batch-size", config.ip2p_max_batch_size)):
        if count is not None and count < 1:
            problems.append(f"--pipeline.{flag} {count}: must be at least 1")
    if config.sheet_views < 0:
        problems.append(f"--pipeline.sheet-views {config.sheet_views}: must be 0 or more")
    for flag, scale in (("guidance-scale", config.guidance_scale), ("image-guidance-scale", config.image_guidance_scale)):
        if not math.isfinite(scale):
            problems.append(f"--pipeline.{flag} {scale}: must be a finite number")
    if config.ip2p_compile and config.ip2p_cpu_offload and config.editor == "ip2p":
        problems.append("--pipeline.ip2p-compile with --pipeline.ip2p-cpu-offload: the compiled packages read the weights "
                        "where they were at load, and offloading moves them (choose one)")
    for device in editor_devices(config, training_device):
        problem = device_problem(device)
        if problem is not None:
            problems.append(f"editor device {problem} (--pipeline.ip2p-device / --pipeline.ip2p-devices)")
    if problems:
        raise ValueError("igs2gs cannot start with these settings:\n  " + "\n  ".join(problems))
