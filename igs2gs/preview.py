"""``igs2gs-preview``: edit a few training photos at several guidance settings before a full edit.

A full edit takes minutes; choosing the instruction and the two guidance scales by running it
again and again is slow. This edits K training views' photos (undistorted as the datamanager
caches them) with the same editor, noise bounds and per-view seeds as the first sweep, once per
(guidance, image guidance) pair, and writes one sheet: a row per view, the photo then one column
per setting. The first sweep edits renders of the loaded scene, which look like these photos.

    igs2gs-preview --data DATA --prompt "turn the horse into a giraffe" \\
        --guidance-scales 7.5 12.5 --image-guidance-scales 1.2 1.5
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from nerfstudio.configs.dataparser_configs import AnnotatedDataParserUnion
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.utils.rich_utils import CONSOLE

from igs2gs.datamanager import IGS2GSDataManagerConfig, unreadable_data
from igs2gs.pipeline import DEFAULT_IP2P_MODEL, IGS2GSPipelineConfig, device_problem, edit_generator, schedule_problems

_DEFAULTS = IGS2GSPipelineConfig()
TILE_HEIGHT = 256  # px: tiles of the sheet, whatever the photos' size
LABEL_HEIGHT = 20


@dataclass
class PreviewConfig:
    """Edit a few training photos with InstructPix2Pix at several guidance settings and write one sheet."""

    data: Path
    """The scene folder, as given to ns-train igs2gs --data."""
    prompt: str
    """The edit instruction, e.g. 'make him a marble statue'."""
    dataparser: AnnotatedDataParserUnion = field(default_factory=lambda: IGS2GSDataManagerConfig().dataparser)
    """How --data is read, as by ns-train igs2gs: nerfstudio-data by default, or the dataparser the scene was trained
    with as a subcommand at the end of the command (e.g. ``colmap``)."""
    output: Path = Path("igs2gs_preview.png")
    """Where the sheet (PNG) is written."""
    views: int = 4
    """Training views to edit, spread evenly over the training set."""
    guidance_scales: Tuple[float, ...] = (7.5, _DEFAULTS.guidance_scale)
    """Text guidance values to try (--pipeline.guidance-scale)."""
    image_guidance_scales: Tuple[float, ...] = (_DEFAULTS.image_guidance_scale,)
    """Image guidance values to try (--pipeline.image-guidance-scale)."""
    diffusion_steps: int = _DEFAULTS.diffusion_steps
    """DDIM denoising steps per edit."""
    lower_bound: float = _DEFAULTS.lower_bound
    """Lowest noise level of the edit, as --pipeline.lower-bound."""
    upper_bound: float = _DEFAULTS.upper_bound
    """Highest noise level of the edit, as --pipeline.upper-bound."""
    edit_seed: int = _DEFAULTS.edit_seed
    """Seed of the edit noise, as --pipeline.edit-seed (the views get the first sweep's noise)."""
    ip2p_model: str = DEFAULT_IP2P_MODEL
    """InstructPix2Pix weights: a Hugging Face hub id or a local diffusers folder."""
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    """Device of the editor."""
    ip2p_use_full_precision: bool = False
    """Run the editor in float32 instead of float16."""


def spread_views(count: int, wanted: int) -> List[int]:
    """``wanted`` view ids spread evenly over ``count`` views (all of them if there are fewer)."""
    if wanted < 1:
        raise ValueError(f"--views {wanted}: must be at least 1")
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, min(wanted, count))})


def check_preview(config: PreviewConfig) -> None:
    """Refuse what would fail after the photos and the editor load."""
    if not config.prompt.strip():
        raise ValueError('The edit instruction is empty: pass one with --prompt "make him a marble statue".')
    data = Path(config.data)
    nerfstudio_format = isinstance(config.dataparser, NerfstudioDataParserConfig)
    if nerfstudio_format and not (data / "transforms.json").is_file() and not (data.suffix == ".json" and data.is_file()):
        raise ValueError(
            f"--data {data}: no transforms.json there (give the scene folder that ns-train igs2gs --data takes, and the "
            "dataparser it was trained with as a subcommand at the end, e.g. `colmap`)."
        )
    if not data.exists():
        raise ValueError(f"--data {data}: no such file or folder.")
    if not config.guidance_scales or not config.image_guidance_scales:
        raise ValueError("--guidance-scales and --image-guidance-scales need at least one value each.")
    problems = schedule_problems(config.lower_bound, config.upper_bound, config.diffusion_steps, prefix="--")
    device = device_problem(config.device)
    if device is not None:
        problems.append(f"--device {device}")
    if problems:
        raise ValueError("; ".join(problems))


def preview_edits(config: PreviewConfig) -> Tuple[np.ndarray, Dict[Tuple[float, float], Dict[int, torch.Tensor]], Dict[str, float]]:
    """Edit the views at every setting; returns the sheet (uint8 [H, W, 3]), the edits by setting and
    view (float [3, H, W] in [0, 1]) and timings."""
    from igs2gs.ip2p import InstructPix2Pix

    check_preview(config)
    started = time.perf_counter()
    # The igs2gs datamanager: its photos are exactly the ones the edit conditions on (undistorted).
    try:
        datamanager = IGS2GSDataManagerConfig(data=Path(config.data), dataparser=config.dataparser).setup(device="cpu")
    except Exception as error:  # each dataparser fails in its own way on data it cannot read
        raise ValueError(
            unreadable_data(config.data, config.dataparser, error)
            + ". Give the dataparser the scene was trained with as a subcommand at the end (e.g. `colmap`)."
        ) from None
    views = spread_views(len(datamanager.original_images), config.views)
    advice = datamanager.view_size_advice(views)
    if advice is not None:
        CONSOLE.log(f"[yellow]igs2gs-preview: {advice}.")
    editor = InstructPix2Pix.from_pretrained(
        config.ip2p_model, device=config.device, dtype=torch.float32 if config.ip2p_use_full_precision else torch.float16
    )
    loaded = time.perf_counter()
    by_size: Dict[Tuple[int, int], List[int]] = {}
    for view in views:
        by_size.setdefault(tuple(datamanager.original_images[view].shape[:2]), []).append(view)
    photos_by_size = [(group, datamanager.originals(group, torch.device(config.device))) for group in by_size.values()]
    edits: Dict[Tuple[float, float], Dict[int, torch.Tensor]] = {}
    for setting in [(g, ig) for ig in config.image_guidance_scales for g in config.guidance_scales]:
        edits[setting] = {}
        for group, photos in photos_by_size:
            edited = editor.edit(
                photos, photos, config.prompt, guidance_scale=setting[0], image_guidance_scale=setting[1],
                diffusion_steps=config.diffusion_steps, lower_bound=config.lower_bound, upper_bound=config.upper_bound,
                generator=[edit_generator(config.edit_seed, 0, view) for view in group], cond_keys=list(group),
            )
            edits[setting].update({view: image.cpu() for view, image in zip(group, edited)})
    edited_s = time.perf_counter() - loaded
    photos = {view: photo.cpu() for group, group_photos in photos_by_size for view, photo in zip(group, group_photos)}
    sheet = compose_sheet(views, photos, edits)
    timings = {"load_s": loaded - started, "edit_s": edited_s, "edits": float(len(views) * len(edits))}
    return sheet, edits, timings


def _tile(image: torch.Tensor) -> np.ndarray:
    """A float [3, H, W] image as a uint8 tile ``TILE_HEIGHT`` px tall."""
    from PIL import Image

    array = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    width = max(1, round(array.shape[1] * TILE_HEIGHT / array.shape[0]))
    return np.asarray(Image.fromarray(array).resize((width, TILE_HEIGHT), Image.BILINEAR))


def _label(text: str, width: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (width, LABEL_HEIGHT), (255, 255, 255))
    ImageDraw.Draw(canvas).text((4, 4), text, fill=(0, 0, 0))
    return np.asarray(canvas)


def compose_sheet(views: Sequence[int], photos: Dict[int, torch.Tensor], edits: Dict[Tuple[float, float], Dict[int, torch.Tensor]]) -> np.ndarray:
    """Rows: views; columns: the photo, then one edit per (guidance, image guidance), labelled on top."""
    columns = [("photo", photos)] + [(f"g {g:g} / image g {ig:g}", by_view) for (g, ig), by_view in edits.items()]
    blocks = []
    for title, by_view in columns:
        tiles = [_tile(by_view[view]) for view in views]
        width = max(tile.shape[1] for tile in tiles)
        padded = [np.pad(tile, ((0, 0), (0, width - tile.shape[1]), (0, 0)), constant_values=255) for tile in tiles]
        blocks.append(np.concatenate([_label(title, width), *padded], axis=0))
    return np.concatenate(blocks, axis=1)


def main(config: PreviewConfig) -> None:
    from igs2gs.edit_store import png_bytes, write_atomically

    sheet, _, timings = preview_edits(config)
    write_atomically(Path(config.output), png_bytes(sheet))
    print(
        f"Wrote {config.output}: {int(timings['edits'])} edits in {timings['edit_s']:.1f} s "
        f"({timings['edit_s'] / timings['edits']:.2f} s each; photos and editor loaded in {timings['load_s']:.1f} s)."
    )


def entrypoint() -> None:
    """Console script ``igs2gs-preview``: a bad setting or a missing model ends with its message, not a traceback."""
    import tyro

    from igs2gs.ip2p import IP2PUnavailableError

    config = tyro.cli(PreviewConfig)
    try:
        main(config)
    except (ValueError, IP2PUnavailableError) as error:
        sys.exit(f"igs2gs-preview: {error}")


if __name__ == "__main__":
    entrypoint()
