"""`ns-train igs2gs` end to end on the CPU: the splats change, every view is edited, nothing is lost."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SCENE_VIEWS, igs2gs_args, make_scene, offline_env, run_cli, step_pipeline
from edit_run import edit_trainer
from igs2gs.edit_store import EditStore

TRAIN_VIEWS = SCENE_VIEWS - 1  # nerfstudio holds one view out
GAUSSIANS = ["means", "scales", "quats", "features_dc", "features_rest", "opacities"]


def latest_checkpoint(run: Path) -> Path:
    return sorted((run / "nerfstudio_models").glob("step-*.ckpt"))[-1]


def run_dir_of(output: Path) -> Path:
    (run,) = list(output.glob("*/igs2gs/*"))
    return run


@pytest.fixture(scope="module")
def private_ip2p(tiny_ip2p_dir, tmp_path_factory) -> Path:
    """A copy of the tiny editor that the export test deletes, to prove exports never load it."""
    return Path(shutil.copytree(tiny_ip2p_dir, tmp_path_factory.mktemp("private") / "ip2p"))


@pytest.fixture(scope="module")
def edited_run(scene_dir, splatfacto_run, private_ip2p, tmp_path_factory):
    """Three sweeps (at 1, 6 and 11 steps after the load) in 12 steps."""
    output = tmp_path_factory.mktemp("edited")
    args = igs2gs_args(
        scene_dir, splatfacto_run / "nerfstudio_models", private_ip2p, output,
        "--pipeline.gs-steps", "5", "--max-num-iterations", "12", "--steps-per-save", "4",
    )
    result = run_cli(args, cwd=output)
    return run_dir_of(output), result.stdout + result.stderr


def test_every_view_is_edited_once_per_sweep(edited_run):
    run, log = edited_run
    state = json.loads((run / "igs2gs" / "state.json").read_text())
    assert state["sweeps_completed"] == 3 and state["sweep_in_progress"] is None
    assert re.findall(r"igs2gs sweep (\d): (\d+) views", log) == [("1", str(TRAIN_VIEWS)), ("2", str(TRAIN_VIEWS)), ("3", str(TRAIN_VIEWS))]
    assert len(list((run / "igs2gs" / "edits").glob("view_*.png"))) == TRAIN_VIEWS
    for sweep in range(3):
        sheet = np.asarray(Image.open(run / "igs2gs" / "sheets" / f"sweep_{sweep:02d}.png"))
        assert sheet.shape[1] == 3 * sheet.shape[0] // 4  # 4 rows of original | render | edit


def test_gaussians_change_after_the_load(edited_run, splatfacto_run):
    """Regression test for the stale-optimizer bug: the reference never moves the loaded splats."""
    run, _ = edited_run
    before = torch.load(latest_checkpoint(splatfacto_run), map_location="cpu", weights_only=False)["pipeline"]
    after = torch.load(latest_checkpoint(run), map_location="cpu", weights_only=True)["pipeline"]
    for name in GAUSSIANS:
        key = f"_model.gauss_params.{name}"
        assert before[key].shape == after[key].shape
        if name != "features_rest":  # SH degree > 0 is not reached in a few steps
            assert (before[key] - after[key]).abs().max() > 1e-5, name


def test_checkpoints_hold_no_editor_weights_and_load_safely(edited_run):
    run, _ = edited_run
    state = torch.load(latest_checkpoint(run), map_location="cpu", weights_only=True)
    assert not [key for key in state["pipeline"] if re.search(r"unet|vae|text_encoder|lpips", key)]
    assert state["step"] == json.loads((run / "igs2gs" / "state.json").read_text())["edit_start_step"] + 12


def test_checkpoint_written_in_the_background_holds_the_state_of_its_step(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path):
    """Training goes on while a checkpoint is written: the file must hold the tensors as they were at the save."""
    import threading

    trainer = make_trainer(scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "background-save")
    means = trainer.pipeline.model.gauss_params["means"]
    expected = means.detach().clone()
    release, real_write = threading.Event(), trainer._write_checkpoint
    trainer._write_checkpoint = lambda step, state, copied: release.wait(30) and real_write(step, state, copied)
    trainer.save_checkpoint(trainer._start_step)
    with torch.no_grad():
        means.add_(1.0)  # the next optimizer step, before the writer got to run
    path = trainer.checkpoint_dir / f"step-{trainer._start_step:09d}.ckpt"
    assert not path.exists()
    release.set()
    trainer.wait_for_checkpoint()
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(state["pipeline"]["_model.gauss_params.means"], expected)
    assert not list(trainer.checkpoint_dir.glob(".*.tmp"))


def test_a_failed_checkpoint_write_keeps_the_last_checkpoint_and_leaves_no_partial_file(
    scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path, monkeypatch
):
    """A full disk mid-write: the error reaches the trainer, the previous checkpoint stays, no temporary file remains;
    a written checkpoint is synced to disk before the older one is deleted."""
    import errno

    import igs2gs.edit_store

    trainer = make_trainer(scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "failed-save")
    trainer.wait_for_checkpoint()  # the loaded scene's, written beside set-up
    (loaded,) = [path.name for path in trainer.checkpoint_dir.iterdir()]
    first, second = trainer._start_step, trainer._start_step + 1
    events, real_fsync, real_unlink = [], os.fsync, Path.unlink
    monkeypatch.setattr(igs2gs.edit_store.os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(Path, "unlink", lambda path, **kw: events.append(f"unlink {path.name}") or real_unlink(path, **kw))
    trainer.save_checkpoint(first)
    trainer.save_checkpoint(second)
    trainer.wait_for_checkpoint()
    assert events == ["fsync", f"unlink {loaded}", "fsync", f"unlink step-{first:09d}.ckpt"]

    real_save = torch.save

    def disk_full(state, file):
        file.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    trainer.save_checkpoint(second + 1)
    with pytest.raises(OSError, match="No space left"):
        trainer.wait_for_checkpoint()
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(path.name for path in trainer.checkpoint_dir.iterdir()) == [f"step-{second:09d}.ckpt"]
    assert torch.load(trainer.checkpoint_dir / f"step-{second:09d}.ckpt", map_location="cpu", weights_only=True)["step"] == second


def test_export_and_render_work_without_the_editor(edited_run, private_ip2p, tmp_path):
    run, _ = edited_run
    shutil.rmtree(private_ip2p)  # an export or render that tried to load IP2P would now fail
    workdir = run.parents[3]
    run_cli(["ns-export", "gaussian-splat", "--load-config", str(run / "config.yml"), "--output-dir", str(tmp_path)], cwd=workdir)
    ply = tmp_path / "splat.ply"
    assert ply.is_file() and ply.stat().st_size > 1000
    run_cli(
        ["ns-render", "dataset", "--load-config", str(run / "config.yml"), "--output-path", str(tmp_path / "renders"),
         "--split", "test", "--rendered-output-names", "rgb"],
        cwd=workdir,
    )
    rendered = list((tmp_path / "renders").rglob("*.jpg")) + list((tmp_path / "renders").rglob("*.png"))
    assert rendered and np.asarray(Image.open(rendered[0])).std() > 1


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_viewer_serves_an_igs2gs_run_without_the_editor(edited_run, private_ip2p, tmp_path):
    import socket

    run, _ = edited_run
    shutil.rmtree(private_ip2p, ignore_errors=True)
    port = free_port()
    viewer = subprocess.Popen(
        [str(Path(sys.executable).parent / "ns-viewer"), "--load-config", str(run / "config.yml"), "--viewer.websocket-port", str(port)],
        cwd=run.parents[3], env=offline_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and viewer.poll() is None:
            with socket.socket() as client:
                if client.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        assert viewer.poll() is None, viewer.stdout.read()[-3000:]
        with socket.socket() as client:
            assert client.connect_ex(("127.0.0.1", port)) == 0, "the viewer never listened"
    finally:
        viewer.kill()
        viewer.wait()


# --------------------------------------------------------------------------- in-process runs
def make_trainer(
    scene: Path, load_dir: Path, ip2p: Path, output: Path, timestamp: str, model_prompt=None, trainer=None, device="cpu", model=None,
    **pipeline,
):
    """An igs2gs trainer (CPU unless told) with the tiny editor; ``pipeline`` (``trainer``, ``model``) overrides pipeline
    (trainer, model) fields."""
    settings = dict(
        prompt="make it look like a watercolour painting",
        ip2p_model=str(ip2p),
        diffusion_steps=2,
        ip2p_max_batch_size=1,
    )
    settings.update(pipeline)
    model = dict(lpips_pretrained_backbone=False, stop_split_at=0, prompt=model_prompt, **(model or {}))  # ns-train's --prompt sets model.prompt
    return edit_trainer(scene, load_dir, output, device=device, timestamp=timestamp, model=model, trainer=trainer, **settings)


def stored_equals_working_set(trainer, store: EditStore) -> int:
    edits = store.load_edits()
    for view, image in edits.items():
        assert torch.equal(trainer.pipeline.datamanager.working_image(view).cpu(), torch.from_numpy(image)), view
    return len(edits)


def test_optimizers_act_on_the_loaded_gaussians(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path):
    from nerfstudio.utils import writer

    trainer = make_trainer(scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "relink")
    params = trainer.pipeline.model.gauss_params
    for name in GAUSSIANS:
        (optimised,) = trainer.optimizers.optimizers[name].param_groups[0]["params"]
        assert optimised is params[name], name
        assert trainer.optimizers.optimizers[name].state[optimised]["exp_avg"].shape == params[name].shape
    # The position schedule restarts at the loaded step instead of sitting at splatfacto's floor.
    assert trainer.optimizers.schedulers["means"].get_last_lr()[0] == pytest.approx(1.6e-4)
    # The console's progress and ETA count to the step the edit ends at, not to max_num_iterations.
    assert writer.GLOBAL_BUFFER["max_iter"] == trainer.pipeline.edit_end_step == trainer._start_step - 1 + 7500  # the default length


def test_an_edit_reads_no_point_cloud_and_its_model_holds_the_checkpoints_gaussians(
    scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path, monkeypatch
):
    """splatfacto's start from the scene's point cloud (800 points here) is replaced by the checkpoint's Gaussians:
    an edit's set-up reads no point cloud (nerfstudio-data's reader imports open3d: 2.8 s on the 2-core CPU machine),
    neither for the scene check nor for the datamanager, and its model starts from a few random points
    (``seed_points_used``) whose neighbours it searches; the loaded Gaussians are the checkpoint's."""
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import Nerfstudio

    from igs2gs.model import IGS2GSModel, IGS2GSModelConfig

    read, searched = [], []
    read_points = Nerfstudio._load_3D_points
    monkeypatch.setattr(Nerfstudio, "_load_3D_points", lambda self, *args: read.append(args[0]) or read_points(self, *args))
    k_nearest = IGS2GSModel.k_nearest_sklearn
    monkeypatch.setattr(IGS2GSModel, "k_nearest_sklearn", lambda self, x, k: searched.append(len(x)) or k_nearest(self, x, k))
    trainer = make_trainer(scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "seed")
    assert read == [] and "points3D_xyz" not in trainer.pipeline.datamanager.train_dataparser_outputs.metadata
    assert searched == [IGS2GSModelConfig().seed_points_used] == [16]
    saved = torch.load(latest_checkpoint(splatfacto_run), map_location="cpu", weights_only=False)["pipeline"]
    for name in GAUSSIANS:
        assert torch.equal(trainer.pipeline.model.gauss_params[name].detach().cpu(), saved[f"_model.gauss_params.{name}"]), name


def test_training_metrics_are_computed_only_on_the_steps_the_trainer_logs(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path):
    from nerfstudio.configs.base_config import LoggingConfig

    trainer = make_trainer(
        scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "metrics",
        trainer={"logging": LoggingConfig(steps_per_log=3)}, gs_steps=1000,
    )
    start = trainer._start_step
    logged = [step for step in range(start, start + 7) if step % 3 == 0]
    from nerfstudio.engine.callbacks import TrainingCallbackLocation

    for step in range(start, start + 7):
        for callback in trainer.callbacks:  # as the trainer runs them before each iteration (sets the model's step)
            callback.run_callback_at_location(step, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
        _, losses, metrics = trainer.pipeline.get_train_loss_dict(step)
        assert ("psnr" in metrics) == (step in logged), step
        assert {"main_loss", "lpips_loss"} <= set(losses)  # the loss itself is there on every step
    assert len(logged) >= 2
    _, _, metrics = trainer.pipeline.get_eval_loss_dict(start + 1)  # evaluation always gets its metrics
    assert "psnr" in metrics


def test_set_up_does_not_wait_for_the_first_checkpoint_and_no_edit_is_stored_before_it(
    scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path, monkeypatch
):
    """The loaded scene is written into the new run beside set-up and the first sweep; edits reach the disk after it."""
    import threading

    from igs2gs.trainer import IGS2GSTrainer

    release, real_write = threading.Event(), IGS2GSTrainer._write_checkpoint
    monkeypatch.setattr(IGS2GSTrainer, "_write_checkpoint", lambda self, *args: release.wait(60) and real_write(self, *args))
    trainer = make_trainer(scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "early-checkpoint")
    pipeline, start = trainer.pipeline, trainer._start_step
    store = EditStore(trainer.base_dir / "igs2gs")
    checkpoint = trainer.checkpoint_dir / f"step-{start - 1:09d}.ckpt"
    assert trainer._pending_checkpoint is not None and not trainer._pending_checkpoint.done()  # set-up did not wait
    step_pipeline(trainer, start, wait_for_writes=False)  # the first sweep: all views edited and swapped in
    assert pipeline.sweep_state.sweeps_completed == 1
    assert not checkpoint.exists() and store.load_edits() == {}  # their writes wait for the checkpoint
    release.set()
    pipeline.raise_failed_writes(wait=True)
    assert checkpoint.exists() and len(store.load_edits()) == TRAIN_VIEWS and store.load_state().sweeps_completed == 1


def test_a_failed_edit_write_stops_training_at_a_later_step(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path, monkeypatch):
    """Edits are written in the background; a write that fails (full disk) must not go unnoticed."""
    trainer = make_trainer(scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "disk-full")
    pipeline, start = trainer.pipeline, trainer._start_step

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline.edit_store, "save_edit", full_disk)
    step_pipeline(trainer, start, wait_for_writes=False)  # the sweep: edits swapped in, their writes queued
    assert pipeline.sweep_state.sweeps_completed == 1 and pipeline.pending_writes
    for write in list(pipeline.pending_writes):
        with contextlib.suppress(OSError):
            write.result()
    with pytest.raises(OSError, match="No space left"):
        step_pipeline(trainer, start + 1, wait_for_writes=False)


def test_resume_after_an_interrupted_sweep_restores_edits_and_finishes_the_sweep(
    scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path
):
    first = make_trainer(scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "first")
    editor, calls = first.pipeline.editor, []
    real_edit = editor.edit

    def crash_on_third_batch(*args, **kwargs):
        calls.append(kwargs["cond_keys"])
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill mid-sweep")
        return real_edit(*args, **kwargs)

    editor.edit = crash_on_third_batch
    with pytest.raises(KeyboardInterrupt):
        first.pipeline.get_train_loss_dict(first._start_step)
    first.pipeline.raise_failed_writes(wait=True)  # as the interpreter does at exit: queued writes finish
    store = first.pipeline.edit_store
    state = store.load_state()
    assert state.sweep_in_progress == 0 and state.views_done == [0, 1]
    assert stored_equals_working_set(first, store) == 2

    second = make_trainer(scene_dir, first.checkpoint_dir, tiny_ip2p_dir, tmp_path, "second")
    assert stored_equals_working_set(second, second.pipeline.edit_store) == 2
    # The photos IP2P conditions on are the captured ones, not the restored edits.
    for view in range(TRAIN_VIEWS):
        assert torch.equal(second.pipeline.datamanager.original_images[view], first.pipeline.datamanager.original_images[view])
    assert second.pipeline.sweep_due(second._start_step) == 0
    edited = []
    real_second = second.pipeline.editor.edit
    second.pipeline.editor.edit = lambda *a, **k: edited.extend(k["cond_keys"]) or real_second(*a, **k)
    second.pipeline.run_sweep(second.pipeline.sweep_due(second._start_step), second._start_step)
    second.pipeline.raise_failed_writes(wait=True)
    assert edited == list(range(2, TRAIN_VIEWS))
    assert stored_equals_working_set(second, second.pipeline.edit_store) == TRAIN_VIEWS
    assert second.pipeline.edit_store.load_state().sweeps_completed == 1


def test_a_finished_edit_is_the_start_of_a_new_one(scene_dir, edited_run, tiny_ip2p_dir, tmp_path, capsys):
    run, _ = edited_run
    finished = latest_checkpoint(run)
    end = json.loads((run / "igs2gs" / "state.json").read_text())["edit_end_step"]
    assert finished.name == f"step-{end:09d}.ckpt"
    chained = make_trainer(scene_dir, run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "chained", prompt="now make it snowy")
    assert "starting a new edit from its splats" in " ".join(capsys.readouterr().out.split())  # rich wraps lines
    pipeline = chained.pipeline
    state = pipeline.edit_store.load_state()
    assert (state.edit_start_step, state.sweeps_completed, state.edit_end_step) == (end, 0, end + 7500)
    assert pipeline.prompt == "now make it snowy" and not list(pipeline.edit_store.edits_dir.glob("view_*.png"))
    # Training starts on the photos again (the first sweep replaces them with edits of the edited splats).
    for view in range(TRAIN_VIEWS):
        assert torch.equal(pipeline.datamanager.working_image(view).cpu(), pipeline.datamanager.original_images[view].cpu())
    assert pipeline.sweep_due(chained._start_step) == 0


def test_kill_9_mid_sweep_then_resume_continues_the_sweep(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path):
    args = igs2gs_args(
        scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path / "killed",
        "--pipeline.gs-steps", "5", "--max-num-iterations", "12", "--steps-per-save", "2",
        "--pipeline.ip2p-max-batch-size", "1", "--pipeline.diffusion-steps", "30",
    )
    (tmp_path / "killed").mkdir()
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "ns-train"), *args[1:]], cwd=tmp_path, env=offline_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline, state = time.time() + 300, None
    try:
        while time.time() < deadline and process.poll() is None:
            states = list((tmp_path / "killed").glob("*/igs2gs/*/igs2gs/state.json"))
            if states:
                try:
                    state = json.loads(states[0].read_text())
                except (json.JSONDecodeError, OSError):
                    state = None
                if state and state["sweep_in_progress"] == 1 and 2 <= len(state["views_done"]) < TRAIN_VIEWS:
                    os.kill(process.pid, signal.SIGKILL)
                    break
            time.sleep(0.005)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert state and state["sweep_in_progress"] == 1, f"never caught the run mid-sweep: {state}"
    killed_run = run_dir_of(tmp_path / "killed")
    done_before_kill = json.loads((killed_run / "igs2gs" / "state.json").read_text())["views_done"]

    resumed = run_cli(
        igs2gs_args(scene_dir, killed_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path / "resumed",
                    "--pipeline.gs-steps", "5", "--max-num-iterations", "12", "--pipeline.ip2p-max-batch-size", "1"),
        cwd=tmp_path,
    )
    log = resumed.stdout + resumed.stderr
    assert f"Restored {TRAIN_VIEWS} edited views" in log and f"sweep 1 resumes after {len(done_before_kill)} views" in log
    sweeps = re.findall(r"igs2gs sweep (\d): (\d+) views", log)
    assert sweeps[0] == ("2", str(TRAIN_VIEWS - len(done_before_kill)))
    final = json.loads((run_dir_of(tmp_path / "resumed") / "igs2gs" / "state.json").read_text())
    assert final["sweeps_completed"] == 3
    assert latest_checkpoint(run_dir_of(tmp_path / "resumed")).name == f"step-{final['edit_start_step'] + 12:09d}.ckpt"


# --------------------------------------------------------------------------- errors
def test_missing_load_dir_says_how_to_train_a_scene(scene_dir, tiny_ip2p_dir, tmp_path):
    from igs2gs.trainer import CheckpointError

    with pytest.raises(CheckpointError, match="ns-train splatfacto"):
        make_trainer(scene_dir, None, tiny_ip2p_dir, tmp_path, "noload")


def test_checkpoint_of_another_method_is_refused(scene_dir, tiny_ip2p_dir, tmp_path):
    from igs2gs.trainer import CheckpointError

    models = tmp_path / "nerfacto-run" / "nerfstudio_models"
    models.mkdir(parents=True)
    (models.parent / "config.yml").write_text("method_name: nerfacto\n")
    torch.save({"step": 10, "pipeline": {"_model.field.mlp.weight": torch.zeros(2)}}, models / "step-000000010.ckpt")
    with pytest.raises(CheckpointError, match="checkpoint of nerfacto"):
        make_trainer(scene_dir, models, tiny_ip2p_dir, tmp_path, "foreign")


def scene_trained_with(
    splatfacto_run: Path, folder: Path, sh_degree: int, rasterize_mode: str, camera_mode: str, background: str = "random"
) -> Path:
    """A copy of the splatfacto run as if trained with other model settings (colour tensors cut to ``sh_degree``)."""
    run = Path(shutil.copytree(splatfacto_run, folder))
    checkpoint = latest_checkpoint(run)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    key = "_model.gauss_params.features_rest"
    state["pipeline"][key] = state["pipeline"][key][:, : (sh_degree + 1) ** 2 - 1].clone()
    views = state["pipeline"]["_model.gauss_params.means"].new_zeros(TRAIN_VIEWS, 6)
    state["pipeline"]["_model.camera_optimizer.pose_adjustment"] = views + 0.01
    torch.save(state, checkpoint)
    text = (run / "config.yml").read_text()
    text, modes = re.subn(r"rasterize_mode: \w+", f"rasterize_mode: {rasterize_mode}", text)
    text, backgrounds = re.subn(r"background_color: \w+", f"background_color: {background}", text)
    text, cameras = re.subn(r"(camera_optimizer: .*\n(?:\s+.*\n)*?\s+mode: )'?[\w]+'?", rf"\g<1>{camera_mode}", text)
    assert modes == backgrounds == cameras == 1
    (run / "config.yml").write_text(text)
    return run


def test_the_edit_follows_the_loaded_scenes_model_settings(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path):
    from igs2gs.trainer import run_config

    source = scene_trained_with(splatfacto_run, tmp_path / "sh1", 1, "antialiased", "SO3xR3", background="white")
    trainer = make_trainer(scene_dir, source / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "follow")
    model = trainer.pipeline.model
    assert (model.config.sh_degree, model.config.rasterize_mode, model.config.camera_optimizer.mode) == (1, "antialiased", "SO3xR3")
    # Sweeps render over the background the scene was trained against, and show photos with alpha over it.
    assert model.config.background_color == "white" and torch.equal(trainer.pipeline.datamanager.background, torch.ones(3))
    assert model.gauss_params["features_rest"].shape[1] == 3
    # The checkpoint's pose corrections are loaded, not dropped.
    assert torch.allclose(model.camera_optimizer.pose_adjustment, torch.full((TRAIN_VIEWS, 6), 0.01))
    step_pipeline(trainer, trainer._start_step)
    # Sweeps render the training views with those corrections, as training does (splatfacto's eval mode drops them).
    model.eval()
    camera = trainer.pipeline.datamanager.train_dataset.cameras[0:1]
    uncorrected = model.get_outputs_for_camera(camera)["rgb"].clamp(0, 1)
    camera.metadata = {"cam_idx": 0}
    camera.camera_to_worlds = model.camera_optimizer.apply_to_camera(camera)
    corrected = model.get_outputs_for_camera(camera)["rgb"].clamp(0, 1)
    swept = trainer.pipeline._render([0])[0].permute(1, 2, 0)
    assert torch.allclose(swept, corrected) and not torch.allclose(swept, uncorrected, atol=1e-3)
    # The run's own config.yml says so: ns-export, ns-render and a resume rebuild this model.
    saved = run_config(latest_checkpoint(trainer.base_dir))["pipeline"]["model"]
    assert (saved["sh_degree"], saved["rasterize_mode"], saved["camera_optimizer"]["mode"]) == (1, "antialiased", "SO3xR3")
    assert saved["background_color"] == "white"


def test_settings_given_for_the_edit_win_over_the_loaded_runs(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path):
    from igs2gs.model import IGS2GSModelConfig
    from igs2gs.trainer import CheckpointError, adopt_scene_settings

    source = scene_trained_with(splatfacto_run, tmp_path / "classic", 3, "classic", "SE3", background="white")
    checkpoint = latest_checkpoint(source)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = IGS2GSModelConfig(rasterize_mode="antialiased", background_color="black")
    model.camera_optimizer.mode = "SO3xR3"
    assert adopt_scene_settings(model, checkpoint, state) == []
    assert (model.sh_degree, model.rasterize_mode, model.camera_optimizer.mode) == (3, "antialiased", "SO3xR3")
    assert model.background_color == "black"
    # Colours with a coefficient count no SH degree has are refused with the reason.
    state["pipeline"]["_model.gauss_params.features_rest"] = torch.zeros(5, 4, 3)
    with pytest.raises(CheckpointError, match="4 SH coefficients"):
        adopt_scene_settings(IGS2GSModelConfig(), checkpoint, state)


def test_a_scene_trained_with_a_bilateral_grid_loads_without_it(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path, capsys):
    run = Path(shutil.copytree(splatfacto_run, tmp_path / "bilagrid"))
    checkpoint = latest_checkpoint(run)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    grid = torch.nn.Parameter(torch.zeros(TRAIN_VIEWS, 12, 4, 4, 8))
    adam = torch.optim.Adam([grid])
    grid.grad = torch.ones_like(grid)
    adam.step()
    state["pipeline"]["_model.bil_grids.grids"] = grid.detach()
    state["optimizers"]["bilateral_grid"] = adam.state_dict()
    state["schedulers"]["bilateral_grid"] = torch.optim.lr_scheduler.ExponentialLR(adam, 0.9).state_dict()
    torch.save(state, checkpoint)
    trainer = make_trainer(scene_dir, run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "bilagrid", trainer=dict(restart_schedules=False))
    assert "bilateral_grid" not in trainer.optimizers.optimizers
    assert "does not train bilateral_grid" in " ".join(capsys.readouterr().out.split())  # rich wraps lines
    # The splats' own optimizer states did load.
    means = trainer.pipeline.model.gauss_params["means"]
    loaded = state["optimizers"]["means"]["state"][0]["exp_avg"]
    assert torch.equal(trainer.optimizers.optimizers["means"].state[means]["exp_avg"].cpu(), loaded)


def test_other_data_than_the_checkpoints_is_refused(splatfacto_run, tiny_ip2p_dir, tmp_path):
    from igs2gs.trainer import CheckpointError

    other = make_scene(tmp_path / "other", views=12, size=40, seed=5, points=300)
    with pytest.raises(CheckpointError, match="does not match") as refused:
        make_trainer(other, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "otherdata")
    assert "the scene was trained on --data" in str(refused.value)


def test_data_the_dataparser_cannot_read_is_refused_with_what_the_scene_used(splatfacto_run, tiny_ip2p_dir, tmp_path):
    from igs2gs.trainer import CheckpointError

    colmap_like = tmp_path / "colmap-scene"
    (colmap_like / "sparse" / "0").mkdir(parents=True)  # no transforms.json: nerfstudio-data cannot read it
    with pytest.raises(CheckpointError, match="could not be read with NerfstudioDataParserConfig") as refused:
        make_trainer(colmap_like, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "unreadable")
    assert "the scene was trained on --data" in str(refused.value)


def test_the_refusal_names_the_dataparser_settings_that_differ(scene_dir, splatfacto_run):
    from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig

    from igs2gs.datamanager import IGS2GSDataManagerConfig
    from igs2gs.trainer import dataparser_differences

    checkpoint = latest_checkpoint(splatfacto_run)
    datamanager = IGS2GSDataManagerConfig(data=scene_dir)
    assert dataparser_differences(checkpoint, datamanager) == []
    datamanager.dataparser.scale_factor, datamanager.dataparser.orientation_method = 2.0, "pca"
    assert dataparser_differences(checkpoint, datamanager) == [
        "its dataparser had orientation-method 'up', this edit's has 'pca'",
        "its dataparser had scale-factor 1.0, this edit's has 2.0",
    ]
    datamanager.dataparser = ColmapDataParserConfig()
    (difference,) = dataparser_differences(checkpoint, datamanager)
    assert "parsed with NerfstudioDataParserConfig (add `nerfstudio-data`" in difference


def test_empty_prompt_is_refused_and_the_default_one_warns(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path, capsys):
    from igs2gs.pipeline import DEFAULT_PROMPT

    with pytest.raises(ValueError, match="instruction is empty"):
        make_trainer(scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "empty", prompt=" ")
    make_trainer(scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "default", prompt=DEFAULT_PROMPT)
    assert "asks for no change" in capsys.readouterr().out


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(lower_bound=0.9, upper_bound=0.5), "--pipeline.lower-bound 0.9 and --pipeline.upper-bound 0.5"),
        (dict(upper_bound=1.5), "upper-bound 1.5"),
        (dict(diffusion_steps=0), "--pipeline.diffusion-steps 0: must be at least 1"),
        (dict(gs_steps=0, ip2p_max_batch_size=0), "gs-steps 0: must be at least 1\n  --pipeline.ip2p-max-batch-size 0"),
        (dict(guidance_scale=float("nan")), "--pipeline.guidance-scale nan"),
        (dict(ip2p_device="cuda:7"), "editor device cuda:7: (no CUDA device|this machine has)"),
        (dict(ip2p_devices="cpu,gpu:x"), "editor device 'gpu:x': not a torch device"),
        (dict(ip2p_compile=True, ip2p_cpu_offload=True), "--pipeline.ip2p-compile with --pipeline.ip2p-cpu-offload"),
    ],
)
def test_bad_edit_settings_are_refused_before_anything_loads(scene_dir, tiny_ip2p_dir, tmp_path, settings, message):
    """Checked first: no checkpoint is given here, so reaching the load would raise CheckpointError instead."""
    with pytest.raises(ValueError, match=message) as raised:
        make_trainer(scene_dir, None, tiny_ip2p_dir, tmp_path, "bad-settings", **settings)
    assert "igs2gs cannot start with these settings" in str(raised.value)


def test_top_level_prompt_alias_sets_the_instruction(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path):
    trainer = make_trainer(scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "alias", model_prompt="make it gold")
    assert trainer.pipeline.prompt == "make it gold"
    assert trainer.pipeline.edit_store.load_state().settings["prompt"] == "make it gold"


def test_unavailable_editor_fails_early_with_the_fix(scene_dir, splatfacto_run, tmp_path, monkeypatch):
    from igs2gs.ip2p import IP2PUnavailableError

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(IP2PUnavailableError, match="--pipeline.ip2p-model"):
        make_trainer(scene_dir, splatfacto_run / "nerfstudio_models", "timbrooks/instruct-pix2pix", tmp_path, "offline")


def test_edit_batches_are_even_and_never_mix_image_sizes():
    from igs2gs.pipeline import _size_groups

    groups = _size_groups(list(range(73)), [(512, 512)] * 73, 8)
    assert len(groups) == 10 and {len(g) for g in groups} <= {7, 8}
    assert sorted(v for g in groups for v in g) == list(range(73))
    sizes = [(64, 64) if v % 3 else (32, 48) for v in range(10)]
    for group in _size_groups(list(range(10)), sizes, 4):
        assert len({sizes[v] for v in group}) == 1 and len(group) <= 4


def rgba_copy(scene: Path, out: Path) -> Path:
    """The scene with an alpha channel: clear on the left quarter, half-transparent in a stripe beside it."""
    shutil.copytree(scene, out)
    for path in sorted((out / "images").glob("*.png")):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        alpha = np.full(rgb.shape[:2], 255, np.uint8)
        quarter = rgb.shape[1] // 4
        alpha[:, :quarter] = 0
        alpha[:, quarter : 2 * quarter] = 128
        Image.fromarray(np.dstack([rgb, alpha])).save(path)
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])  # cuda: gsplat, pinned caches
def test_photos_with_alpha_are_edited_over_the_render_background_and_keep_their_transparency(
    scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path, device
):
    scene = rgba_copy(scene_dir, tmp_path / "rgba")
    trainer = make_trainer(scene, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "rgba", device=device)
    pipeline, datamanager = trainer.pipeline, trainer.pipeline.datamanager
    background = pipeline.model.background_color.cpu()
    assert torch.equal(datamanager.background, background)
    photos = [datamanager.original_images[view].cpu().clone() for view in range(TRAIN_VIEWS)]
    assert all(photo.shape[-1] == 4 for photo in photos)
    shown, rendered = [], []
    edit = pipeline.editor.edit

    def recording_edit(renders, originals, prompt, **settings):
        shown.append(originals.cpu())
        rendered.append(renders.cpu())
        return edit(renders, originals, prompt, **settings)

    pipeline.editor.edit = recording_edit
    viewer_colour = torch.tensor([1.0, 0.0, 0.0])
    pipeline.model.set_background(viewer_colour)  # as nerfstudio's viewer does before drawing
    step_pipeline(trainer, trainer._start_step)
    assert sum(len(batch) for batch in shown) == TRAIN_VIEWS
    first = photos[0].float() / 255
    expected = first[..., :3] * first[..., 3:] + background * (1 - first[..., 3:])
    assert torch.allclose(shown[0][0].permute(1, 2, 0), expected, atol=1e-6)  # IP2P sees the photo as the render shows it
    # The sweep rendered over that background too, whatever the viewer's colour, and left the viewer's colour set.
    assert pipeline.model.background_color is viewer_colour
    pipeline.model.set_background(background)
    pipeline.model.eval()
    with torch.no_grad():
        over_background = pipeline.model.get_outputs_for_camera(pipeline.training_camera(0))["rgb"].clamp(0, 1).cpu()
    assert torch.allclose(rendered[0][0].permute(1, 2, 0), over_background)  # the splats did not move: no optimizer step

    edits = pipeline.edit_store.load_edits()
    assert len(edits) == TRAIN_VIEWS
    for view, stored in edits.items():
        working = datamanager.working_image(view).cpu()
        assert working.shape[-1] == 4 and torch.equal(working[..., 3], photos[view][..., 3])  # transparency kept
        alpha = photos[view][..., 3]
        # Over the sweep background the working image is the edit, as far as a half-clear pixel can show it
        # (between the background's share and that plus the pixel's own), to 8-bit rounding ...
        share = (1 - alpha.float()[..., None] / 255) * background
        reachable = torch.minimum(torch.maximum(torch.from_numpy(stored) / 255, share), share + alpha[..., None] / 255)
        difference = ((datamanager.over_background(working) - reachable) * 255).abs()
        assert difference[alpha == 255].max() < 1e-3 and difference[alpha == 128].max() <= 1
        # ... and over splatfacto's random training background the clear part shows that background.
        other = torch.tensor([1.0, 0.0, 0.5])
        target = pipeline.model.composite_with_background(pipeline.model.get_gt_img(working), other.to(pipeline.model.device)).cpu()
        assert torch.equal(target[alpha == 0], other.expand(int((alpha == 0).sum()), 3))
    # A resume restores the stored edits into the same working images.
    before = [datamanager.working_image(view).clone() for view in range(TRAIN_VIEWS)]
    datamanager.replace_uint8({view: torch.from_numpy(image) for view, image in edits.items()})
    assert all(torch.equal(datamanager.working_image(view), before[view]) for view in range(TRAIN_VIEWS))
