"""igs2gs-preview: the first sweep's edits of a few photos at several guidance settings, on one sheet."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli
from PIL import Image

from igs2gs.preview import LABEL_HEIGHT, TILE_HEIGHT, PreviewConfig, check_preview, preview_edits, spread_views

PROMPT = "make it look like a watercolour painting"


def test_preview_makes_the_first_sweeps_edits_of_the_photos(scene_dir, tiny_ip2p_dir):
    from igs2gs.datamanager import IGS2GSDataManagerConfig
    from igs2gs.ip2p import InstructPix2Pix
    from igs2gs.pipeline import edit_generator

    config = PreviewConfig(
        data=scene_dir, prompt=PROMPT, views=2, guidance_scales=(2.0, 7.5), image_guidance_scales=(1.5,),
        diffusion_steps=2, ip2p_model=str(tiny_ip2p_dir), device="cpu", edit_seed=3,
    )
    sheet, edits, timings = preview_edits(config)
    assert list(edits) == [(2.0, 1.5), (7.5, 1.5)]
    datamanager = IGS2GSDataManagerConfig(data=scene_dir).setup(device="cpu")
    views = spread_views(len(datamanager.original_images), 2)
    assert views == [0, len(datamanager.original_images) - 1]
    # What the pipeline's first sweep would make of renders equal to the photos: same photos, seeds, settings.
    editor = InstructPix2Pix.from_pretrained(str(tiny_ip2p_dir), device="cpu")
    photos = datamanager.originals(views, torch.device("cpu"))
    expected = editor.edit(
        photos, photos, PROMPT, guidance_scale=7.5, image_guidance_scale=1.5, diffusion_steps=2,
        generator=[edit_generator(3, 0, view) for view in views], cond_keys=views,
    )
    for index, view in enumerate(views):
        assert torch.allclose(edits[(7.5, 1.5)][view], expected[index], atol=1e-5)
    assert (edits[(2.0, 1.5)][views[0]] - edits[(7.5, 1.5)][views[0]]).abs().max() > 1e-3  # guidance matters
    # A label row over a tile per view; columns: the photo, then each setting.
    assert sheet.shape == (LABEL_HEIGHT + 2 * TILE_HEIGHT, 3 * TILE_HEIGHT, 3) and sheet.dtype.name == "uint8"
    assert timings["edits"] == 4


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(prompt="  "), "instruction is empty"),
        (dict(data="missing-folder"), "no transforms.json"),
        (dict(lower_bound=0.9, upper_bound=0.2), "--lower-bound 0.9 and --upper-bound 0.2"),
        (dict(diffusion_steps=0), "--diffusion-steps 0"),
        (dict(guidance_scales=()), "at least one value"),
        pytest.param(dict(device="cuda"), "no CUDA device", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
    ],
)
def test_bad_preview_settings_are_refused_before_anything_loads(scene_dir, changes, message):
    settings = dict(data=scene_dir, prompt=PROMPT, ip2p_model="never-loaded", device="cpu")
    settings.update(changes)
    with pytest.raises(ValueError, match=message):
        check_preview(PreviewConfig(**settings))
    with pytest.raises(ValueError, match="--views 0"):
        spread_views(9, 0)


def test_preview_command_writes_the_sheet_and_reports_errors_without_a_traceback(scene_dir, tiny_ip2p_dir, tmp_path):
    output = tmp_path / "sheet.png"
    common = ["--data", str(scene_dir), "--prompt", PROMPT, "--device", "cpu", "--diffusion-steps", "1"]
    result = run_cli(["igs2gs-preview", *common, "--ip2p-model", str(tiny_ip2p_dir), "--views", "1", "--guidance-scales", "5", "--output", str(output)], tmp_path)
    assert f"Wrote {output}: 1 edits" in result.stdout
    assert Image.open(output).size == (2 * TILE_HEIGHT, LABEL_HEIGHT + TILE_HEIGHT)
    missing = run_cli(["igs2gs-preview", *common, "--ip2p-model", str(tmp_path / "no-model")], tmp_path, check=False)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "igs2gs-preview: InstructPix2Pix" in missing.stderr and "--ip2p-model DIR for igs2gs-preview" in missing.stderr


def test_preview_reads_the_data_with_the_dataparser_given(scene_dir, tiny_ip2p_dir, tmp_path):
    import tyro
    from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    # The subcommand picks the dataparser; a COLMAP folder has no transforms.json and is not asked for one.
    parsed = tyro.cli(PreviewConfig, args=["--data", str(tmp_path), "--prompt", PROMPT, "colmap", "--downscale-factor", "2"])
    assert type(parsed.dataparser) is ColmapDataParserConfig and parsed.dataparser.downscale_factor == 2
    check_preview(parsed)
    with pytest.raises(ValueError, match=f"--data {tmp_path} could not be read with ColmapDataParserConfig"):
        preview_edits(parsed)  # an empty folder: a clear refusal, not a traceback from the dataparser
    # Its options reach the datamanager: half the views for training, so all 5 are edited.
    config = PreviewConfig(
        data=scene_dir, prompt=PROMPT, views=100, guidance_scales=(7.5,), diffusion_steps=2, ip2p_model=str(tiny_ip2p_dir),
        device="cpu", dataparser=NerfstudioDataParserConfig(train_split_fraction=0.5),
    )
    _, edits, _ = preview_edits(config)
    assert len(edits[(7.5, 1.5)]) == 5


def test_preview_of_large_photos_says_what_to_do(scene_dir, tiny_ip2p_dir, monkeypatch):
    from igs2gs import datamanager, preview

    logged = []
    monkeypatch.setattr(preview.CONSOLE, "log", lambda text, *args, **kwargs: logged.append(str(text)))
    config = PreviewConfig(data=scene_dir, prompt=PROMPT, views=1, guidance_scales=(7.5,), image_guidance_scales=(1.5,),
                           diffusion_steps=1, ip2p_model=str(tiny_ip2p_dir), device="cpu")
    advice = lambda: [text for text in logged if "InstructPix2Pix edits them at that size" in text]  # noqa: E731
    preview_edits(config)
    assert advice() == []  # 64 px photos
    monkeypatch.setattr(datamanager, "LARGE_VIEW_SIDE", 32)
    preview_edits(config)
    assert len(advice()) == 1 and "`nerfstudio-data --downscale-factor 2`" in advice()[0]
