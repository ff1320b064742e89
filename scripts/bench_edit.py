"""Time a full igs2gs edit of a reconstructed scene on one GPU and split the wall time.

Loads a splatfacto checkpoint, runs the default edit (3 sweeps, 7500 steps unless told otherwise)
in this process and prints: model set-up, per-sweep render / IP2P / store seconds (and the
slowest and fastest edit batch: the first batch of each shape pays its CUDA/cuDNN set-up), splat
training seconds and steps/s between sweeps (with a profile of the step times and the time Python's
garbage collector took), when the editors' warm-up thread ran against the start of training, total wall
time and peak GPU memory; JSON with ``--json``. With the random
sd15 editor (``make_random_ip2p.py --shape sd15``) the timings are real and the edits are noise;
``--train-on oracle`` times the sd15 editor on every view of every sweep but trains on the oracle
editor's images, so the splats behave as in a real edit.

In the same run, ``--reference-views K`` times K views of a reference-style sweep (one view at a
time: render, edit at batch 1 with CPU offload, attention slicing and re-encoded conditioning,
swap) and projects the reference-style total as set-up + 3 sweeps of that + the same splat
training (which favours the reference: its LPIPS runs in float32); ``--reference-steps N`` also times N
training steps made the reference's way after the edit and projects a second total with the edit's
steps each longer by the difference of the median steps.

    python scripts/bench_edit.py --data DATA --load-dir RUN/nerfstudio_models --ip2p-model DIR
"""

from __future__ import annotations

import argparse
import cProfile
import contextlib
import gc
import json
import os
import pstats
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

IMPORTS_STARTED = time.perf_counter()  # torch and nerfstudio's engine are imported before set-up's clock starts
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from edit_run import edit_trainer  # noqa: E402
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation  # noqa: E402


class ShadowEditor:
    """Runs the timed editor on every view and returns the oracle's edits of the same views."""

    def __init__(self, timed, oracle) -> None:
        self.timed, self.oracle, self.device = timed, oracle, timed.device

    def edit(self, renders, originals, prompt, **settings):
        self.timed.edit(renders, originals, prompt, **settings)
        return self.oracle.edit(renders, originals, prompt, **settings)


COMPILE_MODES = {"on": True, "cached": None, "off": False}  # --compile -> --pipeline.ip2p-compile
AFTER_SWEEP_STEPS = 300  # steps after a sweep whose excess time step_time_profile also reports apart


def step_time_profile(ends: List[float], first_step: int, sweep_steps: Sequence[int], profiled: Sequence[int] = ()) -> Dict[str, object]:
    """Where training time goes, from the wall-clock end of each step (``ends[i]`` ends step ``first_step + i``).

    Steps that ran a sweep and the ``profiled`` ones are left out; ``excess_s`` is what the other steps took beyond
    the median step (checkpoint saves, the steps after a sweep, graph capture), ``slowest`` names them, and
    ``excess_after_sweeps_s`` is the part of it in the ``AFTER_SWEEP_STEPS`` steps after each sweep (while
    the sweep's edits are written to disk in a thread).
    """
    sweeps, left_out = set(sweep_steps), set(sweep_steps) | set(profiled)
    durations = [(first_step + i, ends[i] - ends[i - 1]) for i in range(1, len(ends)) if first_step + i not in left_out]
    if not durations:
        return {}
    ordered = sorted(seconds for _, seconds in durations)
    median = ordered[len(ordered) // 2]
    slowest = sorted(durations, key=lambda item: item[1], reverse=True)[:10]
    return {
        "median_ms": 1000 * median,
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "excess_s": sum(seconds - median for _, seconds in durations if seconds > median),
        "excess_after_sweeps_s": sum(
            seconds - median
            for step, seconds in durations
            if seconds > median and any(0 < step - sweep <= AFTER_SWEEP_STEPS for sweep in sweeps)
        ),
        "slowest": [{"step": step, "ms": round(1000 * seconds, 1)} for step, seconds in slowest],
    }


class GcClock:
    """Time spent in Python's cyclic garbage collector while installed (``gc.callbacks``), by generation.

    A full collection walks every object set-up left (nerfstudio, diffusers, torch: ~700k objects, 235-345 ms on
    the 2-core CPU machine): this says whether training steps wait for it. (On the CPU, 1,200 steps of a tiny
    oracle edit ran none: 149 young and 13 middle collections, 55 ms in all.)
    """

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.collections = [0, 0, 0]
        self.longest_s = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: Dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        seconds = time.perf_counter() - self._started
        self.seconds[info["generation"]] += seconds
        self.collections[info["generation"]] += 1
        self.longest_s = max(self.longest_s, seconds)

    def __enter__(self) -> "GcClock":
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self)

    def figures(self) -> Dict[str, object]:
        return {"seconds": sum(self.seconds), "by_generation_s": self.seconds, "collections": self.collections, "longest_ms": 1000 * self.longest_s}


class WarmUpClock:
    """When each editors' warm-up (``WarmUp``) made while installed began and ended (perf_counter): whether its thread
    still ran when training began; and what its time went to (``WarmUp.parts``). With packages, the time before the
    first step was 1.47-1.58 s against 0.26-0.39 s eager (H100, 2026-12-07), and 6.5 s for stone_horse in the fifth
    session, whose warm-up took 7.5 s; a guess to check: a package's first call holds the GIL while its kernels load,
    stalling the viewer's scene set-up beside it."""

    def __init__(self) -> None:
        self.spans: List[Tuple[float, float]] = []
        self.parts: List[Dict[str, float]] = []  # per warm-up: what it did -> seconds (``WarmUp.parts``)

    def __enter__(self) -> "WarmUpClock":
        from igs2gs.edit_workers import WarmUp

        self._run = run = WarmUp._run
        spans, parts = self.spans, self.parts

        def stamped(warm_up: WarmUp, *args: object) -> None:
            started = time.perf_counter()
            try:
                run(warm_up, *args)
            finally:
                spans.append((started, time.perf_counter()))
                parts.append(dict(warm_up.parts))

        WarmUp._run = stamped  # type: ignore[method-assign] - the thread's target, bound when a WarmUp is made
        return self

    def __exit__(self, *exc_info: object) -> None:
        from igs2gs.edit_workers import WarmUp

        WarmUp._run = self._run  # type: ignore[method-assign]


class StepWindow:
    """Calls ``start()`` before step ``first`` and ``stop()`` after step ``first + steps - 1`` (the device synchronised
    at both ends); install ``before``/``after`` as training callbacks. ``result``: ``stop()``'s figures and the wall
    time per step."""

    def __init__(self, first: int, steps: int, rows: int = 15) -> None:
        self.first, self.steps, self.rows = first, steps, rows
        self.result: Dict[str, object] = {}
        self._started: Optional[float] = None

    @property
    def steps_covered(self) -> range:
        """The profiled steps and the one after (it pays for the profiler's stop): step-time figures leave them out."""
        return range(self.first, self.first + self.steps + 1)

    @staticmethod
    def _synchronize() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def before(self, step: int) -> None:
        if step == self.first:
            self._synchronize()
            self.start()
            self._started = time.perf_counter()

    def after(self, step: int) -> None:
        if step == self.first + self.steps - 1 and self._started is not None:
            self._synchronize()
            wall_s = time.perf_counter() - self._started
            self.result = {"first_step": self.first, "steps": self.steps, "wall_ms_per_step": 1000 * wall_s / self.steps, **self.stop()}
            self._started = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> Dict[str, object]:
        raise NotImplementedError


class StepProfiler(StepWindow):
    """``torch.profiler`` over training steps: does a step wait for the GPU, or the GPU for the host?

    Reports wall time per profiled step (the profiler adds host time: compare ``step_times.median_ms``), the
    time per step at least one kernel or copy ran (``gpu_busy_ms_per_step``; the rest the GPU waited for the
    host), the longest kernels and host ops, how often per step the host waited for the device and from where.
    """

    SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense")

    def start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities, with_stack=True)
        self.profiler.__enter__()

    def stop(self) -> Dict[str, object]:
        self.profiler.__exit__(None, None, None)
        events = self.profiler.events()
        per_step = 1e-3 / self.steps  # profiler microseconds -> milliseconds per step
        on_device = [event for event in events if event.device_type != torch.autograd.DeviceType.CPU]
        busy_us, reach = 0.0, float("-inf")
        for start, end in sorted((event.time_range.start, event.time_range.end) for event in on_device):
            busy_us += max(0.0, end - max(start, reach))  # the union of the spans: streams may overlap
            reach = max(reach, end)
        kernels: Dict[str, List[float]] = {}
        for event in on_device:
            kernels.setdefault(event.name[:90], []).append(event.time_range.elapsed_us())
        waits: Dict[str, int] = {}
        for event in events:
            if event.name in self.SYNCS:
                frames = [frame for frame in self._callers(event) if "torch/" not in frame and "built-in" not in frame][:3]
                site = f"{event.name} <- " + " <- ".join(frames)
                waits[site] = waits.get(site, 0) + 1
        host = sorted((row for row in self.profiler.key_averages() if row.self_cpu_time_total > 0), key=lambda row: row.self_cpu_time_total, reverse=True)
        return {
            "gpu_busy_ms_per_step": busy_us * per_step,
            "kernels": [
                {"name": name, "ms_per_step": round(sum(spans) * per_step, 4), "calls_per_step": round(len(spans) / self.steps, 2)}
                for name, spans in sorted(kernels.items(), key=lambda item: sum(item[1]), reverse=True)[: self.rows]
            ],
            "host_ops": [
                {"name": row.key[:90], "ms_per_step": round(row.self_cpu_time_total * per_step, 4), "calls_per_step": round(row.count / self.steps, 2)}
                for row in host[: self.rows]
            ],
            "host_waits_per_step": {site: round(count / self.steps, 2) for site, count in sorted(waits.items(), key=lambda item: -item[1])},
        }

    @staticmethod
    def _callers(event) -> List[str]:
        """Python frames around an op, innermost first: its recorded stack, or (where the profiler records Python
        calls as events of their own) the chain of its parents."""
        if event.stack:
            return list(event.stack)
        frames, parent = [], event.cpu_parent
        while parent is not None:
            frames.append(parent.name)
            parent = parent.cpu_parent
        return frames


def python_profile_figures(profiler: cProfile.Profile, per: int, rows: int) -> Dict[str, object]:
    """The functions a cProfile run spent most time in, by own and by cumulative time, divided by ``per``."""
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive calls, own s, cumulative s, callers)

    def top(column: int) -> List[Dict[str, object]]:
        ranked = sorted(stats.items(), key=lambda item: item[1][column], reverse=True)[:rows]
        return [
            {
                "function": f"{Path(file).name}:{line}({name})",
                "own_ms": round(1000 * own / per, 4),
                "cumulative_ms": round(1000 * cumulative / per, 4),
                "calls": round(calls / per, 2),
            }
            for (file, line, name), (_, calls, own, cumulative, _) in ranked
        ]

    return {"by_own_time": top(2), "by_cumulative_time": top(3)}


class PythonStepProfiler(StepWindow):
    """``cProfile`` over training steps: which Python functions the host spends a step in (syncs included: a
    function that waits for the device holds the time), per step, by own time and by cumulative time."""

    def start(self) -> None:
        self.profiler = cProfile.Profile()
        self.profiler.enable()

    def stop(self) -> Dict[str, object]:
        self.profiler.disable()
        return {"per": "step", **python_profile_figures(self.profiler, self.steps, self.rows)}


def unet_calls(editor) -> str:
    """How the editor ran its UNet: "eager", "package" (called directly), "package, CUDA graph" or why not."""
    package = getattr(editor, "_packages", {}).get("unet")
    if package is None:
        return "eager"
    if package.graph_failed is not None:
        return f"package (CUDA graph capture failed: {package.graph_failed})"
    return "package, CUDA graph" if package.replaying else "package"


def adam_steps(optimizers) -> str:
    """How the Gaussians' Adam steps ran by the end: replayed from a CUDA graph, or eagerly (and why)."""
    from igs2gs.optimizer_graph import GraphedOptimizers

    if not isinstance(optimizers, GraphedOptimizers):
        return "eager"
    if optimizers.failed is not None:
        return f"eager after the CUDA graph was turned off ({optimizers.failed})"
    return "CUDA graph" if optimizers.captured else "eager (no capture yet)"


def reference_s_per_view(pipeline, model: str, views: int) -> float:
    """Seconds per view of a reference-style sweep: render, edit alone with offload, swap."""
    from igs2gs.ip2p import InstructPix2Pix

    editor = InstructPix2Pix.from_pretrained(
        model, device="cuda", cpu_offload=True, attention_slicing=True, max_batch_size=1, cache_conditioning=False
    )
    datamanager = pipeline.datamanager

    def one(view: int) -> None:
        render = pipeline._render([view])
        edit = editor.edit(render, datamanager.originals([view], "cuda"), pipeline.prompt, generator=torch.Generator().manual_seed(view))
        datamanager.replace([view], edit)

    pipeline.model.eval()
    one(0)  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    for view in range(views):
        one(view)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / views


def train_step(trainer, step: int) -> None:
    """One training step as ``Trainer.train`` makes it outside its logging: the callbacks before (splatfacto's hands
    the model its optimizers), the iteration, the callbacks after."""
    for callback in trainer.callbacks:
        callback.run_callback_at_location(step, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
    trainer.train_iteration(step)
    for callback in trainer.callbacks:
        callback.run_callback_at_location(step, location=TrainingCallbackLocation.AFTER_TRAIN_ITERATION)


REFERENCE_LOSS = {"lpips_bf16": False, "lpips_cuda_graph": False, "lpips_target_cache_mb": 0}
"""The model settings of a reference-style training step: LPIPS in float32, eager, the target through AlexNet every step."""


@contextlib.contextmanager
def reference_style_steps(trainer) -> Iterator[None]:
    """Inside, the trainer's steps are made as splatfacto with an LPIPS term makes them (the reference's training):
    ``REFERENCE_LOSS``, gsplat's checked inverse, the training metrics every step, nerfstudio's multi-tensor Adam,
    and no sweeps. The edit's settings come back after (its Adam fused again)."""
    import gsplat.rendering

    from igs2gs.model import use_unchecked_inverse_in_gsplat
    from igs2gs.optimizer_graph import GraphedOptimizers
    from igs2gs.trainer import use_fused_adam

    pipeline, model, optimizers = trainer.pipeline, trainer.pipeline.model, trainer.optimizers.optimizers
    kept = {name: getattr(model.config, name) for name in REFERENCE_LOSS}
    metrics_every, paused, gsplat_torch = model.training_metrics_every, pipeline.editing_paused, gsplat.rendering.torch
    if isinstance(trainer.optimizers, GraphedOptimizers):  # the edit is over: its Adam graph goes off for good
        trainer.optimizers.stop_replaying("reference-style steps after the edit")
    fused = {name: optimizer for name, optimizer in optimizers.items() if any(group.get("fused") for group in optimizer.param_groups)}
    devices = tuple({param.device.type for optimizer in fused.values() for group in optimizer.param_groups for param in group["params"]})
    use_fused_adam(fused, device_types=devices, fused=False)
    for name, value in REFERENCE_LOSS.items():
        setattr(model.config, name, value)
    model.training_metrics_every, pipeline.editing_paused = 1, True
    use_unchecked_inverse_in_gsplat(False)
    try:
        yield
    finally:
        for name, value in kept.items():
            setattr(model.config, name, value)
        model.training_metrics_every, pipeline.editing_paused, gsplat.rendering.torch = metrics_every, paused, gsplat_torch
        use_fused_adam(fused, device_types=devices)


def reference_style_step_ms(trainer, steps: int, warm: int = 3) -> float:
    """Median milliseconds from one step's end to the next over ``steps`` training steps made the reference's way
    (``reference_style_steps``), after ``warm`` unmeasured ones (their first-use costs), continuing after the edit's
    last step. The edit's ``step_times`` are timed so too, but inside ``Trainer.train``, whose own work between steps
    (its logging) these steps leave out: a little in the reference's favour."""
    if warm < 1 or steps < 1:
        raise ValueError(f"reference-style steps need warm >= 1 and steps >= 1, not {warm} and {steps}")
    first = trainer.step + 1
    ends: List[float] = []
    trainer.pipeline.model.train()
    with reference_style_steps(trainer):
        for step in range(first, first + warm + steps):  # the last unmeasured step's end starts the first gap
            train_step(trainer, step)
            if step >= first + warm - 1:
                ends.append(time.perf_counter())
    gaps = sorted(later - earlier for earlier, later in zip(ends, ends[1:]))
    return 1000 * gaps[len(gaps) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--load-dir", type=Path, required=True)
    parser.add_argument("--ip2p-model", required=True)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/bench_edit"))
    parser.add_argument("--steps", type=int, default=7500)
    parser.add_argument("--gs-steps", type=int, default=2500)
    parser.add_argument("--prompt", default="turn the horse into a giraffe")
    parser.add_argument("--lpips-loss-mult", type=float, default=1.0)
    parser.add_argument("--vis", default="tensorboard", help="nerfstudio --vis (tensorboard runs eval images; viewer does not)")
    parser.add_argument("--train-on", choices=["ip2p", "oracle"], default="ip2p", help="oracle: train on oracle edits, time IP2P anyway")
    parser.add_argument(
        "--compile", nargs="?", choices=list(COMPILE_MODES), const="on", default="cached",
        help="--pipeline.ip2p-compile: on (True: compile missing packages), cached (None, the default: packages on disk only), off (False)",
    )
    parser.add_argument("--lpips-fp32", action="store_true", help="LPIPS loss in float32 (as the reference)")
    parser.add_argument("--lpips-eager", action="store_true", help="LPIPS loss launched op by op, not replayed from a CUDA graph")
    parser.add_argument("--no-lpips-target-cache", action="store_true", help="--pipeline.model.lpips-target-cache-mb 0: every step computes its target's LPIPS features")
    parser.add_argument("--overlap", action="store_true", help="--pipeline.overlap-edits: edits run while training goes on")
    parser.add_argument("--ip2p-devices", help="--pipeline.ip2p-devices, e.g. cuda:1,cuda:2 (compare sweep_s with a one-device run)")
    parser.add_argument("--reference-views", type=int, default=0, help="views of a reference-style sweep to time")
    parser.add_argument(
        "--reference-steps", type=int, default=0,
        help="with --reference-views: after the edit, time this many training steps made the reference's way (float32 eager "
        "LPIPS of the target every step, gsplat's checked inverse, metrics every step, multi-tensor Adam) and project "
        "the reference-style total with them too",
    )
    parser.add_argument("--gsplat-checked-inverse", action="store_true", help="--pipeline.model.gsplat-unchecked-inverse False: gsplat's camera-centre inverse with its error check (one host wait more per step)")
    parser.add_argument("--adam-eager", action="store_true", help="--adam-cuda-graph False: the Gaussians' fused Adam steps launched one by one, not replayed from a CUDA graph")
    parser.add_argument("--read-ahead-cuda-libraries", action="store_true", help="--read-ahead-cuda-libraries True: torch's CUDA libraries read into the page cache from set-up's start")
    parser.add_argument("--unet-direct", action="store_true", help="--pipeline.ip2p-cuda-graph False: the packaged UNet called directly, not replayed from a CUDA graph")
    parser.add_argument("--no-warm-up", action="store_true", help="no editor warm-up beside set-up (the first sweep pays it)")
    parser.add_argument("--setup-only", action="store_true", help="stop after set-up: JSON setup_s (and setup_profile) only")
    parser.add_argument("--profile-steps", type=int, default=0, help="profile this many training steps with cProfile, then as many with torch.profiler (0: none)")
    parser.add_argument(
        "--profile-from", type=int,
        help="cProfile from this many steps after the first, torch.profiler 100 steps after it (default: as the last steps). "
        "Profiling slows the steps after it: with windows at 300 steps, a 2500-step run's median step was 7.24 vs 5.63 ms unprofiled",
    )
    parser.add_argument(
        "--profile-setup", action="store_true",
        help="cProfile the set-up and the time from the start of training to its first step (main thread; it takes longer profiled): "
        "JSON setup_profile, before_first_step_profile",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.profile_steps > 0 and args.profile_from is None and 2 * args.profile_steps + 101 > args.steps:
        parser.error(f"--profile-steps {args.profile_steps} needs at least {2 * args.profile_steps + 101} --steps (two windows 100 steps apart)")
    if args.reference_steps < 0:
        parser.error(f"--reference-steps must be 0 (none) or more, not {args.reference_steps}")
    if args.reference_steps and not args.reference_views:
        parser.error("--reference-steps extends the reference-style projection of --reference-views: give both")
    if args.train_on == "oracle" and (args.overlap or args.ip2p_devices):
        parser.error("--train-on oracle swaps the single editor; it does not combine with --overlap or --ip2p-devices")

    torch.backends.cudnn.benchmark = True  # as in ns-train, whose train.py sets it for every method
    if args.no_warm_up:
        from igs2gs.pipeline import IGS2GSPipeline

        IGS2GSPipeline._needs_warm_up = staticmethod(lambda editor, shapes: False)  # type: ignore[method-assign]
    clocks = contextlib.ExitStack()  # until training ends
    warm_up_clock = clocks.enter_context(WarmUpClock())
    setup_profiler = cProfile.Profile() if args.profile_setup else None
    started = time.perf_counter()
    if setup_profiler is not None:
        setup_profiler.enable()
    trainer = edit_trainer(
        args.data, args.load_dir, args.output_dir, steps=args.steps, vis=args.vis,
        model=dict(
            lpips_loss_mult=args.lpips_loss_mult, lpips_bf16=not args.lpips_fp32, lpips_cuda_graph=not args.lpips_eager,
            gsplat_unchecked_inverse=not args.gsplat_checked_inverse,
            **({"lpips_target_cache_mb": 0} if args.no_lpips_target_cache else {}),  # else the model's default
        ),
        prompt=args.prompt, gs_steps=args.gs_steps, ip2p_model=args.ip2p_model, ip2p_compile=COMPILE_MODES[args.compile],
        overlap_edits=args.overlap, ip2p_devices=args.ip2p_devices, ip2p_cuda_graph=not args.unet_direct,
        trainer=dict(adam_cuda_graph=not args.adam_eager, read_ahead_cuda_libraries=args.read_ahead_cuda_libraries),
    )
    timed_editor = trainer.pipeline.editor
    if args.train_on == "oracle":
        from igs2gs.oracle import OracleEditor, OracleEditorConfig

        trainer.pipeline.editor = ShadowEditor(trainer.pipeline.editor, OracleEditor(OracleEditorConfig(transform="invert"), "cuda"))
    if setup_profiler is not None:
        setup_profiler.disable()
    setup_s = time.perf_counter() - started
    setup_profile = None if setup_profiler is None else {"per": "run", **python_profile_figures(setup_profiler, 1, rows=40)}
    imports_s = started - IMPORTS_STARTED
    if args.setup_only:
        figures = {"device": torch.cuda.get_device_name(0), "setup_s": setup_s, "imports_before_setup_s": imports_s}
        if setup_profile is not None:
            figures["setup_profile"] = setup_profile
        print(json.dumps(figures, indent=2))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        sys.stdout.flush()
        os._exit(0)  # the viewer's server and the editor's warm-up threads would keep the process alive
    gaussians_at_load = trainer.pipeline.model.num_points
    step_starts: List[float] = []  # only the first is kept
    step_ends: List[float] = []
    start_profiler = cProfile.Profile() if args.profile_setup else None  # from train() to the first step

    def first_step_starts(step: int) -> None:
        if not step_starts:
            step_starts.append(time.perf_counter())
            if start_profiler is not None:
                start_profiler.disable()

    trainer.callbacks += [
        TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], first_step_starts, update_every_num_iters=1),
        TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], lambda step: step_ends.append(time.perf_counter()), update_every_num_iters=1),
    ]
    profilers: Dict[str, StepWindow] = {}
    if args.profile_steps > 0:
        windows = 2 * args.profile_steps + 100
        first = trainer._start_step + (args.profile_from if args.profile_from is not None else args.steps - windows - 1)
        profilers["python_step_profile"] = PythonStepProfiler(first, args.profile_steps)
        profilers["step_profile"] = StepProfiler(first + args.profile_steps + 100, args.profile_steps)
    for window in profilers.values():
        trainer.callbacks += [
            TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], window.before, update_every_num_iters=1),
            TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], window.after, update_every_num_iters=1),
        ]
    torch.cuda.reset_peak_memory_stats()
    train_started = time.perf_counter()
    if start_profiler is not None:
        start_profiler.enable()
    with GcClock() as gc_clock:
        trainer.train()
        torch.cuda.synchronize()
    train_ended = time.perf_counter()
    clocks.close()
    train_wall_s = train_ended - train_started
    total_s = time.perf_counter() - started
    sweeps = trainer.pipeline.sweep_timings
    if args.overlap:  # a sweep's wall span includes training; only rendering and swapping block it
        sweep_s = sum(s["render_s"] + s["swap_s"] for s in sweeps)
    else:
        sweep_s = sum(s["total_s"] for s in sweeps)
    splat_s = train_wall_s - sweep_s
    steps_done = trainer.step - trainer._start_step + 1
    result = {
        "device": torch.cuda.get_device_name(0),
        "views": len(trainer.pipeline.datamanager.image_names),
        "gaussians_at_load": gaussians_at_load,
        "gaussians_at_end": trainer.pipeline.model.num_points,
        "setup_s": setup_s,
        "sweeps": sweeps,
        "sweep_s": sweep_s,
        "ip2p_s_per_edit": sum(s["edit_s"] for s in sweeps) / max(1.0, sum(s["views"] for s in sweeps)),
        "splat_training_s": splat_s,
        "splat_training_split_s": {  # splat_training_s = before_first_step + steps + after_last_step
            "before_first_step": step_starts[0] - train_started,  # the viewer's scene, the dataparser transform
            "steps": step_ends[-1] - step_starts[0] - sweep_s,
            "after_last_step": train_ended - step_ends[-1],  # the final checkpoint, edits still being written
        },
        "steps": steps_done,
        "steps_per_s_between_sweeps": steps_done / splat_s,
        "total_s": total_s,
        "imports_before_setup_s": imports_s,  # not in total_s (nor in the reference-style projection)
        "total_with_imports_s": imports_s + total_s,  # from the first import of torch: all but the interpreter start
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9,
        "trained_on": args.train_on,
        "ip2p_compile": args.compile,
        "editor_packages": sorted(getattr(timed_editor, "_packages", {})),  # the parts that ran compiled
        "overlap_edits": args.overlap,
        "lpips": ("float32" if args.lpips_fp32 else "bf16") + (" eager" if args.lpips_eager else " CUDA graph")
        + (", targets per step" if args.no_lpips_target_cache else ", targets kept"),
        "ip2p_devices": args.ip2p_devices,
        "editor_warm_up": not args.no_warm_up,
        "gsplat_inverse": "checked" if args.gsplat_checked_inverse else "unchecked",
        "adam_steps": adam_steps(trainer.optimizers),
        "cuda_libraries_read_ahead": args.read_ahead_cuda_libraries,
        "unet_calls": unet_calls(timed_editor),
        "sweep_s_means": "time training waited for sweeps (render + swap with --overlap)",
        "step_times": step_time_profile(
            step_ends, trainer._start_step, [int(s["step"]) for s in sweeps],
            profiled=[step for window in profilers.values() for step in window.steps_covered],
        ),
        "garbage_collection": gc_clock.figures(),  # during training, sweeps included
        "editor_warm_up_from_setup_start_s": {  # did the warm-up thread still run when training began?
            "spans": [[begun - started, ended - started] for begun, ended in warm_up_clock.spans],
            "parts_s": warm_up_clock.parts,
            "training_began": train_started - started,
        },
    }
    result.update({name: window.result for name, window in profilers.items()})
    if setup_profile is not None:
        result["setup_profile"] = setup_profile
        result["before_first_step_profile"] = {"per": "run", **python_profile_figures(start_profiler, 1, rows=25)}
    if args.reference_views:
        reference: Dict[str, object] = {}
        if args.reference_steps:  # before the reference-style views, which replace training images
            try:
                step_ms = reference_style_step_ms(trainer, args.reference_steps)
            except Exception as error:  # the edit's figures still get written; the failure is reported with them
                traceback.print_exc()
                reference["steps_error"] = f"{type(error).__name__}: {error}"
            else:  # the edit's training, each of its steps longer by the difference of the median steps
                extra_s = steps_done * (step_ms - result["step_times"]["median_ms"]) / 1000
                reference.update(step_median_ms=step_ms, steps_timed=args.reference_steps, step_extra_s=extra_s)
        per_view = reference_s_per_view(trainer.pipeline, args.ip2p_model, args.reference_views)
        sweeps_run = len(sweeps)
        reference_total = setup_s + sweeps_run * result["views"] * per_view + splat_s
        result["reference_style"] = {
            "s_per_view": per_view,
            "views_timed": args.reference_views,
            "projected_total_s": reference_total,
            "speedup": reference_total / total_s,
            "sweep_speedup": sweeps_run * result["views"] * per_view / sweep_s,
            **reference,
        }
        if "step_extra_s" in reference:
            with_steps = reference_total + reference["step_extra_s"]
            result["reference_style"].update(projected_total_s_reference_steps=with_steps, speedup_reference_steps=with_steps / total_s)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
