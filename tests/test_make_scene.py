"""The procedural scene generator writes valid nerfstudio data, deterministically."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from make_scene import make_scene


def test_scene_files_are_complete_and_deterministic(tmp_path):
    first = make_scene(tmp_path / "a", views=6, size=32, seed=3, points=300)
    second = make_scene(tmp_path / "b", views=6, size=32, seed=3, points=300)
    other = make_scene(tmp_path / "c", views=6, size=32, seed=4, points=300)
    meta = json.loads((first / "transforms.json").read_text())
    assert len(meta["frames"]) == 6 and meta["w"] == meta["h"] == 32
    for frame in meta["frames"]:
        image = np.asarray(Image.open(first / frame["file_path"]))
        assert image.shape == (32, 32, 3) and image.std() > 10  # not blank
        assert np.allclose(np.asarray(frame["transform_matrix"])[3], [0, 0, 0, 1])
    assert (first / "transforms.json").read_text() == (second / "transforms.json").read_text()
    assert (first / "sparse_pc.ply").read_bytes() == (second / "sparse_pc.ply").read_bytes()
    assert (first / "transforms.json").read_text() != (other / "transforms.json").read_text()


def test_scene_loads_with_nerfstudio_dataparser_including_points(tmp_path):
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    scene = make_scene(tmp_path / "s", views=10, size=48, seed=0, points=500)
    outputs = NerfstudioDataParserConfig(data=scene, load_3D_points=True).setup().get_dataparser_outputs("train")
    assert len(outputs.image_filenames) == 9  # nerfstudio holds out one view in ten
    points, colours = outputs.metadata["points3D_xyz"], outputs.metadata["points3D_rgb"]
    assert points.shape == (500, 3) and colours.shape == (500, 3)
    assert colours.dtype == torch.uint8 and colours.float().std() > 10
    # The points are in the cameras' frame: every camera (looking down -z) has most of them in front
    # (all but the sky dome behind it).
    c2w = outputs.cameras.camera_to_worlds
    in_camera = torch.einsum("cji,cnj->cni", c2w[:, :, :3], points[None] - c2w[:, None, :, 3])
    assert ((in_camera[..., 2] < 0).float().mean(dim=1) > 0.7).all()


def test_scene_rejects_degenerate_sizes(tmp_path):
    with pytest.raises(ValueError, match="at least 2 views"):
        make_scene(tmp_path / "x", views=1, size=32)
