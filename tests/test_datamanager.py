"""The datamanager's per-view training cameras: the same views and cameras as nerfstudio's, without the per-step cost."""

from __future__ import annotations

import copy

import pytest
import torch

from igs2gs.datamanager import ViewCamera
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanager
from test_pipeline import TRAIN_VIEWS, make_trainer


@pytest.fixture(scope="module")
def trainer(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path_factory):
    return make_trainer(scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path_factory.mktemp("dm"), "dm")


def test_next_train_gives_nerfstudios_views_images_and_cameras(trainer):
    ours = trainer.pipeline.datamanager
    theirs = copy.copy(ours)  # same caches and sampling, nerfstudio's next_train
    theirs.train_unseen_cameras = list(ours.train_unseen_cameras)
    theirs.random_generator = copy.deepcopy(ours.random_generator)  # refills draw the same order
    for step in range(2 * TRAIN_VIEWS):  # two epochs: the unseen list is refilled as nerfstudio does
        camera, data = ours.next_train(step)
        expected_camera, expected_data = FullImageDatamanager.next_train(theirs, step)
        assert isinstance(camera, ViewCamera)
        assert camera.metadata["cam_idx"] == expected_camera.metadata["cam_idx"]
        assert torch.equal(data["image"], expected_data["image"])
        for name in ("camera_to_worlds", "fx", "fy", "cx", "cy", "width", "height"):
            assert torch.equal(getattr(camera, name), getattr(expected_camera, name)), name
        assert torch.equal(camera.get_intrinsics_matrices(), expected_camera.get_intrinsics_matrices())
        assert int(camera.width.item()) == int(expected_camera.width.item())


def test_rescaling_a_handed_out_camera_leaves_the_cached_one_alone(trainer):
    datamanager = trainer.pipeline.datamanager
    camera, _ = datamanager.next_train(0)
    view = camera.metadata["cam_idx"]
    cached = datamanager._view_cameras[view]
    width, fx = cached.width.clone(), cached.fx.clone()
    camera.rescale_output_resolution(1.0)  # splatfacto at full resolution: nothing to do
    assert camera.width is cached.width
    camera.rescale_output_resolution(0.5)
    assert torch.equal(camera.width, torch.div(width, 2, rounding_mode="floor"))
    assert torch.allclose(camera.get_intrinsics_matrices()[0, 0, 0], fx[0, 0] / 2)
    assert torch.equal(cached.width, width) and torch.equal(cached.fx, fx)
    again, _ = datamanager.next_train(1)
    assert torch.equal(datamanager._view_cameras[view].get_intrinsics_matrices()[0, 0, 0], fx[0, 0])


def test_a_view_s_image_generation_counts_its_replacements_and_comes_with_its_batch(trainer):
    datamanager = trainer.pipeline.datamanager
    camera, data = datamanager.next_train(0)
    view = camera.metadata["cam_idx"]
    before = data["image_generation"]
    height, width = data["image"].shape[:2]
    datamanager.replace_uint8({view: torch.zeros(height, width, 3, dtype=torch.uint8)})
    assert datamanager.image_generations[view] == before + 1
    for step in range(1, 3 * len(datamanager.cached_train)):
        camera, data = datamanager.next_train(step)
        if camera.metadata["cam_idx"] == view:
            break
    assert camera.metadata["cam_idx"] == view and data["image_generation"] == before + 1


def test_views_much_larger_than_ip2p_s_512_px_get_advice_naming_the_dataparser_and_factor():
    from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig
    from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    from igs2gs.datamanager import large_view_advice

    assert large_view_advice([(512, 512), (768, 576)], NerfstudioDataParserConfig(), 1) is None
    advice = large_view_advice([(512, 512), (1200, 1600)], NerfstudioDataParserConfig(), 1)
    assert advice is not None and "up to 1600x1200" in advice and "7.3x the pixels" in advice
    assert "train the scene on views 4x smaller" in advice and "`nerfstudio-data --downscale-factor 4`" in advice  # 400 px
    # read at factor 2 already (1000 px): twice as small again, 4 in all
    assert "`nerfstudio-data --downscale-factor 4`" in large_view_advice([(800, 1000)], NerfstudioDataParserConfig(), 2)
    # the factor the dataparser chose is unknown: said relative to it
    assert "`colmap --downscale-factor 2 times the one used now`" in large_view_advice([(800, 1000)], ColmapDataParserConfig())
    without = large_view_advice([(1024, 1024)], BlenderDataParserConfig())  # no downscale setting to point at
    assert without is not None and "up to 1024x1024" in without and "--downscale-factor" not in without


def test_an_edit_of_large_views_says_so_at_set_up(scene_dir, splatfacto_run, tiny_ip2p_dir, tmp_path, monkeypatch):
    """The advice comes before the editor loads, with the factor the scene's dataparser read the views at."""
    from igs2gs import datamanager, pipeline

    logged = []
    monkeypatch.setattr(pipeline.CONSOLE, "log", lambda text, *args, **kwargs: logged.append(str(text)))
    monkeypatch.setattr(datamanager, "LARGE_VIEW_SIDE", 32)  # the test scene's views are 64 px
    trainer = make_trainer(scene_dir, splatfacto_run / "nerfstudio_models", tiny_ip2p_dir, tmp_path, "large")
    height, width = trainer.pipeline.datamanager.original_images[0].shape[:2]
    advice = [text for text in logged if "InstructPix2Pix edits them at that size" in text]
    assert len(advice) == 1 and f"up to {width}x{height}" in advice[0]
    assert "`nerfstudio-data --downscale-factor 2`" in advice[0]  # read at factor 1
    assert logged.index(advice[0]) < next(i for i, text in enumerate(logged) if text.startswith("Loading InstructPix2Pix"))
