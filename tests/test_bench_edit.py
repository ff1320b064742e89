"""The benchmarks' CPU-checkable parts: bench_edit.py's step-time breakdown (pure arithmetic, checked on made-up
clocks), garbage-collection clock, step profiler and reference-style training steps (on a CPU edit), bench_ip2p.py's
argument checks and steady sweep, and bench_editor_load.py on the CPU."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import torch

from bench_edit import GcClock, PythonStepProfiler, StepProfiler, WarmUpClock, adam_steps, step_time_profile, unet_calls
from bench_ip2p import steady_sweep


def test_step_time_profile_leaves_out_sweep_steps_and_names_the_slow_ones():
    durations = [0.010] * 500
    durations[20] = 5.0  # a sweep: left out
    durations[400] = 0.510  # a checkpoint save, 380 steps after the sweep: 0.5 s beyond the median
    durations[22] = 0.110  # two steps after the sweep: 0.1 s beyond
    ends, clock = [], 0.0
    for seconds in durations:
        clock += seconds
        ends.append(clock)
    profile = step_time_profile(ends, first_step=1000, sweep_steps=[1020])
    assert profile["median_ms"] == pytest.approx(10.0)
    assert profile["excess_s"] == pytest.approx(0.6)
    assert profile["excess_after_sweeps_s"] == pytest.approx(0.1)  # within AFTER_SWEEP_STEPS (300) of it
    assert profile["slowest"][0] == {"step": 1400, "ms": 510.0}
    assert all(row["step"] != 1020 for row in profile["slowest"])


def test_bench_ip2p_refuses_a_run_without_reference_views_before_anything_loads():
    """Every speed-up is measured against the reference-style views: none would divide by zero after minutes of work."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_ip2p.py"
    result = subprocess.run([sys.executable, str(script), "--reference-views", "0"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "--reference-views must be at least 1" in result.stderr


def test_bench_ip2p_times_a_sweep_with_every_views_conditioning_already_encoded(tiny_ip2p_dir):
    """The timed sweep is a steady one, as igs2gs's after its warm-up: its editor encodes no photo (an untimed first
    sweep over all views did, once each), so the row's seconds hold no conditioning encodes."""
    from igs2gs.ip2p import InstructPix2Pix

    editor = InstructPix2Pix.from_pretrained(str(tiny_ip2p_dir), device="cpu")
    renders, originals = torch.rand(2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sweep = steady_sweep(editor, renders, originals, steps=2, batch=2)
    assert sweep["encoded_while_timed"] == 0
    assert editor.condition_encodings == 5
    assert sweep["seconds"] > 0


def test_bench_editor_load_times_each_part_of_loading_the_editor(tiny_ip2p_dir, tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_editor_load.py"
    output = tmp_path / "load.json"
    result = subprocess.run(
        [sys.executable, str(script), str(tiny_ip2p_dir), "--device", "cpu", "--json", str(output)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    seconds = json.loads(output.read_text())["seconds"]
    assert list(seconds) == [
        "import torch", "import diffusers, transformers", "first pipeline load (its class imported)",
        "unet to cpu", "vae to cpu", "text_encoder to cpu", "second from_pretrained",
    ]
    assert all(value > 0 for value in seconds.values())
    refused = subprocess.run(
        [sys.executable, str(script), str(tiny_ip2p_dir), "--device", "cpu", "--packages", "2", "32", "32"], capture_output=True, text=True, timeout=300
    )
    assert refused.returncode == 2 and "--packages needs a CUDA --device" in refused.stderr


def test_gpu_bench_refuses_an_unknown_phase_or_run_or_a_missing_scene_before_doing_anything(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_bench.sh"
    for args, edits in ((["measure", str(tmp_path)], ""), (["prepare", str(tmp_path / "no scene")], ""), ([], ""), (["edit", str(tmp_path)], "cached eager")):
        environment = {"PATH": "/usr/bin:/bin", "RESULTS": str(tmp_path / "r"), "EDITS": edits}
        result = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60, env=environment)
        assert result.returncode == 2 and "usage: gpu_bench.sh prepare|edit|extra|batch|reconstruct|steps|firstuse DATA" in result.stderr, args
    assert "not eager" in result.stderr
    assert not (tmp_path / "r").exists()


def test_gpu_bench_refuses_to_run_another_igs2gs_than_the_checkouts(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_bench.sh"
    stale = tmp_path / "site" / "igs2gs"
    shutil.copytree(script.parents[1] / "igs2gs", stale, ignore=shutil.ignore_patterns("__pycache__"))
    (stale / "optimizer_graph.py").unlink()  # an install from before a module was added
    (tmp_path / "scene").mkdir()
    for python_path, imported in ((tmp_path / "site", str(stale)), (tmp_path / "nothing", "no igs2gs")):
        environment = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(python_path), "RESULTS": str(tmp_path / "r")}  # no igs2gs installed
        result = subprocess.run(["bash", str(script), "edit", str(tmp_path / "scene")], capture_output=True, text=True, timeout=60, env=environment, cwd=tmp_path)
        assert result.returncode == 2 and f"python3 imports {imported}, not this checkout's igs2gs/" in result.stderr, result.stderr
    assert not (tmp_path / "r").exists()


def test_cuda_library_cache_reads_files_into_the_page_cache_and_drops_them_again(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "cuda_library_cache.py"
    library = tmp_path / "libexample.so.1"
    library.write_bytes(os.urandom(8 << 20))

    def run(action: str, *files: Path) -> dict:
        output = tmp_path / f"{action}.json"
        result = subprocess.run([sys.executable, str(script), action, "--files", *map(str, files), "--json", str(output)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(output.read_text())

    read = run("prefetch", library)
    assert read["read_mb"] == pytest.approx(8 * 1.048576) and read["files"][str(library)]["resident_share"] == 1.0
    assert run("evict", library)["files"][str(library)]["resident_share"] < 0.1
    assert run("resident", library)["cached_mb"] < 0.9
    missing = subprocess.run([sys.executable, str(script), "resident", "--files", str(tmp_path / "none.so")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no such files" in missing.stderr


def test_gc_clock_times_the_collections_made_while_installed_and_only_those():
    with GcClock() as clock:
        gc.collect()
        gc.collect(0)
    gc.collect()  # after: not counted, and the clock is no longer a callback
    figures = clock.figures()
    assert clock not in gc.callbacks
    assert clock.collections[2] == 1 and clock.collections[0] >= 1
    assert figures["seconds"] == pytest.approx(sum(clock.seconds)) and clock.seconds[2] > 0
    assert 0 < figures["longest_ms"] <= 1000 * figures["seconds"]


def test_warm_up_clock_stamps_the_editor_warm_ups_started_while_installed_and_only_those():
    """Whether the editors' warm-up thread still runs when training begins: its start and end, on perf_counter."""
    from igs2gs.edit_workers import WarmUp

    class SlowEditor:
        device = "cpu"

        def warm_up(self, batch, height, width, prompt):
            time.sleep(0.05)
            return 0.05

        def encode_conditions(self, originals, views):
            time.sleep(0.02)

    photos = lambda device: [([0, 1], torch.zeros(2, 3, 8, 8))]  # noqa: E731
    original = WarmUp._run
    before = time.perf_counter()
    with WarmUpClock() as clock:
        WarmUp([SlowEditor()], [(1, 8, 8)], "a prompt", conditions=photos).wait()
    WarmUp([SlowEditor()], [(1, 8, 8)], "a prompt").wait()  # after: not stamped
    assert WarmUp._run is original
    assert len(clock.spans) == 1 and len(clock.parts) == 1
    started, ended = clock.spans[0]
    assert before <= started and ended - started >= 0.07
    (parts,) = clock.parts
    assert list(parts) == ["cpu batch 1 8x8", "cpu conditioning of 2 photos"]
    assert parts["cpu batch 1 8x8"] == 0.05 and parts["cpu conditioning of 2 photos"] >= 0.02


def test_step_time_profile_leaves_out_profiled_steps():
    durations = [0.010] * 100
    durations[50] = 0.3  # the profiler starting
    ends = [0.0]
    for seconds in durations[1:]:
        ends.append(ends[-1] + seconds)
    assert step_time_profile(ends, first_step=0, sweep_steps=[])["excess_s"] == pytest.approx(0.29)
    assert step_time_profile(ends, first_step=0, sweep_steps=[], profiled=range(50, 60))["excess_s"] == pytest.approx(0.0)


def test_step_profiler_profiles_only_its_steps_and_counts_host_waits():
    profiler = StepProfiler(first=3, steps=4, rows=5)
    weights = torch.randn(64, 64)
    for step in range(10):
        profiler.before(step)
        loss = (weights @ weights).sum()
        loss.item()  # the host waits for the value: one wait per step
        profiler.after(step)
    figures = profiler.result
    assert figures["first_step"] == 3 and figures["steps"] == 4 and figures["wall_ms_per_step"] > 0
    assert list(profiler.steps_covered) == [3, 4, 5, 6, 7]
    (site, per_step), = figures["host_waits_per_step"].items()
    assert per_step == 1.0 and site.startswith("aten::_local_scalar_dense <- ") and "test_bench_edit.py" in site  # the caller
    matmul = next(row for row in figures["host_ops"] if row["name"] == "aten::mm")
    assert matmul["calls_per_step"] == 1.0 and matmul["ms_per_step"] > 0
    assert len(figures["host_ops"]) <= 5
    assert figures["kernels"] == [] and figures["gpu_busy_ms_per_step"] == 0.0  # no device here


def test_python_step_profiler_reports_the_functions_of_its_steps_per_step():
    def slow_part():
        time.sleep(0.01)

    profiler = PythonStepProfiler(first=2, steps=3)
    for step in range(8):
        profiler.before(step)
        slow_part()
        profiler.after(step)
    figures = profiler.result
    assert figures["steps"] == 3 and figures["wall_ms_per_step"] >= 10
    row = next(row for row in figures["by_cumulative_time"] if "(slow_part)" in row["function"])
    assert figures["per"] == "step"
    assert row["calls"] == 1.0 and 10 <= row["cumulative_ms"] < figures["wall_ms_per_step"] + 1


def test_bench_edit_refuses_profile_windows_longer_than_the_run_before_anything_loads():
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_edit.py"
    args = [sys.executable, str(script), "--data", "d", "--load-dir", "l", "--ip2p-model", "m", "--steps", "200", "--profile-steps", "60"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "--profile-steps 60 needs at least 221 --steps" in result.stderr
    result = subprocess.run([*args[:-4], "--reference-steps", "50"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--reference-steps extends the reference-style projection of --reference-views" in result.stderr


def test_reference_style_steps_train_the_reference_way_then_give_the_edit_its_settings_back(
    scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path
):
    import gsplat.rendering
    from nerfstudio.utils import writer

    from bench_edit import REFERENCE_LOSS, reference_style_step_ms, train_step
    from igs2gs.optimizer_graph import GraphedOptimizers
    from igs2gs.trainer import use_fused_adam
    from test_pipeline import make_trainer

    trainer = make_trainer(scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "reference-steps")
    model, optimizers = trainer.pipeline.model, trainer.optimizers.optimizers
    fused = use_fused_adam(optimizers, device_types=("cpu",))  # as the edit's Adam is on CUDA
    assert "means" in fused
    for step in range(trainer._start_step, trainer._start_step + 2):  # the first sweep, then a step on its edits
        train_step(trainer, step)
    trainer.step = trainer._start_step + 1
    edit_settings = {name: getattr(model.config, name) for name in REFERENCE_LOSS}
    edit_metrics_every, edit_gsplat_torch = model.training_metrics_every, gsplat.rendering.torch
    assert edit_settings != REFERENCE_LOSS and edit_metrics_every > 1
    sweeps, means = len(trainer.pipeline.sweep_timings), model.means.detach().clone()
    steps_before = float(optimizers["means"].state[model.means]["step"])
    trainer.optimizers = GraphedOptimizers.adopt(trainer.optimizers, list(fused))
    trainer.optimizers.graph = object()  # as after the edit's capture: the reference's steps must not replay it

    seen = []
    lpips_loss = model.lpips_loss

    def spy(prediction, target, target_features=None):
        seen.append((target_features, {name: getattr(model.config, name) for name in REFERENCE_LOSS}, model.training_metrics_every,
                     trainer.pipeline.editing_paused, gsplat.rendering.torch is torch, optimizers["means"].param_groups[0]["fused"]))
        return lpips_loss(prediction, target, target_features)

    model.lpips_loss = spy
    step_ms = reference_style_step_ms(trainer, steps=2, warm=1)
    writer.EVENT_STORAGE.clear()
    assert step_ms > 0 and len(seen) == 3  # one warm step (its end starts the first gap), two timed
    assert all(item == (None, REFERENCE_LOSS, 1, True, True, False) for item in seen)
    assert not torch.equal(model.means.detach(), means) and len(trainer.pipeline.sweep_timings) == sweeps  # trained, no sweep
    assert float(optimizers["means"].state[model.means]["step"]) == steps_before + 3
    assert not trainer.optimizers.captured and trainer.optimizers.failed == "reference-style steps after the edit"
    assert {name: getattr(model.config, name) for name in REFERENCE_LOSS} == edit_settings
    assert (model.training_metrics_every, gsplat.rendering.torch, trainer.pipeline.editing_paused) == (edit_metrics_every, edit_gsplat_torch, False)
    assert all(optimizers[name].param_groups[0]["fused"] for name in fused)


def test_bench_edit_says_how_the_adam_steps_ran():
    from igs2gs.optimizer_graph import GraphedOptimizers
    from test_optimizer_graph import splatfacto_like

    optimizers = splatfacto_like("cpu")
    assert adam_steps(optimizers) == "eager"
    graphed = GraphedOptimizers.adopt(optimizers, ["means"])
    assert adam_steps(graphed) == "eager (no capture yet)"
    graphed.graph = object()  # as after a capture
    assert adam_steps(graphed) == "CUDA graph"
    graphed.stop_replaying("its parameters were replaced")
    assert adam_steps(graphed) == "eager after the CUDA graph was turned off (its parameters were replaced)"


def test_bench_edit_says_how_the_unet_ran():
    from types import SimpleNamespace

    from igs2gs.aot_package import Packaged

    package = Packaged(lambda x: x, lambda x: x, torch.Size([1]), {}, torch.device("cpu"))
    assert unet_calls(SimpleNamespace(_packages={})) == "eager"
    assert unet_calls(SimpleNamespace(_packages={"unet": package})) == "package"
    package._graph = object()  # as after a capture
    assert unet_calls(SimpleNamespace(_packages={"unet": package})) == "package, CUDA graph"
    package._graph, package.graph_failed = None, "RuntimeError: not permitted"
    assert unet_calls(SimpleNamespace(_packages={"unet": package})) == "package (CUDA graph capture failed: RuntimeError: not permitted)"


def test_a_reconstruction_without_evaluations_evaluates_at_no_step(tmp_path):
    """gpu_bench's reconstructions leave splatfacto's evaluations out (device time); a user's keep them."""
    from nerfstudio.utils.misc import step_check

    from reconstruct import splatfacto_config

    def evaluated_steps(config):
        intervals = (config.steps_per_eval_image, config.steps_per_eval_batch, config.steps_per_eval_all_images)
        return [step for step in range(config.max_num_iterations + 1) if any(step_check(step, n) for n in intervals)]

    assert len(evaluated_steps(splatfacto_config(tmp_path, tmp_path, 2000, "cuda"))) == 20  # every 100 steps
    assert evaluated_steps(splatfacto_config(tmp_path, tmp_path, 2000, "cuda", evaluate=False)) == []
