"""The plugin is discovered by nerfstudio, documents its flags and keeps its entry point light."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from conftest import ROOT, offline_env, run_cli

FLAGS = [
    "--pipeline.prompt",
    "--pipeline.guidance-scale",
    "--pipeline.image-guidance-scale",
    "--pipeline.gs-steps",
    "--pipeline.diffusion-steps",
    "--pipeline.lower-bound",
    "--pipeline.upper-bound",
    "--pipeline.ip2p-device",
    "--pipeline.ip2p-use-full-precision",
    "--pipeline.ip2p-model",
    "--pipeline.ip2p-max-batch-size",
    "--pipeline.model.lpips-loss-mult",
]


def test_method_is_discovered_under_its_name():
    from nerfstudio.plugins.registry import discover_methods

    from igs2gs.config import igs2gs_method

    methods, descriptions = discover_methods()
    assert methods["igs2gs"] is igs2gs_method.config
    assert "Instruct-GS2GS" in descriptions["igs2gs"]


def test_entry_point_imports_neither_diffusers_nor_transformers():
    code = (
        "import sys\n"
        "from importlib.metadata import entry_points\n"
        "entry_points(group='nerfstudio.method_configs')['igs2gs'].load()\n"
        "heavy = [m for m in ('diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=offline_env())


def test_nested_configs_are_not_shared_between_instances():
    from igs2gs.pipeline import IGS2GSPipelineConfig

    first, second = IGS2GSPipelineConfig(), IGS2GSPipelineConfig()
    assert first.model is not second.model and first.datamanager is not second.datamanager
    for config in (first, first.model, first.datamanager):
        for field in dataclasses.fields(config):
            assert field.default is dataclasses.MISSING or not dataclasses.is_dataclass(field.default), field.name


def test_ns_train_help_lists_igs2gs_and_every_flag_with_a_description(tmp_path):
    listing = run_cli(["ns-train", "--help"], cwd=tmp_path).stdout
    assert "igs2gs" in listing
    assert "pip install" not in listing.split("igs2gs", 1)[1].split("\n", 1)[0]
    help_text = run_cli(["ns-train", "igs2gs", "--help"], cwd=tmp_path).stdout
    for flag in FLAGS:
        assert flag in help_text, flag
        after = help_text.split(flag, 1)[1].split("\n", 2)
        assert any(ch.isalpha() for ch in (after[1] if len(after) > 1 else "")), f"{flag} has no description"


def test_any_nerfstudio_dataparser_can_read_the_data(tmp_path):
    """A scene trained with ``ns-train splatfacto ... colmap`` is edited with ``ns-train igs2gs ... colmap``."""
    import tyro
    from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion
    from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    default = tyro.cli(AnnotatedBaseConfigUnion, args=["igs2gs", "--data", str(tmp_path)])
    assert type(default.pipeline.datamanager.dataparser) is NerfstudioDataParserConfig
    assert default.pipeline.datamanager.dataparser.load_3D_points  # splatfacto's seed points
    colmap = tyro.cli(AnnotatedBaseConfigUnion, args=["igs2gs", "--data", str(tmp_path), "colmap", "--downscale-factor", "2"])
    assert type(colmap.pipeline.datamanager.dataparser) is ColmapDataParserConfig
    assert colmap.pipeline.datamanager.dataparser.downscale_factor == 2
