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
