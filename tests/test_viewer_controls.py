"""Steering an edit from the viewer: the pipeline's request handling, and the panel in a real browser."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest
import torch
from PIL import Image

from conftest import igs2gs_args, offline_env, step_pipeline
from igs2gs.edit_store import EditStore
from igs2gs.viewer_controls import EditControls, preview_markdown
from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO as VISER_SCALE
from test_pipeline import free_port, make_trainer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-quic",
]


@contextlib.contextmanager
def trainer_with_viewer(scene_dir: Path, splatfacto_run: Path, ip2p: Path, output: Path) -> Iterator:
    """A set-up igs2gs trainer with nerfstudio's viewer on a free port; the viewer stopped and checkpoints waited for
    after."""
    from nerfstudio.configs.base_config import ViewerConfig

    viewer = ViewerConfig(websocket_port=free_port(), quit_on_train_completion=True)
    trainer = make_trainer(
        scene_dir, splatfacto_run / "nerfstudio_models", ip2p, output, "with-viewer", trainer=dict(vis="viewer", viewer=viewer)
    )
    try:
        yield trainer
    finally:
        trainer.viewer_state.viser_server.stop()
        trainer.wait_for_checkpoint()


def test_viewer_requests_apply_at_the_next_edit_and_are_recorded(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path):
    trainer = make_trainer(scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "steer", gs_steps=5)
    pipeline, start = trainer.pipeline, trainer._start_step
    editor = pipeline.editor
    prompts = []
    real_edit = editor.edit
    editor.edit = lambda renders, originals, prompt, **settings: prompts.append(prompt) or real_edit(renders, originals, prompt, **settings)
    store = EditStore(trainer.base_dir / "igs2gs")

    step_pipeline(trainer, start)  # the scheduled first sweep
    first_prompt, views = prompts[0], len(prompts)
    encodings = editor.prompt_encodings
    pipeline.request_settings("make it bronze", 7.0, 1.25)
    pipeline.request_sweep()
    step_pipeline(trainer, start + 1)
    assert prompts[:views] == [first_prompt] * views and prompts[views:] == ["make it bronze"] * views
    assert editor.prompt_encodings == encodings + 1  # encoded once for the whole sweep
    state = store.load_state()
    assert state.sweeps_completed == 2
    assert state.settings == {"prompt": "make it bronze", "guidance_scale": 7.0, "image_guidance_scale": 1.25}

    pipeline.set_editing_paused(True)
    pipeline.request_sweep()
    step_pipeline(trainer, start + 2)
    assert store.load_state().sweeps_completed == 2  # held back while paused
    pipeline.set_editing_paused(False)
    step_pipeline(trainer, start + 3)
    assert store.load_state().sweeps_completed == 3  # the request survives the pause
    step_pipeline(trainer, start + 5)
    assert store.load_state().sweeps_completed == 4  # the schedule still runs after extra sweeps
    pipeline.request_settings("   ", 1.0, 1.0)
    step_pipeline(trainer, start + 6)
    assert pipeline.prompt == "make it bronze"


def test_resume_uses_the_settings_last_set_in_the_viewer(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path):
    trainer = make_trainer(scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "first", gs_steps=5)
    trainer.pipeline.request_settings("make it glass", 9.0, 1.5)
    step_pipeline(trainer, trainer._start_step)
    trainer.save_checkpoint(trainer._start_step)
    trainer.wait_for_checkpoint()
    resumed = make_trainer(scene_dir, trainer.checkpoint_dir, tiny_ip2p_dir, tmp_path, "second", gs_steps=5)
    assert resumed.pipeline.prompt == "make it glass" and resumed.pipeline.config.guidance_scale == 9.0
    # An instruction changed on the command line since the edit started wins; the guidance set in the viewer stays.
    resumed.save_checkpoint(resumed._start_step)
    resumed.wait_for_checkpoint()
    again = make_trainer(scene_dir, resumed.checkpoint_dir, tiny_ip2p_dir, tmp_path, "third", gs_steps=5, prompt="make it marble")
    assert again.pipeline.prompt == "make it marble" and again.pipeline.config.guidance_scale == 9.0
    assert again.pipeline.edit_store.load_state().settings["prompt"] == "make it marble"


def test_preview_is_an_inline_jpeg_of_the_training_image():
    image = torch.zeros(60, 800, 3, dtype=torch.uint8)
    image[..., 0] = 255
    markdown = preview_markdown(image, "caption")
    encoded = markdown.split("base64,", 1)[1].rstrip(")")
    picture = Image.open(io.BytesIO(base64.b64decode(encoded)))
    assert markdown.startswith("caption") and picture.size == (320, 24)
    assert picture.getpixel((10, 10))[0] > 240 and picture.getpixel((10, 10))[1] < 15


def test_nearest_view_follows_the_viewer_camera():
    centres = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    camera_to_worlds = torch.eye(4)[:3].repeat(3, 1, 1)
    camera_to_worlds[:, :, 3] = centres
    datamanager = SimpleNamespace(train_dataset=SimpleNamespace(cameras=SimpleNamespace(camera_to_worlds=camera_to_worlds)))
    controls = EditControls(SimpleNamespace(datamanager=datamanager))
    client = SimpleNamespace(camera=SimpleNamespace(position=(0.0, 1.8 * VISER_SCALE, 0.1)))
    controls.viser_server = SimpleNamespace(get_clients=lambda: {0: client})
    assert controls.nearest_view() == 2
    client.camera.position = (0.9 * VISER_SCALE, 0.0, 0.0)
    assert controls.nearest_view() == 1
    controls.viser_server = SimpleNamespace(get_clients=dict)
    assert controls.nearest_view() is None


def _wait(condition, timeout: float, what: str, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; log tail:\n{log.read_text()[-3000:] if log.exists() else ''}")


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="needs Debian's chromium (.ci/run installs it)")
def test_viewer_panel_steers_the_edit_in_a_real_browser(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM is not None, "chromium is missing: .ci/run installs Debian's chromium package"
    port, output, log = free_port(), tmp_path / "out", tmp_path / "train.log"
    args = igs2gs_args(
        scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, output,
        "--vis", "viewer", "--viewer.websocket-port", str(port), "--viewer.quit-on-train-completion", "False",
        "--max-num-iterations", "100000", "--pipeline.gs-steps", "100000",
    )
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "ns-train"), *args[1:]], cwd=tmp_path, env=offline_env(COLUMNS="400"),
            stdout=sink, stderr=subprocess.STDOUT,
        )
    try:
        def state():
            found = list(output.glob("*/igs2gs/*/igs2gs/state.json"))
            try:
                return json.loads(found[0].read_text()) if found else None
            except (json.JSONDecodeError, OSError):
                return None

        _wait(lambda: (state() or {}).get("sweeps_completed") == 1, 300, "the first sweep", log)
        with socket.socket() as client:
            assert client.connect_ex(("127.0.0.1", port)) == 0, "viewer port is not open"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(  # a fresh --user-data-dir
                str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
                viewport={"width": 1400, "height": 1000},
            )
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}")
            page.get_by_text("igs2gs edit").first.wait_for(timeout=120_000)
            status = page.locator("input:visible[value^='sweep']").first
            status.wait_for(timeout=60_000)
            before = status.input_value()
            assert before.startswith("sweep 1 of 1 done"), before
            instruction = page.locator("input:visible[value='make it look like a watercolour painting']").first
            instruction.fill("make it look like a bronze statue")
            page.keyboard.press("Enter")
            _wait(lambda: "set in the viewer" in log.read_text(), 60, "the new instruction to reach training", log)
            page.get_by_role("button", name="Re-edit all views now").click()
            _wait(lambda: (state() or {}).get("sweeps_completed") == 2, 300, "the requested sweep", log)
            page.wait_for_function(
                "() => [...document.querySelectorAll('input')].some(i => i.value.startsWith('sweep 2 of 2'))", timeout=30_000
            )
            # The training-image preview: pick "edited image"; the panel shows that view's current edit.
            page.locator("input:visible[value='hidden']").first.click()
            page.get_by_role("option", name="edited image").click()
            page.wait_for_selector("img[src^='data:image/jpeg']", timeout=30_000)
            assert "edited image" in page.content()
            page.screenshot(path=str(tmp_path / "viewer.png"))
            browser.close()
        assert state()["settings"]["prompt"] == "make it look like a bronze statue"
        assert "bronze statue" in log.read_text().split("igs2gs sweep 2:", 1)[1][:400]  # the sweep's log line
        assert (tmp_path / "viewer.png").stat().st_size > 10_000
    finally:
        process.kill()
        process.wait(timeout=30)


def test_viser_icons_come_from_an_index_read_once_and_are_viser_s_own(monkeypatch):
    import tarfile

    import viser._gui_api
    import viser._gui_handles
    import viser._icons
    from viser import Icon

    import igs2gs.viewer_controls as controls

    original = viser._icons.svg_from_icon
    for module in (viser._icons, viser._gui_api, viser._gui_handles):
        monkeypatch.setattr(module, "svg_from_icon", module.svg_from_icon)  # restored after the test
    controls._icon_offsets.cache_clear()
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(controls.tarfile, "open", lambda *args, **kwargs: opened.append(args) or real_open(*args, **kwargs))

    assert controls.index_viser_icons()
    assert viser._gui_api.svg_from_icon is viser._gui_handles.svg_from_icon is controls.indexed_svg_from_icon
    icons = (Icon.PLAYER_PAUSE, Icon.X, "123", Icon.ZZZ)  # "123": the tarball's first member
    indexed = [viser._gui_api.svg_from_icon(icon) for icon in icons]
    assert len(opened) == 1  # one pass over the headers for all icons
    assert all(svg.startswith("<svg") for svg in indexed)
    assert indexed == [original(icon) for icon in icons]  # (viser's own opens the tarball every time)
    for lookup in (original, controls.indexed_svg_from_icon):  # an icon the tarball lacks: a KeyError either way
        with pytest.raises(KeyError):
            lookup(Icon.AB)


def test_an_edit_with_the_viewer_sets_up_with_the_icon_index(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path, monkeypatch):
    import viser._gui_api
    import viser._gui_handles
    import viser._icons

    from igs2gs.viewer_controls import indexed_svg_from_icon

    for module in (viser._icons, viser._gui_api, viser._gui_handles):
        monkeypatch.setattr(module, "svg_from_icon", module.svg_from_icon)  # restored after the test
    with trainer_with_viewer(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path) as trainer:
        assert viser._gui_api.svg_from_icon is indexed_svg_from_icon  # installed before the viewer drew its GUI
        assert trainer.viewer_state is not None


def test_the_viewer_draws_the_camera_thumbnails_from_the_cached_photos(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path, monkeypatch):
    """nerfstudio's viewer would decode every training photo from disk again before the first step."""
    from nerfstudio.data.datasets.base_dataset import InputDataset

    with trainer_with_viewer(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path) as trainer:
        dataset = trainer.pipeline.datamanager.train_dataset
        # What nerfstudio's init_scene makes of its own source: (image * 255) as uint8.
        expected = [(dataset[view]["image"] * 255).type(torch.uint8) for view in range(len(dataset))]
        sources, real_init_scene = [], trainer.viewer_state.init_scene
        monkeypatch.setattr(
            trainer.viewer_state, "init_scene", lambda train_dataset, **rest: sources.append(train_dataset) or real_init_scene(train_dataset, **rest)
        )
        monkeypatch.setattr(InputDataset, "__getitem__", lambda self, index: pytest.fail("a photo was read from disk again"))
        trainer._init_viewer_state()
        (source,) = sources
        assert source.cameras is dataset.cameras and len(source) == len(expected) == len(trainer.viewer_state.camera_handles)
        for view, image in enumerate(expected):
            assert torch.equal((source[view]["image"] * 255).type(torch.uint8).cpu(), image), view


def test_the_panels_refresh_thread_and_the_viewers_renderers_are_stopped_at_exit(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path):
    """Both render with torch: the interpreter's exit must not find them there (``threads_at_exit``). nerfstudio's
    viewer starts a renderer per client, which stops once its ``running`` is False: one stands in for a client's."""
    from igs2gs import threads_at_exit

    class Renderer(threading.Thread):
        def __init__(self):
            super().__init__(daemon=True)
            self.running = True

        def run(self):
            while self.running:
                time.sleep(0.01)

    with trainer_with_viewer(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path) as trainer:
        renderer = Renderer()
        renderer.start()
        trainer.viewer_state.render_statemachines[7] = renderer  # as a client's connection adds it
        panel = trainer.pipeline.edit_controls._refresher
        stops = {thread: stop for thread, stop in threads_at_exit.running() if thread in (panel, renderer)}
        assert set(stops) == {panel, renderer}
        for thread, stop in stops.items():
            stop()
            thread.join(5.0)
            assert not thread.is_alive()
        del trainer.viewer_state.render_statemachines[7]
