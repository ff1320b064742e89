"""Editor replicas fed from one queue: the same edits as one editor, every view once, failures retried."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from typing import Callable, List, Optional

import pytest
import torch

from conftest import step_pipeline
from igs2gs.edit_store import EditStore
from igs2gs.edit_workers import EditJob, EditWorkers, WarmUp
from igs2gs.ip2p import InstructPix2Pix
from igs2gs import pipeline as pipeline_module
from igs2gs.pipeline import IGS2GSPipeline
from test_pipeline import TRAIN_VIEWS, make_trainer, stored_equals_working_set

PROMPT = "make it look like bronze"
SETTINGS = {"diffusion_steps": 2, "guidance_scale": 3.0}


@pytest.fixture(scope="module")
def replicas(tiny_ip2p_dir):
    return [InstructPix2Pix.from_pretrained(str(tiny_ip2p_dir), device="cpu") for _ in range(2)]


def jobs(count: int, per_job: int = 2):
    images = torch.rand(count * per_job, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    originals = torch.rand(count * per_job, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for first in range(0, count * per_job, per_job):
        views = list(range(first, first + per_job))
        yield EditJob(views, images[views], originals[views], [torch.Generator().manual_seed(100 + v) for v in views])


def edit_all(editors, count: int = 6):
    workers = EditWorkers(editors, lambda: (PROMPT, SETTINGS))
    for job in jobs(count):
        workers.submit(job)
    results = []
    while workers.outstanding:
        results.extend(workers.results(block=True, timeout=120))
    workers.close()
    return workers, {view: edit for result in results for view, edit in zip(result.job.views, result.edits)}, results


def test_two_replicas_make_the_same_edits_as_one_and_each_view_once(replicas):
    _, single, _ = edit_all(replicas[:1])
    _, sharded, results = edit_all(replicas)
    views = [view for result in results for view in result.job.views]
    assert sorted(views) == list(range(12))  # every view exactly once
    assert {result.worker for result in results} == {"0:cpu", "1:cpu"}  # both replicas took batches
    for view in range(12):
        assert (single[view] - sharded[view]).abs().max() < 1e-4, view


@pytest.mark.gpu
def test_replicas_on_cuda_streams_make_the_same_edits_as_one(tiny_ip2p_dir):
    """Each worker edits on its own CUDA stream; the edits handed back are complete and equal one
    editor's (two replicas on two GPUs, or on the one GPU there is)."""
    devices = [f"cuda:{index % torch.cuda.device_count()}" for index in range(2)]
    editors = [InstructPix2Pix.from_pretrained(str(tiny_ip2p_dir), device=device) for device in devices]
    _, single, _ = edit_all(editors[:1])
    _, sharded, results = edit_all(editors)
    assert sorted(view for result in results for view in result.job.views) == list(range(12))
    assert {result.worker for result in results} == {f"{index}:{device}" for index, device in enumerate(devices)}
    for view in range(12):
        assert sharded[view].device.type == "cpu"
        assert (single[view] - sharded[view]).abs().max() < 1e-2, view


class BrokenEditor:
    device = torch.device("cpu")

    def edit(self, *args, **kwargs):
        time.sleep(0.01)
        raise RuntimeError("CUDA error: device lost")


def test_a_failing_replica_hands_its_batch_to_the_others_and_is_reported(replicas):
    workers, edits, results = edit_all([BrokenEditor(), replicas[0]])
    assert sorted(edits) == list(range(12)) and all(result.worker == "1:cpu" for result in results)
    assert workers.failures == [("0:cpu", "RuntimeError: CUDA error: device lost")]


def test_the_sweep_fails_clearly_when_every_replica_failed():
    with pytest.raises(RuntimeError, match="every editor replica failed.*device lost"):
        edit_all([BrokenEditor(), BrokenEditor()], count=2)


@pytest.mark.parametrize("overlap", [False, True])
def test_pipeline_sweeps_on_two_cpu_replicas(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path, overlap):
    trainer = make_trainer(
        scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, f"replicas-{overlap}",
        ip2p_devices="cpu,cpu", overlap_edits=overlap, ip2p_max_batch_size=2,
    )
    pipeline, start = trainer.pipeline, trainer._start_step
    assert len(pipeline.editors) == 2 and pipeline.edit_workers is not None
    store = EditStore(trainer.base_dir / "igs2gs")
    pipeline.edit_end_step = start + 1
    step_pipeline(trainer, start)
    if overlap:  # training went on while the edits were made; the edit's last step waits for the rest
        assert store.load_state().sweep_in_progress == 0
        step_pipeline(trainer, start + 1)
    state = store.load_state()
    assert state.sweeps_completed == 1 and state.sweep_in_progress is None
    assert stored_equals_working_set(trainer, store) == TRAIN_VIEWS
    timings = pipeline.sweep_timings[0]
    assert timings["views"] == TRAIN_VIEWS
    # 9 views in batches of at most 2: five batches, the slowest and fastest of them reported.
    assert 0 < timings["fastest_batch_edit_s"] <= timings["slowest_batch_edit_s"] < timings["edit_s"]


def loading_as_on_cuda(packages_asked: Optional[List[str]] = None) -> Callable[..., InstructPix2Pix]:
    """``InstructPix2Pix.from_pretrained`` on the CPU, its editor set to use packages as it would be on CUDA (where
    from_pretrained keeps its ``packages`` argument); each call's ``packages`` is appended to ``packages_asked``."""
    real_load = InstructPix2Pix.from_pretrained

    def load(*args, **kwargs) -> InstructPix2Pix:
        if packages_asked is not None:
            packages_asked.append(kwargs["packages"])
        editor = real_load(*args, **kwargs)
        editor.compiled = kwargs["packages"] != "off"
        editor.compile_missing = kwargs["packages"] == "compile"
        return editor

    return load


def test_compiled_editors_prepare_their_package_at_set_up_in_the_main_thread(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path, monkeypatch):
    """Export and compilation are not thread-safe: each compiled editor loads or compiles its packages before
    editor threads start, for the shape the sweeps will use (their largest batch, the views' size); its warm-up then
    runs beside set-up as an eager editor's does."""
    prepared, warmed = [], []
    load_as_compiled = loading_as_on_cuda()

    def prepare_compiled(editor, batch, height, width, prompt):
        prepared.append((editor.device.type, batch, height, width, threading.current_thread() is threading.main_thread()))

    def warm_up(editor, batch, height, width, prompt):
        warmed.append((len(prepared), threading.current_thread() is threading.main_thread()))
        return 0.0

    monkeypatch.setattr(InstructPix2Pix, "from_pretrained", load_as_compiled)
    monkeypatch.setattr(InstructPix2Pix, "prepare_compiled", prepare_compiled)
    monkeypatch.setattr(InstructPix2Pix, "warm_up", warm_up)
    monkeypatch.setattr(IGS2GSPipeline, "_needs_warm_up", staticmethod(lambda editor, shapes: True))  # as on a large GPU
    trainer = make_trainer(scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "compile-overlap",
                           ip2p_compile=True, overlap_edits=True, ip2p_devices="cpu,cpu", ip2p_max_batch_size=4)
    height, width = trainer.pipeline.datamanager.original_images[0].shape[:2]
    # the sweeps' largest batch: 9 views by at most 4 are edited in three batches of 3, not padded to 4
    assert TRAIN_VIEWS == 9 and prepared == [("cpu", 3, height, width, True)] * 2
    trainer.pipeline.warm_up.wait()
    assert warmed and all(entry == (2, False) for entry in warmed)  # after both packages, in the warm-up thread


@pytest.mark.parametrize("ip2p_compile", [None, False])
def test_by_default_editors_look_for_packages_an_earlier_run_compiled_and_edit_eagerly_without(
    scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path, monkeypatch, ip2p_compile
):
    """``--pipeline.ip2p-compile`` left at None: the editors load the sweeps' packages if they are on disk (compiling
    nothing); without them they edit eagerly, unpadded, and the log says how to make them. False: they never look."""
    loaded, prepared = [], []
    load_on_cuda = loading_as_on_cuda(loaded)

    def prepare_compiled(editor, batch, height, width, prompt):
        prepared.append((batch, editor.compile_missing))
        editor.compiled = False  # as when no package is on disk

    monkeypatch.setattr(InstructPix2Pix, "from_pretrained", load_on_cuda)
    monkeypatch.setattr(InstructPix2Pix, "prepare_compiled", prepare_compiled)
    logged: List[str] = []
    monkeypatch.setattr(pipeline_module.CONSOLE, "log", lambda text, *args, **kwargs: logged.append(str(text)))
    trainer = make_trainer(scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, f"compile-{ip2p_compile}",
                           ip2p_compile=ip2p_compile, ip2p_max_batch_size=4)
    assert loaded == ["cached" if ip2p_compile is None else "off"]
    assert prepared == ([(3, False)] if ip2p_compile is None else [])
    editor = trainer.pipeline.editor
    assert not editor.compiled and editor.fixed_batch is None
    assert editor.unet_cuda_graph  # --pipeline.ip2p-cuda-graph's default: a package found is replayed from a graph
    hints = [text for text in logged if "--pipeline.ip2p-compile True compiles it" in text]
    assert len(hints) == (1 if ip2p_compile is None else 0)  # how to make the packages, once


def test_warm_up_edits_each_shape_on_each_editor_in_a_background_thread_and_keeps_failures(replicas, monkeypatch):
    calls = []

    def warm_up(editor, batch, height, width, prompt):
        calls.append((replicas.index(editor), batch, height, width, prompt, threading.current_thread() is threading.main_thread()))
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return 0.0

    monkeypatch.setattr(InstructPix2Pix, "warm_up", warm_up)
    warming = WarmUp(replicas, [(3, 32, 48), (2, 32, 48)], PROMPT)
    warming.wait()
    assert calls == [(0, 3, 32, 48, PROMPT, False), (0, 2, 32, 48, PROMPT, False), (1, 3, 32, 48, PROMPT, False)]
    assert warming.error is not None and "OutOfMemoryError" in warming.error  # kept for the log, not raised
    assert warming.parts == [("cpu batch 3 48x32", 0.0), ("cpu batch 2 48x32", 0.0)]  # what it did before the failure
    assert warming.describe() == "cpu batch 3 48x32 0.0 s, cpu batch 2 48x32 0.0 s"


def test_only_cuda_editors_with_room_for_the_warm_up_beside_the_scene_warm_up(replicas, monkeypatch):
    from igs2gs.ip2p import edit_bytes
    shapes = [(14, 511, 511), (15, 511, 511)]
    assert edit_bytes(15, 511, 511) == pytest.approx(15 * 0.55e9) and edit_bytes(2, 1024, 1024) == pytest.approx(4 * 2 * 0.55e9)
    assert not IGS2GSPipeline._needs_warm_up(replicas[0], shapes)  # a CPU editor has no set-up worth hiding
    cuda_editor = type("CudaEditor", (), {"device": torch.device("cuda:0")})()
    free = {"bytes": 2 * edit_bytes(15, 511, 511)}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free["bytes"], 80e9))
    assert IGS2GSPipeline._needs_warm_up(cuda_editor, shapes)
    free["bytes"] -= 1  # e.g. a 12 GB card: the scene must load beside it, so no warm-up
    assert not IGS2GSPipeline._needs_warm_up(cuda_editor, shapes)


def test_the_first_sweep_waits_for_the_warm_up_of_the_first_sweeps_batch_shapes(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path, monkeypatch):
    """CUDA editors warm up beside set-up; here CPU editors stand in (the warm-up is CUDA-only otherwise)."""
    events = []

    def warm_up(editor, batch, height, width, prompt):
        events.append(("warm-up", batch, height, width, prompt, threading.current_thread() is threading.main_thread()))
        time.sleep(0.5)
        events.append(("warmed",))
        return 0.5

    real_edit, real_condition = InstructPix2Pix.edit, InstructPix2Pix._condition
    encoded = []  # (views, in the main thread) of each condition encoding

    def condition(editor, originals, keys):
        missing = [key for key in keys if key not in editor._condition_latents]
        if missing:
            encoded.append((missing, threading.current_thread() is threading.main_thread()))
        return real_condition(editor, originals, keys)

    monkeypatch.setattr(IGS2GSPipeline, "_needs_warm_up", staticmethod(lambda editor, shapes: True))
    monkeypatch.setattr(InstructPix2Pix, "warm_up", warm_up)
    monkeypatch.setattr(InstructPix2Pix, "_condition", condition)
    monkeypatch.setattr(InstructPix2Pix, "edit", lambda *a, **k: events.append(("edit",)) or real_edit(*a, **k))
    trainer = make_trainer(scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "warm-up", ip2p_max_batch_size=4)
    pipeline = trainer.pipeline
    height, width = pipeline.datamanager.original_images[0].shape[:2]
    # 9 training views by at most 4: batches of 3 (one shape), warmed for the instruction of the run.
    assert pipeline.warm_up is not None and pipeline.warm_up.shapes == [(3, height, width)]
    assert events[0] == ("warm-up", 3, height, width, pipeline.prompt, False)
    step_pipeline(trainer, trainer._start_step)
    assert events.index(("warmed",)) < events.index(("edit",))  # no edit before the warm-up is done
    assert pipeline.warm_up is None and 0 < pipeline.sweep_timings[0]["warm_up_wait_s"] <= 0.6
    # The photos' condition latents were encoded beside set-up, in the sweep's batches; the sweep encoded none.
    assert [views for views, _ in encoded] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]] and not any(main for _, main in encoded)
    assert pipeline.editor.condition_encodings == TRAIN_VIEWS


@pytest.mark.gpu
def test_a_cuda_editor_warms_up_beside_set_up_and_the_first_sweep_edits_with_it(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path):
    trainer = make_trainer(scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "warm-up-cuda", device="cuda", ip2p_max_batch_size=4)
    pipeline = trainer.pipeline
    warming = pipeline.warm_up
    assert warming is not None and warming.shapes[0][0] == 3
    step_pipeline(trainer, trainer._start_step)
    assert warming.error is None and warming.seconds > 0 and pipeline.warm_up is None
    editor = pipeline.editor
    assert editor.prompt_encodings == 1  # encoded by the warm-up, reused by the sweep
    assert sorted(editor._condition_latents) == list(range(TRAIN_VIEWS))  # the warm-up's random views left none
    assert len(pipeline.edit_store.load_edits()) == TRAIN_VIEWS


def test_pausing_a_replica_sweep_stops_it_and_unpausing_finishes_it(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path):
    trainer = make_trainer(
        scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "pause-replicas",
        ip2p_devices="cpu,cpu", ip2p_max_batch_size=1,
    )
    pipeline, start = trainer.pipeline, trainer._start_step
    store = EditStore(trainer.base_dir / "igs2gs")
    real_submit = pipeline._submit

    def submit_then_pause(current, group):  # the viewer's pause arrives while the first batch is out
        real_submit(current, group)
        pipeline.set_editing_paused(True)

    pipeline._submit = submit_then_pause
    step_pipeline(trainer, start)
    state = store.load_state()
    assert state.sweep_in_progress == 0 and len(state.views_done) == 1 and state.sweeps_completed == 0
    pipeline._submit = real_submit
    pipeline.set_editing_paused(False)
    step_pipeline(trainer, start + 1)
    assert store.load_state().sweeps_completed == 1
    assert stored_equals_working_set(trainer, store) == TRAIN_VIEWS


def test_pausing_an_overlapped_sweep_holds_its_queued_batches(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path):
    """All batches of an overlapped sweep are queued at once; pausing holds those not started, the edit's
    last step does not wait for them, and a resumed run finishes the sweep."""
    first = make_trainer(
        scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "pause-overlap",
        overlap_edits=True, ip2p_max_batch_size=1,
    )
    pipeline, start = first.pipeline, first._start_step
    workers, real_submit, rendered = pipeline.edit_workers, pipeline.edit_workers.submit, []
    real_render = pipeline._render

    def submit_then_pause(job):  # the viewer's pause arrives once the first batch is queued
        assert len(rendered) == TRAIN_VIEWS  # every batch rendered before the first is edited
        real_submit(job)
        pipeline.set_editing_paused(True)

    pipeline._render = lambda views: rendered.extend(views) or real_render(views)
    workers.submit = submit_then_pause
    pipeline.edit_end_step = start + 1
    step_pipeline(first, start)
    assert pipeline.edit_workers.outstanding == TRAIN_VIEWS
    time.sleep(1.0)  # time enough for the editor to run through its queue, were it not held
    step_pipeline(first, start + 1)  # the last step: returns without the held batches
    state = first.pipeline.edit_store.load_state()
    assert state.sweep_in_progress == 0 and state.sweeps_completed == 0 and len(state.views_done) <= 1
    assert stored_equals_working_set(first, first.pipeline.edit_store) == len(state.views_done)

    second = make_trainer(scene_dir, first.checkpoint_dir, tiny_ip2p_dir, tmp_path, "pause-overlap-resumed")
    step_pipeline(second, second._start_step)
    assert second.pipeline.edit_store.load_state().sweeps_completed == 1
    assert stored_equals_working_set(second, second.pipeline.edit_store) == TRAIN_VIEWS


@pytest.mark.parametrize("devices", [None, "cpu,cpu"])
def test_a_sweep_shows_its_progress_bar(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path, monkeypatch, devices):
    """One editor or several replicas, training waiting: the console shows views done, edits/s and an ETA."""
    import io

    from rich.console import Console

    import igs2gs.pipeline

    output = io.StringIO()
    monkeypatch.setattr(igs2gs.pipeline, "CONSOLE", Console(file=output, width=160, force_terminal=False))
    trainer = make_trainer(
        scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, f"progress-{devices}", ip2p_devices=devices,
    )
    step_pipeline(trainer, trainer._start_step)
    shown = output.getvalue()
    assert "igs2gs sweep 1" in shown and f"{TRAIN_VIEWS}/{TRAIN_VIEWS} views" in shown and "edits/s" in shown, shown


EXITING = """
import atexit, sys, time, torch
atexit.register(lambda: print("calls made", editor.calls, flush=True))  # runs after igs2gs's exit hook (registered later)
from igs2gs.edit_workers import EditJob, EditWorkers, WarmUp

class Busy:  # stands in for an editor on a GPU: each call spends its time inside torch's C++ code
    device = "cpu"
    def __init__(self):
        self.calls, self.a = 0, torch.randn(1200, 1200)
    def work(self):
        self.calls += 1
        for _ in range(10):
            torch.mm(self.a, self.a)
    def warm_up(self, batch, height, width, prompt):
        self.work()
        return 0.0
    def edit(self, renders, originals, prompt, **kwargs):
        self.work()
        return renders

editor = Busy()
if sys.argv[1] == "warm-up":
    WarmUp([editor], [(1, 8, 8)] * 1000, "a prompt")
else:
    workers = EditWorkers([editor], lambda: ("a prompt", {}))
    for view in range(1000):
        workers.submit(EditJob([view], torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), [torch.Generator()]))
while editor.calls < 2:
    time.sleep(0.01)
print("exiting with", editor.calls, "calls begun", flush=True)
{exit}
"""


@pytest.mark.parametrize("threads", ["warm-up", "edit workers"])
@pytest.mark.parametrize("exit", ["", "raise SystemExit('set-up failed')", "raise KeyboardInterrupt"])
def test_exiting_while_editor_threads_are_in_torch_does_not_abort_the_process(threads, exit, tmp_path):
    """Without ``threads_at_exit`` the C++ runtime aborts such an exit (status 134, "terminate called without an
    active exception"); with it the threads stop at their next batch: few of the 1,000 queued are begun."""
    script = tmp_path / "exiting.py"
    script.write_text(EXITING.replace("{exit}", exit))
    run = subprocess.run([sys.executable, str(script), threads], capture_output=True, text=True, timeout=300)
    assert "terminate called" not in run.stderr, run.stderr
    expected = {"": 0, "raise SystemExit('set-up failed')": 1, "raise KeyboardInterrupt": -signal.SIGINT}[exit]  # as Python's own
    assert run.returncode == expected, run.stderr
    begun, made = (int(run.stdout.split(words)[1].split()[0]) for words in ("exiting with ", "calls made "))
    assert 2 <= begun <= made < 10, run.stdout
